"""The status document: what the collector is doing, read from the data directory alone.

`collector status`, `GET /v1/stats` and `GET /metrics` all start from `collect()`, which
reads only files (the heartbeats, the queue, the counts, the dead letters), so it works
whether the server and the forwarder run or not. Its keys are documented in the README.

Health: the collector is healthy when the server and the forwarder are up, the upstream
has not refused the key, the upstream has not been failing for more than
`OUTAGE_UNHEALTHY_S`, and the disk budget is less than `BUDGET_UNHEALTHY` used. Anything
else worth a look (no upstream configured, a shorter outage, dead letters, a sample-ratio
mismatch) is a warning, which does not make it unhealthy.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collector import heartbeat, proxy, recovery, srm
from collector.counts import Counts
from collector.deadletters import DeadLetters
from collector.settings import Settings
from collector.spool import Spool

OUTAGE_UNHEALTHY_S = 300.0
BUDGET_UNHEALTHY = 0.9
RATE_WINDOWS = (1, 5, 60)  # minutes
TOP_EVENTS = 10


def collect(settings: Settings) -> dict[str, Any]:
    """The whole status document."""
    data_dir = settings.data_dir
    now = time.time()
    counts = Counts(data_dir, settings.counts_window_minutes)
    try:
        document: dict[str, Any] = {
            "generated_at": _iso(now),
            "data_dir": str(data_dir),
            "server": _process(data_dir, "server", now),
            "forwarder": _forwarder(data_dir, now),
            "queue": _queue(settings, now),
            "rates": _rates(counts, now),
            "top_events": _top_events(counts, settings.counts_window_minutes),
            "allocations": _allocations(counts, settings.counts_window_minutes),
            "sample_ratio": _sample_ratio(counts, settings.counts_window_minutes),
            "rejected": _rejected(counts, settings.counts_window_minutes),
            "dead_letters": _dead_letters(data_dir),
            "recovered": recovery.moved_aside(data_dir),
            "proxy": _proxy(counts, settings),
        }
    finally:
        counts.close()
    problems, warnings = _judge(document)
    return {"healthy": not problems, "problems": problems, "warnings": warnings, **document}


def _process(data_dir: Path, name: str, now: float) -> dict[str, Any]:
    state = heartbeat.read(heartbeat.state_path(data_dir, name)) or {}
    up = heartbeat.is_alive(state, now)
    beat = state.get("heartbeat")
    return {
        "up": up,
        "pid": state.get("pid") if up else None,
        "last_heartbeat": _iso(beat) if beat else None,
        **{k: v for k, v in state.items() if k not in ("pid", "heartbeat")},
    }


def _forwarder(data_dir: Path, now: float) -> dict[str, Any]:
    process = _process(data_dir, "forwarder", now)
    for key in ("since", "last_success", "outage_since"):
        if isinstance(process.get(key), int | float):
            process[key] = _iso(process[key])
    if not process["up"]:
        process["upstream"] = "unknown (forwarder down)"
    return process


def _queue(settings: Settings, now: float) -> dict[str, Any]:
    spool = Spool(settings.data_dir, budget_bytes=settings.disk_budget_bytes)
    try:
        events, rows, size, oldest = spool.summary()
        used = spool.used_bytes()
    finally:
        spool.close()
    return {
        "events": events,
        "rows": rows,
        "bytes": size,
        "oldest_event_age_seconds": round(now - oldest, 3) if oldest else None,
        "disk_budget_bytes": settings.disk_budget_bytes,
        "disk_budget_used": round(used / settings.disk_budget_bytes, 4),
    }


def _rates(counts: Counts, now: float) -> dict[str, dict[str, float]]:
    """Events per second over the last 1, 5 and 60 minutes, by what happened to them."""
    into_minute = now % 60
    rates: dict[str, dict[str, float]] = {}
    for name, key in (
        ("events_accepted", "accepted"),
        ("events_written", "written"),
        ("events_rejected", "rejected"),
        ("forwarded", "forwarded"),
        ("dead_lettered", "dead_lettered"),
    ):
        rates[key] = {}
        for minutes in RATE_WINDOWS:
            # The last `minutes` full minutes and the part of this one that has passed.
            seconds = minutes * 60 + into_minute
            total = sum(counts.recent(name, minutes + 1).values())
            rates[key][f"{minutes}m"] = round(total / seconds, 3)
    return rates


def _top_events(counts: Counts, window: int) -> list[dict[str, Any]]:
    tracked = counts.recent("track_events", window)
    top = sorted(tracked.items(), key=lambda item: -item[1])[:TOP_EVENTS]
    return [
        {"project": project, "env": env, "event": event, "count": int(count)}
        for (project, env, event), count in top
    ]


def _allocations(counts: Counts, window: int) -> list[dict[str, Any]]:
    """Exposures and attributed conversions per (project, env, policy, allocation)."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}

    def row(project: str, env: str, policy: str, allocation: str) -> dict[str, Any]:
        fresh = {"project": project, "env": env, "policy": policy, "allocation": allocation}
        return rows.setdefault(
            (project, env, policy, allocation), {**fresh, "exposures": 0, "conversions": 0}
        )

    for (project, env, _layer, policy, allocation), n in counts.recent("exposures", window).items():
        row(project, env, policy, allocation)["exposures"] += int(n)
    conversions = counts.recent("conversions", window)
    for (project, env, policy, allocation, _event), n in conversions.items():
        row(project, env, policy, allocation)["conversions"] += int(n)
    return [rows[key] for key in sorted(rows)]


def _sample_ratio(counts: Counts, window: int) -> list[dict[str, Any]]:
    exposures = counts.recent("exposures", window)
    share_sums = counts.recent("exposure_shares", window)
    share_counts = counts.recent("exposure_shares_n", window)
    policies: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for key, n in exposures.items():
        project, env, _layer, policy, allocation = key
        if not policy:
            continue
        per = policies.setdefault((project, env, policy), {})
        sums = per.setdefault(allocation, [0.0, 0.0, 0.0])
        sums[0] += n
        sums[1] += share_sums.get(key, 0.0)
        sums[2] += share_counts.get(key, 0.0)
    verdicts = []
    for (project, env, policy), per in sorted(policies.items()):
        observed = {a: v[0] for a, v in per.items()}
        checked, p_value, shares, reason = srm.check(
            observed, {a: v[1] for a, v in per.items()}, {a: v[2] for a, v in per.items()}
        )
        verdict = srm.Verdict(project, env, policy, observed, shares, checked, p_value)
        verdict.mismatch = checked and p_value is not None and p_value < srm.P_THRESHOLD
        verdict.reason = reason
        verdicts.append(verdict.as_dict())
    return verdicts


def _rejected(counts: Counts, window: int) -> dict[str, int]:
    return {reason: int(n) for (reason,), n in counts.recent("events_rejected", window).items()}


def _proxy(counts: Counts, settings: Settings) -> dict[str, Any]:
    """Config, resolve and decide calls passed upstream in the window, and the cache's size."""
    requests: dict[str, dict[str, int]] = {route: {} for route in proxy.ROUTES}
    recent = counts.recent("proxy_requests", settings.counts_window_minutes)
    for (route, outcome), n in sorted(recent.items()):
        requests.setdefault(route, {})[outcome] = int(n)
    entries, size = proxy.cache_summary(settings.data_dir)
    return {"requests": requests, "cache": {"entries": entries, "bytes": size}}


def _dead_letters(data_dir: Path) -> int:
    dead = DeadLetters(data_dir)
    try:
        return dead.count()
    finally:
        dead.close()


def _judge(document: dict[str, Any]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    forwarder = document["forwarder"]
    if not document["server"]["up"]:
        problems.append("server is down")
    if not forwarder["up"]:
        problems.append("forwarder is down")
    upstream = forwarder.get("upstream")
    if upstream == "key_rejected":
        problems.append(f"upstream refused the key: {forwarder.get('message', '')}")
    elif upstream == "not_configured":
        warnings.append("no upstream configured: events stay queued")
    elif upstream == "retrying":
        outage = forwarder.get("outage_since")
        seconds = time.time() - datetime.fromisoformat(outage).timestamp() if outage else 0
        note = f"upstream failing for {seconds:.0f} s: {forwarder.get('message', '')}"
        (problems if seconds > OUTAGE_UNHEALTHY_S else warnings).append(note)
    if document["queue"]["disk_budget_used"] >= BUDGET_UNHEALTHY:
        problems.append(f"disk budget {document['queue']['disk_budget_used']:.0%} used")
    if document["dead_letters"]:
        warnings.append(f"{document['dead_letters']} dead-lettered events (collector dlq list)")
    for moved in document["recovered"]:
        lost = " (events queued in it were not forwarded)" if moved["file"] == "queue.db" else ""
        warnings.append(
            f"{moved['file']} was corrupt and moved aside to {moved['moved_to']} at "
            f"{moved['at']}{lost}; delete it once inspected"
        )
    for verdict in document["sample_ratio"]:
        if verdict["mismatch"]:
            warnings.append(
                f"sample-ratio mismatch in policy {verdict['policy']} "
                f"({verdict['project']}/{verdict['env']}): p = {verdict['p_value']:.2g}"
            )
    return problems, warnings


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
