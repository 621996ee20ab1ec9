"""collector/ops/status.py: `collect` on a data directory changes nothing it reads (an
empty one gets no file), and `_judge`'s problems and warnings for hand-made documents.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest

from collector.ops import status
from collector.settings import Settings
from collector.store import heartbeats
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir
from collector.store.heartbeats import UpstreamState


def test_collect_on_an_empty_data_directory_creates_no_file(tmp_path: Path) -> None:
    document = status.collect(Settings(data_dir=tmp_path))

    assert os.listdir(tmp_path) == []
    assert document["healthy"] is False
    assert document["problems"] == ["server is down", "forwarder is down"]
    assert document["warnings"] == []
    assert document["queue"]["events"] == 0
    assert document["queue"]["oldest_event_age_seconds"] is None
    assert document["dead_letters"] == 0
    assert document["forwarder"]["upstream"] == "unknown (forwarder down)"


def test_collect_reads_the_heartbeats_and_counts_without_changing_the_files(
    tmp_path: Path,
) -> None:
    data_dir = DataDir(tmp_path)
    heartbeats.write(data_dir.server_state, {"url": "http://127.0.0.1:1"})
    heartbeats.write(
        data_dir.forwarder_state, {"upstream": UpstreamState.OK, "last_success": time.time()}
    )
    counts = Counts.writer(data_dir)
    counts.add(Count.TRACK_EVENTS, ("p", "e", "purchase"), 6)
    counts.add(Count.EVENTS_REJECTED, ("invalid layers",), 2)
    counts.flush()
    counts.close()
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    document = status.collect(Settings(data_dir=tmp_path))

    assert document["healthy"] is True, document["problems"]
    assert document["server"]["up"] and document["server"]["pid"] == os.getpid()
    assert document["forwarder"]["upstream"] == "ok"
    assert document["top_events"] == [{"project": "p", "env": "e", "event": "purchase", "count": 6}]
    assert document["rejected"] == {"invalid layers": 2}
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before


# --- _judge --------------------------------------------------------------------------------


def healthy_document() -> dict[str, Any]:
    return {
        "server": {"up": True},
        "forwarder": {"up": True, "upstream": "ok"},
        "queue": {"disk_budget_used": 0.1},
        "dead_letters": 0,
        "recovered": [],
        "sample_ratio": [],
        "event_time": [],
        "upstream_answers": {"unconfirmed": [], "schema_warnings": []},
        "quarantined": [],
        "ledger": {"states": {"stored": 10, "delivered": 10}, "missing": 0},
    }


def judged(**changes: Any) -> tuple[list[str], list[str]]:
    document = copy.deepcopy(healthy_document())
    for name, value in changes.items():
        if isinstance(value, dict):
            document[name].update(value)
        else:
            document[name] = value
    return status._judge(document)


def test_everything_up_and_fine_is_neither_a_problem_nor_a_warning() -> None:
    assert judged() == ([], [])


def test_a_process_down_is_a_problem() -> None:
    assert judged(server={"up": False})[0] == ["server is down"]
    assert judged(forwarder={"up": False})[0] == ["forwarder is down"]


def test_a_refused_key_is_a_problem_and_no_upstream_a_warning() -> None:
    refused = "upstream refused the key for project 'p', env 'e' (HTTP 401: no); sending stopped"
    problems, _ = judged(forwarder={"upstream": "key_rejected", "message": refused})
    assert problems == [refused]  # the forwarder's words, not prefixed a second time
    problems, _ = judged(forwarder={"upstream": "key_rejected"})  # as a non-admin sees it
    assert problems == ["the upstream key was refused, or none is configured"]

    assert judged(forwarder={"upstream": "not_configured"}) == (
        [],
        ["no upstream configured: events stay queued"],
    )


@pytest.mark.parametrize(("minutes", "is_problem"), [(1, False), (4, False), (6, True)])
def test_an_outage_is_a_warning_then_a_problem_past_five_minutes(
    minutes: int, is_problem: bool
) -> None:
    since = status.iso(time.time() - minutes * 60)

    problems, warnings = judged(
        forwarder={"upstream": "retrying", "outage_since": since, "message": "HTTP 503"}
    )

    notes = problems if is_problem else warnings
    assert len(notes) == 1 and notes[0].startswith("upstream failing for ")
    assert notes[0].endswith(" s: HTTP 503")
    assert (problems if not is_problem else warnings) == []


def test_a_nearly_full_disk_budget_is_a_problem() -> None:
    assert judged(queue={"disk_budget_used": 0.95})[0] == ["disk budget 95% used"]
    assert judged(queue={"disk_budget_used": 0.89}) == ([], [])


def test_dead_letters_a_moved_aside_file_and_a_sample_ratio_mismatch_are_warnings() -> None:
    problems, warnings = judged(
        dead_letters=3,
        recovered=[
            {"file": "queue.db", "moved_to": "queue.db.corrupt-1", "at": "2026-01-01T00:00:00"},
            {"file": "counts.db", "moved_to": "counts.db.corrupt-1", "at": "2026-01-02T00:00:00"},
        ],
        sample_ratio=[
            {"policy": "pol_a", "project": "p", "env": "e", "mismatch": True, "p_value": 1e-7},
            {"policy": "pol_b", "project": "p", "env": "e", "mismatch": False, "p_value": 0.5},
        ],
    )

    assert problems == []
    assert warnings[0] == "3 dead-lettered events (collector dlq list)"
    assert "queue.db was corrupt" in warnings[1]
    assert "(what could be read of it was put back into the queue)" in warnings[1]
    assert "counts.db was corrupt" in warnings[2] and "put back" not in warnings[2]
    assert warnings[3] == "sample-ratio mismatch in policy pol_a (p/e): p = 1e-07"
    assert len(warnings) == 4


def test_events_from_the_future_or_late_are_warnings() -> None:
    rows = [
        {"project": "p", "env": "e", "future": 4, "late": 0},
        {"project": "q", "env": "e", "future": 0, "late": 7},
        {"project": "r", "env": "e", "future": 0, "late": 0},
    ]
    problems, warnings = judged(event_time=rows)

    assert problems == []
    assert len(warnings) == 2
    assert warnings[0].startswith("4 events of p/e in the counts window were stamped ahead")
    assert "a client clock is ahead" in warnings[0]
    assert warnings[1].startswith("7 events of q/e in the counts window arrived more than")


def test_unconfirmed_events_are_a_problem_and_schema_warnings_a_warning() -> None:
    problems, warnings = judged(
        upstream_answers={
            "unconfirmed": [
                {"project": "p", "env": "e", "events": 2},
                {"project": "q", "env": "e", "events": 3},
            ],
            "schema_warnings": [
                {"project": "p", "env": "e", "event": "signup", "count": 9},
                {"project": "p", "env": "e", "event": "buy", "count": 1},
            ],
        }
    )

    assert problems == [
        "5 events unconfirmed by the upstream in the counts window: it answered 2xx accepting "
        "fewer than sent without naming them (unconfirmed_events)"
    ]
    assert warnings == [
        "the upstream took events with schema warnings in the counts window (most: 9 "
        "'signup' of p/e)"
    ]


def test_invalid_events_are_a_problem_that_names_each_sdk() -> None:
    problems, _ = judged(
        quarantined=[
            {"sdk": "php/1.2.0", "kept": "kept", "events": 5},
            {"sdk": "js-client/0.11.0", "kept": "kept", "events": 1},
            {"sdk": "php/1.2.0", "kept": "full", "events": 2},
        ]
    )

    assert problems == [
        "7 invalid events from SDK php/1.2.0 in the counts window, answered in "
        "validationErrors, which SDKs do not read (quarantined: collector dlq list)",
        "1 invalid events from SDK js-client/0.11.0 in the counts window, answered in "
        "validationErrors, which SDKs do not read (quarantined: collector dlq list)",
    ]


def test_lost_events_and_a_queue_below_its_witness_are_problems() -> None:
    lost = {"states": {"stored": 10, "lost": {"a corrupt file": 3}}, "missing": 0}
    assert judged(ledger=lost) == (["3 events were lost: a corrupt file (collector audit)"], [])
    problems, _ = judged(ledger={"states": {"stored": 7}, "missing": 3})
    assert problems == [
        "3 events answered 200 are missing from the queue: queue.db lost committed writes"
        " (collector audit)"
    ]
