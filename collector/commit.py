"""Group commit: concurrent requests share one spool transaction, and so one fsync.

It is also where de-duplication happens, since both work on a whole group at once: ids
already stored (or repeated within the group) are dropped before the commit, and the new
ids are remembered only after it.

A commit costs an fsync (a few milliseconds), which caps one-commit-per-request at a few
thousand requests per second. Instead each request hands its events to the `Committer`
and waits; one writer task takes everything that arrived while the previous commit ran
and commits it as one queue row. No timer is involved: under light load a request is
committed at once, under heavy load groups grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from collector.dedup import SeenIds
from collector.errors import CollectorError, QueueBusy
from collector.spool import Spool

log = logging.getLogger("collector.commit")

EncodedEvent = tuple[str | None, bytes]  # (the client's id or None, the event's JSON)

# Upper bound on the events of one group, so one commit (and the latency of the requests
# in it) stays bounded when many large requests arrive at once: 20 requests of 1000.
MAX_GROUP_EVENTS = 20_000


@dataclass
class _Pending:
    events: list[EncodedEvent]
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Committer:
    """Takes requests' events on the event loop, commits them in groups on one thread."""

    def __init__(self, spool: Spool, seen: SeenIds) -> None:
        self._spool = spool
        self._seen = seen
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        # One thread: SQLite writes are serial anyway, and the thread never blocks the loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-writer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Commit what is pending, then stop; later writes are refused with 503."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    async def write(self, events: list[EncodedEvent]) -> int:
        """Commit `events`; returns how many were new. Raises QueueFull/QueueBusy."""
        if self._closing:
            raise QueueBusy("collector is shutting down; retry later")
        pending = _Pending(events)
        self._pending.append(pending)
        self._wake.set()
        return await pending.done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group = self._take_group()
                outcome: list[int] | CollectorError
                try:
                    outcome = await loop.run_in_executor(
                        self._thread, self._commit, [p.events for p in group]
                    )
                except CollectorError as exc:
                    outcome = exc
                except Exception as exc:
                    # Never let the writer task die: every later request would wait forever.
                    log.exception("group commit failed", exc_info=exc)
                    outcome = QueueBusy("queue write failed; retry later")
                for index, pending in enumerate(group):
                    if pending.done.done():  # the client went away; the write still stands
                        continue
                    if isinstance(outcome, CollectorError):
                        pending.done.set_exception(outcome)
                    else:
                        pending.done.set_result(outcome[index])
            if self._closing:
                return

    def _commit(self, requests: list[list[EncodedEvent]]) -> list[int]:
        """On the writer thread: drop known ids, append the rest, then remember their ids.

        Returns how many events each request wrote. The group is committed, or refused
        (QueueFull, QueueBusy), as a whole, so no request is answered "already held" on the
        strength of another request's events that were refused.
        """
        try:
            known = self._seen.seen([eid for events in requests for eid, _ in events if eid])
        except sqlite3.Error as exc:
            raise QueueBusy(f"seen ids unavailable ({exc}); retry later") from exc
        rows: list[bytes] = []
        ids: list[str] = []
        written: list[int] = []
        for events in requests:
            count = 0
            for eid, raw in events:
                if eid is not None:
                    if eid in known:
                        continue
                    known.add(eid)
                    ids.append(eid)
                rows.append(raw)
                count += 1
            written.append(count)
        if rows:
            self._spool.append(rows)
        if ids:
            try:
                self._seen.remember(ids)
            except sqlite3.Error as exc:
                # The events are committed, so the answer stays 200; only their ids are
                # forgotten, and a retry may be stored twice (at-least-once).
                log.warning("could not remember %d event ids: %s", len(ids), exc)
        return written

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
