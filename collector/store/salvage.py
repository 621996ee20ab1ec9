"""Reading back the rows that a corrupt SQLite file of the data directory still holds.

A file found corrupt is moved aside (`recovery.py`) and the collector goes on with a fresh
one; what SQLite can still read of the old one need not be lost. This module reads it with
SQLite's own code, never a page parser of ours: the `sqlite3` command-line tool prints
what it can read as SQL, which is run into a fresh database in a temporary directory, and
the tables are read back from that.

- `.recover` reads every page of the file, so it finds the rows of a table whose b-tree or
  schema is damaged; those whose table it cannot tell go to its `lost_and_found` table,
  and are read too when their fields look like a row of the table (`_adopt_lost`). It
  needs the `sqlite_dbpage` table, which Debian's and Ubuntu's SQLite are built without:
  there `.recover` prints the schema and then fails ("SQL logic error", measured with
  Debian 12's 3.40.1).
- `.dump` is used instead on such a build: it reads each table through its b-tree and,
  stopped by a damaged page, again from the other end; so it gets back the rows before
  the first damaged page and after the last, but none when the schema page or the
  table's root page is damaged.

The file itself is never changed, nor anything created beside it (`_source`). The fresh
database, in the temporary directory (TMPDIR), takes about as much room as the rows read
back, and a copy of the file as much again when it has a `-wal`.

A queue row is kept only when its bytes still read as a row (`readable_events`): a page
the garbage went into can still give back cells whose bytes are not what was written.

Errors raised: `SalvageFailed` (no tool, or it failed, or it read nothing).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from collector.errors import SalvageFailed
from collector.store import deadletters, rows, spool

TOOL = "sqlite3"
# A salvage runs when the queue is opened after its file was moved aside, before the
# server takes events: bounded, so that a tool stuck on a failing disk cannot keep the
# collector down for good. The tool prints the whole file as SQL (blobs in hex, twice
# their size), which is run again: a 213 MB queue took 2.5 s with `.dump` and 4.5 s with
# `.recover` here, so this is room for a queue of some 25 GB on a disk as fast.
TIMEOUT_S = 600.0
# How long the check of the tool itself (which of the two commands it can run) may take.
PROBE_TIMEOUT_S = 30.0
# How much of what the tool printed an error shows: its last lines, which say why.
SHOWN_CHARS = 400
# `.recover` leaves out the pages on the freelist: they hold deleted rows, in the queue
# rows already delivered, which would be forwarded again (of a queue of 400 rows, 300 of
# them acknowledged, plain `.recover` gave back 257).
RECOVER = ".recover --ignore-freelist"
DUMP = ".dump"
LOST_AND_FOUND = "lost_and_found"  # .recover's table for rows whose table it cannot tell
LEDGER = "ledger"
# The kind of an INTEGER PRIMARY KEY column in lost_and_found: NULL in the record (the value
# is the rowid, its `id`).
ROWID = "ROWID"
# The tables this module reads, as they are made (the queue's by persist-queue), made in
# the fresh database when the file's schema was not read back, so that rows found in
# lost_and_found have a table to go to.
QUEUE_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {spool.TABLE} (_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " data BLOB, timestamp FLOAT, status INTEGER)"
)
# The tool's own transaction control is left out of its SQL (`_load`): `.dump` ends with
# ROLLBACK when it met corruption, which would undo every row it printed.
TRANSACTION_VERBS = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK"})
# What may stand before a statement's first word: spaces and comments (`.dump` writes
# "/****** CORRUPTION ERROR *******/" before the statement that follows the damage).
LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


@dataclass(frozen=True)
class QueueSalvage:
    """What was read back from a queue file."""

    rows: list[tuple[bytes, float]]  # (data, queued_at) of each row not done, by id
    events: int  # in those rows
    unreadable_rows: int  # rows not done whose bytes no longer read as a row
    ledger: list[tuple[Any, ...]] = field(default_factory=list)  # the `ledger` table's
    ledger_columns: list[str] = field(default_factory=list)  # ... and its columns


def queue_rows(path: Path) -> QueueSalvage:
    """The queue rows not done (`spool.DONE`) still readable in the file at `path`, with
    the rows of its ledger table, if it has one."""
    with _recovered(path) as conn:
        conn.execute(QUEUE_SCHEMA)
        _adopt_lost(conn, spool.TABLE)
        found = conn.execute(
            f"SELECT data, timestamp FROM {spool.TABLE} WHERE status < {spool.DONE} ORDER BY _id"
        ).fetchall()
        columns, ledger = _table(conn, LEDGER)
    kept = []
    events = 0
    for data, queued_at in found:
        count = readable_events(data)
        if count is None or not isinstance(queued_at, int | float):
            continue
        kept.append((data, float(queued_at)))
        events += count
    return QueueSalvage(kept, events, len(found) - len(kept), ledger, columns)


@dataclass(frozen=True)
class DeadLetterSalvage:
    """What was read back from a dead-letter file."""

    letters: list[tuple[float, str, bytes, str]]  # (dead_at, reason, event, source)
    ledger: list[tuple[Any, ...]] = field(default_factory=list)  # the `ledger` table's


def dead_letter_rows(path: Path) -> DeadLetterSalvage:
    """(dead_at, reason, event, source) of each dead letter still readable in the file at
    `path`, oldest first ('' as the source of those from before dead letters had one; one
    whose event no longer reads as JSON is left out), with the rows of its ledger table."""
    with _recovered(path) as conn:
        conn.execute(deadletters.SCHEMA[0])
        _adopt_lost(conn, "dead_letters")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
        source = "source" if "source" in columns else "''"
        found = conn.execute(
            f"SELECT dead_at, reason, event, {source} FROM dead_letters ORDER BY id"
        ).fetchall()
        _, ledger = _table(conn, LEDGER)
    letters = [
        (float(at), reason, event, src)
        for at, reason, event, src in found
        if isinstance(at, int | float)
        and isinstance(reason, str)
        and isinstance(src, str)
        and _is_json(event)
    ]
    return DeadLetterSalvage(letters, ledger)


def readable_events(data: object) -> int | None:
    """The number of events in a queue row, or None when its bytes are not a row's."""
    # A row is one JSON array (`rows.py`): garbage inside an event's bytes, which `split`
    # would slice out as they are, shows there.
    if not _is_json(data):
        return None
    try:
        return sum(len(events) for _, events in rows.split(data))
    except (ValueError, TypeError):
        return None


def _is_json(value: object) -> TypeGuard[bytes]:
    """Whether `value` is bytes that read as JSON (`rows.parse`, as the forwarder reads)."""
    if not isinstance(value, bytes):
        return False
    try:
        rows.parse(value)
    except (ValueError, RecursionError):
        return False
    return True


@contextlib.contextmanager
def _recovered(path: Path) -> Iterator[sqlite3.Connection]:
    """A fresh database holding what the tool reads back from the file at `path`, in a
    temporary directory (removed after)."""
    tool = shutil.which(TOOL)
    if tool is None:
        raise SalvageFailed(
            f"the {TOOL} tool was not found: install the sqlite3 package"
            f" (apt-get install sqlite3) to read back a corrupt file; it is kept at {path}"
        )
    command = RECOVER if _reads_pages(tool, path) else DUMP
    try:
        with tempfile.TemporaryDirectory(prefix="collector-salvage-") as work:
            source = _source(path, Path(work))
            conn = sqlite3.connect(Path(work) / "recovered.db", isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=OFF")  # a scratch file: nothing to undo
                conn.execute("PRAGMA synchronous=OFF")
                _read_into(conn, [tool, source, command], path, Path(work) / "errors")
                yield conn
            finally:
                conn.close()
    except (OSError, sqlite3.Error) as exc:  # no room for the copy or the scratch file
        raise SalvageFailed(_failed(tool, path, str(exc))) from exc


def _source(path: Path, work: Path) -> str:
    """What the tool opens: the file itself, as immutable (which creates nothing beside
    it), unless it has a write-ahead log, which an immutable read leaves out: then a copy
    of both in `work` (SQLite creates a WAL file's `-shm` beside it, even `-readonly`)."""
    wal = path.with_name(path.name + "-wal")
    if not wal.is_file():
        return f"{path.resolve().as_uri()}?mode=ro&immutable=1"
    copy = work / path.name
    shutil.copyfile(path, copy)
    shutil.copyfile(wal, copy.with_name(wal.name))
    return str(copy)


def _reads_pages(tool: str, path: Path) -> bool:
    """Whether the tool's SQLite has the `sqlite_dbpage` table that `.recover` needs."""
    try:
        probe = subprocess.run(
            [tool, ":memory:", "SELECT count(*) FROM sqlite_dbpage"],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SalvageFailed(_failed(tool, path, str(exc))) from exc
    if probe.returncode == 0:
        return True
    printed = probe.stderr.decode(errors="replace")
    if "sqlite_dbpage" not in printed:
        raise SalvageFailed(_failed(tool, path, printed))
    return False


def _read_into(conn: sqlite3.Connection, command: list[str], path: Path, errors: Path) -> None:
    """Run `command`, and the SQL it prints into `conn` as it prints it (a queue's SQL can
    be larger than memory); stopped after TIMEOUT_S."""
    stopped = threading.Event()
    with (
        errors.open("w+b") as printed,
        subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=printed
        ) as tool,
    ):
        assert tool.stdout is not None

        def stop() -> None:
            stopped.set()
            tool.kill()

        watchdog = threading.Timer(TIMEOUT_S, stop)
        watchdog.start()
        try:
            _load(conn, io.TextIOWrapper(tool.stdout, encoding="utf-8", errors="replace"))
        finally:
            watchdog.cancel()
            tool.kill()  # done printing, or `_load` failed: either way it is not needed
        printed.seek(0)
        said = printed.read().decode(errors="replace")
    if stopped.is_set():
        raise SalvageFailed(_failed(command[0], path, f"stopped after {TIMEOUT_S:.0f} s"))
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchone()
    if not tables:
        raise SalvageFailed(_failed(command[0], path, said.strip() or "it found no table"))


def _load(conn: sqlite3.Connection, lines: Iterable[str]) -> None:
    """Run the tool's SQL statement by statement, in one transaction of ours: a statement
    that fails (a row its table refuses: a damaged value, an id twice) is skipped, not the
    rest; a line of the tool's own commands (`.dbconfig defensive off`) is not SQL."""
    conn.execute("BEGIN")
    statement = ""
    for line in lines:
        if not statement and line.startswith("."):
            continue
        statement += line
        if not sqlite3.complete_statement(statement):
            continue
        if _verb(statement) not in TRANSACTION_VERBS:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(statement)
        statement = ""
    conn.execute("COMMIT")


def _verb(statement: str) -> str:
    """The first word of `statement`, past any comments."""
    leading = LEADING.match(statement)
    words = statement[leading.end() if leading else 0 :].split(None, 1)
    return words[0].rstrip(";").upper() if words else ""


def _table(conn: sqlite3.Connection, name: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The columns and rows of table `name`, lost rows that look like its own included;
    none when there is no such table."""
    columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')]
    if not columns:
        return [], []
    _adopt_lost(conn, name)
    found = conn.execute(f'SELECT * FROM "{name}"').fetchall()
    return columns, [tuple(row) for row in found]


def _adopt_lost(conn: sqlite3.Connection, table: str) -> None:
    """Insert into `table` the rows of `lost_and_found` whose fields look like its rows
    (as many, each of its column's type), unless it has their key already.

    `lost_and_found` holds each row's fields in the order of its record: `(rootpgno,
    pgno, nfield, id, c0, c1, ...)`, with the rowid as `id` and NULL as the field of an
    INTEGER PRIMARY KEY (stored as the rowid); a WITHOUT ROWID table's record has its key
    columns first.
    """
    if not conn.execute(f"PRAGMA table_info({LOST_AND_FOUND})").fetchall():
        return
    record = _record_columns(conn, table)
    for row in conn.execute(f"SELECT * FROM {LOST_AND_FOUND}").fetchall():
        nfield, rowid = row[2], row[3]
        if not isinstance(nfield, int) or not 0 < nfield <= min(len(record), len(row) - 4):
            continue
        present = list(zip(record[:nfield], row[4 : 4 + nfield], strict=True))
        if not all(_fits(value, kind) for (_, kind), value in present):
            continue
        names = ", ".join(f'"{name}"' for (name, _), _ in present)
        values = [rowid if kind == ROWID else value for (_, kind), value in present]
        with contextlib.suppress(sqlite3.Error):
            conn.execute(
                f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({", ".join("?" * nfield)})',
                values,
            )


def _record_columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """(name, kind) of `table`'s columns in the order of its record, kind being the type
    a value must have: INTEGER, REAL, TEXT, BLOB (SQLite's affinity rules), or ROWID."""
    info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
    keys = [row for row in info if row[5]]
    try:
        conn.execute(f'SELECT rowid FROM "{table}" LIMIT 0')
    except sqlite3.OperationalError:  # WITHOUT ROWID: the key's columns come first
        ordered = sorted(keys, key=lambda row: row[5]) + [row for row in info if not row[5]]
        return [(row[1], _kind(row[2])) for row in ordered]
    alias = keys[0][1] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
    return [(row[1], ROWID if row[1] == alias else _kind(row[2])) for row in info]


def _kind(declared: str) -> str:
    """A column's affinity, from its declared type (SQLite's rules, in their order)."""
    declared = declared.upper()
    if "INT" in declared:
        return "INTEGER"
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in declared or not declared:
        return "BLOB"
    return "REAL"  # REAL, FLOA, DOUB, and NUMERIC, which holds numbers too


def _fits(value: object, kind: str) -> bool:
    if kind == ROWID:
        return value is None
    if kind == "INTEGER":
        return isinstance(value, int)
    if kind == "REAL":  # an integral REAL is stored as an integer
        return isinstance(value, int | float)
    return isinstance(value, str if kind == "TEXT" else bytes)


def _failed(tool: str, path: Path, printed: str) -> str:
    shown = " ".join(printed.split())
    if len(shown) > SHOWN_CHARS:
        shown = "…" + shown[-SHOWN_CHARS:]
    return (
        f"{tool} could not read back {path} ({shown}); the file is kept as it was, for a"
        f" person to try `{TOOL} FILE .recover` on a copy"
    )
