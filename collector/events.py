"""The wire format of events: the one definition of what the collector calls valid.

Only what the collector itself relies on is checked (routing fields, the id used for
de-duplication, the fields counted). Everything else, and every unknown field, is left as
the client sent it: the schema is open, newer SDKs add fields, and the stored event is the
client's own JSON, never a re-serialised model. The leniencies below are what real SDKs
send (see the spec's list): empty or numeric `unitKey`, `bucket: -1` and unbounded buckets,
layers without policy fields, timestamps with or without milliseconds and with offsets,
`value: null`, non-numeric `values`, any id pattern.

The OpenAPI description of an event (`json_schema`, served by the server) is generated
from these same types, so the documented schema and the validator cannot disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, NotRequired

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from typing_extensions import TypedDict

EVENT_TYPES = ("exposure", "decision", "track")


class Target(NamedTuple):
    """Where an event goes: its project and environment. Upstream keys are scoped to one,
    so the forwarder batches by it, and a key may be restricted to one."""

    project: str
    env: str

    def __str__(self) -> str:
        return f"project {self.project!r}, env {self.env!r}"


# An error message quotes a bad `type` back; cut it so answers stay small.
MAX_ERROR_CHARS = 300


def _iso8601(value: str) -> str:
    datetime.fromisoformat(value)  # raises ValueError, which pydantic reports per field
    return value


def _string_or_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a string or a number")
    return value


def _integral(value: float) -> float:
    if not value.is_integer():
        raise ValueError("must be an integer")
    return value


Timestamp = Annotated[
    str,
    AfterValidator(_iso8601),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": "ISO 8601, with or without milliseconds, `Z` or an offset.",
        }
    ),
]
# An integer as JSON has it: 7, or 7.0 (the same number to JSON Schema and to JavaScript).
Bucket = Annotated[
    float,
    AfterValidator(_integral),
    WithJsonSchema({"type": "integer", "description": "-1: layer skipped. No upper bound."}),
]
# A unit key is whatever the SDK hashed: "" (track default) or a number are both real.
UnitKey = Annotated[
    Any,
    AfterValidator(_string_or_number),
    WithJsonSchema({"type": ["string", "number"], "description": "May be empty or a number."}),
]
Name = Annotated[str, Field(min_length=1)]

# Unknown fields are ignored by validation (the client's own JSON is what is stored, so the
# validated copy is thrown away, and not copying extras saves a third of the time), and
# types are strict: "7" is not a bucket and true is not a value, since the event is
# forwarded as sent and the upstream would refuse what we let through. The schema says the
# same: unknown fields are allowed everywhere.
OPEN = ConfigDict(extra="ignore", strict=True, json_schema_extra={"additionalProperties": True})


class LayerAssignment(TypedDict):
    __pydantic_config__ = OPEN  # type: ignore[misc]
    layerId: str
    bucket: Bucket  # -1 means "layer skipped"; bucketCount is per project, so no upper bound
    policyId: NotRequired[str | None]
    allocationId: NotRequired[str | None]
    allocationName: NotRequired[str | None]
    probability: NotRequired[float | None]
    attributionOnly: NotRequired[bool | None]


class _Common(TypedDict):
    __pydantic_config__ = OPEN  # type: ignore[misc]
    orgId: str
    projectId: str
    env: str
    unitKey: UnitKey
    timestamp: Timestamp
    id: NotRequired[str | None]
    context: NotRequired[dict[str, Any] | None]


class Exposure(_Common):
    type: Literal["exposure"]
    layers: list[LayerAssignment]
    decisionId: NotRequired[str | None]


class Decision(_Common):
    type: Literal["decision"]
    layers: list[LayerAssignment]


class Track(_Common):
    type: Literal["track"]
    event: Name
    value: NotRequired[float | None]
    values: NotRequired[dict[str, Any] | None]
    properties: NotRequired[dict[str, Any] | None]
    decisionId: NotRequired[str | None]
    eventTimestamp: NotRequired[Timestamp | None]


Event = Annotated[Exposure | Decision | Track, Field(discriminator="type")]
_EVENTS = TypeAdapter(list[Event])


def invalid_events(events: list[Any]) -> dict[int, str]:
    """Index -> first error, for each event of `events` that is not valid."""
    try:
        _EVENTS.validate_python(events)
    except ValidationError as exc:
        return _by_index(exc)
    return {}


def _by_index(exc: ValidationError) -> dict[int, str]:
    errors: dict[int, str] = {}
    for error in exc.errors(include_url=False, include_input=False):
        index, *path = error["loc"]
        if not isinstance(index, int) or index in errors:
            continue
        if path and path[0] in EVENT_TYPES:  # the discriminator's tag, not a field
            path = path[1:]
        message = error["msg"]
        text = f"{'.'.join(map(str, path))}: {message}" if path else message
        errors[index] = text[:MAX_ERROR_CHARS]
    return errors


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one event, self-contained (no `$ref`), for the OpenAPI document."""
    schema = TypeAdapter(Event).json_schema()
    definitions = schema.pop("$defs", {})
    schema["discriminator"].pop("mapping", None)  # it names the $defs inlined below
    inlined: dict[str, Any] = _inlined(schema, definitions)
    return inlined


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return _inlined(definitions[ref.rsplit("/", 1)[-1]], definitions)
        return {name: _inlined(value, definitions) for name, value in node.items()}
    if isinstance(node, list):
        return [_inlined(value, definitions) for value in node]
    return node
