"""The forwarder: take rows from the queue, batch their events, send, then ack or dead-letter.

    feed     take rows (non-blocking gets at a short interval: a blocking get does not see
             another process's put for up to 10 s), and sort events into batches per
             upstream key (`batch.py`): the targets (project, env) that share a key share
             requests, so many small projects cost no more requests than one large one; a
             row names each event's target and length (`collector.store.rows`), so its
             bytes are sliced out, never parsed
    send     `forward_in_flight` senders post batches (gzip, a batch id that stays the same
             across retries) to the sink (`sink.py`), which says what the answer means:
               Delivered    settle the batch's events
               RetryLater   back off (full jitter, Retry-After); in an outage, one probe
               Rejected     split the batch in halves until the offending events are
                            alone; those go to the dead-letter store with the answer
               Delivered    a 2xx: the events it names as rejected are dead-lettered, the
                            ones it leaves unexplained counted as unconfirmed
               KeyRejected  split a batch of several targets by target (a key may be refused
                            for some of them only); a target's own refused batch is
                            parked, kept in memory (bounded) until a reload (SIGHUP),
                            while the senders go on with every other key's; say so
    settle   a row is acknowledged (deleted from the queue) once every one of its events
             is delivered or dead-lettered, and what they came to is added to the
             outcomes ledger in the same transaction (`collector.store.ledger`)

Delivery is at-least-once: a row is deleted only after all its events are settled, so a
forwarder killed mid-send sends the unsettled rows again on restart (persist-queue's
`auto_resume` makes its in-flight rows ready again; only the forwarder opens the queue so).
On stop: no new rows are taken, in-flight requests get `stop_timeout_seconds` to finish,
and rows not fully settled are made ready again.

An event goes to the dead-letter store for its age only once delivery was tried and
failed: a batch whose oldest event is past `max_event_age_seconds` when an attempt fails.
A row found that old is still sent first. Ages are measured on `collector.store.clock`,
which a step of the wall clock does not move: a step forward expires no fresh event, a
step back keeps no old one longer.

An unexpected exception while sending is a retry, logged with its traceback and shown in
the state; one anywhere else in a sender or in the feeder stops the forwarder with exit
status 1 (logged as critical, and the state says so), so that systemd or `collector run`
start it again and its rows are resent: no task dies quietly.

A queue or dead-letter write that fails (the disk full, the file locked) never ends the
forwarder: it is tried again, at growing intervals, until it succeeds or the forwarder
stops (`_queue_op`). On a full disk its acks are what free space, so giving up on them
would leave the collector stuck; and a row is acked only after its events' dead letters
are written, so a failure in between costs a resend, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from zlib_ng import zlib_ng

from collector.errors import Unavailable
from collector.events import Target
from collector.ops import notify
from collector.settings import Settings
from collector.store import heartbeats, reconcile
from collector.store.clock import Clock
from collector.store.counts import Count, Counts, DeadLetterReason
from collector.store.datadir import DataDir
from collector.store.heartbeats import UpstreamState
from collector.store.ledger import State
from collector.store.spool import Row
from forwarder.backoff import Backoff, Outage
from forwarder.batch import MAX_BATCH_EVENTS, Batch
from forwarder.keys import KeyChooser
from forwarder.sink import (
    OUTCOME,
    Delivered,
    EventsSink,
    KeyRejected,
    Rejected,
    Result,
    RetryLater,
)

log = logging.getLogger("collector.forwarder")

# How soon a row committed by the server is seen when the queue was empty.
POLL_INTERVAL_S = 0.05
# A batch that has not filled up is sent after this long, so a trickle of events for one
# project is not held back by a flood for another.
LINGER_S = 0.5
# zlib-ng's level 2: on a batch of SDK events, 17x smaller in 0.48 us an event, where zlib's
# level 1 (the fastest it has) took 1.08 us for 16.6x (measured on one 1000-event batch),
# which matters here: gzip was a fifth of the forwarder's CPU. The stream is plain gzip.
GZIP_LEVEL = 2
GZIP_WBITS = 31  # a gzip header and trailer, as Content-Encoding: gzip asks
# Events that the feeder may hold in partly built batches and the hand-off queue, past
# which it stops taking rows: memory stays flat however large the backlog.
MAX_BUFFERED_EVENTS = 20_000
# And bytes: rows of large events (a commit holds up to 16 MiB) would otherwise take the
# feeder's memory to 20,000 times their size.
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
# How often the forwarder writes its counts to counts.db (and so how fresh status is).
COUNTS_FLUSH_S = 1.0
# A queue or dead-letter write that failed (disk full, file locked) is tried again after
# this long, doubling up to the maximum: soon enough to resume as soon as space returns,
# seldom enough that the log shows a line every few seconds, not a flood.
QUEUE_RETRY_FIRST_S = 0.1
QUEUE_RETRY_MAX_S = 5.0

# Events of batches whose key was refused, held in memory until the keys are reloaded
# while every other key's batches keep flowing; past either bound the feeder waits too
# (nothing is dropped: the rest stays in the queue file), so a halted project costs the
# forwarder at most this much memory.
MAX_PARKED_EVENTS = 50_000
MAX_PARKED_BYTES = 32 * 1024 * 1024

# Halted targets (project, env) named in the state file: the rest are counted only, so a
# refused org-wide key over 20,000 projects does not make a 1 MB heartbeat.
MAX_HALTED_SHOWN = 100

# The status of a KeyRejected that no upstream answered: there was no key to send.
NO_KEY = 0
# A refused key's status when the key is valid but not for all the batch's targets (it may
# be restricted to one project): the batch is split by target, to send what it may.
FORBIDDEN = 403

# An upstream's schema warning names its event; cut as the server cuts the event names it
# counts (`collector.server.counting.LABEL_CHARS`).
NAME_CHARS = 100

T = TypeVar("T")


class _Stopping(Exception):
    """Raised in a sender waiting to retry when the forwarder stops: leave the batch."""


@dataclass
class Stats:
    """What the forwarder did since it started (for its state file and the log)."""

    forwarded: int = 0
    unconfirmed: int = 0  # in 2xx answers that accepted fewer than sent, naming none
    retried: int = 0
    dead_lettered: int = 0
    last_success: float | None = None
    state: UpstreamState = UpstreamState.STARTING
    message: str = ""
    since: float = field(default_factory=time.time)

    def set(self, state: UpstreamState, message: str = "") -> bool:
        """Record a new state; True when it changed (worth a log line)."""
        changed = (state, message) != (self.state, self.message)
        if state != self.state:
            self.since = time.time()
        self.state, self.message = state, message
        return changed


class Forwarder:
    def __init__(self, settings: Settings, load_keys: Callable[[], KeyChooser]) -> None:
        self.settings = settings
        self._load_keys = load_keys
        self._keys = load_keys()
        self._keys_loaded = 0  # how many times they were reloaded (SIGHUP)
        self.data_dir = DataDir(settings.data_dir)
        # Acks need no fsync of their own: if a power cut loses one, the row is sent again
        # (a duplicate), never lost. The server's commits keep their own `sync` setting.
        self.spool = reconcile.open_queue(  # a corrupt file is moved aside and read back
            self.data_dir,
            sync="normal",
            budget_bytes=settings.disk_budget_bytes,
            resume_in_flight=True,
        )
        self.dead = reconcile.open_dead_letters(self.data_dir)  # read back if corrupt
        self._clock = Clock(self.data_dir)  # ages, as the server stamps rows: steps ignored
        self.counts = Counts.writer(self.data_dir, settings.counts_window_minutes, recover=True)
        self.stats = Stats()
        self._outage = Outage()
        self._pending: dict[int, int] = {}  # row id -> events not yet settled
        # row id -> what its settled events came to, for the ledger (written with its ack)
        self._outcomes: dict[int, Counter[tuple[Target, State, str]]] = {}
        self._batches: asyncio.Queue[Batch] = asyncio.Queue(maxsize=settings.forward_in_flight)
        self._buffered = 0
        self._buffered_bytes = 0  # the events' own bytes of the same
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._key_fixed = asyncio.Event()  # the keys were reloaded: send the parked again
        self._blocked: set[Target] = set()  # targets whose key the upstream refused
        self._parked: list[Batch] = []  # their batches, until the keys are reloaded
        self._parked_events = 0
        self._parked_bytes = 0  # the events' own bytes of the same
        self._sink: EventsSink | None = None
        self.overran = False  # requests were still in flight at stop_timeout_seconds
        self.failed = False  # a sender failed unexpectedly (`_fail`): exit 1, be restarted

    # --- life cycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Forward until `stop()`; then leave what is not settled ready in the queue."""
        beat = asyncio.create_task(self._beat())
        try:
            if not self.settings.upstream_url:
                self._say(
                    UpstreamState.NOT_CONFIGURED,
                    "no upstream_url: events stay queued",
                    logging.WARNING,
                )
                await self._stopping.wait()
                return
            self._sink = EventsSink(
                self.settings.upstream_url,
                deadline_s=self.settings.forward_timeout_seconds,
                connections=self.settings.forward_in_flight,
            )
            # Not "upstream ok": nothing is known of the upstream until a batch is answered.
            self.stats.set(UpstreamState.OK)
            self._write_state()
            log.info("forwarding to %s", self._sink.url)
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
            self._keys_loaded += 1
        except Exception as exc:
            log.error("reload failed, keeping the old keys: %s", exc)
            return
        log.info("upstream keys reloaded")
        self._key_fixed.set()
        self._room.set()  # a feeder waiting on the parked bounds takes them up again

    async def _forward(self) -> None:
        senders = [
            asyncio.create_task(self._send_loop()) for _ in range(self.settings.forward_in_flight)
        ]
        await self._feed()
        # Stopping: in-flight requests get the stop timeout, the rest stay queued.
        _, unfinished = await asyncio.wait(senders, timeout=self.settings.stop_timeout_seconds)
        self.overran = bool(unfinished)
        if unfinished:
            log.error(
                "stop_timeout_seconds (%s s) passed with %d upstream requests in flight:"
                " they were cut",
                self.settings.stop_timeout_seconds,
                len(unfinished),
            )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)

    async def _close(self) -> None:
        if self._sink is not None:
            await self._sink.aclose()
        unsettled = list(self._pending)
        if unsettled:
            try:
                await asyncio.to_thread(self.spool.nack, unsettled)
                log.info("stopped with %d queue rows unsettled; they stay queued", len(unsettled))
            except Unavailable as exc:
                # Still in flight in the file: the next forwarder makes them ready again.
                log.warning("could not release %d queue rows (%s)", len(unsettled), exc.message)
        self._write_state()
        await self._write_counts()
        await asyncio.to_thread(self.spool.write_witness)  # its last acks, for the audit
        self.counts.close()
        self.spool.close()
        self.dead.close()

    # --- feed: rows into batches ----------------------------------------------------

    async def _feed(self) -> None:
        try:
            await self._feed_until_stopped()
        except _Stopping:
            pass
        except Exception as exc:  # as for a sender: said everywhere, then exit 1
            self._fail(exc, "the feeder")

    async def _feed_until_stopped(self) -> None:
        building: dict[str | None, Batch] = {}  # by upstream key
        while not self._stopping.is_set():
            if self._key_fixed.is_set() and self._parked:
                self._key_fixed.clear()
                await self._unpark()
            if self._full():
                # Send what is partly built (it may be all that holds the buffer), then
                # wait for senders to settle events.
                await self._hand_off_all(building)
                self._room.clear()
                if self._full():
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

    def _full(self) -> bool:
        return (
            self._buffered >= MAX_BUFFERED_EVENTS
            or self._buffered_bytes >= MAX_BUFFERED_BYTES
            or self._parked_events >= MAX_PARKED_EVENTS
            or self._parked_bytes >= MAX_PARKED_BYTES
        )

    async def _sort(self, row: Row, building: dict[str | None, Batch]) -> list[Batch]:
        """Put a row's events into batches; returns the batches it filled."""
        groups = row.groups()
        count = sum(len(events) for _, events in groups)
        self._pending[row.id] = count
        self._outcomes[row.id] = Counter()
        self._buffered += count
        self._buffered_bytes += sum(sum(map(len, events)) for _, events in groups)
        full = []
        limit = self.settings.forward_batch_bytes
        for target, events in groups:
            key = self._keys.key_for(target)
            batch = building.get(key)
            if batch is None:
                batch = building[key] = Batch(keys_loaded=self._keys_loaded)
            size = sum(map(len, events))
            if (
                batch.size + size + len(events) <= limit
                and len(batch.events) + len(events) <= MAX_BATCH_EVENTS
            ):  # the common case, in one step: they all fit
                batch.extend(events, size, target, row.id, row.queued_at)
            else:
                for raw in events:
                    if batch.events and batch.size + len(raw) > limit:
                        full.append(building.pop(key))
                        batch = building[key] = Batch(keys_loaded=self._keys_loaded)
                    batch.add(raw, target, row.id, row.queued_at)
                    if len(batch.events) >= MAX_BATCH_EVENTS:
                        full.append(building.pop(key))
                        batch = building[key] = Batch(keys_loaded=self._keys_loaded)
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

    async def _hand_off_all(self, building: dict[str | None, Batch]) -> None:
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
            except Exception as exc:
                self._fail(exc, "a sender")
                return

    def _fail(self, exc: Exception, who: str) -> None:
        """A sender or the feeder met what it cannot handle: say so everywhere and stop, so
        that the process is started again (systemd, `collector run`) and its rows resent,
        rather than go on with a task fewer and a state that reads fine."""
        log.critical(
            "%s failed: %s: %s; the forwarder stops, to be started again (its rows stay queued)",
            who,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self.stats.set(UpstreamState.RETRYING, f"internal error: {type(exc).__name__}: {exc}")
        self._write_state()
        self.failed = True
        self.stop()

    async def _deliver(self, batch: Batch) -> None:
        """Send `batch` until each of its events is delivered, dead-lettered, or parked
        (its key refused: held until the keys are reloaded, while the sender goes on with
        other keys' batches)."""
        todo = [batch]
        while todo:
            part = todo.pop()
            if part.keys_loaded != self._keys_loaded:  # reloaded since it was built
                by_key = part.split(self._keys.key_for)
                for piece in by_key:
                    piece.keys_loaded = self._keys_loaded
                if len(by_key) > 1:
                    todo += reversed(by_key)
                    continue
            result = await self._send(part)
            if isinstance(result, KeyRejected):
                by_target = part.split(lambda target: target)
                if result.status == FORBIDDEN and len(by_target) > 1:
                    todo += reversed(by_target)  # the key may be restricted to some of them
                else:
                    self._refuse(part, result)
                    self._park(part)
                continue
            if self._blocked:
                self._blocked.difference_update(part.targets)
            if not self._blocked:
                self._say(UpstreamState.OK, "")
            if isinstance(result, Rejected) and len(part.events) > 1:
                first, second = part.halves()
                todo += [second, first]
                continue
            everything = range(len(part.events))
            if isinstance(result, Rejected):
                why = f"rejected by upstream: {result.reason}"
                await self._dead_letter(part, everything, why, DeadLetterReason.REJECTED)
            elif isinstance(result, TooOld):
                reason = f"older than the maximum age ({self.settings.max_event_age_seconds:g} s)"
                await self._dead_letter(part, everything, reason, DeadLetterReason.MAX_AGE)
            else:
                await self._delivered(part, result)
            await self._settle(part)

    async def _delivered(self, part: Batch, result: Delivered) -> None:
        """Count what a 2xx says of `part`: delivered, rejected (dead-lettered with the
        upstream's reason), unconfirmed (counted, loudly; or dead-lettered too, with
        `unconfirmed_events = "dead_letter"`), taken with a schema warning."""
        if self.stats.last_success is None:
            log.info("upstream ok: the first batch was delivered")
        self.stats.last_success = time.time()
        by_reason: dict[str, list[int]] = {}
        for index, reason in sorted(result.rejected.items()):
            by_reason.setdefault(reason, []).append(index)
        for reason, places in by_reason.items():
            why = f"rejected by upstream (HTTP {result.status}): {reason}"
            await self._dead_letter(part, places, why, DeadLetterReason.REJECTED)
        kept = [i for i in range(len(part.events)) if i not in result.rejected]
        # Which events the unconfirmed are is not known: they are counted as the batch's
        # last ones (exact whenever the batch holds one project and env, as most do).
        confirmed = len(kept) - result.unconfirmed
        self.stats.forwarded += confirmed
        for target, count in Counter(part.targets[i] for i in kept[:confirmed]).items():
            self.counts.add(Count.FORWARDED, target, count)
        for index, name in result.warned.items():
            self.counts.add(Count.SCHEMA_WARNINGS, (*part.targets[index], name[:NAME_CHARS]))
        if result.unconfirmed:
            await self._unconfirmed(part, kept, result)
        else:
            self._tally(part, kept, State.DELIVERED)

    async def _unconfirmed(self, part: Batch, kept: list[int], result: Delivered) -> None:
        confirmed = kept[: len(kept) - result.unconfirmed]
        unsure = kept[len(confirmed) :]
        self.stats.unconfirmed += result.unconfirmed
        for target, count in Counter(part.targets[i] for i in unsure).items():
            self.counts.add(Count.UNCONFIRMED, target, count)
        said = (
            f"the upstream answered HTTP {result.status} accepting {len(confirmed)} "
            f"of {len(kept)} events without naming the other {len(unsure)}"
        )
        if self.settings.unconfirmed_events == "dead_letter":
            why = f"unconfirmed: {said}"
            await self._dead_letter(part, kept, why, DeadLetterReason.UNCONFIRMED)
            log.warning("%s; the batch's events are kept as dead letters too", said)
        else:
            self._tally(part, confirmed, State.DELIVERED)
            self._tally(part, unsure, State.UNCONFIRMED)
            log.warning("%s; they are counted as unconfirmed (unconfirmed_events)", said)

    async def _send(self, batch: Batch) -> Delivered | Rejected | KeyRejected | TooOld:
        """Post `batch` until the upstream gives an answer about its events or its key, or
        until its oldest event is past the maximum age (it was taken in time, then retried
        for long)."""
        assert self._sink is not None
        body = await asyncio.to_thread(zlib_ng.compress, batch.body(), GZIP_LEVEL, GZIP_WBITS)
        backoff = Backoff(self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        while True:
            key = self._keys.key_for(batch.targets[0])  # the batch's targets share it
            if key is None:
                result: Result = KeyRejected(NO_KEY, "no upstream key")
            else:
                holds_probe = await self._outage.acquire()
                try:
                    result = await self._sink.send(body, len(batch.events), key, batch.id)
                except Exception as exc:
                    # Ours or a library's bug on some answer: a retry, said loudly, never a
                    # sender that dies with its batch.
                    log.exception("sending a batch failed unexpectedly; it is tried again")
                    result = RetryLater(f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    self._outage.release(holds_probe)
                self.counts.add(Count.UPSTREAM_REQUESTS, (OUTCOME[type(result)],))
            if isinstance(result, RetryLater):
                self._outage.failed()
                self.stats.retried += 1
                if self._clock.now() - batch.oldest > self.settings.max_event_age_seconds:
                    return TooOld()
                delay = backoff.next_delay(result.retry_after)
                if not self._blocked:
                    self._say(UpstreamState.RETRYING, f"{result.reason}; next try in {delay:.1f} s")
                await self._wait(self._stopping, delay)
                if self._stopping.is_set():
                    raise _Stopping
                continue
            if not isinstance(result, KeyRejected):
                self._outage.succeeded()
            return result

    def _park(self, part: Batch) -> None:
        """Hold `part` aside until the keys are reloaded; its events no longer count in the
        feeder's buffer (so other keys' rows keep coming) but in the parked bounds."""
        self._parked.append(part)
        if part.keys_loaded != self._keys_loaded:  # sent with keys reloaded since: again
            self._key_fixed.set()
        self._buffered -= len(part.events)
        self._buffered_bytes -= part.events_bytes
        self._parked_events += len(part.events)
        self._parked_bytes += part.events_bytes
        self._room.set()

    async def _unpark(self) -> None:
        """After a reload: send the parked batches again (split by the new keys)."""
        parked, self._parked = self._parked, []
        for part in parked:
            self._parked_events -= len(part.events)
            self._parked_bytes -= part.events_bytes
            self._buffered += len(part.events)
            self._buffered_bytes += part.events_bytes
        for part in parked:
            await self._hand_off(part)

    def _refuse(self, part: Batch, result: KeyRejected) -> None:
        """Stop sending the events of `part`'s targets until the keys are reloaded; say so."""
        targets = set(part.targets)
        self._blocked |= targets
        problem = _key_problem(part.targets[0], len(targets), result)
        self._say(UpstreamState.KEY_REJECTED, problem, logging.ERROR)

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
        self._buffered_bytes -= batch.events_bytes
        self._room.set()
        if done:
            outcomes: Counter[tuple[Target, State, str]] = Counter()
            for row_id in done:
                outcomes += self._outcomes.pop(row_id)
            await self._queue_op("ack rows", lambda: self.spool.ack(done, outcomes))

    def _tally(self, part: Batch, places: Sequence[int], state: State, reason: str = "") -> None:
        """Note what `part`'s events at `places` came to, for their rows' ack."""
        runs = Counter((part.rows[i], part.targets[i]) for i in places)
        for (row_id, target), n in runs.items():
            self._outcomes[row_id][(target, state, reason)] += n

    async def _dead_letter(
        self, part: Batch, places: Sequence[int], reason: str, kind: DeadLetterReason
    ) -> None:
        events = [part.events[i] for i in places]
        targets = [part.targets[i] for i in places]
        count = await self._queue_op(
            "write dead letters",
            lambda: self.dead.add(
                events, reason, state=State.DEAD_LETTERED, kind=kind, targets=targets
            ),
        )
        self._tally(part, places, State.DEAD_LETTERED, kind)
        self.stats.dead_lettered += count
        self.counts.add(Count.DEAD_LETTERED, (kind,), count)
        # Not `reason`: an upstream's refusal may quote the events, which stay out of logs.
        log.warning("dead-lettered %d events (%s; the reason: collector dlq list)", count, kind)

    async def _queue_op(self, what: str, operation: Callable[[], T]) -> T:
        """`operation()` in a thread, tried again while the queue cannot be written;
        raises _Stopping when the forwarder stops first."""
        delay = QUEUE_RETRY_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(operation)
            except Unavailable as exc:
                log.warning("could not %s (%s); trying again in %.1f s", what, exc.message, delay)
            await self._wait(self._stopping, delay)
            if self._stopping.is_set():
                raise _Stopping
            delay = min(delay * 2, QUEUE_RETRY_MAX_S)

    # --- state -----------------------------------------------------------------------

    def _say(self, state: UpstreamState, message: str, level: int = logging.INFO) -> None:
        if self.stats.set(state, message):
            if message:
                log.log(level, "upstream %s: %s", state, message)
            self._write_state()

    def _write_state(self) -> None:
        stats = self.stats
        with contextlib.suppress(OSError):
            heartbeats.write(
                self.data_dir.forwarder_state,
                {
                    "upstream": stats.state,
                    "message": stats.message,
                    "since": stats.since,
                    "outage_since": self._outage.since,
                    "last_success": stats.last_success,
                    "forwarded": stats.forwarded,
                    "unconfirmed": stats.unconfirmed,
                    "retried": stats.retried,
                    "dead_lettered": stats.dead_lettered,
                    "halted": [list(t) for t in sorted(self._blocked)[:MAX_HALTED_SHOWN]],
                    "halted_targets": len(self._blocked),
                    "parked_events": self._parked_events,
                    "upstream_url": self.settings.upstream_url,
                },
            )

    async def _beat(self) -> None:
        """Every second write the counts; every few, the state file (the heartbeat)."""
        beat = 0.0
        while True:
            await self._write_counts()
            if time.monotonic() - beat >= heartbeats.BEAT_EVERY_S:
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


@dataclass(frozen=True)
class TooOld:
    """A batch whose oldest event passed `max_event_age_seconds` while it was retried."""


def _key_problem(target: Target, targets: int, result: KeyRejected) -> str:
    """What to say of a key refused for `target` and `targets - 1` others."""
    named = f"{target}" + (f" and {targets - 1} more" if targets > 1 else "")
    then = "sending stopped, events kept; {fix}, then reload (SIGHUP) or restart"
    if result.status == NO_KEY:
        fix = "set upstream_key, upstream_key_file or upstream_keys"
        return f"no upstream key is configured for {named}; " + then.format(fix=fix)
    fix = "fix the key"
    return f"upstream refused the key for {named} ({result.reason}); " + then.format(fix=fix)
