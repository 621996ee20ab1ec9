"""When the queue or the dead-letter store is opened to write: put back what a corrupt
file still holds, and record as lost what it no longer holds of what it was given.

Two things can take events out of the queue without a transaction of the collector's:

- the file found corrupt and moved aside (`recovery.py`): its rows that SQLite can still
  read are put back into the fresh file (`salvage.py`, de-duplicated by event id), with
  its ledger (read back too, or else the witness's copy of it);
- the file losing committed transactions while the collector was stopped (its write-ahead
  log cut short, an older copy put back): its ledger goes back with its rows, below the
  witness (`ledger.py`), which the ledger is raised to again.

Either way, what the ledger then says the queue holds beyond what it does hold is
recorded as `lost`, with the reason, and logged as an error: an operator reads it in
`collector status` and `collector audit`, never finds it missing by chance. A start
with nothing wrong costs two small reads (the witness, the ledger). A corrupt dead-letter
file is read back the same way, with its own ledger (`open_dead_letters`); and
`collector salvage FILE` reads back a file an operator brings (`salvage_file`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from collector.errors import SalvageFailed
from collector.events import Target
from collector.store import ledger, recovery, rows, salvage
from collector.store.counts import DeadLetterReason
from collector.store.datadir import DataDir
from collector.store.deadletters import QUARANTINED, DeadLetters
from collector.store.ledger import DEAD_IN, DEAD_OUT, QUEUE_IN, QUEUE_OUT, State
from collector.store.spool import Spool, Sync, held_by_target

log = logging.getLogger("collector.recovery")

# How each reason the forwarder writes begins, and the kind it is counted under.
REASON_KINDS = (
    ("rejected by upstream", DeadLetterReason.REJECTED),
    ("older than the maximum age", DeadLetterReason.MAX_AGE),
    ("unconfirmed: ", DeadLetterReason.UNCONFIRMED),
)
CUT_SHORT = "the queue file lost committed writes (its write-ahead log cut short, or an older copy)"


def open_queue(
    data_dir: DataDir, *, sync: Sync, budget_bytes: int, resume_in_flight: bool
) -> Spool:
    """The queue, opened to write by its owners (the queue writer, the forwarder): a
    corrupt file moved aside and read back, and what is missing recorded as lost."""
    spool = Spool(
        data_dir,
        sync=sync,
        budget_bytes=budget_bytes,
        resume_in_flight=resume_in_flight,
        recover=True,
    )
    try:
        on_open(spool, data_dir, spool.moved)
    except BaseException:
        spool.close()
        raise
    return spool


def on_open(spool: Spool, data_dir: DataDir, moved: recovery.Recovered | None) -> None:
    """Salvage the queue file `moved` aside (if it was), then record what is missing."""
    with recovery.directory_lock(data_dir.path):
        old = ledger.Entries()
        reason = CUT_SHORT
        if moved is not None:
            old = put_back(spool, data_dir.path / moved.moved_to)
            reason = f"the queue file was corrupt: not read back from {moved.moved_to}"
        record_missing(spool, data_dir, old, reason, carry=moved is not None)
    spool.write_witness()


def put_back(spool: Spool, path: Path) -> ledger.Entries:
    """Put every event still readable in the corrupt queue file at `path` into `spool`
    (the first copy of each event id); returns the file's own ledger, as read back."""
    try:
        found = salvage.queue_rows(path)
    except SalvageFailed as exc:
        log.error("%s", exc.message)
        return ledger.Entries()
    kept = unique_rows(found.rows)
    spool.put_rows(kept, ledger.Entries())
    events = sum(n for data, _ in kept for _, n in rows.counts(data))
    log.log(
        logging.ERROR if found.unreadable_rows else logging.WARNING,
        "read back %d events in %d rows from %s into the queue; %d rows could not be read",
        events,
        len(kept),
        path.name,
        found.unreadable_rows,
    )
    return old_ledger(found.ledger)


@dataclass(frozen=True)
class Salvaged:
    what: str  # "queue" or "dead letters"
    events: int  # put back
    unreadable_rows: int


def salvage_file(spool: Spool, dead: DeadLetters, path: Path) -> Salvaged:
    """`collector salvage FILE`: what the queue or dead-letter file at `path` still holds,
    put back into `spool` (counted `salvaged` in its ledger, each event id once) or into
    `dead` (with their reasons). Raises SalvageFailed when it holds neither."""
    found = salvage.queue_rows(path)
    if found.rows or found.unreadable_rows:
        kept = unique_rows(found.rows)
        by_target: Counter[Target] = Counter()
        for data, _ in kept:
            for target, n in rows.counts(data):
                by_target[target] += n
        with spool.transaction() as conn:
            known: set[Target] = set()
            entries = ledger.counted(conn, by_target.items(), State.SALVAGED, known)
        spool.put_rows(kept, entries)
        return Salvaged("queue", sum(by_target.values()), found.unreadable_rows)
    letters = salvage.dead_letter_rows(path).letters
    if not letters:
        raise SalvageFailed(f"{path} holds no queue rows and no dead letters that can be read")
    dead.put_back(letters, letters_counted(letters))
    return Salvaged("dead letters", len(letters), 0)


def open_dead_letters(data_dir: DataDir) -> DeadLetters:
    """The dead-letter store, opened to write by the forwarder: a corrupt file moved aside,
    its letters read back with its ledger, and those that could not be read recorded as
    lost."""
    moved = recovery.ensure_usable(data_dir.dead_letters)
    dead = DeadLetters.writer(data_dir)
    if moved is not None:
        with recovery.directory_lock(data_dir.path):
            put_back_letters(dead, data_dir.path / moved.moved_to)
    return dead


def put_back_letters(dead: DeadLetters, path: Path) -> None:
    """Put the letters still readable in the corrupt dead-letter file at `path` into
    `dead`, with the file's ledger (else one counted from the letters), and record those
    its ledger holds beyond them as lost."""
    try:
        found = salvage.dead_letter_rows(path)
    except SalvageFailed as exc:
        log.error("%s", exc.message)
        return
    entries = old_ledger(found.ledger) or letters_counted(found.letters)
    held = ledger.balance(entries, DEAD_IN, DEAD_OUT)
    readable = Counter(rows.target_of(raw) for _, _, raw, _ in found.letters)
    reason = f"the dead-letter file was corrupt: not read back from {path.name}"
    for target, n in held.items():
        if n > readable[target]:
            entries[(*target, str(State.LOST), reason)] += n - readable[target]
    dead.put_back(found.letters, entries)
    lost = sum(n for (_, _, state, _), n in entries.items() if state == State.LOST)
    log.log(
        logging.ERROR if lost else logging.WARNING,
        "read back %d dead letters from %s into the dead-letter store; %d could not be read",
        len(found.letters),
        path.name,
        lost,
    )


def letters_counted(letters: list[tuple[float, str, bytes, str]]) -> ledger.Entries:
    """Ledger entries for `letters` coming in, each under the state its reason says."""
    entries = ledger.Entries()
    for _, why, raw, _ in letters:
        state, kind = letter_state(why)
        project, env = rows.target_of(raw)
        entries[(project, env, str(state), kind)] += 1
    return entries


def letter_state(reason: str) -> tuple[State, str]:
    """The ledger state (and its reason) a dead letter came in under, from its reason."""
    if reason.startswith(QUARANTINED):
        return State.QUARANTINED, ""
    for start, kind in REASON_KINDS:
        if reason.startswith(start):
            return State.DEAD_LETTERED, kind
    return State.DEAD_LETTERED, "salvaged"


def unique_rows(found: list[tuple[bytes, float]]) -> list[tuple[bytes, float]]:
    """`found` rows with each event id's first copy only (rebuilt where one repeats)."""
    seen: set[str] = set()
    kept = []
    for data, queued_at in found:
        groups: dict[Target, list[bytes]] = {}
        repeated = False
        for target, events in rows.split(data):
            for raw in events:
                event_id = _id_of(raw)
                if event_id is not None and event_id in seen:
                    repeated = True
                    continue
                if event_id is not None:
                    seen.add(event_id)
                groups.setdefault(target, []).append(raw)
        if not repeated:
            kept.append((data, queued_at))
        elif groups:
            kept.append((rows.join(groups), queued_at))
    return kept


def _id_of(raw: bytes) -> str | None:
    try:
        event = rows.parse(raw)
    except (ValueError, orjson.JSONDecodeError):
        return None
    found = event.get("id") if isinstance(event, dict) else None
    return found if isinstance(found, str) else None


def old_ledger(found: list[tuple[object, ...]]) -> ledger.Entries:
    entries = ledger.Entries()
    for row in found:
        if len(row) == 5:
            project, env, state, reason, value = row
            entries[(str(project), str(env), str(state), str(reason))] += int(str(value))
    return entries


def record_missing(
    spool: Spool, data_dir: DataDir, old: ledger.Entries, reason: str, *, carry: bool
) -> None:
    """Raise the ledger to the witness (and, with `carry`, to a moved file's ledger, whole)
    and record what it then holds beyond the queue's rows as lost, in one transaction."""
    witness = ledger.read_witness(data_dir)
    with spool.transaction() as conn:
        current = ledger.read(conn)
        raised = ledger.carried(old, witness) - current if carry else ledger.Entries()
        raised += ledger.missing(current + raised, witness)
        if not raised:
            return
        held = ledger.balance(current + raised, QUEUE_IN, QUEUE_OUT)
        queued = held_by_target(conn)
        lost: Counter[Target] = Counter(
            {target: n - queued[target] for target, n in held.items() if n > queued[target]}
        )
        entries = raised + ledger.Entries(
            {(*target, str(State.LOST), reason): n for target, n in lost.items()}
        )
        ledger.add(conn, entries)
    if lost:
        log.error(
            "%d events answered 200 are no longer in the queue (%s): recorded as lost in"
            " the ledger (collector audit)",
            sum(lost.values()),
            reason,
        )
