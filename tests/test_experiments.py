"""Experiment health at the edge: the sample-ratio check of static policies against the
split of the config bundle the collector served.

The official `traffical` SDK runs in its default bundle mode with only its base URL set to
a real collector, whose config proxy fetches the bundle from a stand-in upstream on
loopback (`upstream.Upstream`) and caches it. The SDK decides and exposes thousands of
units; SDKs declare no `probability` for static policies, so the check can only compare
with the bundle's bucket ranges. A skew is made the way a broken SDK would make one: its
own bucketing (`compute_bucket`, in the SDK's resolution engine) is tampered with for one
layer, so a tenth of the units the bundle gives the treatment are assigned the control.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import traffical.engine.resolution as resolution
from prometheus_client.parser import text_string_to_metric_families
from traffical import TrafficalClient, TrafficalClientOptions
from traffical.engine.hashing import compute_bucket

from collector.ops.expected import splits

from conftest import Server, event, run_cli, status_json, wait_for
from upstream import Upstream

PROJECT, ENV, ORG = "proj_exp", "production", "org_test"
VERSION = "2026-12-03T10:00:00.000Z"
UNITS = 3000
SKEWED_LAYER = "layer_skew"


def allocation(name: str, start: int, end: int, parameter: str) -> dict[str, Any]:
    return {
        "id": f"alloc_{name}",
        "key": name,
        "name": name,
        "bucketRange": [start, end],
        "overrides": {parameter: name},
    }


def layer(layer_id: str, policy_id: str, ranges: dict[str, tuple[int, int]]) -> dict[str, Any]:
    parameter = f"{layer_id}.variant"
    return {
        "id": layer_id,
        "policies": [
            {
                "id": policy_id,
                "key": policy_id,
                "state": "running",
                "kind": "static",
                "conditions": [],
                "allocations": [allocation(n, *r, parameter) for n, r in ranges.items()],
            }
        ],
    }


LAYERS = [
    layer("layer_ab", "pol_ab", {"control": (0, 499), "treatment": (500, 999)}),
    layer("layer_three", "pol_three", {"a": (0, 199), "b": (200, 599), "c": (600, 999)}),
    layer(SKEWED_LAYER, "pol_skew", {"control": (0, 499), "treatment": (500, 999)}),
]


def bundle() -> dict[str, Any]:
    return {
        "version": VERSION,
        "orgId": ORG,
        "projectId": PROJECT,
        "env": ENV,
        "hashing": {"unitKey": "userId", "bucketCount": 1000},
        "parameters": [
            {
                "key": f"{each['id']}.variant",
                "type": "string",
                "default": "none",
                "layerId": each["id"],
                "namespace": each["id"],
            }
            for each in LAYERS
        ],
        "layers": LAYERS,
    }


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as running:
        running.set_bundle(PROJECT, ENV, bundle())
        yield running


def test_the_bundles_split_is_how_the_official_sdk_buckets_units() -> None:
    """Units hashed by the SDK's own compute_bucket fall in each range as the split says."""
    three = LAYERS[1]
    ranges = {a["key"]: a["bucketRange"] for a in three["policies"][0]["allocations"]}
    (split,) = [s for s in splits(json.dumps(bundle()).encode()) if s.policy == "pol_three"]
    units = 20_000
    seen: Counter[str] = Counter()
    for n in range(units):
        bucket = compute_bucket(f"user-{n}", three["id"], 1000)
        seen[next(name for name, (lo, hi) in ranges.items() if lo <= bucket <= hi)] += 1
    assert set(split.shares) == set(ranges)
    for name, share in split.shares.items():
        assert seen[name] / units == pytest.approx(share, abs=0.015)


def tampered(original: Callable[[str, str, int], int]) -> Callable[[str, str, int], int]:
    """The SDK's bucketing, but units of the skewed layer in buckets 500-599 (a fifth of
    the treatment's) land in 0-99 (the control's)."""

    def compute_bucket(unit: str, layer_id: str, buckets: int) -> int:
        found = original(unit, layer_id, buckets)
        return found - 500 if layer_id == SKEWED_LAYER and 500 <= found < 600 else found

    return compute_bucket


def test_static_policies_are_checked_against_the_bundles_split_and_a_skew_is_flagged(
    start_server: Callable[..., Server], upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(COLLECTOR_UPSTREAM_URL=upstream.url)
    monkeypatch.setattr(resolution, "compute_bucket", tampered(resolution.compute_bucket))
    client = TrafficalClient(
        TrafficalClientOptions(
            api_key=server.key,
            org_id=ORG,
            project_id=PROJECT,
            env=ENV,
            base_url=server.url,
            refresh_interval_seconds=0,
            batch_size=1000,
            flush_interval_seconds=3600,
            max_event_queue_size=4 * UNITS,  # its default drops what a burst holds past it
        )
    )
    try:
        assert client.wait_for_ready(10), "the SDK never got its bundle through the collector"
        defaults = {f"{each['id']}.variant": "none" for each in LAYERS}
        for n in range(UNITS):
            client.track_exposure(client.decide({"userId": f"user-{n}"}, defaults))
        assert client.flush_events(timeout=30)
    finally:
        client.close()

    def verdicts() -> dict[str, dict[str, Any]]:
        _, document = status_json(server.data_dir)
        found = {v["policy"]: v for v in document["sample_ratio"]}
        exposed = sum(sum(v["exposures"].values()) for v in found.values())
        return found if exposed == 3 * UNITS else {}

    found = wait_for(verdicts, f"{3 * UNITS} exposures counted")
    for name, verdict in sorted(found.items()):
        print(
            f"{name}: {verdict['exposures']} against {verdict['expected_shares']}, "
            f"p={verdict['p_value']:.3g}"
        )
    assert set(found) == {"pol_ab", "pol_three", "pol_skew"}
    for name, shares in (
        ("pol_ab", {"control": 0.5, "treatment": 0.5}),
        ("pol_three", {"a": 0.2, "b": 0.4, "c": 0.4}),
    ):
        verdict = found[name]
        assert verdict["checked"] and not verdict["mismatch"], verdict
        assert verdict["expected_shares"] == pytest.approx(shares)
        assert verdict["bundle_version"] == VERSION
        assert verdict["p_value"] > 0.001
    skew = found["pol_skew"]
    assert skew["checked"] and skew["mismatch"], skew
    assert skew["p_value"] < 1e-6
    assert skew["bundle_version"] == VERSION
    assert skew["exposures"]["control"] > 1.15 * skew["exposures"]["treatment"]

    shown = run_cli("status", data_dir=server.data_dir, env={"COLUMNS": "200"})
    print(shown.stdout)
    assert re.search(r"pol_skew\s+│\s+control\s+│\s+[\d,]+\s+│\s+6\d\.\d% \(50\.0%\)", shown.stdout)
    assert re.search(rf"MISMATCH p=\S+ vs bundle {re.escape(VERSION)}", shown.stdout)
    assert re.search(r"pol_three\s+│\s+a\s+│\s+[\d,]+\s+│\s+\d+\.\d% \(20\.0%\)", shown.stdout)

    done = run_cli("experiments", data_dir=server.data_dir, env={"COLUMNS": "80"})
    print(done.stdout)
    assert done.returncode == 1, done.stderr  # a mismatch: a monitoring check fails
    assert max(map(len, done.stdout.splitlines())) <= 80
    assert re.search(
        r"pol_skew\s+│\s+control\s+│\s+[\d,]+\s+│\s+6\d\.\d%\s+│\s+50\.0%", done.stdout
    )
    assert "MISMATCH" in done.stdout and f"bundle {VERSION} of {PROJECT}/{ENV}" in done.stdout
    as_json = run_cli("experiments", "--json", data_dir=server.data_dir)
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["mismatch"] is True
    assert {p["policy"]: p["mismatch"] for p in document["policies"]} == {
        "pol_ab": False,
        "pol_three": False,
        "pol_skew": True,
    }


def test_experiments_exits_0_without_a_mismatch(server: Server) -> None:
    done = run_cli("experiments", data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr
    assert "no exposures of a policy in the window" in done.stdout


def iso_at(seconds_from_now: float, offset_hours: int = 0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    zone = timezone(timedelta(hours=offset_hours))
    text = moment.astimezone(zone).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if offset_hours == 0 else text


def sent(kind: str, stamp: str, version: str | None = None) -> dict[str, Any]:
    """An exposure, decision or track of the test's project, stamped `stamp`, with a
    top-level `configVersion` when given (as current SDKs send it)."""
    fields: dict[str, Any] = {"orgId": ORG, "projectId": PROJECT, "env": ENV, "timestamp": stamp}
    if kind != "track":
        layer = {"layerId": "layer_ab", "bucket": 7, "policyId": "pol_ab"}
        fields["layers"] = [{**layer, "allocationName": "control"}]
    if version is not None:
        fields["configVersion"] = version
    return event(kind, **fields)


def test_config_drift_and_event_time_are_counted_from_what_events_say(
    start_server: Callable[..., Server], upstream: Upstream
) -> None:
    server = start_server(COLLECTOR_UPSTREAM_URL=upstream.url)
    fetched = httpx.get(
        f"{server.url}/v1/config/{PROJECT}",
        params={"env": ENV},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=10,
    )
    assert fetched.status_code == 200, fetched.text  # the proxy served and cached VERSION
    older = "2026-11-01T10:00:00.000Z"
    # One big request (its stamps sorted as text) and one small one with +02:00 offsets
    # (each parsed): on time, an hour ahead (future), three days behind (late).
    big = [sent("exposure", iso_at(-2), VERSION) for _ in range(30)]
    big += [sent("decision", iso_at(-5), older) for _ in range(10)]
    big += [sent("exposure", iso_at(3600), VERSION) for _ in range(5)]
    big += [sent("track", iso_at(-3 * 86400)) for _ in range(3)]
    small = [sent("decision", iso_at(-30, offset_hours=2)) for _ in range(4)]
    small += [sent("exposure", iso_at(-4 * 86400, offset_hours=2), older) for _ in range(2)]
    for events in (big, small):
        assert server.post({"events": events}).status_code == 200

    def counted() -> dict[str, Any]:
        _, document = status_json(server.data_dir)
        rows = document["event_time"]
        return document if rows and rows[0]["events"] == len(big) + len(small) else {}

    document = wait_for(counted, "every event's arrival delay counted")
    (drift,) = document["config_drift"]
    print(json.dumps(drift, indent=1))
    assert drift["newest_version"] == VERSION
    assert (drift["events"], drift["with_version"], drift["stale"]) == (51, 47, 12)
    assert drift["stale_share"] == round(12 / 47, 4)
    assert drift["versions"] == {VERSION: 35, older: 12}
    assert drift["oldest_version"] == older
    age = (datetime.now(UTC) - datetime.fromisoformat(older)).total_seconds()
    assert abs(drift["oldest_version_age_seconds"] - age) < 120

    (timing,) = document["event_time"]
    print(json.dumps(timing, indent=1))
    assert (timing["future"], timing["late"]) == (5, 5)
    assert timing["delay_buckets"] == {
        "-60.0": 5,
        "10.0": 40,
        "60.0": 4,
        "604800.0": 5,
    }
    assert timing["delay_p50_at_most_seconds"] == 10.0
    assert timing["delay_p99_at_most_seconds"] == 604800.0
    assert any(
        w.startswith(f"5 events of {PROJECT}/{ENV} in the counts window were stamped")
        for w in document["warnings"]
    ), document["warnings"]

    scraped = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    where = {"project": PROJECT, "env": ENV}
    values = {
        (s.name, s.labels.get("le")): s.value
        for name in (
            "collector_events_future",
            "collector_events_late",
            "collector_event_arrival_delay_seconds",
            "collector_config_stale_share",
        )
        for s in families[name].samples
        if {k: v for k, v in s.labels.items() if k != "le"} == where
    }
    assert values[("collector_events_future_total", None)] == 5
    assert values[("collector_events_late_total", None)] == 5
    assert values[("collector_event_arrival_delay_seconds_bucket", "10.0")] == 45
    assert values[("collector_event_arrival_delay_seconds_bucket", "+Inf")] == 54
    assert values[("collector_config_stale_share", None)] == pytest.approx(12 / 47, abs=1e-4)

    shown = run_cli("status", data_dir=server.data_dir, env={"COLUMNS": "120"})
    print(shown.stdout)
    assert "event time and config drift (window)" in shown.stdout
    row = rf"{PROJECT}/{ENV}\s+│\s+54\s+│\s+5\s+│\s+5\s+│\s+≤ 10 s\s+│\s+≤ 7\.0 d\s+│\s+25\.5%"
    assert re.search(row, shown.stdout), shown.stdout
