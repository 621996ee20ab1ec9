"""The format of a queue row: the one contract between the server that writes events and
the forwarder that reads them back, kept in one place.

- An event is stored as orjson's compact output of what the client sent (`encode_event`):
  no whitespace, no newline, `"name":"value"` with no space, and no re-escaping of what
  does not need it. (NaN/Infinity, which strict parsers refuse, were read as null before.)
- A row is one commit's events, `[\\n` + the events joined by `,\\n` + `\\n]` (`join`): one
  JSON array still (for SQLite's `json_array_length`, used by status, and any reader), and
  split back into each event's exact bytes with `bytes.split` (`split`), since compact
  JSON holds no newline. Rows written before events had lines of their own (`[e,e]`) are
  still read, by parsing.
- The forwarder batches by `Target` (project, env). When every event of a row certainly
  shares one, it is read off the row's bytes by counting (`shared_target`) instead of
  parsing each event, which was a third of the forwarder's time.
"""

from __future__ import annotations

from typing import Any

import orjson

from collector.events import Target

ROW_START, EVENT_SEPARATOR, ROW_END = b"[\n", b",\n", b"\n]"


def encode_event(event: Any) -> bytes:
    """An event as it is stored; raises orjson.JSONEncodeError when it cannot be (a lone
    surrogate in a string, nesting deeper than orjson writes)."""
    return orjson.dumps(event)


def join(events: list[bytes]) -> bytes:
    """The row holding `events`, one per line; an event spread over lines (not written by
    `encode_event`) is compacted first, so the one-per-line rule always holds."""
    joined = EVENT_SEPARATOR.join(events)
    if joined.count(b"\n") != len(events) - 1:
        joined = EVENT_SEPARATOR.join(encode_event(orjson.loads(raw)) for raw in events)
    return ROW_START + joined + ROW_END


def split(data: bytes) -> list[bytes]:
    """Each event's JSON in a row, exactly as stored."""
    if data.startswith(ROW_START):
        return data[len(ROW_START) : -len(ROW_END)].split(EVENT_SEPARATOR)
    return [encode_event(event) for event in orjson.loads(data)]  # a row of the old format


def target_of(raw: bytes) -> Target:
    """The (project, env) of one stored event, by parsing it."""
    event = orjson.loads(raw)
    return Target(str(event.get("projectId")), str(event.get("env")))


def shared_target(data: bytes, events: list[bytes]) -> Target | None:
    """The target of all of a row's `events` when they share one that can be read off the
    row's bytes without parsing each event; else None.

    Every stored event is `encode_event`'s output, so a key and its string value are
    written `"name":"value"`. Without a backslash in the row, every quote delimits a
    string, so `"projectId":"` occurs once per top-level `projectId` (a required string)
    and once per nested one; as many occurrences as events means none is nested, and then
    as many of the first event's `"projectId":"<value>"` means every event has that value.
    The same goes for `env`.
    """
    count = len(events)
    if b"\\" in data or data.count(b'"projectId":"') != count or data.count(b'"env":"') != count:
        return None
    target = target_of(events[0])
    for name, value in zip((b"projectId", b"env"), target, strict=True):
        pair = b'"' + name + b'":' + orjson.dumps(value)
        if data.count(pair) != count:
            return None
    return target
