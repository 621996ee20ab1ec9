"""forwarder/batch.py: a batch's body is the events' stored bytes as one valid JSON
envelope, its `size` is the body's length, and `halves` keeps events with their rows, in
order.
"""

from __future__ import annotations

import orjson
import pytest

from collector.events import Target
from forwarder.batch import Batch

from conftest import event

TARGET = Target("proj_test", "production")


def filled(count: int) -> Batch:
    batch = Batch(TARGET)
    for n in range(count):
        properties = {"n": n, "text": 'é, "quoted"' * n}
        batch.add(orjson.dumps(event(id=f"e{n}", properties=properties)), row_id=100 + n // 2)
    return batch


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
def test_halves_keep_events_and_rows_paired_and_in_order(count: int) -> None:
    batch = filled(count)
    pairs = list(zip(batch.events, batch.rows, strict=True))

    first, second = batch.halves()

    middle = count // 2
    assert list(zip(first.events, first.rows, strict=True)) == pairs[:middle]
    assert list(zip(second.events, second.rows, strict=True)) == pairs[middle:]
    for part in (first, second):
        assert part.target == TARGET
        assert part.size == len(part.body())


def test_each_batch_has_its_own_id_and_a_half_gets_a_new_one() -> None:
    batch = filled(4)
    first, second = batch.halves()

    assert len({batch.id, Batch(TARGET).id, first.id, second.id}) == 4
