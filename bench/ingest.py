"""Ingest throughput and latency of the collector, next to reference servers.

What it measures: requests/s, events/s, p50 and p99 latency, server CPU and non-200
answers of `POST /v1/events/batch` on the real collector (its own `collector serve`
process, a fresh data directory in a temporary directory, the default `sync=full`, a key
made with `collector keys create --scope sdk:write`), and on reference servers that bound
it from either side (`--servers`, a comma separated list of these kinds):

    collector  this tree's collector, as above
    old        the collector as it was at another commit: `--old-tree DIR` is a checkout
               of that commit of this repository; it gets its own `keys create` and
               `serve`, run exactly like this tree's (working directory and PYTHONPATH on
               DIR, this interpreter and so this virtualenv's dependencies)
    durable    the minimal durable pipeline: a Litestar app on the same uvicorn options
               as the collector (uvloop, httptools, no access log) whose handler reads
               the body, parses it with orjson, takes its `events` list and puts the raw
               body as one item into a persist-queue `SQLiteAckQueue` (WAL,
               `synchronous=FULL`: an fsync per request, as `sync=full` promises), a
               blocking put in the handler, then answers `{"accepted": N, "written": N}`.
               No validation, no de-duplication, no grouping of requests into one commit:
               what the simplest endpoint that keeps its word costs
    bare       the same app whose handler only reads the body and answers the counts: the
               ceiling the framework and the server leave

By default the kinds are collector, durable and bare, and with `--old-tree` also old
(right after collector, so the two runs compared most closely are nearest in time). Each
scenario gets fresh server processes:

    batch   1000-event requests over 4 connections   (an SDK or relay flushing big batches)
    single  1-event requests over 64 connections     (many small clients)

After the table a "ratios" block gives, per scenario, the collector's figure divided by
the reference's in the same scenario, one line each (`batch: collector/durable events/s
0.83`), for each reference that ran:

    collector/bare     events/s, req/s       what validation, de-duplication and the
                                             durable commit cost against no work at all
    collector/durable  events/s, req/s, p99  the collector's extra work against one fsync
                                             per request (above 1: its group commit wins)
    collector/old      ms/req, events/s      server CPU per request (below 1: cheaper now)
                                             and throughput (above 1: faster now) against
                                             the older commit

Events look like the ones the Python SDK (traffical 0.3.2) sends: decisions, exposures and
track events (purchase, page_view) with layers, assignments, context and attribution,
mixed 40/30/30, and every event carries an id that is unique over the run (a request
number is spliced into prebuilt bodies, so the collector's de-duplication never drops
one; the bench checks `written` in every answer).

The load generator is a raw HTTP/1.1 keep-alive client on uvloop, written here: it sends
prebuilt request bytes and reads `Content-Length` answers, one request in flight per
connection. By default each connection sends its next request as soon as the last is
answered (closed loop, like wrk: it finds the maximum throughput, and latency is then
connections / throughput). `--batch-rate` / `--single-rate` offer a fixed number of
requests per second instead (open loop, like wrk2: latency counts from when a request was
due, so a slow server cannot hide its backlog); use them to check latency at a target
load. The generator runs in this process, the servers in their own, so on a 2-core
machine each gets about one core; `gen CPU` shows how near the generator came to
saturating its core, `other` how much of the machine something else used. Server CPU
counts the server process and its children (the collector's queue writer process and
multiprocessing's resource tracker), for every kind alike.

Run it by hand (it is not part of the test suite; pytest only collects `tests/`):

    python bench/ingest.py [--duration S] [--warmup S] [--scenarios batch,single]
                           [--servers collector,old,durable,bare] [--old-tree DIR]
                           [--batch-rate R] [--single-rate R] [--rounds N]

`--rounds 3` runs each scenario's servers three times in turn (collector, reference,
collector, reference, ...) and prints each ratio as the median of the rounds' ratios,
each round's after it: this machine is shared, and its speed drifts between rows (one
round's single-event collector/bare ratio read 0.38 to 0.82 within an hour on 12-03).

To compare with an older commit, check it out beside this tree first, for example:

    git worktree add --detach /tmp/old <commit>
        (or: mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old)
    python bench/ingest.py --old-tree /tmp/old --duration 10

It stops by itself after about (warm-up + duration + a few seconds of start-up) per
scenario, server and round, and removes its servers and temporary directories on exit, Ctrl-C
included. Load only ever targets 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop
from litestar import Litestar, MediaType, Request, Response, get, post
from persistqueue import SQLiteAckQueue

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PATH = "/v1/events/batch"
MIB = 1024 * 1024
# The collector's disk budget in a run: more than a minute at 200,000 events/s stores.
BENCH_DISK_BUDGET_BYTES = 64 * 1024 * MIB

# Stand-in for the request number inside prebuilt bodies; each request replaces every
# occurrence with its own fixed-width number, so event ids never repeat within a run.
MARKER = b"~REQ~"
REQ_DIGITS = 10
# Distinct prebuilt bodies per scenario (different units, buckets, kinds, values).
BATCH_POOL = 8
SINGLE_POOL = 256
# Event kinds and their share: a decide() gives a decision and mostly an exposure; tracks
# follow. Proportions chosen to resemble an SDK's queue, not measured from real traffic.
KINDS = ("decision", "exposure", "purchase", "page_view")
WEIGHTS = (40, 30, 10, 20)
SDK_NAME = "python"
SDK_VERSION = "0.3.2"

# Seconds to wait for a server to answer /healthz, for in-flight answers once the measured
# window has closed, and for a server to exit after SIGTERM before it is killed.
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 15.0
# Pause before a lost connection is opened again (a dead server must not spin the client).
RECONNECT_DELAY_S = 0.1

# Targets for the collector on the 2-core reference machine.
TARGET_BATCH_EVENTS_S = 60_000
TARGET_SINGLE_REQUESTS_S = 5_000
TARGET_P99_MS = 50.0

# Each --servers kind and its name in the table (and so in every Result).
SERVER_NAMES = {
    "collector": "collector",
    "workers": "collector w/N",
    "old": "old collector",
    "durable": "durable queue",
    "bare": "bare litestar",
}
# The order when --servers is not given; old (only with --old-tree) runs right after the
# collector, so that the pair compared most closely is measured nearest in time.
DEFAULT_SERVERS = ("collector", "durable", "bare")
WITH_OLD_SERVERS = ("collector", "old", "durable", "bare")
# SQLite's answer to `PRAGMA synchronous` when it is FULL (an fsync of the WAL per commit).
SQLITE_SYNCHRONOUS_FULL = 2


@dataclass(frozen=True)
class Scenario:
    name: str
    events_per_request: int
    connections: int
    pool: int
    rate: float = 0.0  # requests/s offered; 0: each connection sends as soon as answered

    def pace(self) -> str:
        return f"{self.rate:g} req/s offered" if self.rate else "as fast as answered"

    def label(self) -> str:
        at = f" @{self.rate:g}/s" if self.rate else ""
        return f"{self.name} ({self.events_per_request} ev x {self.connections} conn{at})"


@dataclass
class Result:
    scenario: str
    server: str
    seconds: float
    requests: int = 0
    events: int = 0
    written: int = 0
    errors: int = 0
    statuses: Counter[int | str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    server_cpu: float = 0.0
    gen_cpu: float = 0.0
    other_cpu: float = 0.0
    server_died: bool = False
    round: int = 0  # with --rounds: which round of the scenario's servers it ran in

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    @property
    def requests_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu * self.seconds / self.requests * 1e3 if self.requests else 0.0

    @property
    def events_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


# --- realistic events, as the Python SDK builds them ------------------------------------


def _crockford(value: int, length: int) -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(length)))


def _iso_ms(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class EventFactory:
    """Events shaped like traffical 0.3.2's build_*_event, with ids holding MARKER.

    An id is `prefix_` + 26 characters like a ULID: 10 of the run's start time, then the
    request number (MARKER, REQ_DIGITS wide once replaced), then the event's index.
    """

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.start_ms = int(time.time() * 1000)
        self.time_part = _crockford(self.start_ms, 10)

    def _id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.time_part}{MARKER.decode()}{index:06d}"

    def _layer(self, bucket: int) -> dict[str, Any]:
        arm = "control" if bucket < 500 else "treatment"
        return {
            "layerId": "layer_checkout",
            "bucket": bucket,
            "policyId": "pol_checkout_button",
            "policyKey": "checkout-button",
            "allocationId": f"alloc_{arm}",
            "allocationName": arm,
            "allocationKey": arm,
        }

    def events(self, count: int) -> list[dict[str, Any]]:
        """`count` events of mixed kinds; exposures and purchases cite an earlier decision."""
        rng = self.rng
        out: list[dict[str, Any]] = []
        decision_id = self._id("dec", 999_999)  # for a first event that is not a decision
        for index in range(count):
            kind = rng.choices(KINDS, WEIGHTS)[0]
            unit = f"user-{rng.randrange(1_000_000)}"
            bucket = rng.randrange(1000)
            color = "blue" if bucket < 500 else "green"
            common = {
                "orgId": "org_bench",
                "projectId": "proj_bench",
                "env": "production",
                "unitKey": unit,
                "timestamp": _iso_ms(self.start_ms + index),
            }
            if kind == "decision":
                decision_id = self._id("dec", index)
                event = {
                    "type": "decision",
                    "id": decision_id,
                    **common,
                    "requestedParameters": ["checkout.button_color"],
                    "assignments": {"checkout.button_color": color},
                    "layers": [self._layer(bucket)],
                    "latencyMs": rng.randrange(3),
                    "sdkName": SDK_NAME,
                    "sdkVersion": SDK_VERSION,
                    "configVersion": "2024-01-01T00:00:00.000Z",
                    "context": {"country": rng.choice(("DE", "FR", "US", "JP"))},
                }
            elif kind == "exposure":
                event = {
                    "type": "exposure",
                    "id": self._id("exp", index),
                    "decisionId": decision_id,
                    **common,
                    "assignments": {"checkout.button_color": color},
                    "layers": [self._layer(bucket)],
                    "sdkName": SDK_NAME,
                    "sdkVersion": SDK_VERSION,
                    "configVersion": "2024-01-01T00:00:00.000Z",
                    "context": {"country": rng.choice(("DE", "FR", "US", "JP"))},
                }
            elif kind == "purchase":
                price = round(rng.uniform(5, 200), 2)
                quantity = rng.randrange(1, 4)
                arm = "control" if bucket < 500 else "treatment"
                event = {
                    "type": "track",
                    "id": self._id("trk", index),
                    **common,
                    "event": "purchase",
                    "sdkName": SDK_NAME,
                    "sdkVersion": SDK_VERSION,
                    "value": price,
                    "values": {"revenue": price, "items": quantity},
                    "properties": {"sku": f"SKU-{rng.randrange(100)}", "quantity": quantity},
                    "decisionId": decision_id,
                    "attribution": [
                        {
                            "layerId": "layer_checkout",
                            "policyId": "pol_checkout_button",
                            "allocationName": arm,
                        }
                    ],
                }
            else:
                event = {
                    "type": "track",
                    "id": self._id("trk", index),
                    **common,
                    "event": "page_view",
                    "sdkName": SDK_NAME,
                    "sdkVersion": SDK_VERSION,
                    "properties": {"path": rng.choice(("/", "/cart", "/checkout", "/p/42"))},
                }
            out.append(event)
        return out


@dataclass(frozen=True)
class Template:
    """A whole HTTP request split at MARKER: `number.join(parts)` is one request."""

    parts: tuple[bytes, ...]
    events: int


def build_pool(scenario: Scenario, port: int, api_key: str, seed: int) -> list[Template]:
    factory = EventFactory(seed)
    pool = []
    for _ in range(scenario.pool):
        events = factory.events(scenario.events_per_request)
        # The SDK's encoder: json.dumps(..., separators=(",", ":")).
        body = json.dumps({"events": events}, separators=(",", ":")).encode()
        length = len(body) + body.count(MARKER) * (REQ_DIGITS - len(MARKER))
        head = (
            f"POST {PATH} HTTP/1.1\r\n"
            f"Host: {HOST}:{port}\r\n"
            "Accept: */*\r\n"
            "Accept-Encoding: gzip, deflate\r\n"
            "Connection: keep-alive\r\n"
            "User-Agent: python-httpx/0.28.1\r\n"
            "Content-Type: application/json\r\n"
            f"Authorization: Bearer {api_key}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        pool.append(Template(tuple((head + body).split(MARKER)), len(events)))
    return pool


# --- the load generator: raw HTTP/1.1 keep-alive on uvloop ------------------------------


class Load:
    """Shared state of all connections of one run: the next request, and the tallies."""

    def __init__(self, pool: list[Template], port: int, rate: float, result: Result) -> None:
        self.pool = pool
        self.port = port
        # Fixed-rate (open loop) runs: one request is due every interval_ns, whichever
        # connection is free takes it, and a late send counts against the server.
        self.interval_ns = int(1e9 / rate) if rate > 0 else 0
        self.next_slot_ns = time.perf_counter_ns()
        self.result = result
        self.seq = 0
        self.recording = False
        self.stopping = False
        self.busy: set[Connection] = set()
        self.drained: asyncio.Future[None] | None = None

    def request_bytes(self) -> tuple[bytes, int]:
        seq = self.seq
        self.seq = seq + 1
        template = self.pool[seq % len(self.pool)]
        return (b"%0*d" % (REQ_DIGITS, seq)).join(template.parts), template.events

    def answered(self, status: int, body: bytes, latency_ns: int, events: int) -> None:
        if not self.recording:
            return
        result = self.result
        result.requests += 1
        result.latencies_ns.append(latency_ns)
        if status == 200:
            result.events += events
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                result.written += orjson.loads(body).get("written", 0)
        else:
            result.errors += 1
            result.statuses[status] += 1

    def failed(self, reason: str) -> None:
        if self.recording:
            self.result.errors += 1
            self.result.statuses[reason] += 1

    def idle(self, conn: Connection) -> None:
        self.busy.discard(conn)
        if self.stopping and not self.busy and self.drained and not self.drained.done():
            self.drained.set_result(None)


class Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, read its answer, send the next."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole answer once its head is parsed
        self.body_at = 0
        self.status = 0
        self.started = 0
        self.events = 0
        self.in_flight = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        """Send the next request now, or at the next free slot of a fixed-rate run."""
        load = self.load
        if load.interval_ns:
            slot = load.next_slot_ns
            load.next_slot_ns = slot + load.interval_ns
            delay = (slot - time.perf_counter_ns()) / 1e9
            if delay > 0:
                load.busy.add(self)  # waiting for its slot counts as busy until stopped
                asyncio.get_running_loop().call_later(delay, self.fire, slot)
                return
            self.fire(slot)
        else:
            self.fire(time.perf_counter_ns())

    def fire(self, slot_ns: int) -> None:
        """Write one request; its latency counts from `slot_ns`, when it was due."""
        load = self.load
        if load.stopping or self.transport is None or self.transport.is_closing():
            self.in_flight = False
            load.idle(self)
            return
        data, self.events = load.request_bytes()
        self.in_flight = True
        load.busy.add(self)
        self.started = slot_ns
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            self.status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.load.failed("no content-length")
                assert self.transport is not None
                self.transport.close()
                return
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else len(head)])
            self.body_at = end + 4
            self.need = self.body_at + length
        if len(buffer) < self.need:
            return
        latency = time.perf_counter_ns() - self.started
        body = bytes(buffer[self.body_at : self.need])
        del buffer[: self.need]
        self.need = -1
        self.in_flight = False
        self.load.answered(self.status, body, latency, self.events)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        load = self.load
        if self.in_flight:
            load.failed("connection lost")
        self.in_flight = False
        self.transport = None
        load.idle(self)
        if not load.stopping:
            asyncio.get_running_loop().create_task(reconnect(load))


async def connect(load: Load, port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: Connection(load), HOST, port)


async def reconnect(load: Load) -> None:
    while not load.stopping:
        await asyncio.sleep(RECONNECT_DELAY_S)
        try:
            await connect(load, load.port)
            return
        except OSError:
            load.failed("connect refused")


async def drive(
    pool: list[Template], port: int, scenario: Scenario, server: Server, args: argparse.Namespace
) -> Result:
    """Warm up, then measure for the duration, with the scenario's connections to `port`."""
    result = Result(scenario=scenario.name, server=server.name, seconds=0.0)
    load = Load(pool, port, scenario.rate, result)
    load.drained = asyncio.get_running_loop().create_future()
    await asyncio.gather(*(connect(load, port) for _ in range(scenario.connections)))
    await asyncio.sleep(args.warmup)

    cpu_server = server.cpu_seconds()
    cpu_gen = time.process_time()
    cpu_machine = machine_busy_seconds()
    started = time.perf_counter()
    load.recording = True
    await asyncio.sleep(args.duration)
    load.recording = False
    result.seconds = time.perf_counter() - started
    result.server_cpu = (server.cpu_seconds() - cpu_server) / result.seconds
    result.gen_cpu = (time.process_time() - cpu_gen) / result.seconds
    machine = (machine_busy_seconds() - cpu_machine) / result.seconds
    result.other_cpu = max(0.0, machine - result.server_cpu - result.gen_cpu)

    load.stopping = True
    if load.busy:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(load.drained), DRAIN_TIMEOUT_S)
    if load.busy:  # sent but never answered: a stuck server
        result.errors += len(load.busy)
        result.statuses["no answer"] += len(load.busy)
    for conn in list(load.busy):
        if conn.transport is not None:
            conn.transport.abort()
    return result


# --- the servers ----------------------------------------------------------------------


@post(PATH, status_code=200)
async def bare_events(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The baseline: read the body, answer counts (one byte search, no parsing)."""
    body = await request.body()
    count = body.count(b'"type":"')
    return Response(
        content=b'{"accepted":%d,"written":%d}' % (count, count), media_type=MediaType.JSON
    )


@get("/healthz")
async def bare_healthz() -> Response[bytes]:
    return Response(content=b'{"status":"ok"}', media_type=MediaType.JSON)


def bare_app() -> Litestar:
    return Litestar(
        route_handlers=[bare_events, bare_healthz],
        request_max_body_size=10 * MIB,  # the collector's default max_body_bytes
    )


class RawBytes:
    """persist-queue serializer that stores the bytes it is given, unchanged (no pickle,
    as the collector stores its rows); written here so the reference owes nothing to the
    code it is compared with."""

    @staticmethod
    def dumps(value: bytes) -> bytes:
        return value

    @staticmethod
    def loads(value: bytes) -> bytes:
        return value


def durable_queue(directory: Path) -> SQLiteAckQueue:
    """A fresh persist-queue ack queue in `directory` that fsyncs every put.

    persist-queue 1.1 opens its own connections (`_new_db_connection`, WAL already) and
    writes through `_putter`, the second of them with `multithreading=True`; synchronous
    is a setting of each connection, so it is set there, and both settings are read back:
    a reference that silently skipped the fsync would flatter itself.
    """
    queue = SQLiteAckQueue(
        str(directory),
        multithreading=True,
        auto_commit=True,
        serializer=RawBytes,
    )
    putter = cast(sqlite3.Connection, queue._putter)
    mode = putter.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    putter.execute("PRAGMA synchronous=FULL")
    synchronous = putter.execute("PRAGMA synchronous").fetchone()[0]
    if mode != "wal" or synchronous != SQLITE_SYNCHRONOUS_FULL:
        raise RuntimeError(f"queue not durable: journal_mode={mode}, synchronous={synchronous}")
    return queue


def durable_app(queue_dir: Path) -> Litestar:
    """The bare app with a durable handler: the same limits and the same /healthz, so the
    only difference between the two references is the parse and the fsynced put."""
    queue = durable_queue(queue_dir)

    @post(PATH, status_code=200)
    async def durable_events(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The minimal durable pipeline: parse, then one fsynced put of the raw body.

        The put blocks the event loop on purpose: one commit per request, nothing grouped
        or moved off the loop, is the simplest thing that keeps its word.
        """
        body = await request.body()
        count = len(orjson.loads(body)["events"])
        queue.put(body)
        return Response(
            content=b'{"accepted":%d,"written":%d}' % (count, count), media_type=MediaType.JSON
        )

    return Litestar(
        route_handlers=[durable_events, bare_healthz],
        request_max_body_size=10 * MIB,  # the collector's default max_body_bytes
    )


def serve(app: Litestar, port: int) -> None:
    """Run `app` on the uvicorn options the collector uses, for every reference alike."""
    import uvicorn

    uvicorn.run(
        app,
        host=HOST,
        port=port,
        log_level="info",
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=30,
    )


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the bench dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    try:
        ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # without guest time


def process_tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of process `root` and of all its descendants alive now.

    Each process also brings what its exited, waited-for children used (cutime, cstime),
    so a child that ends between two readings moves its time rather than losing it.
    """
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(n) for n in fields[11:15])  # utime, stime, cutime, cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess on 127.0.0.1, its log in the run's temporary directory."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], workdir: Path, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.port = free_port()
        self.argv += ["--port", str(self.port)]
        self.log_path = workdir / f"{name.replace('/', '-')}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""  # ready once /healthz answers and the log holds this line

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops us in order
                preexec_fn=_die_with_parent,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1) as s:
                s.sendall(request)
                if s.recv(64).startswith(b"HTTP/1.1 200") and self.ready_line in self.log_tail():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) and its children:
        the collector commits in a queue writer process, which is part of its cost."""
        assert self.proc is not None
        return process_tree_cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def child_env() -> dict[str, str]:
    """The environment without COLLECTOR_* settings, so the collector runs on defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}


def tree_env(tree: Path) -> dict[str, str]:
    """`child_env` importing the collector from `tree` before this virtualenv's editable
    install of this tree (which Python consults last), in the server and its children."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


def collector_server(
    workdir: Path, tree: Path = ROOT, env: dict[str, str] | None = None, name: str = "collector"
) -> tuple[Server, str]:
    """A collector of `tree` on a fresh data dir, default settings, and a new sdk:write key
    (made by that tree's own `keys create`: the key file's format may differ between
    commits)."""
    env = child_env() if env is None else env
    data_dir = workdir / "data"
    config = workdir / "collector.toml"
    # Never /etc/collector/collector.toml; and a disk budget the run cannot reach, since
    # it measures ingest, not the budget's 503s: the default 1 GiB (seen-ids.db counted)
    # filled in 15 s at 100,000 events/s.
    config.write_text(f"disk_budget_bytes = {BENCH_DISK_BUDGET_BYTES}\n")
    common = ["--config", str(config), "--data-dir", str(data_dir)]
    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--scope", "sdk:write", *common],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = created.stdout.strip().splitlines()[-1]
    server = Server(name, [sys.executable, "-m", "cli", "serve", *common], env, workdir, tree)
    return server, api_key


def new_collector_server(workdir: Path, args: argparse.Namespace) -> tuple[Server, str]:
    """This tree's collector, run as it always was (no PYTHONPATH: the editable install)."""
    return collector_server(workdir)


def workers_collector_server(workdir: Path, args: argparse.Namespace) -> tuple[Server, str]:
    """This tree's collector with `workers = --workers` server processes."""
    env = {**child_env(), "COLLECTOR_WORKERS": str(args.workers)}
    server, key = collector_server(workdir, env=env, name=SERVER_NAMES["workers"])
    server.ready_line = "serving on"  # /healthz answers once the first worker does
    return server, key


def old_collector_server(workdir: Path, args: argparse.Namespace) -> tuple[Server, str]:
    """The collector of --old-tree (parse_args made it absolute and checked its cli.py)."""
    tree = cast(Path, args.old_tree)
    return collector_server(workdir, tree, tree_env(tree), SERVER_NAMES["old"])


def durable_server(workdir: Path, args: argparse.Namespace) -> tuple[Server, str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-durable",
        "--queue-dir",
        str(workdir / "queue"),  # fresh: each run has its own workdir
    ]
    return Server(SERVER_NAMES["durable"], argv, child_env(), workdir), "traffical_sk_bench"


def bare_server(workdir: Path, args: argparse.Namespace) -> tuple[Server, str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare"]
    return Server(SERVER_NAMES["bare"], argv, child_env(), workdir), "traffical_sk_bench"


# How each --servers kind is started: the server (not yet running) and the key to send.
SERVER_FACTORIES: dict[str, Callable[[Path, argparse.Namespace], tuple[Server, str]]] = {
    "collector": new_collector_server,
    "workers": workers_collector_server,
    "old": old_collector_server,
    "durable": durable_server,
    "bare": bare_server,
}


# --- running and reporting --------------------------------------------------------------


def run_one(scenario: Scenario, kind: str, tmp_root: Path, args: argparse.Namespace) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{kind}-", dir=tmp_root))
    server, api_key = SERVER_FACTORIES[kind](workdir, args)
    try:
        server.start()
        assert server.proc is not None
        note(
            f"{scenario.name}: {server.name} (pid {server.proc.pid}, port {server.port}), "
            f"{scenario.connections} connections, {scenario.pace()}, warm-up {args.warmup:g} s, "
            f"measuring {args.duration:g} s"
        )
        pool = build_pool(scenario, server.port, api_key, seed=args.seed)
        result = uvloop.run(drive(pool, server.port, scenario, server, args))
        if not server.alive():
            result.server_died = True
            note(f"{server.name} died during the run:\n{server.log_tail()}")
        return result
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def note(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync cost depends on it)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# The ratios block: for each reference kind, the figures of the collector divided by that
# reference's, in the order printed, and how each figure is read from a Result.
RATIOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bare", ("events/s", "req/s")),
    ("durable", ("events/s", "req/s", "p99")),
    ("old", ("ms/req", "events/s")),
    ("collector", ("events/s", "req/s")),  # workers against one server process
)
FIGURES: dict[str, Callable[[Result], float]] = {
    "events/s": lambda r: r.events_s,
    "req/s": lambda r: r.requests_s,
    "p99": lambda r: r.percentile_ms(0.99),
    "ms/req": lambda r: r.cpu_ms_per_request,
}


def ratio_lines(results: list[Result]) -> list[str]:
    """`scenario: collector/kind figure ratio` for every reference run beside the collector;
    a ratio without a denominator (nothing answered) reads n/a. With several rounds, each
    ratio is the median of the rounds' ratios, each round's after it."""
    rounds = sorted({r.round for r in results})
    each = [round_ratios([r for r in results if r.round == k]) for k in rounds]
    lines = []
    for name in each[0]:
        values = [ratios.get(name, math.nan) for ratios in each]
        line = f"{name} {_ratio(statistics.median(values))}"
        if len(values) > 1:
            line += f" (median of {len(values)} rounds: {', '.join(map(_ratio, values))})"
        lines.append(line)
    return lines


def _ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def round_ratios(results: list[Result]) -> dict[str, float]:
    """The ratios of one round, by name (`scenario: collector/kind figure`); NaN: n/a."""
    by_name = {(r.scenario, r.server): r for r in results}
    ratios: dict[str, float] = {}
    for scenario in dict.fromkeys(r.scenario for r in results):
        for ours in ("collector", "workers"):
            collector = by_name.get((scenario, SERVER_NAMES[ours]))
            if collector is None:
                continue
            for kind, figures in RATIOS:
                reference = by_name.get((scenario, SERVER_NAMES[kind]))
                if reference is None or kind == ours:
                    continue
                for figure in figures:
                    num, den = FIGURES[figure](collector), FIGURES[figure](reference)
                    ok = den > 0 and math.isfinite(num) and math.isfinite(den)
                    name = f"{scenario}: {SERVER_NAMES[ours]}/{kind} {figure}"
                    ratios[name] = num / den if ok else math.nan
    return ratios


def report(results: list[Result], args: argparse.Namespace, tmp_root: Path) -> None:
    print()
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}")
    print(
        f"python {platform.python_version()} ({sys.executable}); litestar "
        f"{version_of('litestar')}, uvicorn {version_of('uvicorn')}, uvloop "
        f"{version_of('uvloop')}, httptools {version_of('httptools')}, persist-queue "
        f"{version_of('persist-queue')}, SQLite {sqlite3.sqlite_version}"
    )
    print(
        f"data dir on {filesystem_of(tmp_root)} ({tmp_root}); collector settings: defaults "
        f"(sync=full); warm-up {args.warmup:g} s, measured {args.duration:g} s per row"
    )
    if args.old_tree is not None:
        print(f"old collector: the tree in {args.old_tree}, run with the same settings")
    print()
    width = max([len("scenario")] + [len(SCENARIOS[r.scenario].label()) for r in results])
    header = (
        f"{'scenario':<{width}} {'server':<14} {'req/s':>9} {'events/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7} {'srv CPU':>8} {'ms/req':>7} {'gen CPU':>8} {'other':>6} "
        f"{'coll/bare':>9}"
    )
    print(header)
    print("-" * len(header))
    bare = {(r.scenario, r.round): r for r in results if r.server == SERVER_NAMES["bare"]}
    for r in results:
        scenario = SCENARIOS[r.scenario]
        label = scenario.label()
        ratio = ""
        base = bare.get((r.scenario, r.round))
        ours = r.server in (SERVER_NAMES["collector"], SERVER_NAMES["workers"])
        if ours and base is not None and base.requests_s:
            ratio = f"{r.requests_s / base.requests_s:.2f}"
        print(
            f"{label:<{width}} {r.server:<14} {r.requests_s:>9,.0f} {r.events_s:>10,.0f} "
            f"{r.percentile_ms(0.50):>8.2f} {r.percentile_ms(0.99):>8.2f} {r.errors:>7} "
            f"{r.server_cpu:>8.0%} {r.cpu_ms_per_request:>7.3f} {r.gen_cpu:>8.0%} "
            f"{r.other_cpu:>6.0%} {ratio:>9}"
        )
    print()
    print("srv CPU, gen CPU: CPU time of the server process (all threads, and its children")
    print("such as the collector's queue writer) and of this load generator per wall second,")
    print("100% = one core; ms/req: server CPU time per request (steadier than req/s on a busy")
    print("machine); other: the rest of the machine's busy time (kernel, other programs; high")
    print("values mean a noisy run). coll/bare: collector requests/s (and so events/s) divided")
    print("by the bare endpoint's in the same scenario.")
    lines = ratio_lines(results)
    if lines:
        print()
        print("ratios (the collector's figure divided by the reference's, same scenario):")
        for line in lines:
            print(line)
    for r in results:
        if r.statuses:
            detail = ", ".join(f"{k}: {v}" for k, v in r.statuses.most_common())
            print(f"errors of {r.scenario} on {r.server}: {detail}")
        if r.server_died:
            print(f"{r.server} died during {r.scenario}")
        collectors = (SERVER_NAMES["collector"], SERVER_NAMES["workers"], SERVER_NAMES["old"])
        if r.server in collectors and r.written != r.events:
            print(
                f"warning: {r.scenario} on the {r.server} wrote {r.written} of {r.events} "
                f"accepted events (duplicates?)"
            )
    checks = []
    for r in results:
        if r.server != SERVER_NAMES["collector"]:
            continue
        p99 = r.percentile_ms(0.99)
        if r.scenario == "batch":
            ok = r.events_s >= TARGET_BATCH_EVENTS_S and p99 < TARGET_P99_MS and not r.errors
            checks.append(
                f"batch:  >= {TARGET_BATCH_EVENTS_S:,} events/s, p99 < {TARGET_P99_MS:g} ms, "
                f"no errors: {'PASS' if ok else 'FAIL'} ({r.events_s:,.0f} events/s, "
                f"p99 {p99:.1f} ms)"
            )
        elif r.scenario == "single":
            ok = r.requests_s >= TARGET_SINGLE_REQUESTS_S and p99 < TARGET_P99_MS and not r.errors
            checks.append(
                f"single: >= {TARGET_SINGLE_REQUESTS_S:,} requests/s, p99 < {TARGET_P99_MS:g} "
                f"ms, no errors: {'PASS' if ok else 'FAIL'} ({r.requests_s:,.0f} requests/s, "
                f"p99 {p99:.1f} ms)"
            )
    if checks:
        print()
        print("collector targets (2-core reference machine):")
        for line in checks:
            print("  " + line)


SCENARIOS: dict[str, Scenario] = {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Collector ingest throughput and latency against reference servers.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--scenarios", default="batch,single", help="comma separated: batch, single"
    )
    parser.add_argument(
        "--servers",
        default=None,
        help="comma separated: collector, workers, old, durable, bare (default: collector, "
        "durable, bare, and old after collector when --old-tree is given)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="server processes of the `workers` server"
    )
    parser.add_argument(
        "--old-tree",
        type=Path,
        default=None,
        help="a checkout of an older commit of this repository, run as the `old` server",
    )
    parser.add_argument("--batch-events", type=int, default=1000, help="events per batch request")
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--single-connections", type=int, default=64)
    parser.add_argument(
        "--batch-rate",
        type=float,
        default=0.0,
        help="offer this many batch requests/s (open loop; latency counts from when each "
        "request was due); default 0: closed loop, as fast as the server answers",
    )
    parser.add_argument(
        "--single-rate", type=float, default=0.0, help="the same for single-event requests"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each scenario's servers this many times in turn; each ratio printed is the "
        "median of the rounds' (a shared machine's speed drifts between rows)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated events")
    parser.add_argument(
        "--tmp-dir", type=Path, default=None, help="where data dirs go (default: system tmp)"
    )
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-durable", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queue-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    SCENARIOS["batch"] = Scenario(
        "batch", args.batch_events, args.batch_connections, BATCH_POOL, args.batch_rate
    )
    SCENARIOS["single"] = Scenario(
        "single", 1, args.single_connections, SINGLE_POOL, args.single_rate
    )
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.servers is None:
        args.server_list = list(DEFAULT_SERVERS if args.old_tree is None else WITH_OLD_SERVERS)
    else:
        args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in args.scenario_list:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    for name in args.server_list:
        if name not in SERVER_NAMES:
            parser.error(f"unknown server {name!r}")
    if args.old_tree is not None:
        args.old_tree = args.old_tree.resolve()  # the server runs with it as working directory
        if not (args.old_tree / "cli.py").is_file():
            parser.error(f"--old-tree {args.old_tree}: no cli.py there (not a checkout?)")
    elif "old" in args.server_list:
        parser.error("the old server needs --old-tree")
    if args.serve_durable and args.queue_dir is None:
        parser.error("--serve-durable needs --queue-dir")
    return args


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the bench like Ctrl-C, so `finally` blocks clean up."""

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare:
        serve(bare_app(), args.port)
        return 0
    if args.serve_durable:
        serve(durable_app(args.queue_dir), args.port)
        return 0
    tmp_root = Path(tempfile.mkdtemp(prefix="collector-bench-", dir=args.tmp_dir))
    results: list[Result] = []
    try:
        with stopped_by_signals():
            for name in args.scenario_list:
                for round_no in range(args.rounds):
                    for kind in args.server_list:
                        result = run_one(SCENARIOS[name], kind, tmp_root, args)
                        result.round = round_no
                        results.append(result)
    except KeyboardInterrupt:
        note("interrupted; servers stopped and temporary files removed")
        return 130
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report(results, args, tmp_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
