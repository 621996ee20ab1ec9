"""The status document: what the collector is doing, read from the data directory alone.

`collector status`, `GET /v1/stats` and `GET /metrics` all start from `collect()`, which
reads only files (the heartbeats, the queue, the counts, the dead letters), read-only, so it
works whether the server and the forwarder run or not, and changes nothing it looks at. Its
fields are listed in `docs/reference.md`.

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

from collector.ops import expected, srm
from collector.settings import Settings
from collector.store import configcache, heartbeats, ledger, recovery, spool
from collector.store.clock import Clock
from collector.store.counts import Count, Counts, ProxyRoute
from collector.store.datadir import QUEUE, DataDir
from collector.store.deadletters import DeadLetters
from collector.store.heartbeats import UpstreamState

OUTAGE_UNHEALTHY_S = 300.0
BUDGET_UNHEALTHY = 0.9
RATE_WINDOWS = (1, 5, 60)  # minutes
TOP_EVENTS = 10


def collect(settings: Settings) -> dict[str, Any]:
    """The whole status document."""
    data_dir = DataDir(settings.data_dir)
    now = time.time()
    counts = Counts.reader(data_dir, settings.counts_window_minutes)
    held = spool.summary(data_dir)
    bundles = expected.latest(configcache.bodies(data_dir))
    window = settings.counts_window_minutes
    try:
        document: dict[str, Any] = {
            "generated_at": iso(now),
            "data_dir": str(data_dir.path),
            "server": _process(data_dir.server_state, now),
            "forwarder": _forwarder(data_dir.forwarder_state, now),
            "queue": _queue(held, data_dir, settings.disk_budget_bytes),
            "ledger": _ledger(held.ledger, data_dir),
            "rates": _rates(counts, now),
            "top_events": _top_events(counts, settings.counts_window_minutes),
            "allocations": _allocations(counts, settings.counts_window_minutes),
            "sample_ratio": _sample_ratio(counts, settings, expected.by_policy(bundles)),
            "config_drift": _config_drift(counts, window, bundles, now),
            "event_time": _event_time(counts, window),
            "rejected": _rejected(counts, settings.counts_window_minutes),
            "upstream_answers": _upstream_answers(counts, settings.counts_window_minutes),
            "quarantined": _quarantined(counts, settings.counts_window_minutes),
            "dead_letters": _dead_letters(data_dir),
            "recovered": recovery.moved_aside(data_dir.path),
            "proxy": _proxy(counts, settings),
        }
    finally:
        counts.close()
    problems, warnings = _judge(document)
    return {"healthy": not problems, "problems": problems, "warnings": warnings, **document}


# What only an admin:read key is shown (`shown_to`): where the collector keeps its files,
# its processes' pids and address, the upstream's address, and the forwarder's messages,
# which may quote it.
ADMIN_ONLY = {"server": ("pid", "url"), "forwarder": ("pid", "upstream_url", "message")}
# The sections listed per project: a key restricted to one sees only that project's rows.
PER_PROJECT = ("top_events", "allocations", "sample_ratio", "config_drift", "event_time")
# The same, one level down: sections of `upstream_answers`.
PER_PROJECT_ANSWERS = ("unconfirmed", "schema_warnings")


def shown_to(document: dict[str, Any], *, admin: bool, project: str | None) -> dict[str, Any]:
    """The status document as a key may see it (`GET /v1/stats`): whole for an admin key,
    else without what `ADMIN_ONLY` names; for a key restricted to `project`, only that
    project's rows of the per-project sections. The verdict is judged again on what is
    shown, so that no problem or warning quotes what was left out."""
    shown = {**document}
    if not admin:
        shown.pop("data_dir", None)
        for process, names in ADMIN_ONLY.items():
            shown[process] = {k: v for k, v in shown[process].items() if k not in names}
    if project is not None:
        for section in PER_PROJECT:
            shown[section] = [row for row in shown[section] if row["project"] == project]
        shown["upstream_answers"] = {
            section: [row for row in rows if row["project"] == project]
            for section, rows in shown["upstream_answers"].items()
        }
    problems, warnings = _judge(shown)
    shown.update(healthy=not problems, problems=problems, warnings=warnings)
    return shown


def _process(path: Path, now: float) -> dict[str, Any]:
    state = heartbeats.read(path) or {}
    up = heartbeats.is_alive(state, now)
    beat = state.get("heartbeat")
    return {
        "up": up,
        "pid": state.get("pid") if up else None,
        "last_heartbeat": iso(beat) if beat else None,
        **{k: v for k, v in state.items() if k not in ("pid", "heartbeat")},
    }


def _forwarder(path: Path, now: float) -> dict[str, Any]:
    process = _process(path, now)
    for key in ("since", "last_success", "outage_since"):
        if isinstance(process.get(key), int | float):
            process[key] = iso(process[key])
    if not process["up"]:
        process["upstream"] = "unknown (forwarder down)"
    return process


def _queue(held: spool.Summary, data_dir: DataDir, budget_bytes: int) -> dict[str, Any]:
    now = Clock(data_dir, write=False).now()  # the clock rows are stamped by
    return {
        "events": held.events,
        "rows": held.rows,
        "bytes": held.bytes,
        "oldest_event_age_seconds": round(now - held.oldest, 3) if held.oldest else None,
        "disk_budget_bytes": budget_bytes,
        "disk_budget_used": round(held.budget_used_bytes / budget_bytes, 4),
    }


def _ledger(entries: ledger.Entries, data_dir: DataDir) -> dict[str, Any]:
    """The queue's outcomes ledger in total: events per state (and per reason where a
    state has them), and what the witness saw come in that the queue no longer has."""
    states: dict[str, Any] = {}
    for (state, reason), n in sorted(ledger.totals(entries).items()):
        if reason:
            states.setdefault(state, {})[reason] = n
        else:
            states[state] = n
    missing = sum(ledger.missing(entries, ledger.read_witness(data_dir)).values())
    return {"states": states, "missing": missing}


def _rates(counts: Counts, now: float) -> dict[str, dict[str, float]]:
    """Events per second over the last 1, 5 and 60 minutes, by what happened to them."""
    into_minute = now % 60
    rates: dict[str, dict[str, float]] = {}
    for name, key in (
        (Count.EVENTS_ACCEPTED, "accepted"),
        (Count.EVENTS_WRITTEN, "written"),
        (Count.EVENTS_REJECTED, "rejected"),
        (Count.FORWARDED, "forwarded"),
        (Count.DEAD_LETTERED, "dead_lettered"),
    ):
        rates[key] = {}
        for minutes in RATE_WINDOWS:
            # The last `minutes` full minutes and the part of this one that has passed.
            seconds = minutes * 60 + into_minute
            total = sum(counts.recent(name, minutes + 1).values())
            rates[key][f"{minutes}m"] = round(total / seconds, 3)
    return rates


def _top_events(counts: Counts, window: int) -> list[dict[str, Any]]:
    tracked = counts.recent(Count.TRACK_EVENTS, window)
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

    for (project, env, _layer, policy, allocation), n in counts.recent(
        Count.EXPOSURES, window
    ).items():
        row(project, env, policy, allocation)["exposures"] += int(n)
    conversions = counts.recent(Count.CONVERSIONS, window)
    for (project, env, policy, allocation, _event), n in conversions.items():
        row(project, env, policy, allocation)["conversions"] += int(n)
    return [rows[key] for key in sorted(rows)]


def _sample_ratio(
    counts: Counts, settings: Settings, splits: dict[tuple[str, str, str], expected.Split]
) -> list[dict[str, Any]]:
    window = settings.counts_window_minutes
    exposures = counts.recent(Count.EXPOSURES, window)
    share_sums = counts.recent(Count.EXPOSURE_SHARES, window)
    share_counts = counts.recent(Count.EXPOSURE_SHARES_N, window)
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
        split = splits.get((project, env, policy))
        summed, declared = {a: v[1] for a, v in per.items()}, {a: v[2] for a, v in per.items()}
        checked, p_value, shares, reason = srm.check(
            observed,
            summed,
            declared,
            None if split is None else split.shares,
            min_exposures=settings.sample_ratio_min_exposures,
        )
        verdict = srm.Verdict(project, env, policy, observed, shares, checked, p_value)
        threshold = settings.sample_ratio_p_threshold
        verdict.mismatch = checked and p_value is not None and p_value < threshold
        verdict.reason = reason
        if split is not None and not srm.declares_shares(observed, declared):
            verdict.bundle_version = split.version
        verdicts.append(verdict.as_dict())
    return verdicts


def _config_drift(
    counts: Counts,
    window: int,
    bundles: dict[tuple[str, str], tuple[str, list[expected.Split]]],
    now: float,
) -> list[dict[str, Any]]:
    """Per project and env, its exposures and decisions in the window by the `configVersion`
    they were evaluated against, beside the newest bundle the config proxy served: how many
    used another (stale), and how old the oldest version still in use is."""
    by_target: dict[tuple[str, str], dict[str, int]] = {}
    for (project, env, version), n in counts.recent(Count.CONFIG_VERSIONS, window).items():
        by_target.setdefault((project, env), {})[version] = int(n)
    rows = []
    for (project, env), versions in sorted(by_target.items()):
        newest = bundles.get((project, env), (None,))[0]
        named = {v: n for v, n in versions.items() if v}
        with_version = sum(named.values())
        stale = None if newest is None else sum(n for v, n in named.items() if v != newest)
        ages = {v: age for v in named if (age := expected.age_seconds(v, now)) is not None}
        oldest = max(ages, key=ages.__getitem__) if ages else None
        rows.append(
            {
                "project": project,
                "env": env,
                "newest_version": newest,
                "events": sum(versions.values()),
                "with_version": with_version,
                "stale": stale,
                "stale_share": round(stale / with_version, 4)
                if stale is not None and with_version
                else None,
                "oldest_version": oldest,
                "oldest_version_age_seconds": None if oldest is None else round(ages[oldest]),
                "versions": dict(sorted(named.items(), key=lambda item: -item[1])[:TOP_EVENTS]),
            }
        )
    return rows


def _event_time(counts: Counts, window: int) -> list[dict[str, Any]]:
    """Per project and env, its events in the window by how long after their timestamp
    they arrived (each bucket's upper bound in seconds, `eventtime.DELAY_BUCKETS`), those
    from the future or late, and the bounds the median and the 99th percentile are under."""
    delays: dict[tuple[str, str], dict[str, int]] = {}
    for (project, env, le), n in counts.recent(Count.EVENT_DELAY, window).items():
        delays.setdefault((project, env), {})[le] = int(n)
    future = counts.recent(Count.EVENTS_FUTURE, window)
    late = counts.recent(Count.EVENTS_LATE, window)
    rows = []
    for (project, env), buckets in sorted(delays.items()):
        ordered = dict(sorted(buckets.items(), key=lambda item: float(item[0])))
        rows.append(
            {
                "project": project,
                "env": env,
                "events": sum(ordered.values()),
                "future": int(future.get((project, env), 0)),
                "late": int(late.get((project, env), 0)),
                "delay_p50_at_most_seconds": _quantile_bound(ordered, 0.5),
                "delay_p99_at_most_seconds": _quantile_bound(ordered, 0.99),
                "delay_buckets": ordered,
            }
        )
    return rows


def _quantile_bound(buckets: dict[str, int], quantile: float) -> float | None:
    """The upper bound of the bucket the `quantile` falls in (None past the last bound)."""
    total = sum(buckets.values())
    running = 0
    for le, n in buckets.items():
        running += n
        if running >= quantile * total:
            bound = float(le)
            return None if bound == float("inf") else bound
    return None


def _rejected(counts: Counts, window: int) -> dict[str, int]:
    return {reason: int(n) for (reason,), n in counts.recent(Count.EVENTS_REJECTED, window).items()}


def _upstream_answers(counts: Counts, window: int) -> dict[str, list[dict[str, Any]]]:
    """What the upstream's 2xx answers said in the window beyond "delivered": events it
    accepted fewer of than sent without naming them (unconfirmed), and events it took with
    a schema warning, by event name (the most warned first)."""
    unconfirmed = counts.recent(Count.UNCONFIRMED, window)
    warned = counts.recent(Count.SCHEMA_WARNINGS, window)
    return {
        "unconfirmed": [
            {"project": project, "env": env, "events": int(n)}
            for (project, env), n in sorted(unconfirmed.items())
        ],
        "schema_warnings": [
            {"project": project, "env": env, "event": event, "count": int(n)}
            for (project, env, event), n in sorted(warned.items(), key=lambda item: -item[1])
        ][:TOP_EVENTS],
    }


def _quarantined(counts: Counts, window: int) -> list[dict[str, Any]]:
    """Events that failed validation in the window, by the SDK that sent them and whether
    the dead-letter store kept them (`kept`, or `full` past quarantine_max_bytes, or
    `failed`), the most first."""
    found = counts.recent(Count.QUARANTINED, window)
    return [
        {"sdk": sdk, "kept": kept, "events": int(n)}
        for (sdk, kept), n in sorted(found.items(), key=lambda item: -item[1])
    ]


def _proxy(counts: Counts, settings: Settings) -> dict[str, Any]:
    """Config, resolve and decide calls passed upstream in the window, and the cache's size."""
    requests: dict[str, dict[str, int]] = {route.value: {} for route in ProxyRoute}
    recent = counts.recent(Count.PROXY_REQUESTS, settings.counts_window_minutes)
    for (route, outcome), n in sorted(recent.items()):
        requests.setdefault(route, {})[outcome] = int(n)
    entries, size = configcache.summary(DataDir(settings.data_dir))
    return {"requests": requests, "cache": {"entries": entries, "bytes": size}}


def _dead_letters(data_dir: DataDir) -> int:
    dead = DeadLetters.reader(data_dir)
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
    message = forwarder.get("message") or ""  # absent for a key without admin:read
    if upstream == UpstreamState.KEY_REJECTED:
        # The forwarder's own words: a refused key, or none configured for a target.
        problems.append(message or "the upstream key was refused, or none is configured")
    elif upstream == UpstreamState.NOT_CONFIGURED:
        warnings.append("no upstream configured: events stay queued")
    elif upstream == UpstreamState.RETRYING:
        outage = forwarder.get("outage_since")
        seconds = time.time() - datetime.fromisoformat(outage).timestamp() if outage else 0
        note = f"upstream failing for {seconds:.0f} s" + (f": {message}" if message else "")
        (problems if seconds > OUTAGE_UNHEALTHY_S else warnings).append(note)
    if document["queue"]["disk_budget_used"] >= BUDGET_UNHEALTHY:
        problems.append(f"disk budget {document['queue']['disk_budget_used']:.0%} used")
    by_sdk: dict[str, int] = {}
    for row in document["quarantined"]:
        by_sdk[row["sdk"]] = by_sdk.get(row["sdk"], 0) + row["events"]
    for sdk, n in sorted(by_sdk.items(), key=lambda item: -item[1]):
        problems.append(
            f"{n} invalid events from SDK {sdk} in the counts window, answered in "
            "validationErrors, which SDKs do not read (quarantined: collector dlq list)"
        )
    unconfirmed = sum(row["events"] for row in document["upstream_answers"]["unconfirmed"])
    if unconfirmed:
        problems.append(
            f"{unconfirmed} events unconfirmed by the upstream in the counts window: it "
            "answered 2xx accepting fewer than sent without naming them (unconfirmed_events)"
        )
    warned = document["upstream_answers"]["schema_warnings"]
    if warned:
        top = warned[0]
        warnings.append(
            f"the upstream took events with schema warnings in the counts window (most: "
            f"{top['count']} {top['event']!r} of {top['project']}/{top['env']})"
        )
    ledger_states = document["ledger"]["states"]
    for reason, n in sorted(ledger_states.get(ledger.State.LOST, {}).items()):
        problems.append(f"{n} events were lost: {reason} (collector audit)")
    if document["ledger"]["missing"]:
        problems.append(
            f"{document['ledger']['missing']} events answered 200 are missing from the queue:"
            " queue.db lost committed writes (collector audit)"
        )
    if document["dead_letters"]:
        warnings.append(f"{document['dead_letters']} dead-lettered events (collector dlq list)")
    for moved in document["recovered"]:
        lost = (
            " (what could be read of it was put back into the queue)"
            if moved["file"] == QUEUE
            else ""
        )
        warnings.append(
            f"{moved['file']} was corrupt and moved aside to {moved['moved_to']} at "
            f"{moved['at']}{lost}; delete it once inspected"
        )
    for row in document["event_time"]:
        where = f"{row['project']}/{row['env']}"
        if row["future"]:
            warnings.append(
                f"{row['future']} events of {where} in the counts window were stamped ahead "
                "of their arrival by more than event_future_margin_seconds: a client clock "
                "is ahead (timestamps are forwarded as sent)"
            )
        if row["late"]:
            warnings.append(
                f"{row['late']} events of {where} in the counts window arrived more than "
                "event_late_after_seconds after their timestamp (saved and re-sent, or a "
                "client clock behind)"
            )
    for verdict in document["sample_ratio"]:
        if verdict["mismatch"]:
            warnings.append(
                f"sample-ratio mismatch in policy {verdict['policy']} "
                f"({verdict['project']}/{verdict['env']}): p = {verdict['p_value']:.2g}"
            )
    return problems, warnings


def iso(moment: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second (how every time in status reads)."""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
