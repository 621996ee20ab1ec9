"""What the collector is doing (issue 4): rolling counts, `collector status`, `GET /v1/stats`
and `GET /metrics`, end to end.

Real `collector serve` and `collector forward` processes, a real upstream (`upstream.py`),
and the real files of the data directory; nothing of ours is mocked. The server writes its
counts to `counts.db` every second, so tests wait for them (`settle`: until the server has
counted every request made) instead of sleeping, then compare one snapshot exactly.
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from collector.ops import srm
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir

from conftest import (
    COLLECTOR,
    ROOT,
    Server,
    admin_key,
    create_key,
    event,
    free_port,
    run_cli,
    status_json,
    terminate,
)
from upstream import Upstream

T = TypeVar("T")

WAIT_S = 20.0
UPSTREAM_KEY = "traffical_sk_upstream"
# A forwarder that retries quickly and stops quickly, so tests stay short.
FORWARDER_ENV = {
    "COLLECTOR_RETRY_INITIAL_SECONDS": "0.05",
    "COLLECTOR_RETRY_MAX_SECONDS": "0.5",
    "COLLECTOR_STOP_TIMEOUT_SECONDS": "2",
    "COLLECTOR_FORWARD_TIMEOUT_SECONDS": "5",
}
BATCH = 1000  # events per request, the documented maximum

STATUS_KEYS = {
    "healthy",
    "problems",
    "warnings",
    "generated_at",
    "data_dir",
    "server",
    "forwarder",
    "queue",
    "ledger",
    "rates",
    "top_events",
    "allocations",
    "config_drift",
    "event_time",
    "sample_ratio",
    "rejected",
    "upstream_answers",
    "quarantined",
    "dead_letters",
    "proxy",
    "recovered",
}
QUEUE_KEYS = {
    "events",
    "rows",
    "bytes",
    "oldest_event_age_seconds",
    "disk_budget_bytes",
    "disk_budget_used",
}
RATE_NAMES = {"accepted", "written", "rejected", "forwarded", "dead_lettered"}
RATE_WINDOWS = {"1m", "5m", "60m"}
TABLE_TITLES = (
    "processes",
    "queue",
    "rates",
    "exposures and conversions per allocation",
    "top track events",
)


# --- helpers -------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], T], what: str, timeout: float = WAIT_S, detail: Callable[[], str] = str
) -> T:
    """Poll `condition` (state in other processes and files) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(0.05)


def exposure(
    policy: str,
    allocation: str,
    *,
    layer: str = "layer_1",
    probability: float | None = None,
    **fields: Any,
) -> dict[str, Any]:
    assignment: dict[str, Any] = {
        "layerId": layer,
        "bucket": 7,
        "policyId": policy,
        "allocationName": allocation,
    }
    if probability is not None:
        assignment["probability"] = probability
    return event("exposure", layers=[assignment], **fields)


def track(name: str, **fields: Any) -> dict[str, Any]:
    return event("track", event=name, **fields)


def post(server: Server, events: list[Any]) -> int:
    """POST `events` in batches of up to 1000; the number of requests made."""
    requests = 0
    for start in range(0, len(events), BATCH):
        answer = server.post({"events": events[start : start + BATCH]})
        assert answer.status_code == 200, answer.text
        requests += 1
    return requests


def get_stats(server: Server, key: str | None = None) -> httpx.Response:
    """/v1/stats with `key` (by default an admin:read key: the whole document)."""
    headers = {} if key == "" else {"Authorization": f"Bearer {key or admin_key(server.data_dir)}"}
    return httpx.get(f"{server.url}/v1/stats", headers=headers, timeout=30)


def stats(server: Server) -> dict[str, Any]:
    answer = get_stats(server)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def stats_when(server: Server, condition: Callable[[dict[str, Any]], bool], what: str) -> Any:
    """The status document from `/v1/stats` once `condition` holds for it."""
    seen: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        seen.update(stats(server))
        return seen if condition(seen) else None

    return wait_for(check, what, detail=lambda: json.dumps(seen, indent=1)[:6000])


def metrics(server: Server) -> dict[str, Metric]:
    answer = httpx.get(f"{server.url}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(answer.text)}


def samples(families: dict[str, Metric], family: str, suffix: str = "") -> dict[Any, float]:
    """{frozenset of label items: value} for the samples of `family` named family+suffix."""
    return {
        frozenset(sample.labels.items()): sample.value
        for sample in families[family].samples
        if sample.name == family + suffix
    }


def total(families: dict[str, Metric], counter: str, **labels: str) -> float:
    """Sum of `counter`'s samples whose labels include `labels`."""
    return sum(
        value
        for key, value in samples(families, counter, "_total").items()
        if set(labels.items()) <= key
    )


def by_labels(families: dict[str, Metric], counter: str, *names: str) -> dict[Any, float]:
    """A counter's samples as {(label values in `names` order): value}."""
    return {
        tuple(dict(key)[name] for name in names) if len(names) > 1 else dict(key)[names[0]]: value
        for key, value in samples(families, counter, "_total").items()
    }


def settle(server: Server, requests: int) -> dict[str, Metric]:
    """Wait until the server has counted `requests` events API requests (counted last, after
    everything else a request counts) in counts.db; the metrics then."""
    seen: dict[str, Metric] = {}

    def counted() -> bool:
        seen.update(metrics(server))
        return total(seen, "collector_requests") == requests

    wait_for(
        counted, f"{requests} requests counted", detail=lambda: str(seen.get("collector_requests"))
    )
    return seen


def status_text(data_dir: Path, columns: int = 160) -> subprocess.CompletedProcess[str]:
    return run_cli("status", data_dir=data_dir, env={"COLUMNS": str(columns)})


def allocation(
    policy: str,
    name: str,
    exposures: int,
    conversions: int = 0,
    project: str = "proj_test",
    env: str = "production",
) -> dict[str, Any]:
    return {
        "project": project,
        "env": env,
        "policy": policy,
        "allocation": name,
        "exposures": exposures,
        "conversions": conversions,
    }


def top(
    name: str, count: int, project: str = "proj_test", env: str = "production"
) -> dict[str, Any]:
    return {"project": project, "env": env, "event": name, "count": count}


def window_counts(data_dir: Path, name: Count) -> dict[tuple[str, ...], float]:
    """One count summed over the window, read from the data directory's counts.db (those
    read only over the window keep no running totals)."""
    counts = Counts.reader(DataDir(data_dir))
    try:
        return counts.recent(name, 60)
    finally:
        counts.close()


def count_totals(data_dir: Path, name: str) -> dict[tuple[str, ...], float]:
    """Running totals of one count, read from the data directory's counts.db."""
    counts = Counts.reader(DataDir(data_dir))
    try:
        return counts.all_totals().get(name, {})
    finally:
        counts.close()


@dataclass
class Forwarder:
    """A running `collector forward` process."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        terminate(self.process)


def launch_forwarder(data_dir: Path, upstream: Upstream, log_path: Path) -> Forwarder:
    env = {
        **os.environ,
        "COLLECTOR_DATA_DIR": str(data_dir),
        "COLLECTOR_UPSTREAM_URL": upstream.url,
        "COLLECTOR_UPSTREAM_KEY": UPSTREAM_KEY,
        **FORWARDER_ENV,
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*COLLECTOR, "forward"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Forwarder(process, log_path)


# --- the sample-ratio test's arithmetic -----------------------------------------------------


@pytest.mark.parametrize(
    ("statistic", "dof", "expected"),
    [
        (3.841459, 1, 0.05),
        (10.827566, 1, 0.001),
        (20.0, 3, 0.00016974243555282624),
        (7.5, 2, math.exp(-3.75)),
        (1.0, 1, math.erfc(math.sqrt(0.5))),
        (16.0, 1, math.erfc(math.sqrt(8.0))),
        (2.0, 4, 2 * math.exp(-1.0)),  # sf(x, 4) = (1 + x/2) exp(-x/2)
        (0.0, 3, 1.0),
    ],
)
def test_chi_square_sf_matches_known_values(statistic: float, dof: int, expected: float) -> None:
    assert srm.chi_square_sf(statistic, dof) == pytest.approx(expected, rel=1e-6)


def test_chi_square_sf_far_in_the_tail_is_tiny_not_negative() -> None:
    p_value = srm.chi_square_sf(160.0, 1)  # 700 vs 300 where 500/500 was declared
    assert 0 < p_value < 1e-30
    assert srm.chi_square_sf(400.0, 2) == pytest.approx(math.exp(-200.0), rel=1e-6)


def test_srm_check_needs_enough_exposures_and_declared_shares() -> None:
    half = {"A": 0.5, "B": 0.5}

    def sums(n: dict[str, float], shares: dict[str, float]) -> dict[str, float]:
        return {a: n[a] * shares[a] for a in n}

    skewed = {"A": 700.0, "B": 300.0}
    checked, p_value, shares, _ = srm.check(skewed, sums(skewed, half), skewed)
    assert checked and p_value is not None and p_value < srm.P_THRESHOLD
    assert shares == half
    few = {"A": 60.0, "B": 30.0}  # skewed, but 90 < 100 exposures
    assert srm.check(few, sums(few, half), few)[:2] == (False, None)
    rare = {"A": 198.0, "B": 2.0}  # 1% declared: an expected count of 2 < 5
    declared = {"A": 0.99, "B": 0.01}
    assert srm.check(rare, sums(rare, declared), rare)[:2] == (False, None)
    undeclared = {"A": 700.0, "B": 300.0}
    assert srm.check(undeclared, {"A": 350.0}, {"A": 700.0})[:2] == (False, None)
    assert srm.check({"A": 500.0}, {"A": 250.0}, {"A": 500.0})[:2] == (False, None)


# --- each count ------------------------------------------------------------------------------


def test_each_count_in_the_status_document_and_the_metrics(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    other = {"orgId": "org_b", "projectId": "proj_b", "env": "staging"}
    where = {k: event()[k] for k in ("orgId", "projectId", "env")}
    events: list[Any] = [
        *[exposure("pol_1", "control") for _ in range(30)],
        *[exposure("pol_1", "treatment") for _ in range(20)],
        *[exposure("pol_2", "blue", layer="layer_2") for _ in range(10)],
        # Of three layers only the first is an exposure: skipped and attribution-only are not.
        event(
            "exposure",
            layers=[
                {"layerId": "layer_3", "bucket": 5, "policyId": "pol_3", "allocationName": "x"},
                {"layerId": "layer_4", "bucket": -1, "policyId": "pol_4", "allocationName": "y"},
                {
                    "layerId": "layer_5",
                    "bucket": 9,
                    "policyId": "pol_5",
                    "allocationName": "z",
                    "attributionOnly": True,
                },
            ],
        ),
        *[event("decision") for _ in range(3)],
        *[track("purchase") for _ in range(12)],
        *[track("signup") for _ in range(5)],
        *[track("view") for _ in range(3)],
        event("exposure", layers="x"),
        event("exposure", layers="x"),
        {"type": "bogus", **where},
        42,
    ]
    requests = post(server, events)
    requests += post(
        server,
        [*[exposure("pol_1", "control", **other) for _ in range(5)], track("purchase", **other)],
    )
    families = settle(server, requests)

    # The metrics' running totals.
    a, b = ("org_test", "proj_test", "production"), ("org_b", "proj_b", "staging")
    received = {
        (*a, "exposure"): 63,
        (*a, "decision"): 3,
        (*a, "track"): 20,
        (*a, "invalid"): 1,
        ("", "", "", "invalid"): 1,
        (*b, "exposure"): 5,
        (*b, "track"): 1,
    }
    accepted = {
        (*a, "exposure"): 61,
        (*a, "decision"): 3,
        (*a, "track"): 20,
        (*b, "exposure"): 5,
        (*b, "track"): 1,
    }
    target = ("org", "project", "env", "type")
    assert by_labels(families, "collector_events_received", *target) == received
    assert by_labels(families, "collector_events_accepted", *target) == accepted
    assert by_labels(families, "collector_events_written", *target) == accepted
    assert by_labels(families, "collector_events_deduplicated", *target) == {}
    rejected = {"invalid layers": 2, "invalid event": 2}
    assert by_labels(families, "collector_events_rejected", "reason") == rejected
    assert by_labels(families, "collector_requests", "status") == {"200": 2}

    # Exposures by layer, policy and allocation; track events by name (counts.db itself).
    assert window_counts(server.data_dir, Count.EXPOSURES) == {
        ("proj_test", "production", "layer_1", "pol_1", "control"): 30,
        ("proj_test", "production", "layer_1", "pol_1", "treatment"): 20,
        ("proj_test", "production", "layer_2", "pol_2", "blue"): 10,
        ("proj_test", "production", "layer_3", "pol_3", "x"): 1,
        ("proj_b", "staging", "layer_1", "pol_1", "control"): 5,
    }
    assert window_counts(server.data_dir, Count.TRACK_EVENTS) == {
        ("proj_test", "production", "purchase"): 12,
        ("proj_test", "production", "signup"): 5,
        ("proj_test", "production", "view"): 3,
        ("proj_b", "staging", "purchase"): 1,
    }

    # The status document, from the server and from `collector status --json`.
    document = stats(server)
    assert document["allocations"] == [
        allocation("pol_1", "control", 5, project="proj_b", env="staging"),
        allocation("pol_1", "control", 30),
        allocation("pol_1", "treatment", 20),
        allocation("pol_2", "blue", 10),
        allocation("pol_3", "x", 1),
    ]
    assert document["top_events"] == [
        top("purchase", 12),
        top("signup", 5),
        top("view", 3),
        top("purchase", 1, "proj_b", "staging"),
    ]
    assert document["rejected"] == rejected
    rates = document["rates"]
    for name, count in (("accepted", 90), ("written", 90), ("rejected", 4)):
        # Over the last full minutes and the part of this one that has passed.
        assert count / 120 - 0.001 <= rates[name]["1m"] <= count / 60 + 0.001, (name, rates)
        assert count / 360 - 0.001 <= rates[name]["5m"] <= count / 300 + 0.001, (name, rates)
        assert count / 3660 - 0.001 <= rates[name]["60m"] <= count / 3600 + 0.001, (name, rates)
    assert rates["forwarded"] == rates["dead_lettered"] == {"1m": 0, "5m": 0, "60m": 0}
    assert document["queue"]["events"] == 90
    _, from_cli = status_json(server.data_dir)
    for key in ("allocations", "top_events", "rejected", "sample_ratio"):
        assert from_cli[key] == document[key], key


def test_conversions_attributed_through_decision_id_and_the_sdk_attribution(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    two_layers = [
        {"layerId": "layer_1", "bucket": 3, "policyId": "pol_1", "allocationName": "treatment"},
        {"layerId": "layer_2", "bucket": 8, "policyId": "pol_2", "allocationName": "blue"},
    ]
    sdk_says = [{"layerId": "layer_9", "policyId": "pol_sdk", "allocationName": "variant"}]
    requests = post(
        server,
        [
            event("decision", id="dec-1", layers=two_layers),
            exposure("pol_1", "control", decisionId="dec-2"),
        ],
    )
    # Later requests: the server remembers the decisions and exposures it saw.
    requests += post(
        server,
        [
            # Through the decision's id: one conversion per policy of the decision.
            track("purchase", decisionId="dec-1"),
            # Through an exposure's decisionId.
            track("purchase", decisionId="dec-2"),
            track("signup", decisionId="dec-2"),
            # Through the SDK's own attribution, with no decisionId or an unknown one.
            track("purchase", attribution=sdk_says),
            track("purchase", decisionId="dec-unknown", attribution=sdk_says),
            # A remembered decision wins over the SDK's attribution.
            track(
                "purchase",
                decisionId="dec-1",
                attribution=[{"layerId": "l", "policyId": "pol_sdk", "allocationName": "other"}],
            ),
            # Nothing to attribute to.
            track("purchase", decisionId="dec-unknown"),
            track("purchase"),
        ],
    )
    settle(server, requests)

    document = stats(server)
    assert document["allocations"] == [
        allocation("pol_1", "control", 1, conversions=2),
        allocation("pol_1", "treatment", 0, conversions=2),
        allocation("pol_2", "blue", 0, conversions=2),
        allocation("pol_sdk", "variant", 0, conversions=2),
    ]
    assert document["top_events"] == [top("purchase", 7), top("signup", 1)]
    where = ("proj_test", "production")
    assert window_counts(server.data_dir, Count.CONVERSIONS) == {
        (*where, "pol_1", "treatment", "purchase"): 2,
        (*where, "pol_2", "blue", "purchase"): 2,
        (*where, "pol_1", "control", "purchase"): 1,
        (*where, "pol_1", "control", "signup"): 1,
        (*where, "pol_sdk", "variant", "purchase"): 2,
    }


def test_duplicates_are_counted_as_deduplicated_not_as_exposures_twice(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    batch = [
        *[exposure("pol_1", "control", id=f"x-{i}", decisionId=f"d-{i}") for i in range(10)],
        *[track("purchase", id=f"t-{i}", decisionId=f"d-{i}") for i in range(4)],
    ]
    assert server.post({"events": batch}).json() == {
        "accepted": 14,
        "written": 14,
        "pipelineWritten": 14,
    }
    # A client retry of the same batch: nothing is written again.
    assert server.post({"events": batch}).json() == {
        "accepted": 14,
        "written": 0,
        "pipelineWritten": 0,
    }
    families = settle(server, 2)

    assert total(families, "collector_events_received") == 28
    assert total(families, "collector_events_accepted") == 28
    assert total(families, "collector_events_written") == 14
    assert total(families, "collector_events_deduplicated", type="exposure") == 10
    assert total(families, "collector_events_deduplicated", type="track") == 4
    document = stats(server)
    assert document["allocations"] == [allocation("pol_1", "control", 10, conversions=4)]
    assert document["top_events"] == [top("purchase", 4)]
    assert document["rates"]["written"]["1m"] <= 14 / 60 + 0.001


def test_requests_by_status_and_their_latency(start_server: Callable[..., Server]) -> None:
    server = start_server()
    elsewhere = create_key(server.data_dir, "--scope", "sdk:write", "--project", "proj_other")
    assert server.post({"events": [track("purchase")]}).status_code == 200
    assert server.post({"events": [{"type": "bogus"}]}).status_code == 400
    assert (
        server.post(content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 400
    )
    assert server.post({"events": [track("purchase")]}, key="traffical_sk_wrong").status_code == 401
    assert server.post(content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    answer = server.post({"events": [track("purchase"), track("signup")]}, key=elsewhere)
    assert answer.status_code == 403, answer.text
    families = settle(server, 6)

    assert by_labels(families, "collector_requests", "status") == {
        "200": 1,
        "400": 2,
        "401": 1,
        "403": 1,
        "415": 1,
    }
    assert by_labels(families, "collector_events_rejected", "reason") == {
        "invalid event": 1,
        "Forbidden": 2,
    }
    assert total(families, "collector_events_written") == 1
    histogram = samples(families, "collector_request_duration_seconds", "_count")
    assert list(histogram.values()) == [6]
    assert stats(server)["rejected"] == {"invalid event": 1, "Forbidden": 2}


# --- persistence ---------------------------------------------------------------------------


def test_counts_survive_a_restart_and_status_reads_them_with_the_server_down(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    post(server, [*[exposure("pol_1", "A") for _ in range(6)], track("purchase"), 42])
    settle(server, 1)
    server.kill()  # what was flushed is kept; at most the last second is lost
    server.start()
    post(server, [*[exposure("pol_1", "A") for _ in range(4)], track("purchase"), track("view")])
    families = settle(server, 2)
    assert total(families, "collector_events_written") == 13
    assert by_labels(families, "collector_events_rejected", "reason") == {"invalid event": 1}
    server.stop()

    # Another process, with the server down, reads the counts and the queue from the data
    # directory alone.
    code, document = status_json(server.data_dir)
    assert code == 1
    assert document["healthy"] is False
    assert "server is down" in document["problems"]
    assert document["server"]["up"] is False
    assert document["server"]["pid"] is None
    assert document["allocations"] == [allocation("pol_1", "A", 10)]
    assert document["top_events"] == [top("purchase", 2), top("view", 1)]
    assert document["rejected"] == {"invalid event": 1}
    queue = document["queue"]
    assert queue["events"] == 13 and 1 <= queue["rows"] <= 2 and queue["bytes"] > 0
    assert queue["oldest_event_age_seconds"] >= 0
    assert sum(count_totals(server.data_dir, "events_written").values()) == 13
    assert count_totals(server.data_dir, "requests") == {("200",): 2}

    done = status_text(server.data_dir)
    assert done.returncode == 1
    assert done.stdout.startswith("UNHEALTHY: ")
    assert "server is down" in done.stdout.splitlines()[0]
    assert re.search(r"server\s+│\s+down", done.stdout)
    assert re.search(r"pol_1\s+│\s+A\s+│\s+10\s", done.stdout)


# --- collector status ----------------------------------------------------------------------


@dataclass
class Fleet:
    """A server and a forwarder up, forwarding to an upstream, after some traffic."""

    server: Server
    forwarder: Forwarder
    forwarded: int  # events the upstream took (all valid ones but the one it rejects)

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    data_dir = tmp / "data"
    with Upstream() as upstream:
        upstream.reject_ids({"fleet-poison"})
        server = Server(data_dir, free_port(), {})
        server.key = create_key(data_dir, "--scope", "sdk:write", "--name", "fleet")
        forwarder: Forwarder | None = None
        try:
            server.start()
            forwarder = launch_forwarder(data_dir, upstream, tmp / "forwarder.log")
            events: list[Any] = [
                *[
                    exposure(
                        "pol_fleet", "AB"[i % 2], probability=0.5, id=f"x{i}", decisionId=f"d{i}"
                    )
                    for i in range(120)
                ],
                *[track("purchase", id=f"p{i}", decisionId=f"d{i}") for i in range(20)],
                *[track("add_to_cart", id=f"c{i}") for i in range(30)],
                track("purchase", id="fleet-poison"),
            ]  # no invalid event: it would be quarantined, a problem (test_quarantine.py)
            requests = post(server, events)
            settle(server, requests)
            stats_when(
                server,
                lambda d: (
                    d["forwarder"]["up"]
                    and d["forwarder"]["upstream"] == "ok"
                    and d["queue"]["events"] == 0
                    and d["dead_letters"] == 1
                    # forwarder.json is rewritten every 2 s, so it may lag the queue.
                    and d["forwarder"]["last_success"] is not None
                ),
                "the forwarder to drain the queue",
            )
            yield Fleet(server, forwarder, forwarded=len(events) - 1)
        finally:
            if forwarder is not None:
                forwarder.stop()
            server.stop()


def test_status_with_everything_up_is_healthy_json(fleet: Fleet) -> None:
    code, document = status_json(fleet.data_dir)

    assert code == 0
    assert set(document) == STATUS_KEYS
    assert document["healthy"] is True
    assert document["problems"] == []
    assert document["warnings"] == ["1 dead-lettered events (collector dlq list)"]
    assert datetime.fromisoformat(document["generated_at"]).tzinfo is not None
    assert document["data_dir"] == str(fleet.data_dir)
    server, forwarder = document["server"], document["forwarder"]
    assert server["up"] is True
    assert server["pid"] == fleet.server.process.pid  # type: ignore[union-attr]
    assert server["url"].endswith(f":{fleet.server.port}")
    assert forwarder["up"] is True
    assert forwarder["pid"] == fleet.forwarder.process.pid
    assert forwarder["upstream"] == "ok"
    assert forwarder["last_success"] is not None
    assert set(document["queue"]) == QUEUE_KEYS
    assert document["queue"]["events"] == document["queue"]["rows"] == 0
    assert document["queue"]["oldest_event_age_seconds"] is None
    assert 0 <= document["queue"]["disk_budget_used"] < 0.01
    assert set(document["rates"]) == RATE_NAMES
    for rates in document["rates"].values():
        assert set(rates) == RATE_WINDOWS
        assert all(isinstance(rate, int | float) and rate >= 0 for rate in rates.values())
    assert document["rates"]["written"]["1m"] > 0
    assert document["top_events"] == [top("add_to_cart", 30), top("purchase", 21)]
    assert document["allocations"] == [
        allocation("pol_fleet", "A", 60, conversions=10),
        allocation("pol_fleet", "B", 60, conversions=10),
    ]
    [verdict] = document["sample_ratio"]
    assert verdict["policy"] == "pol_fleet"
    assert verdict["checked"] is True and verdict["mismatch"] is False
    assert verdict["p_value"] == pytest.approx(1.0)
    assert document["rejected"] == {}
    assert document["quarantined"] == []
    assert document["dead_letters"] == 1


def test_status_human_output_shows_the_verdict_and_the_tables(fleet: Fleet) -> None:
    done = status_text(fleet.data_dir)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "healthy"
    assert "UNHEALTHY" not in done.stdout
    assert "warning: 1 dead-lettered events" in done.stdout
    for title in TABLE_TITLES:
        assert any(line.startswith(title) for line in lines), title
    assert re.search(r"server\s+│\s+up", done.stdout)
    assert re.search(r"forwarder\s+│\s+up\s+│\s+upstream ok", done.stdout)
    row = r"pol_fleet\s+│\s+A\s+│\s+60\s+│\s+50\.0% \(50\.0%\)\s+│\s+10\s+│\s+ok p=1.00"
    assert re.search(row, done.stdout), done.stdout
    assert re.search(r"proj_test/production\s+│\s+add_to_cart\s+│\s+30", done.stdout)


def test_status_human_output_does_not_cut_names_on_a_narrow_terminal(fleet: Fleet) -> None:
    done = status_text(fleet.data_dir, columns=80)

    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout  # long names wrap within their cells instead
    assert "add_to_cart" in done.stdout


def test_status_watch_refreshes_until_interrupted(fleet: Fleet) -> None:
    env = {
        **os.environ,
        "COLLECTOR_DATA_DIR": str(fleet.data_dir),
        "TERM": "xterm",
        "COLUMNS": "160",
        "LINES": "60",
    }
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*COLLECTOR, "status", "--watch"],
        cwd=ROOT,
        env=env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""

    def read(seconds: float) -> bool:
        """Add what the terminal shows within `seconds` to `output`; False if nothing."""
        nonlocal output
        if not select.select([controller], [], [], seconds)[0]:
            return False
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process has closed the terminal
            return False
        output += chunk
        return bool(chunk)

    def redrawn() -> bool:
        read(0.1)
        # Drawn once at start, then on each refresh (every 2 s); stopping draws once more,
        # so a second drawing must be seen before the interrupt.
        return output.count(b"top track events") >= 2

    try:
        wait_for(redrawn, "a refresh", timeout=15, detail=lambda: output.decode(errors="replace"))
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            read(0.05)
        while read(0.05):
            pass
        code = process.wait(timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)

    assert code == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    moments = set(re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text))
    generated = {m for m in moments if f" at {m}" in text}
    assert len(generated) >= 2, text
    assert "Traceback" not in text


def test_status_with_the_forwarder_down_is_unhealthy(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    with Upstream() as upstream:
        forwarder = launch_forwarder(server.data_dir, upstream, tmp_path / "forwarder.log")
        try:
            stats_when(
                server,
                lambda d: d["healthy"] and d["forwarder"]["upstream"] == "ok",
                "the forwarder to be up",
            )
            assert status_json(server.data_dir)[0] == 0
        finally:
            forwarder.stop()

    code, document = status_json(server.data_dir)
    assert code == 1
    assert document["problems"] == ["forwarder is down"]
    assert document["server"]["up"] is True
    assert document["forwarder"]["up"] is False
    assert document["forwarder"]["upstream"] == "unknown (forwarder down)"
    families = metrics(server)
    assert samples(families, "collector_up") == {
        frozenset({("process", "server")}): 1,
        frozenset({("process", "forwarder")}): 0,
    }
    assert samples(families, "collector_healthy") == {frozenset(): 0}
    done = status_text(server.data_dir)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == "UNHEALTHY: forwarder is down"


def test_status_without_a_data_dir_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    for args in ((), ("--json",)):
        done = run_cli("status", *args, data_dir=missing)
        assert done.returncode == 2, done.stdout
        assert "no collector data" in done.stderr
        assert done.stdout == ""
    assert not missing.exists()  # reading status creates nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("status", data_dir=empty).returncode == 2


def test_status_help_states_the_exit_codes(tmp_path: Path) -> None:
    done = run_cli("status", "--help", data_dir=tmp_path, env={"COLUMNS": "200"})
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "0 healthy" in text and "1 unhealthy" in text and "2 no data directory" in text


# --- /v1/stats -----------------------------------------------------------------------------


def test_stats_needs_a_valid_key_and_is_the_status_document(fleet: Fleet) -> None:
    assert get_stats(fleet.server, key="").status_code == 401
    assert get_stats(fleet.server, key="traffical_sk_not_a_key").status_code == 401

    answer = get_stats(fleet.server, key=admin_key(fleet.data_dir))  # admin:read: all of it
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    document = answer.json()
    _, from_cli = status_json(fleet.data_dir)
    assert set(document) == set(from_cli) == STATUS_KEYS
    for key in ("healthy", "problems", "data_dir", "top_events", "allocations", "sample_ratio"):
        assert document[key] == from_cli[key], key
    assert set(document["queue"]) == QUEUE_KEYS
    assert document["server"]["up"] and document["forwarder"]["up"]


def test_stats_is_an_operator_view_a_browser_key_never_reads(fleet: Fleet) -> None:
    """Any valid key, a publishable one included, was shown every project's event names
    and allocations, the data directory, pids and the upstream URL."""
    writer = create_key(fleet.data_dir, "--scope", "sdk:write", "--name", "writer-only")
    browser = create_key(
        fleet.data_dir, "--scope", "sdk:read", "--publishable", "--name", "browser"
    )
    for key in (writer, browser):
        refused = get_stats(fleet.server, key=key)
        assert refused.status_code == 403, refused.text
        assert "admin:read" in refused.json()["message"]
    publishable_admin = run_cli(
        "keys", "create", "--scope", "admin:read", "--publishable", data_dir=fleet.data_dir
    )
    assert publishable_admin.returncode == 2, publishable_admin.stdout

    reader = create_key(fleet.data_dir, "--scope", "sdk:read", "--name", "reader")
    answer = get_stats(fleet.server, key=reader)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert "data_dir" not in document and str(fleet.data_dir) not in answer.text
    assert {"pid", "url"}.isdisjoint(document["server"])
    assert {"pid", "upstream_url", "message"}.isdisjoint(document["forwarder"])
    upstream_url = get_stats(fleet.server).json()["forwarder"]["upstream_url"]
    assert upstream_url and upstream_url not in answer.text
    assert document["allocations"] == get_stats(fleet.server).json()["allocations"]


def test_stats_for_a_key_of_one_project_shows_that_project_alone(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    sent = [event("exposure", id=f"{project}-{n}", projectId=project) for n in range(3)
            for project in ("proj_test", "proj_other")]  # fmt: skip
    sent += [event(id="mine", event="my_signup"), event(id="theirs", projectId="proj_other",
             event="other_signup")]  # fmt: skip
    assert server.post({"events": sent}).status_code == 200
    both = {"proj_test", "proj_other"}
    # Exposures are counted by the server, track events by the writer: each flushes its own.
    stats_when(
        server,
        lambda d: all(
            {row["project"] for row in d[s]} == both for s in ("top_events", "allocations")
        ),
        "both projects counted",
    )

    for scope in ("admin:read", "sdk:read"):
        key = create_key(
            server.data_dir, "--scope", scope, "--project", "proj_test", "--name", f"{scope}-p"
        )
        answer = get_stats(server, key=key)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        for section in ("allocations", "top_events", "sample_ratio"):
            assert document[section], (scope, section)
            assert {row["project"] for row in document[section]} == {"proj_test"}, section
        assert "proj_other" not in answer.text and "other_signup" not in answer.text


# --- /metrics ------------------------------------------------------------------------------

SERVER_FAMILIES = {
    "collector_requests": "counter",
    "collector_events_received": "counter",
    "collector_events_accepted": "counter",
    "collector_events_written": "counter",
    "collector_events_deduplicated": "counter",
    "collector_events_rejected": "counter",
    "collector_queue_events": "gauge",
    "collector_queue_bytes": "gauge",
    "collector_queue_oldest_event_age_seconds": "gauge",
    "collector_disk_budget_used_ratio": "gauge",
    "collector_dead_letters": "gauge",
    "collector_up": "gauge",
    "collector_upstream_state": "gauge",
    "collector_request_duration_seconds": "histogram",
    "collector_sample_ratio_mismatch": "gauge",
    "collector_sample_ratio_p_value": "gauge",
    "collector_healthy": "gauge",
}
FORWARDER_FAMILIES = {
    "collector_events_forwarded": "counter",
    "collector_upstream_requests": "counter",
    "collector_events_dead_lettered": "counter",
}


def test_metrics_parse_with_the_documented_families(fleet: Fleet) -> None:
    families = metrics(fleet.server)

    for name, kind in {**SERVER_FAMILIES, **FORWARDER_FAMILIES}.items():
        assert name in families, name
        assert families[name].type == kind, name
    assert total(families, "collector_requests", status="200") >= 1
    assert total(families, "collector_events_written", type="track") == 51
    assert total(families, "collector_events_written") == fleet.forwarded + 1  # the poison too

    def gauge(name: str, **labels: str) -> float:
        return samples(families, name)[frozenset(labels.items())]

    assert gauge("collector_queue_events") == 0
    assert gauge("collector_queue_bytes") == 0
    assert gauge("collector_queue_oldest_event_age_seconds") == 0
    assert 0 <= gauge("collector_disk_budget_used_ratio") < 0.01
    assert gauge("collector_dead_letters") == 1
    assert gauge("collector_up", process="server") == 1
    assert gauge("collector_up", process="forwarder") == 1
    assert gauge("collector_upstream_state", state="ok") == 1
    assert gauge("collector_upstream_state", state="retrying") == 0
    assert gauge("collector_healthy") == 1
    policy = {"project": "proj_test", "env": "production", "policy": "pol_fleet"}
    assert gauge("collector_sample_ratio_mismatch", **policy) == 0
    assert gauge("collector_sample_ratio_p_value", **policy) == pytest.approx(1.0)
    buckets = samples(families, "collector_request_duration_seconds", "_bucket")
    assert {dict(key)["le"] for key in buckets} >= {"0.001", "1.0", "+Inf"}
    count = samples(families, "collector_request_duration_seconds", "_count")
    assert buckets[frozenset({("le", "+Inf")})] == sum(count.values()) >= 1


def test_metrics_answer_one_media_type_that_prometheus_3_accepts(fleet: Fleet) -> None:
    """Prometheus 3 refuses a media type with a repeated parameter (it answered
    `text/plain; version=...; charset=utf-8; charset=utf-8`), failing every scrape."""
    answer = httpx.get(f"{fleet.server.url}/metrics", timeout=30)

    assert answer.status_code == 200
    content_type = answer.headers["content-type"]
    assert content_type == CONTENT_TYPE_LATEST
    parameters = [part.split("=")[0].strip() for part in content_type.split(";")[1:]]
    assert len(parameters) == len(set(parameters)), content_type
    families = list(text_string_to_metric_families(answer.text))
    assert "collector_up" in {family.name for family in families}


def test_metrics_count_what_the_forwarder_did(fleet: Fleet) -> None:
    families = metrics(fleet.server)

    assert total(families, "collector_events_forwarded") == fleet.forwarded
    assert by_labels(families, "collector_events_forwarded", "project", "env") == {
        ("proj_test", "production"): fleet.forwarded
    }
    outcomes = by_labels(families, "collector_upstream_requests", "outcome")
    assert outcomes.get("delivered", 0) >= 1
    assert outcomes.get("rejected", 0) >= 1
    assert total(families, "collector_events_dead_lettered") == 1
    document = stats(fleet.server)
    assert document["rates"]["forwarded"]["1m"] > 0
    assert document["rates"]["dead_lettered"]["1m"] > 0


# --- sample-ratio check ----------------------------------------------------------------------


def test_sample_ratio_mismatch_is_flagged_only_on_a_skewed_stream(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()

    def split(policy: str, counts: dict[str, int], shares: dict[str, float] | None) -> list[Any]:
        return [
            exposure(policy, name, layer=f"layer_{policy}", probability=(shares or {}).get(name))
            for name, n in counts.items()
            for _ in range(n)
        ]

    half = {"A": 0.5, "B": 0.5}
    requests = post(
        server,
        [
            *split("pol_skew", {"A": 700, "B": 300}, half),
            *split("pol_even", {"A": 510, "B": 490}, half),
            *split("pol_declared", {"A": 900, "B": 100}, {"A": 0.9, "B": 0.1}),
            *split("pol_few", {"A": 40, "B": 20}, half),
            *split("pol_static", {"A": 300, "B": 100}, None),
        ],
    )
    settle(server, requests)

    _, document = status_json(server.data_dir)
    verdicts = {v["policy"]: v for v in document["sample_ratio"]}
    assert set(verdicts) == {"pol_skew", "pol_even", "pol_declared", "pol_few", "pol_static"}
    skew = verdicts["pol_skew"]
    assert skew["checked"] and skew["mismatch"]
    assert skew["p_value"] < srm.P_THRESHOLD
    assert skew["exposures"] == {"A": 700, "B": 300}
    assert skew["expected_shares"] == half
    even = verdicts["pol_even"]
    assert even["checked"] and not even["mismatch"]
    assert even["p_value"] == pytest.approx(math.erfc(math.sqrt(0.2)))  # chi-square 0.4, 1 dof
    declared = verdicts["pol_declared"]
    assert declared["checked"] and not declared["mismatch"]
    assert declared["expected_shares"] == pytest.approx({"A": 0.9, "B": 0.1})
    for name, reason in (("pol_few", "not enough exposures"), ("pol_static", "declare")):
        assert not verdicts[name]["checked"] and not verdicts[name]["mismatch"], name
        assert verdicts[name]["p_value"] is None
        assert reason in verdicts[name]["reason"], verdicts[name]
    mismatches = [w for w in document["warnings"] if "sample-ratio" in w]
    assert len(mismatches) == 1 and "pol_skew" in mismatches[0], document["warnings"]
    assert not any("sample-ratio" in p for p in document["problems"])

    families = metrics(server)
    flagged = by_policy(families, "collector_sample_ratio_mismatch")
    assert flagged == {"pol_skew": 1, "pol_even": 0, "pol_declared": 0}
    p_values = by_policy(families, "collector_sample_ratio_p_value")
    assert p_values["pol_skew"] < srm.P_THRESHOLD
    assert p_values["pol_even"] == pytest.approx(even["p_value"])

    done = status_text(server.data_dir)
    row = r"pol_skew\s+│\s+A\s+│\s+700\s+│\s+70\.0% \(50\.0%\)\s+│\s+0\s+│\s+MISMATCH p="
    assert re.search(row, done.stdout), done.stdout
    assert "warning: sample-ratio mismatch in policy pol_skew" in done.stdout

    # The two settings move the verdicts: pol_skew's p (chi-square 160) is above 1e-40, and
    # pol_few's 60 exposures are enough at 50.
    strict = {"COLLECTOR_SAMPLE_RATIO_P_THRESHOLD": "1e-40"}
    strict["COLLECTOR_SAMPLE_RATIO_MIN_EXPOSURES"] = "50"
    done = run_cli("status", "--json", data_dir=server.data_dir, env=strict)
    tuned = {v["policy"]: v for v in json.loads(done.stdout)["sample_ratio"]}
    assert tuned["pol_skew"]["checked"] and not tuned["pol_skew"]["mismatch"]
    assert tuned["pol_few"]["checked"] and tuned["pol_few"]["p_value"] is not None


def by_policy(families: dict[str, Metric], name: str) -> dict[str, float]:
    return {dict(key)["policy"]: value for key, value in samples(families, name).items()}
