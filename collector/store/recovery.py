"""Corrupt SQLite files found at start are moved aside, so the collector starts, fresh.

A database of the data directory (`datadir.DATABASES`) that SQLite cannot read (a disk
fault, a bad copy, a truncated restore) would make every start of the server or the
forwarder fail the same way: a crash loop that takes nothing in. Instead, the processes
that write these files (the server, its writer process and the forwarder) call
`ensure_usable` before opening each one (`db.open_writer(recover=True)`). It runs
`PRAGMA quick_check` (a read of the b-tree structure: 0.06 s for a 250 MB queue file here)
and, when SQLite says the file is corrupt, renames it, with its `-wal` and `-shm`, to
`<name>.corrupt-<UTC time>` (kept for inspection), logs an error, and lets the opener
create a fresh file. `collector status` lists the moved files
(`moved_aside`) and warns until they are deleted. A command that only reads (`status`,
`dlq`) never moves anything: it names the corrupt files (`diagnose`) and stops.

What is *not* corruption, and is left in place for the opener to report (503s, or a
failed start with SQLite's message):

- a file locked by another process past the timeout ("database is locked"): it is busy;
- a file that cannot be opened at all (permissions, a missing directory);
- any SQLite error other than SQLITE_CORRUPT and SQLITE_NOTADB (I/O errors included: a
  failing disk is not fixed by starting over on it).

A corrupt file that another process still has open (it holds SQLite's shared-memory
lock) is not moved either: that process would go on writing to the renamed file, and
what it answered 200 for would never be forwarded. The error log says to restart both.

Checks and moves are serialised by an exclusive `flock` on the data directory itself, so
the server and the forwarder, started together by `collector run`, never move the same
file twice or check one the other is moving.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collector.store.datadir import QUEUE, DataDir

log = logging.getLogger("collector.recovery")

MARK = ".corrupt-"
STAMP_FORMAT = "%Y%m%dT%H%M%S"
# Files SQLite keeps next to a database, moved with it (a stale write-ahead log left next
# to a fresh file would be replayed into it).
SIDE_FILES = ("-wal", "-shm", "-journal")
# How long the check waits for a lock held by another process before calling the file
# busy (and leaving it alone).
CHECK_TIMEOUT_S = 5.0
# SQLite's primary result codes that mean "this is not a (sound) database file".
CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# The byte of the `-shm` file on which every connection to a WAL database holds a shared
# POSIX lock while open (SQLite's "DMS" lock, os_unix.c: (22 + 8) * 4 + 8).
SHM_DMS_BYTE = 128


@dataclass(frozen=True)
class Recovered:
    """A file found corrupt and moved aside."""

    file: str  # its name in the data directory, e.g. "queue.db"
    moved_to: str  # e.g. "queue.db.corrupt-20261126T051500"
    reason: str  # what SQLite said


def ensure_usable(path: Path) -> Recovered | None:
    """Move `path` aside if SQLite finds it corrupt; the caller then opens a fresh one."""
    if not path.is_file():
        return None
    with directory_lock(path.parent):
        reason = corruption(path)
        if reason is None:
            return None
        if in_use(path):
            log.error(
                "%s is corrupt (%s) but another process has it open, so it is left in place;"
                " stop the collector's server and forwarder, then start them again",
                path,
                reason,
            )
            return None
        moved = _move_aside(path)
    log.error(
        "%s is corrupt (%s): moved aside to %s and started with a fresh one.%s"
        " Delete the moved file once inspected.",
        path,
        reason,
        moved.name,
        " What can still be read of it is put back into the queue." if path.name == QUEUE else "",
    )
    return Recovered(path.name, moved.name, reason)


def corruption(path: Path) -> str | None:
    """What SQLite says is wrong with the file at `path`, or None when it is sound (or
    when it cannot tell: busy, unopenable, I/O error)."""
    try:
        conn = sqlite3.connect(path, timeout=CHECK_TIMEOUT_S)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in CORRUPTION_CODES:
            return str(exc)
        log.warning("could not check %s (%s); leaving it in place", path, exc)
        return None
    if rows == [("ok",)]:
        return None
    return "quick_check: " + "; ".join(str(row[0]) for row in rows[:3])


def diagnose(data_dir: DataDir) -> list[tuple[str, str]]:
    """(file name, what SQLite says) for each corrupt database in `data_dir`, unmoved."""
    return [
        (path.name, reason)
        for path in data_dir.databases()
        if path.is_file() and (reason := corruption(path))
    ]


def in_use(path: Path) -> bool:
    """True when another process has the WAL database at `path` open.

    Each connection holds a shared lock on one byte of the `-shm` file while it is open;
    a write lock on that byte is refused while any other process holds it. (POSIX locks
    belong to the process: call this only for a file this process has not opened, or
    closing our descriptor would drop our own connection's locks.)
    """
    shm = path.with_name(path.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR)
    except OSError:
        return False  # no shared-memory file: no connection in WAL mode
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_BYTE)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases our lock too
    return False


def moved_aside(data_dir: Path) -> list[dict[str, Any]]:
    """The files moved aside in `data_dir` and still there, oldest first (for status)."""
    found = []
    with contextlib.suppress(OSError):
        for path in data_dir.iterdir():
            name = path.name
            original, mark, stamp = name.partition(MARK)
            if not mark or not original or name.endswith(SIDE_FILES):
                continue
            try:
                moved_at = datetime.strptime(stamp.split("-")[0], STAMP_FORMAT).replace(tzinfo=UTC)
            except ValueError:
                continue  # not a name of ours
            size = sum(
                side.stat().st_size
                for side in (path, *(path.with_name(name + s) for s in SIDE_FILES))
                if side.exists()
            )
            found.append(
                {
                    "file": original,
                    "moved_to": name,
                    "at": moved_at.isoformat(timespec="seconds"),
                    "bytes": size,
                }
            )
    return sorted(found, key=lambda entry: (entry["at"], entry["moved_to"]))


def _move_aside(path: Path) -> Path:
    stamp = time.strftime(STAMP_FORMAT, time.gmtime())
    target = path.with_name(f"{path.name}{MARK}{stamp}")
    n = 0
    while target.exists():  # moved twice within a second
        n += 1
        target = path.with_name(f"{path.name}{MARK}{stamp}-{n}")
    # The side files first: should we stop half way, the next start still sees the main
    # file corrupt and moves it then; the reverse could leave an old write-ahead log to be
    # replayed into the fresh file.
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    os.replace(path, target)
    _fsync_directory(path.parent)
    return target


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
