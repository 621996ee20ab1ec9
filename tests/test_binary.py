"""The single-file executable, `dist/collector` (built by `scripts/build-binary`), on its own.

Each command runs with an empty environment (`PATH=/usr/bin:/bin` and the settings, nothing
of the test's virtualenv), from a working directory outside the source tree, and unpacks in
a TMPDIR of its own, so nothing leaks in from our Python. The main test is CI's smoke test:
`collector run` takes events, its forwarder child (the same executable) sends them to a test
upstream, `collector status` reports them, and a SIGTERM stops it all with exit status 0,
leaving no process and no unpacked files behind.

Skipped when `dist/collector` has not been built, or is older than the sources; with
`BINARY_TESTS=required` (CI, which builds it first) either is an error instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ROOT, event, free_port, wait_until_serving
from upstream import Upstream

BINARY = ROOT / "dist" / "collector"
UPSTREAM_KEY = "upstream-test-key"
STOP_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 30.0


def _why_not_testable() -> str | None:
    """Why the executable cannot be tested: not built, or built before the last source edit."""
    if not BINARY.exists():
        return "dist/collector not built (run scripts/build-binary)"
    sources = [ROOT / "cli.py", *ROOT.glob("collector/**/*.py"), *ROOT.glob("forwarder/**/*.py")]
    newest = max(source.stat().st_mtime for source in sources)
    if BINARY.stat().st_mtime < newest:
        return "dist/collector is older than the sources (run scripts/build-binary)"
    return None


# Skipped when there is nothing (fresh) to test, unless BINARY_TESTS=required (as in CI,
# which builds the executable first): then that is a failure.
_REASON = _why_not_testable()
if _REASON is not None and os.environ.get("BINARY_TESTS") == "required":
    raise RuntimeError(f"BINARY_TESTS=required but {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Host:
    """A clean place to run the executable: empty environment, own cwd, HOME and TMPDIR.

    The cwd holds files named like the program's modules, as a user's project might: were
    one ever imported instead of ours, it would end that process at once (exit 3)."""

    def __init__(self, root: Path, **settings: str) -> None:
        self.cwd = root / "cwd"
        self.tmp = root / "tmp"
        self.data_dir = root / "data"
        for directory in (self.cwd, self.tmp, root / "home"):
            directory.mkdir()
        for name in ("cli.py", "forwarder.py", "multiprocessing.py"):
            (self.cwd / name).write_text("import sys\nsys.exit(3)\n")
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root / "home"),
            "TMPDIR": str(self.tmp),
            "COLLECTOR_DATA_DIR": str(self.data_dir),
            **settings,
        }

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BINARY), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [str(BINARY), *args],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def unpacked(self) -> list[str]:
        """PyInstaller's unpack directories still in TMPDIR (each run removes its own)."""
        return sorted(path.name for path in self.tmp.glob("_MEI*"))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@pytest.fixture
def stop_all() -> Iterator[Callable[[subprocess.Popen[bytes]], None]]:
    """Register processes to kill, with their descendants, if the test ends early."""
    started: list[subprocess.Popen[bytes]] = []
    yield started.append
    for process in started:
        family = descendants(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for pid, _ in alive(family):
            _kill(pid)


# -- process tree, from /proc (Linux, like the executable) -----------------------------------


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), fields[19]


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every live descendant of `pid`, as (pid, start time) so a reused pid is not mistaken."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of `processes` still running (a zombie waiting to be reaped has exited)."""
    still = set()
    for pid, started in processes:
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[0] not in ("Z", "X"):
            still.add((pid, started))
    return still


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_for(
    what: str, predicate: Callable[[], Any], timeout: float, detail: Callable[[], Any] = str
) -> Any:
    """`predicate()` once it is true; else fail after `timeout` s, saying `detail()`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {detail()}")
        time.sleep(0.2)


def wait_for_exit(family: set[tuple[int, str]]) -> None:
    wait_for("no process left", lambda: not alive(family), 10, lambda: command_lines(alive(family)))


def command_lines(processes: set[tuple[int, str]]) -> list[str]:
    lines = []
    for pid, _ in sorted(processes):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        lines.append(raw.replace(b"\0", b" ").decode(errors="replace").strip())
    return lines


# -- tests -----------------------------------------------------------------------------------


def test_run_takes_forwards_reports_and_stops_cleanly(
    tmp_path: Path, upstream: Upstream, stop_all: Callable[[subprocess.Popen[bytes]], None]
) -> None:
    port = free_port()
    host = Host(
        tmp_path,
        COLLECTOR_PORT=str(port),
        COLLECTOR_UPSTREAM_URL=upstream.url,
        COLLECTOR_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    log = tmp_path / "run.log"
    run = host.start("run", log=log)
    stop_all(run)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, run, lambda: log.read_text(errors="replace"))

    created = host.run("keys", "create", "--scope", "sdk:write", "--name", "smoke")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    sent = [event(id=f"trk_{n}") for n in range(5)]
    answer = httpx.post(
        f"{url}/v1/events/batch",
        json={"events": sent},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 5, "written": 5, "pipelineWritten": 5}

    # Forwarded by the forwarder child, itself the executable started by `run`.
    received = upstream.wait_for_events(5, timeout=SETTLE_TIMEOUT_S)
    assert sorted(e["id"] for e in received) == sorted(e["id"] for e in sent)
    assert {r.key for r in upstream.accepted()} == {UPSTREAM_KEY}

    # Server, queue writer, forwarder: each a process of the executable (with its loader).
    family = descendants(run.pid)
    lines = command_lines(family)
    assert any(" forward " in f" {line} " for line in lines), lines
    assert any("--multiprocessing-fork" in line for line in lines), lines

    last: list[dict[str, Any]] = [{}]

    def settled() -> dict[str, Any] | None:
        done = host.run("status", "--json")
        assert done.returncode in (0, 1), done.stderr
        status = last[0] = json.loads(done.stdout)
        ok = (
            done.returncode == 0
            and status["healthy"]
            and status["server"]["up"]
            and status["forwarder"]["up"]
            and status["queue"]["events"] == 0
            # The forwarder's own count, where its heartbeat carries one.
            and status["forwarder"].get("forwarded", len(sent)) >= len(sent)
        )
        return status if ok else None

    status = wait_for(
        "status: healthy, both up, all forwarded", settled, SETTLE_TIMEOUT_S, lambda: last[0]
    )
    assert status["data_dir"] == str(host.data_dir)
    assert status["problems"] == []

    family |= descendants(run.pid)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text(errors="replace")
    wait_for_exit(family)
    wait_for("unpacked files removed", lambda: host.unpacked() == [], 10, host.unpacked)
    output = log.read_text(errors="replace")
    # A child that re-ran the command line (no freeze_support) would print usage errors.
    assert "No such option" not in output, output
    assert "Traceback" not in output, output


def test_serve_and_forward_run_apart(
    tmp_path: Path, upstream: Upstream, stop_all: Callable[[subprocess.Popen[bytes]], None]
) -> None:
    port = free_port()
    host = Host(
        tmp_path,
        COLLECTOR_PORT=str(port),
        COLLECTOR_UPSTREAM_URL=upstream.url,
        COLLECTOR_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    created = host.run("keys", "create", "--scope", "sdk:write")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    serve_log, forward_log = tmp_path / "serve.log", tmp_path / "forward.log"
    serve = host.start("serve", log=serve_log)
    stop_all(serve)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, serve, lambda: serve_log.read_text(errors="replace"))
    answer = httpx.post(
        f"{url}/v1/events/batch",
        json={"events": [event(id="trk_apart")]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text

    forward = host.start("forward", log=forward_log)
    stop_all(forward)
    assert [e["id"] for e in upstream.wait_for_events(1, timeout=SETTLE_TIMEOUT_S)] == ["trk_apart"]
    for process, log in ((forward, forward_log), (serve, serve_log)):
        family = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text(errors="replace")
        wait_for_exit(family)
    wait_for("unpacked files removed", lambda: host.unpacked() == [], 10, host.unpacked)


def test_one_shot_commands(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert "Edge collector" in host.run("--help").stdout

    checked = host.run("config", "check")
    assert checked.returncode == 0, checked.stderr
    assert "settings ok" in checked.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('port = "not a port"\n')
    refused = host.run("config", "check", "--config", str(bad))
    assert refused.returncode == 2
    assert "port" in refused.stderr

    created = host.run("keys", "create", "--scope", "sdk:write", "--name", "one")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().splitlines()[-1].startswith("traffical_sk_")
    listed = host.run("keys", "list")
    assert listed.returncode == 0 and "one" in listed.stdout, listed.stderr

    dead = host.run("dlq", "list", "--json")
    assert dead.returncode == 0, dead.stderr
    assert json.loads(dead.stdout) == []

    # No queue yet: status says so and exits 2 (it reads the data directory only).
    assert host.run("status", "--json").returncode == 2
    assert host.unpacked() == []
