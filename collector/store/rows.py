"""The format of a queue row: the one contract between the server that writes events and
the forwarder that reads them back, kept in one place.

A row is one commit's events, each the client's own JSON bytes, grouped by `Target`
(project, env) with their routing keys in front, so the forwarder never reads an event to
route it:

    [<events>,<header bytes>,<header>,<event>,<event>,...]

- `<events>` is the row's event count, for status (`EVENT_COUNT_SQL` reads it in SQL
  without parsing the row);
- `<header>` is the JSON array `[[project, env, [length, ...]], ...]`: each target with
  the byte length of each of its events, in the order they follow; `<header bytes>` is the
  header's own length, so it is sliced out, not searched for;
- the events follow, joined by commas: each is sliced out by its length (`split`).

The whole row is one JSON array still, readable by any JSON reader for debugging.

Rows written before events were kept as sent are still read, by parsing: `[\\n` + events
joined by `,\\n` + `\\n]`, and before that `[e,e]` (both orjson's compact output, so that
writing an event again gives its stored bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import orjson

from collector.events import Target

# Python refuses to int() a longer string (sys.int_info.default_max_str_digits).
INT_DIGITS = 4300
# The count of a current row's events, in SQL: its first element. Older rows (which start
# with `[\n` or `[{`, never a digit) have theirs counted by SQLite's JSON reader.
EVENT_COUNT_SQL = (
    "CASE WHEN substr(data, 2, 1) BETWEEN X'30' AND X'39'"
    " THEN CAST(CAST(substr(data, 2, 20) AS TEXT) AS INTEGER)"
    " ELSE json_array_length(CAST(data AS TEXT)) END"
)


class Joined:
    """A target's events for `join`, added in runs: the events of a run already joined by
    commas (a request's, as the server sends them), with each event's length. Its length
    is its number of events."""

    __slots__ = ("lengths", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.lengths: list[int] = []

    @classmethod
    def of(cls, events: Sequence[bytes]) -> Joined:
        joined = cls()
        joined.parts, joined.lengths = list(events), list(map(len, events))
        return joined

    def add(self, data: bytes, lengths: Sequence[int]) -> None:
        """Add a run: `data` holds events of `lengths` joined by commas."""
        if lengths:
            self.parts.append(data)
            self.lengths.extend(lengths)

    def add_one(self, raw: bytes) -> None:
        self.parts.append(raw)
        self.lengths.append(len(raw))

    def __len__(self) -> int:
        return len(self.lengths)


# A target's events: their JSON bytes, or runs of them.
Group = Sequence[bytes] | Joined


def join(groups: Mapping[Target, Group]) -> bytes:
    """The row holding each target's events (their own JSON bytes), in that order."""
    runs = [(t, e if isinstance(e, Joined) else Joined.of(e)) for t, e in groups.items()]
    header = orjson.dumps([[*target, joined.lengths] for target, joined in runs])
    count = sum(len(joined) for _, joined in runs)
    parts = [b"[%d,%d,%b" % (count, len(header), header)]
    for part in chain.from_iterable(joined.parts for _, joined in runs):
        parts += (b",", part)
    parts.append(b"]")
    return b"".join(parts)  # one copy of the events: a row can be 16 MiB


def split(data: bytes) -> list[tuple[Target, list[bytes]]]:
    """Each target's events in a row, exactly as stored."""
    if data[1:2].isdigit():
        first = data.index(b",", 1)
        second = data.index(b",", first + 1)
        header_end = second + 1 + int(data[first + 1 : second])
        at = header_end + 1  # past the comma after the header
        groups = []
        for project, env, lengths in orjson.loads(data[second + 1 : header_end]):
            events = []
            for length in lengths:
                events.append(data[at : at + length])
                at += length + 1
            groups.append((Target(project, env), events))
        return groups
    return list(by_target([orjson.dumps(event) for event in orjson.loads(data)]).items())


def counts(data: bytes) -> list[tuple[Target, int]]:
    """Each target's number of events in a row: from the header alone in the current
    format (rows of older ones are split)."""
    if data[1:2].isdigit():
        first = data.index(b",", 1)
        second = data.index(b",", first + 1)
        header = orjson.loads(data[second + 1 : second + 1 + int(data[first + 1 : second])])
        return [(Target(project, env), len(lengths)) for project, env, lengths in header]
    return [(target, len(events)) for target, events in split(data)]


def by_target(events: Sequence[bytes]) -> dict[Target, list[bytes]]:
    """`events` (JSON bytes) grouped by their target, read by parsing each one (for events
    that come without their routing keys: dead letters, rows of an older format)."""
    groups: dict[Target, list[bytes]] = {}
    for raw in events:
        groups.setdefault(target_of(raw), []).append(raw)
    return groups


def target_of(raw: bytes) -> Target:
    """The (project, env) of one event's JSON, by parsing it (a lone surrogate in a name is
    kept as its escape, so the name can be written anywhere)."""
    event = parse(raw)
    if not isinstance(event, dict):
        return Target("None", "None")
    return Target(*(_text(event.get(name)) for name in ("projectId", "env")))


def parse(raw: bytes) -> Any:
    """One stored event's JSON as Python values (for showing it, or reading its target):
    what orjson refuses (a lone surrogate escape, a number past the double range) is read
    by the stdlib, an integer too long for Python's int() as a float."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw, parse_int=_integer)


def _integer(text: str) -> int | float:
    return int(text) if len(text) < INT_DIGITS else float(text)


def _text(value: Any) -> str:
    text = str(value)
    return text.encode("utf-8", "backslashreplace").decode()
