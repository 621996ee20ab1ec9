"""`collector run`'s child: the forwarder as a subprocess, restarted if it dies.

The server and the forwarder are separate processes (each survives the other being down;
the forwarder's lock allows one per data directory). `collector run` starts the server in
its own process and the forwarder as this child; a child that exits while the server runs
is started again after a delay that doubles up to a minute (and starts over once a child
ran for a minute), so a persistent fault (say, another forwarder holding the lock) is
logged but does not spin.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("collector.run")

# First and longest delay before restarting a forwarder that exited.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 60.0
SYSTEMD_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})
# Beyond stop_timeout_seconds, the seconds a stopping forwarder gets to write its state and
# release its rows before it is killed.
STOP_GRACE_S = 5.0


def safe_imports_for_children() -> None:
    """Make every Python child of this process (the forwarder child, the server's writer
    process, multiprocessing's resource tracker) import only the installed program.

    Python puts the working directory first on a child's import path (`-m cli`, and
    multiprocessing's `-c`), so a `cli.py` or `multiprocessing.py` in the directory the
    user started from ran instead of ours: nothing was forwarded, or the server did not
    start. PYTHONSAFEPATH (Python 3.11) leaves it out; children inherit it.
    """
    os.environ["PYTHONSAFEPATH"] = "1"


def self_command(*args: str) -> list[str]:
    """The command line that runs this program with `args` (installed, or one executable);
    see `safe_imports_for_children`."""
    if getattr(sys, "frozen", False):  # a single-file build: the executable is the program
        return [sys.executable, *args]
    return [sys.executable, "-m", "cli", *args]


class ForwarderChild:
    def __init__(self, args: list[str], stop_timeout_s: float) -> None:
        # --parent-pid: the forwarder stops by itself if `run` is killed without a word.
        self._command = self_command("forward", *args, "--parent-pid", str(os.getpid()))
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        # Held while a child is started, so `stop()` never misses one started as it stops.
        self._starting = threading.Lock()
        self._thread = threading.Thread(target=self._keep_running, name="forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin_stop(self) -> None:
        """Tell the forwarder to stop (SIGTERM), without waiting: it finishes its upstream
        requests while the server finishes its own (`stop` then waits). Once: a forwarder
        that has finished its work has given up its handler of SIGTERM, and a second one
        (from `stop`, after the server's `on_stop`) killed it on its way out (status -15,
        and `run` exited 1)."""
        with self._starting:
            told = self._stopping.is_set()
            self._stopping.set()
            process = self._process
        if not told and process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def stop(self) -> bool:
        """Stop the forwarder and wait for it (SIGKILL past the deadline); True when it
        stopped cleanly (exit status 0) in time."""
        self.begin_stop()
        process = self._process
        try:
            if process is None:
                return True
            try:
                process.wait(timeout=self._stop_timeout_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.error("forwarder did not stop in time; killing it")
                process.kill()
                process.wait()
                return False
        finally:
            self._thread.join(timeout=5)
        if process.returncode != 0:
            log.error("forwarder stopped with status %s", process.returncode)
        return process.returncode == 0

    @staticmethod
    def _environment() -> dict[str, str]:
        """Ours, without systemd's notify and watchdog variables: under a `run` unit only
        `run` speaks for the service; a forwarder saying READY=1 first would be wrong."""
        return {k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY}

    def _keep_running(self) -> None:
        delay = RESTART_FIRST_S
        while True:
            with self._starting:
                if self._stopping.is_set():
                    return
                # Its own process group: a Ctrl-C at the terminal reaches `run` alone, which
                # then stops the forwarder itself (rather than seeing it exit and restarting it).
                self._process = subprocess.Popen(
                    self._command, process_group=0, env=self._environment()
                )
            started = time.monotonic()
            code = self._process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > RESTART_MAX_S:
                delay = RESTART_FIRST_S  # it ran well for a while: not a persistent fault
            log.error("forwarder exited with status %s; restarting in %.0f s", code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_S)
