"""One events request, from body bytes to committed events: no HTTP framework types here.

Steps, in order: decompress (with a cap on the decompressed size), parse, check the
envelope, validate each event (`collector.events`), check the key's project/environment
limits, encode each valid event as the client's own JSON (`collector.store.rows`), and
commit (`commit.py`). Invalid events are reported by index and never stop the valid ones.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from collector.errors import BadRequest, CollectorError, PayloadTooLarge, UnsupportedMediaType
from collector.events import Target, invalid_events
from collector.server.auth import ApiKey
from collector.server.commit import Committer, EncodedEvent
from collector.server.counting import EventCounter
from collector.store.rows import encode_event

# The browser SDK flushes its whole queue in one request, so a request may hold a few
# more events than the documented maximum; refusing it would make the SDK drop them all.
# Requests up to 10% over the maximum are taken; the body byte limit bounds the rest.
OVERFLOW_ALLOWANCE = 0.10
# zlib's window bits for "gzip header and trailer".
GZIP_WBITS = 16 + zlib.MAX_WBITS
# orjson writes at most this many levels of nested objects and arrays (the event itself
# being the first); events are stored as its output, so deeper ones are refused.
MAX_EVENT_DEPTH = 254
# The integers orjson reads exactly; beyond them it reads the nearest double.
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
INT64_DIGITS = len(str(INT64_MIN))


@dataclass
class Outcome:
    accepted: int
    written: int
    errors: dict[int, str] = field(default_factory=dict)

    def answer(self) -> dict[str, Any]:
        body: dict[str, Any] = {"accepted": self.accepted, "written": self.written}
        if self.errors:
            body["validationErrors"] = _error_list(self.errors)
        return body


def require_json(content_type: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {media_type or 'missing'}"
        )


def decode_body(raw: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before compression; PayloadTooLarge past `max_bytes`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        body = raw
    elif encoding in ("gzip", "x-gzip"):
        body = _gunzip(raw, max_bytes)
    else:
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported (use gzip)")
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body is larger than {max_bytes} bytes")
    return body


def _gunzip(raw: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(GZIP_WBITS)
    try:
        # Never inflate more than the cap (plus one byte to notice), so a gzip bomb costs
        # at most max_bytes of memory.
        body = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid gzip: {exc}") from exc
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body is larger than {max_bytes} bytes after decompression")
    if not inflater.eof:
        raise BadRequest("gzip body is truncated")
    if inflater.unused_data:  # a second member or trailing bytes: never silently dropped
        raise BadRequest("gzip body has data after its end (send one gzip member)")
    return body


def parse(body: bytes) -> Any:
    """JSON, accepting the bare NaN/Infinity tokens some SDKs emit (they become null).

    Numbers read the same on both paths, as orjson (and JavaScript's JSON.parse) reads them:
    integers within 64 bits exactly, larger ones as the nearest double, and numbers beyond
    the double range (1e999, a 400-digit integer) as null. So an event's values never
    depend on whether something else in its body sent the parser down the slow path.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # maybe NaN/Infinity, a huge number, or deep nesting: let the slow parser judge
    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=_null, parse_float=_finite, parse_int=_integer
        )
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {_short(exc)}") from exc


def envelope_events(document: Any, max_events: int) -> list[Any]:
    """The `events` array of a request, or BadRequest."""
    events = document.get("events") if isinstance(document, dict) else None
    limit = int(max_events * (1 + OVERFLOW_ALLOWANCE))
    if not isinstance(events, list) or not events or len(events) > limit:
        raise BadRequest(f"events must be a non-empty array (max {max_events})")
    return events


def encode(events: list[Any], errors: dict[int, str]) -> list[EncodedEvent]:
    """Each valid event as compact JSON of the client's own values, with its id for de-dup.

    `errors` holds the invalid events' indexes; an event that cannot be stored as UTF-8
    JSON (a string with a lone surrogate escape such as "\\ud800", or nesting deeper than
    MAX_EVENT_DEPTH, which the forwarder's encoder could not write) is added to it.
    An empty id is no id: it must not make distinct events look like retries.
    """
    encoded: list[EncodedEvent] = []
    for index, event in enumerate(events):
        if index in errors:
            continue
        try:
            raw = encode_event(event)
        except orjson.JSONEncodeError:
            errors[index] = _unstorable(event)
            continue
        event_id = event.get("id")
        encoded.append((event_id if isinstance(event_id, str) and event_id else None, raw))
    return encoded


class Ingest:
    """Handles the body of one events request for an authenticated key."""

    def __init__(self, committer: Committer, max_events: int, counter: EventCounter) -> None:
        self._committer = committer
        self._max_events = max_events
        self._counter = counter

    async def handle(self, body: bytes, key: ApiKey) -> Outcome:
        events = envelope_events(parse(body), self._max_events)
        labels = self._counter.received(events)
        errors = invalid_events(events)
        encoded = encode(events, errors)
        for error in errors.values():
            self._counter.rejected(_reason(error))
        if not encoded:
            raise BadRequest(
                "no event in the request is valid", validationErrors=_error_list(errors)
            )
        valid, valid_labels = events, labels
        if errors:
            kept = [i for i in range(len(events)) if i not in errors]
            valid, valid_labels = [events[i] for i in kept], [labels[i] for i in kept]
        try:
            if key.restricted:
                for event in valid:
                    key.require_target(Target(event["projectId"], event["env"]))
            skipped = await self._committer.write(encoded)
        except CollectorError as exc:
            self._counter.rejected(type(exc).__name__, len(valid))
            raise
        self._counter.accepted(valid, valid_labels, set(skipped))
        return Outcome(accepted=len(valid), written=len(valid) - len(skipped), errors=errors)


def _unstorable(event: dict[str, Any]) -> str:
    """Why orjson could not write `event`: a lone surrogate, or nesting too deep (its
    integers all fit, since `parse` reads larger ones as doubles)."""
    try:
        json.dumps(event, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return "strings must be valid Unicode (a lone surrogate escape was sent)"
    except RecursionError:
        pass
    return f"nested too deeply (at most {MAX_EVENT_DEPTH} levels of objects and arrays)"


def _reason(error: str) -> str:
    """A low-cardinality reason for counts: the field at fault ("invalid layers"), or
    "invalid event" when the event as a whole is (not an object, unknown type)."""
    head, colon, _ = error.partition(": ")
    return f"invalid {head.split('.')[0]}" if colon and " " not in head else "invalid event"


def _error_list(errors: dict[int, str]) -> list[dict[str, Any]]:
    return [{"index": index, "error": error} for index, error in sorted(errors.items())]


def _null(_token: str) -> None:
    return None


def _integer(text: str) -> int | float | None:
    """An integer as orjson reads it: exact within 64 bits, else the nearest double."""
    if len(text) <= INT64_DIGITS:  # never int() a long string: that is quadratic
        value = int(text)
        if INT64_MIN <= value <= UINT64_MAX:
            return value
    return _finite(text)


def _finite(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def _short(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
