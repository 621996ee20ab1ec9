"""`workers`: several server processes on one port, sharing one queue writer.

One server process parses and validates on one core. On a host that aggregates many app
servers, `workers = N` runs N of them: this process (the supervisor) binds the ports,
starts the queue writer (`writer.py`), then spawns the workers, each serving listening
sockets of its own on the same ports (SO_REUSEPORT: the kernel spreads new connections
evenly among them; the supervisor keeps them open, so a restarted worker takes over the
connections waiting on its dead predecessor's). They share:

- the writer, over its local socket: one de-duplication and one queue for all;
- the rate limiter's buckets, in shared memory (`ratelimit.py`), so a key's limit holds
  across workers;
- `counts.db` and the state file, which each worker adds to and rewrites (as the server
  alone does), so status, /v1/stats and /metrics show the sum whoever answers.

The supervisor tells systemd it is ready once every worker serves, feeds the watchdog,
starts a worker again if one dies, and on SIGTERM or Ctrl-C has every worker finish its
requests in progress before it stops the writer. Each worker exits by itself if the
supervisor is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import FrameType
from typing import Any

from collector.ops import logs, notify
from collector.ops.supervisor import SYSTEMD_ONLY
from collector.server import serving
from collector.server.app import create_app, writer_config
from collector.server.ratelimit import RateLimiter
from collector.server.writer import WriterLink, WriterProcess, exit_with
from collector.settings import Settings
from collector.store.counts import Counts
from collector.store.datadir import DataDir

log = logging.getLogger("collector.server")

# How often the supervisor looks at its processes when nothing happens (and so, at most,
# how late it feeds systemd's watchdog past its interval's half).
LOOK_EVERY_S = 1.0
# A worker that died is started again at most this often (one that cannot start at all
# would otherwise be restarted in a busy loop).
RESTART_EVERY_S = 1.0
# Beyond stop_timeout_seconds, what a stopping worker gets to close before it is killed.
STOP_GRACE_S = 10.0


def supervise(
    settings: Settings,
    sockets: list[list[socket.socket]],
    line: str,
    on_stop: Callable[[], None],
) -> bool:
    """Serve with `settings.workers` processes until SIGTERM or Ctrl-C; True when every
    worker stopped within `stop_timeout_seconds`."""
    supervisor = Supervisor(settings, sockets, on_stop)
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, supervisor.handle_exit)
    return supervisor.run(line)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        sockets: list[list[socket.socket]],
        on_stop: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.sockets = sockets
        self._on_stop = on_stop
        self._context = multiprocessing.get_context("spawn")
        self._served: Queue[int] = self._context.Queue()
        self._stopping = threading.Event()
        self._writer = WriterProcess(writer_config(settings))
        self._limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
        self._workers: list[BaseProcess | None] = [None] * settings.workers
        self._started_at = [0.0] * settings.workers

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl-C reaches the workers too (the terminal signals the whole group); they
        # begin to stop by themselves, and the SIGTERM sent to them after is no repeat.
        if not self._stopping.is_set():
            log.info("stopping: the workers finish their requests in progress")
            self._stopping.set()

    def run(self, line: str) -> bool:
        # Only the supervisor moves a corrupt counts file aside, before any worker opens it.
        Counts.writer(DataDir(self.settings.data_dir), recover=True).close()
        self._writer.start()
        try:
            for index in range(len(self._workers)):
                self._start(index)
            if self._wait_until_served():
                log.info("%s", line)
                notify.notify("READY=1")
                self._watch()
            notify.notify("STOPPING=1")
            self._on_stop()
            return self._stop_workers()
        finally:
            self._writer.stop()

    def _start(self, index: int) -> None:
        self._started_at[index] = time.monotonic()
        process = self._context.Process(
            target=_worker,
            # The settings as values: their class may be one made for a config file.
            args=(
                self.settings.model_dump(),
                self.sockets[index],
                self._writer.link,
                self._limiter,
                self._served,
            ),
            kwargs={"supervisor_pid": os.getpid()},
            name=f"collector-server-{index + 1}",
        )
        process.start()
        self._workers[index] = process

    def _wait_until_served(self) -> bool:
        """Wait for every worker to say it serves; False when told to stop first, or when
        a worker could not start (its error is in the log)."""
        serving = 0
        while serving < len(self._workers):
            if self._stopping.is_set():
                return False
            if any(p is not None and not p.is_alive() for p in self._workers):
                log.error("a server worker exited while starting; stopping")
                return False
            try:
                self._served.get(timeout=LOOK_EVERY_S)
            except queue.Empty:
                continue
            serving += 1
        return True

    def _watch(self) -> None:
        """Until told to stop: feed the watchdog, start again a worker or a writer that
        died."""
        interval = notify.watchdog_interval()
        fed = 0.0
        while not self._stopping.wait(min(LOOK_EVERY_S, interval or LOOK_EVERY_S)):
            if interval is not None and time.monotonic() - fed >= interval:
                notify.notify("WATCHDOG=1")
                fed = time.monotonic()
            self._writer.restart_if_dead()
            for index, process in enumerate(self._workers):
                if process is not None and not process.is_alive():
                    self._restart(index, process)

    def _restart(self, index: int, process: BaseProcess) -> None:
        if time.monotonic() - self._started_at[index] < RESTART_EVERY_S:
            return
        log.error(
            "server worker %s (pid %s) exited with %s; starting another",
            index + 1,
            process.pid,
            process.exitcode,
        )
        process.close()
        self._start(index)

    def _stop_workers(self) -> bool:
        """SIGTERM every worker and wait for it; True when all finished in time."""
        running = [p for p in self._workers if p is not None and p.is_alive()]
        for process in running:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_timeout_seconds + STOP_GRACE_S
        drained = True
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("server worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join()
            drained = drained and process.exitcode == 0
        return drained


def _worker(
    values: dict[str, Any],
    sockets: list[socket.socket],
    link: WriterLink,
    limiter: RateLimiter,
    served: Queue[int],
    *,
    supervisor_pid: int,
) -> None:
    """One worker: the app on its sockets, with the shared writer and limiter."""
    settings = Settings.model_construct(**values)  # validated, and read, by the supervisor
    for name in SYSTEMD_ONLY:  # only the supervisor speaks to systemd
        os.environ.pop(name, None)
    logs.setup(settings.log_level)  # a spawned process starts with no logging configured
    threading.Thread(target=exit_with, args=(supervisor_pid,), daemon=True).start()
    app = create_app(settings, writer=link, limiter=limiter)
    drained = serving.run(settings, sockets, app, lambda: served.put(os.getpid()), systemd=False)
    raise SystemExit(0 if drained else 1)
