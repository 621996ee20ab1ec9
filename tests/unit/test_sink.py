"""forwarder/sink.py: what each upstream answer to an events batch means for its events
(`result_of`: Delivered, Rejected, KeyRejected or RetryLater, with a bounded reason and the
upstream's Retry-After), and `EventsSink.send` against a real asyncio server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from collector.store.counts import UpstreamOutcome
from forwarder.sink import (
    BATCH_ID_HEADER,
    OUTCOME,
    REASON_CHARS,
    SHOWN_CHARS,
    Delivered,
    EventsSink,
    KeyRejected,
    Rejected,
    Result,
    RetryLater,
    result_of,
)


@pytest.mark.parametrize("status", [200, 201, 202])
def test_a_2xx_with_the_events_apis_answer_means_delivered(status: int) -> None:
    assert result_of(status, '{"accepted": 3, "written": 3}', "30", 3) == Delivered(status)
    assert result_of(status, '{"accepted": 0, "validationErrors": []}', None, 0) == Delivered(
        status
    )


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Please log in to the Wi-Fi</body></html>",
        "",
        '{"ok": true}',
        '{"accepted": "3"}',
        '{"accepted": true}',
        "[1, 2]",
    ],
)
def test_a_2xx_without_the_events_apis_answer_is_retried(body: str) -> None:
    result = result_of(200, body, None, 3)

    assert isinstance(result, RetryLater)
    assert result.reason.startswith("HTTP 200 without the events API's answer")
    assert len(result.reason) < 300  # a page is shown in part, never whole


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refusal_of_the_content_means_rejected_with_the_upstreams_reason(status: int) -> None:
    result = result_of(status, '  {"error":"bad event 3"}\n', None, 3)

    assert result == Rejected(status, f'HTTP {status}: {{"error":"bad event 3"}}')


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_of_the_key_means_key_rejected(status: int) -> None:
    assert result_of(status, "no such key", None, 3) == KeyRejected(
        status, f"HTTP {status}: no such key"
    )


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 301, 302, 304, 404, 409, 100])
def test_anything_else_means_retry_later(status: int) -> None:
    result = result_of(status, "later", None, 3)

    assert result == RetryLater(f"HTTP {status}: later", None)


def test_retry_later_carries_the_upstreams_retry_after_in_seconds() -> None:
    assert result_of(429, "slow down", "7", 3) == RetryLater("HTTP 429: slow down", 7.0)
    assert result_of(503, "", "garbage", 3) == RetryLater("HTTP 503: ", None)


def test_a_long_error_body_is_cut_to_reason_chars() -> None:
    body = "x" * REASON_CHARS + "TAIL"

    result = result_of(400, body, None, 3)

    assert isinstance(result, Rejected)
    assert result.reason == f"HTTP 400: {'x' * REASON_CHARS}"
    assert "TAIL" not in result.reason


def test_a_2xx_naming_rejected_events_delivers_the_rest_and_keeps_each_reason() -> None:
    """The Traffical API's schema enforcement in `reject` mode drops events and still
    answers 200, naming them by index; a tiered collector does the same."""
    body = (
        '{"accepted": 3, "validationErrors": [{"index": 1, "error": "properties.plan: not'
        ' allowed"}, {"index": 4, "error": "name: required"}, {"index": 1, "error": "again"},'
        ' {"index": 9, "error": "out of range"}, {"index": true, "error": "not an index"},'
        ' "not an object"]}'
    )

    result = result_of(200, body, None, 5)

    assert result == Delivered(
        200, rejected={1: "properties.plan: not allowed", 4: "name: required"}
    )


def test_a_2xx_accepting_fewer_than_it_explains_counts_the_rest_unconfirmed() -> None:
    assert result_of(200, '{"accepted": 990}', None, 1000) == Delivered(200, unconfirmed=10)
    named = '{"accepted": 7, "validationErrors": [{"index": 0, "error": "bad"}]}'
    assert result_of(200, named, None, 10) == Delivered(200, {0: "bad"}, unconfirmed=2)
    # More accepted than sent, or than the named rejections leave: nothing is unconfirmed.
    assert result_of(200, '{"accepted": 12}', None, 10) == Delivered(200)
    assert result_of(200, '{"accepted": -5}', None, 2) == Delivered(200, unconfirmed=2)


def test_schema_warnings_name_the_event_of_each_warned_index() -> None:
    body = (
        '{"accepted": 3, "schemaWarnings": [{"index": 0, "event": "purchase", "violations":'
        ' [{"path": "value", "message": "must be a number", "rule": "type"}]},'
        ' {"index": 2, "event": "signup", "violations": []}, {"index": 7, "event": "x"}]}'
    )

    assert result_of(200, body, None, 3) == Delivered(200, warned={0: "purchase", 2: "signup"})


def test_a_rejection_reason_in_a_2xx_is_cut_and_redacted() -> None:
    error = "echo traffical_sk_SECRET " + "y" * 1000
    body = json.dumps({"accepted": 0, "validationErrors": [{"index": 0, "error": error}]})

    result = result_of(200, body, None, 1)

    assert isinstance(result, Delivered)
    assert "SECRET" not in result.rejected[0] and len(result.rejected[0]) == REASON_CHARS


def test_each_result_is_counted_as_its_own_outcome() -> None:
    assert OUTCOME[Delivered] is UpstreamOutcome.DELIVERED
    assert OUTCOME[RetryLater] is UpstreamOutcome.RETRY
    assert OUTCOME[Rejected] is UpstreamOutcome.REJECTED
    assert OUTCOME[KeyRejected] is UpstreamOutcome.KEY_REJECTED


# --- send, against a real server -----------------------------------------------------------


def sent_to(reply_head: bytes, reply: bytes = b"") -> tuple[Result, dict[str, str], bytes]:
    """(what `send` made of `reply_head` + `reply` as the body, the request's headers, its
    body)."""
    seen: dict[str, str] = {}
    bodies: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *fields = head.split("\r\n")
        seen["request-line"] = line
        for field in filter(None, fields):
            name, _, value = field.partition(":")
            seen[name.strip().lower()] = value.strip()
        bodies.append(await reader.readexactly(int(seen["content-length"])))
        length = b"Content-Length: %d\r\n" % len(reply)
        writer.write(reply_head + length + b"Connection: close\r\n\r\n" + reply)
        await writer.drain()
        writer.close()

    async def scenario() -> Result:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sink = EventsSink(f"http://127.0.0.1:{port}", deadline_s=5.0, connections=1)
        try:
            return await sink.send(b"\x1f\x8bgzipped", 1, "upstream-key", "batch-1")
        finally:
            await sink.aclose()
            server.close()
            await server.wait_closed()

    result = asyncio.run(scenario())
    return result, seen, bodies[0]


def test_send_posts_the_gzipped_batch_with_its_key_and_batch_id() -> None:
    result, headers, body = sent_to(b"HTTP/1.1 202 Accepted\r\n", b'{"accepted": 1}')

    assert result == Delivered(202)
    assert headers["request-line"] == "POST /v1/events HTTP/1.1"
    assert headers["authorization"] == "Bearer upstream-key"
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"] == "application/json"
    assert headers[BATCH_ID_HEADER.lower()] == "batch-1"
    assert body == b"\x1f\x8bgzipped"


def test_send_turns_a_503_with_retry_after_into_retry_later() -> None:
    result, _, _ = sent_to(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\n")

    assert result == RetryLater("HTTP 503: ", 3.0)


def test_send_turns_a_503_with_an_unreadable_retry_after_into_retry_later() -> None:
    result, _, _ = sent_to(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: \xb2\r\n")

    assert result == RetryLater("HTTP 503: ", None)


def test_send_to_a_closed_port_is_retry_later() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> Result:
        sink = EventsSink(f"http://127.0.0.1:{port}", deadline_s=2.0, connections=1)
        try:
            return await sink.send(b"", 1, "k", "b")
        finally:
            await sink.aclose()

    result = asyncio.run(scenario())

    assert isinstance(result, RetryLater)
    assert result.reason.startswith("upstream unreachable")
    assert result.retry_after is None


def test_what_is_shown_of_an_error_body_is_short_and_has_no_key_or_token() -> None:
    body = "echo: traffical_sk_SECRET-123 and Authorization: Bearer tok.en, " + "x" * 1000

    for result in (result_of(503, body, None, 3), result_of(401, body, None, 3)):
        assert isinstance(result, RetryLater | KeyRejected)
        assert "SECRET" not in result.reason and "tok.en" not in result.reason
        assert result.reason.count("(redacted)") == 2
        assert len(result.reason) <= len("HTTP 503: ") + SHOWN_CHARS
    kept = result_of(400, body, None, 3)  # a dead letter's reason: longer, still redacted
    assert isinstance(kept, Rejected)
    assert "SECRET" not in kept.reason
    assert len(kept.reason) == len("HTTP 400: ") + REASON_CHARS
