"""Quick checks of `tests/upstream.py`, the fake upstream the forwarder tests rely on.

A forwarder test that fails should mean the forwarder is wrong, so the fake's recording,
fault modes and down/up behaviour are pinned here, over real HTTP with httpx.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import event
from upstream import DROPPED, Upstream

HTTP_DATE = "Wed, 21 Oct 2026 07:28:00 GMT"


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: creating one per request costs ~0.1 s (TLS setup)."""
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as running:
        yield running


def post(
    http: httpx.Client,
    upstream: Upstream,
    events: list[dict[str, Any]],
    *,
    key: str | None = "traffical_sk_test",
    batch_id: str = "batch-1",
) -> httpx.Response:
    """POST `events` as the forwarder does: gzip JSON, Bearer key, X-Batch-Id."""
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "X-Batch-Id": batch_id,
    }
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = gzip.compress(json.dumps({"events": events}).encode())
    return http.post(f"{upstream.url}/v1/events", content=body, headers=headers)


def test_gzip_batch_is_recorded(http: httpx.Client, upstream: Upstream) -> None:
    events = [event(id="e1"), event("decision", id="e2", extra={"new": True})]

    response = post(http, upstream, events, batch_id="b-42")

    assert response.status_code == 200
    assert response.json() == {"accepted": 2, "written": 2}
    [received] = upstream.requests
    assert (received.batch_id, received.key, received.status) == ("b-42", "traffical_sk_test", 200)
    assert received.headers["content-encoding"] == "gzip"
    assert received.events == events
    assert upstream.events == events
    assert upstream.event_ids() == ["e1", "e2"]


def test_fail_with_retry_after_then_ok(http: httpx.Client, upstream: Upstream) -> None:
    upstream.fail(503, retry_after=2, times=1)
    first = post(http, upstream, [event(id="e1")])
    upstream.fail(429, retry_after=HTTP_DATE)
    second = post(http, upstream, [event(id="e1")])
    upstream.ok()
    third = post(http, upstream, [event(id="e1")])

    assert (first.status_code, first.headers["Retry-After"]) == (503, "2")
    assert (second.status_code, second.headers["Retry-After"]) == (429, HTTP_DATE)
    assert third.status_code == 200
    assert [r.status for r in upstream.requests] == [503, 429, 200]
    assert {r.batch_id for r in upstream.requests} == {"batch-1"}
    assert upstream.event_ids() == ["e1"]


def test_fail_times_runs_out(http: httpx.Client, upstream: Upstream) -> None:
    upstream.fail(500, times=2)
    statuses = [post(http, upstream, [event(id="e1")]).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


def test_reject_ids_isolates_the_batch(http: httpx.Client, upstream: Upstream) -> None:
    upstream.reject_ids({"bad"})

    rejected = post(http, upstream, [event(id="good1"), event(id="bad")], batch_id="b1")
    accepted = post(http, upstream, [event(id="good2")], batch_id="b2")

    assert rejected.status_code == 400
    assert rejected.json() == {"error": "Bad Request", "message": "event bad is invalid"}
    assert accepted.status_code == 200
    assert upstream.event_ids() == ["good2"]
    assert [r.batch_id for r in upstream.accepted()] == ["b2"]


def test_down_refuses_and_up_restores_the_same_port(http: httpx.Client, upstream: Upstream) -> None:
    url = upstream.url
    assert post(http, upstream, [event(id="e1")]).status_code == 200  # leaves a pooled connection

    upstream.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", upstream.port), timeout=1).close()
    with pytest.raises(httpx.TransportError):
        post(http, upstream, [event(id="e2")])

    upstream.up()
    assert post(http, upstream, [event(id="e3")]).status_code == 200
    assert upstream.url == url
    assert upstream.event_ids() == ["e1", "e3"]


def test_keys_give_401_and_403(http: httpx.Client, upstream: Upstream) -> None:
    upstream.accept_keys({"good"})
    assert post(http, upstream, [event()], key="bad").status_code == 401
    assert post(http, upstream, [event()], key=None).status_code == 401
    assert post(http, upstream, [event()], key="good").status_code == 200

    upstream.require_keys({("proj_test", "production"): "prod"})
    assert post(http, upstream, [event()], key="prod").status_code == 200
    assert post(http, upstream, [event(env="staging")], key="prod").status_code == 403


def test_too_large_and_strict_envelope(http: httpx.Client, upstream: Upstream) -> None:
    upstream.too_large_over(200)
    assert post(http, upstream, [event(), event()]).status_code == 413
    upstream.too_large_over(None)
    nan_body = b'{"events": [{"type": "track", "value": NaN}]}'
    response = http.post(
        f"{upstream.url}/v1/events/batch",
        content=nan_body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert upstream.events == []


def test_slow_does_not_block_others_and_down_cuts_it(
    http: httpx.Client, upstream: Upstream
) -> None:
    outcome: list[object] = []

    def send_slowly() -> None:
        try:
            outcome.append(post(http, upstream, [event(id="slow")]).status_code)
        except httpx.TransportError as exc:
            outcome.append(exc)

    upstream.slow(5)
    sender = threading.Thread(target=send_slowly)
    sender.start()
    upstream.wait_until(lambda up: up.in_flight == 1, timeout=1, what="the slow request")
    upstream.slow(0)
    assert post(http, upstream, [event(id="quick")]).status_code == 200

    started = time.monotonic()
    upstream.down()
    sender.join(2)
    assert time.monotonic() - started < 1
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError)
    assert [r.status for r in upstream.requests] == [200, DROPPED]
    assert upstream.event_ids() == ["quick"]


def test_wait_for_events_times_out_with_a_summary(http: httpx.Client, upstream: Upstream) -> None:
    upstream.fail(503)
    post(http, upstream, [event()])
    with pytest.raises(AssertionError, match=r"1 requests \{503: 1\}"):
        upstream.wait_for_events(1, timeout=0.05)
