"""The durable local queue: the only module that touches persist-queue.

One SQLite file (`queue.db` in the data directory) holds persist-queue's `SQLiteAckQueue`
table. Facts that shape its use (measured on the reference machine, see design.md):

- a commit costs an fsync, so one queue row holds a *group* of events (one or several
  requests' worth, gathered by `commit.py`), stored as a JSON array of the clients' own
  event objects: raw bytes, no pickle;
- acknowledged rows are deleted (`remove_acked`), never left for `get` to scan past;
- only the forwarder may turn in-flight rows back to ready, so the server opens the queue
  with `auto_resume=False`.

Errors raised: `QueueFull` (disk budget reached, or the disk itself full) and `QueueBusy`
(the file is locked past the busy timeout, or failing).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import orjson
from persistqueue import SQLiteAckQueue
from persistqueue.exceptions import Empty

from collector.errors import QueueBusy, QueueFull

DB_FILE = "queue.db"
QUEUE_NAME = "events"
# A request waits at most this long for SQLite's write lock (held briefly by the
# forwarder's acks) before the client is told 503: long enough to ride out a checkpoint,
# short enough that the SDK's own timeout (10 s in the Python SDK) does not fire first.
BUSY_TIMEOUT_S = 2.0

# SQLite's limit on bound parameters is 32766; act on row ids in chunks well below it.
IDS_PER_STATEMENT = 900

Sync = Literal["full", "normal"]


@dataclass(frozen=True)
class Row:
    """One queue row: a group of events committed together, as a JSON array."""

    id: int
    data: bytes
    queued_at: float  # when the server committed it (Unix time)

    def events(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], orjson.loads(self.data))


class _RawBytes:
    """persist-queue serializer that stores the bytes it is given, unchanged."""

    @staticmethod
    def dumps(value: bytes) -> bytes:
        return value

    @staticmethod
    def loads(value: bytes) -> bytes:
        return value


class _Queue(SQLiteAckQueue):
    """SQLiteAckQueue with our pragmas and the `seen_ids` table in the same file."""

    def __init__(self, path: str, sync: Sync, **kwargs: Any) -> None:
        self._sync = sync
        super().__init__(path, **kwargs)

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
        resume_in_flight: bool = False,
    ) -> None:
        self.path = data_dir / DB_FILE
        self.budget_bytes = budget_bytes
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
        # persist-queue's writing connection: we read sizes and run checks on it too.
        self._conn = cast(sqlite3.Connection, self._queue._putter)
        self._lock = threading.Lock()
        # Bytes in use when a request was last refused for the disk budget. Until the
        # forwarder frees space below that, `check_writable` says the budget is reached, so
        # /readyz agrees with the 503s even though a smaller request might still fit.
        self._refused_at: int | None = None

    def close(self) -> None:
        self._queue.close()

    # --- the server's side ----------------------------------------------------------

    def append(self, events: list[bytes]) -> None:
        """Commit `events` (each one event's JSON) as one row, in one transaction.

        Raises `QueueFull` when they would take the queue past the disk budget (nothing is
        written), and `QueueFull`/`QueueBusy` when SQLite fails.
        """
        with self._lock, _sqlite_errors():
            used = self._used_bytes(self._conn)
            if used + sum(map(len, events)) > self.budget_bytes:
                self._refused_at = used
                raise QueueFull("disk budget reached; retry later")
            self._queue.put(b"[" + b",".join(events) + b"]")

    def check_writable(self) -> None:
        """Raise QueueFull or QueueBusy unless a write could be committed now."""
        with self._lock, _sqlite_errors():
            conn = self._conn
            used = self._used_bytes(conn)
            if self._refused_at is not None and used < self._refused_at:
                self._refused_at = None  # space was freed since the last refusal
            if used >= self.budget_bytes or self._refused_at is not None:
                raise QueueFull("disk budget reached")
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()

    def used_bytes(self) -> int:
        with self._lock, _sqlite_errors():
            return self._used_bytes(self._conn)

    @staticmethod
    def _used_bytes(conn: sqlite3.Connection) -> int:
        """Bytes of the file in use: SQLite reuses freed pages, so free ones do not count."""
        (used,) = conn.execute(
            "SELECT (p.page_count - f.freelist_count) * s.page_size"
            " FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s"
        ).fetchone()
        return int(used)

    # --- the forwarder's side -------------------------------------------------------

    def take(self) -> Row | None:
        """The oldest ready row, marked in flight, or None when nothing is ready."""
        with self._lock, _sqlite_errors():
            try:
                row = self._queue.get(block=False, raw=True)
            except Empty:
                return None
            # persist-queue keeps what `get` returns in a cache until its own ack; ours is
            # SQL (`ack`, `nack`), so drop it now or every row taken stays in memory.
            self._queue._unack_cache.pop(row["pqid"], None)
        return Row(int(row["pqid"]), row["data"], float(row["timestamp"]))

    def ack(self, row_ids: Sequence[int]) -> None:
        """The rows are done with (delivered or dead-lettered): delete them at once.

        Deleting rather than marking them acked keeps the table free of rows that every
        `get` would scan past (175 ms per get with a million of them).
        """
        self._by_ids("DELETE FROM {table} WHERE _id IN ({marks})", row_ids)

    def nack(self, row_ids: Sequence[int]) -> None:
        """The rows were not delivered: make them ready again."""
        self._by_ids("UPDATE {table} SET status = 1 WHERE _id IN ({marks})", row_ids)

    def _by_ids(self, sql: str, row_ids: Sequence[int]) -> None:
        if not row_ids:
            return
        with self._lock, _sqlite_errors(), self._queue.tran_lock, self._conn as conn:
            for start in range(0, len(row_ids), IDS_PER_STATEMENT):
                chunk = row_ids[start : start + IDS_PER_STATEMENT]
                conn.execute(sql.format(table=self._table, marks=",".join("?" * len(chunk))), chunk)

    def depth(self) -> tuple[int, int]:
        """(rows, bytes) not yet delivered, ready or in flight."""
        with self._lock, _sqlite_errors():
            rows, size = self._conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM {self._table}"
                " WHERE status < 5"
            ).fetchone()
        return int(rows), int(size)

    def summary(self) -> tuple[int, int, int, float | None]:
        """(events, rows, bytes, when the oldest row was queued) of what is not delivered.

        Counting events means reading every row's JSON array (in SQLite's C code, about a
        second per gigabyte), which is why it is for status, not for the request path.
        """
        with self._lock, _sqlite_errors():
            events, rows, size, oldest = self._conn.execute(
                "SELECT COALESCE(SUM(json_array_length(data)), 0), COUNT(*),"
                f" COALESCE(SUM(LENGTH(data)), 0), MIN(timestamp) FROM {self._table}"
                " WHERE status < 5"
            ).fetchone()
        return int(events), int(rows), int(size), oldest

    # --- reading what is stored (forwarder, status, tests) --------------------------

    def stored_events(self) -> Iterator[dict[str, Any]]:
        """Every event in rows not yet acknowledged, oldest first."""
        with self._lock, _sqlite_errors():
            rows = self._conn.execute(
                f"SELECT data FROM {self._table} WHERE status < 5 ORDER BY _id"
            ).fetchall()
        for (data,) in rows:
            yield from orjson.loads(data)


class _sqlite_errors:
    """Turn SQLite's failures into the queue's error types (503 for the client)."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if not isinstance(exc, sqlite3.Error):
            return
        text = str(exc)
        if "full" in text:
            raise QueueFull("disk full; retry later") from exc
        raise QueueBusy(f"queue unavailable ({text}); retry later") from exc
