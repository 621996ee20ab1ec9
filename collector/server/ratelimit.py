"""Per-key rate limits on the events API: a token bucket for each API key, in the server.

Off by default (`rate_limit_per_second = 0`). When on, each key's bucket holds up to
`rate_limit_burst` tokens (one second's worth when 0), refills at `rate_limit_per_second`,
and each events request takes one; a request finding less than one is refused with
`RateLimited` (429) and told, in `Retry-After`, the whole seconds until a token is back.
Buckets exist only for keys that authenticated, so their number is bounded by the key store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from collector.errors import RateLimited
from collector.server.auth import ApiKey

# Rounding slack in token arithmetic, so that waiting `Retry-After` is always enough.
EPSILON = 1e-9


class RateLimiter:
    def __init__(
        self, per_second: float, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.burst = burst or max(1, math.ceil(per_second))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key digest -> (tokens, when)

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def take(self, key: ApiKey) -> None:
        """Take one token from `key`'s bucket, or raise RateLimited."""
        if not self.enabled:
            return
        now = self._clock()
        tokens, then = self._buckets.get(key.hash, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
        if tokens >= 1 - EPSILON:  # a token refilled to 0.9999999999 by rounding is a token
            self._buckets[key.hash] = (tokens - 1, now)
            return
        self._buckets[key.hash] = (tokens, now)
        wait = (1 - tokens) / self.per_second
        raise RateLimited(
            f"API key '{key.name}' is over its rate limit of {self.per_second:g} requests "
            "per second; retry after the Retry-After seconds",
            retry_after=max(1, math.ceil(wait)),
        )
