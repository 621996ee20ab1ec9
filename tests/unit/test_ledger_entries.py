"""The outcomes ledger's arithmetic and bounds (`collector.store.ledger`), and how the
queue's opener reads its inputs (`collector.store.reconcile`), on real SQLite tables."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import orjson

from collector.events import Target
from collector.store import ledger, reconcile, rows
from collector.store.datadir import DataDir
from collector.store.ledger import DEAD_IN, DEAD_OUT, MAX_TARGETS, OTHER, QUEUE_IN, QUEUE_OUT

from conftest import event

A, B = Target("proj_a", "production"), Target("proj_b", "staging")


def table() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    ledger.ensure(conn)
    return conn


def test_entries_add_up_in_the_table_and_balance_per_target() -> None:
    conn = table()
    with conn:
        ledger.add(conn, Counter({(*A, "stored", ""): 10, (*B, "stored", ""): 4}))
        ledger.add(conn, Counter({(*A, "stored", ""): 5, (*A, "delivered", ""): 9}))
        ledger.add(conn, Counter({(*A, "dead_lettered", "rejected"): 2, (*A, "duplicate", ""): 3}))

    entries = ledger.read(conn)
    assert entries[(*A, "stored", "")] == 15
    # duplicates are neither in nor out: what the queue holds is stored less what left
    assert ledger.balance(entries, QUEUE_IN, QUEUE_OUT) == Counter({A: 4, B: 4})
    assert ledger.totals(entries)[("dead_lettered", "rejected")] == 2
    assert ledger.balance(entries, DEAD_IN, DEAD_OUT) == Counter({A: 2})


def test_a_file_without_the_table_reads_as_an_empty_ledger() -> None:
    assert ledger.read(sqlite3.connect(":memory:")) == Counter()
    assert ledger.read(None) == Counter()


def test_past_max_targets_new_ones_are_counted_as_other_in_every_process() -> None:
    conn = table()
    known: set[Target] = set()
    entries = ledger.counted(
        conn,
        [(Target(f"p{n}", "e"), 1) for n in range(MAX_TARGETS + 5)],
        ledger.State.STORED,
        known,
    )
    with conn:
        ledger.add(conn, entries)
    assert entries[(*OTHER, "stored", "")] == 5
    assert len({key[:2] for key in entries}) == MAX_TARGETS + 1

    later: set[Target] = set()  # another process (the forwarder) decides the same
    assert ledger.target_for(conn, Target("p3", "e"), later) == Target("p3", "e")
    assert ledger.target_for(conn, Target(f"p{MAX_TARGETS + 1}", "e"), later) == OTHER


def test_the_witness_shows_what_a_ledger_lost_and_only_its_inflow_counts(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    before = Counter({(*A, "stored", ""): 3000, (*A, "delivered", ""): 1000})
    ledger.write_witness(data_dir, before)
    assert ledger.read_witness(data_dir) == before

    after = Counter({(*A, "stored", ""): 1400, (*A, "delivered", ""): 400})
    assert ledger.missing(after, ledger.read_witness(data_dir)) == Counter(
        {(*A, "stored", ""): 1600}
    )
    assert ledger.missing(before, ledger.read_witness(data_dir)) == Counter()
    assert ledger.carried(after, before) == before

    data_dir.ledger_witness.write_bytes(b"not json")
    assert ledger.read_witness(data_dir) == Counter()  # unreadable: it sees nothing


def test_a_dead_letter_comes_back_under_the_state_its_reason_names() -> None:
    assert reconcile.letter_state("quarantined: event: empty") == (ledger.State.QUARANTINED, "")
    assert reconcile.letter_state("rejected by upstream (HTTP 200): bad") == (
        ledger.State.DEAD_LETTERED,
        "rejected",
    )
    assert reconcile.letter_state("older than the maximum age (604800 s)")[1] == "max_age"
    assert reconcile.letter_state("unconfirmed: the upstream answered")[1] == "unconfirmed"
    assert reconcile.letter_state("written by a future version") == (
        ledger.State.DEAD_LETTERED,
        "salvaged",
    )


def test_rows_read_back_keep_each_event_id_once() -> None:
    first = rows.join({A: [orjson.dumps(event(id="x")), orjson.dumps(event(id="y"))]})
    second = rows.join({A: [orjson.dumps(event(id="y")), orjson.dumps(event(id="z"))]})
    only_repeats = rows.join({A: [orjson.dumps(event(id="x"))]})

    kept = reconcile.unique_rows([(first, 1.0), (second, 2.0), (only_repeats, 3.0)])

    assert kept[0] == (first, 1.0)  # untouched
    assert [
        rows.parse(raw)["id"] for _, raw_events in rows.split(kept[1][0]) for raw in raw_events
    ] == ["z"]
    assert kept[1][1] == 2.0 and len(kept) == 2
    assert rows.counts(first) == [(A, 2)]
