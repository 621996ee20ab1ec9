"""glibc's allocator set for how the forwarder and the queue writer use memory.

The forwarder sends batches from a few threads (`asyncio.to_thread` for the queue and the
dead letters, beside the event loop), and with glibc's defaults each thread gets an arena
of its own, which keeps the memory of the large rows it handled. Two arenas: peak RSS under
`bench/memory.py` 74 MiB against 84 with the defaults, at the same drain rate
(`bench/forward.py`). Not for the server or its queue writer: measured there, two arenas
cost 3% of 1000-event requests/s, and a fixed mmap threshold (which kept the writer to 88
MiB instead of 112) 15%.

Called first thing in the process (`tune`), before it starts threads. A no-op where the C
library has no `mallopt` (musl, macOS); a MALLOC_ARENA_MAX in the environment wins.

The queue writer instead hands free memory back once a second (`trim`): the buffers of
the groups it received and the rows it wrote (a few MiB each) stay in glibc's arenas once
freed, and are reused but not returned. Peak RSS under `bench/memory.py` 76 MiB against
85, at the same 1000-event requests/s (`bench/ingest.py`); a fixed mmap threshold, which
returns each buffer as it is freed, gave 72 MiB but cost 11% of them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# mallopt(3)'s parameter (glibc's malloc.h).
M_ARENA_MAX = -8
# The main thread's arena and one for the rest: one thread of the forwarder is busy at a
# time, the event loop or a queue operation, and the others wait.
ARENAS = 2


def trim() -> None:
    """Return the free memory of every arena to the system (malloc_trim(3)); a no-op
    where the C library has none."""
    if _TRIM is not None:
        _TRIM(0)


def tune() -> None:
    """Set the arenas, unless the environment already did."""
    mallopt = _libc("mallopt")
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, ARENAS)


def _libc(name: str) -> Callable[..., int] | None:
    """A function of the process's C library (its own symbols), or None when it has none
    of that name (not glibc: musl, macOS)."""
    try:
        found: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return found


_TRIM = _libc("malloc_trim")
