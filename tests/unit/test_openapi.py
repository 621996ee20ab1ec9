"""collector/server/openapi.py: the events request's schema takes its batch limit from its
argument (10% over it: what the server takes) and describes each event by the event schema.
"""

from __future__ import annotations

import pytest

from collector.errors import BadRequest
from collector.events import json_schema
from collector.server.ingest import Envelope, read_events
from collector.server.openapi import EVENTS_RESPONSES, envelope


@pytest.mark.parametrize("max_events", [1, 10, 1000, 10_000])
def test_the_envelope_allows_as_many_events_as_the_server_takes(max_events: int) -> None:
    events = envelope(max_events)["properties"]["events"]

    assert events["maxItems"] == max_events
    assert events["minItems"] == 1
    assert str(max_events) in events["description"]
    # the server takes exactly that many, and refuses one more naming the limit
    read = Envelope(max_events)
    body = b'{"events":[' + b",".join([b"{}"] * max_events) + b"]}"
    assert len(read_events(body, read)[0]) == max_events
    with pytest.raises(BadRequest, match=f"max {max_events}"):
        read_events(body.replace(b"[{}", b"[{},{}"), read)


def test_the_envelope_requires_events_and_describes_each_by_the_event_schema() -> None:
    schema = envelope(100)

    assert schema["required"] == ["events"]
    assert schema["properties"]["events"]["items"] == json_schema()
    assert schema["additionalProperties"] is True


def test_every_refusal_that_says_retry_documents_retry_after() -> None:
    assert "headers" in EVENTS_RESPONSES["429"]
    assert "headers" in EVENTS_RESPONSES["503"]
    assert "headers" not in EVENTS_RESPONSES["400"]
