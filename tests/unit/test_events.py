"""collector/events.py: the OpenAPI schema of an event (`json_schema`) is self-contained and
requires, for each event type, exactly the fields the validator (`decode_all`) requires;
the validator reads numbers it does not compute with as they are, and names the field at
fault.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from collector.events import EVENT_TYPES, Track, decode_all, json_schema, number

from conftest import event

# A valid value for each field any event type may require.
SAMPLES: dict[str, Any] = {
    "orgId": "org_1",
    "projectId": "proj_1",
    "env": "production",
    "unitKey": "user-1",
    "timestamp": "2026-05-21T10:30:00Z",
    "layers": [],
    "event": "purchase",
}


def invalid_events(events: list[Any]) -> dict[int, str]:
    return decode_all([orjson.dumps(e) for e in events])[1]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for value in node.values() for r in refs(value)
        ]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def variants() -> dict[str, dict[str, Any]]:
    """Each event type's schema, by its `type`."""
    return {v["properties"]["type"]["const"]: v for v in json_schema()["oneOf"]}


def test_the_schema_has_no_ref_anywhere() -> None:
    schema = json_schema()

    assert refs(schema) == []
    assert "$defs" not in schema
    assert schema["discriminator"] == {"propertyName": "type"}


def test_the_schema_describes_every_event_type() -> None:
    assert sorted(variants()) == sorted(EVENT_TYPES)


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_an_event_of_only_the_required_fields_is_valid(kind: str) -> None:
    required = variants()[kind]["required"]
    assert set(required) - {"type"} <= set(SAMPLES), "add a sample value for a new field"

    minimal = {"type": kind, **{name: SAMPLES[name] for name in required if name != "type"}}

    assert invalid_events([minimal]) == {}


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_an_event_missing_any_required_field_is_invalid(kind: str) -> None:
    required = variants()[kind]["required"]
    minimal = {"type": kind, **{name: SAMPLES[name] for name in required if name != "type"}}

    for name in required:
        lacking = {k: v for k, v in minimal.items() if k != name}
        assert invalid_events([lacking]), f"a {kind} without {name} was valid"


@pytest.mark.parametrize("kind", ["exposure", "decision"])
def test_a_layer_requires_what_the_schema_says_it_requires(kind: str) -> None:
    layer_schema = variants()[kind]["properties"]["layers"]["items"]
    assert layer_schema["required"] == ["layerId", "bucket"]
    whole = {"layerId": "layer_1", "bucket": 3}

    assert invalid_events([event(kind, layers=[whole])]) == {}
    for name in layer_schema["required"]:
        lacking = {k: v for k, v in whole.items() if k != name}
        errors = invalid_events([event(kind, layers=[lacking])])
        assert list(errors) == [0] and name in errors[0]


def test_invalid_events_are_reported_by_index_with_the_field_at_fault() -> None:
    errors = invalid_events(
        [
            event(),
            event(event=""),
            "nope",
            event("exposure", layers=[{"layerId": "l", "bucket": 1.5}]),
        ]
    )

    assert sorted(errors) == [1, 2, 3]
    assert errors[1].startswith("event:")
    assert errors[3].startswith("layers.0.bucket:")
    assert list(invalid_events([event(unitKey=True)])) == [0]  # a boolean is not a unit key
    assert invalid_events([event(unitKey=7), event(unitKey="")]) == {}


def test_numbers_past_the_double_range_are_valid_where_the_collector_does_not_compute() -> None:
    raw = orjson.dumps(event(value=0)).replace(b'"value":0', b'"value":1e999')

    [track], errors = decode_all([raw])

    assert errors == {} and isinstance(track, Track)
    assert number(track.value) == float("inf")
    huge = orjson.dumps(event(unitKey=7)).replace(b'"unitKey":7', b'"unitKey":' + b"9" * 40)
    assert decode_all([huge])[1] == {}
    assert invalid_events([event(value=None), event(value=-0.0)]) == {}
    assert list(invalid_events([event(value="7"), event(value=True)])) == [0, 1]


def test_an_unknown_type_is_an_error_about_the_event_not_a_field() -> None:
    errors = invalid_events([event("pageview"), {"type": "track"}, 5])

    assert errors[0].startswith("unknown event type 'pageview'")
    assert errors[1].endswith(": required field missing")
    assert errors[2] == "Expected `object`, got `int`"


@pytest.mark.parametrize(
    "events",
    [
        [event(id="a"), event("exposure", id="b"), event("decision", id="c")],  # all valid
        [event(id="a"), event(timestamp="yesterday"), event(value="7")],  # one not a date
        [event(id="a"), event("pageview"), 5, event(id="d")],  # shapes msgspec refuses
    ],
    ids=["valid", "problems-after-decoding", "wrong-shapes"],
)
def test_a_body_decoded_whole_gives_what_each_event_decoded_alone_gives(
    events: list[Any],
) -> None:
    raws = [orjson.dumps(e) for e in events]
    body = b'{"sdk":"x","events":[' + b",".join(raws) + b"]}"

    whole, whole_errors = decode_all(raws, body)
    alone, alone_errors = decode_all(raws)

    assert whole_errors == alone_errors
    assert whole == alone
    assert [e is None for e in whole] == [i in alone_errors for i in range(len(events))]
