"""`collector audit`: does every event add up? The outcomes ledger (`collector.store.ledger`)
reconciled against what the stores hold, per project and env.

Checks, each a problem when it fails (exit status 1):

- the queue: what its ledger says came in (stored, replayed, salvaged) less what went out
  (delivered, unconfirmed, dead-lettered, lost) is what its rows hold, per project and env
  (both read in one transaction, so a running collector cannot skew it);
- the witness: the queue's ledger has every event the witness saw come in; a ledger below
  it means queue.db lost committed writes since the collector last opened it;
- the dead letters: what came in (dead-lettered, quarantined) less what went out
  (replayed, purged) is what the store holds; and every event the queue counts as
  dead-lettered is in the store's ledger too (read after the queue: an event is written
  there before its row is acknowledged);
- nothing lost: events recorded as `lost` (a corrupt file's unreadable rows, committed
  writes gone) are named with their reason.

What it can measure of at-least-once delivery is shown, not failed on: events written to
the dead letters twice (a crash between the letter and the ack), and the forwarder's
delivered count (counts.db) beyond the ledger's (batches sent again after a crash). The
counts of what was refused with its request (the client keeps those) come from counts.db,
which loses the last second before each crash: shown, never balanced.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from collector.events import Target
from collector.store import ledger, spool
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.ledger import DEAD_IN, DEAD_OUT, QUEUE_IN, QUEUE_OUT, State

# How the reasons of events refused for their own content begin (`events_rejected`).
INVALID = "invalid "
# The columns of the per-target table, in order: ledger states, then what the stores hold.
COLUMNS = (
    State.STORED,
    State.REPLAYED,
    State.SALVAGED,
    State.DUPLICATE,
    State.DELIVERED,
    State.UNCONFIRMED,
    State.DEAD_LETTERED,
    State.LOST,
)


def audit(data_dir: DataDir) -> dict[str, Any]:
    """The balance of `data_dir`, with its problems (empty when everything adds up)."""
    queued, queue_ledger = spool.held(data_dir)
    witness = ledger.read_witness(data_dir)
    letters, dead_ledger = _dead_letters(data_dir)
    counts = _totals(data_dir)

    problems: list[str] = []
    held = ledger.balance(queue_ledger, QUEUE_IN, QUEUE_OUT)
    targets = sorted({*held, *queued, *_targets(queue_ledger), *_targets(dead_ledger)})
    queue_states, dead_states = _by_target(queue_ledger), _by_target(dead_ledger)
    by_target = [
        _row(t, queue_states.get(t, Counter()), dead_states.get(t, Counter()), held[t], queued[t])
        for t in targets
    ]
    for row in by_target:
        if row["difference"]:
            problems.append(
                f"{row['project']}/{row['env']}: the ledger says the queue holds"
                f" {row['ledger_queued']} events, its rows hold {row['queued']}"
            )
    gone = sum(ledger.missing(queue_ledger, witness).values())
    if gone:
        problems.append(
            f"{gone} events answered 200 are missing from the queue: queue.db lost committed"
            " writes since the collector last opened it (its write-ahead log cut short, or an"
            " older copy put back); starting the collector records them as lost"
        )
    dead_held = sum(ledger.balance(dead_ledger, DEAD_IN, DEAD_OUT).values())
    if dead_held != letters:
        problems.append(
            f"the dead-letter store holds {letters} events, its ledger says {dead_held}"
        )
    twice = _dead_lettered_twice(queue_ledger, dead_ledger, problems)
    lost = {
        reason: n
        for (state, reason), n in ledger.totals(queue_ledger).items()
        if state == State.LOST
    }
    for reason, n in sorted(lost.items()):
        problems.append(f"{n} events were lost: {reason}")

    delivered = sum(n for (s, _), n in ledger.totals(queue_ledger).items() if s == State.DELIVERED)
    return {
        "balanced": not problems,
        "problems": problems,
        "by_target": by_target,
        "totals": {str(state): sum(row[state] for row in by_target) for state in COLUMNS}
        | {
            "queued": sum(queued.values()),
            "quarantined": sum(row["quarantined"] for row in by_target),
            "dead_letters_held": letters,
        },
        "at_least_once": {
            "dead_lettered_twice": twice,
            "sent_again": max(0, int(counts.get(Count.FORWARDED, 0)) - delivered),
        },
        "counted": {
            "received": int(counts.get(Count.EVENTS_RECEIVED, 0)),
            "refused_with_request": int(counts.get(Count.EVENTS_REJECTED, 0)),
            "quarantine_not_kept": int(counts.get("quarantine_not_kept", 0)),
        },
    }


def _row(
    target: Target,
    queue_states: Counter[str],
    dead_states: Counter[str],
    ledger_queued: int,
    queued: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {"project": target.project, "env": target.env}
    for state in COLUMNS:
        row[state] = queue_states[state]
    row["quarantined"] = dead_states[State.QUARANTINED]
    row["ledger_queued"] = ledger_queued
    row["queued"] = queued
    row["difference"] = ledger_queued - queued
    return row


def _by_target(entries: ledger.Entries) -> dict[Target, Counter[str]]:
    """Per target, events per state (over its reasons): one pass, not one per cell."""
    found: dict[Target, Counter[str]] = {}
    for (project, env, state, _), n in entries.items():
        found.setdefault(Target(project, env), Counter())[state] += n
    return found


def _targets(entries: ledger.Entries) -> set[Target]:
    return {Target(p, e) for p, e, _, _ in entries}


def _dead_lettered_twice(
    queue_ledger: ledger.Entries, dead_ledger: ledger.Entries, problems: list[str]
) -> int:
    """Events written to the dead letters more often than the queue let them go there
    (a crash between the two: at-least-once); a shortfall is a problem."""
    twice = 0
    for key, n in queue_ledger.items():
        if key[2] != State.DEAD_LETTERED:
            continue
        stored = dead_ledger.get(key, 0)
        if stored < n:
            problems.append(
                f"{key[0]}/{key[1]}: {n - stored} events dead-lettered ({key[3]}) are not in"
                " the dead-letter store's ledger"
            )
        twice += max(0, stored - n)
    return twice


def _dead_letters(data_dir: DataDir) -> tuple[int, ledger.Entries]:
    dead = DeadLetters.reader(data_dir)
    try:
        return dead.ledger()
    finally:
        dead.close()


def _totals(data_dir: DataDir) -> Counter[str]:
    """Running totals from counts.db of what the ledger does not hold."""
    counts = Counts.reader(data_dir)
    try:
        totals = counts.all_totals()
    finally:
        counts.close()
    summed: Counter[str] = Counter()
    for name in (Count.EVENTS_RECEIVED, Count.FORWARDED):
        summed[name] = int(sum(totals.get(name, {}).values()))
    # Refused with their request (QueueFull, Unauthorized...), not the invalid ones: those
    # are counted as rejected too ("invalid event", "invalid layers") but quarantined.
    summed[Count.EVENTS_REJECTED] = int(
        sum(
            n
            for (reason, *_), n in totals.get(Count.EVENTS_REJECTED, {}).items()
            if not reason.startswith(INVALID)
        )
    )
    summed["quarantine_not_kept"] = int(
        sum(n for labels, n in totals.get(Count.QUARANTINED, {}).items() if labels[-1] != "kept")
    )
    return summed


def render(document: dict[str, Any]) -> str:
    """The balance as text: a line per project and env, the totals, then the verdict."""
    names = [*map(str, COLUMNS), "quarantined", "queued"]
    header = ["project/env", *names, "difference"]
    lines = [header]
    for row in document["by_target"]:
        lines.append(
            [
                f"{row['project']}/{row['env']}",
                *(str(row[n]) for n in names),
                str(row["difference"]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    again = document["at_least_once"]
    counted = document["counted"]
    text.append("")
    text.append(
        f"at-least-once: {again['dead_lettered_twice']} dead-lettered twice,"
        f" about {again['sent_again']} sent upstream again after a restart"
    )
    text.append(
        f"counted (counts.db, without each crash's last second): {counted['received']} received,"
        f" {counted['refused_with_request']} refused with their request (the client keeps"
        f" them), {counted['quarantine_not_kept']} invalid and not kept (quarantine full)"
    )
    text.append(f"dead-letter store: {document['totals']['dead_letters_held']} events held")
    if document["balanced"]:
        text.append("balanced: every event taken is delivered, dead-lettered or queued")
    else:
        text.extend(f"problem: {problem}" for problem in document["problems"])
    return "\n".join(text)
