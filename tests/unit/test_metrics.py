"""collector/ops/metrics.py: `Metrics(settings).render()` of a real data directory parses
as Prometheus text, with the documented families, and counters from the totals.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from collector.ops.metrics import COUNTERS, Metrics
from collector.settings import Settings
from collector.store.counts import Count, Counts
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
    metrics.latency.observe(0.003)

    found = samples(metrics.render().decode())

    rejected = [s for s in found["collector_events_rejected"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in rejected] == [({"reason": "invalid layers"}, 3.0)]
    requests = [s for s in found["collector_requests"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in requests] == [({"status": "200"}, 5.0)]
    count = [s for s in found["collector_request_duration_seconds"] if s.name.endswith("_count")]
    assert [s.value for s in count] == [1.0]
