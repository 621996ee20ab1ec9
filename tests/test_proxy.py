"""The collector as an SDK's whole base URL (issue 6): config, resolve and decide calls passed
to the upstream, the config bundle cache that keeps SDKs working through an outage, and the
counts of those calls.

A real `collector serve` (and, for the events, a real `collector forward`) in front of the
test upstream (`upstream.py`) on 127.0.0.1, the official `traffical` SDK and plain httpx as
clients; nothing of ours is mocked. Most tests share one server and one upstream (each uses
its own keys or projects, so the cache entries of one test are not another's); the upstream
is put back up and reset after each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from traffical import TrafficalClient, TrafficalClientOptions

from collector.store.configcache import Bundle as CachedBundle
from collector.store.configcache import ConfigCache, Slot
from collector.store.datadir import DataDir

from conftest import COLLECTOR, ROOT, Server, admin_key, serve_for_module, terminate
from sdk_support import (
    CONTROL_UNIT,
    PARAMETER_DEFAULT,
    PARAMETER_KEY,
    TREATMENT_UNIT,
    UNIT_KEY_FIELD,
    inline_bundle,
)
from upstream import CONFIG_CACHE_CONTROL, Upstream

PROJECT, ENV, ORG = "proj_test", "production", "org_test"
UPSTREAM_KEY = "traffical_sk_upstream"
ORIGIN = "https://app.example"
DECIDE_TIMEOUT_S = 0.5
CONFIG_TIMEOUT_S = 1.0
WAIT_S = 15.0
STALE = "x-collector-stale"


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_upstream(upstream: Upstream) -> Iterator[None]:
    upstream.up()
    upstream.reset()
    upstream.clear()
    upstream.set_bundle(PROJECT, ENV, inline_bundle())
    yield
    if upstream.in_flight:
        upstream.down()  # cut requests a test left waiting (slow), so none is recorded later
    upstream.up()
    upstream.reset()


def proxy_env(upstream: Upstream, **extra: str) -> dict[str, str]:
    return {
        "COLLECTOR_UPSTREAM_URL": upstream.url,
        "COLLECTOR_PROXY_DECIDE_TIMEOUT_SECONDS": str(DECIDE_TIMEOUT_S),
        "COLLECTOR_PROXY_CONFIG_TIMEOUT_SECONDS": str(CONFIG_TIMEOUT_S),
        "COLLECTOR_CORS_ORIGINS": ORIGIN,
        **extra,
    }


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Server]:
    """One `collector serve` for the module, pointed at `upstream`, with a write key."""
    yield from serve_for_module(tmp_path_factory, "proxy", **proxy_env(upstream))


def config(
    server: Server,
    key: str,
    *,
    project: str = PROJECT,
    env: str = ENV,
    etag: str | None = None,
    **headers: str,
) -> httpx.Response:
    sent = {"Authorization": f"Bearer {key}", "Accept": "application/json", **headers}
    if etag is not None:
        sent["If-None-Match"] = etag
    return httpx.get(
        f"{server.url}/v1/config/{project}", params={"env": env}, headers=sent, timeout=10
    )


def sdk(server: Server, key: str, **options: Any) -> TrafficalClient:
    """The official SDK in its default bundle mode: only the base URL points elsewhere."""
    return TrafficalClient(
        TrafficalClientOptions(
            api_key=key, org_id=ORG, project_id=PROJECT, env=ENV, base_url=server.url, **options
        )
    )


def color(client: TrafficalClient, unit: str) -> Any:
    decision = client.decide({UNIT_KEY_FIELD: unit}, {PARAMETER_KEY: PARAMETER_DEFAULT})
    return decision.assignments[PARAMETER_KEY]


def assert_error_shape(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] and body["message"]
    return body


def start_forwarder(server: Server, upstream: Upstream) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "COLLECTOR_DATA_DIR": str(server.data_dir),
        "COLLECTOR_UPSTREAM_URL": upstream.url,
        "COLLECTOR_UPSTREAM_KEY": UPSTREAM_KEY,
        "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
        "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
        "COLLECTOR_STOP_TIMEOUT_SECONDS": "2",
    }
    log = open(server.data_dir.parent / "forwarder.log", "ab")  # noqa: SIM115 (closed below)
    try:
        return subprocess.Popen(
            [*COLLECTOR, "forward"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()


def eventually(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """`check()` once it returns something truthy (for state in another process)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)  # the server flushes its counts every second


# --- the official SDK, end to end -----------------------------------------------------------


def test_sdk_in_bundle_mode_gets_ready_decides_and_its_events_reach_the_upstream(
    collector: Server, upstream: Upstream
) -> None:
    forwarder = start_forwarder(collector, upstream)
    client = sdk(collector, collector.key)
    try:
        assert client.wait_for_ready(10), "the SDK never got its config through the collector"
        assert color(client, CONTROL_UNIT) == "blue"
        assert color(client, TREATMENT_UNIT) == "green"
        decision = client.decide({UNIT_KEY_FIELD: CONTROL_UNIT}, {PARAMETER_KEY: "gray"})
        client.track("purchase", {"sku": "SKU-1"}, decision_id=decision.decision_id)
        assert client.flush_events(timeout=10)

        events = upstream.wait_for_events(3, timeout=WAIT_S)
        assert {e["type"] for e in events} == {"decision", "track"}
        track = next(e for e in events if e["type"] == "track")
        assert track["decisionId"] == decision.decision_id
        assert {r.key for r in upstream.accepted() if r.path == "/v1/events"} == {UPSTREAM_KEY}
        [fetch] = upstream.sdk_requests("/v1/config/")
        assert (fetch.method, fetch.path, fetch.query, fetch.status) == (
            "GET",
            f"/v1/config/{PROJECT}",
            f"env={ENV}",
            200,
        )
        assert fetch.key == collector.key  # the SDK's own key, passed on
        assert fetch.headers["accept"] == "application/json"
    finally:
        client.close()
        terminate(forwarder)

    # The upstream goes away: a new SDK client still starts, from the collector's cache.
    upstream.down()
    again = sdk(collector, collector.key)
    try:
        assert again.wait_for_ready(10), "no stale bundle served while the upstream is down"
        assert color(again, CONTROL_UNIT) == "blue"
        assert color(again, TREATMENT_UNIT) == "green"
    finally:
        again.close()
    answer = config(collector, collector.key)
    assert answer.status_code == 200
    assert answer.headers[STALE] == "true"


def test_sdk_in_server_mode_resolves_through_the_collector(
    collector: Server, upstream: Upstream
) -> None:
    upstream.answer_with(
        "/v1/resolve",
        {
            "decisionId": "dec_from_upstream",
            "assignments": {PARAMETER_KEY: "purple"},
            "metadata": {"timestamp": "2026-05-21T10:30:00.000Z", "unitKeyValue": "u1"},
            "stateVersion": "sv_9",
        },
    )
    client = sdk(collector, collector.key, evaluation_mode="server", track_decisions=False)
    try:
        decision = client.decide({UNIT_KEY_FIELD: "u1"}, {PARAMETER_KEY: PARAMETER_DEFAULT})
    finally:
        client.close()
    assert decision.decision_id == "dec_from_upstream"
    assert decision.assignments == {PARAMETER_KEY: "purple"}
    [call] = upstream.sdk_requests("/v1/resolve")
    assert call.key == collector.key
    assert (call.headers["x-org-id"], call.headers["x-project-id"], call.headers["x-env"]) == (
        ORG,
        PROJECT,
        ENV,
    )


# --- config: ETag, 304, stale ---------------------------------------------------------------


def test_etag_and_304_pass_through(collector: Server, upstream: Upstream) -> None:
    key = "traffical_sk_etag"
    first = config(collector, key)
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert first.json() == inline_bundle()
    assert first.headers["cache-control"] == CONFIG_CACHE_CONTROL
    assert first.headers["content-type"].startswith("application/json")
    assert STALE not in first.headers

    second = config(collector, key, etag=etag)
    assert second.status_code == 304
    assert second.content == b""
    assert second.headers["etag"] == etag
    # The client's If-None-Match reached the upstream, which answered the 304.
    assert [(r.status, r.headers.get("if-none-match")) for r in upstream.sdk_requests()] == [
        (200, None),
        (304, etag),
    ]

    changed = inline_bundle() | {"version": "2026-06-01T00:00:00.000Z"}
    new_etag = upstream.set_bundle(PROJECT, ENV, changed)
    third = config(collector, key, etag=etag)
    assert third.status_code == 200
    assert third.headers["etag"] == new_etag != etag
    assert third.json() == changed


def test_a_client_holding_a_version_the_cache_lacks_still_gets_304(
    collector: Server, upstream: Upstream
) -> None:
    etag = upstream.set_bundle(PROJECT, ENV, inline_bundle())
    # A key the collector has never seen, whose SDK already holds the current bundle.
    answer = config(collector, "traffical_sk_warm", etag=etag)
    assert answer.status_code == 304
    assert answer.headers["etag"] == etag
    # The collector asked for the whole bundle (to cache it) and answered the 304 itself...
    [call] = upstream.sdk_requests()
    assert (call.status, call.headers.get("if-none-match")) == (200, None)
    # ...so it can serve it once the upstream is down.
    upstream.down()
    stale = config(collector, "traffical_sk_warm")
    assert (stale.status_code, stale.headers[STALE]) == (200, "true")
    assert stale.json() == inline_bundle()


@pytest.mark.parametrize("failure", ["503", "500", "refused", "dropped"])
def test_last_good_bundle_is_served_stale_when_the_upstream_fails(
    collector: Server, upstream: Upstream, failure: str
) -> None:
    key = f"traffical_sk_stale_{failure}"
    etag = config(collector, key).headers["etag"]
    if failure == "refused":
        upstream.down()
    elif failure == "dropped":
        upstream.drop()
    else:
        upstream.fail(int(failure))

    answer = config(collector, key)
    assert answer.status_code == 200, answer.text
    assert answer.json() == inline_bundle()
    assert answer.headers[STALE] == "true"
    assert answer.headers["etag"] == etag
    assert answer.headers["warning"].startswith("110")
    assert int(answer.headers["age"]) >= 0

    held = config(collector, key, etag=etag)  # the SDK's next poll
    assert (held.status_code, held.content, held.headers[STALE]) == (304, b"", "true")

    # Another key gets nothing from the cache: the upstream never gave it this bundle.
    other = config(collector, f"traffical_sk_other_{failure}")
    assert STALE not in other.headers
    if failure in ("refused", "dropped"):
        assert_error_shape(other, 502)
    else:
        assert other.status_code == int(failure)  # the upstream's own answer, passed on


def test_stale_bundles_survive_a_collector_restart(
    start_server: Callable[..., Server], upstream: Upstream
) -> None:
    server = start_server(**proxy_env(upstream))
    etag = config(server, server.key).headers["etag"]
    server.stop()
    upstream.down()
    server.start()

    answer = config(server, server.key)
    assert (answer.status_code, answer.headers[STALE]) == (200, "true")
    assert answer.json() == inline_bundle()
    assert answer.headers["etag"] == etag
    client = sdk(server, server.key)
    try:
        assert client.wait_for_ready(10)
        assert color(client, TREATMENT_UNIT) == "green"
    finally:
        client.close()


# --- keys the upstream refuses ---------------------------------------------------------------


def test_a_config_answer_past_proxy_max_answer_bytes_is_502_or_the_cached_bundle(
    start_server: Callable[..., Server], upstream: Upstream
) -> None:
    """Read up to the bound, never whole: a bundle grown past it is refused (502) to a key
    with nothing cached, and the last good bundle is served stale to one with it."""
    bound = max(1024, 4 * len(json.dumps(inline_bundle())))  # 1024: the setting's least
    server = start_server(**proxy_env(upstream, COLLECTOR_PROXY_MAX_ANSWER_BYTES=str(bound)))
    cached_key = "traffical_sk_cached_big"
    assert config(server, cached_key).status_code == 200
    grown = {**inline_bundle(), "padding": "x" * (2 * bound)}
    upstream.set_bundle(PROJECT, ENV, grown)

    stale = config(server, cached_key)
    fresh = config(server, "traffical_sk_never_cached_big")

    assert stale.status_code == 200 and stale.headers[STALE] == "true"
    assert stale.json() == inline_bundle()
    assert_error_shape(fresh, 502)
    assert "larger than" in fresh.json()["message"]


def test_refused_keys_get_the_upstreams_answer_and_nothing_from_the_cache(
    collector: Server, upstream: Upstream
) -> None:
    good, bad = "traffical_sk_good", "traffical_sk_bad"
    upstream.accept_keys({good})
    assert config(collector, good).status_code == 200

    refused = config(collector, bad)
    assert refused.status_code == 401
    assert refused.json() == {"error": "Unauthorized", "message": "Invalid or expired API key"}

    upstream.down()
    assert_error_shape(config(collector, bad), 502)  # nothing was cached for it
    assert config(collector, good).headers[STALE] == "true"

    # The upstream stops accepting the good key: its cached bundle goes with it.
    upstream.up()
    upstream.accept_keys({"traffical_sk_someone_else"})
    assert config(collector, good).status_code == 401
    upstream.down()
    assert_error_shape(config(collector, good), 502)


def test_a_key_refused_for_one_project_keeps_its_bundle_for_another(
    collector: Server, upstream: Upstream
) -> None:
    key = "traffical_sk_scoped"
    upstream.set_bundle("proj_other", ENV, inline_bundle(project_id="proj_other"))
    upstream.require_keys({(PROJECT, ENV): key})
    assert config(collector, key).status_code == 200
    forbidden = config(collector, key, project="proj_other")
    assert forbidden.status_code == 403
    assert "restricted" in forbidden.json()["message"]

    upstream.down()
    assert config(collector, key).headers[STALE] == "true"
    assert_error_shape(config(collector, key, project="proj_other"), 502)


# --- resolve and decide ---------------------------------------------------------------------

SDK_HEADERS = {
    "X-Org-Id": ORG,
    "X-Project-Id": PROJECT,
    "X-Env": ENV,
    "X-SDK-Name": "ios",
    "X-SDK-Version": "1.2.3",
    "User-Agent": "TrafficalSDK/1.2.3",
    "Accept": "application/json",
}


@pytest.mark.parametrize(
    "path",
    ["/v1/resolve", "/v1/decide/pol_checkout", "/v1/decide/batch", "/v1/decide/entity/batch"],
)
def test_resolve_and_decide_pass_through_with_their_headers(
    collector: Server, upstream: Upstream, path: str
) -> None:
    body = b'{"context": {"userId": "u1"}, "env": "production", "parameters": ["a.b"]}'
    upstream.answer_with(
        path,
        {"decisionId": "dec_1", "assignments": {"a.b": 2}},
        headers={"Cache-Control": "no-store", "ETag": '"r1"', "X-Internal": "not passed"},
    )
    answer = httpx.post(
        f"{collector.url}{path}",
        content=body,
        headers={
            "Authorization": "Bearer traffical_sk_resolver",
            "Content-Type": "application/json",
            "Cookie": "session=secret",
            **SDK_HEADERS,
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"decisionId": "dec_1", "assignments": {"a.b": 2}}
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["etag"] == '"r1"'
    assert "x-internal" not in answer.headers

    [call] = upstream.sdk_requests(path)
    assert (call.method, call.path, call.body) == ("POST", path, body)
    assert call.key == "traffical_sk_resolver"
    for name, value in SDK_HEADERS.items():
        assert call.headers[name.lower()] == value, name
    assert call.headers["content-type"] == "application/json"
    assert "cookie" not in call.headers


def test_upstream_errors_on_decide_are_passed_on(collector: Server, upstream: Upstream) -> None:
    headers = {"Authorization": "Bearer traffical_sk_x", "Content-Type": "application/json"}
    url = f"{collector.url}/v1/decide/pol_1"
    upstream.answer_with("/v1/decide/pol_1", {"error": "Unprocessable", "message": "m"}, 422)
    assert httpx.post(url, content=b"{}", headers=headers).status_code == 422

    upstream.fail(429, retry_after=7, times=1)
    limited = httpx.post(url, content=b"{}", headers=headers)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")

    upstream.accept_keys({"traffical_sk_other"})
    assert httpx.post(url, content=b"{}", headers=headers).status_code == 401


def test_a_slow_upstream_gets_a_quick_504_on_decide_and_stale_config(
    collector: Server, upstream: Upstream
) -> None:
    key = "traffical_sk_slow"
    assert config(collector, key).status_code == 200
    upstream.slow(5)

    started = time.monotonic()
    answer = httpx.post(
        f"{collector.url}/v1/resolve",
        content=b"{}",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=10,
    )
    took = time.monotonic() - started
    body = assert_error_shape(answer, 504)
    assert "did not answer within 0.5 s" in body["message"]
    assert took < DECIDE_TIMEOUT_S + 1.0, took

    started = time.monotonic()
    stale = config(collector, key)
    took = time.monotonic() - started
    assert (stale.status_code, stale.headers[STALE]) == (200, "true")
    assert took < CONFIG_TIMEOUT_S + 1.0, took


def test_a_redirect_from_the_upstream_is_never_passed_on(
    collector: Server, upstream: Upstream
) -> None:
    key = "traffical_sk_redirected"
    assert config(collector, key).status_code == 200
    upstream.clear()
    upstream.redirect("https://elsewhere.example/v1/", status=301)

    for path in ("/v1/resolve", "/v1/decide/batch"):
        answer = httpx.post(
            f"{collector.url}{path}",
            content=b"{}",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        body = assert_error_shape(answer, 502)
        assert "redirect" in body["message"]
        assert "location" not in answer.headers

    fresh = config(collector, "traffical_sk_never_cached")
    assert_error_shape(fresh, 502)
    assert "location" not in fresh.headers
    cached = config(collector, key)
    assert (cached.status_code, cached.headers[STALE]) == (200, "true")
    assert [r.status for r in upstream.sdk_requests()] == [301] * 4


# --- CORS, no upstream, counts ---------------------------------------------------------------


def test_cors_preflight_and_answer_on_config_and_decide(collector: Server) -> None:
    for path, method, asked in (
        (f"/v1/config/{PROJECT}?env={ENV}", "GET", "authorization, if-none-match"),
        ("/v1/decide/batch", "POST", "authorization, content-type, x-org-id, x-env"),
    ):
        preflight = httpx.options(
            f"{collector.url}{path}",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": asked,
            },
        )
        assert preflight.status_code == 204, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert all(name.strip() in allowed for name in asked.split(","))
        assert method in preflight.headers["access-control-allow-methods"]

    answer = config(collector, "traffical_pk_browser", Origin=ORIGIN)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "etag" in exposed and STALE in exposed


def test_without_an_upstream_these_calls_answer_503(server: Server) -> None:
    answer = config(server, server.key)
    body = assert_error_shape(answer, 503)
    assert "upstream_url" in body["message"]
    assert answer.headers["retry-after"] == "60"
    resolve = httpx.post(f"{server.url}/v1/resolve", json={}, headers={"X-Env": ENV})
    assert_error_shape(resolve, 503)


def test_proxied_calls_are_counted_in_status_and_metrics(
    collector: Server, upstream: Upstream
) -> None:
    def counted() -> dict[str, dict[str, int]]:
        answer = httpx.get(
            f"{collector.url}/v1/stats",
            headers={"Authorization": f"Bearer {admin_key(collector.data_dir)}"},
        )
        assert answer.status_code == 200, answer.text
        document = answer.json()["proxy"]
        assert document["cache"]["entries"] >= 1 and document["cache"]["bytes"] > 0
        requests: dict[str, dict[str, int]] = document["requests"]
        return requests

    before = counted()
    key = "traffical_sk_counted"
    etag = config(collector, key).headers["etag"]  # ok
    config(collector, key, etag=etag)  # not_modified
    upstream.fail(503)
    config(collector, key)  # stale
    httpx.post(f"{collector.url}/v1/resolve", content=b"{}")  # upstream_error (503)
    upstream.ok()
    upstream.accept_keys({"traffical_sk_nobody"})
    httpx.post(f"{collector.url}/v1/decide/batch", content=b"{}")  # rejected (401)
    wanted = {
        ("config", "ok"): 1,
        ("config", "not_modified"): 1,
        ("config", "stale"): 1,
        ("resolve", "upstream_error"): 1,
        ("decide", "rejected"): 1,
    }

    def grown() -> dict[str, dict[str, int]] | None:
        now = counted()
        for (route, outcome), n in wanted.items():
            if now[route].get(outcome, 0) - before[route].get(outcome, 0) < n:
                return None
        return now

    after = eventually(grown, "the proxied calls counted in the status document")
    assert set(after) == {"config", "resolve", "decide"}

    text = httpx.get(f"{collector.url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    counter = families["collector_proxy_requests"]
    assert counter.type == "counter"
    values = {
        (s.labels["route"], s.labels["outcome"]): s.value
        for s in counter.samples
        if s.name.endswith("_total")
    }
    for labels in wanted:
        assert values.get(labels, 0) >= 1, labels
    assert families["collector_proxy_request_duration_seconds"].type == "histogram"
    assert families["collector_config_cache_entries"].samples[0].value >= 1


# --- the cache's bounds ----------------------------------------------------------------------


def bundle_of(size: int, at: float | None = None) -> CachedBundle:
    return CachedBundle('"e"', "application/json", None, b"x" * size, at or time.time())


def test_cache_keeps_the_most_recently_used_within_its_bounds(tmp_path: Path) -> None:
    cache = ConfigCache(DataDir(tmp_path), max_entries=2, max_bytes=1000, max_stale_seconds=60)
    try:
        a, b, c = (Slot("p", "env=production", key) for key in ("ka", "kb", "kc"))
        cache.put(a, bundle_of(100))
        cache.put(b, bundle_of(100))
        time.sleep(0.01)
        assert cache.get(a) is not None  # used: b is now the least recently used
        cache.put(c, bundle_of(100))
        assert cache.get(b) is None
        assert cache.get(a) is not None and cache.get(c) is not None
        assert cache.summary() == (2, 200)

        cache.put(b, bundle_of(950))  # over the byte bound with the others: they go
        assert cache.summary() == (1, 950)
        cache.put(a, bundle_of(1001))  # larger than the whole cache: not kept
        assert cache.get(a) is None

        cache.put(c, bundle_of(10, at=time.time() - 61))  # accepted too long ago
        assert cache.get(c) is None
        cache.forget_key("kb")
        assert cache.summary() == (0, 0)
    finally:
        cache.close()


def test_an_unreadable_cache_file_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "config-cache.db"
    path.write_bytes(b"this is not a database" * 100)
    cache = ConfigCache(DataDir(tmp_path), max_entries=10, max_bytes=1000, max_stale_seconds=60)
    try:
        assert cache.summary() == (0, 0)
        cache.put(Slot("p", "env=e", "k"), bundle_of(10))
        assert cache.summary() == (1, 10)
    finally:
        cache.close()
