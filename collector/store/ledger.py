"""The outcomes ledger: where each event the collector took ended up, per project and env.

Counters say what happened; the ledger proves that nothing else did. Each store keeps its
own ledger table, changed in the same SQLite transaction as the events it counts, so a
crash (SIGKILL, power cut) can never leave the two apart:

    queue.db         in:  stored (answered 200), replayed (from the dead letters),
                          salvaged (read back from a corrupt file)
                     out: delivered (an upstream 2xx named it taken), unconfirmed (a 2xx
                          taking fewer, none named), dead_lettered (with its reason),
                          lost (with its reason: never silently)
                     and: duplicate (an id already stored: answered 200, not stored again)
    dead-letters.db  in:  dead_lettered (from the queue), quarantined (invalid at ingest)
                     out: replayed (back into the queue), purged (`dlq purge`), lost

So for each project and env, in - out = the events its store holds (`collector audit`
checks it). Events refused with their request (a 4xx or 503: the client still holds them)
never reach a store; they are counted in counts.db (`events_rejected`).

One failure a ledger inside the file cannot see is the file losing committed transactions
(its write-ahead log cut short, an old copy restored): rows and ledger go back together.
So the queue writer copies the queue ledger, every second and when it stops, to
`ledger.json` (the witness, another file). A queue ledger whose inflow is below the
witness's lost events that had been answered 200: at start the queue's opener records
those as `lost` (logged as an error: `reconcile.py`), and `audit` names them.

Projects and envs are client-chosen: past MAX_TARGETS of them a ledger counts new ones as
`(other)`, the same in every process (`target_for`), so the balance still holds.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from enum import StrEnum

import orjson

from collector.events import Target
from collector.store.datadir import DataDir, atomic_write

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger (project TEXT NOT NULL, env TEXT NOT NULL,"
    " state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', value INTEGER NOT NULL,"
    " PRIMARY KEY (project, env, state, reason)) WITHOUT ROWID",
)


class State(StrEnum):
    STORED = "stored"
    REPLAYED = "replayed"
    SALVAGED = "salvaged"
    DUPLICATE = "duplicate"
    DELIVERED = "delivered"
    UNCONFIRMED = "unconfirmed"
    DEAD_LETTERED = "dead_lettered"
    LOST = "lost"
    QUARANTINED = "quarantined"
    PURGED = "purged"


QUEUE_IN = frozenset({State.STORED, State.REPLAYED, State.SALVAGED})
QUEUE_OUT = frozenset({State.DELIVERED, State.UNCONFIRMED, State.DEAD_LETTERED, State.LOST})
DEAD_IN = frozenset({State.DEAD_LETTERED, State.QUARANTINED})
DEAD_OUT = frozenset({State.REPLAYED, State.PURGED, State.LOST})

# (project, env, state, reason) -> events
Key = tuple[str, str, str, str]
Entries = Counter[Key]

# Distinct (project, env) a ledger keeps apart: counts.py's MAX_SERIES for the same reason
# (a fleet's projects fit; random projectIds from one client cannot grow it without bound).
MAX_TARGETS = 1000
OTHER = Target("(other)", "(other)")


def ensure(conn: sqlite3.Connection) -> None:
    with conn:
        for statement in SCHEMA:
            conn.execute(statement)


def add(conn: sqlite3.Connection, entries: Mapping[Key, int]) -> None:
    """Add `entries`, inside the caller's transaction (with the events they count)."""
    conn.executemany(
        "INSERT INTO ledger (project, env, state, reason, value) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO UPDATE SET value = value + excluded.value",
        [(*key, value) for key, value in entries.items() if value],
    )


def read(conn: sqlite3.Connection | None) -> Entries:
    """The ledger of the file `conn` has open (none when it has no table yet)."""
    entries: Entries = Counter()
    if conn is None:
        return entries
    try:
        found = conn.execute("SELECT project, env, state, reason, value FROM ledger").fetchall()
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("no such table"):
            return entries
        raise
    for project, env, state, reason, value in found:
        entries[(project, env, state, reason)] += int(value)
    return entries


def target_for(conn: sqlite3.Connection, target: Target, known: set[Target]) -> Target:
    """The target `target`'s events are counted under in this ledger: its own while it has
    one or there is room for another, else OTHER. `known`: the targets seen so far (a
    cache of the table, filled from it when empty)."""
    if target in known:
        return target
    if not known:
        known.update(Target(p, e) for p, e in conn.execute("SELECT project, env FROM ledger"))
        if target in known:
            return target
    found = conn.execute(
        "SELECT 1 FROM ledger WHERE project = ? AND env = ? LIMIT 1", (target.project, target.env)
    ).fetchone()
    if found is not None or len(known) < MAX_TARGETS:
        known.add(target)
        return target
    return OTHER


def counted(
    conn: sqlite3.Connection,
    by_target: Iterable[tuple[Target, int]],
    state: State,
    known: set[Target],
    reason: str = "",
) -> Entries:
    """Ledger entries of `state` for each (target, events), targets as counted here."""
    entries: Entries = Counter()
    for target, n in by_target:
        project, env = target_for(conn, target, known)
        entries[(project, env, str(state), reason)] += n
    return entries


def balance(
    entries: Mapping[Key, int], into: frozenset[State], out: frozenset[State]
) -> Counter[Target]:
    """Per target: what came in less what went out (what the store should hold)."""
    held: Counter[Target] = Counter()
    for (project, env, state, _), value in entries.items():
        if state in into:
            held[Target(project, env)] += value
        elif state in out:
            held[Target(project, env)] -= value
    return held


def totals(entries: Mapping[Key, int]) -> Counter[tuple[str, str]]:
    """Per (state, reason), over all targets."""
    summed: Counter[tuple[str, str]] = Counter()
    for (_, _, state, reason), value in entries.items():
        summed[(state, reason)] += value
    return summed


# --- the witness -----------------------------------------------------------------------


def write_witness(data_dir: DataDir, entries: Mapping[Key, int]) -> None:
    """Copy the queue ledger to `ledger.json` (no fsync: a witness that lags a crash by a
    second only sees less; it is the ledger going below it that tells)."""
    copied = [[*key, value] for key, value in entries.items()]
    atomic_write(data_dir.ledger_witness, orjson.dumps({"queue": copied}), durable=False)


def read_witness(data_dir: DataDir) -> Entries:
    """The queue ledger as the witness last saw it (none when missing or unreadable)."""
    entries: Entries = Counter()
    with contextlib.suppress(OSError, orjson.JSONDecodeError, ValueError, TypeError, KeyError):
        for project, env, state, reason, value in orjson.loads(
            data_dir.ledger_witness.read_bytes()
        )["queue"]:
            entries[(str(project), str(env), str(state), str(reason))] += int(value)
    return entries


def missing(current: Mapping[Key, int], witness: Mapping[Key, int]) -> Entries:
    """The inflow the witness saw that the ledger no longer has."""
    return Counter(
        {
            key: value - current.get(key, 0)
            for key, value in witness.items()
            if key[2] in QUEUE_IN and value > current.get(key, 0)
        }
    )


def carried(*ledgers: Mapping[Key, int]) -> Entries:
    """The largest value of each entry in `ledgers` (the ledger of a file moved aside, read
    back, and the witness's copy of it: each may lag the other)."""
    entries: Entries = Counter()
    for each in ledgers:
        for key, value in each.items():
            entries[key] = max(entries[key], value)
    return entries
