"""The ids of events already stored, so a client's retry is accepted but not stored twice.

Ids live in their own SQLite file (`seen-ids.db`), not in the queue file: they must
outlive the events' stay in the queue (24 hours by default), and their space must not
take the queue's place. The file is bounded (`max_bytes`, from `dedup_max_bytes`): past
it the oldest ids are forgotten before the window ends, with a warning, so at a high
event rate de-duplication covers the most recent ids only (SDK retries come seconds to
minutes apart). An id is remembered only *after* the queue commit of its event, so a crash
between the two can at worst let a retry be stored twice (at-least-once), never make an
event "seen" but lost. For the same reason this file needs no fsync per commit
(`synchronous=NORMAL`): losing its tail to a power cut only forgets ids.
"""

from __future__ import annotations

import logging
import threading
import time

import orjson

from collector.store import db
from collector.store.datadir import DataDir

# How often expired ids are deleted, and at most how many per pass, so pruning never holds
# the write lock long enough to be felt by a request.
PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 50_000
# Past `max_bytes`, ids are forgotten down to this share of it, so that the next check does
# not have to forget more at once.
KEEP_SHARE = 0.75
log = logging.getLogger("collector.store")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen_ids (id TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_ids_by_time ON seen_ids (seen)",
)
_translated = db.translated("seen ids")


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
        self._last_prune = 0.0

    def close(self) -> None:
        self._conn.close()

    def seen(self, ids: list[str]) -> set[str]:
        """Those of `ids` stored within the window."""
        if not ids:
            return set()
        since = time.time() - self.window_s
        # One statement over a JSON array, not one bound parameter or call per id: each
        # SQLite call must retake the GIL, which the event loop holds in long stretches.
        with self._lock, _translated:
            rows = self._conn.execute(
                "SELECT id FROM seen_ids WHERE seen >= ? AND id IN"
                " (SELECT value FROM json_each(?))",
                (since, orjson.dumps(ids)),
            )
            return {eid for (eid,) in rows}

    def remember(self, ids: list[str]) -> None:
        """Record `ids` as stored now (call only after their events are committed)."""
        now = time.time()
        with self._lock, _translated, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO seen_ids (id, seen) SELECT value, ? FROM json_each(?)",
                (now, orjson.dumps(ids)),
            )
            if now - self._last_prune > PRUNE_EVERY_S:
                self._conn.execute(
                    "DELETE FROM seen_ids WHERE id IN"
                    " (SELECT id FROM seen_ids WHERE seen < ? LIMIT ?)",
                    (now - self.window_s, PRUNE_BATCH),
                )
                self._last_prune = now
        self._keep_within_max_bytes(now)  # three pragmas: ~10 us a commit

    def _keep_within_max_bytes(self, now: float) -> None:
        """Past `max_bytes`, forget the oldest ids down to KEEP_SHARE of it, PRUNE_BATCH at
        a time (short transactions: a small write-ahead log, the lock soon given back).
        The file then stays at its size: SQLite reuses the freed pages."""
        with self._lock, _translated:
            used = db.used_bytes(self._conn)
            if used <= self.max_bytes:
                return
            (held,) = self._conn.execute("SELECT COUNT(*) FROM seen_ids").fetchone()
            forget = held - int(held * KEEP_SHARE * self.max_bytes / used)
        forgotten = 0
        while forgotten < forget:
            with self._lock, _translated, self._conn:
                deleted = self._conn.execute(
                    "DELETE FROM seen_ids WHERE id IN"
                    " (SELECT id FROM seen_ids ORDER BY seen LIMIT ?)",
                    (min(PRUNE_BATCH, forget - forgotten),),
                ).rowcount
            if deleted <= 0:  # nothing left to forget (the file's own pages are the rest)
                break
            forgotten += deleted
        with self._lock, _translated:
            (oldest,) = self._conn.execute("SELECT MIN(seen) FROM seen_ids").fetchone()
        kept_s = now - oldest if oldest is not None else 0.0
        log.warning(
            "seen-ids.db reached its bound (%d bytes, dedup_max_bytes): the oldest %d ids were "
            "forgotten before the dedup window ended; retries are now recognised for the last "
            "%.0f s of ids",
            self.max_bytes,
            forgotten,
            kept_s,
        )
