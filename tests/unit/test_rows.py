"""collector/store/rows.py: queue rows as the forwarder reads them: one event per line,
split without parsing (`join`/`split` round trips), and a (project, env) read off the bytes
only when every event certainly shares it.

Real queue files in tmp paths (`Spool`), real bytes; nothing mocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from collector.store.datadir import DataDir
from collector.store.rows import ROW_END, ROW_START, encode_event, join, split, target_of
from collector.store.rows import shared_target as shared_key
from collector.store.spool import Row, Spool

from conftest import event


def stored(tmp_path: Path, events: list[bytes]) -> Row:
    """`events` committed as one row of a real queue file, then taken back."""
    spool = Spool(DataDir(tmp_path), budget_bytes=1 << 30, resume_in_flight=True)
    try:
        spool.append(events)
        row = spool.take()
    finally:
        spool.close()
    assert row is not None
    return row


def encoded(*events: dict[str, Any]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def test_a_row_splits_back_into_its_events_bytes_unchanged(tmp_path: Path) -> None:
    sent = encoded(
        event(id="a", properties={"text": "comma,\nnewline and ,\\n escaped", "n": [1, 2]}),
        event(id="b", properties={"unicode": "é😀", "nested": {"x": {"y": None}}}),
        event(id="c"),
    )
    row = stored(tmp_path, sent)

    assert row.lines() == sent
    assert orjson.loads(row.data) == [orjson.loads(raw) for raw in sent]  # still one array


def test_an_event_spread_over_several_lines_is_stored_compact(tmp_path: Path) -> None:
    pretty = b'{\n  "id": "a",\n  "projectId": "p",\n  "env": "e"\n}'
    row = stored(tmp_path, [pretty, orjson.dumps(event(id="b"))])

    lines = row.lines()
    assert len(lines) == 2
    assert orjson.loads(lines[0]) == orjson.loads(pretty)
    assert b"\n" not in lines[0]


def test_a_row_written_before_events_had_lines_of_their_own_still_splits() -> None:
    sent = encoded(event(id="a"), event(id="b", properties={"s": "x,y"}))
    row = Row(1, b"[" + b",".join(sent) + b"]", 0.0)

    assert row.lines() == sent


def test_a_row_of_one_project_and_env_is_read_off_the_bytes() -> None:
    lines = encoded(*(event(id=str(n), projectId="proj_a", env="staging") for n in range(5)))
    data = b"[\n" + b",\n".join(lines) + b"\n]"

    assert shared_key(data, lines) == ("proj_a", "staging")


@pytest.mark.parametrize(
    "odd_one",
    [
        {"projectId": "proj_b"},  # another project
        {"env": "production"},  # another env
        {"projectId": "proj_a2"},  # a project named with a prefix of the others'
        # the same project and env, and a nested pair naming another: not decidable by count
        {"properties": {"projectId": "proj_b", "env": "production"}},
        # a backslash: quotes may be escaped, so occurrences cannot be trusted
        {"properties": {"note": 'say \\"projectId\\":\\"proj_b\\"'}},
    ],
    ids=["project", "env", "prefix", "nested", "backslash"],
)
def test_a_row_not_certainly_of_one_project_and_env_is_left_to_per_event_parsing(
    odd_one: dict[str, Any],
) -> None:
    base = {"projectId": "proj_a", "env": "staging"}
    lines = encoded(event(id="1", **base), event(id="2", **{**base, **odd_one}), event(**base))
    data = b"[\n" + b",\n".join(lines) + b"\n]"

    assert shared_key(data, lines) is None


@pytest.mark.parametrize("count", [1, 2, 5])
def test_join_then_split_gives_back_each_events_bytes(count: int) -> None:
    sent = encoded(
        *(
            event(id=str(n), properties={"text": "a,\nb", "list": [n, {"x": "y"}]})
            for n in range(count)
        )
    )

    data = join(sent)

    assert data.startswith(ROW_START) and data.endswith(ROW_END)
    assert data.count(b"\n") == count + 1  # one event per line, between the brackets
    assert split(data) == sent
    assert orjson.loads(data) == [orjson.loads(raw) for raw in sent]


def test_join_compacts_an_event_spread_over_lines_and_split_reads_it_compact() -> None:
    pretty = orjson.dumps(event(id="a"), option=orjson.OPT_INDENT_2)
    compact = encode_event(event(id="b"))

    assert split(join([pretty, compact])) == [encode_event(orjson.loads(pretty)), compact]


def test_an_event_that_cannot_be_stored_as_json_is_refused_by_encode_event() -> None:
    with pytest.raises(orjson.JSONEncodeError):
        encode_event(event(properties={"lone": "\ud800"}))


def test_target_of_reads_the_project_and_env_of_one_stored_event() -> None:
    raw = encode_event(event(projectId="proj_x", env="staging"))

    assert target_of(raw) == ("proj_x", "staging")
