"""The ids of events already stored, so a client's retry is accepted but not stored twice.

Ids live in their own SQLite file (`seen-ids.db` in the data directory), not in the queue
file: they must outlive the events' stay in the queue (24 hours by default), and their
space must not count against the queue's disk budget. An id is remembered only *after*
the queue commit of its event, so a crash between the two can at worst let a retry be
stored twice (at-least-once), never make an event "seen" but lost. For the same reason
this file needs no fsync per commit (`synchronous=NORMAL`): losing its tail to a power cut
only forgets ids.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

DB_FILE = "seen-ids.db"
# SQLite's limit on bound parameters is 32766; look ids up in chunks well below it.
LOOKUP_CHUNK = 900
# How often expired ids are deleted, and at most how many per pass, so pruning never holds
# the write lock long enough to be felt by a request.
PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 50_000


class SeenIds:
    """A time-windowed set of event ids, on disk."""

    def __init__(self, data_dir: Path, window_s: float) -> None:
        self.window_s = window_s
        self._conn = sqlite3.connect(data_dir / DB_FILE, check_same_thread=False, timeout=5)
        self._lock = threading.Lock()
        self._last_prune = 0.0
        with self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS seen_ids (id TEXT PRIMARY KEY, seen REAL NOT NULL)"
                " WITHOUT ROWID"
            )
            self._conn.execute("CREATE INDEX IF NOT EXISTS seen_ids_by_time ON seen_ids (seen)")

    def close(self) -> None:
        self._conn.close()

    def seen(self, ids: Iterable[str]) -> set[str]:
        """Those of `ids` stored within the window."""
        wanted = list(set(ids))
        since = time.time() - self.window_s
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start : start + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT id FROM seen_ids WHERE seen >= ? AND id IN ({marks})",
                    (since, *chunk),
                )
                found.update(eid for (eid,) in rows)
        return found

    def remember(self, ids: list[str]) -> None:
        """Record `ids` as stored now (call only after their events are committed)."""
        now = time.time()
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO seen_ids (id, seen) VALUES (?, ?)",
                ((eid, now) for eid in ids),
            )
            if now - self._last_prune > PRUNE_EVERY_S:
                self._conn.execute(
                    "DELETE FROM seen_ids WHERE id IN"
                    " (SELECT id FROM seen_ids WHERE seen < ? LIMIT ?)",
                    (now - self.window_s, PRUNE_BATCH),
                )
                self._last_prune = now
