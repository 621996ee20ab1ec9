"""`GET /metrics`: the server's and the forwarder's figures in Prometheus text format.

Counters and the two latency histograms come from the running totals in `counts.db` (every
process adds to them, and they survive restarts, so they only ever go up: a histogram's
totals are its requests per bucket, made cumulative here); gauges from the status document
(queue, age, budget, processes, upstream state, sample ratio). Names (all prefixed
`collector_`) are listed in `docs/reference.md`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from collector.ops import status
from collector.settings import Settings
from collector.store.counts import (
    DELAY_BUCKETS,
    Count,
    Counts,
    Labels,
    ProxyOutcome,
    UpstreamOutcome,
    bucket,
)
from collector.store.datadir import DataDir
from collector.store.heartbeats import UpstreamState

# Seconds: from a lone event (~1 ms) to a big request waiting on a busy disk.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The forwarder states exported as `collector_upstream_state` (its start is too brief).
UPSTREAM_STATES = tuple(state for state in UpstreamState if state is not UpstreamState.STARTING)
# Seconds: a decide answered from a near upstream (~5 ms) to a config call at its timeout.
PROXY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

# (counts name, metric name, help, label names)
COUNTERS: tuple[tuple[Count, str, str, tuple[str, ...]], ...] = (
    (Count.REQUESTS, "collector_requests", "Events API requests answered, by status.", ("status",)),
    (
        Count.EVENTS_RECEIVED,
        "collector_events_received",
        "Events received in well-formed requests.",
        ("org", "project", "env", "type"),
    ),
    (
        Count.EVENTS_ACCEPTED,
        "collector_events_accepted",
        "Events that passed validation.",
        ("org", "project", "env", "type"),
    ),
    (
        Count.EVENTS_WRITTEN,
        "collector_events_written",
        "Events committed to the queue.",
        ("org", "project", "env", "type"),
    ),
    (
        Count.EVENTS_DEDUPLICATED,
        "collector_events_deduplicated",
        "Accepted events not written again because their id was already stored.",
        ("org", "project", "env", "type"),
    ),
    (Count.EVENTS_REJECTED, "collector_events_rejected", "Events refused, by reason.", ("reason",)),
    (
        Count.EVENTS_FUTURE,
        "collector_events_future",
        "Events stamped ahead of their arrival by more than event_future_margin_seconds.",
        ("project", "env"),
    ),
    (
        Count.EVENTS_LATE,
        "collector_events_late",
        "Events that arrived more than event_late_after_seconds after their timestamp.",
        ("project", "env"),
    ),
    (
        Count.FORWARDED,
        "collector_events_forwarded",
        "Events the upstream accepted.",
        ("project", "env"),
    ),
    (
        Count.UNCONFIRMED,
        "collector_events_unconfirmed",
        "Events of 2xx answers that accepted fewer than sent without naming the rest.",
        ("project", "env"),
    ),
    (
        Count.SCHEMA_WARNINGS,
        "collector_events_schema_warnings",
        "Events the upstream took with a schema warning, by event name.",
        ("project", "env", "event"),
    ),
    (
        Count.QUARANTINED,
        "collector_events_quarantined",
        "Events that failed validation at ingest, by the SDK that sent them, and whether "
        "the dead-letter store kept them (kept, full, failed).",
        ("sdk", "kept"),
    ),
    (
        Count.UPSTREAM_REQUESTS,
        "collector_upstream_requests",
        f"Upstream requests by outcome ({', '.join(UpstreamOutcome)}).",
        ("outcome",),
    ),
    (
        Count.DEAD_LETTERED,
        "collector_events_dead_lettered",
        "Events moved to the dead-letter store, by reason.",
        ("reason",),
    ),
    (
        Count.PROXY_REQUESTS,
        "collector_proxy_requests",
        "Config, resolve and decide calls passed upstream, by route and outcome "
        f"({', '.join(ProxyOutcome)}).",
        ("route", "outcome"),
    ),
)
# Labels whose values clients choose (and which name their projects and experiments):
# left out with metrics_labels = "fixed".
CLIENT_LABELS = frozenset(
    {"org", "project", "env", "event", "layer", "policy", "allocation", "sdk"}
)
# (buckets name, sum name, metric name, help, label names besides `le`, bounds)
HISTOGRAMS: tuple[tuple[Count, Count, str, str, tuple[str, ...], tuple[float, ...]], ...] = (
    (
        Count.REQUEST_DURATION,
        Count.REQUEST_DURATION_SUM,
        "collector_request_duration_seconds",
        "Time to answer an events API request.",
        (),
        LATENCY_BUCKETS,
    ),
    (
        Count.PROXY_DURATION,
        Count.PROXY_DURATION_SUM,
        "collector_proxy_request_duration_seconds",
        "Time to answer a config, resolve or decide call passed upstream.",
        ("route",),
        PROXY_BUCKETS,
    ),
)


class Metrics:
    """The server's metrics registry: the figures collected from the data directory."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Figures(settings))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Figures(Collector):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        counts = Counts.reader(DataDir(self._settings.data_dir))
        try:
            totals = counts.all_totals()
        finally:
            counts.close()
        for buckets, seconds, metric, text, labels, bounds in HISTOGRAMS:
            yield _histogram(
                metric, text, labels, bounds, totals.get(buckets, {}), totals.get(seconds, {})
            )
        fixed = self._settings.metrics_labels == "fixed"
        labels, delays = ("project", "env"), totals.get(Count.EVENT_DELAY, {})
        if fixed:
            labels, delays = _without_client_labels((*labels, "le"), delays)
            labels = labels[:-1]
        yield _histogram(
            "collector_event_arrival_delay_seconds",
            "Seconds from events' timestamps to their arrival (negative: stamped ahead); "
            "without _sum and _count, as its buckets go below 0 (the +Inf bucket counts).",
            labels,
            DELAY_BUCKETS,
            delays,
            {},
        )
        for name, metric, text, labels in COUNTERS:
            values = totals.get(name, {})
            if fixed:
                labels, values = _without_client_labels(labels, values)
            yield _counter(metric, text, labels, values)
        yield from _gauges(status.collect(self._settings), fixed)


def _without_client_labels(
    labels: tuple[str, ...], values: dict[Labels, float]
) -> tuple[tuple[str, ...], dict[Labels, float]]:
    """`labels` less those whose values clients choose, `values` summed over them."""
    kept = [i for i, label in enumerate(labels) if label not in CLIENT_LABELS]
    summed: dict[Labels, float] = {}
    for key, value in values.items():
        short = tuple(key[i] for i in kept)
        summed[short] = summed.get(short, 0.0) + value
    return tuple(labels[i] for i in kept), summed


def _counter(
    name: str, text: str, labels: tuple[str, ...], values: dict[Labels, float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _histogram(
    name: str,
    text: str,
    labels: tuple[str, ...],
    bounds: tuple[float, ...],
    buckets: dict[Labels, float],
    seconds: dict[Labels, float],
) -> HistogramMetricFamily:
    """`buckets` holds each request once, in its bucket (labels, then `le`); Prometheus wants
    each bucket to count every request at or below its bound. An unlabelled histogram is
    exported with zeros before its first request, as prometheus_client's own was."""
    family = HistogramMetricFamily(name, text, labels=list(labels))
    les = [bucket(bounds, bound) for bound in (*bounds, math.inf)]  # the labels written
    keys = {key[:-1] for key in buckets} | set(seconds) | (set() if labels else {()})
    for key in sorted(keys):
        running = 0.0
        cumulative = []
        for le in les:
            running += buckets.get((*key, le), 0)
            cumulative.append((le, running))
        family.add_metric(list(key), cumulative, seconds.get(key, 0))
    return family


def _gauges(document: dict[str, Any], fixed: bool = False) -> Iterator[Metric]:
    queue = document["queue"]
    yield _gauge(
        "collector_queue_events", "Events in the queue, not yet forwarded.", queue["events"]
    )
    yield _gauge("collector_queue_bytes", "Bytes of events in the queue.", queue["bytes"])
    yield _gauge(
        "collector_queue_oldest_event_age_seconds",
        "Age of the oldest event not yet forwarded (0 when the queue is empty).",
        queue["oldest_event_age_seconds"] or 0,
    )
    yield _gauge(
        "collector_disk_budget_used_ratio",
        "Share of the disk budget in use.",
        queue["disk_budget_used"],
    )
    yield _gauge(
        "collector_dead_letters", "Events in the dead-letter store.", document["dead_letters"]
    )
    cache = document["proxy"]["cache"]
    yield _gauge("collector_config_cache_entries", "Config bundles in the cache.", cache["entries"])
    yield _gauge("collector_config_cache_bytes", "Bytes of config bundles cached.", cache["bytes"])
    up = GaugeMetricFamily("collector_up", "1 when the process is up.", labels=["process"])
    for process in ("server", "forwarder"):
        up.add_metric([process], 1 if document[process]["up"] else 0)
    yield up
    state = GaugeMetricFamily(
        "collector_upstream_state", "1 for the forwarder's upstream state.", labels=["state"]
    )
    for name in UPSTREAM_STATES:
        state.add_metric([name], 1 if document["forwarder"].get("upstream") == name else 0)
    yield state
    forwarder = document["forwarder"]
    yield _gauge(
        "collector_upstream_halted_targets",
        "Projects and envs whose upstream key was refused: their events wait in the queue "
        "until the keys are reloaded (SIGHUP), while every other key's flow.",
        forwarder.get("halted_targets", 0) if forwarder["up"] else 0,
    )
    yield _gauge(
        "collector_upstream_parked_events",
        "Events of refused keys' batches held by the forwarder until the keys are reloaded.",
        forwarder.get("parked_events", 0) if forwarder["up"] else 0,
    )
    yield from _sample_ratio(document["sample_ratio"], fixed)
    yield from _config_drift(document["config_drift"], fixed)
    outcomes = CounterMetricFamily(
        "collector_ledger_events",
        "Events by where they ended up (the outcomes ledger of the queue: stored, duplicate, "
        "delivered, unconfirmed, dead_lettered, lost...), by reason where a state has them.",
        labels=["state", "reason"],
    )
    for state, value in document["ledger"]["states"].items():
        for reason, n in value.items() if isinstance(value, dict) else [("", value)]:
            outcomes.add_metric([state, reason], n)
    yield outcomes
    yield _gauge(
        "collector_healthy", "1 when `collector status` would exit 0.", int(document["healthy"])
    )


def _sample_ratio(verdicts: list[dict[str, Any]], fixed: bool) -> Iterator[Metric]:
    """Per policy; with fixed labels, one figure for all: 1 when any policy mismatches,
    and the least p value."""
    labels = [] if fixed else ["project", "env", "policy"]
    mismatch = GaugeMetricFamily(
        "collector_sample_ratio_mismatch",
        "1 when a policy's exposures split unlike the shares expected (declared, or its "
        "config bundle's; p below sample_ratio_p_threshold).",
        labels=labels,
    )
    p_value = GaugeMetricFamily(
        "collector_sample_ratio_p_value",
        "Chi-square p value of a policy's exposures against the shares expected.",
        labels=labels,
    )
    checked = [verdict for verdict in verdicts if verdict["checked"]]
    if fixed and checked:
        mismatch.add_metric([], max(1 if v["mismatch"] else 0 for v in checked))
        p_value.add_metric([], min(v["p_value"] for v in checked))
    for verdict in [] if fixed else checked:
        key = [verdict["project"], verdict["env"], verdict["policy"]]
        mismatch.add_metric(key, 1 if verdict["mismatch"] else 0)
        p_value.add_metric(key, verdict["p_value"])
    yield mismatch
    yield p_value


def _config_drift(rows: list[dict[str, Any]], fixed: bool) -> Iterator[Metric]:
    """Per project and env (those with a cached bundle); with fixed labels, one figure for
    all: the stale share of them all, and the oldest version's age."""
    labels = [] if fixed else ["project", "env"]
    stale = GaugeMetricFamily(
        "collector_config_stale_share",
        "Share of exposures and decisions in the counts window whose configVersion is not "
        "the newest bundle the config proxy served.",
        labels=labels,
    )
    oldest = GaugeMetricFamily(
        "collector_config_oldest_version_age_seconds",
        "Age of the oldest configVersion exposures and decisions used in the counts window.",
        labels=labels,
    )
    shared = [row for row in rows if row["stale_share"] is not None]
    aged = [row for row in rows if row["oldest_version_age_seconds"] is not None]
    if fixed:
        if shared:
            total = sum(row["with_version"] for row in shared)
            stale.add_metric([], sum(row["stale"] for row in shared) / total)
        if aged:
            oldest.add_metric([], max(row["oldest_version_age_seconds"] for row in aged))
    for row in [] if fixed else shared:
        stale.add_metric([row["project"], row["env"]], row["stale_share"])
    for row in [] if fixed else aged:
        oldest.add_metric([row["project"], row["env"]], row["oldest_version_age_seconds"])
    yield stale
    yield oldest


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
