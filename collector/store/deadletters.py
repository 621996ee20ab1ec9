"""The dead-letter store: events that left the queue without an upstream 2xx, with why.

Nothing is dropped silently: an event the upstream refuses (400/413, isolated by splitting
its batch, or named in a 2xx's `validationErrors`) or one queued longer than the maximum
age is written here, with the reason, before its queue row is acknowledged; and an event
the collector's own validator refuses at ingest is quarantined here by the queue writer
(the reason, and the SDK that sent it as `source`), within `quarantine_max_bytes`. A crash
between the queue and this file can only leave an event in both places (it is then sent
again), never in neither; so this file is written with an
fsync per commit (`synchronous=FULL`), which the queue's acks do not need. `collector dlq`
lists, shows, replays (back into the queue: `replay`) and purges them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from collector import events
from collector.errors import QueueFull
from collector.events import Target
from collector.store import db, ledger, rows
from collector.store.datadir import DataDir
from collector.store.ledger import State
from collector.store.spool import Spool, Sync

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " dead_at REAL NOT NULL, reason TEXT NOT NULL, event BLOB NOT NULL,"
    " source TEXT NOT NULL DEFAULT '')",
    *ledger.SCHEMA,  # what came in and went out, with the letters (`ledger.py`)
)
# A file made before dead letters had a source gets the column (empty for those before).
ADD_SOURCE = "ALTER TABLE dead_letters ADD COLUMN source TEXT NOT NULL DEFAULT ''"
# What an invalid event's dead letter is kept as: "quarantined: " and the validator's
# reason (the forwarder's start "rejected by upstream" and "older than").
QUARANTINED = "quarantined: "
# Dead letters replayed per queue row (and per transaction).
REPLAY_CHUNK = 500
_translated = db.translated("dead letters")


@dataclass(frozen=True)
class DeadLetter:
    id: int
    dead_at: float
    reason: str
    event: Any  # an object, but a quarantined (invalid) event can be any JSON value
    source: str = ""  # the SDK that sent it ("name/version"), for quarantined events

    def summary(self) -> dict[str, Any]:
        """The fields a person scans a list by (never the whole payload)."""
        fields = self.event if isinstance(self.event, dict) else {}
        return {
            "id": self.id,
            "dead_at": self.dead_at,
            "reason": self.reason,
            "source": self.source,
            "type": fields.get("type"),
            "event_id": fields.get("id"),
            "project": fields.get("projectId"),
            "env": fields.get("env"),
        }


class DeadLetters:
    """Dead-lettered events, oldest first. Raises `QueueBusy`/`QueueFull` when the file
    fails; a reader of a missing file sees none."""

    def __init__(self, conn: sqlite3.Connection | None) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._targets: set[Target] = set()  # the ledger's (`ledger.target_for`)
        # A file of an older collector, not opened by a writer since (which adds the
        # column), is read with an empty source.
        columns = {row[1] for row in db.read(conn, "PRAGMA table_info(dead_letters)")}
        self._source = "source" if "source" in columns or not columns else "'' AS source"

    @classmethod
    def writer(cls, data_dir: DataDir, *, recover: bool = False) -> DeadLetters:
        data_dir.create()
        with _translated:
            conn = db.open_writer(
                data_dir.dead_letters, SCHEMA, synchronous="FULL", recover=recover
            )
            columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
            if "source" not in columns:
                with conn:
                    conn.execute(ADD_SOURCE)
            return cls(conn)

    @classmethod
    def reader(cls, data_dir: DataDir) -> DeadLetters:
        with _translated:
            return cls(db.open_reader(data_dir.dead_letters))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def add(
        self,
        events: Sequence[bytes],
        reason: str,
        source: str = "",
        *,
        state: State = State.DEAD_LETTERED,
        kind: str = "",
        targets: Sequence[Target] | None = None,
    ) -> int:
        """Store `events` (each one event's JSON) with `reason`; returns how many."""
        return self.add_each([(raw, reason, source) for raw in events], state, kind, targets)

    def add_each(
        self,
        letters: Sequence[tuple[bytes, str, str]],
        state: State,
        kind: str = "",
        targets: Sequence[Target] | None = None,
    ) -> int:
        """Store each (event's JSON, reason, source) in one transaction, counted in the
        ledger as `state` (`kind`: its reason there) under `targets` (each letter's; read
        from the events when not given); returns how many."""
        now = time.time()
        found = [(now, reason, raw, source) for raw, reason, source in letters]
        if targets is None:
            targets = [rows.target_of(raw) for raw, _, _ in letters]
        with self._lock, _translated, self._written() as conn:
            entries = ledger.counted(conn, Counter(targets).items(), state, self._targets, kind)
            conn.executemany(
                "INSERT INTO dead_letters (dead_at, reason, event, source) VALUES (?, ?, ?, ?)",
                found,
            )
            ledger.add(conn, entries)
        return len(found)

    def put_back(
        self, letters: Sequence[tuple[float, str, bytes, str]], entries: ledger.Entries
    ) -> None:
        """Insert (dead_at, reason, event, source) letters as they were, with `entries`,
        in one transaction: letters read back from a corrupt file (`reconcile.py`)."""
        with self._lock, _translated, self._written() as conn:
            conn.executemany(
                "INSERT INTO dead_letters (dead_at, reason, event, source) VALUES (?, ?, ?, ?)",
                letters,
            )
            ledger.add(conn, entries)

    def ledger(self) -> tuple[int, ledger.Entries]:
        """The letters held and the ledger, as of one moment (for `collector audit`)."""
        with self._lock, _translated:
            if self._conn is None:
                return 0, ledger.Entries()
            self._conn.execute("BEGIN")
            try:
                (count,) = self._conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
                return int(count), ledger.read(self._conn)
            finally:
                self._conn.rollback()

    def used_bytes(self) -> int:
        """Bytes of the file in use (what `quarantine_max_bytes` bounds)."""
        assert self._conn is not None
        with self._lock, _translated:
            return db.used_bytes(self._conn)

    def count(self) -> int:
        found = self._read("SELECT COUNT(*) FROM dead_letters")
        return int(found[0][0]) if found else 0

    def letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """All dead letters, or those with `ids`, oldest first."""
        query = f"SELECT id, dead_at, reason, event, {self._source} FROM dead_letters"
        params: tuple[int, ...] = ()
        if ids is not None:
            query += f" WHERE id IN ({','.join('?' * len(ids))})"
            params = tuple(ids)
        found = self._read(query + " ORDER BY id", params)
        return [DeadLetter(i, at, why, rows.parse(raw), src) for i, at, why, raw, src in found]

    def raw_letters(self) -> list[tuple[DeadLetter, bytes]]:
        """Every dead letter and its event's JSON as stored (for `dlq export`)."""
        found = self._read(
            f"SELECT id, dead_at, reason, event, {self._source} FROM dead_letters ORDER BY id"
        )
        return [
            (DeadLetter(i, at, reason, None, src), bytes(raw)) for i, at, reason, raw, src in found
        ]

    def raw(self, ids: Sequence[int]) -> list[tuple[int, bytes, str]]:
        """(id, the event's JSON as stored, reason) for `ids`, to put back into the queue."""
        rows = self._read(
            "SELECT id, event, reason FROM dead_letters"
            f" WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
            tuple(ids),
        )
        return [(int(i), bytes(raw), reason) for i, raw, reason in rows]

    def all_ids(self) -> list[int]:
        return [int(i) for (i,) in self._read("SELECT id FROM dead_letters")]

    def remove(self, ids: Sequence[int], state: State = State.REPLAYED) -> int:
        """Delete the letters with `ids`, counted in the ledger as gone out as `state`."""
        where = f"WHERE id IN ({','.join('?' * len(ids))})"
        return self._delete(where, tuple(ids), state)

    def purge(self) -> int:
        return self._delete("", (), State.PURGED)

    def _delete(self, where: str, params: tuple[int, ...], state: State) -> int:
        with self._lock, _translated, self._written() as conn:
            found = conn.execute(f"SELECT event FROM dead_letters {where}", params).fetchall()
            targets = Counter(rows.target_of(bytes(raw)) for (raw,) in found)
            entries = ledger.counted(conn, targets.items(), state, self._targets)
            cursor = conn.execute(f"DELETE FROM dead_letters {where}", params)
            ledger.add(conn, entries)
        return int(cursor.rowcount)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock, _translated:
            return db.read(self._conn, sql, params)

    def _written(self) -> sqlite3.Connection:
        """The connection, as a transaction (`with`); only a writer has one to write."""
        assert self._conn is not None, "a dead-letter reader cannot write"
        return self._conn


@dataclass(frozen=True)
class Replayed:
    moved: int  # dead letters now back in the queue
    wanted: int  # ids asked for (all of them, for --all)
    refused: QueueFull | None = None  # why it stopped part way (the disk budget), if it did
    still_invalid: int = 0  # quarantined events the validator still refuses: left in place


def replay(
    data_dir: DataDir, ids: Sequence[int] | None, *, sync: Sync, budget_bytes: int
) -> Replayed:
    """Move the dead letters with `ids` (None: all) back into the queue, to be forwarded
    again, a chunk per transaction; those moved before a refusal stay moved. A quarantined
    event is validated again first (the validator, or the client, may have been fixed
    since): one still invalid stays where it is."""
    dead = DeadLetters.writer(data_dir)
    spool = Spool(data_dir, sync=sync, budget_bytes=budget_bytes)
    moved = invalid = 0
    wanted: list[int] = []
    try:
        wanted = dead.all_ids() if ids is None else list(ids)
        for start in range(0, len(wanted), REPLAY_CHUNK):
            letters = dead.raw(wanted[start : start + REPLAY_CHUNK])
            valid = still_valid(letters)
            invalid += len(letters) - len(valid)
            if not valid:
                continue
            # Into the queue first, then out of the store: a crash between the two leaves
            # the event in both (sent twice), never in neither.
            spool.append(rows.by_target([raw for _, raw, _ in valid]), state=State.REPLAYED)
            moved += dead.remove([letter_id for letter_id, _, _ in valid])
    except QueueFull as exc:
        return Replayed(moved, len(wanted), exc, invalid)
    finally:
        spool.close()
        dead.close()
    return Replayed(moved, len(wanted), None, invalid)


def still_valid(letters: list[tuple[int, bytes, str]]) -> list[tuple[int, bytes, str]]:
    """`letters` less the quarantined ones that `collector.events` still calls invalid."""
    quarantined = [letter for letter in letters if letter[2].startswith(QUARANTINED)]
    if not quarantined:
        return letters
    try:
        _, errors = events.decode_all([raw for _, raw, _ in quarantined])
        refused = {quarantined[index][0] for index in errors}
    except msgspec.DecodeError:  # not even one event's JSON: check them one by one
        refused = {letter[0] for letter in quarantined if not _valid(letter[1])}
    return [letter for letter in letters if letter[0] not in refused]


def _valid(raw: bytes) -> bool:
    try:
        return not events.decode_all([raw])[1]
    except msgspec.DecodeError:
        return False
