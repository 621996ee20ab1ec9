"""collector/store/recovery.py: a corrupt database is named (`diagnose`) without being
moved, moved aside by `ensure_usable`, and listed afterwards (`moved_aside`).
"""

from __future__ import annotations

import os
from pathlib import Path

from collector.store import db, recovery
from collector.store.counts import SCHEMA as COUNTS_SCHEMA
from collector.store.datadir import DataDir

GARBAGE = b"this is not a database, only bytes that look nothing like one\n" * 100


def test_diagnose_names_a_garbage_file_among_the_databases_and_moves_nothing(
    tmp_path: Path,
) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.counts.write_bytes(GARBAGE)
    db.open_writer(data_dir.dead_letters, ()).close()  # a sound one
    (tmp_path / "notes.db").write_bytes(GARBAGE)  # not one of ours
    before = sorted(os.listdir(tmp_path))

    found = recovery.diagnose(data_dir)

    assert [name for name, _ in found] == ["counts.db"]
    assert "not a database" in found[0][1]
    assert sorted(os.listdir(tmp_path)) == before


def test_a_sound_data_directory_diagnoses_clean(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    db.open_writer(data_dir.counts, COUNTS_SCHEMA).close()

    assert recovery.diagnose(data_dir) == []
    assert recovery.moved_aside(tmp_path) == []


def test_a_corrupt_file_is_moved_aside_and_then_listed(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.queue.write_bytes(GARBAGE)

    moved = recovery.ensure_usable(data_dir.queue)

    assert moved is not None
    assert moved.file == "queue.db"
    assert moved.moved_to.startswith("queue.db.corrupt-")
    assert not data_dir.queue.exists()
    listed = recovery.moved_aside(tmp_path)
    assert [(e["file"], e["moved_to"]) for e in listed] == [("queue.db", moved.moved_to)]
    assert listed[0]["bytes"] == len(GARBAGE)
    assert (tmp_path / moved.moved_to).read_bytes() == GARBAGE
    assert recovery.ensure_usable(data_dir.queue) is None  # nothing left to move


def test_moved_aside_lists_corrupt_files_with_their_time_and_size_oldest_first(
    tmp_path: Path,
) -> None:
    (tmp_path / "counts.db.corrupt-20260102T030405").write_bytes(b"x" * 7)
    (tmp_path / "queue.db.corrupt-20260101T000000").write_bytes(b"y" * 5)
    (tmp_path / "queue.db.corrupt-20260101T000000-shm").write_bytes(b"z" * 3)
    (tmp_path / "queue.db.corrupt-someday").write_bytes(b"")  # not a name of ours
    (tmp_path / "queue.db").write_bytes(b"")

    listed = recovery.moved_aside(tmp_path)

    assert listed == [
        {
            "file": "queue.db",
            "moved_to": "queue.db.corrupt-20260101T000000",
            "at": "2026-01-01T00:00:00+00:00",
            "bytes": 8,
        },
        {
            "file": "counts.db",
            "moved_to": "counts.db.corrupt-20260102T030405",
            "at": "2026-01-02T03:04:05+00:00",
            "bytes": 7,
        },
    ]


def test_a_sound_file_is_left_in_place(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    conn = db.open_writer(data_dir.counts, COUNTS_SCHEMA)
    conn.close()

    assert recovery.ensure_usable(data_dir.counts) is None
    assert recovery.ensure_usable(tmp_path / "missing.db") is None
    assert sorted(os.listdir(tmp_path)) == ["counts.db"]
