"""The dead-letter store: events that left the queue without an upstream 2xx, with why.

Nothing is dropped silently: an event the upstream refuses (400/413, isolated by splitting
its batch) or one queued longer than the maximum age is written here, with the reason,
before its queue row is acknowledged. A crash between the two can only leave the event in
both places (it is then sent again), never in neither. `collector dlq` lists, shows,
replays (back into the queue) and purges them. Own SQLite file: `dead-letters.db`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from collector import recovery

DB_FILE = "dead-letters.db"


@dataclass(frozen=True)
class DeadLetter:
    id: int
    dead_at: float
    reason: str
    event: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The fields a person scans a list by (never the whole payload)."""
        return {
            "id": self.id,
            "dead_at": self.dead_at,
            "reason": self.reason,
            "type": self.event.get("type"),
            "event_id": self.event.get("id"),
            "project": self.event.get("projectId"),
            "env": self.event.get("env"),
        }


class DeadLetters:
    """Dead-lettered events, oldest first."""

    def __init__(self, data_dir: Path, *, recover: bool = False) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if recover:  # see collector.recovery: a corrupt file is moved aside, not crashed on
            recovery.ensure_usable(data_dir / DB_FILE)
        self._conn = sqlite3.connect(data_dir / DB_FILE, check_same_thread=False, timeout=5)
        self._lock = threading.Lock()
        with self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " dead_at REAL NOT NULL, reason TEXT NOT NULL, event BLOB NOT NULL)"
            )

    def close(self) -> None:
        self._conn.close()

    def add(self, events: Iterable[bytes], reason: str) -> int:
        """Store `events` (each one event's JSON) with `reason`; returns how many."""
        now = time.time()
        rows = [(now, reason, raw) for raw in events]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO dead_letters (dead_at, reason, event) VALUES (?, ?, ?)", rows
            )
        return len(rows)

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """All dead letters, or those with `ids`, oldest first."""
        query = "SELECT id, dead_at, reason, event FROM dead_letters"
        params: tuple[int, ...] = ()
        if ids is not None:
            query += f" WHERE id IN ({','.join('?' * len(ids))})"
            params = tuple(ids)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id", params).fetchall()
        return [DeadLetter(i, at, reason, orjson.loads(raw)) for i, at, reason, raw in rows]

    def raw(self, ids: Sequence[int]) -> list[tuple[int, bytes]]:
        """(id, the event's JSON as stored) for `ids`, to put back into the queue."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id, event FROM dead_letters WHERE id IN ({','.join('?' * len(ids))})"
                " ORDER BY id",
                tuple(ids),
            ).fetchall()
        return [(int(i), bytes(raw)) for i, raw in rows]

    def all_ids(self) -> list[int]:
        with self._lock:
            return [int(i) for (i,) in self._conn.execute("SELECT id FROM dead_letters")]

    def remove(self, ids: Sequence[int]) -> int:
        with self._lock, self._conn:
            cursor = self._conn.execute(
                f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
            )
        return int(cursor.rowcount)

    def purge(self) -> int:
        with self._lock, self._conn:
            return int(self._conn.execute("DELETE FROM dead_letters").rowcount)
