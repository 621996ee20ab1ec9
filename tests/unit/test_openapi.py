"""collector/server/openapi.py: the events request's schema takes its batch limit from its
argument (10% over it: what the server takes) and describes each event by the event schema.
"""

from __future__ import annotations

import pytest

from collector.errors import BadRequest
from collector.events import json_schema
from collector.server.ingest import envelope_events
from collector.server.openapi import EVENTS_RESPONSES, envelope


@pytest.mark.parametrize(("max_events", "max_items"), [(1, 1), (10, 11), (1000, 1100), (25, 27)])
def test_the_envelope_allows_as_many_events_as_the_server_takes(
    max_events: int, max_items: int
) -> None:
    events = envelope(max_events)["properties"]["events"]

    assert events["maxItems"] == max_items
    assert events["minItems"] == 1
    assert str(max_events) in events["description"]
    # the server takes exactly that many, and refuses one more
    assert len(envelope_events({"events": [{}] * max_items}, max_events)) == max_items
    with pytest.raises(BadRequest):
        envelope_events({"events": [{}] * (max_items + 1)}, max_events)


def test_the_envelope_requires_events_and_describes_each_by_the_event_schema() -> None:
    schema = envelope(100)

    assert schema["required"] == ["events"]
    assert schema["properties"]["events"]["items"] == json_schema()
    assert schema["additionalProperties"] is True


def test_every_refusal_that_says_retry_documents_retry_after() -> None:
    assert "headers" in EVENTS_RESPONSES["429"]
    assert "headers" in EVENTS_RESPONSES["503"]
    assert "headers" not in EVENTS_RESPONSES["400"]
