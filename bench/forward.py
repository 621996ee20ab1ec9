"""Forwarder drain rate and memory: a backlog of N queued events sent to a local upstream.

What it measures, for each backlog size N (default 1,000,000):

    fill      a fresh data directory's queue is filled directly with `Spool.append`, in rows
              of 1000 events (the way the server's group commit stores them): realistic SDK
              events (decisions, exposures, purchases, page views; `bench/ingest.py`'s
              factory), every id unique over the run; all of one project, or with
              `--projects N` each row mixing N projects (as a row gathering several SDKs'
              requests would), whose events the forwarder must then parse one by one. It
              runs in a subprocess with the tree under test first on the import path, so
              the rows are in that tree's own format
    upstream  a minimal HTTP/1.1 keep-alive server on uvloop, in its own process on
              127.0.0.1: it reads each request, gunzips it, parses it, counts its events and
              their distinct ids, and answers 200 at once (far faster than the forwarder,
              so it is not what is measured)
    drain     `collector forward` (a subprocess, default settings) is started on the data
              directory and timed until the upstream holds all N distinct ids, and then until
              the queue is empty (every row acked)

Reported: drain rate in events/s (whole drain, start-up included, and the steady middle from
10% to 90%), the forwarder's peak RSS (VmHWM) and its RSS when 10%, 50% and 90% of the
backlog had arrived, its CPU per event, and the upstream's. Memory is flat when the peak RSS
of a 100k and a 1M backlog are about the same: run both with `--events 100000,1000000`.

`--profile` also samples the forwarder with py-spy (`py-spy record --format raw`, which
must be on PATH or next to this Python) and prints where its time goes, by function: every
busy thread (SQLite and gzip run in worker threads), or with `--profile-gil` only the
thread holding the GIL, which is the part that cannot run in parallel.

`--old-tree DIR` compares the forwarder of an older commit with this checkout's in the same
run. DIR holds a copy of that commit's files, e.g. made with

    mkdir -p /tmp/oldtree && git archive COMMIT | tar -x -C /tmp/oldtree

Each backlog size is then measured twice, back to back, each time on a fresh data
directory and a fresh upstream: first with the old tree (its fill and its forwarder, both
from DIR's code on this interpreter, since the queue row format may differ between them),
then with this one. The report shows both rows and the ratios new/old of the drain rate
(whole and steady), the forwarder's CPU per event and its peak RSS. Machines drift (other
load, the page cache), so only a ratio well away from 1 says much from a single run.

Run it by hand (it is not part of the test suite):

    python bench/forward.py [--events 100000,1000000] [--in-flight N] [--projects N]
                             [--profile [--profile-gil]] [--old-tree DIR]
    python bench/forward.py --events 1000000 --old-tree /tmp/oldtree

It removes its data directories and stops its processes on exit, Ctrl-C included. Load only
ever targets 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop
from ingest import (
    MARKER,
    REQ_DIGITS,
    EventFactory,
    _die_with_parent,
    cpu_model,
    filesystem_of,
    free_port,
    machine_busy_seconds,
    note,
    version_of,
)

# Nothing of `collector` or `forwarder` is imported here: the fill and the forwarder each
# import the tree under test in their own process (see `Tree`), so this process works with
# either tree, and with the current one even while it does not import.

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ROW_EVENTS = 1000  # events per queue row, as the server's group commit stores a full request
TEMPLATES = 4  # distinct prebuilt rows (ids are made unique per row by the row number)
SAMPLE_S = 0.05  # how often the upstream's count and the forwarder's memory are read
STALL_S = 120.0  # give up when no event arrives for this long
ACK_TIMEOUT_S = 60.0  # time allowed, once all events arrived, for the last acks
STOP_TIMEOUT_S = 30.0
# Lines of a failed child's log shown: enough for a traceback's end (its workdir is removed).
LOG_TAIL_LINES = 15
TARGET_EVENTS_S = 60_000
MIB = 1024 * 1024
# The name of `Spool.append`'s parameter says which row it takes: "events", a list of the
# row's events (up to dc17329), or "groups", those events by target (the row format after).
APPEND_STYLES = ("events", "groups")


# --- the upstream: a bare HTTP/1.1 server that counts events -----------------------------


@dataclass
class Counts:
    requests: int = 0
    events: int = 0
    bad: int = 0
    gzip_bytes: int = 0
    json_bytes: int = 0
    ids: set[str] = field(default_factory=set)

    def document(self) -> bytes:
        return orjson.dumps(
            {
                "requests": self.requests,
                "events": self.events,
                "distinct": len(self.ids),
                "bad": self.bad,
                "gzip_bytes": self.gzip_bytes,
                "json_bytes": self.json_bytes,
                "cpu_s": time.process_time(),
            }
        )


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection: requests with Content-Length, answered in order."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.answer(head[0].split(" ")[:2], headers, body)

    def answer(self, request_line: list[str], headers: dict[str, str], body: bytes) -> None:
        method, path = request_line
        if method == "GET" and path == "/stats":
            self.send(200, self.counts.document())
            return
        counts = self.counts
        counts.requests += 1
        try:
            raw = zlib.decompress(body, 31) if headers.get("content-encoding") == "gzip" else body
            events = orjson.loads(raw)["events"]
            counts.ids.update(event["id"] for event in events)
        except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            counts.bad += 1
            self.send(400, orjson.dumps({"error": "Bad Request", "message": str(exc)}))
            return
        counts.events += len(events)
        counts.gzip_bytes += len(body)
        counts.json_bytes += len(raw)
        self.send(200, b'{"accepted":%d,"written":%d}' % (len(events), len(events)))

    def send(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        reason = "OK" if status == 200 else "Bad Request"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, reason.encode(), len(body))
            + body
        )


def serve_upstream(port: int) -> None:
    async def serve() -> None:
        counts = Counts()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: UpstreamProtocol(counts), HOST, port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve())


# --- processes --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment without COLLECTOR_* settings, so the forwarder runs on defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}


def start(
    argv: list[str], log_path: Path, env: dict[str, str], cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops us in order
            preexec_fn=_die_with_parent,
        )


def stop(process: subprocess.Popen[bytes] | None) -> int | None:
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes (empty once it is gone)."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def queue_rows(data_dir: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{data_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        (rows,) = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        return int(rows)
    finally:
        conn.close()


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# --- the trees compared -----------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A checkout whose `cli`, `collector` and `forwarder` a run uses: this one ("new") or
    `--old-tree` ("old"). Its children run with it as working directory and first on
    PYTHONPATH, ahead of the editable install, which maps those packages to this checkout
    (an install's finder comes after the path's)."""

    name: str
    root: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.root), base.get("PYTHONPATH", "")) if p)
        return {**base, "PYTHONPATH": path}

    def describe(self) -> str:
        """Its directory, and its commit when it is a git checkout (a `git archive` copy is
        not, and `git -C` would then report whatever repository encloses it)."""
        if not (self.root / ".git").exists():
            return f"{self.root} (not a git checkout)"
        git = ["git", "--no-optional-locks", "-C", str(self.root)]  # takes no index lock
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True)
        commit = head.stdout.decode().strip() or "?"
        changes = " plus uncommitted changes" if dirty.stdout.strip() else ""
        return f"{self.root} at {commit}{changes}"


# --- one run ----------------------------------------------------------------------------


@dataclass
class Result:
    events: int
    tree: str = "new"
    fill_s: float = 0.0
    queue_mib: float = 0.0
    first_s: float = 0.0  # from the forwarder's start to the first event upstream
    delivered_s: float = 0.0  # ... to the last event upstream
    acked_s: float = 0.0  # ... to the queue being empty
    steady_events_s: float = 0.0  # from 10% to 90% of the backlog
    peak_rss: int = 0
    rss_at: dict[int, int] = field(default_factory=dict)  # percent of the backlog -> RSS
    forwarder_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    machine_busy: float = 0.0  # cores busy on average during the drain (everything)
    upstream: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    profile: Path | None = None

    @property
    def events_s(self) -> float:
        return self.events / self.delivered_s if self.delivered_s else 0.0


@dataclass(frozen=True)
class Filled:
    """What the fill subprocess reports."""

    seconds: float
    table: str  # the queue's table, `spool.TABLE` of the tree that wrote it
    spool_file: str  # where `Spool` was imported from: the check that the tree was used


def fill(data_dir: Path, events: int, seed: int, projects: int) -> Filled:
    """Queue `events` events in rows of ROW_EVENTS, each row's events spread over
    `projects` projects, with whatever `collector` is first on the import path (run by
    `fill_with` in a subprocess); the seconds exclude imports and building the events."""
    from collector.store.datadir import DataDir
    from collector.store.spool import TABLE, Spool

    style = append_style(Spool.append)
    templates, targets = [], []
    for offset in range(TEMPLATES):
        made = EventFactory(seed + offset).events(ROW_EVENTS)
        if projects > 1:
            for index, event in enumerate(made):
                event["projectId"] = f"proj_bench_{index % projects}"
        templates.append([orjson.dumps(event) for event in made])
        targets.append([(event["projectId"], event["env"]) for event in made])
    if style == "groups":  # only such a tree is sure to have `Target`
        from collector.events import Target

        targets = [[Target(*key) for key in keys] for keys in targets]
    began = time.monotonic()
    spool = Spool(DataDir(data_dir), sync="normal", budget_bytes=1 << 50)
    # Typed loosely: mypy sees this checkout's signature, the call must suit either tree's.
    append: Callable[[Any], None] = spool.append
    try:
        for row in range(-(-events // ROW_EVENTS)):
            count = min(ROW_EVENTS, events - row * ROW_EVENTS)
            number = b"%0*d" % (REQ_DIGITS, row)
            template = templates[row % TEMPLATES]
            lines = [raw.replace(MARKER, number) for raw in template[:count]]
            if style == "groups":
                append(grouped(targets[row % TEMPLATES][:count], lines))
            else:
                append(lines)
    finally:
        spool.close()
    seconds = time.monotonic() - began
    return Filled(seconds, TABLE, str(inspect.getfile(Spool)))


def append_style(append: Callable[..., Any]) -> str:
    """Which row `Spool.append` (unbound) takes (APPEND_STYLES), from its parameter's name."""
    names = list(inspect.signature(append).parameters)[1:]  # after self
    if not names or names[0] not in APPEND_STYLES:
        raise RuntimeError(f"Spool.append({', '.join(names)}): takes neither of {APPEND_STYLES}")
    return names[0]


def grouped(targets: list[Any], lines: list[bytes]) -> dict[Any, list[bytes]]:
    """`lines` by target (`collector.events.Target`), each target's in their order."""
    groups: dict[Any, list[bytes]] = {}
    for target, line in zip(targets, lines, strict=True):
        groups.setdefault(target, []).append(line)
    return groups


def fill_with(tree: Tree, data_dir: Path, events: int, args: argparse.Namespace) -> Filled:
    """`fill` in a subprocess (this file, `--fill-only`) importing `tree`'s code."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--fill-only"]
    argv += ["--data-dir", str(data_dir), "--events", str(events)]
    argv += ["--seed", str(args.seed), "--projects", str(args.projects)]
    done = subprocess.run(
        argv,
        cwd=tree.root,
        env=tree.env(child_env()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,  # as `start`: Ctrl-C reaches the bench, which ends it
        preexec_fn=_die_with_parent,
    )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
        raise RuntimeError(
            f"the fill with the {tree.name} tree ({tree.root}) exited with status "
            f"{done.returncode}:\n" + "\n".join(tail)
        )
    filled = Filled(**orjson.loads(done.stdout.splitlines()[-1]))
    if not Path(filled.spool_file).resolve().is_relative_to(tree.root.resolve()):
        raise RuntimeError(
            f"the fill for the {tree.name} tree imported {filled.spool_file}, "
            f"not code from {tree.root}"
        )
    return filled


def run_one(events: int, workdir: Path, args: argparse.Namespace, tree: Tree) -> Result:
    result = Result(events, tree.name)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    config = workdir / "collector.toml"
    config.write_text("")  # an empty file: /etc/collector/collector.toml is never read
    note(f"{events:,} events, {tree.name} tree: filling the queue in rows of {ROW_EVENTS}")
    filled = fill_with(tree, data_dir, events, args)
    result.fill_s = filled.seconds
    result.queue_mib = sum(p.stat().st_size for p in data_dir.glob("queue.db*")) / MIB
    note(f"filled in {result.fill_s:.1f} s ({result.queue_mib:.0f} MiB); starting upstream")

    port = free_port()
    upstream = start(
        [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", "--port", str(port)],
        workdir / "upstream.log",
        child_env(),
    )
    forwarder: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    client = httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10)
    try:
        wait_for_upstream(client, upstream)
        env = {
            **tree.env(child_env()),
            "COLLECTOR_UPSTREAM_URL": f"http://{HOST}:{port}",
            "COLLECTOR_UPSTREAM_KEY": "traffical_sk_bench",
            "COLLECTOR_LOG_LEVEL": "warning",
        }
        if args.in_flight:
            env["COLLECTOR_FORWARD_IN_FLIGHT"] = str(args.in_flight)
        argv = [sys.executable, "-m", "cli", "forward", "--config", str(config)]
        argv += ["--data-dir", str(data_dir)]
        busy_before = machine_busy_seconds()
        began = time.monotonic()
        forwarder = start(argv, workdir / "forwarder.log", env, cwd=tree.root)
        note(f"{tree.name} forwarder pid {forwarder.pid} draining to 127.0.0.1:{port}")
        if args.profile:
            spy = start_profiler(forwarder.pid, workdir, result, args.profile_gil)
        watch(client, forwarder, events, began, result)
        busy = machine_busy_seconds() - busy_before
        result.machine_busy = busy / (time.monotonic() - began)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while queue_rows(data_dir, filled.table) and time.monotonic() < deadline:
            time.sleep(SAMPLE_S)
        result.acked_s = time.monotonic() - began
        result.peak_rss = proc_status(forwarder.pid).get("VmHWM", 0)
        result.forwarder_cpu_s = cpu_seconds(forwarder.pid)
        result.upstream = orjson.loads(client.get("/stats").content)
        result.upstream_cpu_s = float(result.upstream["cpu_s"])
        result.exit_code = stop(forwarder)
        if spy is not None:
            spy.wait(STOP_TIMEOUT_S)
    finally:
        client.close()
        stop(forwarder)
        stop(spy)
        stop(upstream)
    return result


def wait_for_upstream(client: httpx.Client, upstream: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if upstream.poll() is not None:
            raise RuntimeError("the upstream exited at start")
        with contextlib.suppress(httpx.TransportError):
            client.get("/stats")
            return
        time.sleep(SAMPLE_S)
    raise RuntimeError("the upstream did not start")


def start_profiler(
    pid: int, workdir: Path, result: Result, gil: bool
) -> subprocess.Popen[bytes] | None:
    spy = py_spy()
    if spy is None:
        note("py-spy not found: no profile")
        return None
    result.profile = workdir / "forwarder.folded"
    argv = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    argv += ["--nonblocking", "--output", str(result.profile)]
    if gil:
        argv.append("--gil")
    return start(argv, workdir / "py-spy.log", os.environ.copy())


def watch(
    client: httpx.Client,
    forwarder: subprocess.Popen[bytes],
    events: int,
    began: float,
    result: Result,
) -> None:
    """Sample the upstream's count and the forwarder's RSS until all events arrived."""
    marks = {10: events * 0.1, 50: events * 0.5, 90: events * 0.9}
    reached: dict[int, float] = {}
    last_count, last_change = 0, time.monotonic()
    while True:
        if forwarder.poll() is not None:
            raise RuntimeError(f"the forwarder exited with status {forwarder.returncode}")
        stats = orjson.loads(client.get("/stats").content)
        now = time.monotonic()
        count = int(stats["distinct"])
        rss = proc_status(forwarder.pid).get("VmRSS", 0)
        if count and not result.first_s:
            result.first_s = now - began
        for percent, threshold in marks.items():
            if percent not in reached and count >= threshold:
                reached[percent] = now
                result.rss_at[percent] = rss
        if count >= events:
            result.delivered_s = now - began
            break
        if count != last_count:
            last_count, last_change = count, now
        elif now - last_change > STALL_S:
            raise RuntimeError(f"no progress for {STALL_S:.0f} s at {count} events")
        time.sleep(SAMPLE_S)
    if 10 in reached and 90 in reached and reached[90] > reached[10]:
        result.steady_events_s = events * 0.8 / (reached[90] - reached[10])


# --- reporting --------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace, trees: list[Tree]) -> None:
    print()
    print(f"machine: nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} CPUs), {cpu_model()}")
    print(
        f"python {platform.python_version()}; persist-queue {version_of('persist-queue')}, "
        f"httpx {version_of('httpx')}, orjson {version_of('orjson')}; "
        f"tmp on {filesystem_of(Path(tempfile.gettempdir()))}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    in_flight = args.in_flight or "default (2)"
    print(
        f"forwarder: collector forward, default settings (in flight {in_flight}, its own gzip), "
        f"rows of {ROW_EVENTS} events"
        + (f" mixing {args.projects} projects" if args.projects > 1 else " of one project")
    )
    for tree in trees:
        print(f"{tree.name} tree: {tree.describe()}")
    print()
    header = (
        f"{'tree':<4} {'backlog':>10} {'events/s':>9} {'steady/s':>9} {'drain s':>8} "
        f"{'acked s':>8} {'1st ev s':>8} {'peak RSS':>9} {'RSS@10%':>8} {'RSS@50%':>8} "
        f"{'RSS@90%':>8} {'fwd CPU µs/ev':>13} {'upstr µs/ev':>11} {'busy cores':>10}"
    )
    print(header)
    for r in results:
        print(
            f"{r.tree:<4} {r.events:>10,} {r.events_s:>9,.0f} {r.steady_events_s:>9,.0f} "
            f"{r.delivered_s:>8.1f} {r.acked_s:>8.1f} {r.first_s:>8.2f} "
            f"{r.peak_rss / MIB:>7.0f}Mi {r.rss_at.get(10, 0) / MIB:>6.0f}Mi "
            f"{r.rss_at.get(50, 0) / MIB:>6.0f}Mi {r.rss_at.get(90, 0) / MIB:>6.0f}Mi "
            f"{r.forwarder_cpu_s / r.events * 1e6:>13.1f} "
            f"{r.upstream_cpu_s / r.events * 1e6:>11.1f} {r.machine_busy:>10.2f}"
        )
    print()
    for r in results:
        up = r.upstream
        ratio = up["json_bytes"] / up["gzip_bytes"] if up.get("gzip_bytes") else 0
        print(
            f"{r.tree} {r.events:,}: queue {r.queue_mib:.0f} MiB filled in {r.fill_s:.1f} s; "
            f"upstream got {up['requests']:,} requests, {up['events']:,} events "
            f"({up['distinct']:,} distinct, {up['events'] - up['distinct']:,} repeated), "
            f"{up['bad']} refused, gzip {ratio:.1f}x; forwarder exit status {r.exit_code}"
        )
    print()
    print(
        "events/s: backlog / (forwarder start -> last event upstream), start-up included; "
        "steady/s: from 10% to 90% of the backlog; acked s: until the queue was empty; "
        "busy cores: the whole machine's, averaged over the drain (2 = saturated)."
    )
    for tree in trees:
        if ran := [r for r in results if r.tree == tree.name]:
            report_tree(ran, tree.name)
    if len(trees) > 1:
        report_ratios(results)
    for r in results:
        if r.profile is not None:
            print_profile(r)


def report_tree(results: list[Result], name: str) -> None:
    """The target and the memory verdicts of one tree's runs."""
    # The target is for a large backlog: a small one's rate is mostly start-up.
    largest = max(results, key=lambda r: r.events)
    verdict = "met" if largest.events_s >= TARGET_EVENTS_S else "NOT met"
    print(
        f"{name} tree: target >= {TARGET_EVENTS_S:,} events/s draining {largest.events:,}: "
        f"{verdict} ({largest.events_s:,.0f}/s)"
    )
    if len(results) > 1:
        small, large = min(results, key=lambda r: r.events), max(results, key=lambda r: r.events)
        print(
            f"{name} tree: memory: peak RSS {small.peak_rss / MIB:.0f} MiB for "
            f"{small.events:,} events, {large.peak_rss / MIB:.0f} MiB for {large.events:,} "
            f"({_ratio(large.peak_rss, small.peak_rss)} for "
            f"{large.events / small.events:.0f}x the backlog)"
        )


def report_ratios(results: list[Result]) -> None:
    """new/old for each backlog size: above 1 is faster for the rates, costlier for CPU and
    memory."""
    old = {r.events: r for r in results if r.tree == "old"}
    print()
    print(f"{'new/old':>10} {'events/s':>9} {'steady/s':>9} {'fwd CPU/ev':>10} {'peak RSS':>9}")
    for new in (r for r in results if r.tree == "new" and r.events in old):
        was = old[new.events]
        print(
            f"{new.events:>10,} {_ratio(new.events_s, was.events_s):>9} "
            f"{_ratio(new.steady_events_s, was.steady_events_s):>9} "
            f"{_ratio(new.forwarder_cpu_s, was.forwarder_cpu_s):>10} "
            f"{_ratio(new.peak_rss, was.peak_rss):>9}"
        )
    print(
        "(events/s and steady/s: above 1 is faster; fwd CPU/ev and peak RSS: above 1 costs "
        "more; the same backlog, so CPU/ev's ratio is that of CPU seconds)"
    )


def _ratio(new: float, old: float) -> str:
    """`new / old` as "1.23x", or "-" without a measure to divide by (a steady rate needs
    samples at 10% and 90% of the backlog, which a tiny one may not give)."""
    return f"{new / old:.2f}x" if old and new else "-"


# Packages whose functions the inclusive profile lists (the rest is plumbing: runpy, click,
# asyncio's loop), so it shows what each step of the forwarder costs.
PROFILED = ("(forwarder/", "(collector/", "(persistqueue/", "(httpx/", "(httpcore/", "(zlib")


def print_profile(result: Result, top: int = 25) -> None:
    """Where the forwarder's samples were: by function, self and inclusive."""
    assert result.profile is not None
    if not result.profile.exists():
        note(f"no profile written to {result.profile}")
        return
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in result.profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames if any(p in f for p in PROFILED)}:
            inclusive[frame] += count
    print()
    print(f"profile of the {result.tree} tree's {result.events:,}-event drain: {total} samples")
    print(f"  self time, top {top}:")
    for frame, count in own.most_common(top):
        print(f"    {count / total:6.1%}  {frame}")
    print(f"  inclusive time (forwarder, collector, persist-queue, httpx), top {top}:")
    for frame, count in inclusive.most_common(top):
        print(f"    {count / total:6.1%}  {frame}")


def _short(frame: str) -> str:
    """`function (file.py)` from py-spy's `function (path/file.py:line)`."""
    function, _, rest = frame.partition(" (")
    return f"{function} ({Path(rest.split(':')[0]).name})" if rest else function


def failed(exc: RuntimeError, events: int, tree: Tree, workdir: Path) -> None:
    """Say which run failed and how, with the end of its forwarder's and upstream's logs."""
    note(f"{events:,} events, {tree.name} tree ({tree.root}) failed: {exc}")
    for log in (workdir / "forwarder.log", workdir / "upstream.log"):
        with contextlib.suppress(OSError):
            if lines := log.read_text(errors="replace").strip().splitlines():
                note(f"end of {log.name}:\n" + "\n".join(lines[-LOG_TAIL_LINES:]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Forwarder drain rate and memory.")
    parser.add_argument(
        "--events",
        default="1000000",
        help="backlog sizes, comma separated (default 1000000; e.g. 100000,1000000)",
    )
    parser.add_argument(
        "--in-flight", type=int, default=0, help="COLLECTOR_FORWARD_IN_FLIGHT (default: setting)"
    )
    parser.add_argument("--profile", action="store_true", help="sample the forwarder (py-spy)")
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (the serial part)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated events")
    parser.add_argument(
        "--projects", type=int, default=1, help="projects mixed in each row (default 1)"
    )
    parser.add_argument(
        "--tmp-dir", type=Path, default=None, help="where data dirs go (default: system tmp)"
    )
    parser.add_argument(
        "--old-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="a copy of an older commit: measure its fill and forwarder first, then this one's",
    )
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fill-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size.replace("_", "")) for size in args.events.split(",") if size]
    except ValueError:
        parser.error("--events takes whole numbers, comma separated")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--events must be at least 1")
    if args.projects < 1:
        parser.error("--projects must be at least 1")
    if args.fill_only and (args.data_dir is None or len(args.sizes) != 1):
        parser.error("--fill-only takes --data-dir and one size in --events")
    if args.old_tree is not None:
        args.old_tree = args.old_tree.resolve()
        missing = [
            n for n in ("cli.py", "collector", "forwarder") if not (args.old_tree / n).exists()
        ]
        if missing:
            parser.error(f"--old-tree {args.old_tree}: no {', '.join(missing)} (not a checkout?)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.port)
        return 0
    if args.fill_only:  # in the subprocess of `fill_with`: the one line it reads
        filled = fill(args.data_dir, args.sizes[0], args.seed, args.projects)
        print(orjson.dumps(filled).decode())
        return 0
    trees = [Tree("new", ROOT)]
    if args.old_tree is not None:
        trees.insert(0, Tree("old", args.old_tree))
    tmp_root = Path(tempfile.mkdtemp(prefix="collector-forward-bench-", dir=args.tmp_dir))
    results: list[Result] = []

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        for number, events in enumerate(args.sizes):
            for tree in trees:  # back to back, so both see about the same machine
                workdir = tmp_root / f"run{number}-{tree.name}"
                try:
                    results.append(run_one(events, workdir, args, tree))
                except RuntimeError as exc:  # still report what ran (the old tree's rows)
                    failed(exc, events, tree, workdir)
                    if results:
                        report(results, args, trees)
                    return 1
                if results[-1].profile is not None:  # keep the profile, drop the queue
                    shutil.rmtree(workdir / "data", ignore_errors=True)
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
        report(results, args, trees)
    except KeyboardInterrupt:
        note("interrupted; processes stopped and temporary files removed")
        return 130
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
