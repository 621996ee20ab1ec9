"""Rolling per-minute counts of what the collector saw and did, persisted in the data directory.

The server and the forwarder each add to counts in memory (cheap, on the request path) and
flush them every second to `counts.db`, where they are kept per minute for `window` minutes
(for rates, top event names and exposures per allocation) and as running totals (for
Prometheus counters, which must never go down). Another process (`collector status`) reads
them from the file, so they are there whether or not the server runs, and survive restarts.

Names and their labels:

    requests              status                                 (server)
    events_received       org, project, env, type
    events_accepted       org, project, env, type
    events_written        org, project, env, type
    events_deduplicated   org, project, env, type
    events_rejected       reason
    track_events          project, env, event
    exposures             project, env, layer, policy, allocation
    exposure_shares       project, env, layer, policy, allocation  (sum of declared probability)
    exposure_shares_n     project, env, layer, policy, allocation  (exposures declaring one)
    conversions           project, env, policy, allocation, event  (tracks attributed)
    forwarded             project, env                           (forwarder)
    upstream_requests     outcome
    dead_lettered         reason
    proxy_requests        route, outcome                         (server: config/resolve/decide)

Event names and labels are client-controlled, so each label value is cut to 100 characters
and at most `MAX_NAMES` distinct event names are counted per process; later ones are
counted as `(other)`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from collector import recovery

DB_FILE = "counts.db"
# How many distinct track event names are counted separately (per process lifetime).
MAX_NAMES = 500
OTHER = "(other)"
LABEL_CHARS = 100
# Decisions remembered to attribute later track events to their allocation: enough for an
# hour of a busy service, bounded so memory is too (~300 bytes each: ~60 MB at most).
DECISIONS_KEPT = 200_000
DECISION_TTL_S = 3600.0

Labels = tuple[str, ...]


def label(value: Any) -> str:
    if isinstance(value, str):  # nearly always: first, since it runs thrice per event
        return value[:LABEL_CHARS]
    if value is None:
        return ""
    if isinstance(value, list | dict):
        # A client's array or object where a name belongs (an invalid event): its type, not
        # str() of it, which could be megabytes or nested too deep to print.
        return f"({type(value).__name__})"
    return str(value)[:LABEL_CHARS]


def minute_of(moment: float) -> int:
    return int(moment // 60)


class Counts:
    """Counters added to in memory and flushed to `counts.db`."""

    def __init__(self, data_dir: Path, window_minutes: int = 60, *, recover: bool = False) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        if recover:  # see collector.recovery: a corrupt file is moved aside, not crashed on
            recovery.ensure_usable(data_dir / DB_FILE)
        self.window_minutes = window_minutes
        self._conn = sqlite3.connect(data_dir / DB_FILE, check_same_thread=False, timeout=5)
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str], Counter[Labels]] = {}
        with self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # Losing the last second of counts to a power cut is acceptable; an fsync per
            # flush is not needed for that.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS minutes (minute INTEGER, name TEXT, labels TEXT,"
                " value REAL, PRIMARY KEY (minute, name, labels)) WITHOUT ROWID"
            )
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS totals (name TEXT, labels TEXT, value REAL,"
                " PRIMARY KEY (name, labels)) WITHOUT ROWID"
            )

    def close(self) -> None:
        self._conn.close()

    # --- adding ------------------------------------------------------------------------

    def add(self, name: str, labels: Labels, value: float = 1) -> None:
        counter = self.counter(name)
        # Counter is typed for ints; a few counts (sums of declared shares) are floats.
        counter[labels] = counter[labels] + value  # type: ignore[assignment]

    def counter(self, name: str, at: float | None = None) -> Counter[Labels]:
        """The in-memory counter of `name` for the current minute, to add to directly."""
        key = (minute_of(time.time() if at is None else at), name)
        counter = self._pending.get(key)
        if counter is None:
            counter = self._pending[key] = Counter()
        return counter

    def flush(self) -> None:
        """Write what was added since the last flush (from the thread that adds)."""
        self.write(self.take())

    def take(self) -> dict[tuple[int, str], Counter[Labels]]:
        """What was added since the last take; call it from the thread that adds, then
        `write` it from any thread, so no increment is lost to a flush in progress."""
        pending, self._pending = self._pending, {}
        return pending

    def write(self, pending: dict[tuple[int, str], Counter[Labels]]) -> None:
        """Add `pending` to the file; forget minutes past the window."""
        rows = [
            (minute, name, orjson.dumps(labels).decode(), value)
            for (minute, name), counter in pending.items()
            for labels, value in counter.items()
            if value
        ]
        oldest = minute_of(time.time()) - self.window_minutes
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO minutes (minute, name, labels, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET value = value + excluded.value",
                rows,
            )
            self._conn.executemany(
                "INSERT INTO totals (name, labels, value) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET value = value + excluded.value",
                [(name, labels, value) for _, name, labels, value in rows],
            )
            self._conn.execute("DELETE FROM minutes WHERE minute < ?", (oldest,))

    # --- reading -----------------------------------------------------------------------

    def recent(self, name: str, minutes: int) -> dict[Labels, float]:
        """Sums per labels of `name` over the last `minutes` minutes (this one included)."""
        since = minute_of(time.time()) - minutes + 1
        with self._lock:
            rows = self._conn.execute(
                "SELECT labels, SUM(value) FROM minutes WHERE name = ? AND minute >= ?"
                " GROUP BY labels",
                (name, since),
            ).fetchall()
        return {tuple(orjson.loads(labels)): value for labels, value in rows}

    def totals(self, name: str) -> dict[Labels, float]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT labels, value FROM totals WHERE name = ?", (name,)
            ).fetchall()
        return {tuple(orjson.loads(labels)): value for labels, value in rows}

    def all_totals(self) -> dict[str, dict[Labels, float]]:
        with self._lock:
            rows = self._conn.execute("SELECT name, labels, value FROM totals").fetchall()
        result: dict[str, dict[Labels, float]] = {}
        for name, labels, value in rows:
            result.setdefault(name, {})[tuple(orjson.loads(labels))] = value
        return result


class EventCounter:
    """Counts the server's events: by type and target, track names, exposures, conversions."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self._names: set[str] = set()
        self._decisions: OrderedDict[str, tuple[float, list[Labels]]] = OrderedDict()

    def received(self, events: Iterable[Any]) -> list[Labels]:
        """Count events as received; returns each one's target, for `accepted`."""
        targets = list(map(_target, events))
        self.counts.counter("events_received").update(targets)
        return targets

    def rejected(self, reason: str, count: int = 1) -> None:
        self.counts.add("events_rejected", (reason,), count)

    def accepted(
        self, events: list[dict[str, Any]], targets: list[Labels], skipped: set[int]
    ) -> None:
        """Count accepted events (`targets` are theirs, from `received`); `skipped` holds
        the indexes not written (duplicates)."""
        self.counts.counter("events_accepted").update(targets)
        written = self.counts.counter("events_written")
        if skipped:
            written.update(t for i, t in enumerate(targets) if i not in skipped)
            self.counts.counter("events_deduplicated").update(targets[i] for i in skipped)
        else:
            written.update(targets)
        for index, event in enumerate(events):
            kind = event["type"]
            # A duplicate (a client's retry) is the same event again: counted once above as
            # de-duplicated, never twice as a track event, exposure or conversion.
            if kind == "track":
                if index not in skipped:
                    self._track(event)
            elif kind == "exposure":
                if index not in skipped:
                    self._exposure(event)
                self._remember(event.get("decisionId"), event)
            else:
                self._remember(event.get("id"), event)

    def _track(self, event: dict[str, Any]) -> None:
        where = (label(event["projectId"]), label(event["env"]))
        name = self._name(event["event"])
        self.counts.counter("track_events")[(*where, name)] += 1
        for policy, allocation in self._attribution(event):
            self.counts.counter("conversions")[(*where, policy, allocation, name)] += 1

    def _exposure(self, event: dict[str, Any]) -> None:
        where = (label(event["projectId"]), label(event["env"]))
        exposures = self.counts.counter("exposures")
        for layer in event["layers"]:
            if layer.get("bucket", 0) < 0 or layer.get("attributionOnly"):
                continue
            key = (
                *where,
                label(layer["layerId"]),
                label(layer.get("policyId")),
                label(layer.get("allocationName") or layer.get("allocationId")),
            )
            exposures[key] += 1
            probability = layer.get("probability")
            if isinstance(probability, int | float) and not isinstance(probability, bool):
                self.counts.add("exposure_shares", key, probability)
                self.counts.counter("exposure_shares_n")[key] += 1

    def _remember(self, decision_id: Any, event: dict[str, Any]) -> None:
        if not isinstance(decision_id, str) or not decision_id:
            return
        allocations: list[Labels] = [
            (label(layer.get("policyId")), label(layer.get("allocationName")))
            for layer in event["layers"]
            if layer.get("policyId") and layer.get("allocationName") and layer["bucket"] >= 0
        ]
        if not allocations:
            return
        self._decisions[decision_id] = (time.monotonic(), allocations)
        self._decisions.move_to_end(decision_id)
        while len(self._decisions) > DECISIONS_KEPT:
            self._decisions.popitem(last=False)

    def _attribution(self, event: dict[str, Any]) -> list[Labels]:
        """(policy, allocation) pairs a track event counts for: those of the decision its
        `decisionId` names, if remembered and recent, else the SDK's own `attribution`."""
        found = self._decisions.get(event.get("decisionId") or "")
        if found is not None and time.monotonic() - found[0] <= DECISION_TTL_S:
            return found[1]
        given = event.get("attribution")
        if not isinstance(given, list):
            return []
        return [
            (label(item.get("policyId")), label(item.get("allocationName")))
            for item in given
            if isinstance(item, dict) and item.get("policyId") and item.get("allocationName")
        ]

    def _name(self, name: str) -> str:
        if name in self._names:
            return label(name)
        if len(self._names) >= MAX_NAMES:
            return OTHER
        self._names.add(name)
        return label(name)


def _target(event: Any) -> Labels:
    if not isinstance(event, dict):
        return ("", "", "", "invalid")
    kind = event.get("type")
    return (
        label(event.get("orgId")),
        label(event.get("projectId")),
        label(event.get("env")),
        kind if kind in ("exposure", "decision", "track") else "invalid",
    )
