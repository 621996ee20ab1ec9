"""The wire format of events: the one definition of what the collector calls valid.

Only what the collector itself relies on is checked (routing fields, the id used for
de-duplication, the fields counted). Everything else, and every unknown field, is left as
the client sent it: the schema is open, newer SDKs add fields, and the stored event is the
client's own bytes, never a re-serialised model. The leniencies below are what real SDKs
send (see the spec's list): empty or numeric `unitKey`, `bucket: -1` and unbounded buckets,
layers without policy fields, timestamps with or without milliseconds and with offsets,
`value: null`, non-numeric `values`, any id pattern.

An event is validated from its own JSON bytes by msgspec into the structs below (`decode`):
unknown fields are skipped without building Python objects, and objects the collector does
not look into (`context`, `properties`, `values`) are checked to be objects but their
values stay raw. Measured for a 1000-event body of the Python SDK's events (530 kB, this
machine): 0.9 ms, against 3.3 ms for the pydantic `TypedDict`s this replaced. Numbers the
collector does not compute with (`value`, `probability`) are kept raw too and only checked
to be numbers, so `1e999` or a 400-digit integer is valid, as it is JSON.

The OpenAPI description of an event (`json_schema`, served by the server) is generated
from these same structs, so the documented schema and the validator cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, NamedTuple

import msgspec

EVENT_TYPES = ("exposure", "decision", "track")


class Target(NamedTuple):
    """Where an event goes: its project and environment. The upstream key an event is sent
    with is chosen by it (`forwarder.keys`), and a key may be restricted to one."""

    project: str
    env: str

    def __str__(self) -> str:
        return f"project {self.project!r}, env {self.env!r}"


# An error message quotes a bad `type` back; cut it so answers stay small.
MAX_ERROR_CHARS = 300
# A JSON number starts with a digit or a minus sign; so does nothing else.
NUMBER_START = frozenset(b"-0123456789")

UNSET = msgspec.UNSET
# A JSON value kept as its bytes: a number the collector does not compute with, or an
# object's member it does not look into. The schema says what it must be.
Number = Annotated[
    msgspec.Raw,
    msgspec.Meta(extra_json_schema={"type": ["number", "null"]}),
]
Object = Annotated[
    dict[str, msgspec.Raw],
    msgspec.Meta(extra_json_schema={"type": "object", "additionalProperties": True}),
]
Timestamp = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={
            "format": "date-time",
            "description": "ISO 8601, with or without milliseconds, `Z` or an offset.",
        }
    ),
]
# An integer as JSON has it: 7, or 7.0 (the same number to JSON Schema and to JavaScript).
Bucket = Annotated[
    int | float,
    msgspec.Meta(
        extra_json_schema={"type": "integer", "description": "-1: layer skipped. No upper bound."}
    ),
]
# A unit key is whatever the SDK hashed: "" (track default) or a number are both real.
UnitKey = Annotated[
    str | int | float,
    msgspec.Meta(
        extra_json_schema={"type": ["string", "number"], "description": "May be empty or a number."}
    ),
]
Name = Annotated[str, msgspec.Meta(min_length=1)]


class LayerAssignment(msgspec.Struct, kw_only=True):
    layerId: str
    bucket: Bucket  # -1 means "layer skipped"; bucketCount is per project, so no upper bound
    policyId: str | None = None
    allocationId: str | None = None
    allocationName: str | None = None
    probability: Number | msgspec.UnsetType = UNSET
    attributionOnly: bool | None = None


class _Common(msgspec.Struct, kw_only=True, tag_field="type"):
    orgId: str
    projectId: str
    env: str
    unitKey: UnitKey
    timestamp: Timestamp
    id: str | None = None
    context: Object | None = None
    # The bundle version an exposure or decision was evaluated against (current SDKs), for
    # config drift. Any JSON value is taken: it is only counted, never a reason to refuse.
    configVersion: Any = None


class Exposure(_Common, tag="exposure"):
    layers: list[LayerAssignment]
    decisionId: str | None = None


class Decision(_Common, tag="decision"):
    layers: list[LayerAssignment]


class Track(_Common, tag="track"):
    event: Name
    value: Number | msgspec.UnsetType = UNSET
    values: Object | None = None
    properties: Object | None = None
    decisionId: str | None = None
    eventTimestamp: Timestamp | None = None
    # Not validated (SDKs differ); read by the counts when present (`attribution`).
    attribution: msgspec.Raw | msgspec.UnsetType = UNSET


Event = Exposure | Decision | Track
_DECODER = msgspec.json.Decoder(Event)
_BODY = msgspec.json.Decoder(msgspec.defstruct("Body", [("events", list[Event])]))
_ATTRIBUTION = msgspec.json.Decoder(list[Any])


def decode_all(
    raws: Sequence[bytes | msgspec.Raw], body: bytes | None = None
) -> tuple[list[Event | None], dict[int, str]]:
    """Each of `raws` (one event's JSON each) decoded, None where invalid, and index ->
    error of the invalid ones: the field at fault and why.

    `body`: the document whose `events` array `raws` are (read by msgspec), decoded in
    one call when every event in it has a valid shape, as nearly always (0.9 ms for 1000
    events against 1.04 ms in one call each, measured); event by event otherwise."""
    if body is not None:
        whole = _whole(body)
        if whole is not None and len(whole) == len(raws):
            return _judged(whole)
    decoded: list[Event | None] = []
    errors: dict[int, str] = {}
    read = _DECODER.decode
    for index, raw in enumerate(raws):
        event: Event | None
        problem: str | None
        try:
            event = read(raw)
        except msgspec.ValidationError as exc:
            event, problem = None, _message(str(exc))
        else:
            problem = _problem(event)
        if problem is not None:
            event, errors[index] = None, problem
        decoded.append(event)
    return decoded, errors


def _whole(body: bytes) -> list[Event] | None:
    try:
        events: list[Event] = _BODY.decode(body).events  # type: ignore[attr-defined]
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None  # an event of another shape: each is decoded on its own
    return events


def _judged(events: list[Event]) -> tuple[list[Event | None], dict[int, str]]:
    decoded: list[Event | None] = list(events)
    errors: dict[int, str] = {}
    for index, event in enumerate(events):
        problem = _problem(event)
        if problem is not None:
            decoded[index], errors[index] = None, problem
    return decoded, errors


def attribution(event: Track) -> list[dict[str, Any]]:
    """The SDK's own `attribution` array of a track event (its objects only), if any."""
    if isinstance(event.attribution, msgspec.UnsetType):
        return []
    try:
        return [item for item in _ATTRIBUTION.decode(event.attribution) if isinstance(item, dict)]
    except (msgspec.DecodeError, RecursionError):  # not an array: nothing to attribute
        return []


def _problem(event: Event) -> str | None:
    """What msgspec's types cannot say: ISO 8601 timestamps, integral buckets, numbers.
    Runs for every event: the usual case (all is well) first and flat."""
    try:
        _FROM_ISO(event.timestamp)
    except ValueError:
        return "timestamp: must be an ISO 8601 date-time"
    if type(event) is Track:  # not isinstance: 29 ns against 87 (counting.notes)
        if event.eventTimestamp is not None and not _iso8601(event.eventTimestamp):
            return "eventTimestamp: must be an ISO 8601 date-time"
        if type(event.value) is msgspec.Raw and not _number_or_null(event.value):
            return "value: must be a number or null"
        return None
    for layer in event.layers:  # type: ignore[union-attr]
        if type(layer.bucket) is float or type(layer.probability) is msgspec.Raw:
            return _layer_problem(event.layers)  # type: ignore[union-attr]
    return None


def _layer_problem(layers: list[LayerAssignment]) -> str | None:
    for index, layer in enumerate(layers):
        if isinstance(layer.bucket, float) and not layer.bucket.is_integer():
            return f"layers.{index}.bucket: must be an integer"
        if isinstance(layer.probability, msgspec.Raw) and not _number_or_null(layer.probability):
            return f"layers.{index}.probability: must be a number or null"
    return None


_FROM_ISO = datetime.fromisoformat


def _iso8601(text: str) -> bool:
    try:
        _FROM_ISO(text)
    except ValueError:
        return False
    return True


def _number_or_null(raw: msgspec.Raw) -> bool:
    head = memoryview(raw)[:1].tobytes()
    return head == b"n" or (bool(head) and head[0] in NUMBER_START)


def number(raw: msgspec.Raw | msgspec.UnsetType) -> float | None:
    """A raw number as a float (None for null or unset; past the double range, inf)."""
    if isinstance(raw, msgspec.UnsetType):
        return None
    text = bytes(raw)
    return None if text == b"null" else float(text)


# msgspec's messages: "Expected `str`, got `int` - at `$.layers[0].layerId`",
# "Object missing required field `env`" (with " - at ..." when nested).
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")
_INDEX = re.compile(r"\[(\d+)\]")


def _message(text: str) -> str:
    """msgspec's message as `path: problem` ("layers.0.bucket: ..."), the path as dots;
    an unknown `type` or a non-object is about the event as a whole (no path)."""
    found = _AT.match(text)
    assert found is not None  # the pattern matches any text
    message, path = found["message"], _INDEX.sub(r".\1", found["path"] or "").lstrip(".")
    missing = _MISSING.match(message)
    if missing is not None:
        path, message = ".".join(filter(None, (path, missing["name"]))), "required field missing"
    if path == "type" and message.startswith("Invalid value"):
        path, message = "", f"unknown event type {message.removeprefix('Invalid value ')}"
    return (f"{path}: {message}" if path else message)[:MAX_ERROR_CHARS]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one event, self-contained (no `$ref`), for the OpenAPI document:
    one object per type, told apart by the `type` property."""
    schema = msgspec.json.schema(Event)
    definitions = schema.pop("$defs", {})
    variants = [_inlined(variant, definitions) for variant in schema["anyOf"]]
    for variant in variants:
        (tag,) = variant["properties"]["type"].pop("enum")
        variant["properties"]["type"]["const"] = tag
    return {"oneOf": variants, "discriminator": {"propertyName": "type"}}


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` with every `$ref` replaced by its definition; every object is open (unknown
    fields are allowed and kept), as the validator treats them."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return _inlined(definitions[ref.rsplit("/", 1)[-1]], definitions)
        inlined = {name: _inlined(value, definitions) for name, value in node.items()}
        if "properties" in inlined:
            inlined.pop("title", None)
            inlined["additionalProperties"] = True
        return inlined
    if isinstance(node, list):
        return [_inlined(value, definitions) for value in node]
    return node
