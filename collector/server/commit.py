"""Group commit, the server's side: each request's events handed to the queue writer.

Each events request sends its events to the writer process (`writer.py`) over one local
socket and waits for the answer; the writer commits everything that arrived while its
previous commit ran, from every server process, as one queue row. The answer to a request
comes only after that commit.

The socket is the event loop's own (asyncio streams, the framing of
`multiprocessing.connection` that the writer reads): a message is written by the loop and
its answer read by it, with no thread in between. Through a thread, each request's
message waited for the GIL that the busy loop held, at every write of the socket and again
for the answer (measured: a round trip of 17-21 ms for a commit the writer did in 6.5).
Messages are not held back for a group: the writer groups what is waiting, so a request is
on its way as soon as it is read, and several can be in flight; answers come in order.

The server that runs alone owns its writer (starts it, starts it again if it dies, stops
it last); with `workers` the supervisor does, and each server only connects to it
(`WriterLink`). A writer that is gone makes a request 503 (retry), never a lost event.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import pickle
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.context import AuthenticationError
from typing import Any

from collector.errors import CollectorError, QueueBusy, QueueFull
from collector.server.counting import Note
from collector.server.writer import (
    CONNECT_WAIT_S,
    LENGTH,
    LONG_LENGTH,
    MAX_GROUP_BYTES,
    MAX_GROUP_EVENTS,
    Events,
    Invalid,
    WriterConfig,
    WriterLink,
    WriterProcess,
    frames,
)

log = logging.getLogger("collector.commit")

WRITER_GONE = "queue writer restarted; retry later"
# How long /readyz waits for the writer to say the queue can take a write: probes time out
# after a second or more (Kubernetes: 1 s by default), and a stalled disk must read "not
# ready" rather than hang the probe.
READY_WAIT_S = 1.0
# The socket's send buffer: a 1000-event request (about 530 kB) goes to the kernel
# in one write (the default, 208 kB, took three, each waiting for the writer to read).
# Linux caps it at net.core.wmem_max (4 MiB here; 208 kB on some hosts: then it is slower,
# never wrong).
SEND_BUFFER_BYTES = 4 * 1024 * 1024


class Committer:
    """Takes requests' events on the event loop and has the writer commit them.

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
        self._stream: asyncio.StreamWriter | None = None
        self._outbox: list[_Request] = []  # requests of this turn of the loop, to send
        self._sending = False  # a call of _send_outbox is due
        self._answers: deque[list[asyncio.Future[Any]]] = deque()  # per message sent, in order
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
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
            await self._connect(CONNECT_WAIT_S)
        except (OSError, EOFError, AuthenticationError) as exc:
            raise QueueBusy(f"cannot reach the queue writer: {exc}") from exc
        try:
            await self.check_writable(wait_s=None)  # a writer starting takes its time
        except QueueFull as exc:
            log.warning("starting with the queue full: %s; answering 503 until space returns", exc)

    async def stop(self) -> None:
        """Wait for the answers due (every commit sent), then stop (and stop the writer, if
        owned); later writes are refused with 503."""
        self._closing = True
        await asyncio.sleep(0)  # the requests of this turn are sent
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        due = [answer for answers in self._answers for answer in answers]
        if due:
            await asyncio.wait(due)
        self._disconnect()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        if self._process is not None:
            await asyncio.to_thread(self._process.stop)

    async def write(
        self,
        events: Events,
        notes: list[Note],
        size: int = 0,
        invalid: list[Invalid] | None = None,
    ) -> list[int]:
        """Commit `events` (and have the writer count their `notes` and quarantine the
        request's `invalid` events); returns the indexes of those not written because
        their id is already stored. Raises QueueFull or QueueBusy."""
        if self._closing:
            raise QueueBusy("collector is shutting down; retry later")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[int]] = loop.create_future()
        self._outbox.append(_Request(events, notes, invalid or [], size, answer))
        if not self._sending:
            self._sending = True
            loop.call_soon(self._send_outbox)
        # A commit that outlasts the wait still stands: its answer, when it comes, finds
        # this one settled and is dropped (the client's retry is de-duplicated). A timer
        # that settles the answer, not asyncio.timeout and shield, which took 4-5% of the
        # server's CPU for 1-event requests (py-spy).
        expiry = loop.call_later(self._commit_timeout_s, _expire, answer, self._commit_timeout_s)
        try:
            return await answer
        finally:
            expiry.cancel()  # and so lets go of `answer`
            # A refusal's traceback holds this frame, and the future holds the refusal: with
            # `answer` left here they form a cycle that keeps the request's events alive
            # until the cyclic collector runs, which app.py makes rare. Measured without
            # such care: 1.2 GB of garbage after a minute of 503s.
            del answer

    async def check_writable(self, wait_s: float | None = READY_WAIT_S) -> None:
        """Raise QueueFull/QueueBusy unless the queue could take a write now; QueueBusy
        too when the check takes over `wait_s` (a stalled disk: a probe never hangs)."""
        checking: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        checking.add_done_callback(_retrieve)  # an answer after the wait is dropped
        if self._stream is None:
            await self._reconnect([checking])
        if self._stream is not None:
            self._send(("check",), [checking])
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(checking)
        except TimeoutError:
            raise QueueBusy(
                f"the queue did not answer within {wait_s:g} s (a stalled disk?)"
            ) from None
        finally:
            del checking

    def _send_outbox(self) -> None:
        """Send the requests that came in this turn of the loop, as few messages as the
        group bounds allow (one for 64 single-event requests: the writer's cost is per
        message)."""
        self._sending = False
        requests, self._outbox = self._outbox, []
        if not requests:
            return
        if self._stream is None:
            task = asyncio.create_task(self._send_after_reconnecting(requests))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        for part in _bounded(requests):
            sent = [(r.events, r.notes, r.invalid) for r in part]
            message = ("commit", sent, sum(r.size for r in part))
            self._send(message, [r.answer for r in part])

    async def _send_after_reconnecting(self, requests: list[_Request]) -> None:
        await self._reconnect([r.answer for r in requests])
        if self._stream is not None:
            self._outbox[:0] = requests
            self._send_outbox()

    async def _reconnect(self, answers: list[asyncio.Future[Any]]) -> None:
        """Connect again; a writer that is gone fails `answers` with QueueBusy (503): its
        owner starts another, and a later request connects to that."""
        try:
            await self._connect(0.0)
        except (OSError, EOFError, AuthenticationError):
            _fail(answers)
            await self._restart_if_dead()

    def _send(self, message: tuple[Any, ...], answers: list[asyncio.Future[Any]]) -> None:
        """Write `message`; `answers` are settled by its answer, in order of messages."""
        assert self._stream is not None
        self._answers.append(answers)
        self._stream.writelines(frames(message))

    async def _connect(self, wait_s: float) -> None:
        """Connect (the handshake that proves this process was started by the writer's
        owner is multiprocessing's, blocking: in a thread), then read answers on the loop."""
        async with self._connecting:
            if self._stream is not None:
                return
            conn = await asyncio.to_thread(self._link.connect, wait_s)
            try:
                sock = socket.socket(fileno=os.dup(conn.fileno()))
            finally:
                conn.close()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            reader, self._stream = await asyncio.open_unix_connection(sock=sock)
            self._reading = asyncio.create_task(self._read_answers(reader), name="writer-answers")

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        """Settle each message's answers, in order, until the connection ends; a writer
        that is gone fails every answer due with QueueBusy."""
        try:
            while True:
                (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                if length == -1:
                    (length,) = LONG_LENGTH.unpack(await reader.readexactly(LONG_LENGTH.size))
                kind, value = pickle.loads(await reader.readexactly(length))
                answers = self._answers.popleft()
                if kind == "error":
                    _fail(answers, value)
                else:
                    for answer, result in zip(answers, value or [None], strict=True):
                        if not answer.done():  # gone: a timeout (the commit stands)
                            answer.set_result(result)
                del answers, value  # a refusal's traceback would hold them (see `write`)
        except Exception as exc:  # the connection ended (or its bytes are not an answer)
            self._disconnect()
            while self._answers:
                _fail(self._answers.popleft())
            if not self._closing:
                log.warning("lost the connection to the queue writer: %r", exc)
                await self._restart_if_dead()

    def _disconnect(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    async def _restart_if_dead(self) -> None:
        if self._process is not None:
            await asyncio.to_thread(self._process.restart_if_dead)


@dataclass
class _Request:
    events: Events
    notes: list[Note]
    invalid: list[Invalid]
    size: int  # the request's body bytes: what its events cost on the way
    answer: asyncio.Future[list[int]]


def _bounded(requests: list[_Request]) -> Iterator[list[_Request]]:
    """`requests` in parts of at most MAX_GROUP_EVENTS events and MAX_GROUP_BYTES (a
    request larger than that is a part of its own)."""
    part: list[_Request] = []
    events = size = 0
    for request in requests:
        if part and (
            events + len(request.events) > MAX_GROUP_EVENTS or size + request.size > MAX_GROUP_BYTES
        ):
            yield part
            part, events, size = [], 0, 0
        part.append(request)
        events += len(request.events)
        size += request.size
    if part:
        yield part


def _fail(answers: list[asyncio.Future[Any]], error: CollectorError | None = None) -> None:
    """Fail each of `answers` still awaited, each with its own copy of `error` (one shared
    instance would collect every request's frames in its traceback as each re-raises it)."""
    for answer in answers:
        if not answer.done():
            answer.set_exception(copy.copy(error) if error else QueueBusy(WRITER_GONE))


def _expire(answer: asyncio.Future[Any], waited_s: float) -> None:
    if not answer.done():
        answer.set_exception(
            QueueBusy(
                f"the queue did not commit within {waited_s:g} s (a stalled disk?); retry later"
            )
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a late outcome nobody waits for any more, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()
