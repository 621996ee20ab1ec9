"""Group commit: concurrent requests share one spool transaction, in a writer process.

A commit costs an fsync (a few milliseconds), which caps one-commit-per-request at a few
thousand requests per second. Instead each request hands its events to the `Committer`
and waits; one writer takes everything that arrived while the previous commit ran and
commits it as one queue row. No timer is involved: under light load a request is committed
at once, under heavy load groups grow by themselves.

It is also where de-duplication happens, since both work on a whole group at once: ids
already stored (or repeated within the group) are dropped before the commit, and the new
ids are remembered only after it, in a thread of the writer, while the answer goes back;
the next group waits for that before it looks ids up, so a retry is still found. A writer
killed in between forgets those ids: a retry may then be stored twice (at-least-once),
never an event lost.

The writer (`GroupWriter`: de-dup, append, remember) runs in a child process of its own.
Parsing and validating keep the server's event loop busy, and committing keeps the writer
busy for about as long; in one process the two share one core through the GIL (measured:
14 ms of CPU per 1000-event request instead of 8), in two they use both cores. The child
ignores SIGTERM and SIGINT: the server stops it once the pending groups are committed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from collector.errors import CollectorError, QueueBusy, QueueFull, Unavailable
from collector.events import Target
from collector.ops import logs
from collector.store.datadir import DataDir
from collector.store.seen import SeenIds
from collector.store.spool import Spool, Sync

log = logging.getLogger("collector.commit")

# (the client's id or None, where it goes, the event's own JSON bytes). Events of a request
# share their Target objects, so pickling them to the writer costs one per target.
EncodedEvent = tuple[str | None, Target, bytes]

# Upper bound on the events of one group, so one commit (and the latency of the requests
# in it) stays bounded when many large requests arrive at once: 20 requests of 1000.
MAX_GROUP_EVENTS = 20_000
# How often the writer process checks that the server that started it is still there.
PARENT_CHECK_S = 0.5


@dataclass(frozen=True)
class WriterConfig:
    data_dir: Path
    sync: Sync
    budget_bytes: int
    dedup_window_s: float
    log_level: str = "info"  # the writer process configures its own logging (spawned)


class GroupWriter:
    """Commits groups of requests' events to the spool, without ids already stored."""

    def __init__(self, config: WriterConfig) -> None:
        data_dir = DataDir(config.data_dir)
        self.spool = Spool(
            data_dir,
            sync=config.sync,
            budget_bytes=config.budget_bytes,
            resume_in_flight=False,  # only the forwarder may resume its in-flight rows
            recover=True,
        )
        self.seen = SeenIds(data_dir, config.dedup_window_s, recover=True)
        # Ids are remembered in a thread of their own once their events are committed, so
        # the answer need not wait for it (1.2 ms per 1000 ids, measured: with four clients
        # the writer's commits are what bound throughput); the next group waits for it.
        self._remembering = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remember")
        self._remembered: Future[None] | None = None

    def close(self) -> None:
        self._settle_remembering()
        self._remembering.shutdown(wait=True)
        self.spool.close()
        self.seen.close()

    def commit(self, requests: list[list[EncodedEvent]]) -> list[list[int]]:
        """Drop known ids, append the rest, then remember their ids (in the background:
        the next group, and `close`, wait for that).

        Returns, per request, the indexes of its events not written (already stored). The
        group is committed, or refused (QueueFull, QueueBusy), as a whole, so no request is
        answered "already held" on the strength of another request's events that were
        refused.
        """
        self._settle_remembering()  # a retry in this group must find the last group's ids
        ids = [eid for events in requests for eid, _, _ in events if eid]
        known = self.seen.seen(ids)
        groups: dict[Target, list[bytes]] = {}
        if not known and len(set(ids)) == len(ids):
            skipped: list[list[int]] = [[] for _ in requests]  # nothing to drop: in bulk
            for events in requests:
                _group_all(groups, events)
        else:
            skipped, ids = _drop_known(requests, known, groups)
        if groups:
            self.spool.append(groups)
        if ids:
            self._remembered = self._remembering.submit(self._remember, ids)
        return skipped

    def _remember(self, ids: list[str]) -> None:
        try:
            self.seen.remember(ids)
        except Unavailable as exc:
            # The events are committed, so the answer stays 200; only their ids are
            # forgotten, and a retry may be stored twice (at-least-once).
            log.warning("could not remember %d event ids: %s", len(ids), exc.message)

    def _settle_remembering(self) -> None:
        remembered, self._remembered = self._remembered, None
        if remembered is not None:
            remembered.result()


def _group_all(groups: dict[Target, list[bytes]], events: list[EncodedEvent]) -> None:
    """Add `events` to their targets' groups; in one step when they share one target, as
    a request's events nearly always do (it runs for every event of every commit)."""
    if not events:
        return
    first = events[0][1]
    if all(target is first for _, target, _ in events):
        groups.setdefault(first, []).extend([raw for _, _, raw in events])
        return
    for _, target, raw in events:
        groups.setdefault(target, []).append(raw)


def _drop_known(
    requests: list[list[EncodedEvent]], known: set[str], groups: dict[Target, list[bytes]]
) -> tuple[list[list[int]], list[str]]:
    """Group the events whose id is neither `known` nor repeated in the group; returns,
    per request, the indexes dropped, and the ids kept (to remember)."""
    ids: list[str] = []
    skipped: list[list[int]] = []
    for events in requests:
        dropped = []
        for index, (eid, target, raw) in enumerate(events):
            if eid is not None:
                if eid in known:
                    dropped.append(index)
                    continue
                known.add(eid)
                ids.append(eid)
            groups.setdefault(target, []).append(raw)
        skipped.append(dropped)
    return skipped, ids


# --- the writer process's side: one GroupWriter per process ------------------------------

_writer: GroupWriter | None = None


def _open_writer(config: WriterConfig, server_pid: int) -> None:
    global _writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(config.log_level)  # a spawned process starts with no logging configured
    threading.Thread(target=_exit_with, args=(server_pid,), daemon=True).start()
    _writer = GroupWriter(config)


def _exit_with(server_pid: int) -> None:
    """End this process once the server is gone (killed, say), so no writer is left over.

    Whatever it was committing then is either committed or rolled back by SQLite, and
    was never answered 200.
    """
    while os.getppid() == server_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _commit(requests: list[list[EncodedEvent]]) -> list[list[int]]:
    assert _writer is not None
    return _writer.commit(requests)


def _check_writable() -> None:
    assert _writer is not None
    _writer.spool.check_writable()


# --- the server's side ------------------------------------------------------------------


@dataclass
class _Pending:
    events: list[EncodedEvent]
    done: asyncio.Future[list[int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Committer:
    """Takes requests' events on the event loop, commits them in groups in the writer."""

    def __init__(self, config: WriterConfig) -> None:
        self._config = config
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._writer = self._new_writer()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _new_writer(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads and an event loop that a fork would copy.
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_open_writer,
            initargs=(self._config, os.getpid()),
        )

    async def start(self) -> None:
        """Start the writer process and check that the queue can be written.

        A full disk or disk budget does not stop the start: the server then answers 503
        (and /readyz says not ready) until the forwarder frees space, rather than failing
        to start again and again while the queue it would drain waits.
        """
        try:
            await self.check_writable()
        except QueueFull as exc:
            log.warning("starting with the queue full: %s; answering 503 until space returns", exc)
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Commit what is pending, then stop; later writes are refused with 503."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._writer.shutdown(wait=True)

    async def write(self, events: list[EncodedEvent]) -> list[int]:
        """Commit `events`; returns the indexes of those not written because their id is
        already stored. Raises QueueFull/QueueBusy."""
        if self._closing:
            raise QueueBusy("collector is shutting down; retry later")
        pending = _Pending(events)
        self._pending.append(pending)
        self._wake.set()
        done = pending.done
        del pending
        try:
            return await done
        finally:
            # A refusal's traceback holds this frame, and the future holds the refusal: with
            # `done` (or `pending`) left here they form a cycle that keeps the request's
            # events and body alive until the cyclic collector runs, which app.py makes
            # rare. Measured without this: 1.2 GB of such garbage after a minute of 503s.
            del done

    async def check_writable(self) -> None:
        """Raise QueueFull/QueueBusy unless the queue could take a write now."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, _check_writable)
        except BrokenProcessPool as exc:
            self._restart_writer()
            raise QueueBusy("queue writer restarted; retry later") from exc

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group = self._take_group()
                outcome: list[list[int]] | CollectorError
                try:
                    outcome = await loop.run_in_executor(
                        self._writer, _commit, [p.events for p in group]
                    )
                except CollectorError as exc:
                    outcome = exc
                except BrokenProcessPool:
                    self._restart_writer()
                    outcome = QueueBusy("queue writer restarted; retry later")
                except Exception as exc:
                    # Never let this task die: every later request would wait forever.
                    log.exception("group commit failed", exc_info=exc)
                    outcome = QueueBusy("queue write failed; retry later")
                for index, pending in enumerate(group):
                    if pending.done.done():  # the client went away; the write still stands
                        continue
                    if isinstance(outcome, CollectorError):
                        # Its own copy per request: one shared instance would collect
                        # every request's frames in its traceback as each re-raises it.
                        pending.done.set_exception(copy.copy(outcome))
                    else:
                        pending.done.set_result(outcome[index])
            if self._closing:
                return

    def _restart_writer(self) -> None:
        log.error("the queue writer process died; starting a new one")
        self._writer.shutdown(wait=False)
        self._writer = self._new_writer()

    def _take_group(self) -> list[_Pending]:
        size = 0
        count = 0
        for pending in self._pending:
            if count and size + len(pending.events) > MAX_GROUP_EVENTS:
                break
            size += len(pending.events)
            count += 1
        group, self._pending = self._pending[:count], self._pending[count:]
        return group
