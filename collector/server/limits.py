"""Limits on what one client connection may cost: the ones uvicorn's httptools server lacks.

uvicorn bounds neither the size of a request's head nor the time a client may take to send
it, and it never closes a connection that opened but sent nothing: a client trickling
headers a byte at a time, or thousands of idle sockets, would each hold memory and a file
descriptor for ever. `GuardedHttpToolsProtocol` adds, per connection:

- a head limit (`max_header_bytes`: request line and headers): past it, 431 and closed,
  counted on the bytes as they arrive, so a never-ending header line costs at most that;
- a deadline (`request_timeout_seconds`) for the head, from the connection's opening or the
  request's first byte: past it, 408 and closed (an idle new connection is just closed);
- the same deadline for the rest of a body nobody reads any more (the answer, a 401 say,
  went before it): past it, closed, so an unread trickle cannot hold the connection;
- a cap on open connections (`max_connections`): more are closed on arrival.

`guarded` (an ASGI wrapper) gives the body the same deadline once the head is in: a client
that trickles its body gets 408 through the app, in the error shape, and is disconnected.
Keep-alive idle time between requests is uvicorn's `timeout_keep_alive`.

Answers refused here (400, 408, 431) are written by the protocol in the error shape, then
the connection is half-closed and kept reading (and discarding) for LINGER_S before it is
closed: closing at once with the client's bytes unread would reset the connection, and the
client would see a network error instead of the answer.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from litestar.enums import ScopeType
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from collector.errors import RequestTimeout

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

    from collector.settings import Settings

log = logging.getLogger("collector.server")

# File descriptors kept beyond max_connections for the queue, logs, counts and the like.
FD_HEADROOM = 256
# A burst of refused connections is logged at most once per this many seconds.
WARN_EVERY_S = 10.0
# The end of a request head, with CRLF or (leniently) bare LF line endings.
HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
# Seconds a refused connection is kept reading (and discarding) before it is closed.
LINGER_S = 2.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, deadlines for the head and for
    unread bodies, and a cap on connections; `protocol_class` sets them from the settings."""

    max_header_bytes = 32 * 1024
    request_timeout_s = 30.0
    max_connections = 4096

    _deadline: asyncio.TimerHandle | None = None
    _in_head = True  # the next bytes belong to a request head
    _head_bytes = 0  # bytes of the current head received so far
    _head_tail = b""  # the last bytes of the head so far, to find an end split over reads
    _refused = False  # answered by `_refuse`: what comes now is discarded

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _warn_sometimes(
                "refusing connections: %d are open (max_connections)", len(self.connections)
            )
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += self._head_part(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"the request line and headers are larger than {self.max_header_bytes} bytes",
                )
                return
        super().data_received(data)

    def _head_part(self, data: bytes) -> int:
        """How many bytes of `data` belong to the head (all of them if it does not end)."""
        tail = self._head_tail
        self._head_tail = (tail + data[-3:])[-3:]
        # Only as far as the head may still reach: past it the head is too large anyway,
        # and a request's first read often holds 64 KiB of body (searched twice, and
        # copied, it cost 2% of the server's time under 1000-event requests).
        seen = tail + data[: self.max_header_bytes - self._head_bytes + len(HEAD_ENDS[0])]
        ends = [i + len(end) for end in HEAD_ENDS if (i := seen.find(end)) >= 0]
        return max(0, min(ends) - len(tail)) if ends else len(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_tail = b""
        self._disarm()  # the app times the body (`guarded`)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and not self.transport.is_closing():
            self._arm()  # answered before the body was all in: the rest has a deadline too

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in the error shape."""
        self._refuse(HTTPStatus.BAD_REQUEST, msg)

    def _arm(self, seconds: float | None = None) -> None:
        self._disarm()
        delay = self.request_timeout_s if seconds is None else seconds
        self._deadline = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._head_bytes and not self._refused and not answering:
            self._refuse(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request headers were not received within {self.request_timeout_s:g} s",
            )
        else:  # an idle connection, an unread body, an answer under way, or lingering over
            self.transport.close()

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer `status` in the error shape, stop reading requests, close soon after."""
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # the app is answering this request: no second answer
            return
        body = orjson.dumps({"error": status.phrase, "message": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm(LINGER_S)
        else:
            self.transport.close()


def protocol_class(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http` option, with the limits of `settings`."""

    class Configured(GuardedHttpToolsProtocol):
        max_header_bytes = settings.max_header_bytes
        request_timeout_s = settings.request_timeout_seconds
        max_connections = settings.max_connections

    return Configured


def guarded(app: ASGIApp, timeout_s: float) -> ASGIApp:
    """Wrap `app`: a request body must arrive within `timeout_s` of the app's start, else
    RequestTimeout (408, and the connection is closed)."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or _body_is_in(receive):
            await app(scope, receive, send)  # nothing left to wait for: no deadline
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        body_done = False

        async def timed_receive() -> ReceiveMessage:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body was not received within {timeout_s:g} s"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 408:
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, timed_receive, closing_send)

    return wrapper


def _body_is_in(receive: Receive) -> bool:
    """Whether the whole request body has arrived already, so no receive can wait: nearly
    always for a small request (its body comes with the head). Read from uvicorn's cycle
    (`receive` is its bound method): the deadline, built for each receive, took 3-4% of
    the server's time for 1-event requests (py-spy). False when it cannot tell."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


def raise_open_files_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files to fit `max_connections` (systemd and
    most shells start services at 1024), within the hard limit; returns the limit now."""
    wanted = max_connections + FD_HEADROOM
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return wanted
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # a sandbox may refuse (systemd: set LimitNOFILE)
        log.warning("could not raise the open files limit for max_connections: %s", exc)
        return 0
    if target < wanted:
        log.warning(
            "open files are limited to %d, fewer than max_connections (%d) needs; raise "
            "LimitNOFILE or lower max_connections",
            target,
            max_connections,
        )
    return max(target, soft)


_last_warning = [0.0]


def _warn_sometimes(message: str, *args: Any) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= WARN_EVERY_S:
        _last_warning[0] = now
        log.warning(message, *args)
