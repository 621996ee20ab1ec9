"""Security facts, each proven against real processes and files where it can be.

- per-key rate limits: off by default; when set, a token bucket per key (429 with
  Retry-After, in the error shape, nothing stored), other keys unaffected;
- the server binds 127.0.0.1 unless told otherwise: the listening socket, read from
  /proc/net/tcp, is on loopback only;
- keys.json is 0600 after every edit and after the first start, whatever the umask;
- a key is judged by `hmac.compare_digest` (constant time) on SHA-256 digests;
- request head and body limits are settings, honoured at the values set;
- no key and no payload in any log: the server and the forwarder run at debug level
  through 401s, 400s, 413s, proxied calls and dead letters, and neither the client keys,
  the upstream key nor the events' contents appear in anything they wrote.

What test_keys.py and test_api.py already prove (hashes stored, 0600 after create, 401
and 413 answers) is not repeated here.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.errors import RateLimited, Unauthorized
from collector.server import auth
from collector.server.auth import ApiKey, KeyStore
from collector.server.ratelimit import RateLimiter
from collector.settings import Settings
from collector.store.datadir import DataDir

from conftest import (
    COLLECTOR,
    ROOT,
    Server,
    create_key,
    event,
    free_port,
    run_cli,
    wait_until_serving,
)
from upstream import Upstream

JSON = {"Content-Type": "application/json"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_error(response: httpx.Response, status: HTTPStatus) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == status.phrase and body["message"]
    return body


def clean_env() -> dict[str, str]:
    """The environment without any COLLECTOR_ setting (so defaults apply)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COLLECTOR_")}


# --- rate limits ----------------------------------------------------------------------------


def test_rate_limits_are_off_by_default(
    start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("COLLECTOR_"):
            monkeypatch.delenv(name)
    assert Settings().rate_limit_per_second == 0
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [
            client.post(
                "/v1/events/batch",
                json={"events": [event()]},
                headers={"Authorization": f"Bearer {server.key}"},
            ).status_code
            for _ in range(60)
        ]
    assert answers == [200] * 60


def test_a_key_over_its_rate_answers_429_with_retry_after_and_other_keys_go_on(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(COLLECTOR_RATE_LIMIT_PER_SECOND="0.5", COLLECTOR_RATE_LIMIT_BURST="3")
    other = create_key(server.data_dir, "--scope", "sdk:write", "--name", "other")
    sent = [event(id=f"trk_rate_{i}") for i in range(5)]
    answers = [server.post({"events": [e]}) for e in sent]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]  # the burst
    for refused in answers[3:]:
        body = assert_error(refused, HTTPStatus.TOO_MANY_REQUESTS)
        assert "rate limit" in body["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 2  # one token takes 2 s at 0.5/s
    assert [e["id"] for e in server.stored()] == ["trk_rate_0", "trk_rate_1", "trk_rate_2"]
    # Another key has its own bucket; an unknown key is 401, not 429.
    assert server.post({"events": [event()]}, key=other).status_code == 200
    assert server.post({"events": [event()]}, key="traffical_sk_unknown").status_code == 401
    # After Retry-After, the key may send again.
    time.sleep(int(answers[-1].headers["Retry-After"]))
    assert server.post({"events": [event()]}).status_code == 200


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(0, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_the_token_bucket_never_lets_more_through_than_burst_plus_rate(
    rate: float, burst: int, gaps: list[float]
) -> None:
    now = [0.0]
    limiter = RateLimiter(rate, burst, clock=lambda: now[0])
    key = ApiKey(name="k", prefix="p", hash="h", scopes=("sdk:write",))
    taken: list[float] = []
    for gap in gaps:
        now[0] += gap
        try:
            limiter.take(key)
            taken.append(now[0])
        except RateLimited as refused:
            assert refused.retry_after >= 1
            # A client that waits as told is always let through.
            now[0] += refused.retry_after
            limiter.take(key)
            taken.append(now[0])
    capacity = limiter.burst
    for i, start in enumerate(taken):  # any window: at most capacity + rate * its length
        for j in range(i, len(taken)):
            assert j - i + 1 <= capacity + rate * (taken[j] - start) + 1e-6


# --- binding --------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the LISTEN sockets on `port` (from /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(_address(address))
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def test_the_server_binds_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    env = clean_env()
    assert Settings.model_fields["host"].default == "127.0.0.1"
    port = free_port()
    data_dir = tmp_path / "data"
    create_key(data_dir, "--scope", "sdk:write")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*COLLECTOR, "serve", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process, log.read_text)
        assert listening_addresses(port) == {"127.0.0.1"}
        outside = _outside_address()
        if outside is not None:  # the machine's own address is not served
            with pytest.raises(OSError), socket.create_connection((outside, port), timeout=2):
                pass
    finally:
        process.terminate()
        process.wait(timeout=30)


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


# --- the key file ---------------------------------------------------------------------------


def test_keys_json_is_0600_after_every_edit_and_any_umask(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"

    def cli(*args: str, stdin: str = "") -> None:
        done = subprocess.run(
            [*COLLECTOR, *args, "--data-dir", str(tmp_path)],
            cwd=ROOT,
            env=clean_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: os.umask(0),  # the loosest umask: files would be 0666
        )
        assert done.returncode == 0, done.stderr
        assert mode(keys) == 0o600, args

    cli("keys", "create", "--scope", "sdk:write", "--name", "a")
    keys.chmod(0o644)  # someone loosened it: the next edit makes it private again
    cli("keys", "create", "--scope", "sdk:read", "--name", "b")
    keys.chmod(0o666)
    cli("keys", "revoke", "a")
    cli("keys", "import", "--scope", "sdk:write", "--name", "c", stdin="traffical_sk_" + "x" * 43)
    assert not list(tmp_path.glob("keys.tmp"))  # no copy left beside it


def test_keys_json_is_0600_after_the_first_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*COLLECTOR, "serve", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=ROOT,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.umask(0),
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", process, log.read_text)
        assert mode(data_dir / "keys.json") == 0o600
        [key] = json.loads((data_dir / "keys.json").read_text())["keys"]
        secret = log.read_text().split("only this once:")[1].split()[0]
        assert key["hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (data_dir / "keys.json").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- constant-time comparison ---------------------------------------------------------------


def test_keys_are_judged_by_compare_digest_on_their_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(DataDir(tmp_path))
    key, secret = store.create(["sdk:write"], name="k")
    calls: list[tuple[str, str]] = []
    real = auth.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert store.authenticate(f"Bearer {secret}") == key
    assert calls == [(key.hash, hashlib.sha256(secret.encode()).hexdigest())]
    # It is the judge: were it to say no, the right key would be refused.
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: False)
    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {secret}")


# --- limits are settings --------------------------------------------------------------------


def test_head_and_body_limits_are_the_documented_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("COLLECTOR_"):
            monkeypatch.delenv(name)
    defaults = Settings()
    assert defaults.max_body_bytes == 10 * 1024 * 1024
    assert defaults.max_header_bytes == 32 * 1024
    assert defaults.request_timeout_seconds == 30
    assert defaults.max_connections == 4096
    assert (defaults.rate_limit_per_second, defaults.rate_limit_burst) == (0, 0)
    assert defaults.host == "127.0.0.1"


def test_a_head_limit_set_lower_is_honoured(start_server: Callable[..., Server]) -> None:
    server = start_server(COLLECTOR_MAX_HEADER_BYTES="4096")
    small = httpx.get(f"{server.url}/healthz", headers={"X-Pad": "a" * 3000}, timeout=5)
    assert small.status_code == 200
    large = httpx.get(f"{server.url}/healthz", headers={"X-Pad": "a" * 5000}, timeout=5)
    assert_error(large, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)


# --- no key or payload in logs ------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as running:
        yield running


def test_no_key_and_no_payload_reach_any_log(tmp_path: Path, upstream: Upstream) -> None:
    data_dir = tmp_path / "data"
    key = create_key(data_dir, "--scope", "sdk:write", "--scope", "sdk:read", "--name", "app")
    canary = "canary" + secrets.token_hex(8)  # in every event, in values and in names
    upstream_key = "traffical_sk_upstream" + secrets.token_hex(16)
    wrong_key = "traffical_sk_wrong" + secrets.token_hex(16)
    port = free_port()
    env = {
        **clean_env(),
        "COLLECTOR_DATA_DIR": str(data_dir),
        "COLLECTOR_PORT": str(port),
        "COLLECTOR_LOG_LEVEL": "debug",
        "COLLECTOR_UPSTREAM_URL": upstream.url,
        "COLLECTOR_UPSTREAM_KEY": upstream_key,
        "COLLECTOR_MAX_BODY_BYTES": "100000",
        "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
        "COLLECTOR_RETRY_MAX_SECONDS": "0.2",
    }
    rejected = [f"dead_{canary}_{i}" for i in range(3)]
    upstream.reject_ids(rejected, status=400)  # these become dead letters
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*COLLECTOR, "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, log.read_text)
        good = [
            event(id=f"ok_{canary}_{i}", unitKey=f"user-{canary}", properties={"c": canary})
            for i in range(5)
        ]
        dead = [event(id=i, properties={canary: canary}) for i in rejected]

        def post(body: Any = None, key: str = key, **kwargs: Any) -> int:
            headers = {**JSON, "Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
            if body is not None:
                kwargs["content"] = json.dumps(body).encode()
            answer = httpx.post(f"{url}/v1/events/batch", headers=headers, timeout=10, **kwargs)
            return answer.status_code

        assert post({"events": good + dead}) == 200
        assert post({"events": [event(id=canary)]}, key=wrong_key) == 401
        assert post({"events": [{"type": canary, "orgId": canary}]}) == 400
        assert post({"events": [event(properties={"c": canary * 20000})]}) == 413
        assert post(content=f"not json {canary}".encode()) == 400
        assert post({"events": [event(id=canary)]}, headers={"Content-Type": canary}) == 415
        config = httpx.get(
            f"{url}/v1/config/proj_{canary}?env=production",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert config.status_code < 500
        upstream.wait_for_events(len(good), timeout=30)
        _wait_for_dead_letters(data_dir, len(dead))
    finally:
        process.terminate()
        process.wait(timeout=30)
    written = log.read_text(errors="replace")
    assert '"level": "debug"' in written  # the debug level was really on
    for secret in (key, wrong_key, upstream_key, canary):
        assert secret not in written, f"{secret[:20]}… appears in the log"
    # A key cut short or hashed is no better: no 16-character piece of one either.
    for secret in (key, wrong_key, upstream_key):
        pieces = {secret[i : i + 16] for i in range(len("traffical_sk_"), len(secret) - 16)}
        assert not [piece for piece in pieces if piece in written]


def _wait_for_dead_letters(data_dir: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = run_cli("dlq", "list", "--json", data_dir=data_dir)
        if done.returncode == 0 and len(json.loads(done.stdout or "[]")) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the rejected events were not dead-lettered")


def test_the_server_log_at_debug_level_is_really_written(tmp_path: Path) -> None:
    """The check above means something only if debug records reach the log: make sure."""
    done = subprocess.run(
        [sys.executable, "-c", "import logging; from collector.ops import logs; "
         "logs.setup('debug'); logging.getLogger('collector.x').debug('hello-debug')"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "hello-debug" in done.stdout + done.stderr
