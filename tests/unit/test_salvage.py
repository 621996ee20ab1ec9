"""collector/store/salvage.py: what is read back from real queue and dead-letter files,
sound and damaged as a disk damages them (`tests/corrupt.py`), with the sqlite3 tool on
PATH; every row given back is one that was written, byte for byte, and none twice.

Debian's sqlite3 cannot run `.recover` (its SQLite has no `sqlite_dbpage`), so salvage
runs `.dump` there. To run these tests with a tool that can, as well, name it in
SALVAGE_SQLITE3 (a sqlite3 built with SQLITE_ENABLE_DBPAGE_VTAB).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from collector.errors import SalvageFailed
from collector.events import Target
from collector.store import recovery, rows, salvage
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.spool import TABLE, Spool

import corrupt

ROWS = 200
TARGET = Target("p", "e")
TOOLS = ["sqlite3", *filter(None, [os.environ.get("SALVAGE_SQLITE3")])]


@pytest.fixture(params=TOOLS)
def tool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(salvage, "TOOL", request.param)
    return str(request.param)


def reads_pages(tool: str) -> bool:
    """Whether `tool` can run `.recover` (salvage runs `.dump` otherwise)."""
    probe = [tool, ":memory:", "SELECT count(*) FROM sqlite_dbpage"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def events(i: int) -> list[bytes]:
    pad = "x" * (i % 7) * 10
    return [
        orjson.dumps({"id": f"{i}-{n}", "projectId": "p", "env": "e", "pad": pad}) for n in range(3)
    ]


def queue_file(tmp_path: Path) -> tuple[Path, list[tuple[bytes, float]]]:
    """A queue.db of ROWS rows of 3 events each, and its rows as written (by id)."""
    data_dir = DataDir(tmp_path / "data")
    data_dir.create()
    queue = Spool(data_dir, budget_bytes=1 << 30, sync="normal")
    for i in range(ROWS):
        queue.append({TARGET: events(i)})
    queue.close()
    return data_dir.queue, table_rows(data_dir.queue)


def table_rows(path: Path) -> list[tuple[bytes, float]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT data, timestamp FROM {TABLE} ORDER BY _id").fetchall()
    finally:
        conn.close()


def assert_only_written(found: salvage.QueueSalvage, written: list[tuple[bytes, float]]) -> None:
    assert set(found.rows) <= set(written)  # each byte for byte, with its time
    assert len(set(found.rows)) == len(found.rows)
    assert found.rows == sorted(found.rows, key=written.index)  # in id order
    assert found.events == 3 * len(found.rows)


def test_a_sound_file_gives_back_every_row_and_its_ledger_and_is_left_as_it_was(
    tmp_path: Path, tool: str
) -> None:
    path, written = queue_file(tmp_path)
    before = path.read_bytes()
    files = sorted(os.listdir(path.parent))

    found = salvage.queue_rows(path)

    assert found.rows == written
    assert (found.events, found.unreadable_rows) == (3 * ROWS, 0)
    conn = sqlite3.connect(path)
    has_ledger = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'ledger'").fetchone()
    ledger = conn.execute("SELECT * FROM ledger").fetchall() if has_ledger else []
    conn.close()
    assert found.ledger == ledger
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == files  # no -wal or -shm made beside it


def test_rows_still_in_the_write_ahead_log_are_read_too(tmp_path: Path, tool: str) -> None:
    data_dir = DataDir(tmp_path / "data")
    data_dir.create()
    queue = Spool(data_dir, budget_bytes=1 << 30, sync="normal")
    queue.append({TARGET: events(1)})
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in (data_dir.queue.name, data_dir.queue.name + "-wal"):  # as a crash leaves them
        shutil.copy(data_dir.queue.with_name(name), crashed / name)
    queue.close()

    found = salvage.queue_rows(crashed / data_dir.queue.name)

    assert [data for data, _ in found.rows] == [rows.join({TARGET: events(1)})]


def test_garbage_in_the_middle_loses_only_the_rows_of_the_pages_it_hit(
    tmp_path: Path, tool: str
) -> None:
    path, written = queue_file(tmp_path)
    corrupt.overwrite_middle(path)

    found = salvage.queue_rows(path)

    assert_only_written(found, written)
    assert len(found.rows) >= ROWS * 3 // 4
    assert found.unreadable_rows <= 5


def test_a_zeroed_schema_page_is_read_back_by_recover_only(tmp_path: Path, tool: str) -> None:
    path, written = queue_file(tmp_path)
    corrupt.zero_schema_page(path)

    if not reads_pages(tool):  # `.dump` finds the tables through the schema, or nothing
        with pytest.raises(SalvageFailed, match="it found no table"):
            salvage.queue_rows(path)
        return
    found = salvage.queue_rows(path)  # every row, from lost_and_found

    assert_only_written(found, written)
    assert len(found.rows) == ROWS


def test_a_file_cut_short_gives_back_the_rows_of_the_pages_left(tmp_path: Path, tool: str) -> None:
    path, written = queue_file(tmp_path)
    corrupt.truncate(path, keep=0.8)

    found = salvage.queue_rows(path)

    assert_only_written(found, written)
    assert len(found.rows) >= ROWS // 2


def test_the_recoverable_corruption_is_corruption_and_loses_no_row(
    tmp_path: Path, tool: str
) -> None:
    path, written = queue_file(tmp_path)
    corrupt.corrupt_recoverably(path)

    assert "freelist" in (recovery.corruption(path) or "")
    found = salvage.queue_rows(path)
    assert found.rows == written


def test_a_row_whose_event_bytes_were_damaged_is_not_readable() -> None:
    row = bytearray(rows.join({TARGET: events(1)}))
    at = row.index(b'"id"')
    row[at : at + 4] = b"\x93\x00{]"  # the lengths still slice it: `split` alone accepts it

    assert rows.split(bytes(row))
    assert salvage.readable_events(bytes(row)) is None
    assert salvage.readable_events(rows.join({TARGET: events(1)})) == 3


def dead_letter_file(tmp_path: Path) -> tuple[Path, list[tuple[float, str, bytes, str]]]:
    data_dir = DataDir(tmp_path / "data")
    dead = DeadLetters.writer(data_dir)
    for i in range(ROWS // 2):
        dead.add(events(i), f"rejected by upstream: {i}")
        dead.add(events(i)[:1], "quarantined: no type", "sdk/1.0")
    dead.close()
    conn = sqlite3.connect(data_dir.dead_letters)
    written = conn.execute(
        "SELECT dead_at, reason, event, source FROM dead_letters ORDER BY id"
    ).fetchall()
    conn.close()
    return data_dir.dead_letters, written


@pytest.mark.parametrize(
    "damage",
    [lambda path: None, corrupt.overwrite_middle, lambda path: corrupt.truncate(path, 0.8)],
    ids=["sound", "garbage in the middle", "cut short"],
)
def test_dead_letters_are_read_back_as_written(
    tmp_path: Path, tool: str, damage: Callable[[Path], None]
) -> None:
    path, written = dead_letter_file(tmp_path)
    damage(path)

    found = salvage.dead_letter_rows(path).letters

    assert set(found) <= set(written)
    assert len(set(found)) == len(found)
    assert found == sorted(found, key=written.index)
    assert len(found) >= len(written) // 2


def test_dead_letters_of_a_file_from_before_sources_have_an_empty_one(
    tmp_path: Path, tool: str
) -> None:
    path = tmp_path / "dead-letters.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " dead_at REAL NOT NULL, reason TEXT NOT NULL, event BLOB NOT NULL)"
    )
    conn.execute("INSERT INTO dead_letters VALUES (1, 5.5, 'older than 7 days', X'7B7D')")
    conn.commit()
    conn.close()

    assert salvage.dead_letter_rows(path).letters == [(5.5, "older than 7 days", b"{}", "")]


def test_without_the_tool_salvage_fails_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = queue_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    with pytest.raises(SalvageFailed) as failed:
        salvage.queue_rows(path)

    assert "apt-get install sqlite3" in failed.value.message
    assert f"it is kept at {path}" in failed.value.message
