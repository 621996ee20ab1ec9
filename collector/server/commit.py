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
import logging
import os
import pickle
import socket
import struct
from collections import deque
from multiprocessing.context import AuthenticationError
from typing import Any

from collector.errors import QueueBusy, QueueFull
from collector.server.counting import Note
from collector.server.writer import (
    CONNECT_WAIT_S,
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
# The socket's send buffer: a 1000-event request (about 600 kB pickled) goes to the kernel
# in one write (the default, 208 kB, took three, each waiting for the writer to read).
# Linux caps it at net.core.wmem_max (4 MiB here; 208 kB on some hosts: then it is slower,
# never wrong).
SEND_BUFFER_BYTES = 4 * 1024 * 1024
# multiprocessing.connection's framing: a signed 32-bit big-endian length, or -1 and then
# an unsigned 64-bit one for messages of 2 GiB and more.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


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
        self._answers: deque[asyncio.Future[Any]] = deque()  # due from the writer, in order
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
        if self._answers:
            await asyncio.wait(list(self._answers))
        self._disconnect()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
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
        answer = await self._send(("commit", [(events, notes)], size))
        try:
            # shield: a commit that outlasts the wait still stands (and its answer is then
            # dropped: the client's retry of those events is de-duplicated).
            async with asyncio.timeout(self._commit_timeout_s):
                skipped: list[list[int]] = await asyncio.shield(answer)
        except TimeoutError:
            answer.add_done_callback(_retrieve)  # its outcome comes later, to nobody
            raise QueueBusy(
                f"the queue did not commit within {self._commit_timeout_s:g} s (a stalled "
                "disk?); retry later"
            ) from None
        finally:
            # A refusal's traceback holds this frame, and the future holds the refusal: with
            # `answer` left here they form a cycle that keeps the request's events alive
            # until the cyclic collector runs, which app.py makes rare. Measured without
            # such care: 1.2 GB of garbage after a minute of 503s.
            del answer
        return skipped[0]

    async def check_writable(self, wait_s: float | None = READY_WAIT_S) -> None:
        """Raise QueueFull/QueueBusy unless the queue could take a write now; QueueBusy
        too when the check takes over `wait_s` (a stalled disk: a probe never hangs)."""
        checking = await self._send(("check",))
        checking.add_done_callback(_retrieve)  # an answer after the wait is dropped
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(checking)
        except TimeoutError:
            raise QueueBusy(
                f"the queue did not answer within {wait_s:g} s (a stalled disk?)"
            ) from None
        finally:
            del checking

    async def _send(self, message: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send `message` to the writer; returns the future of its answer. A writer that
        is gone is QueueBusy (503): its owner starts another, and a later call connects
        to that."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        if self._stream is None:
            try:
                await self._connect(0.0)
            except (OSError, EOFError, AuthenticationError) as exc:
                await self._restart_if_dead()
                raise QueueBusy(WRITER_GONE) from exc
        assert self._stream is not None
        answer = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        if len(data) < 0x7FFFFFFF:
            self._stream.writelines((_LENGTH.pack(len(data)), data))
        else:
            self._stream.writelines((_LENGTH.pack(-1), _LONG_LENGTH.pack(len(data)), data))
        return answer

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
        """Settle each answer's future, in order, until the connection ends; a writer that
        is gone fails every answer due with QueueBusy."""
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if length == -1:
                    (length,) = _LONG_LENGTH.unpack(await reader.readexactly(_LONG_LENGTH.size))
                kind, value = pickle.loads(await reader.readexactly(length))
                answer = self._answers.popleft()
                if answer.done():  # its request went away (a timeout): the commit stands
                    continue
                if kind == "error":
                    answer.set_exception(value)
                else:
                    answer.set_result(value)
                del answer, value  # a refusal's traceback would hold them (see `write`)
        except Exception as exc:  # the connection ended (or its bytes are not an answer)
            self._disconnect()
            while self._answers:
                answer = self._answers.popleft()
                if not answer.done():
                    answer.set_exception(QueueBusy(WRITER_GONE))
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a late outcome nobody waits for any more, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()
