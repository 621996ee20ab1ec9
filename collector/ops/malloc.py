"""glibc's allocator set for how the forwarder uses memory.

The forwarder sends batches from a few threads (`asyncio.to_thread` for the queue and the
dead letters, beside the event loop), and with glibc's defaults each thread gets an arena
of its own, which keeps the memory of the large rows it handled. Two arenas: peak RSS under
`bench/memory.py` 74 MiB against 84 with the defaults, at the same drain rate
(`bench/forward.py`). Not for the server or its queue writer: measured there, two arenas
cost 3% of 1000-event requests/s, and a fixed mmap threshold (which kept the writer to 88
MiB instead of 112) 15%.

Called first thing in the process (`tune`), before it starts threads. A no-op where the C
library has no `mallopt` (musl, macOS); a MALLOC_ARENA_MAX in the environment wins.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3)'s parameter (glibc's malloc.h).
M_ARENA_MAX = -8
# The main thread's arena and one for the rest: one thread of the forwarder is busy at a
# time, the event loop or a queue operation, and the others wait.
ARENAS = 2


def tune() -> None:
    """Set the arenas, unless the environment already did."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: its C library's
    except (OSError, AttributeError):
        return  # no mallopt: not glibc
    mallopt(M_ARENA_MAX, ARENAS)
