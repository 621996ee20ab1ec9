"""collector/store/db.py: a writer applies its schema in WAL mode; a reader of a missing
file is None and creates nothing; a missing table reads as no rows; SQLite's own failures
leave the store as QueueBusy or QueueFull (`translated`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from collector.errors import QueueBusy, QueueFull
from collector.store import db

SCHEMA = ("CREATE TABLE IF NOT EXISTS things (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",)


def test_a_reader_of_a_missing_file_is_none_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("unrelated")
    before = sorted(os.listdir(tmp_path))

    assert db.open_reader(tmp_path / "missing.db") is None
    assert db.read(None, "SELECT 1") == []

    assert sorted(os.listdir(tmp_path)) == before


def test_a_writer_applies_its_schema_in_wal_mode_and_a_reader_sees_what_it_wrote(
    tmp_path: Path,
) -> None:
    path = tmp_path / "things.db"
    writer = db.open_writer(path, SCHEMA)
    try:
        with writer:
            writer.execute("INSERT INTO things (name) VALUES ('a'), ('b')")
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        reader = db.open_reader(path)
        assert reader is not None
        try:
            assert db.read(reader, "SELECT name FROM things ORDER BY id") == [("a",), ("b",)]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.execute("INSERT INTO things (name) VALUES ('c')")
        finally:
            reader.close()
    finally:
        writer.close()


def test_applying_the_schema_again_keeps_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "things.db"
    first = db.open_writer(path, SCHEMA, synchronous="FULL")
    with first:
        first.execute("INSERT INTO things (name) VALUES ('kept')")
    first.close()

    again = db.open_writer(path, SCHEMA)
    try:
        assert again.execute("SELECT name FROM things").fetchall() == [("kept",)]
    finally:
        again.close()


def test_a_table_not_yet_created_reads_as_no_rows_but_a_bad_query_still_fails(
    tmp_path: Path,
) -> None:
    path = tmp_path / "empty.db"
    db.open_writer(path).close()  # a file whose creator has not run its schema
    reader = db.open_reader(path)
    assert reader is not None
    try:
        assert db.read(reader, "SELECT * FROM things") == []
        with pytest.raises(sqlite3.OperationalError):
            db.read(reader, "SELEKT nonsense")
    finally:
        reader.close()


def test_a_locked_database_is_queue_busy(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = db.open_writer(path, SCHEMA)
    other = sqlite3.connect(path, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")  # holds the write lock
        busy = r"queue unavailable \(database is locked\)"
        with pytest.raises(QueueBusy, match=busy) as caught, db.translated("queue"):
            other.execute("INSERT INTO things (name) VALUES ('x')")
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        assert caught.value.retry_after > 0
    finally:
        holder.rollback()
        holder.close()
        other.close()


def test_a_full_database_is_queue_full(tmp_path: Path) -> None:
    conn = db.open_writer(tmp_path / "small.db", SCHEMA)
    try:
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {page_count + 1}")
        with pytest.raises(QueueFull, match="disk full") as caught, db.translated("queue"), conn:
            conn.execute("INSERT INTO things (name) VALUES (?)", ("x" * 100_000,))
        assert "database or disk is full" in str(caught.value.__cause__)
    finally:
        conn.close()


def test_errors_other_than_sqlites_pass_through_translated_unchanged() -> None:
    with pytest.raises(ValueError, match="not ours"), db.translated("queue"):
        raise ValueError("not ours")

    with db.translated("queue"):
        pass  # and no error is no error


def test_reading_a_database_no_process_has_open_creates_no_side_files(tmp_path: Path) -> None:
    path = tmp_path / "things.db"
    writer = db.open_writer(path, SCHEMA)
    with writer:
        writer.execute("INSERT INTO things (name) VALUES ('a')")
    writer.close()  # the last connection: SQLite deletes -wal and -shm
    before = sorted(os.listdir(tmp_path))

    reader = db.open_reader(path)
    assert reader is not None
    try:
        assert db.read(reader, "SELECT name FROM things") == [("a",)]
    finally:
        reader.close()

    assert before == ["things.db"]
    assert sorted(os.listdir(tmp_path)) == before


def test_a_reader_sees_what_a_running_writer_committed(tmp_path: Path) -> None:
    path = tmp_path / "things.db"
    writer = db.open_writer(path, SCHEMA)
    try:
        with writer:
            writer.execute("INSERT INTO things (name) VALUES ('a')")
        reader = db.open_reader(path)
        with writer:
            writer.execute("INSERT INTO things (name) VALUES ('b')")
        try:
            assert db.read(reader, "SELECT name FROM things ORDER BY id") == [("a",), ("b",)]
        finally:
            assert reader is not None
            reader.close()
    finally:
        writer.close()
