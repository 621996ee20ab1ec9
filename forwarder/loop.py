"""The forwarder: take rows from the queue, batch their events, send, then ack or dead-letter.

    feed     take rows (non-blocking gets at a short interval: a blocking get does not see
             another process's put for up to 10 s), drop those past the maximum age into
             the dead-letter store, and sort events into batches per (project, env), since
             upstream keys are scoped to one project and environment; events keep the
             bytes the server stored (a row splits by line), and a row whose events all
             share one (project, env) is sorted without parsing them (`shared_key`)
    send     `forward_in_flight` senders post batches (gzip, a batch id that stays the same
             across retries); `upstream.py` classifies the answer:
               Delivered    settle the batch's events
               RetryLater   back off (full jitter, Retry-After); in an outage, one probe
               Rejected     split the batch in halves until the offending events are
                            alone; those go to the dead-letter store with the answer
               KeyRejected  stop sending, keep everything, say so; resume on reload (SIGHUP)
    settle   a row is acknowledged (deleted from the queue) once every one of its events
             is delivered or dead-lettered

Delivery is at-least-once: a row is deleted only after all its events are settled, so a
forwarder killed mid-send sends the unsettled rows again on restart (persist-queue's
`auto_resume` makes its in-flight rows ready again; only the forwarder opens the queue so).
On stop: no new rows are taken, in-flight requests get `stop_timeout_seconds` to finish,
and rows not fully settled are made ready again.

A queue or dead-letter write that fails (the disk full, the file locked) never ends the
forwarder: it is tried again, at growing intervals, until it succeeds or the forwarder
stops (`_queue_op`). On a full disk its acks are what free space, so giving up on them
would leave the collector stuck; and a row is acked only after its events' dead letters
are written, so a failure in between costs a resend, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sqlite3
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from collector import heartbeat, notify
from collector.counts import Counts
from collector.deadletters import DeadLetters
from collector.errors import Unavailable
from collector.settings import Settings
from collector.spool import Row, Spool
from forwarder.backoff import Backoff, Outage
from forwarder.upstream import Delivered, KeyRejected, Rejected, Result, RetryLater, Upstream

log = logging.getLogger("collector.forwarder")

# The events API takes at most 1000 events per request.
MAX_BATCH_EVENTS = 1000
# How soon a row committed by the server is seen when the queue was empty.
POLL_INTERVAL_S = 0.05
# A batch that has not filled up is sent after this long, so a trickle of events for one
# project is not held back by a flood for another.
LINGER_S = 0.5
# gzip level 1: ~5x smaller on event JSON at a fraction of the default level's CPU, which
# matters more here (one core drains the queue) than the last few percent of bytes.
GZIP_LEVEL = 1
# Events that the feeder may hold in partly built batches and the hand-off queue, past
# which it stops taking rows: memory stays flat however large the backlog.
MAX_BUFFERED_EVENTS = 20_000
# How often a forwarder started by `collector run` checks that `run` is still there.
PARENT_CHECK_S = 0.5
# A batch's body is `{"events":[` + its events joined by commas + `]}`; `Batch.size` counts
# one comma per event, one too many, so it starts at the envelope's length less one.
BODY_OVERHEAD = len(b'{"events":[]}') - 1
LOCK_FILE = "forwarder.lock"
# How often the forwarder writes its counts to counts.db (and so how fresh status is).
COUNTS_FLUSH_S = 1.0
# Upstream answers as counted in `upstream_requests`.
OUTCOME = {
    Delivered: "delivered",
    RetryLater: "retry",
    Rejected: "rejected",
    KeyRejected: "key_rejected",
}
STATE_NAME = "forwarder"
# A queue or dead-letter write that failed (disk full, file locked) is tried again after
# this long, doubling up to the maximum: soon enough to resume as soon as space returns,
# seldom enough that the log shows a line every few seconds, not a flood.
QUEUE_RETRY_FIRST_S = 0.1
QUEUE_RETRY_MAX_S = 5.0

T = TypeVar("T")

BatchKey = tuple[str, str]  # (project, env)


class AlreadyRunning(Exception):
    """Another forwarder holds this data directory's lock."""


class _Stopping(Exception):
    """Raised in a sender waiting to retry when the forwarder stops: leave the batch."""


@dataclass
class Batch:
    """Events for one (project, env), each with the queue row it came from."""

    key: BatchKey
    events: list[bytes] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    size: int = BODY_OVERHEAD  # the body's length in bytes
    started: float = field(default_factory=time.monotonic)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def add(self, raw: bytes, row_id: int) -> None:
        self.events.append(raw)
        self.rows.append(row_id)
        self.size += len(raw) + 1

    def body(self) -> bytes:
        return b'{"events":[' + b",".join(self.events) + b"]}"

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.events) // 2
        return self._part(0, middle), self._part(middle, len(self.events))

    def _part(self, start: int, end: int) -> Batch:
        part = Batch(self.key)
        for raw, row in zip(self.events[start:end], self.rows[start:end], strict=True):
            part.add(raw, row)
        return part


@dataclass
class Stats:
    """What the forwarder did since it started (for its state file and the log)."""

    forwarded: int = 0
    retried: int = 0
    dead_lettered: int = 0
    last_success: float | None = None
    state: str = "starting"
    message: str = ""
    since: float = field(default_factory=time.time)

    def set(self, state: str, message: str = "") -> bool:
        """Record a new state; True when it changed (worth a log line)."""
        changed = (state, message) != (self.state, self.message)
        if state != self.state:
            self.since = time.time()
        self.state, self.message = state, message
        return changed


class KeyChooser:
    """The upstream key for a batch's (project, env): exact, then project-wide, then default."""

    def __init__(self, default: str | None, scoped: dict[tuple[str, str | None], str]) -> None:
        self._default = default
        self._scoped = scoped

    def key_for(self, project: str, env: str) -> str | None:
        return (
            self._scoped.get((project, env)) or self._scoped.get((project, None)) or (self._default)
        )


class Forwarder:
    def __init__(self, settings: Settings, load_keys: Callable[[], KeyChooser]) -> None:
        self.settings = settings
        self._load_keys = load_keys
        self._keys = load_keys()
        # Acks need no fsync of their own: if a power cut loses one, the row is sent again
        # (a duplicate), never lost. The server's commits keep their own `sync` setting.
        self.spool = Spool(
            settings.data_dir,
            sync="normal",
            budget_bytes=settings.disk_budget_bytes,
            resume_in_flight=True,
            recover=True,  # a corrupt file is moved aside (collector.recovery)
        )
        self.dead = DeadLetters(settings.data_dir, recover=True)
        self.counts = Counts(settings.data_dir, settings.counts_window_minutes, recover=True)
        self.stats = Stats()
        self._outage = Outage()
        self._pending: dict[int, int] = {}  # row id -> events not yet settled
        self._batches: asyncio.Queue[Batch] = asyncio.Queue(maxsize=settings.forward_in_flight)
        self._buffered = 0
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._key_fixed = asyncio.Event()
        self._blocked: set[BatchKey] = set()  # (project, env) whose key the upstream refused
        self._upstream: Upstream | None = None

    # --- life cycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Forward until `stop()`; then leave what is not settled ready in the queue."""
        beat = asyncio.create_task(self._beat())
        try:
            if not self.settings.upstream_url:
                self._say("not_configured", "no upstream_url: events stay queued", logging.WARNING)
                await self._stopping.wait()
                return
            self._upstream = Upstream(
                self.settings.upstream_url,
                self.settings.forward_timeout_seconds,
                user_agent="traffical-collector",
            )
            self._say("ok", f"forwarding to {self._upstream.url}")
            await self._forward()
        finally:
            beat.cancel()
            await self._close()

    def stop(self) -> None:
        if not self._stopping.is_set():
            notify.notify("STOPPING=1")
        self._stopping.set()

    def reload(self) -> None:
        """Re-read the upstream keys (SIGHUP) and resume if a key was rejected."""
        try:
            self._keys = self._load_keys()
        except Exception as exc:
            log.error("reload failed, keeping the old keys: %s", exc)
            return
        log.info("upstream keys reloaded")
        self._key_fixed.set()

    async def _forward(self) -> None:
        senders = [
            asyncio.create_task(self._send_loop()) for _ in range(self.settings.forward_in_flight)
        ]
        await self._feed()
        # Stopping: in-flight requests get the stop timeout, the rest stay queued.
        _, unfinished = await asyncio.wait(senders, timeout=self.settings.stop_timeout_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)

    async def _close(self) -> None:
        if self._upstream is not None:
            await self._upstream.aclose()
        unsettled = list(self._pending)
        if unsettled:
            try:
                await asyncio.to_thread(self.spool.nack, unsettled)
                log.info("stopped with %d queue rows unsettled; they stay queued", len(unsettled))
            except (Unavailable, sqlite3.Error) as exc:
                # Still in flight in the file: the next forwarder makes them ready again.
                log.warning("could not release %d queue rows (%s)", len(unsettled), exc)
        self._write_state()
        await self._write_counts()
        self.counts.close()
        self.spool.close()
        self.dead.close()

    # --- feed: rows into batches ----------------------------------------------------

    async def _feed(self) -> None:
        with contextlib.suppress(_Stopping):
            await self._feed_until_stopped()

    async def _feed_until_stopped(self) -> None:
        building: dict[BatchKey, Batch] = {}
        while not self._stopping.is_set():
            if self._buffered >= MAX_BUFFERED_EVENTS:
                # Send what is partly built (it may be all that holds the buffer), then
                # wait for senders to settle events.
                await self._hand_off_all(building)
                self._room.clear()
                if self._buffered >= MAX_BUFFERED_EVENTS:
                    await self._wait(self._room, None)
                continue
            row = await self._queue_op("take a row", self.spool.take)
            if row is None:
                await self._hand_off_all(building)
                await self._wait(self._stopping, POLL_INTERVAL_S)
                continue
            for batch in await self._sort(row, building):
                await self._hand_off(batch)
            for key, batch in list(building.items()):
                if time.monotonic() - batch.started > LINGER_S:
                    await self._hand_off(building.pop(key))

    async def _sort(self, row: Row, building: dict[BatchKey, Batch]) -> list[Batch]:
        """Put a row's events into batches; returns the batches it filled."""
        events = row.lines()
        if time.time() - row.queued_at > self.settings.max_event_age_seconds:
            await self._dead_letter(
                events,
                f"older than the maximum age ({self.settings.max_event_age_seconds:g} s)",
                "max_age",
            )
            await self._queue_op("ack a row", lambda: self.spool.ack([row.id]))
            return []
        self._pending[row.id] = len(events)
        self._buffered += len(events)
        shared = shared_key(row.data, events)
        full = []
        for raw in events:
            key = shared or _key_of(raw)
            batch = building.get(key)
            if batch is not None and batch.size + len(raw) > self.settings.forward_batch_bytes:
                full.append(building.pop(key))
                batch = None
            if batch is None:
                batch = building[key] = Batch(key)
            batch.add(raw, row.id)
            if len(batch.events) >= MAX_BATCH_EVENTS:
                full.append(building.pop(key))
        return full

    async def _hand_off(self, batch: Batch) -> None:
        """Queue `batch` for a sender; on stop, give up (its rows are made ready again)."""
        if batch.events:
            putting = asyncio.ensure_future(self._batches.put(batch))
            await self._wait_for(putting)
            if not putting.done():
                putting.cancel()

    async def _hand_off_all(self, building: dict[BatchKey, Batch]) -> None:
        for key in list(building):
            await self._hand_off(building.pop(key))

    # --- send ------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Deliver batches until stopping; a batch left mid-retry stays queued."""
        while not self._stopping.is_set():
            getting = asyncio.ensure_future(self._batches.get())
            await self._wait_for(getting)
            if not getting.done():
                getting.cancel()
                return
            try:
                await self._deliver(getting.result())
            except _Stopping:
                return

    async def _deliver(self, batch: Batch) -> None:
        """Send `batch` until each of its events is delivered or dead-lettered."""
        todo = [batch]
        while todo:
            part = todo.pop()
            result = await self._send(part)
            if isinstance(result, Rejected) and len(part.events) > 1:
                first, second = part.halves()
                todo += [second, first]
                continue
            if isinstance(result, Rejected):
                await self._dead_letter(
                    part.events, f"rejected by upstream: {result.reason}", "rejected"
                )
            else:
                self.stats.forwarded += len(part.events)
                self.stats.last_success = time.time()
                self.counts.add("forwarded", part.key, len(part.events))
            await self._settle(part)

    async def _send(self, batch: Batch) -> Delivered | Rejected:
        """Post `batch` until the upstream gives an answer about its events."""
        assert self._upstream is not None
        body = await asyncio.to_thread(zlib.compress, batch.body(), GZIP_LEVEL, 31)
        backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        while True:
            key = self._keys.key_for(*batch.key)
            if key is None:
                result: Result = KeyRejected(0, f"no upstream key for {_where(batch.key)}")
            else:
                holds_probe = await self._outage.acquire()
                try:
                    result = await self._upstream.send(body, key, batch.id)
                finally:
                    self._outage.release(holds_probe)
                self.counts.add("upstream_requests", (OUTCOME[type(result)],))
            if isinstance(result, RetryLater):
                self._outage.failed()
                self.stats.retried += 1
                delay = backoff.next_delay(result.retry_after)
                if not self._blocked:
                    self._say("retrying", f"{result.reason}; next try in {delay:.1f} s")
                await self._wait(self._stopping, delay)
                if self._stopping.is_set():
                    raise _Stopping
                continue
            if isinstance(result, KeyRejected):
                self._blocked.add(batch.key)
                self._say(
                    "key_rejected",
                    f"upstream refused the key for {_where(batch.key)} ({result.reason}); "
                    "sending stopped, events kept; fix the key, then reload (SIGHUP) or restart",
                    logging.ERROR,
                )
                self._key_fixed.clear()
                await self._wait(self._key_fixed, None)
                if self._stopping.is_set():
                    raise _Stopping
                continue
            self._blocked.discard(batch.key)
            self._outage.succeeded()
            if not self._blocked:
                self._say("ok", "")
            return result

    # --- settle ----------------------------------------------------------------------

    async def _settle(self, batch: Batch) -> None:
        """Count the batch's events as done; ack the rows that are now complete."""
        done = []
        for row_id, count in Counter(batch.rows).items():
            self._pending[row_id] -= count
            if self._pending[row_id] == 0:
                del self._pending[row_id]
                done.append(row_id)
        self._buffered -= len(batch.events)
        self._room.set()
        if done:
            await self._queue_op("ack rows", lambda: self.spool.ack(done))

    async def _dead_letter(self, events: list[bytes], reason: str, kind: str) -> None:
        count = await self._queue_op("write dead letters", lambda: self.dead.add(events, reason))
        self.stats.dead_lettered += count
        self.counts.add("dead_lettered", (kind,), count)
        # Not `reason`: an upstream's refusal may quote the events, which stay out of logs.
        log.warning("dead-lettered %d events (%s; the reason: collector dlq list)", count, kind)

    async def _queue_op(self, what: str, operation: Callable[[], T]) -> T:
        """`operation()` in a thread, tried again while the queue cannot be written;
        raises _Stopping when the forwarder stops first."""
        delay = QUEUE_RETRY_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(operation)
            except (Unavailable, sqlite3.Error) as exc:
                log.warning("could not %s (%s); trying again in %.1f s", what, exc, delay)
            await self._wait(self._stopping, delay)
            if self._stopping.is_set():
                raise _Stopping
            delay = min(delay * 2, QUEUE_RETRY_MAX_S)

    # --- state -----------------------------------------------------------------------

    def _say(self, state: str, message: str, level: int = logging.INFO) -> None:
        if self.stats.set(state, message):
            if message:
                log.log(level, "upstream %s: %s", state, message)
            self._write_state()

    def _write_state(self) -> None:
        stats = self.stats
        with contextlib.suppress(OSError):
            heartbeat.write(
                heartbeat.state_path(self.settings.data_dir, STATE_NAME),
                {
                    "upstream": stats.state,
                    "message": stats.message,
                    "since": stats.since,
                    "outage_since": self._outage.since,
                    "last_success": stats.last_success,
                    "forwarded": stats.forwarded,
                    "retried": stats.retried,
                    "dead_lettered": stats.dead_lettered,
                    "upstream_url": self.settings.upstream_url,
                },
            )

    async def _beat(self) -> None:
        """Every second write the counts; every few, the state file (the heartbeat)."""
        beat = 0.0
        while True:
            await self._write_counts()
            if time.monotonic() - beat >= heartbeat.BEAT_EVERY_S:
                beat = time.monotonic()
                self._write_state()
            await asyncio.sleep(COUNTS_FLUSH_S)

    async def _write_counts(self) -> None:
        try:
            await asyncio.to_thread(self.counts.write, self.counts.take())
        except Exception as exc:  # counts are worth a warning, never the forwarder
            log.warning("could not write counts: %s", exc)

    async def _wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Wait for `event` (or for stop), at most `timeout` seconds."""
        waiting = asyncio.ensure_future(event.wait())
        await self._wait_for(waiting, timeout)
        waiting.cancel()

    async def _wait_for(self, task: asyncio.Future[Any], timeout: float | None = None) -> None:
        """Wait until `task` is done, the forwarder stops, or `timeout` passes."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({task, stopping}, timeout=timeout, return_when="FIRST_COMPLETED")
        stopping.cancel()


def _where(key: BatchKey) -> str:
    return f"project {key[0]!r}, env {key[1]!r}"


def _key_of(raw: bytes) -> BatchKey:
    event = orjson.loads(raw)
    return (str(event.get("projectId")), str(event.get("env")))


def shared_key(data: bytes, events: list[bytes]) -> BatchKey | None:
    """The (project, env) of all of a row's `events` when they share one that can be
    read off the row's bytes without parsing each event; else None.

    Parsing every event only to learn its project and environment was a third of the
    forwarder's time. Every event in the queue is orjson's compact output (the server's
    `ingest.encode`; `Spool.append` requires it), so a key and its string value are
    written `"name":"value"`. Without a backslash in the row, every quote delimits a string, so
    `"projectId":"` occurs once per top-level `projectId` (a required string) and once per
    nested one; as many occurrences as events means none is nested, and then as many of
    the first event's `"projectId":"<value>"` means every event has that value. The same
    goes for `env`.
    """
    count = len(events)
    if b"\\" in data or data.count(b'"projectId":"') != count or data.count(b'"env":"') != count:
        return None
    key = _key_of(events[0])
    for name, value in zip((b"projectId", b"env"), key, strict=True):
        pair = b'"' + name + b'":' + orjson.dumps(value)
        if data.count(pair) != count:
            return None
    return key


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[IO[str]]:
    """Hold the data directory's forwarder lock: two consumers would take the same rows."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AlreadyRunning(f"another forwarder is running on {data_dir}") from exc
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield lock


def key_chooser(settings_loader: Callable[[], Settings]) -> Callable[[], KeyChooser]:
    """A loader of the upstream keys from freshly read settings (for start and SIGHUP)."""

    def load() -> KeyChooser:
        settings = settings_loader()
        return KeyChooser(settings.upstream_key_value(), settings.project_key_values())

    return load


async def run(
    settings: Settings, load_settings: Callable[[], Settings], parent_pid: int | None = None
) -> None:
    """Run the forwarder until SIGTERM or SIGINT (or `parent_pid` is gone); SIGHUP reloads
    the upstream keys."""
    with exclusive(settings.data_dir):
        forwarder = Forwarder(settings, key_chooser(load_settings))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, forwarder.stop)
        loop.add_signal_handler(signal.SIGINT, forwarder.stop)
        loop.add_signal_handler(signal.SIGHUP, forwarder.reload)
        helpers = [asyncio.create_task(notify.keep_watchdog_fed())]
        if parent_pid:
            helpers.append(asyncio.create_task(_stop_without(parent_pid, forwarder)))
        notify.notify("READY=1")
        await forwarder.run()
        for task in helpers:
            task.cancel()


async def _stop_without(parent_pid: int, forwarder: Forwarder) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("the collector that started this forwarder is gone; stopping")
    forwarder.stop()
