"""The OpenAPI description of the events API, served at /schema/openapi.json.

The events route takes its body as bytes (so it can decompress, cap and parse it itself),
which leaves Litestar nothing to describe; `events_operation` writes the request body, the
answers and the Bearer key requirement, so clients and schema-driven fuzzers
(tests/test_fuzz.py) see the real contract. An event's schema is generated from the
validator's own types (`collector.events.json_schema`), and the batch limit is the app's
`max_events_per_request`. The schema is open, as the API is: unknown fields are allowed
everywhere. Each event is validated alone, so a request whose events do not all match still
gets 200 for the ones that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, Operation, SecurityScheme

from collector import __version__
from collector.events import json_schema

BEARER = "apiKey"
_VALIDATION_ERRORS: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["index", "error"],
        "properties": {"index": {"type": "integer", "minimum": 0}, "error": {"type": "string"}},
    },
}
ACCEPTED: dict[str, Any] = {
    "type": "object",
    "required": ["accepted", "written", "pipelineWritten"],
    "properties": {
        "accepted": {"type": "integer", "minimum": 0},
        "written": {"type": "integer", "minimum": 0},
        "pipelineWritten": {
            "type": "integer",
            "minimum": 0,
            "description": "The same as `written` (the JavaScript SDK's name for it).",
        },
        "validationErrors": _VALIDATION_ERRORS,
    },
}
ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "The status's reason phrase."},
        "message": {"type": "string", "description": "What to fix."},
        "validationErrors": _VALIDATION_ERRORS,
    },
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _answer(description: str, schema: dict[str, Any], retry: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if retry:
        answer["headers"] = _RETRY_AFTER
    return answer


EVENTS_RESPONSES: dict[str, Any] = {
    "200": _answer("The envelope is valid; the valid events are durably queued.", ACCEPTED),
    "400": _answer(
        "Not JSON; `events` missing, not an array, empty or too long; no valid event.", ERROR
    ),
    "401": _answer("No key, not a Bearer key, or an unknown, expired or revoked key.", ERROR),
    "403": _answer("The key lacks sdk:write or is limited to another project/env.", ERROR),
    "408": _answer("The body was not received within request_timeout_seconds.", ERROR),
    "413": _answer("The body is over max_body_bytes (after decompression).", ERROR),
    "415": _answer("A content type other than JSON, or an encoding other than gzip.", ERROR),
    "429": _answer("The key is over its rate limit (when one is set).", ERROR, retry=True),
    "431": _answer("The request head is over max_header_bytes.", ERROR),
    "503": _answer("The events cannot be made durable now, or keys cannot be judged.", ERROR, True),
}


def envelope(max_events: int) -> dict[str, Any]:
    """The schema of an events request body for `max_events_per_request = max_events`."""
    return {
        "type": "object",
        "required": ["events"],
        "properties": {
            "events": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_events,
                "items": json_schema(),
                "description": f"At most max_events_per_request ({max_events}). Invalid "
                "events are reported by index; the others are taken.",
            }
        },
        "additionalProperties": True,
    }


def events_operation(max_events: int) -> type[Operation]:
    """The events route's operation class, with the request body and answers written out."""
    request_body = {
        "required": True,
        "description": "A batch of exposure, decision and track events. `Content-Encoding: "
        "gzip` is accepted; the decompressed size is capped.",
        "content": {"application/json": {"schema": envelope(max_events)}},
    }

    @dataclass
    class EventsOperation(Operation):
        def to_schema(self) -> dict[str, Any]:
            schema = super().to_schema()
            schema["requestBody"] = request_body
            schema["responses"] = EVENTS_RESPONSES
            schema["security"] = [{BEARER: []}]
            return schema

    return EventsOperation


def config() -> OpenAPIConfig:
    """Litestar's OpenAPI settings: our title and version, and the Bearer key scheme."""
    return OpenAPIConfig(
        title="Traffical collector",
        version=__version__,
        description="Accepts Traffical SDK events, queues them durably and forwards them.",
        components=Components(
            security_schemes={
                BEARER: SecurityScheme(
                    type="http", scheme="bearer", description="An API key with sdk:write."
                )
            }
        ),
    )
