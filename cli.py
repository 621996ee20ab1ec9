"""`collector`: the command line, a thin shell over the `collector` and `forwarder` packages.

Each command parses its options, calls the library and prints what it returns; nothing
here knows a file name, a table or the HTTP stack.

    collector run | serve | forward          run both halves, the server alone, the forwarder
    collector status [--json|--watch]         what the collector is doing
    collector keys create|import|list|revoke  the API keys clients use
    collector dlq list|export|show|replay|purge   dead-lettered events
    collector config check|show               the effective settings
"""

from __future__ import annotations

import multiprocessing
import sys

if getattr(sys, "frozen", False):
    # The one-file build's executable is also the interpreter of its queue writer child
    # (multiprocessing "spawn") and its resource tracker: run such a child here, and exit,
    # before the command line's imports, which it needs none of (15 MiB of the writer).
    multiprocessing.freeze_support()

import asyncio
import contextlib
import errno
import getpass
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from collector import __version__
from collector.errors import (
    AlreadyRunning,
    ConfigFileError,
    KeyStoreUnavailable,
    SalvageFailed,
    Unavailable,
)
from collector.ops import logs
from collector.ops import status as status_document
from collector.ops.supervisor import ForwarderChild, safe_imports_for_children
from collector.server.auth import SCOPES, KeyStore, now_utc
from collector.settings import Settings, load_settings
from collector.store import recovery
from collector.store.datadir import DataDir, make_private
from collector.store.deadletters import DeadLetters, replay
from collector.store.spool import Spool


def plain_typer(help: str, *, completion: bool = True) -> typer.Typer:
    """A command group with plain help (click's: it fits the terminal and shows no type
    artefacts such as `<bool>`), and no boxed traceback: an error that escapes a command is
    one log record (JSON off a terminal, `collector.ops.logs`), never a box in the log."""
    return typer.Typer(
        help=help,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        no_args_is_help=True,
        add_completion=completion,
    )


app = plain_typer("Edge collector for Traffical experiment events.", completion=False)
keys_app = plain_typer("Manage the API keys clients use.")
app.add_typer(keys_app, name="keys")
config_app = plain_typer("Check and show the effective settings.")
app.add_typer(config_app, name="config")
dlq_app = plain_typer("Inspect, replay and purge dead-lettered events.")
app.add_typer(dlq_app, name="dlq")

# How often `status --watch` refreshes: as often as the processes write their heartbeat.
STATUS_REFRESH_S = 2.0
# Columns a table may take when written into a pipe or a file: enough that a row stays one
# line (dlq list cuts reasons to 80 characters), so that grep and the like see it whole.
PIPED_WIDTH = 1000


def table_console() -> Console:
    """On a terminal, its width: long names fold onto more lines; elsewhere `PIPED_WIDTH`."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="TOML settings file (default /etc/collector/collector.toml).",
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", metavar="DIR", help="Data directory (COLLECTOR_DATA_DIR)."),
]
# The options `keys create` and `keys import` share.
ScopeOption = Annotated[
    list[str],
    typer.Option(metavar="SCOPE", help=f"Scope to grant, repeatable: {', '.join(SCOPES)}."),
]
ProjectOption = Annotated[
    str | None, typer.Option(metavar="PROJECT", help="Restrict the key to this project.")
]
EnvOption = Annotated[
    str | None, typer.Option(metavar="ENV", help="Restrict the key to this environment.")
]
NameOption = Annotated[str | None, typer.Option(metavar="NAME", help="A name to find the key by.")]


def show_version(asked: bool) -> None:
    if asked:
        typer.echo(f"collector {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Edge collector for Traffical experiment events."""


def settings_or_exit(config: Path | None, **flags: Any) -> Settings:
    """Settings, or a one-line error naming the bad file or key and exit status 2."""
    try:
        return load_settings(config, **flags)
    except ConfigFileError as exc:
        typer.echo(f"error: {exc}", err=True)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = ".".join(map(str, error["loc"]))
            typer.echo(f"error: setting '{name}': {error['msg']}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def readable(data: DataDir) -> Iterator[None]:
    """A data file that cannot be read becomes a one-line error naming it (exit 2).

    Only the server and the forwarder move a corrupt file aside (`collector.store.recovery`),
    when they start; a command run while they are down meets the file as it is.
    """
    try:
        yield
    except Unavailable as exc:
        corrupt = [f"{name} ({reason})" for name, reason in recovery.diagnose(data)]
        if corrupt:
            typer.echo(
                f"error: corrupt data in {data.path}: {', '.join(corrupt)}. The server and the"
                " forwarder move a corrupt file aside when they start: start the collector,"
                " or move the file away yourself.",
                err=True,
            )
        else:
            typer.echo(f"error: cannot read the data in {data.path}: {exc.message}", err=True)
        raise typer.Exit(2) from exc


def collector_data(settings: Settings, *, queue: bool = False) -> DataDir:
    """The data directory of `settings`, which must hold collector data (and, with `queue`,
    the queue a server made): a command that only reads never creates one, and says which
    directory it looked at (exit 2)."""
    data = DataDir(settings.data_dir)
    if not data.holds_data():
        typer.echo(
            f"error: no collector data in {data.path}: start the collector there first,"
            " or name its data directory with --data-dir or COLLECTOR_DATA_DIR",
            err=True,
        )
        raise typer.Exit(2)
    if queue and not data.queue.exists():
        typer.echo(f"error: no queue in {data.path} yet: the server has not run there", err=True)
        raise typer.Exit(2)
    return data


@contextlib.contextmanager
def key_store(settings: Settings, *, must_exist: bool = False) -> Iterator[KeyStore]:
    """The data directory's key store; what goes wrong with it as one line (exit 2)."""
    data = DataDir(settings.data_dir)
    if must_exist and not data.keys.exists():
        typer.echo(f"error: no API keys in {data.path} (no {data.keys.name})", err=True)
        raise typer.Exit(2)
    try:
        yield KeyStore(data)
    except KeyStoreUnavailable as exc:
        typer.echo(f"error: {exc.message} ({data.keys})", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


HostOption = Annotated[
    str | None, typer.Option(metavar="ADDRESS", help="Address to bind (COLLECTOR_HOST).")
]
PortOption = Annotated[
    int | None, typer.Option(metavar="PORT", help="Port to listen on (COLLECTOR_PORT).")
]


def setup_logging(settings: Settings) -> None:
    logs.setup(settings.log_level)


@app.command()
def run(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Run the server and the forwarder together (the usual way). Example: collector run"""
    from forwarder import process

    settings = settings_or_exit(config, data_dir=data_dir, host=host, port=port)
    usable_or_exit(settings)
    data = DataDir(settings.data_dir)
    if process.running_pid(data) is not None:  # its child would be restarted for ever
        typer.echo(f"error: {process.already_running(data)}", err=True)
        raise typer.Exit(1)
    setup_logging(settings)
    child = ForwarderChild(
        [*_path_flag("--config", config), *_path_flag("--data-dir", data_dir)],
        settings.stop_timeout_seconds,
    )
    child.start()
    served = False
    try:
        served = _serve(settings, on_stop=child.begin_stop)
    finally:
        stopped = child.stop()
    if not (served and stopped):  # cut short at stop_timeout_seconds, or killed
        raise typer.Exit(1)


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Run the events server alone. Example: collector serve --port 8787"""
    settings = settings_or_exit(config, data_dir=data_dir, host=host, port=port)
    usable_or_exit(settings)
    setup_logging(settings)
    if not _serve(settings):
        raise typer.Exit(1)  # requests in progress were cut at stop_timeout_seconds


@app.command()
def forward(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the forwarder alone: drain the queue to the upstream. Example: collector forward"""
    from forwarder import process

    settings = settings_or_exit(config, data_dir=data_dir)
    usable_or_exit(settings)
    setup_logging(settings)
    try:
        finished = asyncio.run(
            process.run(settings, lambda: load_settings(config, data_dir=data_dir), parent_pid)
        )
    except AlreadyRunning as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ConfigFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not finished:
        raise typer.Exit(1)  # upstream requests in progress were cut at stop_timeout_seconds


def _serve(settings: Settings, on_stop: Callable[[], None] = lambda: None) -> bool:
    from collector.server import bootstrap  # imported when used: litestar is slow to import

    return bootstrap.serve(settings, on_stop)


def usable_or_exit(settings: Settings) -> None:
    """A data directory this process cannot make or write is one line naming it (exit 2)."""
    if why := DataDir(settings.data_dir).unusable():
        typer.echo(f"error: setting 'data_dir': {why}", err=True)
        raise typer.Exit(2)


def _path_flag(flag: str, value: Path | None) -> list[str]:
    return [flag, str(value.resolve())] if value is not None else []


@keys_app.command("create")
def keys_create(
    scope: ScopeOption,
    project: ProjectOption = None,
    env: EnvOption = None,
    expires: Annotated[
        datetime | None, typer.Option(metavar="WHEN", help="Expiry, ISO 8601 (UTC when no offset).")
    ] = None,
    name: NameOption = None,
    publishable: Annotated[
        bool, typer.Option(help="Make a traffical_pk_ key, safe to ship in browsers.")
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a key; its secret is printed alone on the last line, once.

    Example: collector keys create --scope sdk:write --project web --name web-prod
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    with key_store(settings) as store:
        key, secret = store.create(
            scope, name=name, project=project, env=env, expires=expires, publishable=publishable
        )
    typer.echo(
        f"Created key '{key.name}' ({', '.join(key.scopes)}) in {store.path}."
        " Its secret, shown once:"
    )
    typer.echo(secret)


@keys_app.command("import")
def keys_import(
    scope: ScopeOption,
    project: ProjectOption = None,
    env: EnvOption = None,
    name: NameOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Accept an existing Traffical key (read from standard input, never an argument).

    Use it when SDKs fetch their config through the collector: the same key must be valid
    here (for events) and upstream (for config, resolve, decide).
    Example: collector keys import --scope sdk:write --scope sdk:read < key-file
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    if sys.stdin.isatty():
        secret = getpass.getpass("Paste the key to import and press Enter (it is not shown): ")
    else:
        secret = sys.stdin.readline()
    secret = secret.strip()
    with key_store(settings) as store:
        key, _ = store.create(scope, name=name, project=project, env=env, existing=secret)
    typer.echo(
        f"Imported key '{key.name}' ({key.prefix}…, {', '.join(key.scopes)}) in {store.path}."
    )


@keys_app.command("list")
def keys_list(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List the keys (never their secrets). Example: collector keys list"""
    settings = settings_or_exit(config, data_dir=data_dir)
    from collector.ops.statusview import folding

    table = folding(Table("name", "prefix", "scopes", "project", "env", "expires", "status"))
    now = now_utc()
    with key_store(settings, must_exist=True) as store:
        keys = store.list_keys()
    for key in keys:
        table.add_row(
            key.name,
            key.prefix + "…",
            " ".join(key.scopes),
            key.project or "any",
            key.env or "any",
            key.expires or "never",
            key.status(now),
        )
    table_console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    name_or_prefix: Annotated[
        str, typer.Argument(metavar="NAME", help="The key's name or the start of it.")
    ],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key at once, without a restart. Example: collector keys revoke web-prod"""
    settings = settings_or_exit(config, data_dir=data_dir)
    with key_store(settings, must_exist=True) as store:
        key = store.revoke(name_or_prefix)
    typer.echo(f"Revoked key '{key.name}' ({key.prefix}…) in {store.path}.")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh every 2 s: in place on a terminal, else a line per refresh "
            "(a JSON document per line with --json).",
        ),
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show what the collector is doing, from the data directory (works when it is down).

    Exit status: 0 healthy; 1 unhealthy (server or forwarder down, upstream key refused,
    upstream failing for over 5 minutes, disk budget 90% used); 2 no data directory, bad
    settings or a data file that cannot be read. Example: collector status --json
    """
    from collector.ops import statusview  # imported when used, as rich's tables are

    settings = settings_or_exit(config, data_dir=data_dir)
    data = collector_data(settings, queue=True)
    with readable(data):
        document = status_document.collect(settings)
        if watch:
            shown = [document]  # the last one shown decides the exit status
            with contextlib.suppress(KeyboardInterrupt):
                watch_status(settings, shown, as_json)
            document = shown[-1]
        elif as_json:
            typer.echo(json.dumps(document, indent=2))
        else:
            Console().print(statusview.render(document))
    raise typer.Exit(0 if document["healthy"] else 1)


@app.command()
def experiments(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show each policy's exposures per allocation against the split expected (declared,
    or its config bundle's), with the sample-ratio verdict, from the data directory.

    Exit status: 0 no checked policy mismatches; 1 one does (for a monitoring check);
    2 no data directory, bad settings or a data file that cannot be read.
    Example: collector experiments --json
    """
    from collector.ops import statusview

    settings = settings_or_exit(config, data_dir=data_dir)
    data = collector_data(settings, queue=True)
    with readable(data):
        verdicts = status_document.collect(settings)["sample_ratio"]
    mismatch = any(v["mismatch"] for v in verdicts)
    if as_json:
        document = {
            "window_minutes": settings.counts_window_minutes,
            "mismatch": mismatch,
            "policies": verdicts,
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        Console().print(statusview.experiments({"sample_ratio": verdicts}))
    raise typer.Exit(1 if mismatch else 0)


@app.command()
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Prove that every event adds up: the outcomes ledger against the queue, the dead
    letters and its witness, per project and env (works while the collector runs).

    Exit status: 0 balanced, nothing lost; 1 a difference, or events recorded as lost
    (each named); 2 no data directory, bad settings or a data file that cannot be read.
    Example: collector audit --json
    """
    from collector.ops import audit as auditing

    settings = settings_or_exit(config, data_dir=data_dir)
    data = collector_data(settings)
    with readable(data):
        document = auditing.audit(data)
    typer.echo(json.dumps(document, indent=2) if as_json else auditing.render(document))
    raise typer.Exit(0 if document["balanced"] else 1)


@app.command()
def salvage(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A corrupt queue or dead-letter file.")
    ],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Read back what a corrupt queue or dead-letter file still holds into this data
    directory: the events into the queue, the letters into the dead-letter store (FILE is
    read, never changed; SQLite's recovery, with the sqlite3 tool).

    Example: collector salvage /var/lib/collector/queue.db.corrupt-20261202T024520
    """
    from collector.store import reconcile  # imported when used: it brings the salvager

    settings = settings_or_exit(config, data_dir=data_dir)
    if not file.is_file():
        typer.echo(f"error: {file.absolute()} is not a file", err=True)
        raise typer.Exit(2)
    data = DataDir(settings.data_dir)
    usable_or_exit(settings)
    with readable(data):
        spool = Spool(data, sync=settings.sync, budget_bytes=settings.disk_budget_bytes)
        dead = DeadLetters.writer(data)
        try:
            done = reconcile.salvage_file(spool, dead, file)
        except SalvageFailed as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from exc
        finally:
            spool.close()
            dead.close()
    typer.echo(
        f"Read back {done.events} events from {file} into the {done.what}"
        f" ({done.unreadable_rows} rows could not be read)."
    )


def watch_status(settings: Settings, shown: list[dict[str, Any]], as_json: bool) -> None:
    """Refresh until interrupted, appending each document to `shown`: in place on a
    terminal (as much as fits it), else a line per refresh (one JSON document per line with
    --json), for a pipe or a log."""
    from collector.ops import statusview

    console = Console()
    if as_json or not console.is_terminal:
        while True:
            document = shown[-1]
            typer.echo(json.dumps(document) if as_json else statusview.summary_line(document))
            sys.stdout.flush()
            time.sleep(STATUS_REFRESH_S)
            shown[:] = [status_document.collect(settings)]
    view = statusview.fitting(shown[-1], console)
    with Live(view, console=console, auto_refresh=False) as live:
        while True:
            time.sleep(STATUS_REFRESH_S)
            shown[:] = [status_document.collect(settings)]
            live.update(statusview.fitting(shown[-1], console), refresh=True)


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    secrets: Annotated[
        bool,
        typer.Option(
            "--secrets/--no-secrets",
            help="Also read the upstream key files the settings name; the server, which "
            "never uses them, is checked with --no-secrets.",
        ),
    ] = True,
) -> None:
    """Validate the settings and the secrets they name; exit 2 naming what is wrong.

    Beyond each value: the data directory can be created and written, and with --secrets
    (the forwarder's check) the key files can be read and an upstream has a key to send.
    Example: collector config check --config /etc/collector/collector.toml
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    data = DataDir(settings.data_dir)
    problems = [("data_dir", why)] if (why := data.unusable()) else []
    if secrets:
        problems += settings.upstream_problems()
    for name, why in problems:
        typer.echo(f"error: setting '{name}': {why}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"settings ok (data dir {data.path})")


@config_app.command("show")
def config_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the effective settings, secrets masked. Example: collector config show"""
    settings = settings_or_exit(config, data_dir=data_dir)
    for name, value in settings.shown().items():
        typer.echo(f"{name} = {json.dumps(value)}")


@contextlib.contextmanager
def open_dead_letters(
    config: Path | None, data_dir: Path | None, *, write: bool = False
) -> Iterator[DeadLetters]:
    data = collector_data(settings_or_exit(config, data_dir=data_dir))
    with readable(data):
        dead = (DeadLetters.writer if write else DeadLetters.reader)(data)
        try:
            yield dead
        finally:
            dead.close()


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array instead.")] = False,
    reason: Annotated[
        str | None,
        typer.Option("--reason", metavar="TEXT", help="Only those whose reason holds TEXT."),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option("--source", metavar="SDK", help="Only those whose source starts with SDK."),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """List dead-lettered events, oldest first. Example: collector dlq list --reason quarantined"""
    with open_dead_letters(config, data_dir) as dead:
        letters = [
            letter
            for letter in dead.letters()
            if (reason is None or reason in letter.reason)
            and (source is None or letter.source.startswith(source))
        ]
    if as_json:
        typer.echo(json.dumps([letter.summary() for letter in letters]))
        return
    from collector.ops.statusview import folding

    table = folding(
        Table("id", "dead at", "type", "event id", "project", "env", "source", "reason")
    )
    for letter in letters:
        row = letter.summary()
        table.add_row(
            str(row["id"]),
            status_document.iso(row["dead_at"]),
            str(row["type"]),
            str(row["event_id"]),
            str(row["project"]),
            str(row["env"]),
            row["source"],
            row["reason"][:80],
        )
    table_console().print(table)
    typer.echo(f"{len(letters)} dead-lettered events")


@dlq_app.command("export")
def dlq_export(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print every dead letter as NDJSON, one line each: id, dead_at, reason, source and the
    event as it was sent. Example: collector dlq export > dead.ndjson"""
    with open_dead_letters(config, data_dir) as dead:
        letters = dead.raw_letters()
    for letter, raw in letters:
        head = json.dumps(
            {
                "id": letter.id,
                "dead_at": status_document.iso(letter.dead_at),
                "reason": letter.reason,
                "source": letter.source,
            }
        )
        # The event's own bytes, never re-encoded; a line break in them can only be
        # whitespace between tokens (JSON strings hold none raw), so a space keeps it one line.
        line = raw.replace(b"\r", b" ").replace(b"\n", b" ")
        sys.stdout.buffer.write(head[:-1].encode() + b', "event": ' + line + b"}\n")
    sys.stdout.buffer.flush()


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="The id from dlq list.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print one dead letter: its reason and the whole event. Example: collector dlq show 3"""
    with open_dead_letters(config, data_dir) as dead:
        letters = dead.letters([letter_id])
    if not letters:
        typer.echo(f"error: no dead letter with id {letter_id}", err=True)
        raise typer.Exit(1)
    letter = letters[0]
    dead_at = status_document.iso(letter.dead_at)
    document = {**letter.summary(), "dead_at": dead_at, "event": letter.event}
    typer.echo(json.dumps(document, indent=2))


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(metavar="ID...", help="Ids to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Put dead letters back into the queue, to be forwarded again.

    Example: collector dlq replay 3 4   (or: collector dlq replay --all)
    """
    if bool(ids) == replay_all:
        typer.echo("error: give the ids to replay, or --all (not both)", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit(config, data_dir=data_dir)
    data = collector_data(settings)
    with readable(data):
        done = replay(
            data,
            None if replay_all else ids,
            sync=settings.sync,
            budget_bytes=settings.disk_budget_bytes,
        )
    if done.refused is not None:
        typer.echo(f"error after replaying {done.moved}: {done.refused.message}", err=True)
        raise typer.Exit(1)
    missing = done.wanted - done.moved - done.still_invalid
    typer.echo(f"Replayed {done.moved} dead letters into the queue.")
    if done.still_invalid:
        typer.echo(
            f"warning: {done.still_invalid} quarantined events are still invalid and stay in"
            " the dead-letter store (why: collector dlq list --reason quarantined)",
            err=True,
        )
    if missing:
        typer.echo(f"error: {missing} of the ids given were not found", err=True)
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Delete every dead letter for good. Example: collector dlq purge --yes"""
    with open_dead_letters(config, data_dir, write=True) as dead:
        count = dead.count()
        if not yes and not typer.confirm(f"Delete {count} dead-lettered events for good?"):
            raise typer.Exit(1)
        typer.echo(f"Purged {dead.purge()} dead letters.")


# Failures of the disk a command cannot go on without, and what to look at.
DISK_ERRORS = {
    errno.ENOSPC: "the filesystem is out of space or of inodes (df -h, df -i)",
    errno.EDQUOT: "a disk quota is reached",
    errno.EROFS: "the filesystem is read-only (remount it read-write, or check the disk)",
}


def main() -> None:
    safe_imports_for_children()
    make_private()
    logs.setup("warning")  # until a command sets its own level: an escaped error is a record
    try:
        app(prog_name="collector")
    except OSError as exc:
        why = DISK_ERRORS.get(exc.errno or 0)
        if why is None:
            raise
        # The data directory's disk, not a bug: one line for every command, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror}: {why}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
