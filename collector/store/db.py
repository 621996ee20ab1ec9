"""Opening the data directory's SQLite files: one way to write, one way to read.

`open_writer` is for the processes that own a file (the server, its writer process, the
forwarder, the dead-letter commands): it moves a corrupt file aside first when asked
(`recovery.ensure_usable`), then connects, turns on the write-ahead log, sets the sync
level and creates the tables. `open_reader` is for those that only look (`collector
status`, `/metrics`, `dlq list`): read-only, no DDL, and a missing file is not created
but reported as None, so that looking never changes what is looked at.

Durability per file: the queue's commits follow the `sync` setting (`spool.py`); dead
letters are written with `synchronous=FULL`, since their queue row is deleted right after
and a dead letter lost to a power cut would be an event lost; the other files may lose
their last transactions without losing an event (ids are remembered after their events'
commit, counts are counts, the cache is a cache), so they use `synchronous=NORMAL`.

Errors: SQLite's own never leave the store. `translated` turns them into the types of
`collector.errors` (a full disk into `QueueFull`, anything else into `QueueBusy`, both
503 for a client), so no module above the store needs to know that SQLite is there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from collector.errors import QueueBusy, QueueFull
from collector.store import recovery

# How long a connection waits for another process's write lock before failing (the
# server's queue commits use their own, shorter timeout: `spool.BUSY_TIMEOUT_S`).
BUSY_TIMEOUT_S = 5.0

Synchronous = Literal["FULL", "NORMAL"]
# The page cache of each read-write connection here and of the queue's (spool.py), in
# KiB (SQLite's default is 2000). These files are appended to and looked up by key, and
# the OS caches their pages anyway; the queue writer's connections (the queue's two, seen
# ids, counts, quarantine) with full caches were 4 MiB of its peak RSS (`bench/memory.py`:
# 58 MiB against 62; the same CPU per 1000-event request and drain rate side by side).
CACHE_KIB = 256


def open_writer(
    path: Path,
    schema: Sequence[str] = (),
    *,
    synchronous: Synchronous = "NORMAL",
    recover: bool = False,
) -> sqlite3.Connection:
    """A read-write connection to `path` (created if missing), in WAL mode, with `schema`
    (CREATE ... IF NOT EXISTS statements) applied. `recover`: move the file aside first if
    it is corrupt; only the processes that own the file do (never a reader)."""
    if recover:
        recovery.ensure_usable(path)
    conn = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    try:
        with conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            # Not Debian's default (on): deleted pages are not written again as zeros, which
            # doubled the writes of every prune (see spool.py's queue connections).
            conn.execute("PRAGMA secure_delete=FAST")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            for statement in schema:
                conn.execute(statement)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the file in use: SQLite reuses freed pages, so free ones do not count."""
    (used,) = conn.execute(
        "SELECT (p.page_count - f.freelist_count) * s.page_size"
        " FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s"
    ).fetchone()
    return int(used)


def open_reader(path: Path) -> sqlite3.Connection | None:
    """A read-only connection to `path`, or None when there is no such file.

    A read-only connection to a WAL database still creates its `-wal` and `-shm` files
    when they are missing, and cannot delete them after. They are missing only when no
    connection has the file open (the last one to close deletes them), and then the file
    alone holds everything: it is read as `immutable`, which creates nothing. A writer
    that opens the file in the moment of such a read could make it fail, never change
    what is stored.
    """
    if not path.is_file():
        return None
    uri = f"{path.resolve().as_uri()}?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_S)


def read(conn: sqlite3.Connection | None, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """The rows of a query on a reader connection; none when the file or its table does not
    exist yet (a file whose creator has not run its schema is empty, not broken)."""
    if conn is None:
        return []
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("no such table"):
            return []
        raise


class translated:
    """Turn SQLite's failures inside the block into the store's error types; `what` names
    the file's role in the message ("queue", "dead letters")."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, sqlite3.Error):
            return
        text = str(exc)
        if "full" in text:
            raise QueueFull("disk full; retry later") from exc
        raise QueueBusy(f"{self.what} unavailable ({text}); retry later") from exc
