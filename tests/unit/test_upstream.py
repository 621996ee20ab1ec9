"""collector/upstream.py: what a status means (`classify`), `Retry-After` as seconds, and
`Upstream.exchange` against real asyncio servers on 127.0.0.1: a whole answer, one deadline
for the whole exchange (a trickling upstream trips it), a closed port, redirects not followed.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from collector.errors import UpstreamAnswerTooLarge, UpstreamTimeout, UpstreamUnreachable
from collector.upstream import Reply, Upstream, Verdict, classify, retry_after

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
NOW = 1_800_000_000.0  # a fixed "now" for HTTP dates


# --- classify --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.ACCEPTED),
        (202, Verdict.ACCEPTED),
        (204, Verdict.ACCEPTED),
        (299, Verdict.ACCEPTED),
        (300, Verdict.REDIRECT),
        (301, Verdict.REDIRECT),
        (302, Verdict.REDIRECT),
        (304, Verdict.REDIRECT),
        (308, Verdict.REDIRECT),
        (401, Verdict.KEY_REFUSED),
        (403, Verdict.KEY_REFUSED),
        (400, Verdict.CONTENT_REFUSED),
        (413, Verdict.CONTENT_REFUSED),
        (422, Verdict.CONTENT_REFUSED),
        (408, Verdict.TRANSIENT),
        (429, Verdict.TRANSIENT),
        (500, Verdict.TRANSIENT),
        (502, Verdict.TRANSIENT),
        (503, Verdict.TRANSIENT),
        (504, Verdict.TRANSIENT),
        (599, Verdict.TRANSIENT),
        (404, Verdict.OTHER),
        (405, Verdict.OTHER),
        (409, Verdict.OTHER),
        (410, Verdict.OTHER),
        (418, Verdict.OTHER),
        (100, Verdict.OTHER),
    ],
)
def test_each_status_class_gets_its_verdict(status: int, verdict: Verdict) -> None:
    assert classify(status) is verdict
    assert Reply(status, {}, b"").verdict is verdict


# --- retry_after -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("7", 7.0), ("120", 120.0), (" 30 ", 30.0)],
)
def test_retry_after_in_delay_seconds_is_that_many_seconds(value: str, seconds: float) -> None:
    assert retry_after(value, now=NOW) == seconds


def test_retry_after_as_an_http_date_in_the_future_is_the_seconds_until_then() -> None:
    future = email.utils.formatdate(NOW + 90, usegmt=True)

    assert retry_after(future, now=NOW) == pytest.approx(90.0)


def test_retry_after_as_an_http_date_in_the_past_is_zero_not_negative() -> None:
    past = email.utils.formatdate(NOW - 3600, usegmt=True)

    assert retry_after(past, now=NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Tuesday, at noon", "12abc"])
def test_retry_after_absent_or_garbage_is_none(value: str | None) -> None:
    assert retry_after(value, now=NOW) is None


def test_retry_after_of_a_superscript_digit_is_garbage_not_a_crash() -> None:
    assert retry_after("²", now=NOW) is None


# --- exchange against real servers -------------------------------------------------------


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """(request line, header names lower-case, body) of one HTTP/1.1 request."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *fields = head.split("\r\n")
    headers = {}
    for field in fields:
        if field:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


def answer(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{n}: {v}" for n, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_whole_answer_is_a_reply_with_lower_case_header_names_and_the_body() -> None:
    received: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        writer.write(
            answer(
                "201 Created",
                [("X-Request-Echo", "yes"), ("ETag", '"v1"'), ("X-Repeat", "a"), ("X-Repeat", "b")],
                b'{"ok":true}',
            )
        )
        await writer.drain()
        writer.close()

    async def scenario() -> Reply:
        server, url = await serve(handler)
        upstream = Upstream(url, max_connections=2)
        try:
            return await upstream.exchange(
                "POST",
                "/v1/events",
                headers={"Authorization": "Bearer k"},
                body=b'{"events":[]}',
                deadline_s=5.0,
                max_body_bytes=1024,
            )
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    reply = asyncio.run(scenario())

    assert reply.status == 201
    assert reply.verdict is Verdict.ACCEPTED
    assert reply.body == b'{"ok":true}'
    assert reply.text == '{"ok":true}'
    assert reply.headers["x-request-echo"] == "yes"
    assert reply.headers["etag"] == '"v1"'
    assert reply.headers["x-repeat"] == "a, b"  # repeats joined
    assert all(name == name.lower() for name in reply.headers)
    line, headers, body = received[0]
    assert line == "POST /v1/events HTTP/1.1"
    assert headers["authorization"] == "Bearer k"
    assert headers["user-agent"] == "traffical-collector"
    assert body == b'{"events":[]}'


def test_a_trickling_upstream_trips_the_whole_exchange_deadline() -> None:
    """A byte every 0.1 s never trips a per-read timeout of 0.3 s; the deadline does."""
    whole = answer("200 OK", [("Content-Type", "application/json")], b'{"ok":true}' * 10)
    sent: list[int] = []
    hung_up = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        try:
            for byte in whole:
                if reader.at_eof() or writer.is_closing():
                    break  # the client hung up
                writer.write(bytes([byte]))
                await writer.drain()
                sent.append(byte)
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass  # the client gave up, as it should
        finally:
            hung_up.set()
            writer.close()

    async def scenario() -> float:
        server, url = await serve(handler)
        upstream = Upstream(url, max_connections=2)
        started = time.monotonic()
        try:
            with pytest.raises(UpstreamTimeout, match=r"0\.3 s"):
                await upstream.exchange(
                    "GET", "/slow", headers={}, body=None, deadline_s=0.3, max_body_bytes=1024
                )
            elapsed = time.monotonic() - started
            # The connection was dropped at the deadline, not left to trickle on.
            await asyncio.wait_for(hung_up.wait(), 1.0)
            return elapsed
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    elapsed = asyncio.run(scenario())

    assert 0.25 <= elapsed < 1.0
    assert 0 < len(sent) < len(whole)  # it was answering, slowly, when the deadline hit


def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens

    async def scenario() -> None:
        upstream = Upstream(f"http://127.0.0.1:{port}", max_connections=1)
        try:
            await upstream.exchange(
                "GET", "/", headers={}, body=None, deadline_s=2.0, max_body_bytes=1024
            )
        finally:
            await upstream.aclose()

    with pytest.raises(UpstreamUnreachable, match="unreachable"):
        asyncio.run(scenario())


def test_a_redirect_comes_back_as_the_reply_and_is_not_followed() -> None:
    paths: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        paths.append(line.split()[1])
        writer.write(answer("302 Found", [("Location", "/elsewhere")], b"moved"))
        await writer.drain()
        writer.close()

    async def scenario() -> Reply:
        server, url = await serve(handler)
        upstream = Upstream(url + "/", max_connections=2)  # a trailing slash is dropped
        try:
            return await upstream.exchange(
                "GET", "/v1/config/p", headers={}, body=None, deadline_s=5.0, max_body_bytes=1024
            )
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    reply = asyncio.run(scenario())

    assert reply.status == 302
    assert reply.verdict is Verdict.REDIRECT
    assert reply.headers["location"] == "/elsewhere"
    assert paths == ["/v1/config/p"]


@pytest.mark.parametrize("cut", [True, False])
def test_an_answer_past_the_bound_is_cut_or_refused_never_read_whole(cut: bool) -> None:
    """64 MiB offered, 1000 bytes wanted: the start (`cut`) or UpstreamAnswerTooLarge, and
    the connection dropped long before the upstream could send it all."""
    offered = 64 * 1024 * 1024
    sent: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % offered)
        chunk = b"e" * 65536
        try:
            for _ in range(offered // len(chunk)):
                writer.write(chunk)
                await writer.drain()
                sent.append(len(chunk))
        except ConnectionError:
            pass  # the client hung up, as it should
        finally:
            writer.close()

    async def scenario() -> Reply:
        server, url = await serve(handler)
        upstream = Upstream(url, max_connections=1)
        try:
            return await upstream.exchange(
                "GET", "/big", headers={}, body=None, deadline_s=10.0, max_body_bytes=1000, cut=cut
            )
        finally:
            await upstream.aclose()
            server.close()
            await server.wait_closed()

    if cut:
        reply = asyncio.run(scenario())
        assert reply.status == 503
        assert reply.truncated and reply.body == b"e" * 1000
    else:
        with pytest.raises(UpstreamAnswerTooLarge, match="larger than 1000 bytes"):
            asyncio.run(scenario())
    assert sum(sent) < offered // 2  # not read to the end
