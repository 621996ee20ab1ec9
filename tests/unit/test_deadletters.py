"""collector/store/deadletters.py: the dead-letter store with a real writer in tmp_path
(add, count, letters, raw, remove, purge), a reader of a missing file (sees nothing,
creates nothing), and `replay` into a real `Spool` in the same data directory, including
a disk budget that stops it part way.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from collector.errors import QueueFull
from collector.store import spool
from collector.store.datadir import DataDir
from collector.store.deadletters import REPLAY_CHUNK, DeadLetters, Replayed, replay
from collector.store.ledger import State

from conftest import event, stored_events


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path / "data")


@pytest.fixture
def dead(data_dir: DataDir) -> Iterator[DeadLetters]:
    store = DeadLetters.writer(data_dir)
    yield store
    store.close()


def raw_events(*ids: str, **fields: object) -> list[bytes]:
    return [orjson.dumps(event(id=i, **fields)) for i in ids]


def test_added_letters_are_counted_and_listed_oldest_first_with_their_reason(
    dead: DeadLetters,
) -> None:
    assert dead.add(raw_events("a", "b"), "HTTP 400: bad") == 2
    assert dead.add(raw_events("c"), "older than the maximum age") == 1

    letters = dead.letters()

    assert dead.count() == 3
    assert [letter.event["id"] for letter in letters] == ["a", "b", "c"]
    assert [letter.reason for letter in letters] == ["HTTP 400: bad"] * 2 + [
        "older than the maximum age"
    ]
    assert letters[0].id < letters[1].id < letters[2].id
    assert letters[0].summary() == {
        "id": letters[0].id,
        "dead_at": letters[0].dead_at,
        "reason": "HTTP 400: bad",
        "source": "",
        "type": "track",
        "event_id": "a",
        "project": "proj_test",
        "env": "production",
    }


def test_letters_and_raw_by_id_give_those_letters_and_their_stored_bytes(
    dead: DeadLetters,
) -> None:
    sent = raw_events("a", "b", "c")
    dead.add(sent, "r")
    first, _, third = (letter.id for letter in dead.letters())

    assert [letter.event["id"] for letter in dead.letters([third, first])] == ["a", "c"]
    assert dead.raw([third, first]) == [(first, sent[0], "r"), (third, sent[2], "r")]
    assert sorted(dead.all_ids()) == [letter.id for letter in dead.letters()]


def test_remove_deletes_only_the_named_letters_and_purge_deletes_the_rest(
    dead: DeadLetters,
) -> None:
    dead.add(raw_events("a", "b", "c"), "r")
    first, second, third = (letter.id for letter in dead.letters())

    assert dead.remove([second, 999_999]) == 1
    assert [letter.id for letter in dead.letters()] == [first, third]

    assert dead.purge() == 2
    assert dead.count() == 0
    assert dead.letters() == []


def test_a_reader_of_a_missing_file_sees_none_and_creates_no_file(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))

    reader = DeadLetters.reader(DataDir(tmp_path))
    try:
        assert reader.count() == 0
        assert reader.letters() == []
        assert reader.all_ids() == []
    finally:
        reader.close()

    assert sorted(os.listdir(tmp_path)) == before


def test_a_reader_sees_what_the_writer_added(data_dir: DataDir, dead: DeadLetters) -> None:
    dead.add(raw_events("a"), "r")

    reader = DeadLetters.reader(data_dir)
    try:
        assert [letter.event["id"] for letter in reader.letters()] == ["a"]
    finally:
        reader.close()


# --- replay ----------------------------------------------------------------------------------


def test_replay_of_all_moves_every_letter_into_the_queue_and_out_of_the_store(
    data_dir: DataDir, dead: DeadLetters
) -> None:
    sent = raw_events("a", "b", "c")
    dead.add(sent, "r")

    done = replay(data_dir, None, sync="normal", budget_bytes=1 << 30)

    assert done == Replayed(moved=3, wanted=3)
    assert dead.count() == 0
    assert stored_events(data_dir.path) == [orjson.loads(raw) for raw in sent]


def test_replay_of_some_ids_moves_those_and_counts_those_wanted(
    data_dir: DataDir, dead: DeadLetters
) -> None:
    dead.add(raw_events("a", "b", "c"), "r")
    first, second, third = dead.all_ids()

    done = replay(data_dir, [first, third, 424_242], sync="normal", budget_bytes=1 << 30)

    assert done == Replayed(moved=2, wanted=3)
    assert dead.all_ids() == [second]
    assert [e["id"] for e in stored_events(data_dir.path)] == ["a", "c"]


def test_replay_into_a_queue_at_its_budget_moves_nothing_and_says_why(
    data_dir: DataDir, dead: DeadLetters
) -> None:
    dead.add(raw_events("a", "b"), "r")

    done = replay(data_dir, None, sync="normal", budget_bytes=1)

    assert (done.moved, done.wanted) == (0, 2)
    assert isinstance(done.refused, QueueFull)
    assert dead.count() == 2
    assert stored_events(data_dir.path) == []


def test_replay_stopped_by_the_budget_keeps_what_it_moved_before(
    data_dir: DataDir, dead: DeadLetters
) -> None:
    padding = "p" * 400
    sent = raw_events(*(f"e{n}" for n in range(2 * REPLAY_CHUNK)), properties={"pad": padding})
    dead.add(sent, "r")
    chunk_bytes = sum(map(len, sent[:REPLAY_CHUNK]))
    empty = spool.Spool(data_dir, budget_bytes=1 << 30)  # the queue file, empty
    empty.close()
    empty_bytes = spool.summary(data_dir).used_bytes
    # Room for the first chunk, not for the second as well.
    budget = empty_bytes + chunk_bytes + chunk_bytes // 2

    done = replay(data_dir, None, sync="normal", budget_bytes=budget)

    assert (done.moved, done.wanted) == (REPLAY_CHUNK, 2 * REPLAY_CHUNK)
    assert isinstance(done.refused, QueueFull)
    assert [e["id"] for e in stored_events(data_dir.path)] == [f"e{n}" for n in range(REPLAY_CHUNK)]
    assert [letter.event["id"] for letter in dead.letters()] == [
        f"e{n}" for n in range(REPLAY_CHUNK, 2 * REPLAY_CHUNK)
    ]


def test_a_file_made_before_sources_gets_the_column_and_keeps_its_letters(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.create()
    old = sqlite3.connect(data_dir.dead_letters)
    old.execute(
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " dead_at REAL NOT NULL, reason TEXT NOT NULL, event BLOB NOT NULL)"
    )
    old.execute(
        "INSERT INTO dead_letters (dead_at, reason, event) VALUES (1, 'old', ?)",
        (orjson.dumps(event(id="before")),),
    )
    old.commit()
    old.close()

    reader = DeadLetters.reader(data_dir)  # before any writer opened it: no column yet
    try:
        assert [(letter.reason, letter.source) for letter in reader.letters()] == [("old", "")]
    finally:
        reader.close()
    dead = DeadLetters.writer(data_dir)
    try:
        dead.add_each([(b"[1, 2]", "quarantined: not an object", "php/1.2.0")], State.QUARANTINED)
        letters = dead.letters()
    finally:
        dead.close()

    assert [(letter.reason, letter.source) for letter in letters] == [
        ("old", ""),
        ("quarantined: not an object", "php/1.2.0"),
    ]
    assert letters[1].event == [1, 2]
    assert letters[1].summary()["event_id"] is None  # not an object: nothing to read


def test_replay_validates_quarantined_events_again_and_leaves_the_still_invalid(
    data_dir: DataDir, dead: DeadLetters
) -> None:
    fixed, broken = raw_events("fixed"), raw_events("broken", event="")
    dead.add(fixed, "quarantined: a validator since fixed", state=State.QUARANTINED)
    dead.add(broken, "quarantined: event: Expected `str` of length >= 1", state=State.QUARANTINED)
    dead.add(raw_events("rejected"), "rejected by upstream: 400")

    done = replay(data_dir, None, sync="normal", budget_bytes=1 << 30)

    assert done == Replayed(moved=2, wanted=3, still_invalid=1)
    assert [e["id"] for e in stored_events(data_dir.path)] == ["fixed", "rejected"]
    assert [letter.event["id"] for letter in dead.letters()] == ["broken"]
    _, entries = dead.ledger()
    assert entries[("proj_test", "production", "replayed", "")] == 2
