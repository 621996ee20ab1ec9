"""`collector`: the command line, a thin shell over the `collector` package.

collector serve                 run the events server on the embedded defaults
collector keys create|list|revoke   manage the API keys clients use
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from collector import limits, logs, notify, recovery
from collector.auth import SCOPES, KeyStore, ensure_first_key, now_utc
from collector.counts import DB_FILE as COUNTS_FILE
from collector.deadletters import DB_FILE as DEAD_LETTERS_FILE
from collector.deadletters import DeadLetters
from collector.dedup import DB_FILE as SEEN_IDS_FILE
from collector.errors import QueueFull, Unavailable
from collector.settings import ConfigFileError, Settings, load_settings
from collector.spool import DB_FILE as QUEUE_FILE
from collector.spool import Spool
from collector.supervisor import ForwarderChild

app = typer.Typer(help="Edge collector for Traffical experiment events.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage the API keys clients use.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
config_app = typer.Typer(help="Check and show the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
dlq_app = typer.Typer(help="Inspect, replay and purge dead-lettered events.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

# Seconds within which a second SIGINT is taken as the same Ctrl-C (see NotifyingServer).
REPEAT_WINDOW_S = 0.5
# Where a first start under systemd leaves the key it made (the journal must not hold it).
FIRST_KEY_FILE = "first-api-key"
# Settings whose values `config show` never prints.
SECRET_SETTINGS = frozenset({"upstream_key"})
# How often `status --watch` refreshes: as often as the processes write their heartbeat.
STATUS_REFRESH_S = 2.0
# Dead letters replayed per queue row (and per transaction).
REPLAY_CHUNK = 500
# Seconds a client connection may sit idle between requests.
KEEP_ALIVE_S = 30

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (default /etc/collector/collector.toml)."),
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (COLLECTOR_DATA_DIR).")
]


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


# The data directory's SQLite files, named when one of them cannot be read.
DATA_FILES = (QUEUE_FILE, SEEN_IDS_FILE, COUNTS_FILE, DEAD_LETTERS_FILE)


@contextlib.contextmanager
def readable(data_dir: Path) -> Iterator[None]:
    """A data file that cannot be read becomes a one-line error naming it (exit 2).

    Only the server and the forwarder move a corrupt file aside (`collector.recovery`),
    when they start; a command run while they are down meets the file as it is.
    """
    try:
        yield
    except (sqlite3.Error, Unavailable) as exc:
        corrupt = [
            f"{name} ({reason})"
            for name in DATA_FILES
            if (data_dir / name).exists() and (reason := recovery.corruption(data_dir / name))
        ]
        if corrupt:
            typer.echo(
                f"error: corrupt data in {data_dir}: {', '.join(corrupt)}. The server and the"
                " forwarder move a corrupt file aside when they start: start the collector,"
                " or move the file away yourself.",
                err=True,
            )
        else:
            typer.echo(f"error: cannot read the data in {data_dir}: {exc}", err=True)
        raise typer.Exit(2) from exc


HostOption = Annotated[str | None, typer.Option(help="Address to bind (COLLECTOR_HOST).")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on (COLLECTOR_PORT).")]


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
    settings = settings_or_exit(config, data_dir=data_dir, host=host, port=port)
    setup_logging(settings)
    child = ForwarderChild(
        [*_path_flag("--config", config), *_path_flag("--data-dir", data_dir)],
        settings.stop_timeout_seconds,
    )
    child.start()
    try:
        serve_until_stopped(settings)
    finally:
        child.stop()


@app.command()
def serve(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Run the events server alone. Example: collector serve --port 8787"""
    settings = settings_or_exit(config, data_dir=data_dir, host=host, port=port)
    setup_logging(settings)
    serve_until_stopped(settings)


@app.command()
def forward(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the forwarder alone: drain the queue to the upstream. Example: collector forward"""
    from forwarder import loop

    settings = settings_or_exit(config, data_dir=data_dir)
    setup_logging(settings)
    try:
        asyncio.run(
            loop.run(settings, lambda: load_settings(config, data_dir=data_dir), parent_pid)
        )
    except loop.AlreadyRunning as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ConfigFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def serve_until_stopped(settings: Settings) -> None:
    """Serve HTTP until SIGTERM or Ctrl-C (uvicorn stops cleanly on both)."""
    from collector.app import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    first = ensure_first_key(KeyStore(settings.keys_file))
    if first is not None:
        show_first_key(first, settings.data_dir)
    logging.getLogger("collector.server").info(
        "serving on http://%s:%d, queue in %s (sync=%s)",
        settings.host,
        settings.port,
        settings.data_dir,
        settings.sync,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler of our
    # own receives it, so a SIGTERM ends the command normally (exit 0, `run` stops its
    # forwarder) instead of killing the process on the spot.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda received, frame: None)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handlers (collector.logs) carry uvicorn's records too
        access_log=False,
        loop="uvloop",
        # httptools, with the head size limit, head and body deadlines and connection cap
        # that uvicorn lacks (collector.limits): slow or idle clients cannot pile up.
        http=limits.protocol_class(settings),
        # A connection idle this long after an answer is closed.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    limits.raise_open_files_limit(settings.max_connections)
    NotifyingServer(config).run()


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, telling systemd when it serves and when it stops."""

    _exit_at = 0.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            notify.notify("READY=1")
            self._watchdog = asyncio.create_task(notify.keep_watchdog_fed())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify.notify("STOPPING=1")
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A Ctrl-C reaches the one-file build twice (from the terminal, and passed on by
        # its loader); uvicorn would take the second for "force quit" and skip the clean
        # shutdown. A repeat within a moment of the first is the same Ctrl-C.
        now = time.monotonic()
        if sig == signal.SIGINT and self.should_exit and now - self._exit_at < REPEAT_WINDOW_S:
            return
        if not self.should_exit:
            self._exit_at = now
        super().handle_exit(sig, frame)


def show_first_key(secret: str, data_dir: Path) -> None:
    """Print the key made on a first start, once; under systemd (whose journal keeps
    stdout) write it to a file only the service user can read instead."""
    if "INVOCATION_ID" not in os.environ:
        typer.echo("No API key existed, so one was created. It is shown only this once:")
        typer.echo(secret)
        return
    path = data_dir / FIRST_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    logging.getLogger("collector.server").warning(
        "no API key existed: one was created and written to %s (delete it once copied)", path
    )


def _path_flag(flag: str, value: Path | None) -> list[str]:
    return [flag, str(value.resolve())] if value is not None else []


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[str], typer.Option(help=f"Scope to grant, repeatable: {', '.join(SCOPES)}.")
    ],
    project: Annotated[str | None, typer.Option(help="Restrict the key to this project.")] = None,
    env: Annotated[str | None, typer.Option(help="Restrict the key to this environment.")] = None,
    expires: Annotated[
        datetime | None, typer.Option(help="Expiry, ISO 8601 (UTC when no offset).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name to find the key by.")] = None,
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
    store = KeyStore(settings.keys_file)
    try:
        key, secret = store.create(
            scope, name=name, project=project, env=env, expires=expires, publishable=publishable
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"Created key '{key.name}' ({', '.join(key.scopes)}). Its secret, shown once:")
    typer.echo(secret)


@keys_app.command("import")
def keys_import(
    scope: Annotated[
        list[str], typer.Option(help=f"Scope to grant, repeatable: {', '.join(SCOPES)}.")
    ],
    project: Annotated[str | None, typer.Option(help="Restrict the key to this project.")] = None,
    env: Annotated[str | None, typer.Option(help="Restrict the key to this environment.")] = None,
    name: Annotated[str | None, typer.Option(help="A name to find the key by.")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Accept an existing Traffical key (read from standard input, never an argument).

    Use it when SDKs fetch their config through the collector: the same key must be valid
    here (for events) and upstream (for config, resolve, decide).
    Example: collector keys import --scope sdk:write --scope sdk:read < key-file
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    secret = sys.stdin.readline().strip()
    try:
        key, _ = KeyStore(settings.keys_file).create(
            scope, name=name, project=project, env=env, existing=secret
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"Imported key '{key.name}' ({key.prefix}…, {', '.join(key.scopes)}).")


@keys_app.command("list")
def keys_list(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List the keys (never their secrets). Example: collector keys list"""
    settings = settings_or_exit(config, data_dir=data_dir)
    table = Table("name", "prefix", "scopes", "project", "env", "expires", "status")
    now = now_utc()
    for key in KeyStore(settings.keys_file).list_keys():
        table.add_row(
            key.name,
            key.prefix + "…",
            " ".join(key.scopes),
            key.project or "any",
            key.env or "any",
            key.expires or "never",
            key.status(now),
        )
    Console(width=200).print(table)


@keys_app.command("revoke")
def keys_revoke(
    name_or_prefix: Annotated[str, typer.Argument(help="The key's name or the start of it.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key at once, without a restart. Example: collector keys revoke web-prod"""
    settings = settings_or_exit(config, data_dir=data_dir)
    try:
        key = KeyStore(settings.keys_file).revoke(name_or_prefix)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"Revoked key '{key.name}' ({key.prefix}…).")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place every 2 s.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show what the collector is doing, from the data directory (works when it is down).

    Exit status: 0 healthy; 1 unhealthy (server or forwarder down, upstream key refused,
    upstream failing for over 5 minutes, disk budget 90% used); 2 no data directory, bad
    settings or a data file that cannot be read. Example: collector status --json
    """
    from collector import status as status_document
    from collector.statusview import render

    settings = settings_or_exit(config, data_dir=data_dir)
    if not (settings.data_dir / QUEUE_FILE).exists():
        typer.echo(f"error: no collector data in {settings.data_dir}", err=True)
        raise typer.Exit(2)
    with readable(settings.data_dir):
        document = status_document.collect(settings)
        if as_json:
            typer.echo(json.dumps(document, indent=2))
        elif watch:
            live = Live(render(document), console=Console(), auto_refresh=False)
            with live, contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(STATUS_REFRESH_S)
                    document = status_document.collect(settings)
                    live.update(render(document), refresh=True)
        else:
            Console().print(render(document))
    raise typer.Exit(0 if document["healthy"] else 1)


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

    Example: collector config check --config /etc/collector/collector.toml
    """
    settings = settings_or_exit(config, data_dir=data_dir)
    try:
        if secrets:
            settings.upstream_key_value()
            settings.project_key_values()
    except ConfigFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"settings ok (data dir {settings.data_dir})")


@config_app.command("show")
def config_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the effective settings, secrets masked. Example: collector config show"""
    settings = settings_or_exit(config, data_dir=data_dir)
    for name, value in settings.model_dump(mode="json").items():
        if name in SECRET_SETTINGS and value:
            value = "********"
        elif name == "upstream_keys":
            value = [{**entry, "key": "********" if entry["key"] else None} for entry in value]
        typer.echo(f"{name} = {json.dumps(value)}")


@contextlib.contextmanager
def open_dead_letters(config: Path | None, data_dir: Path | None) -> Iterator[DeadLetters]:
    directory = settings_or_exit(config, data_dir=data_dir).data_dir
    with readable(directory):
        dead = DeadLetters(directory)
        try:
            yield dead
        finally:
            dead.close()


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead.")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """List dead-lettered events, oldest first. Example: collector dlq list --json"""
    with open_dead_letters(config, data_dir) as dead:
        letters = dead.letters()
    if as_json:
        typer.echo(json.dumps([letter.summary() for letter in letters]))
        return
    table = Table("id", "dead at", "type", "event id", "project", "env", "reason")
    for letter in letters:
        row = letter.summary()
        table.add_row(
            str(row["id"]),
            _iso(row["dead_at"]),
            str(row["type"]),
            str(row["event_id"]),
            str(row["project"]),
            str(row["env"]),
            row["reason"][:80],
        )
    Console(width=200).print(table)
    typer.echo(f"{len(letters)} dead-lettered events")


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
    document = {**letter.summary(), "dead_at": _iso(letter.dead_at), "event": letter.event}
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
    with readable(settings.data_dir):
        replayed, wanted = _replay(settings, ids or [], replay_all)
    missing = len(wanted) - replayed
    typer.echo(f"Replayed {replayed} dead letters into the queue.")
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
    with open_dead_letters(config, data_dir) as dead:
        count = dead.count()
        if not yes and not typer.confirm(f"Delete {count} dead-lettered events for good?"):
            raise typer.Exit(1)
        typer.echo(f"Purged {dead.purge()} dead letters.")


def _replay(settings: Settings, ids: list[int], replay_all: bool) -> tuple[int, list[int]]:
    """Move dead letters into the queue; (how many were, the ids asked for)."""
    dead = DeadLetters(settings.data_dir)
    spool = Spool(settings.data_dir, sync=settings.sync, budget_bytes=settings.disk_budget_bytes)
    wanted = dead.all_ids() if replay_all else ids
    replayed = 0
    try:
        for start in range(0, len(wanted), REPLAY_CHUNK):
            letters = dead.raw(wanted[start : start + REPLAY_CHUNK])
            if not letters:
                continue
            # Into the queue first, then out of the store: a crash between the two leaves
            # the event in both (sent twice), never in neither.
            spool.append([raw for _, raw in letters])
            replayed += dead.remove([letter_id for letter_id, _ in letters])
    except QueueFull as exc:  # the disk budget (a busy or corrupt file: see `readable`)
        typer.echo(f"error after replaying {replayed}: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    finally:
        spool.close()
        dead.close()
    return replayed, wanted


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def main() -> None:
    # In the one-file build (scripts/build-binary) the executable is also the interpreter of
    # the queue writer child (multiprocessing "spawn") and its resource tracker: this runs
    # them and exits. A no-op when not frozen.
    multiprocessing.freeze_support()
    app(prog_name="collector")


if __name__ == "__main__":
    main()
