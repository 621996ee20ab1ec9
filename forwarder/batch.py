"""A batch: events that can go upstream in one request, each with its target (project, env)
and the queue row it came from.

A request carries one upstream key, so a batch holds the events of the targets that share
one (`forwarder.keys`): with one org-wide key, events of 20,000 projects fill 20 requests,
not 20,000. Its body is the events' stored bytes joined into `{"events":[...]}`, never
re-encoded.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from collector.events import Target

# The events API takes at most 1000 events per request.
MAX_BATCH_EVENTS = 1000
# A batch's body is `{"events":[` + its events joined by commas + `]}`; `Batch.size` counts
# one comma per event, one too many, so it starts at the envelope's length less one.
BODY_OVERHEAD = len(b'{"events":[]}') - 1


@dataclass
class Batch:
    events: list[bytes] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)  # each event's
    rows: list[int] = field(default_factory=list)  # each event's
    size: int = BODY_OVERHEAD  # the body's length in bytes, once it holds an event
    started: float = field(default_factory=time.monotonic)
    # When the oldest of its rows was queued (Unix time), for the maximum event age.
    oldest: float = math.inf
    # The same across the batch's retries, so the upstream can tell a resend.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Which load of the upstream keys it was sorted by: after a reload its targets may no
    # longer share one (the forwarder splits it then).
    keys_loaded: int = 0

    def add(self, raw: bytes, target: Target, row_id: int, queued_at: float = math.inf) -> None:
        self.events.append(raw)
        self.targets.append(target)
        self.rows.append(row_id)
        self.size += len(raw) + 1
        self.oldest = min(self.oldest, queued_at)

    def extend(
        self, raws: list[bytes], size: int, target: Target, row_id: int, queued_at: float
    ) -> None:
        """`add` each of `raws` (all of one target and row), whose lengths sum to `size`."""
        self.events += raws
        self.targets += [target] * len(raws)
        self.rows += [row_id] * len(raws)
        self.size += size + len(raws)
        self.oldest = min(self.oldest, queued_at)

    @property
    def events_bytes(self) -> int:
        """The events' own bytes (the body less its envelope and commas)."""
        return self.size - BODY_OVERHEAD - len(self.events)

    def body(self) -> bytes:
        return b'{"events":[' + b",".join(self.events) + b"]}"

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.events) // 2
        return self._part(range(middle)), self._part(range(middle, len(self.events)))

    def split(self, by: Callable[[Target], Hashable]) -> list[Batch]:
        """The batch in parts whose events' targets give one value of `by`, in order of
        first appearance; the batch itself (same id) when they all give the same."""
        places: dict[Hashable, list[int]] = {}
        last, value = None, None
        for place, target in enumerate(self.targets):
            if target is not last:  # a row's events of one target come in a run
                last, value = target, by(target)
            places.setdefault(value, []).append(place)
        if len(places) == 1:
            return [self]
        return [self._part(part) for part in places.values()]

    def _part(self, places: range | list[int]) -> Batch:
        part = Batch(oldest=self.oldest, keys_loaded=self.keys_loaded)
        for place in places:
            part.add(self.events[place], self.targets[place], self.rows[place])
        return part
