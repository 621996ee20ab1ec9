"""The collector as a sidecar: a health listener apart from ingest, and a stop (SIGTERM)
that loses nothing answered, refuses what is new, and says how it went in its exit status.

Real `collector` processes on 127.0.0.1, real sockets; a client that sends its body slowly
plays the request in progress at the moment of the stop.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    COLLECTOR,
    ROOT,
    create_key,
    event,
    free_port,
    stored_events,
    terminate,
    wait_for,
)
from test_day_one import clean_env


def start(data_dir: Path, command: str, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    env = clean_env(COLLECTOR_DATA_DIR=str(data_dir), **settings)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*COLLECTOR, command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def with_health_port(
    tmp_path: Path, command: str, **settings: str
) -> tuple[subprocess.Popen[bytes], str, int, int]:
    """`collector COMMAND` on tmp_path/data with its health listener on a port of its own
    (log in tmp_path/COMMAND.log); returns it, a write key, the port and the health port."""
    data_dir, port, health = tmp_path / "data", free_port(), free_port()
    key = create_key(data_dir, "--scope", "sdk:write")
    process = start(
        data_dir,
        command,
        tmp_path / f"{command}.log",
        COLLECTOR_PORT=str(port),
        COLLECTOR_HEALTH_PORT=str(health),
        COLLECTOR_HEALTH_HOST="127.0.0.1",
        **settings,
    )
    return process, key, port, health


def answers(url: str) -> int | None:
    """The status `url` answers, or None when nothing accepts the connection."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def test_the_health_listener_serves_probes_and_metrics_and_nothing_else(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process, key, port, health = with_health_port(tmp_path, "serve")
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{health}/healthz") == 200, "the listener")
        assert answers(f"http://127.0.0.1:{health}/readyz") == 200
        scrape = httpx.get(f"http://127.0.0.1:{health}/metrics", timeout=10)
        assert scrape.status_code == 200
        names = {family.name for family in text_string_to_metric_families(scrape.text)}
        assert "collector_up" in names
        for method, path in (("POST", "/v1/events/batch"), ("GET", "/v1/stats")):
            refused = httpx.request(
                method,
                f"http://127.0.0.1:{health}{path}",
                json={"events": [event()]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            assert refused.status_code == 404, (path, refused.text)
            assert "only /healthz, /readyz and /metrics" in refused.json()["message"]
        taken = httpx.post(
            f"http://127.0.0.1:{port}/v1/events/batch",
            json={"events": [event(id="ingest-1")]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert taken.status_code == 200, taken.text
    finally:
        terminate(process)
    assert process.returncode == 0
    assert [e["id"] for e in stored_events(data_dir)] == ["ingest-1"]
    assert "health on http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


def read_to_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (it answers `connection: close`): the
    head and the body may come in separate reads."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def slow_request(port: int, key: str, body: bytes) -> socket.socket:
    """A POST whose head and first half of body are sent; the rest is the caller's."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (
        f"POST /v1/events/batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_on_sigterm_it_refuses_what_is_new_and_commits_what_is_in_progress(
    tmp_path: Path,
) -> None:
    """The kubelet's stop: /readyz fails at once, new connections are refused, the request
    in progress is answered 200 and its event stored, and everything exits 0."""
    data_dir = tmp_path / "data"
    process, key, port, health = with_health_port(
        tmp_path, "run", COLLECTOR_STOP_TIMEOUT_SECONDS="10"
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{health}/readyz") == 200, "readiness")
        body = json.dumps({"events": [event(id="in-progress")]}).encode()
        sock = slow_request(port, key, body)
        time.sleep(0.2)  # the server has the head: the request is in progress
        asked = time.monotonic()
        process.send_signal(15)
        wait_for(
            lambda: answers(f"http://127.0.0.1:{health}/readyz") != 200, "not ready", timeout=2
        )
        wait_for(  # uvicorn stops accepting at its next tick (0.1 s)
            lambda: answers(f"http://127.0.0.1:{port}/healthz") is None, "refused", timeout=2
        )
        sock.sendall(body[len(body) // 2 :])
        answer = read_to_close(sock).decode()
        assert answer.startswith("HTTP/1.1 200"), answer
        assert '"written":1' in answer
        code = process.wait(timeout=30)
        took = time.monotonic() - asked
    finally:
        terminate(process)
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log
    assert took < 10, took
    assert [e["id"] for e in stored_events(data_dir)] == ["in-progress"]


def test_a_stop_that_overruns_its_timeout_exits_1(tmp_path: Path) -> None:
    """A request still unfinished at stop_timeout_seconds is cut; the exit status says so."""
    data_dir, port = tmp_path / "data", free_port()
    key = create_key(data_dir, "--scope", "sdk:write")
    process = start(
        data_dir,
        "serve",
        tmp_path / "server.log",
        COLLECTOR_PORT=str(port),
        COLLECTOR_STOP_TIMEOUT_SECONDS="1",
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz") == 200, "the server")
        sock = slow_request(port, key, json.dumps({"events": [event()]}).encode())
        time.sleep(0.2)
        asked = time.monotonic()
        process.send_signal(15)
        code = process.wait(timeout=30)  # the rest of the body never comes
        took = time.monotonic() - asked
        sock.close()
    finally:
        terminate(process)
    assert code == 1, (tmp_path / "server.log").read_text()
    assert 1 <= took < 6, took
    assert stored_events(data_dir) == []
