"""The official `traffical` Python SDK, pointed at a real collector, is understood as sent.

The SDK's HTTP goes through `Recorder`, an httpx transport that keeps each request body and
answer status and forwards the request unchanged to the collector over a real socket
(`httpx.HTTPTransport`). Each test then compares what the SDK sent, event by event and
field by field, with what the collector committed to its SQLite queue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from traffical import TrafficalClient, TrafficalClientOptions
from traffical.config.source import InlineConfigSource
from traffical.options import SDK_NAME, SDK_VERSION

from conftest import Server, dlq_list_json, run_cli, serve_for_module
from sdk_support import (
    CONTROL_UNIT,
    EXPECTED_EVENT_TYPES,
    PAGE_VIEW_EVENT,
    PURCHASE_EVENT,
    TREATMENT_UNIT,
    drive_sdk,
    inline_bundle,
)

EVENTS_PATH = "/v1/events/batch"


@dataclass(frozen=True)
class Exchange:
    """One request the SDK made, and the collector's answer."""

    method: str
    path: str
    headers: httpx.Headers
    body: bytes
    status: int

    def events(self) -> list[dict[str, Any]]:
        # The SDK's own encoder may write bare NaN/Infinity; Python's parser reads them.
        return list(json.loads(self.body)["events"])


class Recorder(httpx.BaseTransport):
    """Records each request and its answer status, forwarding it to the real server."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._forward = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        response = self._forward.handle_request(request)
        response.read()
        self.exchanges.append(
            Exchange(request.method, request.url.path, request.headers, body, response.status_code)
        )
        return response

    def close(self) -> None:
        self._forward.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One collector for the module; each test compares only the events it added."""
    yield from serve_for_module(tmp_path_factory, "sdk")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    transport = Recorder()
    yield transport
    transport.close()


@pytest.fixture
def client(collector: Server, recorder: Recorder) -> Iterator[TrafficalClient]:
    """A real SDK client whose base URL is the collector, config inline, sending on flush."""
    bundle = inline_bundle()
    options = TrafficalClientOptions(
        api_key=collector.key,
        org_id=bundle["orgId"],
        project_id=bundle["projectId"],
        env=bundle["env"],
        base_url=collector.url,
        local_config=bundle,
        config_source=InlineConfigSource(bundle),
        refresh_interval_seconds=0,
        batch_size=100,
        flush_interval_seconds=3600.0,
        event_max_retries=0,
        transport=recorder,
    )
    sdk = TrafficalClient(options)
    sdk.wait_for_ready(5.0)
    yield sdk
    sdk.close()


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 and true from 1."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def assert_stored_as_sent(stored: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
    """Same events in the same order, each with every field the SDK sent, value by value."""
    assert len(stored) == len(sent)
    for got, want in zip(stored, sent, strict=True):
        assert set(got) == set(want), f"fields differ for {want.get('type')} {want.get('id')}"
        for name, value in want.items():
            assert got[name] == value, f"{want['type']}.{name}"
            assert canonical(got[name]) == canonical(value), f"{want['type']}.{name}"


def finite_or_null(value: Any) -> Any:
    """`value` with NaN and infinities as null, as the collector forwards them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def test_sdk_decisions_exposures_and_tracks_are_stored_as_the_sdk_sent_them(
    collector: Server, recorder: Recorder, client: TrafficalClient
) -> None:
    before = len(collector.stored())
    run = drive_sdk(client)
    assert run.flushed

    assert [(x.method, x.path) for x in recorder.exchanges] == [("POST", EVENTS_PATH)]
    exchange = recorder.exchanges[0]
    assert exchange.status == 200  # the SDK's flush is True even on a 400
    assert exchange.headers["authorization"] == f"Bearer {collector.key}"

    sent = exchange.events()
    assert tuple(e["type"] for e in sent) == EXPECTED_EVENT_TYPES
    stored = collector.stored()[before:]
    assert_stored_as_sent(stored, sent)

    # The events are the ones the scenario made, not just any five.
    decisions, exposure, purchase, page_view = stored[:2], stored[2], stored[3], stored[4]
    assert [d["id"] for d in decisions] == list(run.decision_ids)
    assert [d["unitKey"] for d in decisions] == [CONTROL_UNIT, TREATMENT_UNIT]
    assert exposure["decisionId"] == run.decision_ids[0]
    assert (purchase["event"], purchase["decisionId"]) == (PURCHASE_EVENT, run.decision_ids[0])
    assert purchase["properties"] == {"sku": "SKU-42", "quantity": 2, "coupon": None}
    assert (purchase["value"], purchase["values"]) == (49.99, {"revenue": 49.99, "items": 2})
    assert purchase["attribution"]
    assert (page_view["event"], page_view["unitKey"]) == (PAGE_VIEW_EVENT, TREATMENT_UNIT)


def test_a_retried_sdk_batch_is_accepted_and_not_stored_twice(
    collector: Server, recorder: Recorder, client: TrafficalClient
) -> None:
    before = len(collector.stored())
    drive_sdk(client)
    exchange = recorder.exchanges[0]
    assert exchange.status == 200

    # The SDK re-sends a batch verbatim after a network error or 5xx; replay its request.
    replay = httpx.post(
        f"{collector.url}{EVENTS_PATH}",
        content=exchange.body,
        headers={k: exchange.headers[k] for k in ("authorization", "content-type")},
        timeout=10,
    )
    assert replay.status_code == 200, replay.text
    assert replay.json() == {"accepted": 5, "written": 0, "pipelineWritten": 0}
    assert_stored_as_sent(collector.stored()[before:], exchange.events())


def test_sdk_track_with_default_unit_key_and_non_finite_numbers_is_stored_with_nulls(
    collector: Server, recorder: Recorder, client: TrafficalClient
) -> None:
    before = len(collector.stored())
    client.track("checkout_started")  # no unit key: the SDK sends unitKey ""
    client.track(
        "score",
        {"ratio": float("nan"), "limits": [float("inf"), -float("inf"), 1.5]},
        value=float("nan"),
        values={"up": float("inf"), "ok": 2},
    )
    assert client.flush_events(timeout=10.0)

    assert [x.status for x in recorder.exchanges] == [200]
    body = recorder.exchanges[0].body
    assert b"NaN" in body and b"Infinity" in body  # the bare tokens did go over the wire
    sent = recorder.exchanges[0].events()
    assert [e["unitKey"] for e in sent] == ["", ""]
    assert_stored_as_sent(collector.stored()[before:], finite_or_null(sent))


def test_an_invalid_sdk_track_among_valid_ones_is_quarantined_with_the_sdk_that_sent_it(
    collector: Server, recorder: Recorder, client: TrafficalClient
) -> None:
    before = len(collector.stored())
    # The SDK checks no event name: track("") goes out as `"event": ""`, which the
    # collector's validator refuses (a track's `event` must not be empty).
    client.track(PURCHASE_EVENT, {"sku": "SKU-7"}, unit_key=CONTROL_UNIT, value=5.0)
    client.track("", {"sku": "SKU-8"}, unit_key=CONTROL_UNIT)
    client.track(PAGE_VIEW_EVENT, {"path": "/cart"}, unit_key=TREATMENT_UNIT)
    assert client.flush_events(timeout=10.0)

    assert [(x.method, x.path, x.status) for x in recorder.exchanges] == [
        ("POST", EVENTS_PATH, 200)  # the answer's validationErrors are not read by the SDK
    ]
    exchange = recorder.exchanges[0]
    sent = exchange.events()
    assert [e["event"] for e in sent] == [PURCHASE_EVENT, "", PAGE_VIEW_EVENT]
    valid, invalid = [sent[0], sent[2]], sent[1]
    assert_stored_as_sent(collector.stored()[before:], valid)

    # The SDK names itself in each event (no X-SDK-* headers): that is the source.
    assert (invalid["sdkName"], invalid["sdkVersion"]) == (SDK_NAME, SDK_VERSION)
    letters = [
        letter
        for letter in dlq_list_json(collector.data_dir)
        if letter["event_id"] == invalid["id"]
    ]
    assert len(letters) == 1, f"event {invalid['id']} is not in the quarantine"
    (letter,) = letters
    assert letter["reason"].startswith("quarantined: event: ")  # the field at fault
    assert letter["source"] == f"{SDK_NAME}/{SDK_VERSION}"
    assert (letter["type"], letter["project"], letter["env"]) == (
        "track",
        invalid["projectId"],
        invalid["env"],
    )

    # `dlq export` gives the event back as the SDK's own bytes, not re-encoded.
    raw = json.dumps(invalid, separators=(",", ":")).encode()
    assert raw in exchange.body  # the SDK's encoding of that one event, as it went out
    exported = run_cli("dlq", "export", data_dir=collector.data_dir)
    assert exported.returncode == 0, exported.stderr
    lines = [
        line
        for line in exported.stdout.encode().splitlines()
        if orjson.loads(line)["id"] == letter["id"]
    ]
    assert len(lines) == 1
    assert lines[0].endswith(b'"event": ' + raw + b"}")
    exported_letter = orjson.loads(lines[0])
    assert exported_letter["event"] == invalid
    assert (exported_letter["reason"], exported_letter["source"]) == (
        letter["reason"],
        letter["source"],
    )
