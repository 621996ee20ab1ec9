"""Shared fixtures: a real `collector serve` subprocess on 127.0.0.1 with its own data dir.

Tests talk to it over real HTTP and read what it committed from the real SQLite file,
read-only, with the queue's own row format (`collector.store.rows`). Nothing of ours is
mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from collector.store import rows, spool
from collector.store.datadir import DataDir

COLLECTOR = [sys.executable, "-m", "cli"]
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    *args: str, data_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `collector ARGS` to completion against `data_dir`."""
    full_env = {**os.environ, "COLLECTOR_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run(
        [*COLLECTOR, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60
    )


def terminate(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM `process` and wait for it; SIGKILL it if it has not exited by `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def create_key(data_dir: Path, *args: str) -> str:
    """A new key made with `collector keys create ARGS` (the secret is the last line)."""
    done = run_cli("keys", "create", *args, data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


_ADMIN_KEYS: dict[Path, str] = {}


def admin_key(data_dir: Path) -> str:
    """A key with admin:read for `data_dir` (the whole of /v1/stats), made once per dir."""
    if data_dir not in _ADMIN_KEYS:
        _ADMIN_KEYS[data_dir] = create_key(
            data_dir, "--scope", "admin:read", "--name", f"admin-{len(_ADMIN_KEYS)}"
        )
    return _ADMIN_KEYS[data_dir]


def stored_events(data_dir: Path) -> list[dict[str, Any]]:
    """Every event in the queue file not yet acknowledged, oldest row first (within a row,
    grouped by project and env)."""
    return [rows.parse(raw) for raw in stored_bytes(data_dir)]


def stored_bytes(data_dir: Path) -> list[bytes]:
    """The JSON bytes of every event in the queue file not yet acknowledged, as stored."""
    path = DataDir(data_dir).queue
    if not path.exists():
        return []
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        found = conn.execute(
            f"SELECT data FROM {spool.TABLE} WHERE status < {spool.DONE} ORDER BY _id"
        ).fetchall()
    finally:
        conn.close()
    return [raw for (data,) in found for _, events in rows.split(data) for raw in events]


def status_json(data_dir: Path) -> tuple[int, dict[str, Any]]:
    """`collector status --json` on `data_dir`: its exit code (0 healthy, 1 not) and document."""
    done = run_cli("status", "--json", data_dir=data_dir)
    assert done.returncode in (0, 1), done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, document


def dlq_list_json(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    """What `collector dlq list --json ARGS` prints."""
    done = run_cli("dlq", "list", "--json", *args, data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    letters: list[dict[str, Any]] = json.loads(done.stdout)
    return letters


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """The first true value of `condition()`, polled; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # a file or a process another process changes: poll it
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_until_serving(
    url: str, process: subprocess.Popen[Any], log: Callable[[], str] = lambda: ""
) -> None:
    """Return once `url`/healthz answers 200; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{log()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)  # not listening yet: poll again shortly
    raise AssertionError(f"server did not start:\n{log()}")


@dataclass
class Server:
    """A running `collector serve` process."""

    data_dir: Path
    port: int
    env: dict[str, str]
    key: str = ""
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {
            **os.environ,
            "COLLECTOR_DATA_DIR": str(self.data_dir),
            "COLLECTOR_PORT": str(self.port),
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*COLLECTOR, "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_until_up()
        return self

    def wait_until_up(self) -> None:
        assert self.process is not None
        wait_until_serving(self.url, self.process, self.log)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(
        self,
        body: Any = None,
        *,
        key: str | None = None,
        path: str = "/v1/events/batch",
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """POST JSON `body` (or raw `content`) with this server's key unless told otherwise."""
        sent = {"Authorization": f"Bearer {self.key if key is None else key}"}
        if content is None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers=sent, timeout=30)

    def stored(self) -> list[dict[str, Any]]:
        return stored_events(self.data_dir)


def serve_for_module(
    tmp_path_factory: pytest.TempPathFactory, name: str, **env: str
) -> Iterator[Server]:
    """A server shared by a module's tests (for module-scoped fixtures), with a write key."""
    data_dir = tmp_path_factory.mktemp(name) / "data"
    server = Server(data_dir, free_port(), env)
    server.key = create_key(data_dir, "--scope", "sdk:write", "--name", "test")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: start_server(**env) starts a server with its own data dir and a write key."""
    servers: list[Server] = []

    def start(data_dir: Path | None = None, **env: str) -> Server:
        directory = data_dir or tmp_path / f"data{len(servers)}"
        server = Server(directory, free_port(), env)
        server.key = create_key(directory, "--scope", "sdk:write", "--name", f"test{len(servers)}")
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    """One running server on the embedded defaults, with a write key in `server.key`."""
    return start_server()


# When the tests' events say they happened: this run's start, as SDKs write it (24
# characters, like any such stamp), so that they are neither late nor ahead at arrival.
NOW_STAMP = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(kind: str = "track", **fields: Any) -> dict[str, Any]:
    """A valid event of `kind`, as a real SDK sends it; `fields` override or add."""
    base: dict[str, Any] = {
        "type": kind,
        "orgId": "org_test",
        "projectId": "proj_test",
        "env": "production",
        "unitKey": "user-1",
        "timestamp": NOW_STAMP,
    }
    if kind == "track":
        base["event"] = "purchase"
    else:
        base["layers"] = [
            {"layerId": "layer_1", "bucket": 42, "policyId": "pol_1", "allocationName": "treatment"}
        ]
    base.update(fields)
    return base


@contextlib.contextmanager
def ext4_image(
    tmp_path: Path, name: str, size: int, mkfs: tuple[str, ...] = (), options: str = "loop"
) -> Iterator[Path]:
    """A directory on its own ext4 image of `size` bytes (`mkfs`: mkfs.ext4's options,
    `options`: mount's), unmounted after. Needs root, as CI has; elsewhere the test is
    skipped, saying why."""
    where = tmp_path / name
    where.mkdir()
    image = tmp_path / f"{name}.img"
    with open(image, "wb") as out:
        out.truncate(size)
    for step in (
        ["mkfs.ext4", "-q", "-F", *mkfs, str(image)],
        ["mount", "-o", options, str(image), str(where)],
    ):
        try:
            done = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as exc:
            pytest.skip(f"cannot make an ext4 filesystem here: {exc}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
