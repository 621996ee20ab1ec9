"""Group commit, the server's side: requests' events handed to the queue writer in groups.

Each events request hands its events to the `Committer` and waits; one task takes
everything that arrived while the previous group was being committed and sends it to the
writer process (`writer.py`) as one group, which commits it, with other server processes'
groups, as one queue row. The answer to a request comes only after that commit.

The server that runs alone owns its writer (starts it, starts it again if it dies, stops
it last); with `workers` the supervisor does, and each server only connects to it
(`WriterLink`). A writer that is gone makes a request 503 (retry), never a lost event.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import AuthenticationError
from typing import Any

from collector.errors import CollectorError, QueueBusy, QueueFull
from collector.server.counting import Note
from collector.server.writer import (
    CONNECT_WAIT_S,
    MAX_GROUP_BYTES,
    MAX_GROUP_EVENTS,
    EncodedEvent,
    WriterConfig,
    WriterLink,
    WriterProcess,
)

log = logging.getLogger("collector.commit")

WRITER_GONE = "queue writer restarted; retry later"
# How long /readyz waits for the writer to say the queue can take a write: probes time out
# after a second or more (Kubernetes: 1 s by default), and a stalled disk must read "not
# ready" rather than hang the probe.
READY_WAIT_S = 1.0


@dataclass
class _Pending:
    events: list[EncodedEvent]
    notes: list[Note]
    size: int  # the request's body bytes: what its events cost on the way
    done: asyncio.Future[list[int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Committer:
    """Takes requests' events on the event loop, commits them in groups in the writer.

    `owned`: a writer this server starts and stops itself (it runs alone); else `link`
    names the writer a supervisor runs."""

    def __init__(
        self,
        *,
        owned: WriterConfig | None = None,
        link: WriterLink | None = None,
        commit_timeout_s: float = 8.0,
    ):
        self._process = WriterProcess(owned) if owned is not None else None
        found = self._process.link if self._process is not None else link
        if found is None:
            raise ValueError("a Committer needs a writer: its own or a link")
        self._link = found
        self._commit_timeout_s = commit_timeout_s
        self._conn: Connection | None = None
        # One thread talks to the writer: one message and its answer at a time, in order.
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Start the writer (if owned), connect, and check that the queue can be written.

        A full disk or disk budget does not stop the start: the server then answers 503
        (and /readyz says not ready) until the forwarder frees space, rather than failing
        to start again and again while the queue it would drain waits.
        """
        if self._process is not None:
            self._process.start()
        try:
            self._conn = await asyncio.to_thread(self._link.connect, CONNECT_WAIT_S)
        except (OSError, EOFError, AuthenticationError) as exc:
            raise QueueBusy(f"cannot reach the queue writer: {exc}") from exc
        try:
            await self.check_writable(wait_s=None)  # a writer starting takes its time
        except QueueFull as exc:
            log.warning("starting with the queue full: %s; answering 503 until space returns", exc)
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Commit what is pending, then stop (and stop the writer, if owned); later
        writes are refused with 503."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._calls.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            await asyncio.to_thread(self._process.stop)

    async def write(
        self, events: list[EncodedEvent], notes: list[Note], size: int = 0
    ) -> list[int]:
        """Commit `events` (and have the writer count their `notes`); returns the indexes
        of those not written because their id is already stored. Raises QueueFull or
        QueueBusy."""
        if self._closing:
            raise QueueBusy("collector is shutting down; retry later")
        pending = _Pending(events, notes, size)
        self._pending.append(pending)
        self._wake.set()
        done = pending.done
        del pending
        try:
            # shield: a commit that outlasts the wait still stands (and its answer is then
            # dropped: the client's retry of those events is de-duplicated). A timeout of
            # the task, not wait_for: no task more per request.
            async with asyncio.timeout(self._commit_timeout_s):
                return await asyncio.shield(done)
        except TimeoutError:
            done.add_done_callback(_retrieve)  # its outcome comes later, to nobody
            raise QueueBusy(
                f"the queue did not commit within {self._commit_timeout_s:g} s (a stalled "
                "disk?); retry later"
            ) from None
        finally:
            # A refusal's traceback holds this frame, and the future holds the refusal: with
            # `done` (or `pending`) left here they form a cycle that keeps the request's
            # events and body alive until the cyclic collector runs, which app.py makes
            # rare. Measured without this: 1.2 GB of such garbage after a minute of 503s.
            del done

    async def check_writable(self, wait_s: float | None = READY_WAIT_S) -> None:
        """Raise QueueFull/QueueBusy unless the queue could take a write now; QueueBusy
        too when the check takes over `wait_s` (a stalled disk: a probe never hangs)."""
        loop = asyncio.get_running_loop()
        checking = loop.run_in_executor(self._calls, self._call, ("check",))
        checking.add_done_callback(_retrieve)  # an answer after the wait is dropped
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(checking)
        except TimeoutError:
            raise QueueBusy(
                f"the queue did not answer within {wait_s:g} s (a stalled disk?)"
            ) from None

    def _call(self, message: tuple[Any, ...]) -> Any:
        """Send `message` to the writer and return its answer (in the calls thread). A
        writer that is gone is QueueBusy (503): its owner starts another, and the next
        call connects to that."""
        try:
            if self._conn is None:
                self._conn = self._link.connect()
            self._conn.send(message)
            kind, value = self._conn.recv()
        except (OSError, EOFError, AuthenticationError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._process is not None:
                self._process.restart_if_dead()
            raise QueueBusy(WRITER_GONE) from exc
        if kind == "error":
            try:
                raise value
            finally:
                # The refusal's traceback holds this frame: with `value` (the refusal) and
                # `message` (the group's events) left in it, they form a cycle that only
                # the cyclic collector frees, which app.py makes rare: 86,000 events of
                # refused groups were garbage at once under a minute of 503s.
                del value, message
        return value

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
                        self._calls, self._call, ("commit", [(p.events, p.notes) for p in group])
                    )
                except CollectorError as exc:
                    outcome = exc
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

    def _take_group(self) -> list[_Pending]:
        events = 0
        size = 0
        count = 0
        for pending in self._pending:
            more = len(pending.events)
            if count and (
                events + more > MAX_GROUP_EVENTS or size + pending.size > MAX_GROUP_BYTES
            ):
                break
            events += more
            size += pending.size
            count += 1
        group, self._pending = self._pending[:count], self._pending[count:]
        return group


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a late outcome nobody waits for any more, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()
