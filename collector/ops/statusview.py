"""`collector status` for a person: the status document as rich tables, read in seconds.

`render` is the whole view; `fitting` the most of it that fits a terminal (`status --watch`
on an 80x24 terminal shows the headline, the processes and the queue, not half a table);
`summary_line` one line of it, for `status --watch` into a pipe or a file; `experiments`
the sample-ratio checks alone, narrow enough for an 80-column terminal.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from collector.store.counts import ProxyOutcome


def render(document: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [
        _headline(document),
        _processes(document),
        _queue(document),
        _rates(document),
        _allocations(document),
        _top_events(document),
    ]
    if document.get("event_time") or document.get("config_drift"):
        parts.append(_event_health(document))
    proxy = document.get("proxy")
    if proxy and (proxy["cache"]["entries"] or any(proxy["requests"].values())):
        parts.append(_proxy(proxy))
    return Group(*parts)


def fitting(document: dict[str, Any], console: Console) -> RenderableType:
    """As much of the view as fits `console`'s height: the whole view, else the headline,
    processes and queue, else the headline alone."""
    for view in (
        render(document),
        Group(_headline(document), _processes(document), _queue(document)),
    ):
        if len(console.render_lines(view, console.options, pad=False)) < console.height:
            return view
    return _headline(document)


def summary_line(document: dict[str, Any]) -> str:
    """The status in one line: health, processes, queue, rates over the last minute."""
    queue, rates = document["queue"], document["rates"]
    health = "healthy" if document["healthy"] else "UNHEALTHY: " + "; ".join(document["problems"])
    processes = " ".join(
        f"{name} {'up' if document[name]['up'] else 'down'}" for name in ("server", "forwarder")
    )
    return (
        f"{document['generated_at']} {health} | {processes},"
        f" upstream {document['forwarder'].get('upstream', '')}"
        f" | queue {queue['events']:,} events, {queue['disk_budget_used']:.1%} of budget"
        f" | accepted {rates['accepted']['1m']:,.2f}/s forwarded {rates['forwarded']['1m']:,.2f}/s"
        f" | dead letters {document['dead_letters']:,}"
    )


def _headline(document: dict[str, Any]) -> Text:
    if document["healthy"]:
        text = Text("healthy", style="bold green")
    else:
        text = Text("UNHEALTHY: " + "; ".join(document["problems"]), style="bold red")
    for warning in document["warnings"]:
        text.append(f"\nwarning: {warning}", style="yellow")
    text.append(f"\n{document['data_dir']} at {document['generated_at']}", style="dim")
    return text


def _processes(document: dict[str, Any]) -> Table:
    table = Table("process", "state", "details", title="processes", title_justify="left")
    server, forwarder = document["server"], document["forwarder"]
    table.add_row("server", _up(server["up"]), server.get("url", "") if server["up"] else "")
    upstream = forwarder.get("upstream", "")
    details = f"upstream {upstream}"
    if forwarder.get("since"):
        details += f" since {forwarder['since']}"
    if forwarder.get("message"):
        details += f": {forwarder['message']}"
    details += f"\nlast forward: {forwarder.get('last_success') or 'never'}"
    table.add_row("forwarder", _up(forwarder["up"]), details)
    return table


def _queue(document: dict[str, Any]) -> Table:
    queue = document["queue"]
    table = Table(
        "events",
        "bytes",
        "oldest event",
        "disk budget",
        "dead letters",
        title="queue",
        title_justify="left",
    )
    age = queue["oldest_event_age_seconds"]
    table.add_row(
        f"{queue['events']:,}",
        _bytes(queue["bytes"]),
        "-" if age is None else _duration(age),
        f"{queue['disk_budget_used']:.1%} of {_bytes(queue['disk_budget_bytes'])}",
        f"{document['dead_letters']:,}",
    )
    return table


def _rates(document: dict[str, Any]) -> Table:
    table = Table("events/s", "1 min", "5 min", "60 min", title="rates", title_justify="left")
    for what, rates in document["rates"].items():
        table.add_row(what, *(f"{rates[w]:,.2f}" for w in ("1m", "5m", "60m")))
    return table


def experiments(document: dict[str, Any]) -> RenderableType:
    """Each policy's exposures per allocation against the split expected, and its verdict
    (`collector experiments`): the policy and verdict on its first row, and under the
    table the bundle each split was read from."""
    table = folding(
        Table(
            "policy",
            "allocation",
            "exposures",
            "share",
            "expected",
            "verdict",
            title="sample-ratio checks (window)",
            title_justify="left",
        )
    )
    bundles: dict[str, str] = {}
    for verdict in document["sample_ratio"]:
        total = sum(verdict["exposures"].values())
        names = sorted(set(verdict["exposures"]) | set(verdict["expected_shares"]))
        # The policy on its first row, its project/env under it (a column of its own
        # would not fit 80 columns).
        heads = [Text(verdict["policy"]), Text(f"{verdict['project']}/{verdict['env']}", "dim")]
        for index, name in enumerate(names + [""] * max(0, 2 - len(names))):
            exposures = verdict["exposures"].get(name, 0)
            expected = verdict["expected_shares"].get(name)
            shown = bool(name)
            table.add_row(
                heads[index] if index < len(heads) else "",
                name,
                f"{exposures:,.0f}" if shown else "",
                (f"{exposures / total:.1%}" if total else "-") if shown else "",
                ("-" if expected is None else f"{expected:.1%}") if shown else "",
                _verdict(verdict, against=False) if index == 0 else Text(""),
            )
        table.add_section()
        if verdict.get("bundle_version"):
            where = f"{verdict['project']}/{verdict['env']}"
            bundles[where] = verdict["bundle_version"]
    notes = [
        Text(f"expected: the split of bundle {version} of {where}", style="dim")
        for where, version in sorted(bundles.items())
    ]
    if not document["sample_ratio"]:
        notes.append(Text("no exposures of a policy in the window", style="dim"))
    return Group(table, *notes)


def _allocations(document: dict[str, Any]) -> Table:
    """Exposures and conversions per allocation, each policy's share of exposures against
    the share expected (declared, or its bundle's split), and its sample-ratio verdict."""
    table = folding(
        Table(
            "project/env",
            "policy",
            "allocation",
            "exposures",
            "share (expected)",
            "conversions",
            "sample ratio",
            title="exposures and conversions per allocation (window)",
            title_justify="left",
        )
    )
    verdicts = {(v["project"], v["env"], v["policy"]): v for v in document["sample_ratio"]}
    for row in _with_unexposed(document["allocations"], verdicts):
        verdict = verdicts.get((row["project"], row["env"], row["policy"]))
        table.add_row(
            f"{row['project']}/{row['env']}",
            row["policy"],
            row["allocation"],
            f"{row['exposures']:,}",
            _share(row, verdict),
            f"{row['conversions']:,}",
            _verdict(verdict),
        )
    return table


def _with_unexposed(
    rows: list[dict[str, Any]], verdicts: dict[tuple[str, str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """`rows`, and a row of none for each allocation a verdict expects that nobody reached
    (a broken arm shows as a line of zeros, not as nothing)."""
    seen = {(r["project"], r["env"], r["policy"], r["allocation"]) for r in rows}
    extra = [
        {
            "project": p,
            "env": e,
            "policy": policy,
            "allocation": a,
            "exposures": 0,
            "conversions": 0,
        }
        for (p, e, policy), verdict in verdicts.items()
        for a in verdict["expected_shares"]
        if (p, e, policy, a) not in seen
    ]
    return sorted(
        rows + extra, key=lambda r: (r["project"], r["env"], r["policy"], r["allocation"])
    )


def _share(row: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return ""
    total = sum(verdict["exposures"].values())
    observed = f"{row['exposures'] / total:.1%}" if total else "-"
    expected = verdict["expected_shares"].get(row["allocation"])
    return observed if expected is None else f"{observed} ({expected:.1%})"


def _top_events(document: dict[str, Any]) -> Table:
    table = folding(
        Table(
            "project/env", "event", "count", title="top track events (window)", title_justify="left"
        )
    )
    for row in document["top_events"]:
        table.add_row(f"{row['project']}/{row['env']}", row["event"], f"{row['count']:,}")
    return table


def _event_health(document: dict[str, Any]) -> Table:
    """Per project and env: events from the future or late, the bounds the median and the
    99th percentile of the arrival delay are under, and config drift (the share of
    exposures and decisions on another version than the newest bundle, the oldest's age)."""
    table = folding(
        Table(
            "project/env",
            "events",
            "future",
            "late",
            "delay p50",
            "delay p99",
            "stale config",
            "oldest config",
            title="event time and config drift (window)",
            title_justify="left",
        )
    )
    timing = {(r["project"], r["env"]): r for r in document.get("event_time", [])}
    drift = {(r["project"], r["env"]): r for r in document.get("config_drift", [])}
    for key in sorted(timing.keys() | drift.keys()):
        row, config = timing.get(key), drift.get(key)
        stale = config and config["stale_share"]
        age = config and config["oldest_version_age_seconds"]
        table.add_row(
            "/".join(key),
            f"{row['events']:,}" if row else "-",
            _flagged(row["future"]) if row else "-",
            _flagged(row["late"]) if row else "-",
            _at_most(row["delay_p50_at_most_seconds"]) if row else "-",
            _at_most(row["delay_p99_at_most_seconds"]) if row else "-",
            "-" if stale is None else f"{stale:.1%}",
            "-" if age is None else _duration(age),
        )
    return table


def _flagged(n: int) -> Text:
    return Text(f"{n:,}", style="yellow" if n else "")


def _at_most(seconds: float | None) -> str:
    if seconds is None:
        return "> 7 d"
    return f"≤ {_duration(seconds)}"


def _proxy(proxy: dict[str, Any]) -> Table:
    """Config, resolve and decide calls passed upstream (shown once there were any)."""
    cache = proxy["cache"]
    title = (
        f"SDK calls passed upstream (window); config cache: {cache['entries']:,} bundles, "
        f"{_bytes(cache['bytes'])}"
    )
    table = Table("route", *ProxyOutcome, title=title, title_justify="left")
    for route, outcomes in proxy["requests"].items():
        table.add_row(route, *(f"{outcomes.get(o, 0):,}" for o in ProxyOutcome))
    return table


def folding(table: Table) -> Table:
    """Names too long for a narrow terminal wrap onto more lines instead of being cut: two
    policies cut to "pol_check…" could not be told apart."""
    for column in table.columns:
        column.overflow = "fold"
    return table


def _verdict(verdict: dict[str, Any] | None, *, against: bool = True) -> Text:
    if verdict is None or not verdict["checked"]:
        return Text(verdict["reason"] if verdict else "", style="dim")
    version = verdict.get("bundle_version") if against else None
    against_text = f" vs bundle {version}" if version else ""
    if verdict["mismatch"]:
        return Text(f"MISMATCH p={verdict['p_value']:.1e}{against_text}", style="bold red")
    return Text(f"ok p={verdict['p_value']:.2f}{against_text}", style="green")


def _up(up: bool) -> Text:
    return Text("up", style="green") if up else Text("down", style="bold red")


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
