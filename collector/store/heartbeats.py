"""Each process's state and heartbeat, as a small JSON file in the data directory.

The server and the forwarder are separate processes, and `collector status` must work when
either (or both) is down, so each writes what it is doing to its state file
(`DataDir.server_state`, `DataDir.forwarder_state`; atomically) on every change and every
few seconds. A reader judges a process up when its heartbeat is recent and its pid is
alive. The forwarder's `upstream` field takes the values of `UpstreamState`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from collector.store.datadir import atomic_write

# How often a running process rewrites its file; readers allow three missed beats.
BEAT_EVERY_S = 2.0
STALE_AFTER_S = 3 * BEAT_EVERY_S


class UpstreamState(StrEnum):
    """What the forwarder says of the upstream (its state file's `upstream`)."""

    STARTING = "starting"
    OK = "ok"
    RETRYING = "retrying"  # a send failed; backing off (an outage once it lasts)
    KEY_REJECTED = "key_rejected"  # 401/403, or no key: sending stopped, events kept
    NOT_CONFIGURED = "not_configured"  # no upstream_url: events stay queued


def write(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file at `path` with `state`, stamped with our pid and the time.

    Atomically (a new file renamed over it) when a file can be made; on a filesystem out of
    inodes (or space for one more file) the existing file is rewritten in place instead, so
    that a running process is not reported down for it (a reader meeting a half-written
    file sees no state for that moment)."""
    document = {**state, "pid": os.getpid(), "heartbeat": time.time()}
    data = json.dumps(document, indent=1).encode()
    try:
        atomic_write(path, data, durable=False)
    except OSError as exc:
        if exc.errno != errno.ENOSPC or not path.exists():
            raise
        with open(path, "r+b") as out:
            out.write(data)
            out.truncate()


def read(path: Path) -> dict[str, Any] | None:
    """The last state written, or None when there is none or it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        document = json.loads(path.read_text())
        if isinstance(document, dict):
            return document
    return None


def is_alive(state: dict[str, Any] | None, now: float | None = None) -> bool:
    if not state:
        return False
    now = time.time() if now is None else now
    fresh = now - float(state.get("heartbeat", 0)) < STALE_AFTER_S
    return fresh and _pid_running(int(state.get("pid", 0)))


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
