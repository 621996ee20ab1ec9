"""`collector run`'s forwarder child (collector.ops.supervisor), with a real subprocess in
the forwarder's place that stops on SIGTERM the way the forwarder does."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from collector.ops.supervisor import ForwarderChild

from conftest import wait_for

# Stops on its first SIGTERM, then gives its handler up (as asyncio.run does on its way
# out) and takes a moment to exit: a second SIGTERM in that moment kills it.
STAND_IN = textwrap.dedent(
    """
    import signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    open(sys.argv[1] + "/started", "w").close()
    while not stop:
        time.sleep(0.01)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    open(sys.argv[1] + "/stopping", "w").close()
    time.sleep(0.5)
    """
)


def test_stopping_the_forwarder_tells_it_once_and_it_exits_cleanly(tmp_path: Path) -> None:
    child = ForwarderChild([], stop_timeout_s=5)
    child._command = [sys.executable, "-c", STAND_IN, str(tmp_path)]
    child.start()
    wait_for((tmp_path / "started").exists, "the stand-in forwarder to start")

    child.begin_stop()  # what the server's stop does first (`on_stop`)
    wait_for((tmp_path / "stopping").exists, "it to give up its handler of SIGTERM")
    assert child.stop(), "the forwarder did not exit with status 0"
