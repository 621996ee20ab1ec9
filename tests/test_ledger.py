"""The outcomes ledger and `collector audit`, against the real server, forwarder and an
upstream on 127.0.0.1 that answers partial success: every event taken ends in one state,
the audit balances, and what goes missing outside the collector (a write-ahead log cut
short while it was stopped, a corrupt queue file) is found and named, never silent.
"""

# ruff: noqa: F811  (the fixtures imported from test_forward_faults are arguments here)
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from collector.store import recovery
from collector.store.datadir import DataDir
from collector.store.spool import summary

from conftest import Server, dlq_list_json, event, run_cli, status_json, wait_for
from corrupt import corrupt_recoverably
from test_forward_faults import (  # noqa: F401  (the fixtures are used as arguments)
    Forwarder,
    start_forwarder,
    upstream,
)
from upstream import Upstream


def audit(data_dir: Path) -> tuple[int, dict[str, Any]]:
    """`collector audit --json`: its exit status and document."""
    done = run_cli("audit", "--json", data_dir=data_dir)
    assert done.returncode in (0, 1), done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, document


def witnessed(data_dir: Path) -> int:
    """Events the witness (ledger.json) saw stored."""
    try:
        entries = orjson.loads(DataDir(data_dir).ledger_witness.read_bytes())["queue"]
    except FileNotFoundError:
        return 0
    return sum(value for _, _, state, _, value in entries if state == "stored")


def events(prefix: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    return [event(id=f"{prefix}-{i}", **fields) for i in range(n)]


def test_every_event_ends_in_one_state_and_the_audit_balances(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    server = start_server()
    web = events("web", 40, projectId="proj_web")
    app = events("app", 30, projectId="proj_app", env="staging")
    upstream.reject_ids(["web-3"])  # a 400 for its batch: split down to it, dead-lettered
    upstream.drop_in_200(["app-7", "app-8"])  # a 200 naming them in validationErrors
    assert server.post({"events": web}).status_code == 200
    assert server.post({"events": [*app, event(id="bad", event="")]}).status_code == 200
    again = server.post({"events": web[:10]})  # a client's retry: duplicates
    assert again.json() == {"accepted": 10, "written": 0, "pipelineWritten": 0}

    start_forwarder(server.data_dir, upstream.url)
    wait_for(lambda: summary(DataDir(server.data_dir)).events == 0, "the queue drained")
    status, document = audit(server.data_dir)

    assert status == 0, document["problems"]
    assert document["balanced"] and not document["problems"]
    rows = {(row["project"], row["env"]): row for row in document["by_target"]}
    web_row, app_row = rows[("proj_web", "production")], rows[("proj_app", "staging")]
    assert (web_row["stored"], web_row["duplicate"]) == (40, 10)
    assert (web_row["delivered"], web_row["dead_lettered"], web_row["queued"]) == (39, 1, 0)
    assert (app_row["stored"], app_row["delivered"], app_row["dead_lettered"]) == (30, 28, 2)
    assert rows[("proj_test", "production")]["quarantined"] == 1  # the invalid one
    assert document["totals"]["dead_letters_held"] == 4  # 3 dead-lettered, 1 quarantined
    assert sorted(upstream.event_ids()) == sorted(
        e["id"] for e in [*web, *app] if e["id"] not in ("web-3", "app-7", "app-8")
    )

    _, shown = status_json(server.data_dir)
    assert shown["ledger"]["states"]["stored"] == 70
    assert shown["ledger"]["states"]["dead_lettered"] == {"rejected": 3}
    assert shown["ledger"]["missing"] == 0
    text = run_cli("audit", data_dir=server.data_dir)
    assert text.returncode == 0 and "balanced" in text.stdout.splitlines()[-1]
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'collector_ledger_events_total{reason="",state="delivered"} 67.0' in metrics


def test_a_write_ahead_log_cut_short_while_stopped_is_found_and_recorded_as_lost(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    for n in range(30):
        assert server.post({"events": events(f"r{n}", 100)}).status_code == 200
    wait_for(lambda: witnessed(server.data_dir) == 3000, "the witness to see 3000 stored")
    server.kill()  # no checkpoint: the commits are in the write-ahead log
    wal = server.data_dir / "queue.db-wal"
    assert wal.stat().st_size > 100_000
    os.truncate(wal, wal.stat().st_size // 2)  # outside the collector, while it is stopped

    # Read-only, the file may not even open now (its shared-memory index points past the
    # log's end: "disk I/O error"); either way the audit does not pass.
    before = run_cli("audit", data_dir=server.data_dir)
    assert before.returncode != 0
    assert "missing from the queue" in before.stdout or "disk I/O error" in before.stderr

    server.start()  # the queue's opener records them as lost, and says so
    held = summary(DataDir(server.data_dir)).events
    assert 0 < held < 3000
    assert f"{3000 - held} events answered 200 are no longer in the queue" in server.log()
    status, document = audit(server.data_dir)
    assert status == 1
    assert document["problems"] == [
        f"{3000 - held} events were lost: the queue file lost committed writes (its"
        " write-ahead log cut short, or an older copy)"
    ]
    assert document["totals"]["lost"] == 3000 - held
    assert all(row["difference"] == 0 for row in document["by_target"])
    code, shown = status_json(server.data_dir)
    assert code == 1 and any("events were lost" in p for p in shown["problems"])


def test_a_stop_leaves_the_witness_current_and_the_audit_balanced(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    for n in range(5):
        assert server.post({"events": events(f"s{n}", 200)}).status_code == 200
    server.stop()  # SIGTERM: what was answered is committed, the witness written last
    assert witnessed(server.data_dir) == 1000
    status, document = audit(server.data_dir)
    assert status == 0, document["problems"]
    assert document["totals"]["stored"] == document["totals"]["queued"] == 1000


def test_a_corrupt_queue_file_is_read_back_at_start_and_nothing_is_lost(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    for n in range(4):
        assert server.post({"events": events(f"c{n}", 250)}).status_code == 200
    server.stop()
    corrupt_recoverably(server.data_dir / "queue.db")

    server.start()  # moved aside, every row read back, its ledger carried over
    assert "read back 1000 events in 4 rows" in server.log()
    assert summary(DataDir(server.data_dir)).events == 1000
    status, document = audit(server.data_dir)
    assert status == 0, document["problems"]
    assert (document["totals"]["stored"], document["totals"]["lost"]) == (1000, 0)
    (moved,) = [m["moved_to"] for m in recovery.moved_aside(server.data_dir)]

    # `collector salvage FILE` does the same by hand, into another data directory.
    other = start_server()
    done = run_cli("salvage", str(server.data_dir / moved), data_dir=other.data_dir)
    assert done.returncode == 0, done.stderr
    assert "Read back 1000 events" in done.stdout and "into the queue" in done.stdout
    status, document = audit(other.data_dir)
    assert status == 0, document["problems"]
    assert document["totals"]["salvaged"] == document["totals"]["queued"] == 1000
    again = run_cli("salvage", str(other.data_dir / "keys.json"), data_dir=other.data_dir)
    assert again.returncode == 1 and again.stderr.startswith("error: ")


def test_a_corrupt_dead_letter_file_is_read_back_with_its_ledger(
    start_server: Callable[..., Server],
    start_forwarder: Callable[..., Forwarder],
    upstream: Upstream,
) -> None:
    server = start_server()
    upstream.reject_ids([f"d-{i}" for i in range(5)])
    assert server.post({"events": [*events("d", 20), event(id="bad", event="")]}).status_code == 200
    forwarder = start_forwarder(server.data_dir, upstream.url)
    wait_for(lambda: summary(DataDir(server.data_dir)).events == 0, "the queue drained")
    assert forwarder.stop() == 0
    server.stop()
    corrupt_recoverably(server.data_dir / "dead-letters.db")

    forwarder = start_forwarder(server.data_dir, upstream.url)  # moves it aside, reads back
    assert "read back 6 dead letters" in forwarder.log()
    letters = {letter["event_id"]: letter["reason"] for letter in dlq_list_json(server.data_dir)}
    assert sorted(letters) == ["bad", "d-0", "d-1", "d-2", "d-3", "d-4"]
    assert letters["bad"].startswith("quarantined: ")
    status, document = audit(server.data_dir)
    assert status == 0, document["problems"]
    assert document["totals"]["dead_letters_held"] == 6
