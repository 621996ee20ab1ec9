"""Each process's state and heartbeat, as a small JSON file in the data directory.

The server and the forwarder are separate processes, and `collector status` must work when
either (or both) is down, so each writes what it is doing to `<name>.json` (atomically:
write, then rename) on every change and every few seconds. A reader judges a process up
when its heartbeat is recent and its pid is alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

# How often a running process rewrites its file; readers allow three missed beats.
BEAT_EVERY_S = 2.0
STALE_AFTER_S = 3 * BEAT_EVERY_S


def state_path(data_dir: Path, name: str) -> Path:
    return data_dir / f"{name}.json"


def write(path: Path, state: dict[str, Any]) -> None:
    document = {**state, "pid": os.getpid(), "heartbeat": time.time()}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=1))
    os.replace(tmp, path)


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
    fresh = (now or time.time()) - float(state.get("heartbeat", 0)) < STALE_AFTER_S
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
