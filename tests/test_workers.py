"""`workers = 2`: two server processes on one port, sharing one queue writer, for real.

Connections are held open and told apart by the worker that accepted them (read from
/proc), so each test can send to both workers on purpose: events reach the one queue once,
a key's rate limit holds across both, a track sent to one worker counts for the decision
sent to the other, the counts and histograms are the sum, a worker SIGKILLed is replaced,
the writer SIGKILLed is replaced (for a server alone too), SIGTERM stops all, and nothing
is left running when the supervisor is SIGKILLed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir

from conftest import (
    COLLECTOR,
    ROOT,
    Server,
    create_key,
    event,
    free_port,
    stored_events,
    wait_for,
)

START_S = 60.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def command_of(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def socket_inodes(pid: int) -> set[str]:
    """The inodes of `pid`'s sockets; none once it has exited (a worker just killed)."""
    inodes = set()
    try:
        fds = list((Path("/proc") / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def accepted_by(pids: list[int], server_port: int, client_port: int) -> int | None:
    """The pid among `pids` holding the server end of the connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = (
            int(fields[1].split(":")[1], 16),
            int(fields[2].split(":")[1], 16),
            fields[9],
        )
        if (local, remote) == (server_port, client_port):
            for pid in pids:
                if inode in socket_inodes(pid):
                    return pid
    return None


class Workers(Server):
    """A `collector serve` with workers = 2 (unless told), started once every worker
    serves (the supervisor's "serving on" line)."""

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_S
        while "serving on" not in self.log():
            assert self.process is not None and self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def connections(self, count: int = 16) -> dict[int, list[http.client.HTTPConnection]]:
        """`count` open connections, by the worker that accepted each (both, or fail)."""
        by_worker: dict[int, list[http.client.HTTPConnection]] = {}
        opened = []
        for _ in range(count):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.connect()
            opened.append(conn)
        pids = self.server_pids()
        for conn in opened:
            client_port = conn.sock.getsockname()[1]
            pid = wait_for(
                lambda port=client_port: accepted_by(pids, self.port, port),
                "a worker to accept",
                10,
            )
            by_worker.setdefault(pid, []).append(conn)
        assert len(by_worker) == 2, f"connections all went to one worker: {by_worker.keys()}"
        return by_worker

    def server_pids(self) -> list[int]:
        assert self.process is not None
        return [p for p in children(self.process.pid) if self.port_of(p)]

    def port_of(self, pid: int) -> bool:
        """Whether `pid` holds this server's listening socket."""
        listening = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == self.port and fields[3] == "0A":
                listening.add(fields[9])
        return bool(listening & socket_inodes(pid))


def post(conn: http.client.HTTPConnection, key: str, events: list[dict[str, Any]]) -> int:
    body = json.dumps({"events": events})
    conn.request(
        "POST",
        "/v1/events/batch",
        body,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    answer = conn.getresponse()
    answer.read()
    return answer.status


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def start(**env: str) -> Workers:
        data_dir = tmp_path / f"data{len(started)}"
        server = Workers(data_dir, free_port(), {"COLLECTOR_WORKERS": "2", **env})
        server.key = create_key(data_dir, "--scope", "sdk:write", "--name", "test")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_both_workers_take_events_into_one_queue_each_stored_once(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    by_worker = server.connections()
    sent = 0
    for round_ in range(3):
        for pid, conns in by_worker.items():
            for n, conn in enumerate(conns):
                ids = [f"{pid}-{n}-{round_}-{i}" for i in range(5)]
                assert post(conn, server.key, [event(id=i) for i in ids]) == 200
                sent += 5
                # the same events again, on the other worker: already held, not stored twice
                other = next(c for p, cs in by_worker.items() if p != pid for c in cs)
                assert post(other, server.key, [event(id=i) for i in ids]) == 200

    stored = stored_events(server.data_dir)
    assert len(stored) == sent
    assert len({e["id"] for e in stored}) == sent


def test_a_keys_rate_limit_holds_across_workers(start_workers: Callable[..., Workers]) -> None:
    server = start_workers(COLLECTOR_RATE_LIMIT_PER_SECOND="0.01", COLLECTOR_RATE_LIMIT_BURST="6")
    by_worker = server.connections()

    statuses = [post(conn, server.key, [event()]) for conns in by_worker.values() for conn in conns]

    assert statuses.count(200) == 6  # one bucket: per worker, there would be up to 12
    assert statuses.count(429) == len(statuses) - 6


def test_a_track_on_one_worker_counts_for_the_decision_sent_to_the_other(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    first, second = list(server.connections().values())[:2]
    layers = [{"layerId": "l", "bucket": 3, "policyId": "pol_w", "allocationName": "treatment"}]

    assert post(first[0], server.key, [event("decision", id="dec_w", layers=layers)]) == 200
    assert post(second[0], server.key, [event(decisionId="dec_w", event="purchase")]) == 200

    expected = {("proj_test", "production", "pol_w", "treatment", "purchase"): 1}
    assert wait_for_count(server.data_dir, Count.CONVERSIONS) == expected


def wait_for_count(data_dir: Path, name: Count) -> dict[tuple[str, ...], float]:
    deadline = time.monotonic() + 10
    while True:
        counts = Counts.reader(DataDir(data_dir))
        try:
            found = counts.recent(name, 5)
        finally:
            counts.close()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_counts_and_metrics_are_the_sum_of_both_workers(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    by_worker = server.connections()
    requests = 0
    for conns in by_worker.values():
        for conn in conns:
            assert post(conn, server.key, [event(), event()]) == 200
            requests += 1

    def flushed() -> str | None:  # both workers flush their counts every second
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        done = metric(text, "collector_request_duration_seconds_count") == requests
        return text if done and metric(text, "collector_requests_total") == requests else None

    metrics = wait_for(flushed, "every worker's counts", 10)

    assert metric(metrics, "collector_events_written_total") == 2 * requests
    assert metric(metrics, "collector_requests_total") == requests
    assert metric(metrics, "collector_request_duration_seconds_count") == requests


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def test_a_worker_killed_is_replaced_and_the_other_serves_meanwhile(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    by_worker = server.connections()
    victim, survivor = list(by_worker)

    os.kill(victim, signal.SIGKILL)
    assert post(by_worker[survivor][0], server.key, [event(id="during")]) == 200
    deadline = time.monotonic() + START_S
    while victim in server.server_pids() or len(server.server_pids()) < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert "exited with -9; starting another" in server.log()
    fresh = httpx.post(
        f"{server.url}/v1/events/batch",
        json={"events": [event(id="after")]},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=30,
    )
    assert fresh.status_code == 200
    assert {e["id"] for e in stored_events(server.data_dir)} == {"during", "after"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_writer_killed_is_replaced_and_no_answered_event_is_lost(
    start_workers: Callable[..., Workers], workers: str
) -> None:
    server = start_workers(COLLECTOR_WORKERS=workers)
    try:
        assert server.process is not None
        writer = next(
            p
            for p in children(server.process.pid)
            if not server.port_of(p) and "spawn_main" in command_of(p)
        )
        answered = set()
        os.kill(writer, signal.SIGKILL)
        deadline = time.monotonic() + START_S
        statuses = []
        n = 0
        while len(answered) < 20:
            assert time.monotonic() < deadline, server.log()
            answer = server.post({"events": [event(id=f"e{n}")]})
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                answered.add(f"e{n}")
            else:
                assert answer.status_code == 503, answer.text
                assert answer.headers["Retry-After"]
                time.sleep(0.1)
            n += 1
        assert 503 in statuses  # the writer was gone for a moment
        assert answered <= {e["id"] for e in stored_events(server.data_dir)}
        assert "the queue writer process died" in server.log()
    finally:
        server.stop()


def test_sigterm_stops_every_worker_and_the_writer_with_status_0(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    assert server.process is not None
    family = children(server.process.pid)
    assert len(family) >= 3  # two workers and the writer

    server.process.send_signal(signal.SIGTERM)

    assert server.process.wait(timeout=30) == 0, server.log()
    assert "killing" not in server.log() and "could not ask" not in server.log()
    gone_or_fail(family)  # multiprocessing's resource tracker ends just after its parent


def gone_or_fail(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while [p for p in pids if command_of(p)]:
        assert time.monotonic() < deadline, "a worker or the writer outlived the supervisor"
        time.sleep(0.1)


def test_nothing_is_left_running_when_the_supervisor_is_killed(
    start_workers: Callable[..., Workers],
) -> None:
    server = start_workers()
    assert server.process is not None
    family = children(server.process.pid)

    server.kill()

    gone_or_fail(family)


def test_a_port_in_use_fails_the_start_with_one_line_even_with_workers(tmp_path: Path) -> None:
    """Workers bind with SO_REUSEPORT; the port is first bound alone, so one another
    process holds (or another collector with workers) is still refused: status 3."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "COLLECTOR_DATA_DIR": str(tmp_path / "data")}
        env.update(COLLECTOR_PORT=str(port), COLLECTOR_WORKERS="2")
        done = subprocess.run(
            [*COLLECTOR, "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    assert done.returncode == 3, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
