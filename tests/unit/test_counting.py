"""collector/server/counting.py: what the server counts of each event, into a real
`Counts.writer` in tmp_path: exposures per allocation (and their declared shares),
conversions attributed by decisionId or the SDK's attribution, duplicates counted once,
and event names bounded (MAX_NAMES, then `(other)`) and cut (LABEL_CHARS).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from collector.events import LayerAssignment, decode_all
from collector.server import counting
from collector.server.counting import (
    LABEL_CHARS,
    MAX_NAMES,
    OTHER,
    Conversions,
    EventCounter,
    label,
    notes,
)
from collector.store import counts as counts_module
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir

from conftest import event

TARGET = ("proj_test", "production")


@pytest.fixture
def counts(tmp_path: Path) -> Iterator[Counts]:
    writer = Counts.writer(DataDir(tmp_path))
    yield writer
    writer.close()


class Counter:
    """Both halves of the counting: the server's, and the queue writer's of its notes."""

    def __init__(self, counts: Counts) -> None:
        self.server = EventCounter(counts)
        self.writer = Conversions(counts)


def accept(
    counter: Counter, *events: dict[str, Any], skipped: frozenset[int] = frozenset()
) -> None:
    """Count `events` as the ingest pipeline and the writer do: received, then accepted,
    then their notes."""
    raws = [orjson.dumps(e) for e in events]
    decoded, errors = decode_all(raws)
    assert not errors
    received = counter.server.received(decoded, raws)
    valid = [e for e in decoded if e is not None]
    counter.server.accepted(valid, received, set(skipped))
    counter.writer.count(notes(valid), sorted(skipped), time.monotonic())


def flushed(counts: Counts, name: Count) -> dict[tuple[str, ...], float]:
    counts.flush()
    return counts.recent(name, 2)


def layer(policy: str, allocation: str, **fields: Any) -> dict[str, Any]:
    return {
        "layerId": f"layer_{policy}",
        "bucket": 7,
        "policyId": policy,
        "allocationName": allocation,
        **fields,
    }


def test_exposures_are_counted_per_layer_policy_and_allocation(counts: Counts) -> None:
    counter = Counter(counts)

    accept(
        counter,
        event("exposure", layers=[layer("pol_1", "control"), layer("pol_2", "treatment")]),
        event("exposure", layers=[layer("pol_1", "control")]),
        event("exposure", layers=[layer("pol_1", "treatment", bucket=-1)]),  # skipped layer
        event("exposure", layers=[layer("pol_1", "treatment", attributionOnly=True)]),
    )

    assert flushed(counts, Count.EXPOSURES) == {
        (*TARGET, "layer_pol_1", "pol_1", "control"): 2,
        (*TARGET, "layer_pol_2", "pol_2", "treatment"): 1,
    }


def test_declared_probabilities_are_summed_with_how_many_declared_one(counts: Counts) -> None:
    counter = Counter(counts)

    accept(
        counter,
        event("exposure", layers=[layer("pol_1", "control", probability=0.5)]),
        event("exposure", layers=[layer("pol_1", "control", probability=0.25)]),
        event("exposure", layers=[layer("pol_1", "control")]),  # declares none
        event("exposure", layers=[layer("pol_1", "control", probability=None)]),  # null
    )

    key = (*TARGET, "layer_pol_1", "pol_1", "control")
    assert flushed(counts, Count.EXPOSURES) == {key: 4}
    assert counts.recent(Count.EXPOSURE_SHARES, 2) == {key: 0.75}
    assert counts.recent(Count.EXPOSURE_SHARES_N, 2) == {key: 2}


def test_a_track_event_is_attributed_to_the_allocation_of_its_decision_id(counts: Counts) -> None:
    counter = Counter(counts)
    accept(
        counter,
        event("exposure", decisionId="dec_1", layers=[layer("pol_1", "treatment")]),
        event("decision", id="dec_2", layers=[layer("pol_2", "control")]),
    )

    accept(
        counter,
        event(decisionId="dec_1", event="purchase"),
        event(decisionId="dec_2", event="signup"),
        event(decisionId="dec_unknown", event="purchase"),
        event(event="purchase"),
    )

    assert flushed(counts, Count.CONVERSIONS) == {
        (*TARGET, "pol_1", "treatment", "purchase"): 1,
        (*TARGET, "pol_2", "control", "signup"): 1,
    }
    assert counts.recent(Count.TRACK_EVENTS, 2) == {
        (*TARGET, "purchase"): 3,
        (*TARGET, "signup"): 1,
    }


def test_without_a_known_decision_the_sdks_own_attribution_is_used(counts: Counts) -> None:
    counter = Counter(counts)

    accept(
        counter,
        event(
            attribution=[
                {"policyId": "pol_9", "allocationName": "b"},
                {"policyId": "pol_9"},  # incomplete: ignored
                "garbage",
            ]
        ),
    )

    assert flushed(counts, Count.CONVERSIONS) == {(*TARGET, "pol_9", "b", "purchase"): 1}


def test_a_duplicate_is_counted_as_deduplicated_never_twice_as_an_exposure(counts: Counts) -> None:
    counter = Counter(counts)
    exposure = event("exposure", id="x", layers=[layer("pol_1", "control")])

    accept(counter, exposure, event(id="t"), skipped=frozenset({0, 1}))

    labels = ("org_test", "proj_test", "production", "exposure")
    assert flushed(counts, Count.EXPOSURES) == {}
    assert counts.recent(Count.TRACK_EVENTS, 2) == {}
    assert counts.recent(Count.EVENTS_ACCEPTED, 2)[labels] == 1
    assert counts.recent(Count.EVENTS_WRITTEN, 2) == {}
    assert counts.recent(Count.EVENTS_DEDUPLICATED, 2)[labels] == 1


def test_past_max_names_new_event_names_are_counted_as_other(counts: Counts) -> None:
    counter = Counter(counts)
    names = [f"event_{n}" for n in range(MAX_NAMES + 3)]

    accept(counter, *(event(event=name) for name in names))
    accept(counter, event(event="event_0"), event(event="event_never_seen"))

    tracked = flushed(counts, Count.TRACK_EVENTS)
    assert tracked[(*TARGET, OTHER)] == 4  # three over the bound, then one more new name
    assert tracked[(*TARGET, "event_0")] == 2  # a name counted before stays counted
    assert len(tracked) == MAX_NAMES + 1


def test_labels_are_cut_and_never_the_text_of_an_object() -> None:
    assert label("x" * (LABEL_CHARS + 50)) == "x" * LABEL_CHARS
    assert label(None) == ""
    assert label(42) == "42"
    assert label([1, 2, 3]) == "(list)"
    assert label({"deep": {"er": 1}}) == "(dict)"


def test_what_is_not_an_event_is_received_as_invalid(counts: Counts) -> None:
    counter = Counter(counts)

    raws = [orjson.dumps(e) for e in (42, {"type": "other"}, {"type": "track"}, event("decision"))]
    counter.server.received(decode_all(raws)[0], raws)

    assert flushed(counts, Count.EVENTS_RECEIVED) == {
        ("", "", "", "invalid"): 2,
        ("", "", "", "track"): 1,  # of a known type, but invalid
        ("org_test", "proj_test", "production", "decision"): 1,
    }


def test_counts_wait_for_a_take_and_are_added_in_the_minute_they_came_in(
    counts: Counts, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [600.0 * 60 + 59.5]  # half a second before minute 601
    monkeypatch.setattr(counting.time, "time", lambda: clock[0])
    monkeypatch.setattr(counts_module.time, "time", lambda: clock[0])
    counter = Counter(counts)
    labels = ("org_test", "proj_test", "production", "exposure")

    accept(counter, event("exposure"), event("exposure", id="second"))
    assert counts.counter(Count.EVENTS_ACCEPTED) == {}  # waiting, not yet counted
    clock[0] += 1.0  # minute 601: the next request settles what waited first
    accept(counter, event("exposure", id="third"))

    taken = counts.take()
    assert taken[(600, Count.EVENTS_ACCEPTED)] == {labels: 2}
    assert taken[(601, Count.EVENTS_ACCEPTED)] == {labels: 1}
    assert taken[(600, Count.EXPOSURES)] == {(*TARGET, "layer_1", "pol_1", "treatment"): 2}
    assert counts.take() == {}  # nothing counted twice


def test_past_pending_keys_what_waits_is_counted_without_a_take(
    counts: Counts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(counting, "PENDING_KEYS", 3)
    counter = Counter(counts)

    for n in range(5):
        accept(counter, event("exposure", id=f"e{n}"))

    settled = counts.counter(Count.EVENTS_RECEIVED)  # before any take
    assert sum(settled.values()) == 3  # the fourth request found three waiting
    assert flushed(counts, Count.EVENTS_RECEIVED) == {
        ("org_test", "proj_test", "production", "exposure"): 5
    }


def test_requests_in_flight_across_a_take_are_each_counted_once(counts: Counts) -> None:
    server = EventCounter(counts)
    raws = [orjson.dumps(event("exposure", id=f"e{n}")) for n in range(3)]
    decoded, _ = decode_all(raws)
    valid = [e for e in decoded if e is not None]

    first = server.received(decoded[:2], raws[:2])  # two requests wait for their commits
    second = server.received(decoded[2:], raws[2:])
    taken = counts.take()  # a flush between their receipt and their answers
    server.accepted(valid[2:], second, set())
    server.accepted(valid[:2], first, {1})
    taken_after = counts.take()

    labels = ("org_test", "proj_test", "production", "exposure")
    assert sum(taken[key][labels] for key in taken if key[1] == Count.EVENTS_RECEIVED) == 3
    assert not [key for key in taken if key[1] == Count.EVENTS_ACCEPTED and taken[key]]
    by_name = {name: counter for (_, name), counter in taken_after.items()}
    assert by_name[Count.EVENTS_ACCEPTED] == {labels: 3}
    assert by_name[Count.EVENTS_DEDUPLICATED] == {labels: 1}
    assert by_name[Count.EVENTS_WRITTEN] == {labels: 2}
    assert sum(by_name[Count.EXPOSURES].values()) == 2


def layers_of(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """The (policy, allocation) pairs of a decision's layers, as its note holds them."""
    layers = [
        LayerAssignment(layerId="l", bucket=1, policyId=policy, allocationName=allocation)
        for policy, allocation in pairs
    ]
    return counting.pairs_of(layers)


def test_decisions_are_kept_in_two_generations_bounded_by_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(counting, "DECISIONS_KEPT", 4)  # two generations of two
    decisions = counting.Decisions()
    for n in range(5):
        decisions.remember(f"dec_{n}", layers_of(("pol_1", "control")), now=1000.0)

    # dec_0 and dec_1 filled the first generation, dropped whole when the third began
    assert [f"dec_{n}" in decisions for n in range(5)] == [False, False, True, True, True]
    assert len(decisions) == 3
    assert decisions.get("dec_2", now=1000.0) == (("pol_1", "control"),)


def test_a_decision_is_found_for_its_ttl_at_least_and_never_past_twice_that() -> None:
    ttl = counting.DECISION_TTL_S
    decisions = counting.Decisions()
    pairs = layers_of(("pol_1", "control"))
    decisions.remember("early", pairs, now=0.0)  # the generation begins
    decisions.remember("late", pairs, now=ttl - 1)  # its last second
    decisions.remember("next", pairs, now=ttl)  # a new one: "early" and "late" previous

    assert decisions.get("early", now=ttl) == pairs
    assert decisions.get("late", now=2 * ttl - 2) == pairs  # at least a TTL after it
    assert decisions.get("late", now=2 * ttl) is None  # the generation is 2 TTL old
    assert decisions.get("next", now=3 * ttl - 1) == pairs
    assert decisions.get("next", now=3 * ttl) is None
    decisions.remember("later", pairs, now=3 * ttl)  # drops the generation of "early"
    assert "early" not in decisions and "next" in decisions


def test_distinct_allocation_sets_are_bounded_and_held_with_their_labels_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(counting, "MAX_ALLOCATION_SETS", 2)
    decisions = counting.Decisions()
    long_name = "a" * (LABEL_CHARS + 50)
    decisions.remember("dec_0", layers_of(("pol_0", long_name)), now=0.0)
    decisions.remember("dec_1", layers_of(("pol_1", "a")), now=0.0)
    decisions.remember("dec_2", layers_of(("pol_2", "a")), now=0.0)  # a third set
    decisions.remember("dec_again", layers_of(("pol_0", long_name)), now=0.0)  # held already
    skipped = counting.pairs_of([LayerAssignment(layerId="l", bucket=-1)])
    decisions.remember("dec_skipped", skipped, now=0.0)

    assert decisions.get("dec_0", 0.0) == (("pol_0", long_name[:LABEL_CHARS]),)
    assert decisions.get("dec_again", 0.0) == (("pol_0", long_name[:LABEL_CHARS]),)
    assert decisions.get("dec_1", 0.0) == (("pol_1", "a"),)
    assert decisions.get("dec_2", 0.0) is None  # not remembered: the sets are full
    assert "dec_skipped" not in decisions  # no allocation to remember


def test_each_decision_is_found_with_its_own_pairs_and_no_other_is_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(counting, "DECISIONS_KEPT", 64)  # 128 slots a generation takes 32 of
    decisions = counting.Decisions()
    for n in range(64):  # the first 32 fill what becomes the previous generation
        decisions.remember(f"dec_{n}", layers_of((f"pol_{n}", "control")), now=0.0)

    # 32 keys in 128 slots share some (linear probing): each still finds its own
    assert [decisions.get(f"dec_{n}", 0.0) for n in range(64)] == [
        layers_of((f"pol_{n}", "control")) for n in range(64)
    ]
    assert len(decisions) == 64
    assert not any(f"other_{n}" in decisions for n in range(10_000))


def test_exposures_and_decisions_are_counted_by_config_version_whatever_it_holds(
    counts: Counts,
) -> None:
    counter = Counter(counts)

    accept(
        counter,
        event("exposure", configVersion="v2"),
        event("decision", configVersion="v2"),
        event("decision", configVersion="v1"),
        event("exposure"),  # an SDK that sends none
        event("exposure", configVersion={"not": "a string"}),  # taken, and counted by its type
        event("track", configVersion="v2"),  # a track's is not drift: not counted
        skipped=frozenset({1}),  # a duplicate is not counted again
    )

    assert flushed(counts, Count.CONFIG_VERSIONS) == {
        (*TARGET, "v2"): 1,
        (*TARGET, "v1"): 1,
        (*TARGET, ""): 1,
        (*TARGET, "(dict)"): 1,
    }
    assert sum(flushed(counts, Count.EVENTS_WRITTEN).values()) == 5
