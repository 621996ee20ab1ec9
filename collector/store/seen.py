"""The ids of events already stored, so a client's retry is accepted but not stored twice.

Ids live in their own SQLite file (`seen-ids.db`), not in the queue file: they must
outlive the events' stay in the queue (24 hours by default), and their space must not
take the queue's place. An id is remembered only *after* the queue commit of its event, so
a crash between the two can at worst let a retry be stored twice (at-least-once), never
make an event "seen" but lost. For the same reason this file needs no fsync per commit
(`synchronous=NORMAL`): losing its tail to a power cut only forgets ids.

Ids are kept in generations: one table of (id, when) per generation, written in turn.
A lookup reads the current and the previous one (an id counts as seen while `when` is
within the window); a new generation starts when the current one is a window old, or when
it takes half of `max_bytes`, and the one before the previous is then dropped whole. One
b-tree per insert and no deletes: with an index on time and deletes of the oldest ids (the
layout before), the ids' upkeep took 40% of the queue writer's time at 100,000 events/s
(py-spy), most of it forgetting ids past the bound. Past `max_bytes`, a generation is
dropped before the window ends, with a warning, so at a high event rate de-duplication
covers the most recent ids only (SDK retries come seconds to minutes apart).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import orjson

from collector.store import db
from collector.store.datadir import DataDir

log = logging.getLogger("collector.store")
SCHEMA = ("CREATE TABLE IF NOT EXISTS generations (n INTEGER PRIMARY KEY, started REAL NOT NULL)",)
# The table of the layout before generations: read as generation 0 until it ages out.
OLD_TABLE = "seen_ids"
OLD_INDEX = "seen_ids_by_time"
# Past this share of `max_bytes` the current generation is turned, so that two of them
# (the current and the previous, the two kept) fit in the bound.
GENERATION_SHARE = 0.5
_translated = db.translated("seen ids")


def table_of(n: int) -> str:
    return OLD_TABLE if n == 0 else f"seen_ids_{n}"


class SeenIds:
    """A time-windowed set of event ids, on disk. Raises `QueueBusy`/`QueueFull`."""

    def __init__(
        self, data_dir: DataDir, window_s: float, max_bytes: int, *, recover: bool = False
    ) -> None:
        self.window_s = window_s
        self.max_bytes = max_bytes
        with _translated:
            self._conn = db.open_writer(data_dir.seen_ids, SCHEMA, recover=recover)
            self._lock = threading.Lock()
            self._generations = self._load()
            # The bytes in use besides the current generation: of the previous one (counted
            # as half of the file at open) and the file's own tables.
            self._base = db.used_bytes(self._conn) // 2 if len(self._generations) == 2 else 0

    def close(self) -> None:
        self._conn.close()

    def _load(self) -> list[tuple[int, float]]:
        """The generations kept, oldest first (the current one last); a file of the layout
        before is adopted as generation 0, without its index."""
        with self._conn as conn:
            found = conn.execute("SELECT n, started FROM generations ORDER BY n").fetchall()
            if not found:
                old = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (OLD_TABLE,)
                ).fetchone()
                if old is not None:
                    conn.execute(f"DROP INDEX IF EXISTS {OLD_INDEX}")
                    conn.execute("INSERT INTO generations (n, started) VALUES (0, ?)", (0.0,))
                    found = [(0, 0.0)]
            generations = [(int(n), float(started)) for n, started in found]
            if not generations or generations[-1][0] == 0:
                generations.append(self._start(conn, generations[-1][0] + 1 if generations else 1))
        return generations[-2:]

    def _start(self, conn: sqlite3.Connection, n: int) -> tuple[int, float]:
        started = time.time()
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table_of(n)} (id TEXT PRIMARY KEY, seen REAL NOT NULL)"
            " WITHOUT ROWID"
        )
        conn.execute("INSERT OR REPLACE INTO generations (n, started) VALUES (?, ?)", (n, started))
        return n, started

    def seen(self, ids: list[str]) -> set[str]:
        """Those of `ids` stored within the window."""
        if not ids:
            return set()
        since = time.time() - self.window_s
        # One statement over a JSON array, not one bound parameter or call per id: each
        # SQLite call must retake the GIL, which the event loop holds in long stretches.
        # A join, each id looked up by the primary key: 0.08 ms per 1000 new ids in a table
        # of a million, against 0.23 for `id IN (SELECT value FROM json_each(?))`, which
        # builds a temporary index of the ids first (measured here).
        with self._lock, _translated:
            wanted = orjson.dumps(ids)
            found: set[str] = set()
            for n, _ in self._generations:
                rows = self._conn.execute(
                    f"SELECT t.id FROM json_each(?) AS j JOIN {table_of(n)} AS t"
                    " ON t.id = j.value WHERE t.seen >= ?",
                    (wanted, since),
                )
                found.update(eid for (eid,) in rows)
            return found

    def remember(self, ids: list[str]) -> None:
        """Record `ids` as stored now (call only after their events are committed)."""
        now = time.time()
        with self._lock, _translated:
            current = self._generations[-1][0]
            with self._conn:
                self._conn.execute(
                    f"INSERT OR REPLACE INTO {table_of(current)} (id, seen)"
                    " SELECT value, ? FROM json_each(?)",
                    (now, orjson.dumps(ids)),
                )
            if now - self._generations[-1][1] >= self.window_s:
                self._turn(now, full=False)
            elif db.used_bytes(self._conn) - self._base > self.max_bytes * GENERATION_SHARE:
                self._turn(now, full=True)  # three pragmas a commit: ~10 us

    def _turn(self, now: float, *, full: bool) -> None:
        """Start a new generation and drop the one before the previous (under the lock).
        `full`: turned for the bound, not for the window: say what is forgotten early."""
        dropped = self._generations[0] if len(self._generations) == 2 else None
        with self._conn as conn:
            if dropped is not None:
                conn.execute(f"DROP TABLE IF EXISTS {table_of(dropped[0])}")
                conn.execute("DELETE FROM generations WHERE n = ?", (dropped[0],))
            self._generations = [
                *self._generations[-1:],
                self._start(conn, self._generations[-1][0] + 1),
            ]
        self._base = db.used_bytes(self._conn)
        if full and dropped is not None:
            kept_s = now - self._generations[0][1]
            log.warning(
                "seen-ids.db reached its bound (%d bytes, dedup_max_bytes): the oldest ids were "
                "forgotten before the dedup window ended; retries are now recognised for the "
                "last %.0f s of ids at least",
                self.max_bytes,
                kept_s,
            )
