"""collector/server/ratelimit.py: per-key token buckets, on an injected clock: the burst,
the refill, the Retry-After that is always long enough, one bucket per key, and off at 0;
and a full table that shares slots, never looser. (One bucket shared by the server's
processes is shown on a real server with two workers: tests/test_workers.py.)
"""

from __future__ import annotations

import pytest

from collector.errors import RateLimited
from collector.server.auth import ApiKey
from collector.server.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(name: str) -> ApiKey:
    return ApiKey(name=name, prefix=name, hash=f"hash-{name}", scopes=("sdk:write",))


def test_a_burst_is_taken_then_the_next_request_is_limited() -> None:
    clock = Clock()
    limiter = RateLimiter(2.0, burst=3, clock=clock)
    web = key("web")

    for _ in range(3):
        limiter.take(web)
    with pytest.raises(RateLimited, match="rate limit of 2 requests per second") as caught:
        limiter.take(web)

    assert caught.value.retry_after == 1  # half a second to a token, in whole seconds
    assert caught.value.extra == {"retry_after": 1}


def test_tokens_come_back_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(2.0, burst=2, clock=clock)
    web = key("web")
    limiter.take(web)
    limiter.take(web)

    clock.now += 0.5  # one token back
    limiter.take(web)
    with pytest.raises(RateLimited):
        limiter.take(web)

    clock.now += 60  # never more than the burst
    limiter.take(web)
    limiter.take(web)
    with pytest.raises(RateLimited):
        limiter.take(web)


@pytest.mark.parametrize("per_second", [0.1, 0.3, 0.7, 3.0])
def test_waiting_the_retry_after_is_always_enough(per_second: float) -> None:
    clock = Clock()
    limiter = RateLimiter(per_second, burst=1, clock=clock)
    web = key("web")
    limiter.take(web)

    with pytest.raises(RateLimited) as caught:
        limiter.take(web)
    clock.now += caught.value.retry_after

    limiter.take(web)


def test_a_slow_rate_says_how_many_seconds_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(0.1, clock=clock)  # burst: one second's worth, at least 1
    web = key("web")
    limiter.take(web)

    with pytest.raises(RateLimited) as caught:
        limiter.take(web)

    assert caught.value.retry_after == 10
    assert limiter.burst == 1


def test_each_key_has_its_own_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, clock=clock)
    limiter.take(key("a"))
    with pytest.raises(RateLimited):
        limiter.take(key("a"))

    limiter.take(key("b"))


def test_a_rate_of_zero_limits_nothing() -> None:
    limiter = RateLimiter(0.0, clock=Clock())

    assert not limiter.enabled
    assert limiter._table is None  # no shared memory, no lock
    for _ in range(1000):
        limiter.take(key("web"))


def takes(limiter: RateLimiter, name: str, tries: int) -> int:
    """How many of `tries` takes from `name`'s bucket succeed."""
    taken = 0
    for _ in range(tries):
        try:
            limiter.take(key(name))
            taken += 1
        except RateLimited:
            pass
    return taken


def test_a_full_table_makes_a_new_key_share_a_slot_never_looser() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, burst=2, clock=clock, slots=2)
    assert takes(limiter, "a", 1) == 1  # a and b fill the table, one token left each
    assert takes(limiter, "b", 1) == 1

    # c shares a's or b's bucket: the table's two tokens left are all there is for the three.
    assert takes(limiter, "c", 5) == 1
    assert takes(limiter, "a", 5) + takes(limiter, "b", 5) == 1

    clock.now += 1  # one token back in each bucket
    assert takes(limiter, "a", 5) + takes(limiter, "b", 5) + takes(limiter, "c", 5) == 2
