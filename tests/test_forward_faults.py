"""The forwarder through faults: tiers, SIGKILLs, restarts, steady state, `collector run`.

Everything here is the real thing: `collector serve`, `collector forward` and `collector run`
as subprocesses on their own data directories, a real HTTP upstream on 127.0.0.1
(`tests/upstream.py`, or a second collector), and the real SQLite queue file read through
`collector.store.spool`. Waits are on conditions (upstream records, queue depth, state
files, process exits), never on fixed sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from collector.store import heartbeats
from collector.store.datadir import QUEUE as QUEUE_FILE
from collector.store.datadir import DataDir
from collector.store.spool import summary

from conftest import COLLECTOR, ROOT, Server, create_key, event, free_port, wait_until_serving
from upstream import Upstream

Json = dict[str, Any]

WAIT_S = 30.0  # the longest any condition below is waited for before the test fails
POLL_S = 0.02
# Quick retries, so an upstream that comes back is used at once.
FAST_RETRIES = {
    "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
    "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
    "COLLECTOR_STOP_TIMEOUT_SECONDS": "5",
}
ROW_EVENTS = 1000  # events per request posted below: one queue row, one upstream batch


# --- helpers ----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def sdk_events(prefix: str, count: int) -> list[Json]:
    """`count` valid events of every type, with unique ids and the fields real SDKs send."""
    events = []
    for n in range(count):
        kind = ("exposure", "track", "decision")[n % 3]
        fields: Json = {
            "id": f"{prefix}-{n}",
            "unitKey": f"user-{n % 97}" if n % 5 else n,
            "timestamp": "2026-05-21T10:30:00.123Z",
            "context": {"locale": "fr-FR", "userAgent": "Mozilla/5.0 (X11; Linux x86_64)"},
        }
        if kind == "track":
            fields["value"] = None if n % 7 == 0 else n * 0.25
            fields["properties"] = {"plan": "pro", "items": [1, 2.5, None, True], "note": "ü ✓"}
        else:
            fields["decisionId"] = f"dec-{prefix}-{n}"
        fields["sdkExtra"] = {"nested": {"n": n, "tags": ["a", "b"]}}  # an unknown field
        events.append(event(kind, **fields))
    return events


def ids_of(events: list[Json]) -> list[str]:
    return [e["id"] for e in events]


def post(server: Server, events: list[Json], per_request: int = ROW_EVENTS) -> None:
    """POST `events` in requests of `per_request`, one after another; each must be written."""
    for start in range(0, len(events), per_request):
        chunk = events[start : start + per_request]
        answer = server.post({"events": chunk})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "accepted": len(chunk),
            "written": len(chunk),
            "pipelineWritten": len(chunk),
        }


def queue_depth(data_dir: Path) -> int:
    """Rows in the queue not yet delivered (ready or in flight), read from the file."""
    return summary(DataDir(data_dir)).rows


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def descendants(pid: int) -> set[int]:
    """Every process below `pid` in the process tree, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def forwarder_pid(data_dir: Path) -> int | None:
    """The pid in the forwarder's state file, if that forwarder is alive."""
    state = heartbeats.read(DataDir(data_dir).forwarder_state)
    pid = int(state.get("pid", 0)) if state else 0
    return pid if pid and pid_alive(pid) else None


@dataclass
class Forwarder:
    """A `collector forward` process on `data_dir`."""

    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"forwarder-{self.data_dir.name}.log"

    def start(self) -> Forwarder:
        env = {**os.environ, "COLLECTOR_DATA_DIR": str(self.data_dir), **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*COLLECTOR, "forward"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process
        # Up once it has written its state file (it does so before taking any row).
        wait_for(
            lambda: process.poll() is not None or forwarder_pid(self.data_dir) == process.pid,
            "the forwarder to start",
        )
        assert process.poll() is None, f"forwarder exited early:\n{self.log()}"
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@pytest.fixture
def start_forwarder() -> Iterator[Callable[..., Forwarder]]:
    """Factory: start_forwarder(data_dir, upstream_url, **env) starts `collector forward`."""
    started: list[Forwarder] = []

    def start(
        data_dir: Path, upstream_url: str, key: str = "upstream-key", **env: str
    ) -> Forwarder:
        settings = {
            "COLLECTOR_UPSTREAM_URL": upstream_url,
            "COLLECTOR_UPSTREAM_KEY": key,
            **FAST_RETRIES,
            **env,
        }
        forwarder = Forwarder(data_dir, settings)
        started.append(forwarder)
        return forwarder.start()

    yield start
    for forwarder in started:
        if forwarder.running:
            forwarder.kill()


def delivered(upstream: Upstream, wanted: list[str]) -> Callable[[], bool]:
    """A condition: every id of `wanted` was accepted by `upstream`."""
    want = set(wanted)
    return lambda: want <= set(upstream.event_ids())


# --- tiers ------------------------------------------------------------------------------


def test_edge_forwards_to_a_second_collector_which_holds_every_event_unchanged(
    start_server: Callable[..., Server], start_forwarder: Callable[..., Forwarder]
) -> None:
    central = start_server()  # its own data dir, port and sdk:write key (`keys create`)
    edge = start_server()
    start_forwarder(edge.data_dir, central.url, key=central.key)
    sent = sdk_events("tier", 2500)

    post(edge, sent[:2000])  # two full upstream batches
    post(edge, sent[2000:], per_request=7)  # and a trickle of small requests

    wanted = set(ids_of(sent))
    wait_for(lambda: wanted <= set(ids_of(central.stored())), "the central collector's queue")
    held = central.stored()
    assert len(held) == len(sent), "the central collector holds each event once"
    by_id = {e["id"]: e for e in held}
    for original in sent:
        assert by_id[original["id"]] == original  # field by field, unknown fields included
    wait_for(lambda: queue_depth(edge.data_dir) == 0, "the edge queue to empty")


# --- crashes ----------------------------------------------------------------------------


@pytest.mark.parametrize("cut_requests", ["answered-after-the-kill", "refused-after-the-kill"])
def test_forwarder_killed_mid_send_resends_only_its_in_flight_batches(
    cut_requests: str,
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    edge = start_server()
    sent = sdk_events("kill", 10 * ROW_EVENTS)
    post(edge, sent)  # 10 rows of 1000 events: 10 upstream batches queued
    upstream.slow(0.4)
    forwarder = start_forwarder(edge.data_dir, upstream.url, COLLECTOR_FORWARD_IN_FLIGHT="2")

    # Kill while both senders have a request held by the upstream, after a random number of
    # batches went through. The kill is sent from the upstream's wait predicate, which runs
    # under the lock that recording an answer takes, so no request is answered between the
    # check and the kill: the requests answered later (from `first_cut` on, in the order
    # they are answered) are exactly the two cut ones. A sender starts a request only once
    # the rows of its previous one are acked, so no other batch is unacked.
    after = random.randint(0, 6)
    killed_at: list[int] = []
    assert forwarder.process is not None
    pid = forwarder.process.pid

    def kill_when_two_in_flight(up: Upstream) -> bool:
        if not killed_at and len(up.requests) >= after and up.in_flight == 2:
            os.kill(pid, signal.SIGKILL)
            killed_at.append(len(up.requests))
            if cut_requests == "refused-after-the-kill":
                up.fail(503)  # the held requests are answered 503: their events never arrive
        return bool(killed_at)

    upstream.wait_until(
        kill_when_two_in_flight, timeout=WAIT_S, what=f"two requests in flight after {after}"
    )
    forwarder.kill()  # reap it
    first_cut = killed_at[0]
    upstream.wait_until(lambda up: up.in_flight == 0, what="the cut requests to be answered")
    cut = upstream.requests[first_cut:]
    assert len(cut) == 2, f"killed after {first_cut} answers: {upstream.summary()}"
    cut_ids = {e["id"] for request in cut for e in request.events}

    upstream.ok()
    start_forwarder(edge.data_dir, upstream.url)
    wait_for(delivered(upstream, ids_of(sent)), "every event upstream")
    wait_for(lambda: queue_depth(edge.data_dir) == 0, "the queue to empty")

    counts = Counter(upstream.event_ids())
    assert set(counts) == set(ids_of(sent))
    duplicated = {eid for eid, n in counts.items() if n > 1}
    if cut_requests == "answered-after-the-kill":
        # The forwarder never saw those answers, so it sent those batches again, and only
        # those: every batch answered before the kill had been acked.
        assert all(r.accepted for r in cut)
        assert duplicated == cut_ids
        assert max(counts.values()) == 2
    else:
        assert not any(r.accepted for r in cut)
        assert not duplicated


def test_server_killed_while_forwarding_and_forwarder_stopped_while_serving(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    edge = start_server()
    upstream.slow(0.1)
    forwarder = start_forwarder(edge.data_dir, upstream.url)
    first = sdk_events("before-kill", 10 * ROW_EVENTS)
    post(edge, first)
    upstream.wait_for_requests(1, timeout=WAIT_S)

    edge.kill()  # SIGKILL of the server while the forwarder drains
    wait_for(delivered(upstream, ids_of(first)), "what was queued to arrive without a server")
    assert forwarder.running, forwarder.log()

    edge.start()  # same data dir, same port
    upstream.slow(0)
    second = sdk_events("after-restart", 1500)
    post(edge, second, per_request=300)
    wait_for(delivered(upstream, ids_of(second)), "events posted after the restart")

    assert forwarder.stop() == 0, forwarder.log()
    third = sdk_events("forwarder-down", 1200)
    post(edge, third, per_request=400)  # the server accepts while the forwarder is down
    assert set(ids_of(third)) <= set(ids_of(edge.stored()))
    start_forwarder(edge.data_dir, upstream.url)
    wait_for(delivered(upstream, ids_of(third)), "events posted while the forwarder was down")
    wait_for(lambda: queue_depth(edge.data_dir) == 0, "the queue to empty")

    counts = Counter(upstream.event_ids())
    assert set(counts) == set(ids_of(first + second + third))
    assert max(counts.values()) == 1, "no crash or clean stop here warrants a resend"


def test_server_restart_does_not_resend_in_flight_batches(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    edge = start_server()
    held = sdk_events("held", 300)
    post(edge, held)
    upstream.slow(6)  # long enough for the server to restart while the batch is held
    start_forwarder(edge.data_dir, upstream.url)
    upstream.wait_until(lambda up: up.in_flight == 1, what="the batch in flight")
    upstream.slow(0)  # later requests are answered at once

    edge.stop()
    edge.start()  # had it opened the queue with auto_resume, the held row is ready again
    # Nothing else was sent meanwhile: a row made ready again would have gone at once.
    assert upstream.in_flight == 1, "the batch is still held across the restart"
    assert not upstream.requests, "nothing was sent while the batch was held"

    # A row made ready again would be taken before this later one (oldest first).
    marker = sdk_events("marker", 10)
    post(edge, marker)
    wait_for(delivered(upstream, ids_of(marker)), "the marker event")
    wait_for(delivered(upstream, ids_of(held)), "the held batch")
    wait_for(lambda: queue_depth(edge.data_dir) == 0, "the queue to empty")

    counts = Counter(upstream.event_ids())
    assert set(counts) == set(ids_of(held + marker))
    assert max(counts.values()) == 1, "the held batch was sent once"
    assert sum(1 for r in upstream.requests if r.events and r.events[0]["id"] == "held-0") == 1


# --- steady state -----------------------------------------------------------------------


def queue_file_bytes(data_dir: Path) -> int:
    """Bytes on disk of the queue file and its write-ahead log."""
    return sum(
        path.stat().st_size
        for path in (data_dir / QUEUE_FILE, data_dir / f"{QUEUE_FILE}-wal")
        if path.exists()
    )


SLACK_BYTES = 64 * 4096  # 64 SQLite pages


def queue_used_bytes(data_dir: Path) -> int:
    """Bytes of the queue file's pages in use (free pages, kept for reuse, do not count)."""
    return summary(DataDir(data_dir)).used_bytes


def test_queue_file_stops_growing_in_steady_state(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    edge = start_server()
    start_forwarder(edge.data_dir, upstream.url)
    rounds, per_round = 12, 4000
    sizes, in_use = [], []
    for round_ in range(rounds):
        # A flow of posts while the forwarder drains, then the end of the drain, then measure.
        sent = sdk_events(f"round{round_}", per_round)
        post(edge, sent, per_request=500)
        wait_for(delivered(upstream, ids_of(sent)), f"round {round_} upstream")
        wait_for(lambda: queue_depth(edge.data_dir) == 0, "the queue to empty")
        sizes.append(queue_file_bytes(edge.data_dir))
        in_use.append(queue_used_bytes(edge.data_dir))

    # Acked rows are deleted: once drained, the table holds next to nothing...
    assert max(in_use) <= SLACK_BYTES, in_use
    # ...and SQLite reuses their pages, so the files (queue and write-ahead log) stop
    # growing: the second half of the rounds adds nothing beyond a little slack, while each
    # round alone writes more than that slack. (The write-ahead log keeps its high-water
    # mark, which a busy machine can raise once or twice early on; a leak grows every round.)
    middle = rounds // 2
    slack = sizes[middle] * 0.1 + SLACK_BYTES
    assert max(sizes[middle:]) <= sizes[middle] + slack, sizes
    assert per_round * len(orjson.dumps(sdk_events("probe", 1)[0])) > slack


# --- collector run ----------------------------------------------------------------------


@dataclass
class Run:
    """A `collector run` process (server and forwarder child), in its own process group."""

    process: subprocess.Popen[bytes]
    server: Server
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_run(data_dir: Path, upstream_url: str) -> Run:
    data_dir.mkdir(parents=True, exist_ok=True)
    server = Server(data_dir, free_port(), {})
    server.key = create_key(data_dir, "--scope", "sdk:write")
    env = {
        **os.environ,
        "COLLECTOR_DATA_DIR": str(data_dir),
        "COLLECTOR_PORT": str(server.port),
        "COLLECTOR_UPSTREAM_URL": upstream_url,
        "COLLECTOR_UPSTREAM_KEY": "upstream-key",
        **FAST_RETRIES,
    }
    log_path = data_dir.parent / f"run-{server.port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*COLLECTOR, "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal would give it
        )
    run = Run(process, server, log_path)
    wait_until_serving(server.url, process, run.log)
    wait_for(lambda: child_forwarder(run) is not None, "the forwarder child")
    return run


def child_forwarder(run: Run) -> int | None:
    """The pid of the live forwarder started by `run`, once it has written its state."""
    pid = forwarder_pid(run.server.data_dir)
    return pid if pid is not None and pid in descendants(run.process.pid) else None


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait(timeout=10)


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda p: p.send_signal(signal.SIGTERM), id="sigterm"),
        pytest.param(lambda p: os.killpg(p.pid, signal.SIGINT), id="ctrl-c-to-group"),
    ],
)
def test_collector_run_forwards_restarts_its_forwarder_and_stops_cleanly(
    stop: Callable[[subprocess.Popen[bytes]], None],
    tmp_path: Path,
    upstream: Upstream,
    runs: list[Run],
) -> None:
    run = start_run(tmp_path / "data", upstream.url)
    runs.append(run)
    first_child = child_forwarder(run)
    assert first_child is not None

    sent = sdk_events("run", 1200)
    post(run.server, sent, per_request=400)
    wait_for(delivered(upstream, ids_of(sent)), "events posted to collector run")

    os.kill(first_child, signal.SIGKILL)  # the forwarder child dies: run starts another
    wait_for(lambda: child_forwarder(run) not in (None, first_child), "a new forwarder child")
    after = sdk_events("run-after-kill", 800)
    post(run.server, after, per_request=400)
    wait_for(delivered(upstream, ids_of(after)), "events posted after the child's restart")

    wait_for(lambda: queue_depth(run.server.data_dir) == 0, "the queue to empty")

    family = descendants(run.process.pid)  # forwarder, queue writer, resource tracker
    logged = len(run.log())
    stop(run.process)
    assert run.process.wait(timeout=30) == 0, run.log()
    # `run` stopped its forwarder itself: it did not see it exit and try to restart it.
    assert "forwarder exited" not in run.log()[logged:], run.log()
    # The queue writer and multiprocessing's resource tracker notice `run` is gone and exit
    # by themselves shortly after it: allow them a moment.
    try:
        wait_for(lambda: not any(map(pid_alive, family)), "every child to exit", timeout=10)
    except AssertionError:
        left = {pid: command_line(pid) for pid in family if pid_alive(pid)}
        raise AssertionError(f"processes left behind: {left}\n{run.log()}") from None
    # No forwarder was started while `run` was stopping (it would be left running).
    last = heartbeats.read(DataDir(run.server.data_dir).forwarder_state)
    assert last is not None and last["pid"] in family, run.log()
    assert httpx_refused(run.server.url)


def httpx_refused(url: str) -> bool:
    """True when nothing listens at `url` any more."""
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.TransportError:
        return True
    return False
