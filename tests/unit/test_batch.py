"""forwarder/batch.py: a batch's body is the events' stored bytes as one valid JSON
envelope, its `size` is the body's length, and `halves` and `split` keep events with their
targets and rows, in order.
"""

from __future__ import annotations

import orjson
import pytest

from collector.events import Target
from forwarder.batch import Batch

from conftest import event

TARGET = Target("proj_test", "production")


def filled(count: int, targets: int = 1) -> Batch:
    """`count` events of `targets` projects, in runs of 3, two per row."""
    batch = Batch()
    for n in range(count):
        properties = {"n": n, "text": 'é, "quoted"' * n}
        target = Target(f"proj_{n // 3 % targets}", "production") if targets > 1 else TARGET
        raw = orjson.dumps(event(id=f"e{n}", properties=properties))
        batch.add(raw, target, row_id=100 + n // 2)
    return batch


def triples(batch: Batch) -> list[tuple[bytes, Target, int]]:
    return list(zip(batch.events, batch.targets, batch.rows, strict=True))


@pytest.mark.parametrize("count", [1, 2, 7])
def test_the_body_is_valid_json_of_the_events_as_stored(count: int) -> None:
    batch = filled(count)

    document = orjson.loads(batch.body())

    assert document == {"events": [orjson.loads(raw) for raw in batch.events]}
    assert [e["id"] for e in document["events"]] == [f"e{n}" for n in range(count)]
    assert batch.body() == b'{"events":[' + b",".join(batch.events) + b"]}"  # not re-encoded


@pytest.mark.parametrize("count", [1, 2, 3, 50])
def test_the_size_is_the_bodys_length(count: int) -> None:
    batch = filled(count)

    assert batch.size == len(batch.body())


@pytest.mark.parametrize("count", [2, 3, 8, 1000])
def test_halves_keep_events_targets_and_rows_together_and_in_order(count: int) -> None:
    batch = filled(count, targets=3)

    first, second = batch.halves()

    middle = count // 2
    assert triples(first) == triples(batch)[:middle]
    assert triples(second) == triples(batch)[middle:]
    for part in (first, second):
        assert part.size == len(part.body())
        assert part.oldest == batch.oldest


def test_split_by_target_keeps_each_targets_events_in_order() -> None:
    batch = filled(20, targets=3)

    parts = batch.split(lambda target: target)

    assert [set(part.targets) for part in parts] == [
        {Target("proj_0", "production")},
        {Target("proj_1", "production")},
        {Target("proj_2", "production")},
    ]
    for part in parts:
        assert triples(part) == [t for t in triples(batch) if t[1] == part.targets[0]]
        assert part.size == len(part.body())
    assert sum(len(part.events) for part in parts) == 20


def test_split_by_a_value_all_targets_share_is_the_batch_itself() -> None:
    batch = filled(20, targets=3)

    assert batch.split(lambda target: "the same key") == [batch]
    by_env = batch.split(lambda target: target.env)
    assert len(by_env) == 1 and by_env[0].id == batch.id


def test_each_batch_has_its_own_id_and_a_part_gets_a_new_one() -> None:
    batch = filled(6, targets=2)
    first, second = batch.halves()
    parts = batch.split(lambda target: target)

    assert len({batch.id, Batch().id, first.id, second.id, *(p.id for p in parts)}) == 6


def test_extend_is_add_of_each() -> None:
    raws = [orjson.dumps(event(id=f"x{n}", properties={"n": n})) for n in range(5)]
    added, extended = filled(3), filled(3)
    for raw in raws:
        added.add(raw, TARGET, row_id=7, queued_at=5.0)

    extended.extend(raws, sum(map(len, raws)), TARGET, 7, 5.0)

    assert triples(extended) == triples(added)
    assert extended.size == added.size == len(extended.body())
    assert extended.oldest == added.oldest == 5.0
