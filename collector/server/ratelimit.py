"""Per-key rate limits on the events API: a token bucket for each API key, shared by all the
server's processes.

Off by default (`rate_limit_per_second = 0`). When on, each key's bucket holds up to
`rate_limit_burst` tokens (one second's worth when 0), refills at `rate_limit_per_second`,
and each events request takes one; a request finding less than one is refused with
`RateLimited` (429) and told, in `Retry-After`, the whole seconds until a token is back.
Buckets exist only for keys that authenticated, so their number is bounded by the key store.

A key's limit holds across the server processes (`workers`), not per process, so the
buckets are in shared memory: the parent makes the limiter before it starts the processes
and hands it to each as a `multiprocessing.Process` argument. One process is the same code.
The memory and its lock come from the "spawn" context, the one the processes are started
with. The table is `SLOTS` slots, each a key's fingerprint, its tokens and when they were
counted. A key finds its slot by linear probing from `fingerprint % slots`. One lock,
held for a few arithmetic steps, covers every take. Slots are never freed. When the table
is full, a new key shares the slot its fingerprint points at with the key already there:
one bucket for both, a stricter limit, never a looser one. The clock is `time.monotonic`,
one clock for the whole system on Linux, so a `when` one process wrote means the same in
another.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

from collector.errors import RateLimited
from collector.server.auth import ApiKey

log = logging.getLogger("collector.server")

# Rounding slack in token arithmetic, so that waiting `Retry-After` is always enough.
EPSILON = 1e-9

# Keys are made by operators (`collector keys create`), so a collector has tens of them:
# 4096 slots keep the table nearly empty, probes short, and cost 96 KiB of shared memory
# (an 8-byte fingerprint and two 8-byte doubles a slot).
SLOTS = 4096

# A take holds the lock for a few arithmetic steps: held this long, its holder is dead.
LOCK_WAIT_S = 1.0

EMPTY = 0  # the fingerprint of a free slot; `fingerprint` never returns it


def fingerprint(digest: str) -> int:
    """`digest` (a key's hash) as a signed 64-bit slot tag, never EMPTY. blake2b, so that
    any string will do; two keys with one fingerprint (about 1 in 2**64) share a bucket."""
    raw = hashlib.blake2b(digest.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True) or 1


class _Table:
    """The buckets in shared memory: slot i is fingerprints[i], tokens[i] and when[i]."""

    def __init__(self, slots: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.fingerprints = spawn.RawArray(ctypes.c_int64, slots)  # zeroed: every slot EMPTY
        self.tokens = spawn.RawArray(ctypes.c_double, slots)
        self.when = spawn.RawArray(ctypes.c_double, slots)
        self.lock = spawn.Lock()

    def slot(self, tag: int) -> int | None:
        """The slot holding `tag`, or the first free one, or None when the table is full.
        Call with the lock held."""
        slots = len(self.fingerprints)
        start = tag % slots
        for step in range(slots):
            i = (start + step) % slots
            if self.fingerprints[i] in (tag, EMPTY):
                return i
        return None


@contextlib.contextmanager
def _held(lock: Any) -> Iterator[None]:
    """`lock`, taken back from a process that died holding it (SIGKILLed in the few
    microseconds a take holds it): no other holder keeps it for LOCK_WAIT_S."""
    if not lock.acquire(timeout=LOCK_WAIT_S):
        log.error("the rate limiter's lock was held by a server process that died; taking it")
        lock.release()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class RateLimiter:
    def __init__(
        self,
        per_second: float,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
        *,
        slots: int = SLOTS,
    ) -> None:
        self.per_second = per_second
        self.burst = burst or max(1, math.ceil(per_second))
        self._clock = clock
        # Off: no shared memory, no lock.
        self._table = _Table(slots) if self.enabled else None

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def take(self, key: ApiKey) -> None:
        """Take one token from `key`'s bucket, or raise RateLimited."""
        table = self._table
        if table is None:
            return
        tag = fingerprint(key.hash)
        with _held(table.lock):
            now = self._clock()  # under the lock, so `when` only moves forward
            i = self._claim(table, tag, now)
            tokens = min(
                float(self.burst), table.tokens[i] + (now - table.when[i]) * self.per_second
            )
            table.when[i] = now
            if tokens >= 1 - EPSILON:  # a token refilled to 0.9999999999 by rounding is a token
                table.tokens[i] = tokens - 1
                return
            table.tokens[i] = tokens
        wait = (1 - tokens) / self.per_second
        raise RateLimited(
            f"API key '{key.name}' is over its rate limit of {self.per_second:g} requests "
            "per second; retry after the Retry-After seconds",
            retry_after=max(1, math.ceil(wait)),
        )

    def _claim(self, table: _Table, tag: int, now: float) -> int:
        """`tag`'s slot; a free slot becomes a full bucket, and a full table gives the slot
        `tag` points at, to share. Call with the lock held."""
        i = table.slot(tag)
        if i is None:
            return tag % len(table.fingerprints)
        if table.fingerprints[i] == EMPTY:
            table.fingerprints[i] = tag
            table.tokens[i] = float(self.burst)
            table.when[i] = now
        return i
