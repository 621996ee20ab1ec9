"""The forwarder process: one per data directory, stopped by SIGTERM, reloaded by SIGHUP.

`run` holds the data directory's forwarder lock (two consumers on one queue file would
take the same rows), wires the signals to the `Forwarder` (`loop.py`), tells systemd it is
ready and keeps its watchdog fed, and, when started by `collector run`, stops by itself
once that parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import IO

from collector.errors import AlreadyRunning
from collector.ops import malloc, notify
from collector.settings import Settings
from collector.store.datadir import DataDir
from forwarder.keys import key_chooser
from forwarder.loop import Forwarder

log = logging.getLogger("collector.forwarder")

# How often a forwarder started by `collector run` checks that `run` is still there.
PARENT_CHECK_S = 0.5


@contextlib.contextmanager
def exclusive(data_dir: DataDir) -> Iterator[IO[str]]:
    """Hold the data directory's forwarder lock: two consumers would take the same rows.
    The lock file holds the holder's pid, for `running_pid` and for people."""
    data_dir.create()
    with open(data_dir.forwarder_lock, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise already_running(data_dir) from exc
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield lock


def running_pid(data_dir: DataDir) -> int | None:
    """The pid of the forwarder holding `data_dir`'s lock, or None when none holds it (0
    when one does but its pid cannot be read). Creates nothing."""
    try:
        lock = open(data_dir.forwarder_lock)  # noqa: SIM115 (closed below, lock and all)
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = lock.read().strip()
            return int(text) if text.isdigit() else 0
        return None


def already_running(data_dir: DataDir) -> AlreadyRunning:
    pid = running_pid(data_dir)
    holder = f" (pid {pid})" if pid else ""
    return AlreadyRunning(
        f"another forwarder is running on {data_dir.path}{holder}: one per data directory;"
        " stop it first, or start only the server (collector serve)"
    )


async def run(
    settings: Settings, load_settings: Callable[[], Settings], parent_pid: int | None = None
) -> bool:
    """Run the forwarder until SIGTERM or SIGINT (or `parent_pid` is gone); SIGHUP reloads
    the upstream keys. True when it stopped with no upstream request cut short (False too
    when a sender failed: the exit status 1 has it started again)."""
    malloc.tune()  # before its first thread (asyncio.to_thread's)
    with exclusive(DataDir(settings.data_dir)):
        forwarder = Forwarder(settings, key_chooser(load_settings))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, forwarder.stop)
        loop.add_signal_handler(signal.SIGINT, forwarder.stop)
        loop.add_signal_handler(signal.SIGHUP, forwarder.reload)
        helpers = [asyncio.create_task(notify.keep_watchdog_fed())]
        if parent_pid:
            helpers.append(asyncio.create_task(_stop_without(parent_pid, forwarder)))
        notify.notify("READY=1")
        await forwarder.run()
        for task in helpers:
            task.cancel()
        return not (forwarder.overran or forwarder.failed)


async def _stop_without(parent_pid: int, forwarder: Forwarder) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("the collector that started this forwarder is gone; stopping")
    forwarder.stop()
