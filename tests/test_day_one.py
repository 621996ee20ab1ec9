"""What an operator meets on the first day, run as they would run it: the installed
`collector` command, from their own directories, with their own umask.

Each test here was written against a defect found by trying the collector as a new user
(issue 12) and failed before its fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main

from cli import app
from collector.ops.status import collect
from collector.settings import Settings
from collector.store import heartbeats
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.spool import Spool

from conftest import (
    Server,
    create_key,
    event,
    ext4_image,
    free_port,
    stored_events,
    terminate,
    wait_for,
    wait_until_serving,
)
from upstream import Upstream

COLLECTOR = Path(sys.executable).with_name("collector")  # the installed console script
# What a user's own project might hold in the directory they start the collector from.
SHADOWS = ("cli.py", "forwarder.py", "multiprocessing.py")


def clean_env(**settings: str) -> dict[str, str]:
    """Our environment without any COLLECTOR_ setting or systemd variable, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}
    for name in ("STATE_DIRECTORY", "INVOCATION_ID", "NOTIFY_SOCKET"):
        env.pop(name, None)
    return {**env, **settings}


@pytest.fixture
def user_project(tmp_path: Path) -> Iterator[Path]:
    """A directory holding files named like our modules, each of which, if ever run or
    imported, leaves a mark and exits."""
    project = tmp_path / "project"
    project.mkdir()
    mark = tmp_path / "shadowed"
    for name in SHADOWS:
        (project / name).write_text(
            f"import pathlib, sys\npathlib.Path({str(mark)!r}).write_text({name!r})\nsys.exit(3)\n"
        )
    yield project
    assert not mark.exists(), f"the user's {mark.read_text()} was run instead of ours"


def test_collector_run_from_a_directory_holding_a_cli_py_runs_its_own_forwarder(
    tmp_path: Path, user_project: Path
) -> None:
    """`collector run` started its forwarder as `python -m cli`, which imports a cli.py in
    the working directory first: the user's file ran, and nothing was ever forwarded."""
    data_dir = tmp_path / "data"
    port = free_port()
    key = create_key(data_dir, "--scope", "sdk:write")
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir), COLLECTOR_PORT=str(port))
    process = subprocess.Popen(
        [str(COLLECTOR), "run"], cwd=user_project, env=env, stdout=subprocess.DEVNULL
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/events/batch",
            json={"events": [event(id="day-one-1")]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text  # the writer process is ours too
        state = wait_for(
            lambda: heartbeats.read(DataDir(data_dir).forwarder_state), "the forwarder's state"
        )
        assert state["upstream"] == "not_configured"
        assert [e["id"] for e in stored_events(data_dir)] == ["day-one-1"]
    finally:
        terminate(process)
    assert process.returncode == 0


def test_a_server_that_answers_health_is_up_in_status_at_once(
    start_server: Any,
) -> None:
    """The first heartbeat was written a second after start, so `collector status` run
    right after /healthz answered said "server is down"."""
    server: Server = start_server()  # returns once /healthz answers 200

    document = collect(Settings(data_dir=server.data_dir))

    assert document["server"]["up"], document["server"]
    assert "server is down" not in document["problems"]


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_data_directory_and_every_file_in_it_are_the_users_alone(
    tmp_path: Path, umask: int
) -> None:
    """Outside systemd the directory was 0755 and the databases 0644: every local user
    could read every queued event."""
    data_dir = tmp_path / "data"
    port = free_port()
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir), COLLECTOR_PORT=str(port))
    keys = subprocess.run(
        [str(COLLECTOR), "keys", "create", "--scope", "sdk:write"],
        env=env,
        capture_output=True,
        text=True,
        umask=umask,
        timeout=60,
    )
    assert keys.returncode == 0, keys.stderr
    key = keys.stdout.strip().splitlines()[-1]
    process = subprocess.Popen(
        [str(COLLECTOR), "run"], env=env, stdout=subprocess.DEVNULL, umask=umask
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/events/batch",
            json={"events": [event(id="private-1")]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        wait_for(lambda: DataDir(data_dir).forwarder_state.exists(), "the forwarder's state")
        modes = {
            str(path.relative_to(data_dir)): path.stat().st_mode & 0o777
            for path in data_dir.rglob("*")
        }
    finally:
        terminate(process)
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert {"queue.db", "seen-ids.db", "counts.db", "keys.json", "server.json"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o600} == {}


# Commands that only look, and those that also need collector data to look at.
READ_ONLY = (
    ("status",),
    ("status", "--json"),
    ("experiments",),
    ("dlq", "list"),
    ("dlq", "show", "1"),
    ("keys", "list"),
    ("config", "check"),
    ("config", "show"),
)
NEED_DATA = {
    ("status",),
    ("status", "--json"),
    ("experiments",),
    ("dlq", "list"),
    ("dlq", "show", "1"),
}


def test_read_only_commands_elsewhere_create_nothing_and_name_the_directory_they_read(
    tmp_path: Path,
) -> None:
    """The default data directory, ./collector-data, depends on the working directory:
    run elsewhere, `dlq list` made an empty data directory and `keys list` printed an
    empty table, each exiting 0 without saying where it had looked."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    looked_at = str(elsewhere / "collector-data")
    for command in READ_ONLY:
        done = subprocess.run(
            [str(COLLECTOR), *command],
            cwd=elsewhere,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert list(elsewhere.iterdir()) == [], command
        assert "Traceback" not in done.stderr, (command, done.stderr)
        if command in NEED_DATA:
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            assert f"no collector data in {looked_at}:" in done.stderr, (command, done.stderr)
        elif command == ("keys", "list"):
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            assert f"no API keys in {looked_at} " in done.stderr, done.stderr
        else:
            assert done.returncode == 0, (command, done.stderr)
            assert looked_at in done.stdout, (command, done.stdout)
    for command in (("dlq", "replay", "--all"), ("dlq", "purge", "--yes")):
        done = subprocess.run(
            [str(COLLECTOR), *command],
            cwd=elsewhere,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and looked_at in done.stderr, (command, done.stderr)
        assert list(elsewhere.iterdir()) == [], command


def test_a_corrupt_key_store_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keys.json").write_text("{not json")
    for command in (("keys", "list"), ("keys", "create", "--scope", "sdk:write")):
        said = one_line_failure(data_dir, command, status=2)
        assert said.startswith("error: key store is corrupt"), said
        assert str(data_dir / "keys.json") in said


@pytest.mark.parametrize("broken", ["{not json", ""])
def test_a_server_started_on_a_corrupt_key_store_answers_503_until_it_is_fixed(
    tmp_path: Path, broken: str
) -> None:
    """One log line, not a traceback and a server down: events get 503 with Retry-After
    (the SDKs keep them and retry), and are taken again once the file is fixed, without a
    restart."""
    data_dir = tmp_path / "data"
    key = create_key(data_dir, "--scope", "sdk:write", "--name", "app")
    keys = data_dir / "keys.json"
    good = keys.read_bytes()
    keys.write_text(broken)
    server = Server(data_dir, free_port(), {})
    server.key = key
    server.start()
    try:
        refused = server.post({"events": [event(id="kept")]})
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        assert "key store is corrupt" in refused.json()["message"]
        assert "Traceback" not in server.log()
        assert f"{keys}: key store is corrupt" in server.log()

        keys.write_bytes(good)  # restored from a backup

        assert server.post({"events": [event(id="kept")]}).status_code == 200
        assert [e["id"] for e in server.stored()] == ["kept"]
    finally:
        server.stop()


@pytest.fixture
def no_inodes(tmp_path: Path) -> Iterator[Path]:
    """A data directory on an ext4 image of 64 inodes, for a test to take them all (root,
    as CI; skipped otherwise)."""
    with ext4_image(tmp_path, "full", 16 * 1024 * 1024, ("-N", "64")) as where:
        yield where


def take_every_inode(where: Path) -> None:
    n = 0
    with contextlib.suppress(OSError):
        while True:
            (where / f"filler-{n}").touch()
            n += 1


def one_line_failure(data_dir: Path, command: tuple[str, ...], status: int | None = None) -> str:
    """`collector COMMAND` on `data_dir`, which must fail (with `status`, if given) with no
    traceback: its stderr."""
    done = subprocess.run(
        [str(COLLECTOR), *command],
        env=clean_env(COLLECTOR_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 if status is None else done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    return done.stderr


@pytest.mark.parametrize(
    "command",
    [("keys", "create", "--scope", "sdk:write"), ("serve", "--port", "0"), ("forward",)],
)
def test_a_data_directory_without_inodes_is_one_line_for_every_command(
    no_inodes: Path, command: tuple[str, ...]
) -> None:
    take_every_inode(no_inodes)

    said = one_line_failure(no_inodes, command)

    assert "out of space or of inodes (df -h, df -i)" in said, said


@pytest.fixture
def read_only_at_restart(tmp_path: Path) -> Iterator[Path]:
    """A data directory a server has used, on an ext4 image then remounted read-only (as
    after a disk error at boot); root, as CI; skipped otherwise."""
    with ext4_image(tmp_path, "ro", 16 * 1024 * 1024) as where:
        server = Server(where, free_port(), {})
        server.key = create_key(where, "--scope", "sdk:write", "--name", "app")
        server.start()
        try:
            assert server.post({"events": [event(id="before")]}).status_code == 200
        finally:
            server.stop()
        done = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
        yield where


@pytest.mark.parametrize(
    "command",
    [("keys", "create", "--scope", "sdk:write"), ("serve", "--port", "0"), ("forward",)],
)
def test_a_read_only_data_directory_at_restart_is_one_line_for_every_command(
    read_only_at_restart: Path, command: tuple[str, ...]
) -> None:
    said = one_line_failure(read_only_at_restart, command)

    assert "read-only filesystem" in said or "filesystem is read-only" in said, said
    assert "not writable by this user" not in said  # the user is not the cause


def test_a_server_whose_disk_runs_out_of_inodes_is_still_seen_up(no_inodes: Path) -> None:
    """Its heartbeat is rewritten in place when no new file can be made."""
    server = Server(no_inodes, free_port(), {})
    server.key = create_key(no_inodes, "--scope", "sdk:write", "--name", "app")
    server.start()
    try:
        take_every_inode(no_inodes)
        taken_at = time.time()

        def beat_since() -> dict[str, Any] | None:
            state = heartbeats.read(DataDir(no_inodes).server_state)
            return state if state and state["heartbeat"] > taken_at else None

        state = wait_for(beat_since, "a heartbeat with no inode left", 3 * heartbeats.BEAT_EVERY_S)
        assert heartbeats.is_alive(state), state
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_a_second_run_or_forward_on_a_data_directory_exits_at_once_naming_the_forwarder(
    tmp_path: Path,
) -> None:
    """A second `collector run` started a forwarder child that found the lock taken,
    exited, and was started again, for ever."""
    data_dir = tmp_path / "data"
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir), COLLECTOR_PORT=str(free_port()))
    first = subprocess.Popen([str(COLLECTOR), "forward"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: DataDir(data_dir).forwarder_state.exists(), "the first forwarder")
        for command in ("run", "forward"):
            started = time.monotonic()
            done = subprocess.run(
                [str(COLLECTOR), command], env=env, capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 1, (command, done.stderr)
            assert time.monotonic() - started < 10
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, (command, done.stderr)
            assert f"forwarder is running on {data_dir} (pid {first.pid})" in lines[0], lines[0]
        assert first.poll() is None  # the first one was left alone
    finally:
        terminate(first)


def config_check(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(**{"COLLECTOR_DATA_DIR": str(tmp_path / "data"), **settings})
    return subprocess.run(
        [str(COLLECTOR), "config", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("settings", "named", "why"),
    [
        ({"COLLECTOR_UPSTREAM_URL": "sdk.traffical.io"}, "upstream_url", "http:// or https://"),
        ({"COLLECTOR_UPSTREAM_URL": "https://"}, "upstream_url", "with a host"),
        (
            {"COLLECTOR_UPSTREAM_URL": "https://sdk.traffical.io"},
            "upstream_key",
            "no key is set to send it",
        ),
    ],
    ids=["no-scheme", "no-host", "no-key"],
)
def test_config_check_refuses_upstream_settings_that_cannot_work(
    tmp_path: Path, settings: dict[str, str], named: str, why: str
) -> None:
    """It said `settings ok` for an upstream URL without a scheme, or one with no key."""
    done = config_check(tmp_path, **settings)

    assert done.returncode == 2, done.stdout
    assert f"error: setting '{named}': " in done.stderr and why in done.stderr, done.stderr
    assert "settings ok" not in done.stdout


def test_the_servers_check_needs_no_upstream_key(tmp_path: Path) -> None:
    """The server never sends the upstream key (its unit checks with --no-secrets)."""
    done = config_check(tmp_path, "--no-secrets", COLLECTOR_UPSTREAM_URL="https://up.example")

    assert done.returncode == 0, done.stderr
    assert f"settings ok (data dir {tmp_path / 'data'})" in done.stdout


def test_config_check_refuses_a_data_directory_that_cannot_be_made_or_written(
    tmp_path: Path,
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    for data_dir, why in ((afile, "is not a directory"), (afile / "data", "cannot be created")):
        done = config_check(tmp_path, COLLECTOR_DATA_DIR=str(data_dir))
        assert done.returncode == 2, (data_dir, done.stdout)
        assert f"error: setting 'data_dir': {data_dir} " in done.stderr, done.stderr
        assert why in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing was created


def forwarder_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_forwarder_says_upstream_ok_only_once_a_batch_was_delivered(
    start_server: Any, tmp_path: Path
) -> None:
    """It logged `upstream ok` at start, before any request, even to an upstream down."""
    server: Server = start_server()
    assert server.post({"events": [event(id="ok-1")]}).status_code == 200
    log = tmp_path / "forwarder.log"
    with Upstream() as upstream:
        upstream.down()
        env = clean_env(
            COLLECTOR_DATA_DIR=str(server.data_dir),
            COLLECTOR_UPSTREAM_URL=upstream.url,
            COLLECTOR_UPSTREAM_KEY="traffical_sk_test",
            COLLECTOR_RETRY_MAX_SECONDS="0.2",
        )
        with open(log, "wb") as out:
            forwarder = subprocess.Popen([str(COLLECTOR), "forward"], env=env, stderr=out)
        try:
            wait_for(lambda: any("retrying" in line for line in forwarder_log(log)), "a retry")
            assert not any("upstream ok" in line for line in forwarder_log(log))
            upstream.up()
            upstream.wait_for_events(1)
            wait_for(
                lambda: any("the first batch was delivered" in line for line in forwarder_log(log)),
                "the first delivery to be logged",
            )
        finally:
            terminate(forwarder)
    lines = forwarder_log(log)
    assert sum("upstream ok" in line for line in lines) == 1, lines


def test_with_no_upstream_key_the_forwarder_says_none_is_configured(
    start_server: Any, tmp_path: Path
) -> None:
    """It said `upstream refused the key` though no key was ever sent."""
    server: Server = start_server()
    assert server.post({"events": [event(id="nokey-1")]}).status_code == 200
    log = tmp_path / "forwarder.log"
    with Upstream() as upstream:
        env = clean_env(
            COLLECTOR_DATA_DIR=str(server.data_dir), COLLECTOR_UPSTREAM_URL=upstream.url
        )
        with open(log, "wb") as out:
            forwarder = subprocess.Popen([str(COLLECTOR), "forward"], env=env, stderr=out)
        try:
            state = wait_for(
                lambda: (
                    (s := heartbeats.read(DataDir(server.data_dir).forwarder_state))
                    and s["upstream"] == "key_rejected"
                    and s
                ),
                "the forwarder to stop for want of a key",
            )
        finally:
            terminate(forwarder)
        assert upstream.requests == []  # nothing was sent
    assert "no upstream key is configured for project 'proj_test'" in state["message"]
    text = log.read_text()
    assert "no upstream key is configured" in text
    assert "refused" not in text


# --- the command line ---------------------------------------------------------------------


def every_command() -> list[list[str]]:
    group = typer.main.get_group(app)
    commands: list[list[str]] = [[]]
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)
        commands += [[name, sub] for sub in subcommands] if subcommands else [[name]]
    return commands


def test_collector_version_prints_the_version() -> None:
    done = subprocess.run([str(COLLECTOR), "--version"], capture_output=True, text=True)

    assert done.returncode == 0
    assert re.fullmatch(r"collector \d+\.\d+\.\d+\n", done.stdout), done.stdout


def test_help_fits_80_columns_and_shows_no_type_artefacts() -> None:
    """--help showed `<bool>` beside every flag and `<str>`, `<list[str]>` beside every
    option; options now show what to give (FILE, DIR, SCOPE). (Typer still shows the type
    of a positional argument, `NAME <str>`, in its own Arguments section.)"""
    for command in every_command():
        done = subprocess.run(
            [str(COLLECTOR), *command, "--help"],
            env=clean_env(COLUMNS="80"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert "<bool>" not in done.stdout, (command, done.stdout)
        assert not re.search(r"--[\w-]+ <", done.stdout), (command, done.stdout)
        assert max(map(len, done.stdout.splitlines())) <= 80, (command, done.stdout)


def on_a_terminal(
    command: list[str], env: dict[str, str], *, columns: int = 80, rows: int = 24
) -> tuple[subprocess.Popen[bytes], int]:
    """`command` started on a pseudo-terminal of `columns` x `rows`; (process, its tty)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        command,
        env={**env, "TERM": "xterm", "COLUMNS": str(columns), "LINES": str(rows)},
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    return process, controller


def read_until(controller: int, done: Any, timeout: float = 20.0) -> str:
    """What the terminal shows until `done(text)` holds, or the process closes it."""
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(output.decode(errors="replace")):
        if select.select([controller], [], [], 0.1)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
    return output.decode(errors="replace")


def test_keys_and_dead_letter_tables_fit_an_80_column_terminal(tmp_path: Path) -> None:
    """Both forced 200 columns, so an 80-column terminal wrapped every row in two."""
    data_dir = tmp_path / "data"
    long_name = "web-production-checkout-service-" + "x" * 40
    create_key(data_dir, "--scope", "sdk:write", "--name", long_name, "--project", "proj_web")
    spool = Spool(DataDir(data_dir), budget_bytes=1 << 30)
    spool.close()
    dead = DeadLetters.writer(DataDir(data_dir))
    dead.add([b'{"type":"track","id":"trk_1","projectId":"proj_web","env":"prod"}'], "r" * 300)
    dead.close()
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir))
    for command, wanted in ((["keys", "list"], "proj_web"), (["dlq", "list"], "trk_1")):
        process, controller = on_a_terminal([str(COLLECTOR), *command], env)
        try:
            text = read_until(controller, lambda t: False, timeout=15)
            assert process.wait(timeout=10) == 0, text
        finally:
            os.close(controller)
        lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in text.splitlines()]
        assert max(map(len, lines)) <= 80, text
        assert wanted in text


def status_fleet(start_server: Any) -> Server:
    server: Server = start_server()
    assert server.post({"events": [event(id="w-1")]}).status_code == 200
    return server


def test_status_watch_into_a_pipe_writes_a_line_per_refresh(start_server: Any) -> None:
    server = status_fleet(start_server)
    env = clean_env(COLLECTOR_DATA_DIR=str(server.data_dir))
    for flags, check in (
        ([], lambda line: line.split()[1] in ("healthy", "UNHEALTHY:")),
        (["--json"], lambda line: json.loads(line)["data_dir"] == str(server.data_dir)),
    ):
        process = subprocess.Popen(
            [str(COLLECTOR), "status", "--watch", *flags],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        try:
            lines = [process.stdout.readline(), process.stdout.readline()]  # two refreshes
        finally:
            process.send_signal(signal.SIGINT)
            rest = process.communicate(timeout=10)[0]
        assert process.returncode in (0, 1), (flags, rest)  # healthy or not: the forwarder
        for line in lines:
            assert line.endswith("\n") and line.count("\n") == 1
            assert check(line.strip()), (flags, line)


def test_status_watch_on_an_80x24_terminal_fits_it(start_server: Any) -> None:
    """It drew the whole status (about 40 lines) into 24: the headline scrolled away."""
    server = status_fleet(start_server)
    env = clean_env(COLLECTOR_DATA_DIR=str(server.data_dir))
    process, controller = on_a_terminal([str(COLLECTOR), "status", "--watch"], env)
    try:
        text = read_until(controller, lambda t: t.count(" at 20") >= 2)  # two drawings
        process.send_signal(signal.SIGINT)
        text += read_until(controller, lambda t: False, timeout=5)
        process.wait(timeout=10)
    finally:
        os.close(controller)
    frames = [frame for frame in re.split(r"\x1b\[\d*A|\x1b\[2K", text) if frame.strip()]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "healthy" in plain.lower() and "queue" in plain
    assert max(len(line) for line in plain.splitlines()) <= 80, plain
    assert frames and max(frame.count("\n") for frame in frames) < 24, plain


def test_keys_import_on_a_terminal_says_what_it_waits_for(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir))
    process, controller = on_a_terminal(
        [str(COLLECTOR), "keys", "import", "--scope", "sdk:write", "--name", "imported"], env
    )
    try:
        prompt = read_until(controller, lambda t: "Paste the key" in t)
        assert "Paste the key" in prompt, prompt
        os.write(controller, b"traffical_sk_" + b"a" * 40 + b"\n")
        text = read_until(controller, lambda t: "Imported key" in t)
        assert process.wait(timeout=10) == 0, text
    finally:
        os.close(controller)
    assert "Imported key 'imported'" in text
    assert "a" * 40 not in text  # not echoed


def json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON log line: {line!r}"
        records.append(json.loads(line))
    return records


def test_an_uncaught_error_is_one_json_record_not_a_boxed_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from collector.ops import logs; logs.setup('info'); raise RuntimeError('boom')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    [record] = json_lines(done.stderr)
    assert record["level"] == "critical" and "RuntimeError: boom" in record["message"]
    assert "Traceback" in record["error"]
    # ... and a command never draws a box: what it cannot do is one line.
    afile = tmp_path / "a-file"
    afile.write_text("")
    serve = subprocess.run(
        [str(COLLECTOR), "serve"],
        env=clean_env(COLLECTOR_DATA_DIR=str(afile)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert serve.returncode == 2
    assert serve.stderr == f"error: setting 'data_dir': {afile} is not a directory\n"


def test_the_server_log_is_ours_and_says_serving_once_the_port_is_bound(
    tmp_path: Path,
) -> None:
    """uvicorn's own lines came under its logger names, and `serving on` was logged before
    the port was bound: also when binding then failed."""
    data_dir = tmp_path / "data"
    port = free_port()
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir), COLLECTOR_PORT=str(port))
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(COLLECTOR), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=out
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process)
        wait_for(lambda: "serving on" in log.read_text(), "the serving line")
        with socket.socket() as taken:  # a second server on the same port cannot bind
            second = subprocess.run(
                [str(COLLECTOR), "serve"],
                env=clean_env(COLLECTOR_DATA_DIR=str(tmp_path / "other"), COLLECTOR_PORT=str(port)),
                capture_output=True,
                text=True,
                timeout=60,
            )
            del taken
    finally:
        terminate(process)
    records = json_lines(log.read_text())
    assert {record["logger"].split(".")[0] for record in records} == {"collector"}, records
    assert sum("serving on" in record["message"] for record in records) == 1
    assert second.returncode != 0
    refused = json_lines(second.stderr)
    assert not any("serving on" in record["message"] for record in refused), refused
    assert any(str(port) in record["message"] for record in refused), refused
