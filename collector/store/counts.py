"""Rolling per-minute counts of what the collector saw and did, persisted in the data directory.

The server and the forwarder each add to counts in memory (cheap, on the request path) and
flush them every second to `counts.db`, where they are kept per minute for `window` minutes
(for rates, top event names and exposures per allocation) and, all but those read only
over the window (`WINDOW_ONLY`), as running totals (for Prometheus counters, which must
never go down). Another process (`collector status`,
`/metrics`) reads them from the file (`Counts.reader`), so they are there whether or not
the server runs, and survive restarts.

Every name and every fixed label value is a member of an enum below, which the writers
(`collector.server`, `forwarder`) and the readers (`collector.ops`) all import: a renamed
count cannot silently read 0. Names and their labels:

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
    config_versions       project, env, version    (exposures and decisions by configVersion)
    event_delay           project, env, le (`bucket`)   (arrival less the event's timestamp)
    events_future         project, env       (stamped past event_future_margin_seconds ahead)
    events_late           project, env       (older than event_late_after_seconds at arrival)
    forwarded             project, env                           (forwarder)
    unconfirmed           project, env       (in a 2xx accepting fewer, none named)
    schema_warnings       project, env, event    (taken by the upstream with a warning)
    quarantined           sdk, kept (kept, full, failed)   (invalid at ingest; the writer)
    upstream_requests     outcome (UpstreamOutcome)
    dead_lettered         reason (DeadLetterReason)
    proxy_requests        route (ProxyRoute), outcome (ProxyOutcome)   (server)
    request_duration      le (`bucket`)                          (events requests)
    request_duration_sum                                         (their seconds)
    proxy_duration        route (ProxyRoute), le (`bucket`)      (calls passed upstream)
    proxy_duration_sum    route (ProxyRoute)                     (their seconds)

The two latency histograms count each request once, in the bucket of the first bound at
or above its duration (`bucket`); `/metrics` adds them up into Prometheus' cumulative
buckets, the last of which ("+Inf") is the count.

Event names and labels are client-controlled; the server cuts and bounds them
(`collector.server.counting`), and here every name keeps at most MAX_SERIES distinct label
sets (`CLIENT_CHOSEN` says which labels clients choose), of all the file has seen or, for
`WINDOW_ONLY` names, of what the window holds: past it, a new set is counted with those
labels as `(other)`. So counts.db, /metrics and status stay bounded whatever
names clients send (200,000 random ones once made counts.db 607 MB and /metrics 51 MB).
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import orjson

from collector.store import db
from collector.store.datadir import DataDir

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS minutes (minute INTEGER, name TEXT, labels TEXT,"
    " value REAL, PRIMARY KEY (minute, name, labels)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS totals (name TEXT, labels TEXT, value REAL,"
    " PRIMARY KEY (name, labels)) WITHOUT ROWID",
)

Labels = tuple[str, ...]


class Count(StrEnum):
    """The names counted (see the table above for their labels)."""

    REQUESTS = "requests"
    EVENTS_RECEIVED = "events_received"
    EVENTS_ACCEPTED = "events_accepted"
    EVENTS_WRITTEN = "events_written"
    EVENTS_DEDUPLICATED = "events_deduplicated"
    EVENTS_REJECTED = "events_rejected"
    TRACK_EVENTS = "track_events"
    EXPOSURES = "exposures"
    EXPOSURE_SHARES = "exposure_shares"
    EXPOSURE_SHARES_N = "exposure_shares_n"
    CONVERSIONS = "conversions"
    CONFIG_VERSIONS = "config_versions"
    EVENT_DELAY = "event_delay"
    EVENTS_FUTURE = "events_future"
    EVENTS_LATE = "events_late"
    FORWARDED = "forwarded"
    UNCONFIRMED = "unconfirmed"
    SCHEMA_WARNINGS = "schema_warnings"
    QUARANTINED = "quarantined"
    UPSTREAM_REQUESTS = "upstream_requests"
    DEAD_LETTERED = "dead_lettered"
    PROXY_REQUESTS = "proxy_requests"
    REQUEST_DURATION = "request_duration"
    REQUEST_DURATION_SUM = "request_duration_sum"
    PROXY_DURATION = "proxy_duration"
    PROXY_DURATION_SUM = "proxy_duration_sum"


class UpstreamOutcome(StrEnum):
    """What an upstream events request came to (the forwarder's `upstream_requests`)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"
    KEY_REJECTED = "key_rejected"


class DeadLetterReason(StrEnum):
    MAX_AGE = "max_age"  # queued longer than max_event_age_seconds
    REJECTED = "rejected"  # refused by the upstream: 400, 413, 422 alone in its batch, or
    # named in a 2xx answer's validationErrors
    UNCONFIRMED = "unconfirmed"  # in a batch whose 2xx left some unaccounted for (a setting)


class ProxyRoute(StrEnum):
    CONFIG = "config"
    RESOLVE = "resolve"
    DECIDE = "decide"


class ProxyOutcome(StrEnum):
    """What a call passed upstream came to: passed through (`ok`, `not_modified`, or
    `rejected` for a 4xx), served from the cache (`stale`), or failed (`upstream_error`)."""

    OK = "ok"
    NOT_MODIFIED = "not_modified"
    STALE = "stale"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"


# Distinct label sets kept per count name by each process that writes counts (and found in
# the file when it starts): enough for a fleet's projects and an experiment programme,
# small enough that /metrics stays a few MB and status quick.
MAX_SERIES = 1000
OTHER = "(other)"
# For each count whose labels clients choose, the positions of those labels: folded into
# OTHER past MAX_SERIES. The rest (status, type, outcome, route, bucket) are fixed sets.
CLIENT_CHOSEN: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        (
            "events_received",
            "events_accepted",
            "events_written",
            "events_deduplicated",
            "track_events",
        ),
        (0, 1, 2),
    ),
    **dict.fromkeys(
        ("exposures", "exposure_shares", "exposure_shares_n", "conversions"), (0, 1, 2, 3, 4)
    ),
    "config_versions": (0, 1, 2),
    **dict.fromkeys(("event_delay", "events_future", "events_late", "forwarded"), (0, 1)),
    "unconfirmed": (0, 1),
    "schema_warnings": (0, 1, 2),
    "quarantined": (0,),
}
# Counts read only over the window (status; no Prometheus counter is made of them): kept
# per minute and never as totals, and their label sets bounded by what the window holds,
# not by all a file has seen. An experiment programme starts new policies, and SDKs new
# config versions, every week: bounded for ever, the 1001st policy's exposures would all
# be `(other)` and its sample ratio never checked.
WINDOW_ONLY = frozenset(
    {
        "track_events",
        "exposures",
        "exposure_shares",
        "exposure_shares_n",
        "conversions",
        "config_versions",
    }
)


def minute_of(moment: float) -> int:
    return int(moment // 60)


# The `le` bounds of event_delay (`collector.server.eventtime`): seconds from an event's
# timestamp to its arrival. A clock a minute or a second ahead (negative), then from a
# request's own transit to an SDK's batching (10 s, 1 min) to events saved and sent again
# minutes, hours, days or a week later.
DELAY_BUCKETS = (-60.0, -1.0, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0, 604800.0)


def bucket(bounds: Sequence[float], seconds: float) -> str:
    """The `le` label of the histogram bucket `seconds` is counted in: the first of `bounds`
    (ascending) at or above it, as text ("0.005", "1.0"), or "+Inf" past the last."""
    index = bisect.bisect_left(bounds, seconds)
    return str(float(bounds[index])) if index < len(bounds) else "+Inf"


_translated = db.translated("counts")


class Counts:
    """Counters added to in memory and flushed to `counts.db`; or, opened with `reader`,
    the file's counts read-only (a missing file holds none)."""

    def __init__(self, conn: sqlite3.Connection | None, window_minutes: int = 60) -> None:
        self.window_minutes = window_minutes
        self._conn = conn
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str], Counter[Labels]] = {}
        self._series: dict[str, set[str]] = {}  # name -> label sets stored (JSON text)
        self._window_start: int | None = None  # the oldest minute kept at the last write
        self._before_take: list[Callable[[], None]] = []

    @classmethod
    def writer(
        cls, data_dir: DataDir, window_minutes: int = 60, *, recover: bool = False
    ) -> Counts:
        data_dir.create()
        # Losing the last second of counts to a power cut is acceptable: NORMAL, no fsync.
        with _translated:
            return cls(db.open_writer(data_dir.counts, SCHEMA, recover=recover), window_minutes)

    @classmethod
    def reader(cls, data_dir: DataDir, window_minutes: int = 60) -> Counts:
        with _translated:
            return cls(db.open_reader(data_dir.counts), window_minutes)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    # --- adding ------------------------------------------------------------------------

    def add(self, name: Count, labels: Labels, value: float = 1) -> None:
        counter = self.counter(name)
        # Counter is typed for ints; a few counts (sums of declared shares) are floats.
        counter[labels] = counter[labels] + value  # type: ignore[assignment]

    def counter(self, name: Count, at: float | None = None) -> Counter[Labels]:
        """The in-memory counter of `name` for the current minute, to add to directly."""
        key = (minute_of(time.time() if at is None else at), name)
        counter = self._pending.get(key)
        if counter is None:
            counter = self._pending[key] = Counter()
        return counter

    def flush(self) -> None:
        """Write what was added since the last flush (from the thread that adds)."""
        self.write(self.take())

    def before_take(self, settle: Callable[[], None]) -> None:
        """Have `settle` add what it holds back (counts kept to add in bulk) at each take."""
        self._before_take.append(settle)

    def take(self) -> dict[tuple[int, str], Counter[Labels]]:
        """What was added since the last take; call it from the thread that adds, then
        `write` it from any thread, so no increment is lost to a flush in progress."""
        for settle in self._before_take:
            settle()
        pending, self._pending = self._pending, {}
        return pending

    def write(self, pending: dict[tuple[int, str], Counter[Labels]]) -> None:
        """Add `pending` to the file (label sets past MAX_SERIES folded into OTHER);
        forget minutes past the window."""
        assert self._conn is not None, "a counts reader cannot write"
        oldest = minute_of(time.time()) - self.window_minutes
        if oldest != self._window_start:  # a minute left the window: reread what it holds
            self._window_start = oldest
            for name in WINDOW_ONLY:
                self._series.pop(name, None)
        with self._lock, _translated, self._conn:
            rows: dict[tuple[int, str, str], float] = {}
            for (minute, name), counter in pending.items():
                for labels, value in counter.items():
                    if value:
                        key = (minute, str(name), self._series_of(str(name), labels))
                        rows[key] = rows.get(key, 0) + value
            self._insert([(*key, value) for key, value in rows.items()], oldest)

    def _series_of(self, name: str, labels: Labels) -> str:
        """`labels` as stored: as they are while `name` has room for another series (or
        has them already), else with the labels clients chose as OTHER."""
        text = orjson.dumps(tuple(labels)).decode()
        chosen = CLIENT_CHOSEN.get(name)
        if chosen is None:
            return text
        series = self._series.get(name)
        if series is None:
            assert self._conn is not None
            if name in WINDOW_ONLY:
                found = self._conn.execute(
                    "SELECT DISTINCT labels FROM minutes WHERE name = ? AND minute >= ?",
                    (name, self._window_start or 0),
                )
            else:
                found = self._conn.execute("SELECT labels FROM totals WHERE name = ?", (name,))
            series = self._series[name] = {row[0] for row in found}
        if text in series:
            return text
        if len(series) < MAX_SERIES:
            series.add(text)
            return text
        folded = tuple(OTHER if i in chosen else value for i, value in enumerate(labels))
        text = orjson.dumps(folded).decode()
        series.add(text)  # the folded set is a series too (one per fixed labels' values)
        return text

    def _insert(self, rows: list[tuple[int, str, str, float]], oldest: int) -> None:
        assert self._conn is not None
        self._conn.executemany(
            "INSERT INTO minutes (minute, name, labels, value) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET value = value + excluded.value",
            rows,
        )
        self._conn.executemany(
            "INSERT INTO totals (name, labels, value) VALUES (?, ?, ?)"
            " ON CONFLICT DO UPDATE SET value = value + excluded.value",
            [(name, labels, value) for _, name, labels, value in rows if name not in WINDOW_ONLY],
        )
        self._conn.execute("DELETE FROM minutes WHERE minute < ?", (oldest,))

    # --- reading -----------------------------------------------------------------------

    def recent(self, name: Count, minutes: int) -> dict[Labels, float]:
        """Sums per labels of `name` over the last `minutes` minutes (this one included)."""
        since = minute_of(time.time()) - minutes + 1
        rows = self._read(
            "SELECT labels, SUM(value) FROM minutes WHERE name = ? AND minute >= ? GROUP BY labels",
            (str(name), since),
        )
        return {tuple(orjson.loads(labels)): value for labels, value in rows}

    def all_totals(self) -> dict[str, dict[Labels, float]]:
        result: dict[str, dict[Labels, float]] = {}
        for name, labels, value in self._read("SELECT name, labels, value FROM totals"):
            result.setdefault(name, {})[tuple(orjson.loads(labels))] = value
        return result

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock, _translated:
            return db.read(self._conn, sql, params)
