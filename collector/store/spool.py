"""The durable local queue: the only module that touches persist-queue.

One SQLite file (`queue.db` in the data directory) holds persist-queue's `SQLiteAckQueue`
table. Facts that shape its use (measured on the reference machine):

- a commit costs an fsync, so one queue row holds a *group* of events (one or several
  requests' worth, gathered by `collector.server.commit`), stored as raw bytes in the row
  format of `rows.py` (no pickle), which the forwarder splits without parsing;
- acknowledged rows are deleted (`ack`), never left for `get` to scan past;
- every row written and every row acknowledged changes the outcomes ledger (`ledger.py`)
  in the same transaction, so the ledger and the rows can never disagree after a crash;
- the forwarder takes rows by id in its own order (`take`), without persist-queue's `get`
  and its in-flight mark; rows an older version marked in flight are made ready by the
  forwarder only (`auto_resume=True`), so the server opens the queue with
  `auto_resume=False`.

Errors raised: `QueueFull` (disk budget reached, or the disk itself full or nearly so) and
`QueueBusy` (the file is locked past the busy timeout, or failing).

A full disk is refused before SQLite meets it: the server stops taking events while the
space it could still write (free on the filesystem, plus free pages inside the queue file)
is under a reserve (`reserve_bytes`), so the forwarder can still acknowledge rows (a delete
goes to the write-ahead log first, and a checkpoint then copies it into the file: both
need room) and so free the space again. Without it, a disk filled by the queue could not
be drained: measured, the last commits' checkpoint took the last bytes and every ack
failed from then on.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from persistqueue import SQLiteAckQueue

from collector.errors import QueueBusy, QueueFull, Unavailable
from collector.events import Target
from collector.store import db, ledger, recovery, rows
from collector.store.clock import Clock
from collector.store.datadir import DataDir
from collector.store.ledger import State

log = logging.getLogger("collector.queue")

QUEUE_NAME = "events"
# persist-queue's table for QUEUE_NAME (`SQLiteAckQueue._table_name`), for readers that
# open the file without persist-queue; and its status values: ready 1, in flight 2, and
# from 5 on acknowledged or failed (rows we never keep: `ack` deletes them).
TABLE = f"ack_queue_{QUEUE_NAME}"
_translated = db.translated("queue")
READY, IN_FLIGHT, DONE = 1, 2, 5
# A request waits at most this long for SQLite's write lock (held briefly by the
# forwarder's acks) before the client is told 503: long enough to ride out a checkpoint,
# short enough that the SDK's own timeout (10 s in the Python SDK) does not fire first.
BUSY_TIMEOUT_S = 2.0

# How long opening the queue is tried again while another process holds its lock (the
# writer's and the forwarder's opens at start, each a few milliseconds), and how often.
OPEN_WAIT_S = 10.0
OPEN_RETRY_S = 0.05
# SQLite's limit on bound parameters is 32766; act on row ids in chunks well below it.
IDS_PER_STATEMENT = 900
# Free space kept for the forwarder's acks and SQLite's checkpoints: the server refuses
# events (503) when less would be left after a commit, counting the commit twice (its
# write-ahead log frames, then the checkpoint's copy into the file). 32 MiB holds the
# write-ahead logs of the data directory's files at their usual size (4 MiB each, SQLite's
# automatic checkpoint) several times over. On a filesystem under 64 MiB it is half of it.
DISK_RESERVE_BYTES = 32 * 1024 * 1024

Sync = Literal["full", "normal"]


@dataclass(frozen=True)
class Row:
    """One queue row: a group of events committed together (`rows.py` format)."""

    id: int
    data: bytes
    queued_at: float  # when the server committed it (`clock.py`: near Unix time)

    def groups(self) -> list[tuple[Target, list[bytes]]]:
        """Each target's events, their JSON exactly as stored."""
        return rows.split(self.data)


@dataclass(frozen=True)
class Summary:
    """What the queue holds, not yet delivered (ready or in flight)."""

    events: int
    rows: int
    bytes: int
    oldest: float | None  # when the oldest row was queued (`clock.py`)
    used_bytes: int  # the queue file's pages in use
    side_bytes: int  # the other databases' files (`DataDir.side_bytes`)
    ledger: ledger.Entries = field(default_factory=ledger.Entries)  # read with the rows

    @property
    def budget_used_bytes(self) -> int:
        """What counts against the disk budget: both."""
        return self.used_bytes + self.side_bytes


class _RawBytes:
    """persist-queue serializer that stores the bytes it is given, unchanged."""

    @staticmethod
    def dumps(value: bytes) -> bytes:
        return value

    @staticmethod
    def loads(value: bytes) -> bytes:
        return value


class _Queue(SQLiteAckQueue):
    """SQLiteAckQueue with the sync level of our choice. Rows are inserted by `Spool`
    itself, with persist-queue's own statement (`_sql_insert`) but in a transaction that
    adds their ledger entries too, and stamped by `clock.py` (which a step of the wall
    clock does not move), not time.time(): the row's age is the event's."""

    def __init__(self, path: str, sync: Sync, **kwargs: Any) -> None:
        self._sync = sync
        super().__init__(path, **kwargs)

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> Any:
        conn = super()._new_db_connection(path, multithreading, timeout)
        # WAL is persist-queue's own choice. FULL fsyncs the WAL on every commit (survives
        # power loss); NORMAL syncs only at checkpoints (survives a process crash).
        conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
        # Debian's SQLite zeroes every deleted page (secure_delete on by default): each ack
        # of a 500 kB row wrote its 500 kB again, to the log and then the file, a sixth of
        # the forwarder's time (py-spy). FAST zeroes what it can without writing more pages;
        # a delivered event's bytes may stay in a free page of this 0600 file until the
        # page is reused, which a queue that flows does within seconds.
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute(f"PRAGMA cache_size=-{db.CACHE_KIB}")  # see db.CACHE_KIB
        return conn


class Spool:
    """The queue file, as the server and the forwarder use it."""

    def __init__(
        self,
        data_dir: DataDir,
        *,
        sync: Sync = "full",
        budget_bytes: int,
        resume_in_flight: bool = False,
        recover: bool = False,
    ) -> None:
        """`recover`: move the file aside first if it is corrupt (`recovery.py`); only the
        server's writer and the forwarder do, through `reconcile.open_queue` (which then
        reads the moved file back), never a reader such as status (`summary`)."""
        self.path = data_dir.queue
        self._data_dir = data_dir
        self.budget_bytes = budget_bytes
        moved = recovery.ensure_usable(self.path) if recover else None
        self._queue = self._open(sync, resume_in_flight)
        assert self._queue._table_name.strip("`") == TABLE  # persist-queue's own naming
        self.reserve_bytes = reserve_for(self.path.parent)
        # persist-queue's writing connection: we read sizes and run checks on it too.
        self._conn = cast(sqlite3.Connection, self._queue._putter)
        self._lock = threading.Lock()
        self._clock = Clock(data_dir)
        with _translated:
            ledger.ensure(self._conn)
        self._targets: set[Target] = set()  # the ledger's (`ledger.target_for`)
        self.ledger_changed = True  # since the witness was last written
        self._witness_failed = False
        # Bytes in use when a request was last refused for the disk budget. Until the
        # forwarder frees space below that, `check_writable` says the budget is reached, so
        # /readyz agrees with the 503s even though a smaller request might still fit.
        self._refused_at: int | None = None
        # The same for the disk's free space (writable bytes when a request was refused).
        self._refused_free: int | None = None
        # The forwarder's place (`take`): the last row id taken, and rows given back.
        self._taken_up_to = 0
        self._given_back: list[int] = []
        # What `recover` moved aside, for `reconcile.open_queue` to read back.
        self.moved = moved

    def _open(self, sync: Sync, resume_in_flight: bool) -> _Queue:
        """persist-queue's queue on the file, tried again while another process has it
        locked: its `PRAGMA journal_mode=WAL` can be refused at once ("database is locked")
        while the server's writer and the forwarder open the file together, and a
        forwarder that failed on it was restarted a second later (seen by CI)."""
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                with _translated:
                    return _Queue(
                        str(self.path.parent),
                        sync,
                        name=QUEUE_NAME,
                        db_file_name=self.path.name,
                        multithreading=True,
                        timeout=BUSY_TIMEOUT_S,
                        serializer=_RawBytes,
                        auto_resume=resume_in_flight,
                    )
            except QueueBusy as exc:
                if "locked" not in exc.message or time.monotonic() >= deadline:
                    raise
            time.sleep(OPEN_RETRY_S)

    def close(self) -> None:
        self._queue.close()

    # --- the server's side ----------------------------------------------------------

    def append(
        self,
        groups: Mapping[Target, rows.Group],
        duplicates: Mapping[Target, int] | None = None,
        state: State = State.STORED,
    ) -> None:
        """Commit each target's events (their JSON bytes) as one row, in one transaction
        with their ledger entries (`state`, and the `duplicates` dropped per target).

        Raises `QueueFull` when they would take the queue past the disk budget (nothing is
        written), and `QueueFull`/`QueueBusy` when SQLite fails.
        """
        row = rows.join(groups) if groups else b""
        size = len(row)
        with self._lock, _translated:
            if row:
                used = self._budget_used()
                if used + size > self.budget_bytes:
                    self._refused_at = used
                    raise QueueFull("disk budget reached; retry later")
                self._check_free_space(self._conn, size)
            with self._queue.tran_lock, self._conn as conn:
                entries = ledger.counted(
                    conn, ((t, len(e)) for t, e in groups.items()), state, self._targets
                )
                entries += ledger.counted(
                    conn, (duplicates or {}).items(), State.DUPLICATE, self._targets
                )
                if row:
                    conn.execute(self._queue._sql_insert, (row, self._clock.now()))
                ledger.add(conn, entries)
            self.ledger_changed = True
            if row:
                # A whole group fit: whatever was refused before, /readyz now agrees with
                # the 200 just given (it said "not ready" after an accepted retry, measured).
                self._refused_at = self._refused_free = None

    def put_rows(self, found: Sequence[tuple[bytes, float]], entries: ledger.Entries) -> None:
        """Put rows back as they were (their bytes and queue time), with `entries`, in one
        transaction: rows read back from a corrupt file (`salvage_queue`)."""
        with self._lock, _translated, self._queue.tran_lock, self._conn as conn:
            conn.executemany(self._queue._sql_insert, found)
            ledger.add(conn, entries)
            self.ledger_changed = True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The queue's writing connection in a write transaction (`reconcile.py`)."""
        with self._lock, _translated, self._queue.tran_lock, self._conn as conn:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            self.ledger_changed = True

    def ledger(self) -> ledger.Entries:
        with self._lock, _translated:
            return ledger.read(self._conn)

    def write_witness(self) -> None:
        """Copy the ledger to the witness file if it changed since the last copy (from the
        queue writer every second, from the forwarder as it stops). A copy that cannot be
        made (a full disk, a locked file) is tried again next time and logged once: a
        witness that lags only sees less (`ledger.py`)."""
        if not self.ledger_changed:
            return
        self.ledger_changed = False
        try:
            ledger.write_witness(self._data_dir, self.ledger())
        except (OSError, Unavailable) as exc:
            self.ledger_changed = True
            why = exc.message if isinstance(exc, Unavailable) else str(exc)
            if not self._witness_failed:
                log.warning("could not write the ledger's witness (%s); trying again", why)
            self._witness_failed = True
        else:
            self._witness_failed = False

    def check_writable(self) -> None:
        """Raise QueueFull or QueueBusy unless a write could be committed now."""
        with self._lock, _translated:
            conn = self._conn
            used = self._budget_used()
            if self._refused_at is not None and used < self._refused_at:
                self._refused_at = None  # space was freed since the last refusal
            if used >= self.budget_bytes or self._refused_at is not None:
                raise QueueFull("disk budget reached")
            free = self._check_free_space(conn, 0)
            if self._refused_free is not None and free <= self._refused_free:
                raise QueueFull("disk nearly full")
            self._refused_free = None
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()
        try:
            self._data_dir.probe_write()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise QueueFull("disk full; retry later") from exc
            raise QueueBusy(f"the data directory cannot be written: {exc.strerror}") from exc

    def _budget_used(self) -> int:
        """Bytes counted against the disk budget: the queue's pages in use (freed ones are
        reused, so they do not count) and the other databases' files whole."""
        return db.used_bytes(self._conn) + self._data_dir.side_bytes()

    def _check_free_space(self, conn: sqlite3.Connection, size: int) -> int:
        """Raise QueueFull unless `size` more bytes leave the reserve free; returns the
        bytes writable now (free on the filesystem and inside the file)."""
        try:
            free = free_bytes(self.path.parent)
        except OSError:
            return self.reserve_bytes  # cannot tell: SQLite reports a full disk itself
        (reusable,) = conn.execute(
            "SELECT f.freelist_count * s.page_size FROM pragma_freelist_count() f,"
            " pragma_page_size() s"
        ).fetchone()
        writable = free + int(reusable)
        if writable - 2 * size < self.reserve_bytes:
            self._refused_free = writable
            raise QueueFull(
                f"disk nearly full ({free} bytes free, {self.reserve_bytes} kept for"
                " forwarding); retry later"
            )
        return writable

    # --- the forwarder's side -------------------------------------------------------

    def take(self) -> Row | None:
        """The oldest row not taken yet (rows given back by `nack` first), or None.

        Rows are taken in order of their id, and not marked in flight in the file:
        persist-queue's `get` marks them by an UPDATE that rewrites the whole row (~2 ms
        for a 500 kB row, a fifth of the forwarder's CPU, and the row written to disk once
        more). The mark is needless with one forwarder per data directory (its lock): a
        row taken and never acked is taken again when the forwarder next starts, as
        persist-queue's `auto_resume` made it.
        """
        with self._lock, _translated:
            while self._given_back:
                found = self._conn.execute(
                    f"SELECT _id, data, timestamp FROM {TABLE} WHERE _id = ? AND status < {DONE}",
                    (heapq.heappop(self._given_back),),
                ).fetchone()
                if found is not None:
                    return Row(int(found[0]), found[1], float(found[2]))
            found = self._conn.execute(
                f"SELECT _id, data, timestamp FROM {TABLE} WHERE _id > ? AND status < {DONE}"
                " ORDER BY _id LIMIT 1",
                (self._taken_up_to,),
            ).fetchone()
            if found is None:
                return None
            self._taken_up_to = int(found[0])
        return Row(int(found[0]), found[1], float(found[2]))

    def ack(
        self, row_ids: Sequence[int], outcomes: Mapping[tuple[Target, State, str], int]
    ) -> None:
        """The rows are done with: delete them at once, and count their events' `outcomes`
        ((target, state, reason) -> events: delivered, dead-lettered...) in the ledger, in
        the same transaction.

        Deleting rather than marking them acked keeps the table free of rows that every
        `get` would scan past (175 ms per get with a million of them).
        """
        if not row_ids:
            return
        with self._lock, _translated, self._queue.tran_lock, self._conn as conn:
            entries = ledger.Entries()
            for (target, state, reason), n in outcomes.items():
                entries += ledger.counted(conn, [(target, n)], state, self._targets, reason)
            for start in range(0, len(row_ids), IDS_PER_STATEMENT):
                chunk = row_ids[start : start + IDS_PER_STATEMENT]
                conn.execute(
                    f"DELETE FROM {TABLE} WHERE _id IN ({','.join('?' * len(chunk))})", chunk
                )
            ledger.add(conn, entries)
        self.ledger_changed = True

    def nack(self, row_ids: Sequence[int]) -> None:
        """The rows were not delivered: `take` gives them again, before newer ones."""
        with self._lock:
            for row_id in row_ids:
                heapq.heappush(self._given_back, row_id)


def summary(data_dir: DataDir) -> Summary:
    """What the queue file holds, read without opening it for writing (for status).

    A row says how many events it holds in its first bytes (`rows.EVENT_COUNT_SQL`), so
    counting them reads no event; rows of older formats are counted by SQLite's JSON
    reader (about a second per gigabyte).
    """
    with _translated:
        return _summary(db.open_reader(data_dir.queue), data_dir)


def _summary(conn: sqlite3.Connection | None, data_dir: DataDir) -> Summary:
    try:
        if conn is not None:
            conn.execute("BEGIN")  # the rows and the ledger as of one moment
        found = db.read(
            conn,
            f"SELECT COALESCE(SUM({rows.EVENT_COUNT_SQL}), 0), COUNT(*),"
            f" COALESCE(SUM(LENGTH(data)), 0), MIN(timestamp) FROM {TABLE} WHERE status < {DONE}",
        )
        events, count, size, oldest = found[0] if found else (0, 0, 0, None)
        used = db.used_bytes(conn) if conn is not None else 0
        entries = ledger.read(conn)
    finally:
        if conn is not None:
            conn.close()
    return Summary(int(events), int(count), int(size), oldest, used, data_dir.side_bytes(), entries)


def held(data_dir: DataDir) -> tuple[Counter[Target], ledger.Entries]:
    """The events the queue holds per target (from each row's header) and its ledger,
    read as of one moment (for `collector audit`)."""
    with _translated:
        conn = db.open_reader(data_dir.queue)
        if conn is None:
            return Counter(), ledger.Entries()
        try:
            conn.execute("BEGIN")
            by_target = held_by_target(conn)
            return by_target, ledger.read(conn)
        finally:
            conn.close()


def held_by_target(conn: sqlite3.Connection) -> Counter[Target]:
    """The events of the queue's rows per target, from each row's header."""
    found: Counter[Target] = Counter()
    for (data,) in db.read(conn, f"SELECT data FROM {TABLE} WHERE status < {DONE}"):
        for target, n in rows.counts(data):
            found[target] += n
    return found


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on `directory`'s filesystem."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def reserve_for(directory: Path) -> int:
    """The free space kept on `directory`'s filesystem (see DISK_RESERVE_BYTES)."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return DISK_RESERVE_BYTES
    return min(DISK_RESERVE_BYTES, stat.f_blocks * stat.f_frsize // 2)
