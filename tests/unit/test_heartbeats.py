"""collector/store/heartbeats.py: a state file written and read back (stamped with the pid
and the time), and `is_alive`: a fresh heartbeat of a running pid only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from collector.store import heartbeats
from collector.store.heartbeats import STALE_AFTER_S, UpstreamState


def test_a_state_written_is_read_back_with_our_pid_and_the_time(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.json"
    before = time.time()

    heartbeats.write(path, {"upstream": UpstreamState.RETRYING, "message": "HTTP 503"})
    state = heartbeats.read(path)

    assert state is not None
    assert state["upstream"] == "retrying"
    assert state["message"] == "HTTP 503"
    assert state["pid"] == os.getpid()
    assert before <= state["heartbeat"] <= time.time()
    assert os.listdir(tmp_path) == ["forwarder.json"]


def test_a_fresh_heartbeat_of_a_running_process_is_alive(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    heartbeats.write(path, {})
    state = heartbeats.read(path)

    assert heartbeats.is_alive(state)
    assert state is not None
    assert heartbeats.is_alive(state, now=state["heartbeat"] + STALE_AFTER_S - 0.5)


def test_a_stale_heartbeat_is_not_alive_even_with_a_running_pid(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    heartbeats.write(path, {})
    state = heartbeats.read(path)
    assert state is not None

    assert not heartbeats.is_alive(state, now=state["heartbeat"] + STALE_AFTER_S + 0.5)


def test_a_fresh_heartbeat_of_a_dead_pid_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now

    assert not heartbeats.is_alive({"pid": child.pid, "heartbeat": time.time()})
    assert not heartbeats.is_alive({"pid": 0, "heartbeat": time.time()})


def test_no_state_or_an_unreadable_one_is_none_and_not_alive(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")

    assert heartbeats.read(tmp_path / "missing.json") is None
    assert heartbeats.read(garbage) is None
    assert heartbeats.read(listed) is None
    assert not heartbeats.is_alive(None)
    assert not heartbeats.is_alive({})
