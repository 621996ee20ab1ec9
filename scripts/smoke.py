#!/usr/bin/env python3
"""A quick end-to-end check of an installed collector, for `scripts/test-lowest`: does it
work at all with the versions of its dependencies installed beside it?

    python scripts/smoke.py                      the `collector` next to this Python
    python scripts/smoke.py --collector PATH     another one (e.g. dist/collector)

In a temporary data directory, on free ports of 127.0.0.1, it runs what a first install
does: `collector keys create`, `collector serve`, one event POSTed to /v1/events/batch
(200, accepted and written), GET /metrics, `collector status --json` (exit 1: the
forwarder is down; valid JSON), then `collector forward` against a stand-in upstream here
(stdlib HTTP server): it writes forwarder.json and delivers the event. On the way, the
OpenAPI document, and the connection limits built on uvicorn's internals (a 431 for an
oversized request head, a 408 for one unfinished past the deadline). Each step is
printed; the first failure ends it with exit status 1 and a one-line reason (the
processes' output follows it). Only the standard library is used here, so what is tested
is the collector and its dependencies, not this script's. It takes a few seconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
WAIT_S = 20.0  # for the server to answer, the forwarder to write its state and deliver
EVENT = {  # a valid event, as tests/conftest.py `event()` makes it
    "type": "track",
    "event": "purchase",
    "id": "trk_smoke_1",
    "orgId": "org_smoke",
    "projectId": "proj_smoke",
    "env": "production",
    "unitKey": "user-1",
    "timestamp": "2026-05-21T10:30:00.123Z",
}
UPSTREAM_KEY = "traffical_sk_smoke"
# The server's deadline for a request head (`request_timeout_seconds`), short for the 408.
HEAD_TIMEOUT_S = 1.0


class Failed(Exception):
    """A step failed: the message is the one-line reason."""


def step(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raw_exchange(port: int, data: bytes, limit_s: float) -> tuple[int, dict[str, Any] | None]:
    """Send `data` on a new connection and read the answer until the server closes it:
    (status, JSON body), (0, None) if there was none within `limit_s`."""
    received = b""
    with socket.create_connection((HOST, port), timeout=limit_s) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + limit_s
        try:
            while time.monotonic() < deadline and (chunk := sock.recv(65536)):
                received += chunk
        except OSError:  # a timeout, or a reset once the answer is in
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    fields = head.split(b" ", 2)
    if len(fields) < 2 or not fields[1].isdigit():
        return 0, None
    return int(fields[1]), json_or_none(body)


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; (0, reason) when it could not be made."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc).encode()


class Upstream(ThreadingHTTPServer):
    """The upstream's events API, enough of it: 200 to every POST, events kept."""

    daemon_threads = True

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        super().__init__((HOST, 0), UpstreamHandler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"


class UpstreamHandler(BaseHTTPRequestHandler):
    server: Upstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        document = json.loads(body)
        events = document["events"] if isinstance(document, dict) else document
        self.server.events.extend(events)
        self.server.keys.append(self.headers.get("Authorization"))
        answer = json.dumps({"accepted": len(events)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Smoke:
    def __init__(self, collector: list[str], work: Path) -> None:
        self.collector = collector
        self.work = work
        self.data_dir = work / "data"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.upstream = Upstream()
        self.env = {
            **os.environ,
            "COLLECTOR_DATA_DIR": str(self.data_dir),
            "COLLECTOR_HOST": HOST,
            "COLLECTOR_PORT": str(self.port),
            "COLLECTOR_UPSTREAM_URL": self.upstream.url,
            "COLLECTOR_UPSTREAM_KEY": UPSTREAM_KEY,
            "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
            "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
            "COLLECTOR_STOP_TIMEOUT_SECONDS": "2",
            "COLLECTOR_REQUEST_TIMEOUT_SECONDS": str(HEAD_TIMEOUT_S),
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.collector, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [*self.collector, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes[name] = process
        return process

    def stop(self, name: str) -> int:
        """SIGTERM `name` and wait for it; its exit status (SIGKILLed after 15 s: -9)."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def logs(self) -> str:
        return "".join(
            f"--- {name}.log\n{(self.work / f'{name}.log').read_text(errors='replace')}"
            for name in self.processes
        )

    def wait_for(self, what: str, ready: Any, name: str) -> None:
        process = self.processes[name]
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if process.poll() is not None:
                output = (self.work / f"{name}.log").read_text(errors="replace")
                raise Failed(
                    f"{what}: it exited with status {process.returncode}: {last_line(output)}"
                )
            if time.monotonic() > deadline:
                raise Failed(f"{what}: not within {WAIT_S:g} s")
            time.sleep(0.05)

    def run(self) -> None:
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()

        step("collector --help")
        done = self.cli("--help")
        if done.returncode != 0 or "serve" not in done.stdout:
            raise Failed(f"collector --help: exit {done.returncode}: {last_line(done.stderr)}")

        step("collector keys create --scope sdk:write")
        done = self.cli("keys", "create", "--scope", "sdk:write", "--name", "smoke")
        if done.returncode != 0 or not done.stdout.strip():
            raise Failed(f"keys create: exit {done.returncode}: {last_line(done.stderr)}")
        key = done.stdout.strip().splitlines()[-1]

        step(f"collector serve on {self.url}")
        self.start("serve", "serve")
        self.wait_for(
            "serve: GET /healthz 200", lambda: http("GET", f"{self.url}/healthz")[0] == 200, "serve"
        )

        step("POST /v1/events/batch (one event)")
        status, body = http("POST", f"{self.url}/v1/events/batch", {"events": [EVENT]}, key)
        answer = {"accepted": 1, "written": 1, "pipelineWritten": 1}
        if status != 200 or json_or_none(body) != answer:
            raise Failed(f"POST /v1/events/batch: {status} {body[:300]!r}")

        step("GET /metrics")
        status, body = http("GET", f"{self.url}/metrics")
        if status != 200 or b"# TYPE" not in body:
            raise Failed(f"GET /metrics: {status} {body[:300]!r}")

        step("GET /schema/openapi.json")
        status, body = http("GET", f"{self.url}/schema/openapi.json")
        paths = (json_or_none(body) or {}).get("paths", {}) if status == 200 else {}
        if "/v1/events/batch" not in paths:
            raise Failed(f"GET /schema/openapi.json: {status} {body[:300]!r}")

        # The connection limits are a subclass of uvicorn's HttpToolsProtocol (limits.py).
        step("a request head over max_header_bytes: 431 in the error shape")
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n"
        status, document = raw_exchange(self.port, big, limit_s=10)
        if status != 431 or (document or {}).get("error") != "Request Header Fields Too Large":
            raise Failed(f"oversized head: {status} {document!r} (expected 431)")

        step(f"a request head unfinished after {HEAD_TIMEOUT_S:g} s: 408 in the error shape")
        partial = b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\n"
        status, document = raw_exchange(self.port, partial, limit_s=HEAD_TIMEOUT_S + 5)
        if status != 408 or (document or {}).get("error") != "Request Timeout":
            raise Failed(f"unfinished head: {status} {document!r} (expected 408)")

        step("collector status --json (exit 1: the forwarder is down)")
        done = self.cli("status", "--json")
        document = json_or_none(done.stdout.encode())
        if not isinstance(document, dict) or "healthy" not in document:
            raise Failed(
                f"status --json: exit {done.returncode}, no JSON document: "
                f"{last_line(done.stderr or done.stdout)}"
            )
        if done.returncode != 1 or document["healthy"] is not False:
            raise Failed(
                f"status --json: exit {done.returncode}, healthy={document['healthy']}"
                " (expected 1 and false: no forwarder runs)"
            )

        step("collector forward (writes forwarder.json, delivers the event upstream)")
        self.start("forward", "forward")
        state = self.data_dir / "forwarder.json"
        self.wait_for("forward: forwarder.json written", state.exists, "forward")
        self.wait_for(
            "forward: the event delivered upstream", lambda: self.upstream.events, "forward"
        )
        if [e.get("id") for e in self.upstream.events] != [EVENT["id"]]:
            raise Failed(f"forward: upstream got {self.upstream.events!r}")
        if self.upstream.keys[0] != f"Bearer {UPSTREAM_KEY}":
            raise Failed(f"forward: upstream key {self.upstream.keys[0]!r}")

        step("SIGTERM the forwarder and the server (exit 0 each)")
        for name in ("forward", "serve"):
            code = self.stop(name)
            if code != 0:
                raise Failed(f"{name}: exit status {code} after SIGTERM")

    def close(self) -> None:
        for name in self.processes:
            self.stop(name)
        self.upstream.shutdown()
        self.upstream.server_close()


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def last_line(text: str) -> str:
    """The error that ended `text` (a traceback's last exception, even when rich wrapped it
    over several lines), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[\w.]*(Error|Exception|Exit)\b", lines[i]):
            return " ".join(lines[i:])
    return lines[-1] if lines else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(sys.executable).parent / "collector"
    parser.add_argument("--collector", default=str(default), help=f"default: {default}")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="collector-smoke-") as work:
        smoke = Smoke([args.collector], Path(work))
        try:
            smoke.run()
        except (Failed, subprocess.TimeoutExpired, OSError) as exc:
            smoke.close()
            print(smoke.logs(), file=sys.stderr, end="")
            print(f"smoke: FAILED: {exc}", file=sys.stderr)
            return 1
        smoke.close()
    step(f"passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
