"""What is counted of each event: by type (with org, project and env), exposures per
allocation (with their declared shares, for the sample-ratio check), exposures and
decisions by their `configVersion` (config drift), each event's arrival delay and whether
it was stamped in the future or late (`collector.server.eventtime`), track event names,
and conversions attributed to an allocation.

`EventCounter` runs in each server process, on the request path, on the validated structs
(`collector.events`), so it only reads attributes: per event it builds one tuple (one per
layer for exposures); a request's tuples are counted in a Counter (in C) or appended to a
list, which wait to be added in bulk to `Counts`' in-memory counters when the app takes
them to flush to `counts.db` (every second), with labels cut and bounded once per distinct
tuple (`_add`), not once per event.

Track events and conversions need what other requests said (the decision a track names,
the event names seen so far), and with `workers` those requests may reach another server
process. So each server sends the `notes` of a request's decisions and tracks with its
events to the one queue writer, where `Conversions` counts them, after the commit and off
the request path. Event names and labels are client-controlled, so each label value is cut
to `LABEL_CHARS` characters and at most `MAX_NAMES` distinct event names are counted;
later ones are counted as `(other)`.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec

from collector.events import (
    EVENT_TYPES,
    Decision,
    Event,
    Exposure,
    LayerAssignment,
    Track,
    attribution,
    number,
)
from collector.server import eventtime
from collector.store.counts import Count, Counts, Labels, minute_of

# How many distinct track event names are counted separately (per process lifetime).
MAX_NAMES = 500
OTHER = "(other)"
LABEL_CHARS = 100
# Decisions remembered to attribute later track events to their allocation: enough for an
# hour of a busy service, bounded so memory is too (held as full tuples per decision they
# took 48 MB, a quarter of the server's memory; see `Decisions` for what they take now).
DECISIONS_KEPT = 200_000
DECISION_TTL_S = 3600.0
# Distinct sets of (policy, allocation) pairs the decisions may name (labels are client
# text): past it, further decisions are not remembered (their conversions then count by the
# SDK's own `attribution`).
MAX_ALLOCATION_SETS = 10_000  # below 65,536: held as unsigned shorts (`_Generation`)
# Events received whose labels wait to be counted in bulk (`EventCounter.settle`) at
# most, with their exposures about 1 MB (a second of 1000-event requests is some
# 100,000). Counted per request, five Counters were built and their labels cut: 12.7 us of
# the event loop's time for a 1-event request against 4.7 in bulk, and 1.1 ms against 0.6
# for 1000 exposures, settling included (measured in-process).
PENDING_KEYS = 10_000


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


class EventCounter:
    """Counts the server's events into `counts`: each request's labels wait (a Counter of
    its events' labels, and a tuple per exposure), added in bulk (`settle`) when `counts`
    is taken for a flush, the minute turns, or PENDING_KEYS wait."""

    def __init__(
        self,
        counts: Counts,
        *,
        future_margin_s: float = eventtime.FUTURE_MARGIN_S,
        late_after_s: float = eventtime.LATE_AFTER_S,
    ) -> None:
        self.counts = counts
        self._margin, self._late_after = future_margin_s, late_after_s
        self._minute = minute_of(time.time())
        self._keys = 0  # events received since the last settle
        self._received: list[Counter[Labels]] = []  # per request (and its invalid events)
        self._accepted: list[Counter[Labels]] = []  # per request: mostly the same Counters
        self._deduplicated: list[Labels] = []
        self._exposures: list[Labels] = []
        self._shares: list[tuple[Labels, float]] = []  # each exposure's declared share
        self._times: list[tuple[Labels, eventtime.Tally]] = []  # per request and target
        counts.before_take(self.settle)

    def received(
        self, decoded: Sequence[Event | None], raws: Sequence[bytes | msgspec.Raw]
    ) -> Received:
        """Count events as received: valid ones (`decoded`) by their labels, invalid ones
        by what can be read of them (`raws`: their JSON). Returns the valid ones' labels,
        for `accepted`."""
        labels = _labels_of(list(filter(None, decoded)))
        try:
            valid = Counter(labels)  # in C; a few keys even for 1000 events
        except TypeError:  # a configVersion that is an array or object: its label instead
            labels = [(*key[:4], label(key[4])) for key in labels]
            valid = Counter(labels)
        self._wait(len(decoded))
        self._received.append(valid)
        if len(labels) < len(decoded):
            self._received.append(
                Counter(
                    _invalid_labels(raw) for raw, e in zip(raws, decoded, strict=True) if e is None
                )
            )
        return Received(labels, valid)

    def rejected(self, reason: str, count: int = 1) -> None:
        self.counts.add(Count.EVENTS_REJECTED, (reason,), count)

    def accepted(self, events: list[Event], received: Received, skipped: set[int]) -> None:
        """Count accepted events (`received`: theirs, from `received`); `skipped` holds the
        indexes not written (duplicates)."""
        self._wait(0)
        self._accepted.append(received.counted)
        if skipped:
            self._deduplicated += [received.labels[i] for i in skipped]
        exposures, shares = self._exposures, self._shares
        for index, event in enumerate(events):
            # A duplicate (a client's retry) is the same event again: counted once above as
            # de-duplicated, never twice as an exposure.
            if type(event) is Exposure and index not in skipped:
                _exposure(event, exposures, shares)
        written = [e for i, e in enumerate(events) if i not in skipped] if skipped else events
        self._time(written, received.counted)

    def _time(self, written: list[Event], counted: Counter[Labels]) -> None:
        """Tally the timestamps of a request's `written` events against now, per target
        (`counted`'s keys say which the request has: nearly always one)."""
        now = time.time()
        targets = {key[1:3] for key in counted}
        if len(targets) == 1:
            by_target = {targets.pop(): list(map(_STAMP, written))}
        else:
            by_target = {}
            for event in written:
                by_target.setdefault((event.projectId, event.env), []).append(event.timestamp)
        for target, stamps in by_target.items():
            if stamps:
                found = eventtime.tally(stamps, now, self._margin, self._late_after)
                self._times.append((target, found))

    def settle(self) -> None:
        """Add what waits to `counts`, in the minute it was counted in; labels are cut once
        per distinct key (`_add`), not once per event."""
        if not (self._received or self._accepted):
            return
        at = self._minute * 60.0
        received, accepted = _summed(self._received), _summed(self._accepted)
        duplicates = Counter(self._deduplicated)
        written = accepted - duplicates if duplicates else accepted
        _add(self.counts, Count.EVENTS_RECEIVED, _typed(received), at)
        _add(self.counts, Count.EVENTS_ACCEPTED, _typed(accepted), at)
        _add(self.counts, Count.EVENTS_DEDUPLICATED, _typed(duplicates), at)
        _add(self.counts, Count.EVENTS_WRITTEN, _typed(written), at)
        _add(self.counts, Count.CONFIG_VERSIONS, _versions(written), at)
        self._settle_times(at)
        _add(self.counts, Count.EXPOSURES, Counter(self._exposures), at)
        if self._shares:
            _add(self.counts, Count.EXPOSURE_SHARES_N, Counter(k for k, _ in self._shares), at)
            summed: dict[Labels, float] = {}
            for key, share in self._shares:
                summed[key] = summed.get(key, 0.0) + share
            shares = self.counts.counter(Count.EXPOSURE_SHARES, at)
            for key, share in summed.items():
                cut = tuple(map(label, key))
                shares[cut] = shares[cut] + share  # type: ignore[assignment]
        for waiting in (self._received, self._accepted, self._deduplicated, self._exposures):
            waiting.clear()
        self._shares.clear()
        self._keys = 0

    def _settle_times(self, at: float) -> None:
        delays: Counter[Labels] = Counter()
        future: Counter[Labels] = Counter()
        late: Counter[Labels] = Counter()
        for target, found in self._times:
            for le, n in found.delays.items():
                delays[(*target, le)] += n
            future[target] += found.future
            late[target] += found.late
        _add(self.counts, Count.EVENT_DELAY, delays, at)
        _add(self.counts, Count.EVENTS_FUTURE, +future, at)
        _add(self.counts, Count.EVENTS_LATE, +late, at)
        self._times.clear()

    def _wait(self, keys: int) -> None:
        """Make room for a request's `keys` events (0: the rest of one already received):
        settle first if the minute turned, or if PENDING_KEYS wait already."""
        minute = minute_of(time.time())
        if minute != self._minute or (keys and self._keys >= PENDING_KEYS):
            self.settle()
            self._minute = minute
        self._keys += keys


class Received(NamedTuple):
    """A request's valid events' labels, in order, and counted."""

    labels: list[Labels]
    counted: Counter[Labels]


def _summed(counters: list[Counter[Labels]]) -> Counter[Labels]:
    """The sum of `counters` (each a request's: a few keys), in one loop."""
    total: Counter[Labels] = Counter()
    for counter in counters:
        for key, value in counter.items():
            total[key] += value
    return total


def _typed(counted: Counter[Labels]) -> Counter[Labels]:
    """Counts by (org, project, env, type): each event's labels less its configVersion."""
    found: Counter[Labels] = Counter()
    for key, n in counted.items():
        found[key[:4]] += n
    return found


def _versions(written: Counter[Labels]) -> Counter[Labels]:
    """Exposures and decisions by (project, env, configVersion): "" where none is sent."""
    found: Counter[Labels] = Counter()
    for (_, project, env, kind, version), n in written.items():
        if kind != "track":
            found[(project, env, "" if version is None else version)] += n
    return found


def _add(counts: Counts, name: Count, counted: Counter[Any], at: float | None = None) -> None:
    """Add counts, each label cut once per distinct key (not per event)."""
    counter = counts.counter(name, at)
    for key, value in counted.items():
        counter[tuple(map(label, key))] += value


# What `Conversions` needs of one event, in the request's order:
#   ("d", index, decision id, pairs)    a decision, or an exposure naming its decision
#   ("t", index, project, env, name, decision id, the SDK's own attribution's pairs)
Note = tuple[Any, ...]


def notes(events: Sequence[Event]) -> list[Note]:
    """The notes of a request's decisions and track events, for `Conversions`. Runs for
    every event of every request: flat, and each decision noted once per request."""
    found: list[Note] = []
    noted: set[str] = set()
    shared: dict[tuple[Labels, ...], tuple[Labels, ...]] = {}  # each pickled once
    for index, event in enumerate(events):
        # type() is, not isinstance: 29 ns against 87 for a Struct that is not a Track
        # (measured), for every event; mypy narrows only where it holds, hence the ignore.
        if type(event) is Track:
            fallback = () if event.attribution is msgspec.UNSET else _fallback(event)
            found.append(
                ("t", index, event.projectId, event.env, event.event, event.decisionId, fallback)
            )
            continue
        decision_id = event.decisionId if type(event) is Exposure else event.id
        if decision_id and decision_id not in noted:
            pairs = pairs_of(event.layers)  # type: ignore[union-attr]
            if pairs:
                noted.add(decision_id)
                found.append(("d", index, decision_id, shared.setdefault(pairs, pairs)))
    return found


def _fallback(track: Track) -> tuple[Labels, ...]:
    """The (policy, allocation) pairs of the SDK's own `attribution` of `track`."""
    return tuple(
        (str(item.get("policyId")), str(item.get("allocationName")))
        for item in attribution(track)
        if item.get("policyId") and item.get("allocationName")
    )


def pairs_of(layers: list[LayerAssignment]) -> tuple[Labels, ...]:
    """The (policy, allocation) pairs a decision's layers assign (bucket -1: none)."""
    return tuple(
        [
            (layer.policyId, layer.allocationName)
            for layer in layers
            if layer.policyId and layer.allocationName and layer.bucket >= 0
        ]
    )


class Conversions:
    """Counts track events by name, and conversions by the allocation of the decision they
    name (or by the SDK's own `attribution`), from every server's `notes`: in the queue
    writer, the one process they all reach."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self._names: set[str] = set()
        self._decisions = Decisions()

    def count(self, notes: Sequence[Note], skipped: Sequence[int], now: float) -> None:
        """Count one request's `notes`; `skipped` holds the indexes not written."""
        tally = _Tally()
        dropped = set(skipped)
        for note in notes:
            if note[0] == "d":
                self._decisions.remember(note[2], note[3], now)
            elif note[1] not in dropped:  # a duplicate is never counted twice
                _, _, project, env, name, decision_id, fallback = note
                name = self._name(name)
                tally.tracks[(project, env, name)] += 1
                found = self._decisions.get(decision_id, now) if decision_id else None
                for policy, allocation in fallback if found is None else found:
                    tally.conversions[(project, env, policy, allocation, name)] += 1
        _add(self.counts, Count.TRACK_EVENTS, tally.tracks)
        _add(self.counts, Count.CONVERSIONS, tally.conversions)

    def _name(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) >= MAX_NAMES:
            return OTHER
        self._names.add(name)
        return name


class Decisions:
    """Decision id -> the (policy, allocation) pairs it assigned: for at least DECISION_TTL_S
    (at most twice that), the latest DECISIONS_KEPT at most (at least half of them).

    Keyed by the id's hash, not the id (a collision of two 64-bit hashes among 200,000 ids,
    about one in 10^9, would count one conversion for the other's allocation: a count,
    never an event); the value is the index of its set of pairs, each distinct set held
    once. Kept in two generations (`_Generation`): a decision goes into the current one,
    which becomes the previous one when it is DECISION_TTL_S old or holds half of
    DECISIONS_KEPT, the one before being dropped whole.

    Each generation is a table of fixed size in flat arrays, not a dict: a dict holds a
    Python int per key besides its own table, 14 MiB at 179,000 decisions in the queue
    writer (`tracemalloc`) against 5 MiB for both tables, whatever their fill."""

    def __init__(self) -> None:
        # Twice the slots a generation fills, rounded up to a power of two: at most 0.38
        # full at the default bound, so a probe mostly ends at its first slot.
        self._slots = 1 << DECISIONS_KEPT.bit_length()
        self._current = _Generation(self._slots, -math.inf)
        self._previous = _Generation(self._slots, -math.inf)
        self._sets: list[tuple[Labels, ...]] = []
        self._set_index: dict[tuple[Labels, ...], int] = {}

    def __contains__(self, decision_id: str) -> bool:
        key = _key(decision_id)
        return self._current.find(key) >= 0 or self._previous.find(key) >= 0

    def __len__(self) -> int:
        return self._current.size + self._previous.size

    def remember(self, decision_id: str, pairs: tuple[Labels, ...], now: float) -> None:
        """Note the (policy, allocation) `pairs` for `decision_id`, unless it is noted
        already (an exposure naming a decision seen before). Runs for most events: flat."""
        key = _key(decision_id)
        current = self._current
        slot = current.slot(key)
        if current.keys[slot] == key or not pairs or self._previous.find(key) >= 0:
            return
        index = self._set_index.get(pairs)
        if index is None:
            index = self._new_set(pairs)
            if index is None:
                return
        if now - current.started >= DECISION_TTL_S or current.size >= DECISIONS_KEPT // 2:
            self._previous = current  # the one before is dropped here, before the new one
            current = self._current = _Generation(self._slots, now)
            slot = current.slot(key)
        current.keys[slot] = key
        current.values[slot] = index
        current.size += 1

    def _new_set(self, pairs: tuple[Labels, ...]) -> int | None:
        """The index of `pairs` with their labels cut, held from now on if new (and found
        by the uncut pairs next time when cutting changed nothing); None when full."""
        cut = tuple((label(policy), label(allocation)) for policy, allocation in pairs)
        index = self._set_index.get(cut)
        if index is None:
            if len(self._sets) >= MAX_ALLOCATION_SETS:
                return None
            index = self._set_index[cut] = len(self._sets)
            self._sets.append(cut)
        return index

    def get(self, decision_id: str, now: float) -> tuple[Labels, ...] | None:
        """The pairs of `decision_id`, if noted. A generation takes decisions for less than
        DECISION_TTL_S after it began and answers for less than twice that: each decision
        is found for at least DECISION_TTL_S, and never past twice that."""
        key = _key(decision_id)
        for generation in (self._current, self._previous):
            if now - generation.started < 2 * DECISION_TTL_S:
                slot = generation.find(key)
                if slot >= 0:
                    return self._sets[generation.values[slot]]
        return None


def _key(decision_id: str) -> int:
    """The table key of `decision_id`: its hash, never 0 (an empty slot's)."""
    return hash(decision_id) or 1


class _Generation:
    """The decisions of one generation: an open-addressing table (linear probing) of
    64-bit keys and their set indexes, in two arrays of `slots`, filled and then dropped
    whole (so it never needs to delete a key)."""

    def __init__(self, slots: int, started: float) -> None:
        self.keys = array("q", [0]) * slots  # 0: an empty slot
        self.values = array("H", [0]) * slots  # a set's index: below MAX_ALLOCATION_SETS
        self.mask = slots - 1
        self.size = 0
        self.started = started

    def slot(self, key: int) -> int:
        """The slot that holds `key`, or the empty one where it would go."""
        keys, mask = self.keys, self.mask
        slot = key & mask
        while (found := keys[slot]) != key and found:
            slot = (slot + 1) & mask
        return slot

    def find(self, key: int) -> int:
        """The slot of `key`, or -1."""
        slot = self.slot(key)
        return slot if self.keys[slot] == key else -1


class _Tally:
    """One request's conversion counts, uncut, added to `Counts` at its end."""

    def __init__(self) -> None:
        self.tracks: Counter[Labels] = Counter()
        self.conversions: Counter[Labels] = Counter()


def _exposure(event: Exposure, exposures: list[Labels], shares: list[tuple[Labels, float]]) -> None:
    """Note `event`'s (project, env, layer, policy, allocation) per layer it was bucketed
    in, and the share it declares there (if a finite number)."""
    for layer in event.layers:
        if layer.bucket < 0 or layer.attributionOnly:
            continue
        key = (
            event.projectId,
            event.env,
            layer.layerId,
            layer.policyId or "",
            layer.allocationName or layer.allocationId or "",
        )
        exposures.append(key)
        if isinstance(layer.probability, msgspec.Raw):
            probability = number(layer.probability)
            if probability is not None and math.isfinite(probability):
                shares.append((key, probability))


_TYPES: dict[type, str] = {Exposure: "exposure", Decision: "decision", Track: "track"}
# Only what labels an invalid event: read leniently, whatever the other fields hold.
_LABELS = msgspec.json.Decoder(dict[str, Any])


_ORG, _PROJECT, _ENV = attrgetter("orgId"), attrgetter("projectId"), attrgetter("env")
_VERSION, _STAMP = attrgetter("configVersion"), attrgetter("timestamp")


def _labels_of(events: list[Event]) -> list[Labels]:
    """Each event's (org, project, env, type, configVersion), built in C (map and zip, no
    Python loop); the version is counted for config drift (`_versions`), then dropped."""
    kinds = map(_TYPES.__getitem__, map(type, events))
    columns = map(_ORG, events), map(_PROJECT, events), map(_ENV, events), kinds
    return list(zip(*columns, map(_VERSION, events), strict=True))


def _invalid_labels(raw: bytes | msgspec.Raw) -> Labels:
    try:
        event = _LABELS.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # not an object (or not for msgspec)
        return ("", "", "", "invalid", "")
    return (
        label(event.get("orgId")),
        label(event.get("projectId")),
        label(event.get("env")),
        kind if (kind := event.get("type")) in EVENT_TYPES else "invalid",
        "",
    )
