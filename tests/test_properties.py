"""Property-based tests (hypothesis) of the validator and the body pipeline, in process.

What the server does with a body, step by step (`ingest.py`): `decode_body` (gzip, cap),
`parse`, `envelope_events`, `invalid_events` (`events.py`), the counts of what was received
and accepted (`counts.py`), and `encode`. The properties:

- any valid event (arbitrary unknown fields, unicode, numbers, every documented leniency)
  is accepted and `encode` gives back the same JSON values, on the fast parser and on the
  slow one (a bare NaN elsewhere in the body sends it there) alike;
- in a mixed list, exactly the broken events are reported, by their own index, and the
  valid ones are encoded in order;
- whatever the body (arbitrary JSON, arbitrary bytes, cut or corrupted valid bodies, deep
  nesting), nothing raises but our own `CollectorError` types;
- numbers read the same on both parser paths (integers beyond 64 bits as doubles);
- gzip bodies decode to what was compressed, and past the cap are PayloadTooLarge.

Each test counts its examples in EXAMPLES; the module prints the total when it ends.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import BadRequest, CollectorError, PayloadTooLarge
from collector.events import invalid_events
from collector.server.counting import EventCounter
from collector.server.ingest import MAX_EVENT_DEPTH, OVERFLOW_ALLOWANCE, decode_body, encode, parse
from collector.server.ingest import envelope_events as envelope
from collector.store.counts import Counts
from collector.store.datadir import DataDir

MAX_EVENTS = 1000
LIMIT = int(MAX_EVENTS * (1 + OVERFLOW_ALLOWANCE))
ENVELOPE_MESSAGE = f"events must be a non-empty array (max {MAX_EVENTS})"
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
EXAMPLES: Counter[str] = Counter()

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# For the tests whose examples are whole lists of events (slow to generate, not to run).
HEAVY = settings(SETTINGS, max_examples=100)


@pytest.fixture(scope="module", autouse=True)
def report_examples() -> Iterator[None]:
    yield
    total = sum(EXAMPLES.values())
    print(f"\nproperty examples run: {total} ({dict(EXAMPLES)})")


@pytest.fixture(scope="module")
def counter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventCounter]:
    counts = Counts.writer(DataDir(tmp_path_factory.mktemp("counts")))
    yield EventCounter(counts)
    counts.close()


# --- strategies -----------------------------------------------------------------------------

# JSON values as a parser hands them over: integers within 64 bits (larger ones are read as
# doubles; see test_numbers_read_the_same_on_both_parser_paths), finite floats.
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
names = st.text(max_size=30)  # unicode, and empty: both are real
optional_text = st.none() | st.text(max_size=30)
numbers = st.integers(min_value=INT64_MIN, max_value=UINT64_MAX) | st.floats(
    allow_nan=False, allow_infinity=False
)

KNOWN = {
    "type", "orgId", "projectId", "env", "unitKey", "timestamp", "id", "context", "layers",
    "decisionId", "event", "value", "values", "properties", "eventTimestamp",
}  # fmt: skip
LAYER_KNOWN = {
    "layerId", "bucket", "policyId", "allocationId", "allocationName", "probability",
    "attributionOnly",
}  # fmt: skip


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """ISO 8601 as SDKs write it: ms and Z, no ms, microseconds, or an offset."""
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)))
    style = draw(st.sampled_from(["ms-z", "z", "micro", "offset"]))
    if style == "ms-z":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    if style == "z":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == "micro":
        return moment.replace(tzinfo=UTC).isoformat()
    minutes = draw(st.integers(-14 * 60, 14 * 60))
    return moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat()


def extras(known: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Unknown fields, which must pass through untouched."""
    keys = st.text(max_size=12).filter(lambda k: k not in known)
    return st.dictionaries(keys, json_values, max_size=3)


@st.composite
def layers(draw: st.DrawFn) -> dict[str, Any]:
    layer: dict[str, Any] = {
        "layerId": draw(names),
        # -1 (skipped), any bucket count, and 7.0 (the same integer to JSON).
        "bucket": draw(
            st.just(-1)
            | st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
            | st.integers(-(2**53), 2**53).map(float)
        ),
    }
    optional = {
        "policyId": optional_text,
        "allocationId": optional_text,
        "allocationName": optional_text,
        "probability": st.none() | st.floats(allow_nan=False, allow_infinity=False),
        "attributionOnly": st.none() | st.booleans(),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            layer[name] = draw(values)
    return {**draw(extras(LAYER_KNOWN)), **layer}


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["exposure", "decision", "track"]))
    event: dict[str, Any] = {
        "type": kind,
        "orgId": draw(names),
        "projectId": draw(names),
        "env": draw(names),
        "unitKey": draw(names | numbers),
        "timestamp": draw(timestamps()),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "id": optional_text,
        "context": st.none() | json_objects,
    }
    if kind == "track":
        event["event"] = draw(st.text(min_size=1, max_size=20))
        optional |= {
            "value": st.none() | numbers,
            "values": st.none() | json_objects,
            "properties": st.none() | json_objects,
            "decisionId": optional_text,
            "eventTimestamp": st.none() | timestamps(),
        }
    else:
        event["layers"] = draw(st.lists(layers(), max_size=3))
        if kind == "exposure":
            optional["decisionId"] = optional_text
    for name, values in optional.items():
        if draw(st.booleans()):
            event[name] = draw(values)
    return {**draw(extras(KNOWN)), **event}


not_a_string = st.none() | st.booleans() | st.integers() | st.lists(st.integers(), max_size=2)
not_an_object = st.none() | st.booleans() | numbers | st.text(max_size=5) | st.lists(st.none())


@st.composite
def broken_events(draw: st.DrawFn) -> Any:
    """A valid event with one thing broken that the validator must catch."""
    event = draw(valid_events())
    required = ["type", "orgId", "projectId", "env", "unitKey", "timestamp"]
    required.append("event" if event["type"] == "track" else "layers")
    how = draw(
        st.sampled_from(
            ["drop", "retype", "timestamp", "kind", "not-object", "empty-name", "bucket"]
        )
    )
    if how == "drop":
        del event[draw(st.sampled_from(required))]
    elif how == "retype":  # a string field given something else
        field = draw(st.sampled_from(["orgId", "projectId", "env", "timestamp"]))
        event[field] = draw(not_a_string)
    elif how == "timestamp":
        event["timestamp"] = draw(st.sampled_from(["", "yesterday", "2026-13-01T00:00:00Z"]))
    elif how == "kind":
        event["type"] = draw(st.sampled_from(["pageview", "", "Track", "exposures"]))
    elif how == "not-object":
        return draw(not_an_object)
    elif event["type"] == "track":  # "empty-name" or "bucket": a track has no layers
        event["event"] = ""
    elif how == "empty-name":  # layers that are not an array
        event["layers"] = draw(not_an_object.filter(lambda v: not isinstance(v, list)))
    else:  # a layer whose bucket is no integer
        bad = draw(st.sampled_from([True, "7", 0.5, None]))
        event["layers"] = [*event["layers"], {"layerId": "l", "bucket": bad}]
    return event


# --- helpers ------------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 and true from 1, for exact comparison."""
    return json.dumps(value, sort_keys=True, allow_nan=False, ensure_ascii=False)


def body_of(events: list[Any], slow: bool = False, ascii: bool = True) -> bytes:
    """A request body; `slow` adds a bare NaN outside the events, which orjson refuses, so
    the whole body goes through the slow parser; `ascii` writes \\u escapes, else UTF-8."""
    document = json.dumps({"events": events}, allow_nan=False, ensure_ascii=ascii)
    if slow:
        document = document[:-1] + ', "pad": NaN}'
    return document.encode()


def pipeline(body: bytes, counter: EventCounter) -> tuple[dict[int, str], list[bytes]]:
    """What the server does with a body, short of committing it."""
    events = envelope(parse(body), MAX_EVENTS)
    targets = counter.received(events)
    errors = invalid_events(events)
    encoded = encode(events, errors)
    kept = [i for i in range(len(events)) if i not in errors]
    counter.accepted([events[i] for i in kept], [targets[i] for i in kept], set())
    return errors, [raw for _, raw in encoded]


# --- properties ---------------------------------------------------------------------------


@HEAVY
@given(
    events=st.lists(valid_events(), min_size=1, max_size=5),
    slow=st.booleans(),
    ascii=st.booleans(),
)
def test_valid_events_are_accepted_and_encoded_as_the_same_json_values(
    counter: EventCounter, events: list[dict[str, Any]], slow: bool, ascii: bool
) -> None:
    EXAMPLES["valid-round-trip"] += 1
    errors, encoded = pipeline(body_of(events, slow, ascii), counter)
    assert errors == {}
    assert [canonical(orjson.loads(raw)) for raw in encoded] == [canonical(e) for e in events]


@HEAVY
@given(
    events=st.lists(
        st.one_of(
            valid_events().map(lambda e: (True, e)), broken_events().map(lambda e: (False, e))
        ),
        min_size=1,
        max_size=8,
    )
)
def test_exactly_the_broken_events_are_reported_by_their_own_index(
    counter: EventCounter, events: list[tuple[bool, Any]]
) -> None:
    EXAMPLES["mixed-index"] += 1
    sent = [event for _, event in events]
    broken = {i for i, (valid, _) in enumerate(events) if not valid}
    errors, encoded = pipeline(body_of(sent), counter)
    assert set(errors) == broken
    assert all(isinstance(message, str) and message for message in errors.values())
    kept = [event for valid, event in events if valid]
    # (When none is kept, Ingest.handle answers 400 with these same validationErrors.)
    assert [canonical(orjson.loads(raw)) for raw in encoded] == [canonical(e) for e in kept]


@SETTINGS
@given(document=json_values | st.fixed_dictionaries({"events": json_values}))
def test_any_json_document_raises_nothing_but_our_errors(
    counter: EventCounter, document: Any
) -> None:
    EXAMPLES["any-json"] += 1
    _only_our_errors(json.dumps(document).encode(), counter)


@SETTINGS
@given(events=st.lists(json_values, min_size=1, max_size=6), slow=st.booleans())
def test_any_list_of_events_raises_nothing_but_our_errors(
    counter: EventCounter, events: list[Any], slow: bool
) -> None:
    EXAMPLES["any-events"] += 1
    _only_our_errors(body_of(events, slow), counter)


@SETTINGS
@given(body=st.binary(max_size=300))
def test_any_bytes_raise_nothing_but_our_errors(counter: EventCounter, body: bytes) -> None:
    EXAMPLES["any-bytes"] += 1
    _only_our_errors(body, counter)


@HEAVY
@given(events=st.lists(valid_events(), min_size=1, max_size=3), data=st.data())
def test_cut_or_corrupted_bodies_raise_nothing_but_our_errors(
    counter: EventCounter, events: list[dict[str, Any]], data: st.DataObject
) -> None:
    EXAMPLES["cut-or-corrupt"] += 1
    body = bytearray(body_of(events))
    at = data.draw(st.integers(0, len(body) - 1))
    if data.draw(st.booleans()):
        del body[at:]  # truncated
    else:
        body[at] = data.draw(st.integers(0, 255))  # one byte changed (maybe invalid UTF-8)
    _only_our_errors(bytes(body), counter)


@SETTINGS
@given(depth=st.integers(1, 1100), container=st.sampled_from(["[]", "{}"]), slow=st.booleans())
def test_nesting_is_taken_up_to_the_encoders_depth_and_refused_past_it(
    counter: EventCounter, depth: int, container: str, slow: bool
) -> None:
    EXAMPLES["deep-nesting"] += 1
    opener, closer = ("[", "]") if container == "[]" else ('{"a":', "}")
    valid = body_of([{"type": "track", "orgId": "o", "projectId": "p", "env": "e",
                      "unitKey": "u", "timestamp": "2026-05-21T10:30:00Z", "event": "x"}],
                    slow)  # fmt: skip
    inner = (opener * depth + ("[]" if container == "[]" else "1") + closer * depth).encode()
    at = valid.index(b'"event"')
    body = valid[:at] + b'"deep":' + inner + b"," + valid[at:]
    # The event is one level, "deep" opens `depth` more, and its innermost value one more.
    event_depth = 1 + depth + (1 if container == "[]" else 0)
    try:
        errors, encoded = pipeline(body, counter)
    except BadRequest as exc:  # deeper than the parsers take: the whole body is refused,
        assert "nested too deeply" in exc.message  # never one the queue could have taken
        assert event_depth > MAX_EVENT_DEPTH
        return
    if event_depth <= MAX_EVENT_DEPTH:
        assert errors == {} and len(encoded) == 1
    else:
        assert list(errors) == [0] and "nested too deeply" in errors[0]


def _only_our_errors(body: bytes, counter: EventCounter) -> None:
    with contextlib.suppress(CollectorError):  # BadRequest is the answer to a bad body
        pipeline(body, counter)


@SETTINGS
@given(number=st.integers(min_value=-(10**400), max_value=10**400) | st.integers())
def test_numbers_read_the_same_on_both_parser_paths(number: int) -> None:
    EXAMPLES["numbers"] += 1
    fast = parse(b"[%d]" % number)
    slow = parse(b"[%d, NaN]" % number)
    assert canonical(fast) == canonical(slow[:1])
    [value] = fast
    if INT64_MIN <= number <= UINT64_MAX:
        assert value == number and isinstance(value, int)
    elif math.isfinite(float(str(number))):  # past 64 bits: the nearest double, as in JS
        assert value == float(str(number)) and isinstance(value, float)
    else:
        assert value is None


@SETTINGS
@given(document=st.none() | json_values | st.fixed_dictionaries({"events": json_values}))
def test_the_envelope_takes_exactly_a_non_empty_array_within_the_limit(document: Any) -> None:
    EXAMPLES["envelope"] += 1
    events = document.get("events") if isinstance(document, dict) else None
    if isinstance(events, list) and 0 < len(events) <= LIMIT:
        assert envelope(document, MAX_EVENTS) is events
    else:
        with pytest.raises(BadRequest) as refused:
            envelope(document, MAX_EVENTS)
        assert refused.value.message == ENVELOPE_MESSAGE


@SETTINGS
@given(raw=st.binary(max_size=5000), cap=st.integers(1, 6000), level=st.integers(0, 9))
def test_gzip_bodies_decode_to_what_was_compressed_within_the_cap(
    raw: bytes, cap: int, level: int
) -> None:
    EXAMPLES["gzip"] += 1
    compressed = gzip.compress(raw, compresslevel=level)
    if len(raw) <= cap:
        assert decode_body(compressed, "gzip", cap) == raw
    else:
        with pytest.raises(PayloadTooLarge):
            decode_body(compressed, "gzip", cap)


@SETTINGS
@given(raw=st.binary(max_size=400), encoding=st.sampled_from(["gzip", "identity", None]))
def test_any_bytes_as_a_body_decode_or_raise_our_errors(raw: bytes, encoding: str | None) -> None:
    EXAMPLES["decode-bytes"] += 1
    try:
        assert decode_body(raw, encoding, 1000) == raw or encoding == "gzip"
    except CollectorError:
        pass
    except zlib.error as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError("zlib errors must become BadRequest") from exc


@pytest.mark.parametrize("extra_levels", [MAX_EVENT_DEPTH - 1, MAX_EVENT_DEPTH])
def test_an_event_exactly_at_the_depth_limit_is_kept_and_one_past_it_refused(
    extra_levels: int,
) -> None:
    deep: Any = []
    for _ in range(extra_levels - 1):
        deep = [deep]  # `extra_levels` arrays, under the event's own level
    event = {"type": "track", "orgId": "o", "projectId": "p", "env": "e", "unitKey": "",
             "timestamp": "2026-05-21T10:30:00Z", "event": "x", "deep": deep}  # fmt: skip
    errors = invalid_events([event])
    encoded = encode([event], errors)
    if 1 + extra_levels <= MAX_EVENT_DEPTH:
        [(_, raw)] = encoded
        assert orjson.loads(raw) == event  # what the forwarder reads back and re-encodes
        assert orjson.dumps(orjson.loads(raw)) == raw
    else:
        assert encoded == [] and "nested too deeply" in errors[0]
