"""The durable local queue: the only module that touches persist-queue.

One SQLite file (`queue.db` in the data directory) holds persist-queue's `SQLiteAckQueue`
table and, beside it, the ids of events already stored (`seen_ids`). Facts that shape it
(measured on the reference machine, see design.md):

- a commit costs an fsync, so one queue row holds a *group* of events (one or several
  requests' worth, gathered by `commit.py`), stored as a JSON array of the clients' own
  event objects: raw bytes, no pickle;
- the row and the ids of its events are inserted in one transaction, so an id is never
  remembered for an event that was not committed, and a crash loses neither or both;
- only the forwarder may turn in-flight rows back to ready, so the server opens the queue
  with `auto_resume=False`.

Errors raised: `QueueFull` (disk budget reached, or the disk itself full) and `QueueBusy`
(the file is locked past the busy timeout, or failing).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from persistqueue import SQLiteAckQueue

from collector.errors import CollectorError, QueueBusy, QueueFull

DB_FILE = "queue.db"
QUEUE_NAME = "events"
# A request waits at most this long for SQLite's write lock (held briefly by the
# forwarder's acks) before the client is told 503: long enough to ride out a checkpoint,
# short enough that the SDK's own timeout (10 s in the Python SDK) does not fire first.
BUSY_TIMEOUT_S = 2.0
# How often expired ids are deleted from `seen_ids`, and at most how many per pass, so
# pruning never holds the write lock long enough to be felt by a request.
PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 20_000
# SQLite's limit on bound parameters is 32766; look ids up in chunks well below it.
LOOKUP_CHUNK = 900

Sync = Literal["full", "normal"]
EncodedEvent = tuple[str | None, bytes]  # (client id or None, the event's JSON)


class _RawBytes:
    """persist-queue serializer that stores the bytes it is given, unchanged."""

    @staticmethod
    def dumps(value: bytes) -> bytes:
        return value

    @staticmethod
    def loads(value: bytes) -> bytes:
        return value


class _Queue(SQLiteAckQueue):  # type: ignore[misc]
    """SQLiteAckQueue with our pragmas and the `seen_ids` table in the same file."""

    def __init__(self, path: str, sync: Sync, **kwargs: Any) -> None:
        self._sync = sync
        super().__init__(path, **kwargs)
        with self.tran_lock, self._putter as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS seen_ids (id TEXT PRIMARY KEY, seen REAL NOT NULL)"
                " WITHOUT ROWID"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS seen_ids_by_time ON seen_ids (seen)")

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> Any:
        conn = super()._new_db_connection(path, multithreading, timeout)
        # WAL is persist-queue's own choice. FULL fsyncs the WAL on every commit (survives
        # power loss); NORMAL syncs only at checkpoints (survives a process crash).
        conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
        return conn


class Spool:
    """The queue file, as the server and the forwarder use it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        sync: Sync = "full",
        budget_bytes: int,
        dedup_window_s: float = 24 * 3600,
        resume_in_flight: bool = False,
    ) -> None:
        self.path = data_dir / DB_FILE
        self.budget_bytes = budget_bytes
        self.dedup_window_s = dedup_window_s
        self._queue = _Queue(
            str(data_dir),
            sync,
            name=QUEUE_NAME,
            db_file_name=DB_FILE,
            multithreading=True,
            timeout=BUSY_TIMEOUT_S,
            serializer=_RawBytes,
            auto_resume=resume_in_flight,
        )
        self._table = self._queue._table_name
        self._lock = threading.Lock()
        self._last_prune = 0.0

    def close(self) -> None:
        self._queue.close()

    # --- the server's side ----------------------------------------------------------

    def write(self, requests: Sequence[Sequence[EncodedEvent]]) -> list[int | CollectorError]:
        """Commit the new events of several requests as one row, in one transaction.

        Returns, per request, how many events it wrote (events whose id is already stored
        are not written again), or the error that kept it out (`QueueFull` when its events
        would take the queue past the disk budget). Raises `QueueFull`/`QueueBusy` when the
        transaction itself fails, in which case nothing was written.
        """
        with self._lock, _sqlite_errors():
            conn = self._queue._putter
            now = time.time()
            seen = self._already_seen(conn, requests, now)
            used = self._used_bytes(conn)
            results: list[int | CollectorError] = []
            rows: list[bytes] = []
            new_ids: list[tuple[str, float]] = []
            for events in requests:
                fresh = [(eid, raw) for eid, raw in events if eid is None or eid not in seen]
                seen.update(eid for eid, _ in fresh if eid is not None)
                size = sum(len(raw) for _, raw in fresh)
                if fresh and used + size > self.budget_bytes:
                    results.append(QueueFull("disk budget reached; retry later"))
                    continue
                used += size
                rows.extend(raw for _, raw in fresh)
                new_ids.extend((eid, now) for eid, _ in fresh if eid is not None)
                results.append(len(fresh))
            if rows:
                self._insert(conn, b"[" + b",".join(rows) + b"]", new_ids, now)
            if now - self._last_prune > PRUNE_EVERY_S:
                self._prune_ids(conn, now)
            return results

    def check_writable(self) -> None:
        """Raise QueueFull or QueueBusy unless a write could be committed now."""
        with self._lock, _sqlite_errors():
            conn = self._queue._putter
            if self._used_bytes(conn) >= self.budget_bytes:
                raise QueueFull("disk budget reached")
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()

    def used_bytes(self) -> int:
        with self._lock, _sqlite_errors():
            return self._used_bytes(self._queue._putter)

    def _insert(
        self, conn: sqlite3.Connection, row: bytes, ids: list[tuple[str, float]], now: float
    ) -> None:
        with self._queue.tran_lock, conn:
            conn.executemany("INSERT OR REPLACE INTO seen_ids (id, seen) VALUES (?, ?)", ids)
            conn.execute(self._queue._sql_insert, (row, now))
        self._queue.total += 1

    def _already_seen(
        self, conn: sqlite3.Connection, requests: Sequence[Sequence[EncodedEvent]], now: float
    ) -> set[str]:
        ids = list({eid for events in requests for eid, _ in events if eid is not None})
        found: set[str] = set()
        since = now - self.dedup_window_s
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(
                eid
                for (eid,) in conn.execute(
                    f"SELECT id FROM seen_ids WHERE seen >= ? AND id IN ({marks})",
                    (since, *chunk),
                )
            )
        return found

    def _prune_ids(self, conn: sqlite3.Connection, now: float) -> None:
        with self._queue.tran_lock, conn:
            conn.execute(
                "DELETE FROM seen_ids WHERE id IN"
                " (SELECT id FROM seen_ids WHERE seen < ? LIMIT ?)",
                (now - self.dedup_window_s, PRUNE_BATCH),
            )
        self._last_prune = now

    @staticmethod
    def _used_bytes(conn: sqlite3.Connection) -> int:
        """Bytes of the file in use: SQLite reuses freed pages, so free ones do not count."""
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    # --- reading what is stored (forwarder, status, tests) --------------------------

    def stored_events(self) -> Iterator[dict[str, Any]]:
        """Every event in rows not yet acknowledged, oldest first."""
        with self._lock, _sqlite_errors():
            rows = self._queue._putter.execute(
                f"SELECT data FROM {self._table} WHERE status < 5 ORDER BY _id"
            ).fetchall()
        for (data,) in rows:
            yield from orjson.loads(data)


class _sqlite_errors:
    """Turn SQLite's failures into the queue's error types (503 for the client)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if not isinstance(exc, sqlite3.Error):
            return
        text = str(exc)
        if "full" in text:
            raise QueueFull("disk full; retry later") from exc
        raise QueueBusy(f"queue unavailable ({text}); retry later") from exc
