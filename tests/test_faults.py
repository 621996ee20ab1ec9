"""Fault tests: crashes, a full disk, corrupt files and a long outage lose nothing answered 200.

Each test runs the real `collector serve` and `collector forward` as subprocesses on a real
data directory, with the controllable upstream of `tests/upstream.py` on 127.0.0.1, and
ends by checking that every event answered 200 reached that upstream (and that the
upstream got nothing that was never posted, and nothing was dead-lettered). Randomness
(when a kill lands) comes from one seeded generator per test, named in its failures.

The long versions are marked `slow` and left out of the default run (`pytest -m slow`
runs them; `.ci/run` does): 20 rounds of server SIGKILLs, 10 of forwarder SIGKILLs, and
a 25 s outage with a 100,000-event backlog. The default run has short versions of each.
Figures worth publishing (rounds, drain rate, delays) are printed: see them with `-s`.
"""

# The `upstream` and `start_forwarder` fixtures are test_forward_faults' own, imported (not
# redefined): their names as test arguments are what pytest matches them by.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from collector.errors import QueueFull
from collector.events import Target
from collector.ops.status import collect
from collector.settings import Settings
from collector.store import recovery
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.spool import Spool, free_bytes

from conftest import ROOT, Server, event, ext4_image, run_cli, stored_events
from test_durability import assert_unavailable, batch, ids, posting_clients
from test_forward_faults import (  # noqa: F401  (the fixtures are used as arguments)
    Forwarder,
    descendants,
    ids_of,
    post,
    queue_depth,
    sdk_events,
    start_forwarder,
    upstream,
    wait_for,
)
from upstream import Upstream

TARGET = Target("proj_test", "production")

DRAIN_WAIT_S = 120.0  # longest wait for everything answered to reach the upstream


# --- shared checks ------------------------------------------------------------------------


def seeded(request: pytest.FixtureRequest) -> random.Random:
    """A generator seeded per test run; the seed is printed to replay a failure."""
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    print(f"{request.node.name}: FAULT_SEED={seed}")
    return random.Random(seed)


def dead_letter_count(data_dir: Path) -> int:
    dead = DeadLetters.reader(DataDir(data_dir))
    try:
        return dead.count()
    finally:
        dead.close()


def assert_everything_answered_arrived(
    upstream: Upstream, data_dir: Path, answered: list[str], posted_prefixes: tuple[str, ...]
) -> Counter[str]:
    """Every id answered 200 reached the upstream, the queue is empty, nothing was
    dead-lettered, and the upstream got only ids that were posted. Returns the counts of
    each id received (duplicates are allowed: delivery is at-least-once)."""
    want = set(answered)
    wait_for(
        lambda: want <= set(upstream.event_ids()),
        f"{len(want)} answered events upstream",
        timeout=DRAIN_WAIT_S,
    )
    wait_for(lambda: queue_depth(data_dir) == 0, "the queue to empty", timeout=DRAIN_WAIT_S)
    received = Counter(str(eid) for eid in upstream.event_ids())
    strangers = [eid for eid in received if not eid.startswith(posted_prefixes)]
    assert not strangers, f"the upstream got events never posted: {strangers[:5]}"
    assert dead_letter_count(data_dir) == 0
    return received


# --- SIGKILL of the server under sustained load -------------------------------------------

SERVER_KILL_ROUNDS = 3
SERVER_KILL_ROUNDS_SLOW = 20


def kill_server(server: Server, with_writer: bool) -> None:
    """SIGKILL the server; with `with_writer`, its queue writer process at the same moment
    (as an OOM kill or systemd's final SIGKILL of the unit's control group does)."""
    assert server.process is not None
    family = descendants(server.process.pid) if with_writer else set()
    server.kill()
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "rounds",
    [
        SERVER_KILL_ROUNDS,
        pytest.param(SERVER_KILL_ROUNDS_SLOW, marks=pytest.mark.slow),
    ],
)
def test_sigkill_of_the_server_under_load_loses_nothing_answered(
    rounds: int,
    request: pytest.FixtureRequest,
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    """Clients post back to back while the forwarder drains; the server is SIGKILLed at a
    random moment, restarted, and again, `rounds` times."""
    rng = seeded(request)
    server = start_server()
    forwarder = start_forwarder(server.data_dir, upstream.url)
    answered: list[str] = []
    started = time.monotonic()
    for round_ in range(rounds):
        join = posting_clients(server, f"r{round_}", answered)
        time.sleep(rng.uniform(0.0, 0.6))  # the kill lands at a random point of the stream
        kill_server(server, with_writer=round_ % 2 == 1)
        unexpected = join()
        assert not unexpected, f"round {round_}: {unexpected[:3]}"
        server.start()  # same data directory and port
    elapsed = time.monotonic() - started

    assert forwarder.running, forwarder.log()
    received = assert_everything_answered_arrived(upstream, server.data_dir, answered, ("r",))
    print(
        f"server SIGKILLs survived: {rounds} rounds in {elapsed:.0f} s, {len(answered)} events "
        f"answered 200, all delivered ({sum(received.values()) - len(received)} duplicates)"
    )


# --- SIGKILL of the forwarder while the upstream is slow or failing -----------------------

FORWARDER_KILL_ROUNDS = 2
FORWARDER_KILL_ROUNDS_SLOW = 10
# What the upstream does during a round, in turn.
UPSTREAM_TROUBLE: list[tuple[str, Callable[[Upstream], None]]] = [
    ("slow", lambda up: up.slow(0.5)),
    ("503", lambda up: up.fail(503)),
    ("503-with-retry-after", lambda up: up.fail(503, retry_after=1)),
    ("some-503-then-slow", lambda up: (up.slow(0.3), up.fail(503, times=3))),
    ("cut-connections", lambda up: up.drop()),
]


def post_steadily(
    server: Server, prefix: str, answered: list[str], unexpected: list[str], stop: threading.Event
) -> None:
    """POST 50-event batches every 20 ms (about 2,500 events/s) until `stop`."""
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        n = 0
        while not stop.is_set():
            body = batch(f"{prefix}-{n}")
            n += 1
            answer = client.post("/v1/events/batch", json=body)
            if answer.status_code == 200:
                answered.extend(ids(body["events"]))
            else:
                unexpected.append(f"{answer.status_code} {answer.text}")
            stop.wait(0.02)


@pytest.mark.parametrize(
    "rounds",
    [
        FORWARDER_KILL_ROUNDS,
        pytest.param(FORWARDER_KILL_ROUNDS_SLOW, marks=pytest.mark.slow),
    ],
)
def test_sigkill_of_the_forwarder_while_the_upstream_is_slow_or_failing_loses_nothing(
    rounds: int,
    request: pytest.FixtureRequest,
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    rng = seeded(request)
    server = start_server()
    answered: list[str] = []
    unexpected: list[str] = []
    stop = threading.Event()
    poster = threading.Thread(
        target=post_steadily, args=(server, "steady", answered, unexpected, stop)
    )
    poster.start()
    cut = 0  # kills that landed while the upstream held a request of the forwarder's
    try:
        for round_ in range(rounds):
            name, trouble = UPSTREAM_TROUBLE[round_ % len(UPSTREAM_TROUBLE)]
            upstream.ok()
            trouble(upstream)
            forwarder = start_forwarder(server.data_dir, upstream.url)
            # Let it get requests going (and, when the upstream fails, into its backoff),
            # then kill it at a random moment.
            upstream.wait_for_requests(len(upstream.requests) + 1, timeout=10)
            time.sleep(rng.uniform(0.0, 1.5))
            cut += upstream.in_flight > 0
            forwarder.kill()
            # Requests cut by the kill are answered as this round's upstream would (a slow
            # one with 200: the forwarder never learns its batch was taken, and sends it
            # again), not as the next round's.
            upstream.wait_until(lambda up: up.in_flight == 0, what="cut requests answered")
            assert "Traceback" not in forwarder.log(), f"round {round_} ({name})"
    finally:
        stop.set()
        poster.join(timeout=30)
    assert not unexpected, unexpected[:3]

    upstream.ok()
    final = start_forwarder(server.data_dir, upstream.url)
    received = assert_everything_answered_arrived(upstream, server.data_dir, answered, ("steady",))
    assert final.running, final.log()
    print(
        f"forwarder SIGKILLs survived: {rounds} rounds ({cut} with a request in flight), "
        f"{len(answered)} events answered 200, all delivered "
        f"({sum(received.values()) - len(received)} sent twice)"
    )


# --- the disk filling up ------------------------------------------------------------------

SMALL_FS_BYTES = 40 * 1024 * 1024  # the server keeps half of it free (DISK_RESERVE_BYTES)


def _mount_small_filesystem(where: Path, tmp: Path) -> str | None:
    """Mount a SMALL_FS_BYTES filesystem at `where`; None when done, else why not."""
    tmpfs = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if tmpfs.returncode == 0:
        return None
    image = tmp / "small.img"  # no tmpfs: try an ext4 image on a loop device
    with open(image, "wb") as out:
        out.truncate(SMALL_FS_BYTES)
    steps = [
        ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)],
        ["mount", "-o", "loop", str(image), str(where)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as exc:
            return f"tmpfs: {tmpfs.stderr.strip()}; {exc}"
        if done.returncode != 0:
            return f"tmpfs: {tmpfs.stderr.strip()}; {' '.join(step[:1])}: {done.stderr.strip()}"
    return None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on its own 40 MiB filesystem (tmpfs, or an ext4 image): needs root,
    as CI has. The disk budget, the same 503 without root, is covered by
    tests/test_durability.py::test_a_full_disk_budget_answers_503_drops_nothing_and_recovers_when_space_is_freed."""
    where = tmp_path / "small"
    where.mkdir()
    why_not = _mount_small_filesystem(where, tmp_path)
    if why_not is not None:
        pytest.skip(f"cannot mount a small filesystem here: {why_not}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_up(path: Path) -> None:
    """Write `path` until the filesystem has no byte left (ENOSPC), as another program might."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(chunk[:size])


@pytest.mark.parametrize(
    "filled_by",
    [
        "the-queue",  # the upstream is down: the queue grows until the reserve is reached
        "another-program",  # a file takes every byte left, under the collector's feet
    ],
)
def test_a_full_disk_answers_503_never_crashes_and_recovers_when_space_returns(
    filled_by: str,
    small_disk: Path,
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    """Space returns by the forwarder draining the queue once the upstream is back (the
    queue's case) or by the other program's file being deleted; either way the refused
    request, sent again as an SDK would, is then accepted, and all reach the upstream."""
    server = start_server(data_dir=small_disk)
    upstream.down()  # nothing drains
    forwarder = start_forwarder(server.data_dir, upstream.url)
    filler = small_disk / "filler"
    answered: list[str] = []
    for n in range(500):  # ~25 requests reach the reserve; the bound stops a broken test
        body = {"events": sdk_events(f"full-{n}", 1000)}
        if filled_by == "another-program" and n == 3:
            fill_up(filler)
            assert free_bytes(small_disk) == 0
        answer = server.post(body)
        if answer.status_code != 200:
            break
        answered += ids(body["events"])
    else:
        pytest.fail("the disk never filled up")
    refused = body
    assert_unavailable(answer)
    assert "disk" in answer.json()["message"]
    assert answered, "the very first batch was refused"

    # Full, and staying so: every further request is a clean 503, the server lives on and
    # says it is not ready, and the forwarder (whose acks fail too, when nothing is left)
    # waits for space rather than crashing.
    for n in range(20):
        again = server.post({"events": sdk_events(f"still-full-{n}", 1000)})
        assert again.status_code == 503, again.text
        assert int(again.headers["Retry-After"]) > 0
    assert server.process is not None and server.process.poll() is None, server.log()
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    # A crash and restart while full: the server starts (no crash loop) and refuses. Its
    # start may free a little (its seen-ids log checkpointed, ~1 MB here), so a request
    # or two may fit again first; those count as answered like any other.
    server.kill()
    server.start()
    for n in range(10):
        body = {"events": sdk_events(f"restarted-full-{n}", 1000)}
        answer = server.post(body)
        if answer.status_code != 200:
            break
        answered += ids(body["events"])
    assert_unavailable(answer)
    upstream.up()
    if filled_by == "another-program":
        wait_for(lambda: len(upstream.requests) >= 2, "the forwarder to send (not ack) a batch")
        assert forwarder.running, forwarder.log()
        filler.unlink()

    def retry_accepted() -> bool:  # the SDK's retry of the refused request
        return server.post(refused).status_code == 200

    wait_for(retry_accepted, "the refused request to be accepted once space returned")
    answered += ids(refused["events"])
    # The retry fitted while the forwarder was still draining, so the space left may be
    # just the retry's: once everything answered is delivered, a new request must fit.
    assert_everything_answered_arrived(
        upstream, server.data_dir, answered, ("full-", "restarted-full-", "after-full")
    )
    fresh = batch("after-full")
    assert server.post(fresh).json() == {
        "accepted": len(fresh["events"]),
        "written": len(fresh["events"]),
        "pipelineWritten": len(fresh["events"]),
    }
    answered += ids(fresh["events"])
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200

    assert_everything_answered_arrived(
        upstream, server.data_dir, answered, ("full-", "restarted-full-", "after-full")
    )
    assert server.process.poll() is None, server.log()
    assert forwarder.running, forwarder.log()
    assert "Traceback" not in server.log() + forwarder.log()


def test_sqlite_running_out_of_disk_mid_commit_is_a_clean_refusal(small_disk: Path) -> None:
    """Below the reserve check (space taken between the check and the write): SQLite's own
    "database or disk is full" is QueueFull, nothing half-written, and the queue is usable
    as soon as space returns."""
    spool = Spool(DataDir(small_disk), budget_bytes=1 << 40)
    spool.reserve_bytes = 0  # let the write reach SQLite
    try:
        spool.append({TARGET: [b'{"id":"before"}']})
        fill_up(small_disk / "filler")
        with pytest.raises(QueueFull):
            spool.append(
                {TARGET: [b'{"id":"x%d","pad":"%s"}' % (n, b"p" * 2000) for n in range(2000)]}
            )
        (small_disk / "filler").unlink()
        spool.append({TARGET: [b'{"id":"after"}']})
        assert [e["id"] for e in stored_events(small_disk)] == ["before", "after"]
    finally:
        spool.close()


# --- a sick disk: read-only, frozen ---------------------------------------------------------


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on its own ext4 image, mounted with errors=remount-ro (root, as CI)."""
    options = "loop,errors=remount-ro"
    with ext4_image(tmp_path, "ext4", SMALL_FS_BYTES * 2, ("-m", "0"), options) as where:
        try:
            yield where
        finally:
            subprocess.run(["fsfreeze", "-u", str(where)], capture_output=True)


def wait_for_status(url: str, status: int, within_s: float) -> float:
    """Seconds until GET `url` answers `status` (each try bounded), or fail."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=within_s).status_code == status:
                return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {within_s} s")


def test_a_filesystem_gone_read_only_is_not_ready_and_refuses_with_503(
    start_server: Callable[..., Server], ext4_disk: Path
) -> None:
    server = start_server(data_dir=ext4_disk)  # its log beside the mount, not on it
    assert server.post({"events": [event(id="before")]}).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(ext4_disk)], capture_output=True, text=True
    ).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip(f"no {trigger} to make ext4 go read-only")

    trigger.write_text("test: the disk went bad")  # errors=remount-ro: read-only from now

    wait_for_status(f"{server.url}/readyz", 503, within_s=10)
    refused = server.post({"events": [event(id="after")]})
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"]
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # alive, not ready


def test_a_frozen_filesystem_answers_503_before_the_sdks_give_up_and_recovers(
    start_server: Callable[..., Server], ext4_disk: Path
) -> None:
    """fsfreeze: every write waits. Requests get 503 with Retry-After within
    commit_timeout_seconds, /readyz says not ready within a second, and once the disk
    thaws the retried event is taken, stored once."""
    server = start_server(data_dir=ext4_disk, COLLECTOR_COMMIT_TIMEOUT_SECONDS="2")
    assert server.post({"events": [event(id="before")]}).status_code == 200
    subprocess.run(["fsfreeze", "-f", str(ext4_disk)], check=True)
    try:
        started = time.monotonic()
        refused = server.post({"events": [event(id="frozen")]})
        took = time.monotonic() - started

        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        assert took < 5, took  # 2 s and the answer: never the SDKs' 10 s
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
    finally:
        subprocess.run(["fsfreeze", "-u", str(ext4_disk)], check=True)

    deadline = time.monotonic() + 30
    while server.post({"events": [event(id="frozen")]}).status_code != 200:  # the SDK retries
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    wait_for_status(f"{server.url}/readyz", 200, within_s=10)
    assert sorted(e["id"] for e in stored_events(server.data_dir)) == ["before", "frozen"]


# --- corrupt or unreadable files at start -------------------------------------------------

DATA_FILES = ("queue.db", "seen-ids.db", "counts.db", "dead-letters.db")
PROCESSES = ("server", "forwarder")
MOVED_NAME = re.compile(r"^(?P<file>[a-z-]+\.db)\.corrupt-\d{8}T\d{6}(-\d+)?$")


def write_garbage(path: Path) -> None:
    """Bytes that are not a SQLite database at all (a bad copy, a wrong file)."""
    path.write_bytes(random.Random(path.name).randbytes(16384))


def write_malformed(path: Path) -> None:
    """A real SQLite database whose pages were damaged past its header (a disk fault)."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    data = bytearray(path.read_bytes())
    data[2 * 4096 : 2 * 4096 + 100] = b"\xff" * 100  # the third page's b-tree header
    path.write_bytes(data)


def corrupt_every_file(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_garbage(data_dir / "queue.db")
    (data_dir / "queue.db-wal").write_bytes(b"not a write-ahead log" * 100)
    (data_dir / "queue.db-shm").write_bytes(b"\0" * 32768)
    write_malformed(data_dir / "seen-ids.db")
    write_garbage(data_dir / "counts.db")
    write_malformed(data_dir / "dead-letters.db")


def moved_files(data_dir: Path) -> dict[str, list[str]]:
    """Original name -> the names it was moved aside to."""
    moved: dict[str, list[str]] = {}
    for path in data_dir.iterdir():
        match = MOVED_NAME.match(path.name)
        if match:
            moved.setdefault(match["file"], []).append(path.name)
    return moved


def error_lines(log: str, logger: str) -> list[str]:
    lines = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("logger") == logger and record.get("level") == "error":
                lines.append(record["message"])
    return lines


def test_corrupt_files_are_moved_aside_and_the_collector_starts_fresh_every_time(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    corrupt_every_file(data_dir)
    answered: list[str] = []
    server: Server | None = None
    for start in range(3):  # no crash loop: three starts in a row, each serves and forwards
        if server is None:
            server = start_server(data_dir=data_dir)
        else:
            server.start()
        forwarder = start_forwarder(data_dir, upstream.url)
        body = batch(f"start{start}", 20)
        assert server.post(body).json() == {"accepted": 20, "written": 20, "pipelineWritten": 20}
        answered.extend(ids(body["events"]))
        wait_for(lambda: set(answered) <= set(upstream.event_ids()), "the events upstream")

        # Moved aside once (at the first start), with the queue's side files; never again.
        moved = moved_files(data_dir)
        assert sorted(moved) == sorted(DATA_FILES), moved
        assert all(len(names) == 1 for names in moved.values()), moved
        document = collect(Settings(data_dir=data_dir))
        assert sorted(entry["file"] for entry in document["recovered"]) == sorted(DATA_FILES)
        for entry in document["recovered"]:
            assert entry["moved_to"] == moved[entry["file"]][0]
            assert entry["bytes"] > 0
            assert any(entry["moved_to"] in warning for warning in document["warnings"])
        wait_for(
            lambda: all(collect(Settings(data_dir=data_dir))[name]["up"] for name in PROCESSES),
            "status to show the server and the forwarder up",
        )

        assert forwarder.stop() == 0, forwarder.log()
        if start == 1:
            server.kill()  # a crash between starts changes nothing
        else:
            server.stop()

    assert server is not None
    logged = error_lines(server.log(), "collector.recovery") + error_lines(
        forwarder.log(), "collector.recovery"
    )
    for name in DATA_FILES:
        said = [line for line in logged if f"/{name} is corrupt" in line]
        assert len(said) == 1, (name, logged)
        assert moved_files(data_dir)[name][0] in said[0]
    assert "put back into the queue" in next(
        line for line in logged if "/queue.db is corrupt" in line
    )
    received = Counter(upstream.event_ids())
    assert set(received) == set(answered)

    # `collector status` shows it too, as a warning (exit 0 while both run is not checked
    # here: both are stopped, so it exits 1 for that reason alone).
    status = run_cli("status", "--json", data_dir=data_dir)
    assert (
        json.loads(status.stdout)["recovered"] == collect(Settings(data_dir=data_dir))["recovered"]
    )


def test_the_forwarder_alone_moves_a_corrupt_queue_aside_and_the_server_then_uses_the_fresh_one(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_malformed(data_dir / "queue.db")
    forwarder = start_forwarder(data_dir, upstream.url)  # the server is not running
    assert sorted(moved_files(data_dir)) == ["queue.db"]
    assert len(error_lines(forwarder.log(), "collector.recovery")) == 1

    server = start_server(data_dir=data_dir)
    body = batch("fresh-queue", 10)
    assert server.post(body).json() == {"accepted": 10, "written": 10, "pipelineWritten": 10}
    wait_for(lambda: set(ids(body["events"])) <= set(upstream.event_ids()), "the events upstream")
    assert sorted(moved_files(data_dir)) == ["queue.db"]
    assert not error_lines(server.log(), "collector.recovery")


def test_a_corrupt_file_is_moved_with_its_side_files_under_a_timestamped_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check itself applies a valid write-ahead log and drops an invalid one, as any
    SQLite open does; side files still there when the file is moved go with it, so a
    stale log is never replayed into the fresh file."""
    monkeypatch.setattr(recovery, "corruption", lambda path: "damaged (test)")
    path = tmp_path / "queue.db"
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        (tmp_path / name).write_bytes(name.encode())

    first = recovery.ensure_usable(path)
    for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
        (tmp_path / name).write_bytes(name.encode())
    second = recovery.ensure_usable(path)  # within the same second: a distinct name

    assert first is not None and second is not None
    assert MOVED_NAME.match(first.moved_to) and MOVED_NAME.match(second.moved_to)
    assert first.moved_to != second.moved_to
    for moved in (first.moved_to, second.moved_to):
        assert (tmp_path / moved).read_bytes() == b"queue.db"
        assert (tmp_path / f"{moved}-wal").read_bytes() == b"queue.db-wal"
        assert (tmp_path / f"{moved}-shm").read_bytes() == b"queue.db-shm"
    assert not any((tmp_path / name).exists() for name in ("queue.db", "queue.db-wal"))
    listed = recovery.moved_aside(tmp_path)
    assert [entry["moved_to"] for entry in listed] == [first.moved_to, second.moved_to]
    assert listed[0]["bytes"] == len(b"queue.db") + len(b"queue.db-wal") + len(b"queue.db-shm")


def test_a_sound_file_is_never_moved_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()  # left open: the row is in the write-ahead log only
    try:
        assert recovery.ensure_usable(path) is None
        assert recovery.ensure_usable(tmp_path / "missing.db") is None
        (tmp_path / "empty.db").touch()  # a zero-byte file is an empty database
        assert recovery.ensure_usable(tmp_path / "empty.db") is None
    finally:
        conn.close()
    assert not moved_files(tmp_path)
    check = sqlite3.connect(path)
    assert check.execute("SELECT x FROM t").fetchall() == [(1,)]
    check.close()


def test_a_locked_file_is_busy_not_corrupt_and_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery, "CHECK_TIMEOUT_S", 0.2)
    path = tmp_path / "counts.db"
    holder = sqlite3.connect(path, isolation_level=None)  # rollback journal: readers blocked
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    try:
        assert recovery.corruption(path) is None
        assert recovery.ensure_usable(path) is None
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert path.exists() and not moved_files(tmp_path)


def test_a_corrupt_file_another_process_has_open_is_left_in_place(tmp_path: Path) -> None:
    """Moving it would let that process write on, into the moved file, unseen."""
    path = tmp_path / "queue.db"
    write_malformed(path)
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
            " c.execute('SELECT count(*) FROM t').fetchall(); print('open', flush=True);"
            " sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with open(path, "r+b") as damage:  # damaged under the running process
            damage.seek(2 * 4096)
            damage.write(b"\xff" * 100)
        assert recovery.corruption(path) is not None
        assert recovery.in_use(path)
        assert recovery.ensure_usable(path) is None
        assert path.exists() and not moved_files(tmp_path)
    finally:
        holder.communicate("", timeout=10)
    assert not recovery.in_use(path)
    assert recovery.ensure_usable(path) is not None  # alone now: moved
    assert sorted(moved_files(tmp_path)) == ["queue.db"]


# What each read-only command opens, so which corrupt file it must name.
COMMANDS_READING = {
    ("status",): {"queue.db", "counts.db", "dead-letters.db"},
    ("status", "--json"): {"queue.db", "counts.db", "dead-letters.db"},
    ("dlq", "list"): {"dead-letters.db"},
    ("dlq", "show", "1"): {"dead-letters.db"},
    ("dlq", "replay", "--all"): {"queue.db", "dead-letters.db"},
    ("dlq", "purge", "--yes"): {"dead-letters.db"},
}


def damage_pages(path: Path) -> None:
    """Overwrite the start of every page past the first two: the file stays a database
    (its header and schema are sound) whose b-tree is damaged (a disk fault)."""
    data = bytearray(path.read_bytes())
    for page in range(2 * 4096, len(data), 4096):
        data[page : page + 100] = b"\xff" * 100
    path.write_bytes(data)


@pytest.mark.parametrize("name", ["queue.db", "counts.db", "dead-letters.db"])
@pytest.mark.parametrize("damage", [write_garbage, damage_pages], ids=["garbage", "malformed"])
def test_commands_name_a_corrupt_file_while_the_collector_is_down_and_leave_it(
    tmp_path: Path, name: str, damage: Callable[[Path], None]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    events = [json.dumps({"id": f"e{n}", "pad": "x" * 2000}).encode() for n in range(100)]
    spool = Spool(DataDir(data_dir), budget_bytes=1 << 30)
    spool.append({TARGET: events})
    spool.close()
    dead = DeadLetters.writer(DataDir(data_dir))
    dead.add(events, "rejected by upstream: 400")
    dead.close()
    counts = Counts.writer(DataDir(data_dir))
    for n in range(2000):
        counts.add(Count.EVENTS_RECEIVED, ("org", f"project-{n}", "production", "track"))
    counts.flush()
    counts.close()
    for side in data_dir.glob("*.db-*"):  # everything checkpointed into the files
        side.unlink()
    damage(data_dir / name)
    before = (data_dir / name).read_bytes()

    for command, reads in COMMANDS_READING.items():
        done = run_cli(*command, data_dir=data_dir)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        if name in reads:
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            assert done.stderr.startswith(f"error: corrupt data in {data_dir}: {name} ("), command
            assert "start the collector" in done.stderr
        else:
            assert done.returncode in (0, 1), (command, done.stdout, done.stderr)
    # Only the server and the forwarder move a corrupt file aside, never these commands.
    assert (data_dir / name).read_bytes() == before
    assert not moved_files(data_dir)


# --- an upstream outage with a large backlog ----------------------------------------------

# Retries during the outage back off to this (the default is 60 s; it bounds how soon the
# forwarder notices the upstream is back, so the tests keep it short).
OUTAGE_RETRY_MAX_S = 2.0
FRESH_EVERY_S = 0.1
FRESH_EVENTS = 100  # per request: 1,000 fresh events/s during and after the drain
STEADY_DELAY_S = 2.0  # with no backlog, an event reaches the upstream within this
FORWARD_IN_FLIGHT = 2  # the default forward_in_flight: batches sent at once


class Arrivals:
    """When each event id first reached the upstream, sampled every 10 ms in a thread."""

    def __init__(self, api: Upstream) -> None:
        self._upstream = api
        self.first: dict[str, float] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            events = self._upstream.events
            now = time.monotonic()
            for received in events[self._seen :]:
                self.first.setdefault(str(received.get("id")), now)
            self._seen = len(events)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def have(self, wanted: list[str]) -> bool:
        return all(eid in self.first for eid in wanted)


def post_fresh(server: Server, posted: dict[str, float], stop: threading.Event) -> None:
    """A steady trickle of fresh events; `posted` holds when each was answered 200."""
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        n = 0
        while not stop.is_set():
            body = {"events": sdk_events(f"fresh{n}", FRESH_EVENTS)}
            n += 1
            answer = client.post("/v1/events/batch", json=body)
            assert answer.status_code == 200, answer.text
            now = time.monotonic()
            for sent in body["events"]:
                posted[sent["id"]] = now
            stop.wait(FRESH_EVERY_S)


@pytest.mark.parametrize(
    ("outage_s", "backlog"),
    [
        pytest.param(3.0, 10_000, id="3s-10k"),
        pytest.param(25.0, 100_000, id="25s-100k", marks=pytest.mark.slow),
    ],
)
def test_a_long_outage_drains_its_backlog_in_order_and_fresh_events_follow_within_a_bound(
    outage_s: float,
    backlog: int,
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    """What "not starved" means here: the queue is first in, first out, so an event posted
    during the drain waits for the backlog queued before it, and no longer. It reaches
    the upstream within (backlog still ahead of it) / (drain rate) * 1.5 + the retry
    ceiling + 2 s; events queued after it never overtake it; and once the backlog is gone
    fresh events arrive within STEADY_DELAY_S, while they keep coming."""
    server = start_server()
    upstream.down()
    start_forwarder(
        server.data_dir, upstream.url, COLLECTOR_RETRY_MAX_SECONDS=str(OUTAGE_RETRY_MAX_S)
    )
    went_down = time.monotonic()
    queued = sdk_events("backlog", backlog)
    post(server, queued)  # 1000-event requests, each answered 200
    assert time.monotonic() - went_down < outage_s, "posting the backlog outlasted the outage"
    time.sleep(outage_s - (time.monotonic() - went_down))  # the outage goes on: a span of time
    document = collect(Settings(data_dir=server.data_dir))
    assert document["forwarder"]["upstream"] == "retrying", document["forwarder"]
    assert document["queue"]["events"] == backlog

    arrivals = Arrivals(upstream)
    posted: dict[str, float] = {}
    stop = threading.Event()
    fresh = threading.Thread(target=post_fresh, args=(server, posted, stop))
    back_up = time.monotonic()
    upstream.up()
    fresh.start()
    try:
        backlog_ids = ids_of(queued)
        wait_for(lambda: arrivals.have(backlog_ids), "the backlog upstream", timeout=DRAIN_WAIT_S)
        drained = max(arrivals.first[eid] for eid in backlog_ids)
        # Fresh events keep coming for a while after the drain: steady state again.
        time.sleep(STEADY_DELAY_S)
    finally:
        stop.set()
        fresh.join(timeout=30)
    fresh_ids = list(posted)
    wait_for(lambda: arrivals.have(fresh_ids), "the fresh events upstream", timeout=30)
    arrivals.stop()

    drain_s = drained - back_up
    rate = backlog / drain_s
    backlog_times = sorted(arrivals.first[eid] for eid in backlog_ids)
    worst = 0.0
    for eid, at in posted.items():
        delay = arrivals.first[eid] - at
        ahead = len(backlog_times) - _count_before(backlog_times, at)  # backlog not yet sent
        bound = ahead / rate * 1.5 + OUTAGE_RETRY_MAX_S + 2.0
        assert delay <= bound, f"{eid}: {delay:.2f} s > {bound:.2f} s with {ahead} events ahead"
        if at > drained:
            assert delay <= STEADY_DELAY_S, f"{eid} waited {delay:.2f} s with no backlog"
        worst = max(worst, delay)
    # First in, first out, by batch: the backlog went before the fresh events, except the
    # batches senders still held in backoff when the upstream came back (one per sender at
    # most, each up to 1000 events), which may land after later ones.
    first_fresh = min(arrivals.first[eid] for eid in fresh_ids)
    overtaken = len(backlog_times) - _count_before(backlog_times, first_fresh)
    assert overtaken <= FORWARD_IN_FLIGHT * 1000, f"{overtaken} backlog events after fresh ones"

    answered = backlog_ids + fresh_ids
    assert_everything_answered_arrived(upstream, server.data_dir, answered, ("backlog", "fresh"))
    print(
        f"outage {outage_s:.0f} s, backlog {backlog:,} events: drained in {drain_s:.1f} s "
        f"after the upstream came back ({rate:,.0f} events/s, to this test's upstream); "
        f"{len(fresh_ids):,} fresh events posted meanwhile, longest wait {worst:.1f} s"
    )


def _count_before(times: list[float], moment: float) -> int:
    """How many of the sorted `times` are at or before `moment`."""
    low, high = 0, len(times)
    while low < high:
        middle = (low + high) // 2
        if times[middle] <= moment:
            low = middle + 1
        else:
            high = middle
    return low
