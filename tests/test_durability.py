"""What a 200 promises: stored once, kept across restarts and crashes, never dropped.

Each test runs the real `collector serve` in a subprocess on 127.0.0.1 and reads what it
committed from the real SQLite files; the crash test kills it with SIGKILL mid-stream. The
forwarder's side of the queue is played by `collector.store.spool.Spool` in the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from collector.errors import QueueFull
from collector.events import Target
from collector.server.commit import Committer
from collector.server.writer import Events, GroupWriter, WriterConfig
from collector.store import rows
from collector.store.datadir import QUEUE as QUEUE_FILE
from collector.store.datadir import SEEN_IDS as SEEN_IDS_FILE
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters
from collector.store.spool import Spool, summary

from conftest import Server, event, free_port, run_cli, stored_events

TARGET = Target("proj_test", "production")

QUEUE_TABLE = "ack_queue_events"  # persist-queue's table for the queue named "events"
IN_FLIGHT = 2  # persist-queue's status of a row taken but not yet acked
CRASH_ROUNDS = 3
CLIENTS = 4  # several requests in flight, so a kill can land inside a group commit
BATCH = 50


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events]


def batch(prefix: str, size: int = BATCH) -> dict[str, Any]:
    return {"events": [event(id=f"{prefix}-{i}") for i in range(size)]}


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` on the SQLite file `db`, opened read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def post_all_at_once(server: Server, bodies: list[Any]) -> list[httpx.Response]:
    """POST each body from its own thread and connection, all released at the same moment."""
    barrier = threading.Barrier(len(bodies))

    def send(body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {server.key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            try:
                client.get("/healthz")  # connect first, so only the POSTs race
                barrier.wait(timeout=30)
            except BaseException:
                barrier.abort()
                raise
            return client.post("/v1/events/batch", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def assert_unavailable(answer: httpx.Response) -> None:
    """A 503 in the documented error shape, with a usable Retry-After."""
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == "Service Unavailable"
    assert body["message"]
    assert int(answer.headers["Retry-After"]) > 0


# --- de-duplication -----------------------------------------------------------------------


def test_a_retried_event_is_accepted_again_but_stored_once(server: Server) -> None:
    body = {"events": [event(id="trk_retry")]}

    first = server.post(body)
    retry = server.post(body)

    assert first.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    assert retry.status_code == 200, retry.text
    assert retry.json() == {"accepted": 1, "written": 0, "pipelineWritten": 0}
    assert ids(server.stored()) == ["trk_retry"]


def test_an_id_repeated_within_one_request_is_stored_once(server: Server) -> None:
    answer = server.post({"events": [event(id="dup"), event(id="other"), event(id="dup")]})

    assert answer.json() == {"accepted": 3, "written": 2, "pipelineWritten": 2}
    assert sorted(ids(server.stored())) == ["dup", "other"]


def test_an_id_is_one_events_only_within_its_org_project_and_env(server: Server) -> None:
    """Another org's, project's or env's events that reuse ids already stored are stored
    too: the same id there is another event. Retries in each are still dropped."""
    ids_ = [f"shared_{n}" for n in range(50)]
    owners = [
        ("org_test", "proj_a", "production"),
        ("org_test", "proj_b", "production"),
        ("org_test", "proj_a", "dev"),
        ("org_other", "proj_a", "production"),
    ]
    for org, project, env in owners:
        body = {"events": [event(id=i, orgId=org, projectId=project, env=env) for i in ids_]}
        assert server.post(body).json() == {"accepted": 50, "written": 50, "pipelineWritten": 50}
        assert server.post(body).json() == {"accepted": 50, "written": 0, "pipelineWritten": 0}

    stored = server.stored()
    assert len(stored) == 200
    assert {(e["orgId"], e["projectId"], e["env"]) for e in stored} == set(owners)


def test_events_without_an_id_are_never_deduplicated(server: Server) -> None:
    body = {"events": [event(), event()]}

    first = server.post(body)
    second = server.post(body)

    assert first.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert second.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert len(server.stored()) == 4


@pytest.mark.parametrize("restart", ["stop", "kill"])
def test_deduplication_survives_a_server_restart(server: Server, restart: str) -> None:
    body = {"events": [event(id="exp_before_restart")]}
    assert server.post(body).json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}

    server.stop() if restart == "stop" else server.kill()
    server.start()

    assert server.post(body).json() == {"accepted": 1, "written": 0, "pipelineWritten": 0}
    assert ids(server.stored()) == ["exp_before_restart"]


def test_an_id_is_written_again_once_the_dedup_window_has_passed(
    start_server: Callable[..., Server],
) -> None:
    window_s = 1.0
    server = start_server(COLLECTOR_DEDUP_WINDOW_SECONDS=str(window_s))
    body = {"events": [event(id="trk_windowed")]}

    assert server.post(body).json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    remembered_by = time.monotonic()  # the id is remembered before the answer is sent
    assert server.post(body).json() == {"accepted": 1, "written": 0, "pipelineWritten": 0}

    # The one wait that cannot be a condition: the window is a span of time.
    time.sleep(max(0.0, remembered_by + window_s + 0.2 - time.monotonic()))
    assert server.post(body).json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    assert ids(server.stored()) == ["trk_windowed", "trk_windowed"]


def test_concurrent_requests_with_the_same_id_store_it_once(server: Server) -> None:
    body = {"events": [event(id="trk_raced")]}

    answers = post_all_at_once(server, [body] * 20)

    assert [a.status_code for a in answers] == [200] * 20
    assert [a.json()["accepted"] for a in answers] == [1] * 20
    assert sum(a.json()["written"] for a in answers) == 1
    assert ids(server.stored()) == ["trk_raced"]


def test_a_refused_commit_leaves_no_garbage_holding_its_events(tmp_path: Path) -> None:
    """A refusal's traceback held the frame that had received it from the writer, with the
    refusal and the group's events in it: a cycle that only the cyclic collector frees,
    which the server runs rarely (86,000 events of refused groups were garbage at once, and
    the server grew from 123 to 265 MiB under a minute of 503s). Run with the server's own
    Committer and a real writer process, every commit over its 1-byte budget."""
    events = Events.of([(f"e{n}", TARGET, orjson.dumps(event(id=f"e{n}"))) for n in range(1000)])

    async def refused_writes() -> list[object]:
        committer = Committer(owned=WriterConfig(tmp_path, "full", 1, 3600, 1 << 20))
        await committer.start()
        try:
            gc.collect()
            gc.disable()
            for _ in range(5):
                with contextlib.suppress(QueueFull):
                    await committer.write(events, [], 1000)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            return list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            await committer.stop()

    garbage = asyncio.run(refused_writes())

    assert not [item for item in garbage if isinstance(item, QueueFull)]
    assert len(garbage) < 1000, f"{len(garbage)} objects only the cyclic collector frees"


def test_a_repeat_of_a_refused_request_in_the_same_group_is_refused_too(tmp_path: Path) -> None:
    """Two requests carrying one id are committed in one group and the first is over budget.

    The second must not be told its event is already held (written 0) while nothing holds
    it. Run with the real spool and seen-ids files, without the server, because only here
    can two requests be put in one group for certain.
    """
    big = event(id="trk_shared", properties={"padding": "x" * 4000})
    small = event(id="trk_shared")

    writer = GroupWriter(WriterConfig(tmp_path, "full", 1 << 30, 3600, 1 << 27))
    writer.spool.budget_bytes = summary(DataDir(tmp_path)).used_bytes + 1000  # small, not big
    try:
        writer.commit(
            [
                Events.of([("trk_shared", TARGET, orjson.dumps(big))]),
                Events.of([("trk_shared", TARGET, orjson.dumps(small))]),
            ]
        )
        outcome: list[int] | QueueFull = []
    except QueueFull as exc:
        outcome = exc
    finally:
        writer.close()

    stored = ids(stored_events(tmp_path))
    # The group is refused as a whole: nothing stored, both requests told 503.
    assert isinstance(outcome, QueueFull), outcome
    assert stored == []


def test_a_failed_write_of_seen_ids_still_answers_and_the_server_keeps_serving(
    server: Server,
) -> None:
    """The events are committed before their ids are remembered; if remembering fails the
    answer is still 200 (they are durable), and the next requests are served as usual."""
    seen_ids = sqlite3.connect(server.data_dir / SEEN_IDS_FILE, isolation_level=None)
    seen_ids.execute(
        "CREATE TRIGGER refuse_ids BEFORE INSERT ON seen_ids_1"  # its first generation
        " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    try:
        answer = httpx.post(
            f"{server.url}/v1/events",
            json={"events": [event(id="trk_unremembered")]},
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=10,
        )
        assert answer.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    finally:
        seen_ids.execute("DROP TRIGGER refuse_ids")
        seen_ids.close()

    assert server.post({"events": [event(id="trk_after")]}).json() == {
        "accepted": 1,
        "written": 1,
        "pipelineWritten": 1,
    }
    assert ids(server.stored()) == ["trk_unremembered", "trk_after"]


def test_an_unreadable_seen_ids_store_answers_503_and_the_server_recovers(
    server: Server,
) -> None:
    seen_ids = sqlite3.connect(server.data_dir / SEEN_IDS_FILE, isolation_level=None)
    seen_ids.execute("ALTER TABLE seen_ids_1 RENAME TO seen_ids_away")  # its first generation
    try:
        refused = httpx.post(
            f"{server.url}/v1/events",
            json={"events": [event(id="trk_during")]},
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=10,
        )
        assert_unavailable(refused)
    finally:
        seen_ids.execute("ALTER TABLE seen_ids_away RENAME TO seen_ids_1")
        seen_ids.close()

    assert server.post({"events": [event(id="trk_during")]}).json() == {
        "accepted": 1,
        "written": 1,
        "pipelineWritten": 1,
    }
    assert ids(server.stored()) == ["trk_during"]


# --- disk budget --------------------------------------------------------------------------


def test_a_full_disk_budget_answers_503_drops_nothing_and_recovers_when_space_is_freed(
    start_server: Callable[..., Server],
) -> None:
    budget = 200_000
    server = start_server(COLLECTOR_DISK_BUDGET_BYTES=str(budget))
    answered: list[str] = []
    for n in range(1000):  # ~20 batches fill the budget; the bound only stops a broken test
        body = batch(f"b{n}")
        answer = server.post(body)
        if answer.status_code != 200:
            break
        assert answer.json() == {"accepted": BATCH, "written": BATCH, "pipelineWritten": BATCH}
        answered += ids(body["events"])
    else:
        pytest.fail("the disk budget was never reached")
    refused = ids(body["events"])

    assert answered, "the budget refused the very first batch"
    assert_unavailable(answer)
    stored = ids(server.stored())
    assert sorted(stored) == sorted(answered)  # everything answered 200 is kept ...
    assert not set(refused) & set(stored)  # ... and nothing of the refused request
    assert_unavailable(httpx.get(f"{server.url}/readyz"))

    # The forwarder delivers everything and frees the space, while the server runs.
    forwarder = Spool(DataDir(server.data_dir), budget_bytes=budget, resume_in_flight=True)
    try:
        while (taken := forwarder.take()) is not None:
            forwarder.ack([taken.id], {})
    finally:
        forwarder.close()

    assert httpx.get(f"{server.url}/readyz").status_code == 200
    retried = server.post(body)  # the SDK's retry of the refused request
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"accepted": BATCH, "written": BATCH, "pipelineWritten": BATCH}
    assert sorted(ids(server.stored())) == sorted(refused)


def test_the_other_databases_count_against_the_disk_budget(
    start_server: Callable[..., Server],
) -> None:
    # Side files once grew outside the budget until the disk was full with an empty queue.
    budget = 1_000_000
    server = start_server(COLLECTOR_DISK_BUDGET_BYTES=str(budget))
    letters = DeadLetters.writer(DataDir(server.data_dir))
    try:
        letters.add([orjson.dumps(event(id=f"dead-{n}", note="x" * 1000)) for n in range(500)], "t")
    finally:
        letters.close()
    side = DataDir(server.data_dir).side_bytes()
    assert side > budget // 2

    for n in range(1000):  # the bound only stops a broken test
        answer = server.post(batch(f"b{n}"))
        if answer.status_code != 200:
            break
    else:
        pytest.fail("the disk budget was never reached")

    assert_unavailable(answer)
    assert "disk budget" in answer.json()["message"]
    queue_used = query(
        server.data_dir / QUEUE_FILE,
        "SELECT (p.page_count - f.freelist_count) * s.page_size"
        " FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s",
    )[0][0]
    assert queue_used + DataDir(server.data_dir).side_bytes() <= budget
    status = json.loads(
        run_cli("status", "--json", data_dir=server.data_dir, env=server.env).stdout
    )
    assert status["queue"]["disk_budget_used"] > 0.9


def test_seen_ids_stay_within_dedup_max_bytes_and_the_newest_are_kept(
    start_server: Callable[..., Server],
) -> None:
    # 40,000 ids of 36 characters took 3.2 MB of seen-ids.db unbounded.
    bound = 1024 * 1024
    server = start_server(COLLECTOR_DEDUP_MAX_BYTES=str(bound))
    bodies = [
        {"events": [event(id=str(uuid.UUID(int=n * 1000 + i))) for i in range(1000)]}
        for n in range(40)
    ]
    for body in bodies:
        answer = server.post(body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["written"] == 1000

    size = (server.data_dir / SEEN_IDS_FILE).stat().st_size
    print(f"\nseen-ids.db: {size:,} bytes for 40,000 ids with dedup_max_bytes {bound:,}")
    assert size <= bound + 300_000, size  # the bound, and one commit's ids past it
    again = server.post(bodies[-1])  # an SDK's retry of the last request
    assert again.json()["written"] == 0, again.text
    assert "seen-ids.db reached its bound" in server.log()
    assert len(server.stored()) == 40_000


# --- crashes ------------------------------------------------------------------------------


def post_until_the_server_dies(
    server: Server, prefix: str, answered: list[str], unexpected: list[str], first: threading.Event
) -> None:
    """Post unique batches back to back; record the ids of every batch answered 200."""
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        for n in range(1_000_000):
            body = batch(f"{prefix}-{n}")
            try:
                answer = client.post("/v1/events/batch", json=body)
            except httpx.TransportError:
                return  # killed
            if answer.status_code == 200:
                answered.extend(ids(body["events"]))
                first.set()
            else:
                unexpected.append(f"{answer.status_code} {answer.text}")


def posting_clients(server: Server, prefix: str, answered: list[str]) -> Callable[[], list[str]]:
    """Start CLIENTS clients posting unique batches until the server dies (ids answered 200
    go to `answered`), and return once one batch was answered. The function returned waits
    for the clients (call it after the kill) and returns the answers that were not 200."""
    unexpected: list[str] = []
    first = threading.Event()
    clients = [
        threading.Thread(
            target=post_until_the_server_dies,
            args=(server, f"{prefix}c{c}", answered, unexpected, first),
        )
        for c in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    assert first.wait(timeout=20), f"{prefix}: no batch was answered\n{server.log()}"

    def join() -> list[str]:
        for client in clients:
            client.join(timeout=30)
        return unexpected

    return join


def test_every_answered_event_survives_sigkill(server: Server) -> None:
    answered: list[str] = []
    for round_ in range(CRASH_ROUNDS):
        join = posting_clients(server, f"r{round_}", answered)
        time.sleep(random.uniform(0.0, 0.3))  # the kill lands at a random point of the stream
        server.kill()
        assert not join()

        queue = sqlite3.connect(server.data_dir / QUEUE_FILE)
        try:
            assert queue.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            queue.close()
        server.start()
        stored = set(ids(server.stored()))
        missing = [eid for eid in answered if eid not in stored]
        assert not missing, f"round {round_}: {len(missing)} answered events lost"


# --- group commit, sync, in-flight rows ---------------------------------------------------


def test_concurrent_requests_share_commits(server: Server) -> None:
    requests = 64
    bodies = [{"events": [event(id=f"trk_group_{n}")]} for n in range(requests)]

    answers = post_all_at_once(server, bodies)

    assert [a.status_code for a in answers] == [200] * requests
    assert all(a.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1} for a in answers)
    assert sorted(ids(server.stored())) == sorted(b["events"][0]["id"] for b in bodies)
    [(rows,)] = query(server.data_dir / QUEUE_FILE, f"SELECT COUNT(*) FROM {QUEUE_TABLE}")
    assert rows < requests


def test_sync_normal_accepts_and_stores(start_server: Callable[..., Server]) -> None:
    server = start_server(COLLECTOR_SYNC="normal")

    assert server.post({"events": [event(id="trk_normal")]}).json() == {
        "accepted": 1,
        "written": 1,
        "pipelineWritten": 1,
    }
    assert ids(server.stored()) == ["trk_normal"]
    assert "sync=normal" in server.log()


def test_an_invalid_sync_setting_stops_serve_with_a_message_naming_it(tmp_path: Path) -> None:
    done = run_cli(
        "serve",
        data_dir=tmp_path / "data",
        env={"COLLECTOR_SYNC": "bogus", "COLLECTOR_PORT": str(free_port())},
    )

    assert done.returncode != 0
    assert "sync" in done.stderr
    assert "bogus" in done.stderr or "'full' or 'normal'" in done.stderr


def test_server_restart_does_not_resume_in_flight_rows(server: Server) -> None:
    assert server.post({"events": [event(id="trk_in_flight")]}).status_code == 200
    forwarder = Spool(DataDir(server.data_dir), budget_bytes=1 << 30, resume_in_flight=True)
    try:
        taken = forwarder.take()
        assert taken is not None
        row_id = taken.id
        assert [
            rows.parse(raw)["id"] for _, raw_events in taken.groups() for raw in raw_events
        ] == ["trk_in_flight"]

        server.stop()
        server.start()

        [(status,)] = query(
            server.data_dir / QUEUE_FILE, f"SELECT status FROM {QUEUE_TABLE} WHERE _id = {row_id}"
        )
        assert status != IN_FLIGHT  # taken rows are not marked (Spool.take), nor resumed
        assert server.post({"events": [event(id="trk_after_restart")]}).status_code == 200
        again = forwarder.take()
        assert again is not None
        assert again.id != row_id
        assert [
            rows.parse(raw)["id"] for _, raw_events in again.groups() for raw in raw_events
        ] == ["trk_after_restart"]
    finally:
        forwarder.close()


def test_a_retry_is_found_while_the_ids_of_its_first_commit_are_still_being_remembered(
    tmp_path: Path,
) -> None:
    """A group's ids are remembered in the writer's after-commit thread; the next groups
    must find them meanwhile (held in memory), and the file once they are."""
    writer = GroupWriter(WriterConfig(tmp_path, "full", 1 << 30, 3600, 1 << 27))
    hold = threading.Event()
    # The after-commit thread is busy (for 10 s at most): nothing is remembered meanwhile.
    busy = writer._after.submit(hold.wait, 10)
    sent = [(f"trk_{n}", TARGET, orjson.dumps(event(id=f"trk_{n}"))) for n in range(3)]
    try:
        assert writer.commit([Events.of(sent)]) == [[]]
        assert writer.commit([Events.of(sent[1:])]) == [[0, 1]]  # found in memory ...
        assert not busy.done()  # ... without waiting for the ids to be remembered
        hold.set()
        writer._after.submit(lambda: None).result()  # remembered now
        assert writer.commit([Events.of(sent[:1])]) == [[0]]  # found in the file
    finally:
        hold.set()
        writer.close()
    assert [e["id"] for e in stored_events(tmp_path)] == ["trk_0", "trk_1", "trk_2"]


def test_taking_and_acking_rows_keeps_nothing_in_memory(tmp_path: Path) -> None:
    """persist-queue caches every row `get` returns; the forwarder must not keep them all."""
    writer = GroupWriter(WriterConfig(tmp_path, "full", 1 << 30, 3600, 1 << 27))
    try:
        for n in range(5):
            writer.commit([Events.of([(f"trk_{n}", TARGET, orjson.dumps(event(id=f"trk_{n}")))])])
    finally:
        writer.close()
    forwarder = Spool(DataDir(tmp_path), budget_bytes=1 << 30, resume_in_flight=True)
    try:
        taken = [row for row in iter(forwarder.take, None)]
        forwarder.ack([row.id for row in taken], {})
        assert len(taken) == 5
        assert forwarder._queue._unack_cache == {}
    finally:
        forwarder.close()
