"""The forwarder, end to end: a real `collector serve`, a real `collector forward` and a real
HTTP upstream on 127.0.0.1 (`tests/upstream.py`), nothing mocked.

Clients post to the server; the forwarder (a subprocess started per test with env vars
pointing at the upstream) drains the queue; the tests read what the upstream received, what
is left in the queue file, the dead-letter store (through `collector dlq`, or read directly
where the command itself is not under test) and the forwarder's `forwarder.json` and log.
Retry delays are shrunk (0.05 s, capped at 0.5 s) so a retry takes a fraction of a second;
waits are on conditions, never blind.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import http.server
import json
import math
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from collector.store import heartbeats
from collector.store.datadir import QUEUE as QUEUE_FILE
from collector.store.datadir import DataDir
from collector.store.deadletters import DeadLetters

from conftest import (
    COLLECTOR,
    ROOT,
    Server,
    dlq_list_json,
    event,
    run_cli,
    status_json,
    stored_bytes,
    terminate,
)
from upstream import Received, Upstream

QUEUE_TABLE = "ack_queue_events"  # persist-queue's table for the queue named "events"
IN_FLIGHT = 2  # persist-queue's status of a row its `get` took (Spool.take does not mark)
UPSTREAM_KEY = "traffical_sk_upstream"
WAIT_S = 10.0
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Fast retries and a short stop deadline, so the tests take seconds, not minutes.
FAST = {
    "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
    "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
    "COLLECTOR_STOP_TIMEOUT_SECONDS": "2",
    "COLLECTOR_FORWARD_TIMEOUT_SECONDS": "5",
}


# --- helpers ----------------------------------------------------------------------------


class RecordingUpstream(Upstream):
    """`Upstream` that also notes when each request was decided and the most ever in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []  # time.monotonic() of each entry of `requests`
        self.wall_times: list[float] = []  # and time.time()
        self.max_in_flight = 0
        self._handling = 0

    def _handle(self, path: str, headers: dict[str, str], raw: bytes, closing: Any) -> Any:
        with self._cond:
            self._handling += 1
            self.max_in_flight = max(self.max_in_flight, self._handling)
        try:
            return super()._handle(path, headers, raw, closing)
        finally:
            with self._cond:
                self._handling -= 1

    def _record(
        self,
        path: str,
        headers: dict[str, str],
        events: list[Any],
        status: int,
        page: bool = False,
    ) -> None:
        super()._record(path, headers, events, status, page)
        self.times.append(time.monotonic())
        self.wall_times.append(time.time())

    def clear(self) -> None:
        with self._cond:
            super().clear()
            self.times.clear()
            self.wall_times.clear()

    def timed(self) -> list[tuple[float, Received]]:
        with self._cond:
            return list(zip(self.times, self._requests, strict=True))


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as running:
        yield running


def to(upstream: Upstream, key: str = UPSTREAM_KEY) -> dict[str, str]:
    """The env vars that point a forwarder at `upstream` with `key`."""
    return {"COLLECTOR_UPSTREAM_URL": upstream.url, "COLLECTOR_UPSTREAM_KEY": key}


@dataclass
class Forwarder:
    """A running `collector forward` process; its stdout and stderr go to `log_path`."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        return heartbeats.read(DataDir(self.data_dir).forwarder_state) or {}

    def wait_for_state(
        self, upstream: str, timeout: float = WAIT_S, **fields: Any
    ) -> dict[str, Any]:
        """The state file once this process wrote `upstream` there, and `fields` if given.

        The state is written on each change of `upstream` and its counts every two seconds.
        """
        wanted = {"upstream": upstream, "pid": self.process.pid, **fields}
        seen: dict[str, Any] = {}

        def matches() -> bool:
            seen.update(self.state())
            return all(seen.get(name) == value for name, value in wanted.items())

        wait_for(matches, f"forwarder state {wanted}", timeout, lambda: f"{seen}\n{self.log()}")
        return seen

    def levels_of(self, text: str) -> set[str]:
        """The levels of the log lines holding `text` (JSON lines, or plain text ones)."""
        levels = set()
        for line in self.log().splitlines():
            if text not in line:
                continue
            try:
                levels.add(str(json.loads(line)["level"]).lower())
            except (ValueError, KeyError, TypeError):
                levels.update(word.lower() for word in line.split() if word in LEVELS)
        return levels

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and the exit status once it stopped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"forwarder did not stop within {timeout} s:\n{self.log()}"
            ) from None


@pytest.fixture
def start_forwarder(tmp_path: Path) -> Iterator[Callable[..., Forwarder]]:
    """Factory: start_forwarder(data_dir, *args, **env) runs `collector forward *args`."""
    started: list[Forwarder] = []

    def start(data_dir: Path, *args: str, **env: str) -> Forwarder:
        log_path = tmp_path / f"forwarder{len(started)}.log"
        full_env = {**os.environ, "COLLECTOR_DATA_DIR": str(data_dir), **FAST, **env}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*COLLECTOR, "forward", *args],
                cwd=ROOT,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        forwarder = Forwarder(process, data_dir, log_path)
        started.append(forwarder)
        return forwarder

    yield start
    for forwarder in started:
        terminate(forwarder.process)


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float = WAIT_S,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Poll `condition` (for state outside the test process: files, the queue) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(0.02)


def wait_until_drained(server: Server, forwarder: Forwarder) -> None:
    wait_for(lambda: server.stored() == [], "an empty queue", detail=forwarder.log)


def post(server: Server, events: list[dict[str, Any]]) -> None:
    answer = server.post({"events": events})
    assert answer.status_code == 200, answer.text
    assert answer.json()["written"] == len(events), answer.text


def numbered(prefix: str, count: int, **fields: Any) -> list[dict[str, Any]]:
    return [event(id=f"{prefix}-{i:04d}", **fields) for i in range(count)]


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events]


def dead_letters(data_dir: Path) -> list[dict[str, Any]]:
    """The same, read in this process (a CLI run costs a few tenths of a second)."""
    store = DeadLetters.reader(DataDir(data_dir))
    try:
        return [letter.summary() for letter in store.letters()]
    finally:
        store.close()


def same(sent: Any, received: Any) -> bool:
    """Equal field by field, in order and in type (1.0 is not 1, true is not 1)."""
    return json.dumps(sent) == json.dumps(received)


def queue_statuses(data_dir: Path) -> list[int]:
    conn = sqlite3.connect(f"file:{data_dir / QUEUE_FILE}?mode=ro", uri=True)
    try:
        return [status for (status,) in conn.execute(f"SELECT status FROM {QUEUE_TABLE}")]
    finally:
        conn.close()


# --- events arrive unchanged, in well-formed batches ------------------------------------


def test_events_arrive_field_by_field_as_the_client_sent_them(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = [
        event(id="plain"),
        event(
            "exposure",
            id="rich",
            unknownField={"nested": {"deeper": [1, 1.0, -0.0, 0.1, 1e300, None, True]}},
            context={"page": "/ünïcødé", "emoji": "🎉 日本語", "escapes": 'q"b\\n\n\t\u2028'},
            value=1.0,
            count=1,
            big=2**63 - 1,
            negative=-(2**63),
            newerSdkField=[{"a": []}, {}],
        ),
        event("decision", id="numbers", unitKey=42, value=0, values={"a": 1.5, "b": 2}),
    ]
    post(server, sent)
    # Some SDKs emit bare NaN/Infinity; the server stores them as null, and so they arrive.
    raw = (
        b'{"events":[{"type":"track","orgId":"org_test","projectId":"proj_test",'
        b'"env":"production","unitKey":"u","timestamp":"2026-05-21T10:30:00Z",'
        b'"event":"e","id":"nan","value":NaN,"values":{"x":Infinity,"y":-Infinity,"z":1}}]}'
    )
    answer = server.post(content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    expected = [
        *sent,
        {
            "type": "track",
            "orgId": "org_test",
            "projectId": "proj_test",
            "env": "production",
            "unitKey": "u",
            "timestamp": "2026-05-21T10:30:00Z",
            "event": "e",
            "id": "nan",
            "value": None,
            "values": {"x": None, "y": None, "z": 1},
        },
    ]

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    received = {e["id"]: e for e in upstream.wait_for_events(len(expected))}
    wait_until_drained(server, forwarder)

    assert sorted(received) == sorted(e["id"] for e in expected)
    for original in expected:
        assert same(original, received[original["id"]]), (original, received[original["id"]])
    assert isinstance(received["rich"]["value"], float)
    assert isinstance(received["rich"]["count"], int)
    for request in upstream.requests:
        assert request.accepted, request
        assert request.headers["content-encoding"] == "gzip"
        assert request.headers["content-type"] == "application/json"
        assert request.key == UPSTREAM_KEY
        assert request.batch_id
        assert request.path == "/v1/events"
    forwarder.wait_for_state("ok", forwarded=len(expected))


def corpus() -> list[bytes]:
    r"""Events as clients write them, each a valid track event, holding what a re-encoder
    would change: PHP's `\/` and `\uXXXX` escapes, number forms (`1.0e+21`, `-0`, `1E2`,
    `0.10`), integers past 64 bits, a lone surrogate (a string cut inside an emoji), a
    surrogate pair written as escapes, 300-deep nesting, keys out of order and repeated,
    whitespace inside strings and between tokens."""
    head = (
        b'"type":"track","orgId":"org_test","projectId":"proj_test","env":"production",'
        b'"unitKey":"u","timestamp":"2026-05-21T10:30:00Z","event":"e"'
    )
    bodies = [
        b'"id":"php","url":"https:\\/\\/shop.example\\/p?q=1","name":"\\u30e6\\u30fc\\u30b6"',
        b'"id":"numbers","value":1.0e+21,"values":{"a":-0,"b":1E2,"c":0.10,"d":-0.0e-0}',
        b'"id":"big","n":123456789012345678901234567890,"m":-99999999999999999999999',
        b'"id":"lone","title":"cut \\ud83d","pair":"\\ud83d\\ude00","low":"\\udc00!"',
        b'"id":"deep","deep":' + b"[" * 300 + b'{"x":1}' + b"]" * 300,
        b'"z":1,"id":"order","a":2,"a":3',
        b'"id":"spaces","s":"  two  spaces\\t\\n tab  ",  "after" :\n\t [ 1 , 2 ]  ',
    ]
    return [b"{" + body + b"," + head + b"}" for body in bodies]


def test_events_are_stored_and_forwarded_byte_for_byte_as_the_client_sent_them(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = corpus()
    body = b'{"events": [\n  ' + b",\n  ".join(sent) + b"\n]}"

    answer = server.post(content=body, headers={"Content-Type": "application/json"})

    assert answer.status_code == 200, answer.text
    count = len(sent)
    assert answer.json() == {"accepted": count, "written": count, "pipelineWritten": count}
    assert stored_bytes(server.data_dir) == sent
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(count)
    wait_until_drained(server, forwarder)
    (request,) = upstream.accepted()
    assert request.body == b'{"events":[' + b",".join(sent) + b"]}"


def test_a_1490_event_request_of_the_browser_sdk_is_taken_whole_and_forwarded_in_batches(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # A browser SDK with `eventMaxQueueSize: 2000` flushed 1490 events in one request.
    sent = numbered("browser", 1490)
    post(server, sent)

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    received = upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)

    assert sorted(e["id"] for e in received) == ids(sent)
    assert sorted(len(r.events) for r in upstream.accepted()) == [490, 1000]


def test_batches_hold_at_most_1000_events_of_the_projects_that_share_a_key(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    scopes = [("proj_a", "production")] * 6 + [("proj_a", "staging"), ("proj_b", "production")]
    sent: list[dict[str, Any]] = []
    for round_ in range(3):
        body = [
            event(id=f"r{round_}-{i}", projectId=project, env=env)
            for i, (project, env) in enumerate(scopes * 100)
        ]
        post(server, body)
        sent += body

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)

    assert Counter(upstream.event_ids()) == Counter(ids(sent))  # each once, none lost
    sizes = [len(request.events) for request in upstream.requests]
    assert all(request.accepted for request in upstream.requests)
    assert max(sizes) == 1000  # rows are combined up to the limit, never past it
    assert len(sizes) <= 4  # 2,400 events of three targets and one key: not one per target
    assert max(len({(e["projectId"], e["env"]) for e in r.events}) for r in upstream.requests) == 3
    assert len({r.batch_id for r in upstream.requests}) == len(upstream.requests)


def test_20000_projects_sharing_a_key_cost_as_few_requests_as_one(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # One client naming many projects once cost a request (and a linger) per project: 5,357
    # of these 20,000 events were delivered in 120 s.
    total = 20_000
    for start in range(0, total, 1000):
        post(server, [event(id=f"p{n}", projectId=f"proj_{n}") for n in range(start, start + 1000)])

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(total, timeout=60)
    wait_until_drained(server, forwarder)

    assert Counter(upstream.event_ids()) == Counter(f"p{n}" for n in range(total))
    # As for one project: full batches of 1000, and at most a few partly filled ones that
    # the linger sent while rows were still being read.
    assert len(upstream.requests) <= 2 * total // 1000, len(upstream.requests)


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_backlog_of_9_mb_rows_is_forwarded_in_bounded_memory(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    tmp_path: Path,
) -> None:
    """The feeder stops taking rows past MAX_BUFFERED_BYTES (64 MiB) of events held. With
    a key per project, each project's batch fills on its own (up to forward_batch_bytes,
    4 MiB): 64 of them held 256 MiB before any was sent, without that bound."""
    projects = 64
    config = tmp_path / "collector.toml"
    config.write_text(
        f'upstream_url = "{upstream.url}"\n'
        + "".join(
            f'[[upstream_keys]]\nproject = "proj_{p}"\nkey = "key-{p}"\n' for p in range(projects)
        )
    )
    idle_forwarder = start_forwarder(server.data_dir, "--config", str(config))
    idle_forwarder.wait_for_state("ok")
    idle = peak_rss(idle_forwarder.process.pid)
    assert idle_forwarder.stop() == 0
    # Events of 100 kB: far fewer than MAX_BUFFERED_EVENTS (20,000) fill the buffer.
    one = json.dumps(event(id="x", projectId="P", properties={"blob": "b" * 100_000})).encode()
    count = (9 * 1024 * 1024) // (len(one) + 1)
    rows = 32
    for n in range(rows):  # 288 MiB of events, the projects' in turn
        events = b",".join(
            one.replace(b'"x"', b'"big-%d-%d"' % (n, i)).replace(
                b'"P"', b'"proj_%d"' % ((n * count + i) % projects)
            )
            for i in range(count)
        )
        body = b'{"events":[' + events + b"]}"
        answer = server.post(content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text

    forwarder = start_forwarder(server.data_dir, "--config", str(config))
    upstream.wait_for_events(rows * count, timeout=120)
    wait_until_drained(server, forwarder)
    peak = peak_rss(forwarder.process.pid)

    print(f"\nforwarder peak RSS {peak >> 20} MiB for {rows} rows of 9 MiB (idle {idle >> 20} MiB)")
    assert len(set(upstream.event_ids())) == rows * count
    # The buffer (64 MiB), and the row being read and the batches on their way out (body,
    # gzip, in flight): measured 204 MiB (idle 51); without the buffer's bound, 380.
    assert peak < 2 * idle + 64 * 1024 * 1024 + 96 * 1024 * 1024, (peak, idle)


def test_a_key_restricted_to_one_project_still_delivers_that_projects_events(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # The one configured key is valid only for proj_a: the upstream refuses (403) a batch
    # that also holds proj_b's events, which must not hold back proj_a's.
    upstream.require_keys({("proj_a", "production"): UPSTREAM_KEY})
    sent_a = [event(id=f"a{n}", projectId="proj_a") for n in range(30)]
    sent_b = [event(id=f"b{n}", projectId="proj_b") for n in range(30)]
    post(server, sent_a)
    post(server, sent_b)  # another row: read into the same batch, since the key is shared

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(len(sent_a))
    state = forwarder.wait_for_state("key_rejected")

    assert Counter(upstream.event_ids()) == Counter(ids(sent_a))
    assert "proj_b" in state["message"] and "HTTP 403" in state["message"]
    assert dead_letters(server.data_dir) == []
    assert forwarder.stop() == 0
    assert sorted(ids(server.stored())) == sorted(ids(sent_b))  # kept, to send once fixed


def test_request_bodies_stay_within_forward_batch_bytes(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("bytes", 95)
    size = len(orjson.dumps(sent[0]))
    assert {len(orjson.dumps(e)) for e in sent} == {size}
    # Ten events and their commas fit with a few bytes to spare, but not with the envelope.
    limit = 10 * (size + 1) + 5
    post(server, sent)

    forwarder = start_forwarder(
        server.data_dir, **to(upstream), COLLECTOR_FORWARD_BATCH_BYTES=str(limit)
    )
    upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)

    bodies = [
        b'{"events":[' + b",".join(orjson.dumps(e) for e in r.events) + b"]}"
        for r in upstream.requests
    ]
    assert max(len(body) for body in bodies) <= limit
    assert len(bodies) >= 10
    assert Counter(upstream.event_ids()) == Counter(ids(sent))


# --- retries ----------------------------------------------------------------------------


def assert_one_batch_retried(upstream: RecordingUpstream, sent: list[dict[str, Any]]) -> None:
    """Every request carried the same batch (id and events), and the last one was accepted."""
    requests = upstream.requests
    assert len(requests) >= 2, upstream.summary()
    assert {r.batch_id for r in requests} == {requests[0].batch_id}
    for request in requests:
        assert ids(request.events) == ids(sent)
    assert requests[-1].accepted
    assert not any(r.accepted for r in requests[:-1])


def test_retry_after_in_seconds_or_as_a_date_is_honoured_and_the_batch_id_kept(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # Retry-After is honoured up to retry_max_seconds: here above what these cases ask.
    forwarder = start_forwarder(server.data_dir, COLLECTOR_RETRY_MAX_SECONDS="5", **to(upstream))
    forwarder.wait_for_state("ok")
    for case, (status, retry_after) in enumerate([(503, "1"), (429, "1"), (503, "date")]):
        upstream.clear()
        not_before = 0.0
        if retry_after == "date":  # an HTTP date has whole seconds: 2 to 3 s from now
            not_before = math.ceil(time.time()) + 2
            retry_after = email.utils.formatdate(not_before, usegmt=True)
        upstream.fail(status, retry_after=retry_after, times=1)
        sent = numbered(f"after{case}", 5)
        post(server, sent)
        upstream.wait_for_events(len(sent))
        wait_until_drained(server, forwarder)

        assert_one_batch_retried(upstream, sent)
        (first, refused), (second, _) = upstream.timed()[:2]
        assert refused.status == status
        if not_before:  # not before the date (the backoff alone would retry within 0.05 s)
            first_at, second_at = upstream.wall_times[:2]
            assert first_at < not_before - 0.5, "the first attempt came too late to tell"
            assert second_at >= not_before - 0.02, (first_at, not_before, second_at)
        else:  # not before a second (the backoff alone would retry within 0.05 s)
            assert second - first >= 0.95, (status, retry_after, second - first)


@pytest.mark.parametrize("asked", ["999999999", "Fri, 01 Jan 2300 00:00:00 GMT"])
def test_a_retry_after_of_years_is_asked_again_at_retry_max_seconds(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    asked: str,
) -> None:
    forwarder = start_forwarder(server.data_dir, **to(upstream))  # retry_max_seconds 0.5
    forwarder.wait_for_state("ok")
    upstream.fail(503, retry_after=asked, times=1)
    sent = numbered("years", 5)

    post(server, sent)

    upstream.wait_for_events(len(sent))  # within seconds, not years
    assert_one_batch_retried(upstream, sent)


def test_a_2xx_html_page_is_no_delivery_the_batch_is_retried_and_the_state_says_why(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """A proxy or captive portal answering 200 with its page never passed the events on:
    they are sent again, and the state (so status) says what answered."""
    page = b"<html><head><title>Sign in to Hotel Wi-Fi</title></head><body>...</body></html>"
    upstream.answer_page(page, times=3)
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    sent = numbered("portal", 5)

    post(server, sent)

    retrying = forwarder.wait_for_state("retrying")
    assert "without the events API's answer" in retrying["message"]
    assert "Sign in to Hotel Wi-Fi" in retrying["message"]
    upstream.wait_for_events(len(sent))
    forwarder.wait_for_state("ok", forwarded=len(sent))  # counted once, when truly delivered
    pages = [r for r in upstream.requests if r.page]
    assert len(pages) == 3
    assert ids(upstream.accepted()[-1].events) == ids(sent)
    assert {r.batch_id for r in upstream.requests} == {upstream.requests[0].batch_id}


def test_an_upstream_error_echoing_the_key_and_the_batch_is_shown_redacted_and_short(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """An upstream (or a proxy) that quotes what it was sent: the key never reaches the
    state file, status or the log, and only the start of the body does."""
    quoted = '{"events": [{"type": "track"}]} ' * 200
    echo = f"refused Authorization: Bearer {UPSTREAM_KEY} ({UPSTREAM_KEY}) for {quoted}"
    upstream.fail(503, times=2, message=echo)
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    sent = numbered("echo", 3)

    post(server, sent)

    retrying = forwarder.wait_for_state("retrying")
    upstream.wait_for_events(len(sent))
    forwarder.wait_for_state("ok")
    status = run_cli("status", "--json", data_dir=server.data_dir).stdout
    for shown in (retrying["message"], forwarder.log(), status):
        assert UPSTREAM_KEY not in shown
    assert "(redacted)" in retrying["message"]
    assert len(retrying["message"]) < 400  # the start of the body, not the batch it quotes


class HugeErrorUpstream(http.server.ThreadingHTTPServer):
    """Answers the first events POST 503 with a `huge`-byte body (streamed: it costs this
    test nothing), then 200 with the API's answer."""

    huge = 512 * 1024 * 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HugeErrorHandler)
        self.answered = 0
        self.delivered: list[Any] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HugeErrorHandler(http.server.BaseHTTPRequestHandler):
    server: HugeErrorUpstream

    def do_POST(self) -> None:
        body = gzip.decompress(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.answered += 1
        if self.server.answered == 1:
            self.send_response(503)
            self.send_header("Content-Length", str(self.server.huge))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            with contextlib.suppress(ConnectionError):
                for _ in range(self.server.huge // len(chunk)):
                    self.wfile.write(chunk)
            return
        events = json.loads(body)["events"]
        self.server.delivered.extend(events)
        answer = json.dumps({"accepted": len(events), "written": len(events)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_huge_error_body_is_read_only_in_its_start(
    server: Server, start_forwarder: Callable[..., Forwarder]
) -> None:
    """512 MiB of error body: the forwarder reads its first MiB, keeps 200 characters as
    the reason, and retries; its memory stays that of a forwarder (it took 5 GB for a
    1 GiB body when answers were read whole)."""
    upstream = HugeErrorUpstream()
    forwarder = start_forwarder(
        server.data_dir,
        COLLECTOR_UPSTREAM_URL=upstream.url,
        COLLECTOR_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    sent = numbered("huge", 5)
    try:
        post(server, sent)
        wait_for(lambda: len(upstream.delivered) == len(sent), "the retry delivered")

        assert sorted(e["id"] for e in upstream.delivered) == ids(sent)
        assert peak_rss_bytes(forwarder.process.pid) < 200 * 1024 * 1024
        assert "HTTP 503: " + "x" * 190 in forwarder.log()
    finally:
        upstream.shutdown()


def test_server_errors_and_timeouts_are_retried_with_the_same_batch_id(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    forwarder.wait_for_state("ok")
    for status in [500, 502, 504, 408]:
        upstream.clear()
        upstream.fail(status, times=3)
        sent = numbered(f"status{status}", 20)
        post(server, sent)
        upstream.wait_for_events(len(sent))
        wait_until_drained(server, forwarder)

        assert_one_batch_retried(upstream, sent)
        assert [r.status for r in upstream.requests] == [status, status, status, 200]
    assert dead_letters(server.data_dir) == []
    forwarder.wait_for_state("ok", retried=12)


def test_an_unreachable_upstream_is_retried_until_it_is_back(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("down", 30)
    post(server, sent)
    upstream.down()

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    state = forwarder.wait_for_state("retrying")
    assert "unreachable" in state["message"]
    assert state["outage_since"] is not None
    assert len(server.stored()) == len(sent)
    upstream.up()

    upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)
    assert Counter(upstream.event_ids()) == Counter(ids(sent))
    state = forwarder.wait_for_state("ok")
    assert state["outage_since"] is None
    assert state["retried"] >= 1


def test_a_slow_upstream_times_out_and_is_retried(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("slow", 10)
    post(server, sent)
    upstream.slow(3)

    forwarder = start_forwarder(
        server.data_dir, **to(upstream), COLLECTOR_FORWARD_TIMEOUT_SECONDS="0.3"
    )
    state = forwarder.wait_for_state("retrying")
    assert "timed out" in state["message"]
    assert len(server.stored()) == len(sent)  # not acked while unanswered
    upstream.ok()

    wait_for(
        lambda: any(r.accepted and ids(r.events) == ids(sent) for r in upstream.requests),
        "a fast answer",
        detail=upstream.summary,
    )
    wait_until_drained(server, forwarder)
    assert "upstream timed out" in forwarder.log()
    # Abandoned slow requests are still held by the upstream; each used the same batch id.
    upstream.down()
    assert {r.batch_id for r in upstream.requests} == {upstream.requests[0].batch_id}


def test_during_an_outage_only_one_request_is_in_flight(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    upstream.fail(503)
    upstream.slow(0.1)  # each refusal takes a while, so overlapping requests would show
    post(server, numbered("first", 5))
    forwarder = start_forwarder(server.data_dir, **to(upstream), COLLECTOR_FORWARD_IN_FLIGHT="4")
    forwarder.wait_for_state("retrying")
    # Five more batches (of 1000 events), so each of the four senders holds one to retry.
    more = numbered("more", 5000)
    post(server, more)
    upstream.wait_until(
        lambda up: len({r.batch_id for r in up._requests}) >= 4 and len(up._requests) >= 12,
        WAIT_S,
        "every sender retrying its batch",
    )

    assert upstream.max_in_flight == 1, upstream.summary()
    assert len(server.stored()) == 5005
    upstream.ok()
    upstream.wait_until(lambda up: {e["id"] for e in up._events} >= set(ids(more)), WAIT_S)
    wait_until_drained(server, forwarder)


# --- rejected events: split, and only the offending ones dead-lettered -----------------


def test_rejected_batches_are_split_until_only_the_bad_events_are_dead_lettered(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    forwarder.wait_for_state("ok")
    bad: dict[str, int] = {}
    for status in [400, 413]:
        upstream.clear()
        sent = numbered(f"split{status}", 100)
        wrong = {f"split{status}-0013", f"split{status}-0077"}
        bad.update(dict.fromkeys(wrong, status))
        upstream.reject_ids(wrong, status=status)
        post(server, sent)
        upstream.wait_for_events(98)
        wait_until_drained(server, forwarder)
        assert Counter(upstream.event_ids()) == Counter(i for i in ids(sent) if i not in wrong)
        assert len(upstream.requests) > 2  # halves of halves, not one event at a time
        assert len(upstream.requests) < 40

    letters = dlq_list_json(server.data_dir)
    assert sorted(letter["event_id"] for letter in letters) == sorted(bad)
    for letter in letters:
        status = bad[letter["event_id"]]
        assert letter["reason"].startswith(f"rejected by upstream: HTTP {status}")
        assert f"event {letter['event_id']} is invalid" in letter["reason"]
        assert (letter["project"], letter["env"], letter["type"]) == (
            "proj_test",
            "production",
            "track",
        )
    forwarder.wait_for_state("ok", forwarded=196, dead_lettered=4)


def test_events_a_2xx_names_as_rejected_are_dead_lettered_and_schema_warnings_counted(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """The Traffical API's schema enforcement in `reject` mode drops events and answers
    200 naming them by index; they were counted as forwarded, and lost."""
    sent = numbered("schema", 50) + numbered("warned", 3, event="signup_v2")
    dropped = {"schema-0007", "schema-0031"}
    upstream.drop_in_200(dropped)
    upstream.warn_schema({"signup_v2"})
    post(server, sent)
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    wait_until_drained(server, forwarder)

    assert Counter(upstream.event_ids()) == Counter(i for i in ids(sent) if i not in dropped)
    letters = dlq_list_json(server.data_dir)
    assert sorted(letter["event_id"] for letter in letters) == sorted(dropped)
    for letter in letters:
        assert letter["reason"] == (
            f"rejected by upstream (HTTP 200): properties: event {letter['event_id']} breaks "
            "its schema"
        )
    forwarder.wait_for_state("ok", forwarded=51, dead_lettered=2, unconfirmed=0)

    def warned() -> bool:
        return bool(status_json(server.data_dir)[1]["upstream_answers"]["schema_warnings"])

    wait_for(warned, "schema warnings counted")
    code, document = status_json(server.data_dir)
    assert document["upstream_answers"] == {
        "unconfirmed": [],
        "schema_warnings": [
            {"project": "proj_test", "env": "production", "event": "signup_v2", "count": 3}
        ],
    }
    assert any("schema warnings" in w and "signup_v2" in w for w in document["warnings"])
    assert code == 0, document["problems"]  # named rejections are dead letters, not problems


@pytest.mark.parametrize("mode", ["count", "dead_letter"])
def test_a_2xx_accepting_fewer_than_sent_without_naming_them_is_never_silent(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    mode: str,
) -> None:
    sent = numbered("quiet", 20)
    upstream.drop_in_200({"quiet-0003", "quiet-0011"}, named=False)
    post(server, sent)
    forwarder = start_forwarder(server.data_dir, **to(upstream), COLLECTOR_UNCONFIRMED_EVENTS=mode)
    wait_until_drained(server, forwarder)

    forwarder.wait_for_state("ok", forwarded=18, unconfirmed=2)
    said = "accepting 18 of 20 events without naming the other 2"
    assert forwarder.levels_of(said) == {"warning"}, forwarder.log()

    def counted() -> bool:
        return bool(status_json(server.data_dir)[1]["upstream_answers"]["unconfirmed"])

    wait_for(counted, "unconfirmed events counted")
    code, document = status_json(server.data_dir)
    assert document["upstream_answers"]["unconfirmed"] == [
        {"project": "proj_test", "env": "production", "events": 2}
    ]
    assert code == 1
    assert any("2 events unconfirmed by the upstream" in p for p in document["problems"])
    letters = dlq_list_json(server.data_dir)
    if mode == "count":
        assert letters == []
    else:  # the whole batch is kept, to replay: nobody knows which 2 were dropped
        assert sorted(letter["event_id"] for letter in letters) == ids(sent)
        assert all(letter["reason"].startswith("unconfirmed: the upstream") for letter in letters)


def test_an_event_too_large_for_the_upstream_alone_is_dead_lettered(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("size", 40)
    sent[17]["padding"] = "x" * 5000
    post(server, sent)
    upstream.too_large_over(4000)

    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(39)
    wait_until_drained(server, forwarder)

    assert Counter(upstream.event_ids()) == Counter(i for i in ids(sent) if i != "size-0017")
    letters = dead_letters(server.data_dir)
    assert [letter["event_id"] for letter in letters] == ["size-0017"]
    assert "HTTP 413" in letters[0]["reason"]


# --- refused keys: stop, keep everything, resume once the key is fixed ------------------


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_keeps_every_event_until_a_restart_with_a_good_key(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    status: int,
) -> None:
    if status == 401:
        upstream.accept_keys({"good"})
    else:  # a valid key, for another project
        upstream.require_keys({("proj_test", "production"): "good", ("proj_x", "dev"): "bad"})
    sent = numbered("key", 50)
    post(server, sent)

    forwarder = start_forwarder(server.data_dir, **to(upstream, key="bad"))
    state = forwarder.wait_for_state("key_rejected")
    assert f"HTTP {status}" in state["message"]
    # It stopped sending: retrying would send again within retry_max_seconds (0.5 s).
    with pytest.raises(AssertionError, match="another request"):
        upstream.wait_until(lambda up: len(up._requests) > 1, 0.6, "another request")
    assert [r.status for r in upstream.requests] == [status]
    assert upstream.events == []
    assert dlq_list_json(server.data_dir) == []
    assert ids(server.stored()) == ids(sent)
    assert forwarder.levels_of("refused the key") == {"error"}
    assert forwarder.stop() == 0
    assert ids(server.stored()) == ids(sent)

    fixed = start_forwarder(server.data_dir, **to(upstream, key="good"))
    upstream.wait_for_events(len(sent))
    wait_until_drained(server, fixed)
    assert Counter(upstream.event_ids()) == Counter(ids(sent))


def test_a_fixed_key_file_is_picked_up_on_sighup(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    tmp_path: Path,
) -> None:
    upstream.accept_keys({"good"})
    key_file = tmp_path / "upstream-key"
    key_file.write_text("bad\n")
    sent = numbered("hup", 20)
    post(server, sent)

    forwarder = start_forwarder(
        server.data_dir,
        COLLECTOR_UPSTREAM_URL=upstream.url,
        COLLECTOR_UPSTREAM_KEY_FILE=str(key_file),
    )
    forwarder.wait_for_state("key_rejected")
    assert upstream.events == []
    key_file.write_text("good\n")
    forwarder.process.send_signal(signal.SIGHUP)

    upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)
    assert forwarder.process.poll() is None  # the same process, resumed
    assert [r.key for r in upstream.requests] == ["bad", "good"]
    assert "upstream keys reloaded" in forwarder.log()


# --- per-project keys -------------------------------------------------------------------


def test_each_project_and_env_is_sent_with_its_own_key(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    tmp_path: Path,
) -> None:
    web_key_file = tmp_path / "web.key"
    web_key_file.write_text("key-web\n")
    config = tmp_path / "collector.toml"
    config.write_text(
        f'upstream_url = "{upstream.url}"\n'
        'upstream_key = "key-default"\n'
        "\n[[upstream_keys]]\n"
        'project = "proj_api"\nkey = "key-api"\n'
        "\n[[upstream_keys]]\n"
        f'project = "proj_web"\nkey_file = "{web_key_file}"\n'
        "\n[[upstream_keys]]\n"
        'project = "proj_api"\nenv = "staging"\nkey = "key-api-staging"\n'
    )
    keys = {
        ("proj_api", "production"): "key-api",
        ("proj_api", "staging"): "key-api-staging",
        ("proj_web", "production"): "key-web",
        ("proj_web", "staging"): "key-web",
        ("proj_other", "production"): "key-default",
    }
    upstream.require_keys(keys)
    # Requests of one (project, env), whose rows the forwarder reads the key off; the same
    # with events naming another project inside (a decoy); and one mixing them all.
    decoy = {"projectId": "proj_other", "env": "production", "note": 'a \\"quote\\"'}
    sent = []
    for project, env in keys:
        clean = [event(id=f"{project}-{env}-{i}", projectId=project, env=env) for i in range(5)]
        decoyed = [
            event(id=f"{project}-{env}-d{i}", projectId=project, env=env, properties=decoy)
            for i in range(5)
        ]
        post(server, clean)
        post(server, decoyed)
        sent += clean + decoyed
    mixed = [
        event(id=f"{project}-{env}-m{i}", projectId=project, env=env)
        for i in range(5)
        for project, env in keys
    ]
    post(server, mixed)
    sent += mixed

    forwarder = start_forwarder(server.data_dir, "--config", str(config))
    upstream.wait_for_events(len(sent))
    wait_until_drained(server, forwarder)

    assert Counter(upstream.event_ids()) == Counter(ids(sent))
    used = {}
    for request in upstream.requests:
        assert request.accepted, request
        for e in request.events:
            used[(e["projectId"], e["env"])] = request.key
    assert used == keys


def test_a_refused_key_halts_only_its_projects_batches_and_resumes_on_sighup(
    server: Server,
    upstream: RecordingUpstream,
    start_forwarder: Callable[..., Forwarder],
    tmp_path: Path,
) -> None:
    """Each refused batch used to hold a sender until the key was fixed: with
    `forward_in_flight` (2) batches of one bad key, every other project stopped too."""
    bad_key_file = tmp_path / "bad.key"
    bad_key_file.write_text("key-bad-wrong\n")
    config = tmp_path / "collector.toml"
    config.write_text(
        f'upstream_url = "{upstream.url}"\nupstream_key = "key-good"\n'
        f'\n[[upstream_keys]]\nproject = "proj_bad"\nkey_file = "{bad_key_file}"\n'
    )
    upstream.require_keys(
        {("proj_good", "production"): "key-good", ("proj_bad", "production"): "key-bad"}
    )
    bad = [event(id=f"bad-{i}", projectId="proj_bad") for i in range(4000)]
    for start in range(0, len(bad), 1000):  # four batches: more than the senders
        post(server, bad[start : start + 1000])
    good = [event(id=f"good-{i}", projectId="proj_good") for i in range(3000)]
    for start in range(0, len(good), 500):
        post(server, good[start : start + 500])

    forwarder = start_forwarder(server.data_dir, "--config", str(config))
    upstream.wait_for_events(len(good))
    assert Counter(upstream.event_ids()) == Counter(ids(good))
    state = forwarder.wait_for_state("key_rejected", forwarded=len(good))
    assert "proj_bad" in state["message"], state
    assert (state["halted"], state["halted_targets"]) == ([["proj_bad", "production"]], 1)
    assert 0 < state["parked_events"] <= len(bad)
    assert len(server.stored()) == len(bad)  # held, none lost

    bad_key_file.write_text("key-bad\n")
    forwarder.process.send_signal(signal.SIGHUP)
    upstream.wait_for_events(len(good) + len(bad))
    wait_until_drained(server, forwarder)
    assert Counter(upstream.event_ids()) == Counter(ids(good) + ids(bad))
    state = forwarder.wait_for_state("ok", forwarded=len(good) + len(bad))
    assert (state["halted"], state["parked_events"]) == ([], 0)


# --- no upstream, old events ------------------------------------------------------------


def test_without_an_upstream_events_stay_queued_and_the_forwarder_says_so(
    server: Server, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("keep", 10)
    post(server, sent)

    forwarder = start_forwarder(server.data_dir)
    state = forwarder.wait_for_state("not_configured")
    assert "events stay queued" in state["message"]
    assert forwarder.levels_of("events stay queued") == {"warning"}
    assert forwarder.process.poll() is None
    assert ids(server.stored()) == ids(sent)
    assert forwarder.stop() == 0
    assert ids(server.stored()) == ids(sent)
    assert dead_letters(server.data_dir) == []


def test_events_past_the_maximum_age_are_still_sent_to_an_upstream_that_takes_them(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """Age alone (a clock stepped forward makes every row look old) dead-letters nothing:
    only delivery tried and failed past the age does."""
    old = numbered("old", 10)
    post(server, old)
    posted = time.time()
    time.sleep(max(0.0, posted + 1.2 - time.time()))  # the events must age past 1 s

    forwarder = start_forwarder(
        server.data_dir, **to(upstream), COLLECTOR_MAX_EVENT_AGE_SECONDS="1"
    )
    upstream.wait_for_events(len(old))
    wait_until_drained(server, forwarder)

    assert sorted(upstream.event_ids()) == ids(old)
    assert dead_letters(server.data_dir) == []


def test_events_that_pass_the_maximum_age_while_retried_are_dead_lettered_too(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """Taken in time, then refused for longer than the maximum age: the batch a sender
    holds is dead-lettered like a row found too old, not retried for ever."""
    upstream.fail(503)
    forwarder = start_forwarder(
        server.data_dir, **to(upstream), COLLECTOR_MAX_EVENT_AGE_SECONDS="2"
    )
    held = numbered("held", 10)
    post(server, held)
    upstream.wait_until(lambda up: len(up.requests) >= 1, WAIT_S, "a first attempt")

    wait_until_drained(server, forwarder)  # within seconds of the 2 s, with retries refused

    letters = dead_letters(server.data_dir)
    assert sorted(letter["event_id"] for letter in letters) == ids(held)
    assert {letter["reason"] for letter in letters} == {"older than the maximum age (2 s)"}
    assert upstream.event_ids() == []  # never delivered
    assert len(upstream.requests) >= 2  # retried while young enough


def test_a_feeder_that_fails_says_so_and_exits_1_to_be_started_again(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    """A row the feeder cannot read (here one written past the server, in no format of
    ours) must not leave a forwarder that takes nothing and reads `ok`."""
    post(server, numbered("before", 5))
    conn = sqlite3.connect(server.data_dir / QUEUE_FILE)
    try:
        with conn:
            conn.execute(
                f"INSERT INTO {QUEUE_TABLE} (data, timestamp, status) VALUES (?, ?, 1)",
                (b"[12,x", time.time()),
            )
    finally:
        conn.close()

    forwarder = start_forwarder(server.data_dir, **to(upstream))

    assert forwarder.process.wait(timeout=WAIT_S) == 1, forwarder.log()
    assert "the feeder failed" in forwarder.log()
    assert forwarder.levels_of("the feeder failed") == {"critical"}
    assert forwarder.state()["message"].startswith("internal error: ValueError")
    conn = sqlite3.connect(f"file:{server.data_dir / QUEUE_FILE}?mode=ro", uri=True)
    try:  # kept, for the next start to try again (and an operator to see)
        assert conn.execute(
            f"SELECT COUNT(*) FROM {QUEUE_TABLE} WHERE data = ?", (b"[12,x",)
        ).fetchone() == (1,)
    finally:
        conn.close()


def stepped_clock(offset: str) -> dict[str, str]:
    """Env vars that run a process with its wall clock stepped by `offset` (libfaketime's
    syntax: "+8d", "-365d"), its monotonic and boot clocks left alone, as a real step of
    the system clock leaves them. Debian's faketime (.ci/run installs it); skipped without
    it unless TEST_PACKAGES=required (CI)."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    if not found:
        missing = "no libfaketime (Debian's faketime) to step a process's wall clock"
        if os.environ.get("TEST_PACKAGES") == "required":
            pytest.fail(f"TEST_PACKAGES=required but {missing}")
        pytest.skip(missing)
    return {"LD_PRELOAD": str(found[0]), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def test_a_wall_clock_stepped_forward_expires_no_fresh_event_while_the_upstream_fails(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # Queued now, then aged by a forwarder whose wall clock reads 8 days later: measured on
    # the wall clock they were all dead-lettered at the first failed attempt.
    upstream.fail(503)
    fresh = numbered("fresh", 50)
    post(server, fresh)
    forwarder = start_forwarder(
        server.data_dir,
        **to(upstream),
        **stepped_clock("+8d"),
        COLLECTOR_MAX_EVENT_AGE_SECONDS=str(24 * 3600),
    )
    upstream.wait_until(lambda up: len(up._requests) >= 5, WAIT_S, "five failed attempts")

    assert dead_letters(server.data_dir) == []
    upstream.ok()
    upstream.wait_for_events(len(fresh))
    wait_until_drained(server, forwarder)
    assert sorted(upstream.event_ids()) == ids(fresh)
    assert dead_letters(server.data_dir) == []


def test_a_wall_clock_stepped_back_keeps_no_old_event_past_the_maximum_age(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # A forwarder whose wall clock reads a year earlier: on the wall clock the events were
    # queued in its future, aged less than nothing, and would be retried for a year.
    upstream.fail(503)
    held = numbered("held", 10)
    post(server, held)
    forwarder = start_forwarder(
        server.data_dir,
        **to(upstream),
        **stepped_clock("-365d"),
        COLLECTOR_MAX_EVENT_AGE_SECONDS="2",
    )

    wait_until_drained(server, forwarder)  # within seconds of the 2 s, with retries refused

    letters = dead_letters(server.data_dir)
    assert sorted(letter["event_id"] for letter in letters) == ids(held)
    assert {letter["reason"] for letter in letters} == {"older than the maximum age (2 s)"}
    assert upstream.event_ids() == []


# --- the dead-letter commands -----------------------------------------------------------


def test_dead_letter_commands_list_show_replay_and_purge(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    sent = numbered("dlq", 10, extra={"nested": ["ü", 1.0]})
    bad = ["dlq-0002", "dlq-0005", "dlq-0008"]
    upstream.reject_ids(bad)
    post(server, sent)
    forwarder = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(7)
    wait_until_drained(server, forwarder)
    data_dir = server.data_dir

    letters = dlq_list_json(data_dir)
    assert [letter["event_id"] for letter in letters] == bad
    assert letters == dead_letters(data_dir)
    table = run_cli("dlq", "list", data_dir=data_dir)
    assert table.returncode == 0, table.stderr
    assert all(event_id in table.stdout for event_id in bad)
    assert "HTTP 400" in table.stdout
    assert "3 dead-lettered events" in table.stdout

    shown = run_cli("dlq", "show", str(letters[1]["id"]), data_dir=data_dir)
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert same(document["event"], sent[5])
    assert document["reason"] == letters[1]["reason"]
    missing = run_cli("dlq", "show", "999999", data_dir=data_dir)
    assert missing.returncode != 0
    assert "no dead letter with id 999999" in missing.stderr

    for wrong in [("dlq", "replay"), ("dlq", "replay", "--all", str(letters[0]["id"]))]:
        refused = run_cli(*wrong, data_dir=data_dir)
        assert refused.returncode != 0, wrong
        assert "give the ids to replay, or --all" in refused.stderr
    unknown = run_cli("dlq", "replay", "999999", data_dir=data_dir)
    assert unknown.returncode != 0
    assert "not found" in unknown.stderr
    assert len(dead_letters(data_dir)) == 3

    # Replayed events go back into the queue and out to the upstream, which now takes them.
    upstream.reject_ids([])
    one = run_cli("dlq", "replay", str(letters[0]["id"]), data_dir=data_dir)
    assert one.returncode == 0, one.stderr
    assert "Replayed 1 " in one.stdout
    upstream.wait_for_events(8)
    assert [letter["event_id"] for letter in dead_letters(data_dir)] == bad[1:]
    every = run_cli("dlq", "replay", "--all", data_dir=data_dir)
    assert every.returncode == 0, every.stderr
    assert "Replayed 2 " in every.stdout
    upstream.wait_for_events(10)
    wait_until_drained(server, forwarder)
    assert dead_letters(data_dir) == []
    assert Counter(upstream.event_ids()) == Counter(ids(sent))
    replayed = {e["id"]: e for e in upstream.events if e["id"] in bad}
    assert all(same(e, replayed[e["id"]]) for e in sent if e["id"] in bad)

    # Purge: new dead letters, deleted for good.
    upstream.reject_ids(["gone-0000", "gone-0001"])
    post(server, numbered("gone", 4))
    upstream.wait_for_events(12)
    wait_for(lambda: len(dead_letters(data_dir)) == 2, "two new dead letters")
    purged = run_cli("dlq", "purge", "--yes", data_dir=data_dir)
    assert purged.returncode == 0, purged.stderr
    assert "Purged 2 dead letters." in purged.stdout
    assert dead_letters(data_dir) == []


# --- one forwarder per data directory, clean stop ---------------------------------------


def test_a_second_forwarder_on_the_same_data_dir_refuses_to_start(
    server: Server, start_forwarder: Callable[..., Forwarder]
) -> None:
    first = start_forwarder(server.data_dir)
    first.wait_for_state("not_configured")

    second = start_forwarder(server.data_dir)
    try:
        status = second.process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the second forwarder kept running:\n{second.log()}") from None
    assert status != 0
    assert "another forwarder is running" in second.log()
    assert first.process.poll() is None
    assert first.state()["pid"] == first.process.pid

    assert first.stop() == 0
    third = start_forwarder(server.data_dir)  # the lock went with the process
    third.wait_for_state("not_configured")


def test_sigterm_with_a_slow_upstream_stops_in_time_and_keeps_undelivered_events(
    server: Server, upstream: RecordingUpstream, start_forwarder: Callable[..., Forwarder]
) -> None:
    # Six batches (of 1000) for two senders: two in flight, two handed off, the rest still
    # building.
    sent = numbered("stop", 6000)
    post(server, sent)
    upstream.slow(30)
    forwarder = start_forwarder(
        server.data_dir,
        **to(upstream),
        COLLECTOR_STOP_TIMEOUT_SECONDS="1",
        COLLECTOR_FORWARD_TIMEOUT_SECONDS="60",
    )
    upstream.wait_until(lambda up: up.in_flight == 2, WAIT_S, "two requests in flight")

    asked = time.monotonic()
    forwarder.process.send_signal(signal.SIGTERM)
    try:
        status = forwarder.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no stop within 10 s:\n{forwarder.log()}") from None
    took = time.monotonic() - asked
    assert status == 1, forwarder.log()  # it overran: requests were cut (exit 0 before)
    assert took < 1 + 2, took  # the stop timeout, and the time to exit
    upstream.down()  # cut the abandoned requests: the upstream never answers them
    assert upstream.events == []
    assert sorted(ids(server.stored())) == sorted(ids(sent))
    assert IN_FLIGHT not in set(queue_statuses(server.data_dir))  # none left marked

    upstream.up()
    upstream.ok()
    again = start_forwarder(server.data_dir, **to(upstream))
    upstream.wait_for_events(len(sent))
    wait_until_drained(server, again)
    assert Counter(upstream.event_ids()) == Counter(ids(sent))
