"""What the server counts of each event: by type (with org, project and env), track event
names, exposures per allocation (with their declared shares, for the sample-ratio check)
and conversions attributed to an allocation.

It runs on the request path, so it adds to `Counts`' in-memory counters only (flushed to
`counts.db` every second by the app). Event names and labels are client-controlled, so
each label value is cut to `LABEL_CHARS` characters and at most `MAX_NAMES` distinct event
names are counted per process; later ones are counted as `(other)`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from collector.store.counts import Count, Counts, Labels

# How many distinct track event names are counted separately (per process lifetime).
MAX_NAMES = 500
OTHER = "(other)"
LABEL_CHARS = 100
# Decisions remembered to attribute later track events to their allocation: enough for an
# hour of a busy service, bounded so memory is too (~300 bytes each: ~60 MB at most).
DECISIONS_KEPT = 200_000
DECISION_TTL_S = 3600.0


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
    """Counts the server's events into `counts`."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self._names: set[str] = set()
        self._decisions: OrderedDict[str, tuple[float, list[Labels]]] = OrderedDict()

    def received(self, events: Iterable[Any]) -> list[Labels]:
        """Count events as received; returns each one's labels, for `accepted`."""
        labels = list(map(_labels_of, events))
        self.counts.counter(Count.EVENTS_RECEIVED).update(labels)
        return labels

    def rejected(self, reason: str, count: int = 1) -> None:
        self.counts.add(Count.EVENTS_REJECTED, (reason,), count)

    def accepted(
        self, events: list[dict[str, Any]], labels: list[Labels], skipped: set[int]
    ) -> None:
        """Count accepted events (`labels` are theirs, from `received`); `skipped` holds
        the indexes not written (duplicates)."""
        self.counts.counter(Count.EVENTS_ACCEPTED).update(labels)
        written = self.counts.counter(Count.EVENTS_WRITTEN)
        if skipped:
            written.update(t for i, t in enumerate(labels) if i not in skipped)
            self.counts.counter(Count.EVENTS_DEDUPLICATED).update(labels[i] for i in skipped)
        else:
            written.update(labels)
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
        target = (label(event["projectId"]), label(event["env"]))
        name = self._name(event["event"])
        self.counts.counter(Count.TRACK_EVENTS)[(*target, name)] += 1
        for policy, allocation in self._attribution(event):
            self.counts.counter(Count.CONVERSIONS)[(*target, policy, allocation, name)] += 1

    def _exposure(self, event: dict[str, Any]) -> None:
        target = (label(event["projectId"]), label(event["env"]))
        exposures = self.counts.counter(Count.EXPOSURES)
        for layer in event["layers"]:
            if layer.get("bucket", 0) < 0 or layer.get("attributionOnly"):
                continue
            key = (
                *target,
                label(layer["layerId"]),
                label(layer.get("policyId")),
                label(layer.get("allocationName") or layer.get("allocationId")),
            )
            exposures[key] += 1
            probability = layer.get("probability")
            if isinstance(probability, int | float) and not isinstance(probability, bool):
                self.counts.add(Count.EXPOSURE_SHARES, key, probability)
                self.counts.counter(Count.EXPOSURE_SHARES_N)[key] += 1

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


def _labels_of(event: Any) -> Labels:
    if not isinstance(event, dict):
        return ("", "", "", "invalid")
    kind = event.get("type")
    return (
        label(event.get("orgId")),
        label(event.get("projectId")),
        label(event.get("env")),
        kind if kind in ("exposure", "decision", "track") else "invalid",
    )
