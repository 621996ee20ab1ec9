"""Quarantine at ingest: an event that fails validation is answered in `validationErrors`
(which no SDK reads) and kept in the dead-letter store with the reason and the SDK that sent
it, within `quarantine_max_bytes`; `collector status` names the SDK as a problem;
`collector dlq export` gives the events back as NDJSON, as sent. A real server on
127.0.0.1 with its real writer and files in tmp paths.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.ledger import State

from conftest import Server, dlq_list_json, event, run_cli, status_json, wait_for

PHP = {"X-SDK-Name": "php", "X-SDK-Version": "1.2.0"}


def status_when(data_dir: Path, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """`collector status --json` once `ready` holds of it (counts are flushed each second)."""
    found: list[dict[str, Any]] = []

    def looked() -> bool:
        found[:] = [status_json(data_dir)[1]]
        return ready(found[0])

    wait_for(looked, "the status wanted")
    return found[0]


def test_invalid_events_are_answered_and_quarantined_with_the_sdk_that_sent_them(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    sent = [
        event(id="fine"),
        event(id="empty-name", event=""),
        event(id="php-list", properties=["a", "php", "list"]),
        event(id="own-sdk", event="", sdkName="js-client", sdkVersion="0.11.0"),
    ]
    answer = server.post({"events": sent}, headers=PHP)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    assert [e["index"] for e in answer.json()["validationErrors"]] == [1, 2, 3]

    letters = dlq_list_json(server.data_dir)
    assert [(letter["event_id"], letter["source"]) for letter in letters] == [
        ("empty-name", "php/1.2.0"),
        ("php-list", "php/1.2.0"),
        ("own-sdk", "js-client/0.11.0"),
    ]
    error = answer.json()["validationErrors"][0]["error"]
    assert letters[0]["reason"] == f"quarantined: {error}"
    assert all(letter["reason"].startswith("quarantined: ") for letter in letters)
    by_sdk = dlq_list_json(server.data_dir, "--source", "php", "--reason", "quarantined")
    assert [letter["event_id"] for letter in by_sdk] == ["empty-name", "php-list"]

    # A request with no valid event is a 400, as the contract says; its events are kept too.
    refused = server.post({"events": [event(id="alone", event="")]})
    assert refused.status_code == 400, refused.text
    assert dlq_list_json(server.data_dir)[-1]["event_id"] == "alone"
    assert dlq_list_json(server.data_dir)[-1]["source"] == "unknown"  # no header, no field

    exported = run_cli("dlq", "export", data_dir=server.data_dir)
    assert exported.returncode == 0, exported.stderr
    lines = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert [line["event"] for line in lines] == [*sent[1:], event(id="alone", event="")]
    assert [line["source"] for line in lines][:3] == ["php/1.2.0", "php/1.2.0", "js-client/0.11.0"]

    document = status_when(server.data_dir, lambda d: len(d["quarantined"]) == 3)
    assert {(row["sdk"], row["kept"], row["events"]) for row in document["quarantined"]} == {
        ("php/1.2.0", "kept", 2),
        ("js-client/0.11.0", "kept", 1),
        ("unknown", "kept", 1),
    }
    assert any("2 invalid events from SDK php/1.2.0" in p for p in document["problems"])
    assert document["healthy"] is False


def test_a_quarantined_event_is_replayed_once_the_validator_takes_it_and_not_before(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    answer = server.post({"events": [event(id="keep"), event(id="later", event="")]})
    assert answer.status_code == 200, answer.text
    # One an older, stricter validator quarantined: today's takes it (the fix).
    dead = DeadLetters.writer(DataDir(server.data_dir))
    try:
        fixed = orjson.dumps(event(id="fixed"))
        dead.add([fixed], "quarantined: refused by an older validator", state=State.QUARANTINED)
    finally:
        dead.close()

    replayed = run_cli("dlq", "replay", "--all", data_dir=server.data_dir)
    assert replayed.returncode == 0, replayed.stderr
    assert "Replayed 1 dead letters into the queue." in replayed.stdout
    assert "1 quarantined events are still invalid" in replayed.stderr
    assert [letter["event_id"] for letter in dlq_list_json(server.data_dir)] == ["later"]
    assert sorted(e["id"] for e in server.stored()) == ["fixed", "keep"]


def test_past_quarantine_max_bytes_invalid_events_are_counted_not_kept(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(COLLECTOR_QUARANTINE_MAX_BYTES="0")
    answer = server.post({"events": [event(id="ok"), event(id="bad", event="")]}, headers=PHP)
    assert answer.status_code == 200, answer.text
    assert answer.json()["written"] == 1

    document = status_when(server.data_dir, lambda d: bool(d["quarantined"]))
    assert document["quarantined"] == [{"sdk": "php/1.2.0", "kept": "full", "events": 1}]
    assert dlq_list_json(server.data_dir) == []
    assert "the quarantine is full (quarantine_max_bytes 0)" in server.log()
