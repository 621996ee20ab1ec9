"""What an operator meets on the first day, run as they would run it: the installed
`collector` command, from their own directories, with their own umask.

Each test here was written against a defect found by trying the collector as a new user
(issue 12) and failed before its fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.ops.status import collect
from collector.settings import Settings
from collector.store import heartbeats
from collector.store.datadir import DataDir

from conftest import (
    Server,
    create_key,
    event,
    free_port,
    stored_events,
    terminate,
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


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # a file another process writes: poll it
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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
    ("dlq", "list"),
    ("dlq", "show", "1"),
    ("keys", "list"),
    ("config", "check"),
    ("config", "show"),
)
NEED_DATA = {("status",), ("status", "--json"), ("dlq", "list"), ("dlq", "show", "1")}


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
            assert f"no collector data in {looked_at} " in done.stderr, (command, done.stderr)
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
        done = subprocess.run(
            [str(COLLECTOR), *command],
            env=clean_env(COLLECTOR_DATA_DIR=str(data_dir)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("error: key store is corrupt"), done.stderr
        assert str(data_dir / "keys.json") in done.stderr


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
