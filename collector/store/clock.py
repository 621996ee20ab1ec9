"""The clock that ages are measured on: seconds like Unix time, which a step of the wall
clock does not move.

An age (how long an event has been queued: the maximum event age, status's oldest event)
is the difference of two readings, often by two processes: the server stamps a queue row,
the forwarder ages it. The wall clock can step (NTP's first sync, `date -s`, a VM resumed
on another host); then every row stamped before the step looks older or younger by the
step, and fresh events were dead-lettered "older than the maximum age" after a step of 8
days forward, or old ones would be kept for ever after one backward. CLOCK_BOOTTIME does
not step (and counts a suspend), but it starts at 0 each boot. So a reading is
CLOCK_BOOTTIME plus an anchor fixed once per boot: the wall time less CLOCK_BOOTTIME when
a collector process first read this clock in the boot, kept in the data directory with
the boot's id (`DataDir.clock`), so every process of the boot adds the same anchor.

Within a boot, ages are exact whatever the wall clock does. Across a reboot they rest on
the wall clock at each boot's first reading; where the boot id or CLOCK_BOOTTIME cannot be
read (not Linux), this is the wall clock.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from collector.store.datadir import DataDir, atomic_write

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Clock:
    """`now()`: this boot's steady clock, in seconds near Unix time."""

    def __init__(self, data_dir: DataDir, *, write: bool = True) -> None:
        """`write`: record the anchor when this is the boot's first reading (a reader,
        such as `collector status`, does not write; it takes its own)."""
        self._anchor = _anchor(data_dir.clock, write)

    def now(self) -> float:
        if self._anchor is None:
            return time.time()
        return time.clock_gettime(time.CLOCK_BOOTTIME) + self._anchor


def _anchor(path: Path, write: bool) -> float | None:
    """This boot's anchor: recorded in `path`, or taken now (and recorded if `write`);
    None when there is no boot clock here."""
    try:
        boot = BOOT_ID.read_text().strip()
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME on this platform
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads(path.read_bytes())
        if recorded["boot_id"] == boot:
            return float(recorded["anchor"])
    anchor = time.time() - since_boot
    if write:
        # Two processes starting at once may both write: their anchors differ by the
        # milliseconds between them, and the last one stays.
        with contextlib.suppress(OSError):
            atomic_write(path, json.dumps({"boot_id": boot, "anchor": anchor}).encode())
    return anchor
