"""collector/store/rows.py: queue rows as the forwarder reads them: each target's events
sliced out by the lengths in the row's header, their bytes exactly as the client sent them
(`join`/`split` round trips), the count readable in SQL, and rows of the two older formats
still read.

Real queue files in tmp paths (`Spool`), real bytes; nothing mocked.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from collector.events import Target
from collector.store.datadir import DataDir
from collector.store.rows import EVENT_COUNT_SQL, by_target, join, split, target_of
from collector.store.spool import TABLE, Row, Spool, summary

from conftest import event

A, B = Target("proj_a", "production"), Target("proj_b", "staging")
# What clients send and a re-encoder would change: escapes, number forms, key order,
# whitespace (inside and between tokens), a lone surrogate, a comma and brackets in strings.
AS_SENT = [
    b'{"type":"track","b":1.0e+21,"a":-0,"url":"https:\\/\\/x","jp":"\\u30e6"}',
    b'{ "type" : "track" ,\n  "big": 123456789012345678901234567890, "s": "x,\\n],[" }',
    b'{"type":"track","cut":"\\ud83d","deep":' + b"[" * 300 + b"]" * 300 + b"}",
]


def stored(tmp_path: Path, groups: dict[Target, list[bytes]]) -> Row:
    """`groups` committed as one row of a real queue file, then taken back."""
    spool = Spool(DataDir(tmp_path), budget_bytes=1 << 30, resume_in_flight=True)
    try:
        spool.append(groups)
        row = spool.take()
    finally:
        spool.close()
    assert row is not None
    return row


def encoded(*events: dict[str, Any]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def test_a_row_gives_back_each_targets_events_bytes_unchanged(tmp_path: Path) -> None:
    groups = {A: AS_SENT[:2], B: [AS_SENT[2], b"{}"]}

    row = stored(tmp_path, groups)

    assert row.groups() == list(groups.items())
    assert json.loads(row.data)[0] == 4  # one JSON array still, led by its event count


@pytest.mark.parametrize("count", [1, 2, 5, 1000])
def test_join_then_split_gives_back_each_events_bytes(count: int) -> None:
    sent = [AS_SENT[n % len(AS_SENT)] for n in range(count)]

    assert split(join({A: sent})) == [(A, sent)]


def test_a_target_named_with_quotes_commas_and_unicode_round_trips() -> None:
    odd = Target('p,"]é😀', "env\n")

    assert split(join({odd: [b"{}"], A: [b"[]"]})) == [(odd, [b"{}"]), (A, [b"[]"])]


def test_the_event_count_is_read_in_sql_for_every_row_format(tmp_path: Path) -> None:
    current = join({A: AS_SENT, B: AS_SENT[:1]})
    lines = b"[\n" + b",\n".join(encoded(event(), event())) + b"\n]"
    oldest = b"[" + b",".join(encoded(event())) + b"]"
    with sqlite3.connect(":memory:") as conn:
        counts = [
            conn.execute(f"SELECT {EVENT_COUNT_SQL} FROM (SELECT ? AS data)", (data,)).fetchone()[0]
            for data in (current, lines, oldest)
        ]
    assert counts == [4, 2, 1]


def test_status_counts_the_events_of_a_queue_holding_rows_of_every_format(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    spool = Spool(data_dir, budget_bytes=1 << 30)
    try:
        spool.append({A: AS_SENT})
    finally:
        spool.close()
    old = b"[\n" + b",\n".join(encoded(event(), event())) + b"\n]"
    with sqlite3.connect(data_dir.queue) as conn:
        conn.execute(f"INSERT INTO {TABLE} (data, timestamp, status) VALUES (?, 0, 0)", (old,))

    assert (summary(data_dir).events, summary(data_dir).rows) == (5, 2)


@pytest.mark.parametrize("old_format", ["lines", "array"])
def test_a_row_of_an_older_format_is_read_by_parsing(old_format: str) -> None:
    sent = encoded(event(id="a", projectId="proj_a"), event(id="b", projectId="proj_b"))
    data = (
        b"[\n" + b",\n".join(sent) + b"\n]"
        if old_format == "lines"
        else b"[" + b",".join(sent) + b"]"
    )

    groups = Row(1, data, 0.0).groups()

    assert [(target.project, events) for target, events in groups] == [
        ("proj_a", sent[:1]),
        ("proj_b", sent[1:]),
    ]


def test_events_without_routing_keys_are_grouped_by_parsing_them() -> None:
    first, second, third = encoded(
        event(projectId="proj_a", env="production"),
        event(projectId="proj_b", env="staging"),
        event(projectId="proj_a", env="production"),
    )

    assert by_target([first, second, third]) == {A: [first, third], B: [second]}
    assert target_of(b'{"projectId":"p\\ud800","env":"e"}') == ("p\\ud800", "e")
    assert target_of(b"[1]") == ("None", "None")
