"""A batch: events for one target (project, env), each with the queue row it came from.

Upstream keys are scoped to one project and environment, so a batch never mixes targets.
Its body is the events' stored bytes joined into `{"events":[...]}`, never re-encoded.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from collector.events import Target

# The events API takes at most 1000 events per request.
MAX_BATCH_EVENTS = 1000
# A batch's body is `{"events":[` + its events joined by commas + `]}`; `Batch.size` counts
# one comma per event, one too many, so it starts at the envelope's length less one.
BODY_OVERHEAD = len(b'{"events":[]}') - 1


@dataclass
class Batch:
    target: Target
    events: list[bytes] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    size: int = BODY_OVERHEAD  # the body's length in bytes, once it holds an event
    started: float = field(default_factory=time.monotonic)
    # When the oldest of its rows was queued (Unix time), for the maximum event age.
    oldest: float = math.inf
    # The same across the batch's retries, so the upstream can tell a resend.
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def add(self, raw: bytes, row_id: int, queued_at: float = math.inf) -> None:
        self.events.append(raw)
        self.rows.append(row_id)
        self.size += len(raw) + 1
        self.oldest = min(self.oldest, queued_at)

    def body(self) -> bytes:
        return b'{"events":[' + b",".join(self.events) + b"]}"

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.events) // 2
        return self._part(0, middle), self._part(middle, len(self.events))

    def _part(self, start: int, end: int) -> Batch:
        part = Batch(self.target, oldest=self.oldest)
        for raw, row in zip(self.events[start:end], self.rows[start:end], strict=True):
            part.add(raw, row)
        return part
