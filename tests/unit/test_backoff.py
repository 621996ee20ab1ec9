"""forwarder/backoff.py: `Backoff`'s full-jitter delays (bounds, growth, the Retry-After
floor, reset) with a seeded random source, and `Outage` with real asyncio tasks: everyone
through while healthy, one probe at a time in an outage, everyone again once it ends.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from forwarder.backoff import Backoff, Outage


def test_each_delay_is_between_zero_and_the_doubling_ceiling_capped_at_the_max() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(7))

    for failures in range(12):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(4.0, 0.5 * 2**failures)
        assert backoff.failures == failures + 1


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 8])
def test_the_jitter_spans_the_whole_range_up_to_the_ceiling(failures: int) -> None:
    ceiling = min(4.0, 0.5 * 2**failures)
    rng = random.Random(failures)
    delays = []
    for _ in range(200):
        backoff = Backoff(0.5, 4.0, rng)
        backoff.failures = failures
        delays.append(backoff.next_delay())

    assert max(delays) <= ceiling
    assert max(delays) > 0.9 * ceiling  # full jitter: the ceiling is reached, not a fraction
    assert min(delays) < 0.1 * ceiling  # ... and so is nearly zero


def test_the_same_seed_gives_the_same_delays() -> None:
    first = Backoff(1.0, 60.0, random.Random(42))
    second = Backoff(1.0, 60.0, random.Random(42))

    assert [first.next_delay() for _ in range(8)] == [second.next_delay() for _ in range(8)]


def test_retry_after_is_a_floor_never_shortened_by_the_jitter() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(1))

    assert backoff.next_delay(retry_after=3.5) >= 3.5
    for _ in range(20):
        assert backoff.next_delay(retry_after=0.25) >= 0.25


@pytest.mark.parametrize("asked", [10.0, 999_999_999.0, float("inf")])
def test_retry_after_is_capped_at_the_longest_delay(asked: float) -> None:
    backoff = Backoff(0.5, 4.0, random.Random(1))

    assert backoff.next_delay(retry_after=asked) == 4.0  # not years: retry_max_seconds


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(0.5, 60.0, random.Random(3))
    for _ in range(6):
        backoff.next_delay()

    backoff.reset()

    assert backoff.failures == 0
    for _ in range(50):  # the ceiling was 32 s before the reset
        assert backoff.next_delay() <= 0.5
        backoff.reset()


def test_a_very_long_outage_keeps_the_delay_at_the_max() -> None:
    backoff = Backoff(0.5, 60.0, random.Random(5))

    for _ in range(1100):
        assert 0.0 <= backoff.next_delay() <= 60.0


# --- Outage ----------------------------------------------------------------------------------


async def yield_a_while() -> None:
    """Let every ready task run a few steps (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_while_healthy_every_sender_goes_at_once() -> None:
    async def scenario() -> list[bool]:
        outage = Outage()
        inside = 0
        all_in = asyncio.Event()

        async def sender() -> bool:
            nonlocal inside
            holds = await outage.acquire()
            inside += 1
            if inside == 5:
                all_in.set()
            await all_in.wait()  # only returns if all five are in at once
            outage.release(holds)
            return holds

        return await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(5))), 1.0)

    assert asyncio.run(scenario()) == [False] * 5


def test_in_an_outage_senders_go_one_at_a_time_and_each_holds_the_probe() -> None:
    async def scenario() -> tuple[list[int], list[bool]]:
        outage = Outage()
        outage.failed()
        entered: asyncio.Queue[int] = asyncio.Queue()
        leave = {n: asyncio.Event() for n in range(3)}

        async def sender(n: int) -> bool:
            holds = await outage.acquire()
            entered.put_nowait(n)
            await leave[n].wait()
            outage.release(holds)
            return holds

        tasks = [asyncio.create_task(sender(n)) for n in range(3)]
        order = []
        for _ in range(3):
            n = await asyncio.wait_for(entered.get(), 1.0)
            await yield_a_while()
            assert entered.empty(), "a second sender got in while the probe was held"
            order.append(n)
            leave[n].set()
        return order, list(await asyncio.gather(*tasks))

    order, held = asyncio.run(scenario())

    assert sorted(order) == [0, 1, 2]
    assert held == [True, True, True]


def test_an_outage_begins_at_the_first_failure_and_success_ends_it() -> None:
    async def scenario() -> None:
        outage = Outage()
        assert not outage.active and outage.since is None

        outage.failed()
        since = outage.since
        assert outage.active and since is not None
        outage.failed()
        assert outage.since == since  # the outage began at the first failure

        probe = await outage.acquire()  # the probe is held...
        assert probe
        outage.succeeded()
        assert not outage.active and outage.since is None
        # ... yet a new sender no longer waits for it: the outage is over
        assert await asyncio.wait_for(outage.acquire(), 0.5) is False
        outage.release(probe)

    asyncio.run(scenario())
