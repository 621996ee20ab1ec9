"""collector/ops/metrics.py: `Metrics(settings).render()` of a real data directory parses
as Prometheus text, with the documented families, and counters and histograms from the
totals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from collector.ops.metrics import COUNTERS, LATENCY_BUCKETS, PROXY_BUCKETS, Metrics
from collector.settings import Settings
from collector.store.counts import Count, Counts, ProxyRoute, bucket
from collector.store.datadir import DataDir


def samples(text: str) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_metrics_of_an_empty_data_directory_parse_with_every_family(tmp_path: Path) -> None:
    text = Metrics(Settings(data_dir=tmp_path)).render().decode()

    found = samples(text)

    for _, name, _, _ in COUNTERS:
        assert name in found
    for name in (
        "collector_request_duration_seconds",
        "collector_proxy_request_duration_seconds",
        "collector_queue_events",
        "collector_queue_bytes",
        "collector_queue_oldest_event_age_seconds",
        "collector_disk_budget_used_ratio",
        "collector_dead_letters",
        "collector_up",
        "collector_upstream_state",
        "collector_healthy",
    ):
        assert name in found
    assert [s.value for s in found["collector_healthy"]] == [0.0]
    assert {s.labels["process"]: s.value for s in found["collector_up"]} == {
        "server": 0.0,
        "forwarder": 0.0,
    }
    assert [s.value for s in found["collector_queue_events"]] == [0.0]
    assert "starting" not in {s.labels["state"] for s in found["collector_upstream_state"]}
    assert list(tmp_path.iterdir()) == []  # reading created nothing


def test_counters_come_from_the_running_totals(tmp_path: Path) -> None:
    counts = Counts.writer(DataDir(tmp_path))
    counts.add(Count.EVENTS_REJECTED, ("invalid layers",), 3)
    counts.add(Count.REQUESTS, ("200",), 5)
    counts.flush()
    counts.close()
    metrics = Metrics(Settings(data_dir=tmp_path))

    found = samples(metrics.render().decode())

    rejected = [s for s in found["collector_events_rejected"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in rejected] == [({"reason": "invalid layers"}, 3.0)]
    requests = [s for s in found["collector_requests"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in requests] == [({"status": "200"}, 5.0)]


def by_suffix(found: dict[str, list[Sample]], name: str, suffix: str) -> dict[str, float]:
    """`name`'s samples ending in `suffix`, by their labels (as `k=v,...`)."""
    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for s in found[name]
        if s.name == name + suffix
    }


def test_histograms_come_from_the_totals_of_every_process_with_cumulative_buckets(
    tmp_path: Path,
) -> None:
    # Two server processes writing to one counts.db, as the writers in app.py and proxy.py do.
    for durations, proxied in (
        ((0.003, 0.003, 0.7), ((ProxyRoute.CONFIG, 0.02),)),
        ((0.001, 9.0), ((ProxyRoute.CONFIG, 0.004), (ProxyRoute.DECIDE, 11.0))),
    ):
        counts = Counts.writer(DataDir(tmp_path))
        for seconds in durations:
            counts.add(Count.REQUEST_DURATION, (bucket(LATENCY_BUCKETS, seconds),))
            counts.add(Count.REQUEST_DURATION_SUM, (), seconds)
        for route, seconds in proxied:
            counts.add(Count.PROXY_DURATION, (route, bucket(PROXY_BUCKETS, seconds)))
            counts.add(Count.PROXY_DURATION_SUM, (route,), seconds)
        counts.flush()
        counts.close()

    found = samples(Metrics(Settings(data_dir=tmp_path)).render().decode())

    name = "collector_request_duration_seconds"
    assert by_suffix(found, name, "_bucket") == {
        "le=0.001": 1,
        "le=0.0025": 1,
        "le=0.005": 3,
        "le=0.01": 3,
        "le=0.025": 3,
        "le=0.05": 3,
        "le=0.1": 3,
        "le=0.25": 3,
        "le=0.5": 3,
        "le=1.0": 4,
        "le=2.5": 4,
        "le=5.0": 4,
        "le=+Inf": 5,
    }
    assert by_suffix(found, name, "_count") == {"": 5}
    assert by_suffix(found, name, "_sum") == {"": pytest.approx(0.003 + 0.003 + 0.7 + 0.001 + 9)}
    name = "collector_proxy_request_duration_seconds"
    buckets = by_suffix(found, name, "_bucket")
    assert len(buckets) == 2 * (len(PROXY_BUCKETS) + 1)  # the routes called, every bound
    assert [buckets[f"le={le},route=config"] for le in ("0.005", "0.01", "0.025", "+Inf")] == [
        1,
        1,
        2,
        2,
    ]
    assert buckets["le=10.0,route=decide"] == 0
    assert buckets["le=+Inf,route=decide"] == 1
    assert by_suffix(found, name, "_count") == {"route=config": 2, "route=decide": 1}
    assert by_suffix(found, name, "_sum") == {
        "route=config": pytest.approx(0.024),
        "route=decide": 11.0,
    }


def test_fixed_labels_name_no_project_or_event_and_keep_every_total(tmp_path: Path) -> None:
    counts = Counts.writer(DataDir(tmp_path))
    for project, count in (("proj_secret_a", 3), ("proj_secret_b", 4)):
        counts.add(Count.EVENTS_WRITTEN, ("org_x", project, "production", "track"), count)
        counts.add(Count.FORWARDED, (project, "production"), count)
    counts.add(Count.EVENTS_WRITTEN, ("org_x", "proj_secret_a", "production", "exposure"), 2)
    counts.flush()
    counts.close()

    full = Metrics(Settings(data_dir=tmp_path)).render().decode()
    text = Metrics(Settings(data_dir=tmp_path, metrics_labels="fixed")).render().decode()

    assert "proj_secret_a" in full
    assert "proj_secret" not in text and "org_x" not in text and "production" not in text
    found = samples(text)
    written = {s.labels["type"]: s.value for s in found["collector_events_written"]}
    assert written == {"track": 7.0, "exposure": 2.0}
    assert [(s.labels, s.value) for s in found["collector_events_forwarded"]] == [({}, 7.0)]
