"""The seen-ids store's generations (`collector.store.seen`), on real files in tmp paths."""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from collector.store import db
from collector.store.datadir import DataDir
from collector.store.seen import SeenIds


def ids(start: int, n: int) -> list[str]:
    return [str(uuid.UUID(int=i)) for i in range(start, start + n)]


def test_an_id_is_seen_within_the_window_and_not_after(tmp_path: Path) -> None:
    seen = SeenIds(DataDir(tmp_path), window_s=0.3, max_bytes=1 << 30)
    try:
        seen.remember(["a", "b"])
        assert seen.seen(["a", "c"]) == {"a"}
        time.sleep(0.4)
        seen.remember(["c"])  # a window old: a new generation; "a" is only in the previous
        assert seen.seen(["a", "b", "c"]) == {"c"}
        time.sleep(0.4)
        seen.remember(["d"])  # and the one before the previous is dropped whole
        tables = {name for (name,) in seen._conn.execute("SELECT name FROM sqlite_master")}
        assert sum(name.startswith("seen_ids_") for name in tables) == 2
    finally:
        seen.close()


def test_the_file_stays_within_max_bytes_keeping_the_newest_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 512 * 1024
    seen = SeenIds(DataDir(tmp_path), window_s=3600, max_bytes=bound)
    try:
        for n in range(60):
            seen.remember(ids(n * 1000, 1000))
            assert db.used_bytes(seen._conn) <= bound + 100_000  # one commit's ids past it
        assert seen.seen(ids(59_000, 1000)) == set(ids(59_000, 1000))  # the newest kept
        assert not seen.seen(ids(0, 1000))  # the oldest forgotten before the window ended
    finally:
        seen.close()
    assert "seen-ids.db reached its bound" in caplog.text
    assert (tmp_path / "seen-ids.db").stat().st_size <= bound + 200_000


def test_a_file_of_the_layout_before_generations_is_read_as_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conn = sqlite3.connect(tmp_path / "seen-ids.db")
    conn.execute("CREATE TABLE seen_ids (id TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID")
    conn.execute("CREATE INDEX seen_ids_by_time ON seen_ids (seen)")
    conn.execute("INSERT INTO seen_ids VALUES ('old', ?)", (time.time(),))
    conn.commit()
    conn.close()

    caplog.set_level(logging.WARNING)
    seen = SeenIds(DataDir(tmp_path), window_s=3600, max_bytes=1 << 30)
    try:
        seen.remember(["new"])
        assert seen.seen(["old", "new", "other"]) == {"old", "new"}
        indexes = seen._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        assert "seen_ids_by_time" not in {name for (name,) in indexes}
    finally:
        seen.close()
    again = SeenIds(DataDir(tmp_path), window_s=3600, max_bytes=1 << 30)  # reopened
    try:
        assert again.seen(["old", "new"]) == {"old", "new"}
    finally:
        again.close()
