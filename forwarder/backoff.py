"""When to send again after a failure: exponential backoff with full jitter, and probing.

`Backoff` gives the delay before the next attempt: a random time between 0 and
`initial * 2**failures`, capped (full jitter, so many collectors recovering at once do not
retry in step), and never shorter than what the upstream asked for with `Retry-After`, up
to `max_s` (`retry_max_seconds`): an upstream asking for years (a `Retry-After` of
999999999, or a date in 2300) would otherwise stop forwarding for that long; asking again
at the cap costs one request.

`Outage` keeps the forwarder from hammering a failing upstream: once a send fails, the
upstream is in outage and only one request (the probe) is sent at a time; the others wait.
The first success ends the outage and every sender resumes.
"""

from __future__ import annotations

import asyncio
import random
import time

# Doublings of the first delay past which the ceiling grows no more: far beyond any
# retry_max_seconds / retry_initial_seconds ratio, far below a float's range.
MAX_DOUBLINGS = 64


class Backoff:
    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self, retry_after: float | None = None) -> float:
        # The exponent is capped: 2.0**1024 overflows (after ~8.5 hours of one batch failing).
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self.failures, MAX_DOUBLINGS))
        self.failures += 1
        delay = self._rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_s))
        return delay

    def reset(self) -> None:
        self.failures = 0


class Outage:
    """Lets every sender through while the upstream is healthy, one at a time in outage."""

    def __init__(self) -> None:
        self.since: float | None = None  # Unix time the outage began; None when healthy
        self._probe = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self.since is not None

    async def acquire(self) -> bool:
        """Wait for the right to send; True when this sender holds the probe (release it).

        Senders that queued for the probe during an outage go one at a time once it ends;
        there are only `forward_in_flight` of them, so that ends quickly.
        """
        if not self.active:
            return False
        await self._probe.acquire()
        return True

    def release(self, holds_probe: bool) -> None:
        if holds_probe:
            self._probe.release()

    def failed(self) -> None:
        if self.since is None:
            self.since = time.time()

    def succeeded(self) -> None:
        self.since = None
