"""Starting the server process: the data directory, a first key, uvicorn, and systemd.

`serve(settings)` is what `collector serve` and `collector run` call. It makes the data
directory, makes a first API key when there is none (printed once; under systemd, whose
journal keeps stdout, written to `first-api-key`, mode 0600, instead), and runs the app
(`app.py`) on uvicorn with uvloop and httptools, the connection limits of `limits.py`,
until SIGTERM or Ctrl-C, telling systemd when it serves and when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from litestar import Litestar

from collector.ops import notify
from collector.server import limits
from collector.server.app import create_app
from collector.server.auth import KeyStore, ensure_first_key
from collector.settings import Settings
from collector.store.datadir import DataDir, atomic_write

log = logging.getLogger("collector.server")

# Seconds within which a second SIGINT is taken as the same Ctrl-C (see NotifyingServer).
REPEAT_WINDOW_S = 0.5
# Seconds a client connection may sit idle between requests.
KEEP_ALIVE_S = 30
# Connections the kernel holds for each listener before the app takes them (uvicorn's).
BACKLOG = 2048
# uvicorn's exit status for a server that could not start.
STARTUP_FAILURE = 3


def serve(settings: Settings, on_stop: Callable[[], None] = lambda: None) -> bool:
    """Serve HTTP until SIGTERM or Ctrl-C; True when it stopped within
    `stop_timeout_seconds`. `on_stop` runs as the stop begins (`collector run` tells its
    forwarder then, so that both finish their work at the same time)."""
    data_dir = DataDir(settings.data_dir)
    data_dir.create()
    sockets = listen(settings)
    first = ensure_first_key(KeyStore(data_dir))
    if first is not None:
        show_first_key(first, data_dir)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler of our
    # own receives it, so a SIGTERM ends the command normally (exit 0, `run` stops its
    # forwarder) instead of killing the process on the spot.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda received, frame: None)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_config=None,  # our handlers (collector.ops.logs) carry uvicorn's records too
        access_log=False,
        loop="uvloop",
        # httptools, with the head size limit, head and body deadlines and connection cap
        # that uvicorn lacks (limits.py): slow or idle clients cannot pile up.
        http=limits.protocol_class(settings),
        # A connection idle this long after an answer is closed.
        timeout_keep_alive=KEEP_ALIVE_S,
        # On stop, requests in progress get this long to finish (and be committed).
        timeout_graceful_shutdown=math.ceil(settings.stop_timeout_seconds),
    )
    limits.raise_open_files_limit(settings.max_connections)
    serving = f"serving on http://{settings.host}:{settings.port}"
    if settings.health_port is not None:
        serving += f", health on http://{settings.health_host}:{settings.health_port}"
    serving += f", queue in {data_dir.path} (sync={settings.sync})"
    server = NotifyingServer(config, serving, app, on_stop)
    server.run(sockets=sockets)
    return not server.overran


def listen(settings: Settings) -> list[socket.socket]:
    """The listening sockets: events (and all routes) on host:port, and the health
    listener's when health_port is set. A port that cannot be bound ends the process here,
    before anything starts, with one line and uvicorn's own status for it (3)."""
    addresses = [(settings.host, settings.port)]
    if settings.health_port is not None:
        addresses.append((settings.health_host, settings.health_port))
    sockets = []
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sockets.append(socket.create_server((host, port), family=family, backlog=BACKLOG))
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            raise SystemExit(STARTUP_FAILURE) from exc
    return sockets


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, saying that it serves (in the log, and to systemd) once it does:
    its ports bound and the app started; and, from the moment it is told to stop, not ready
    (/readyz 503) while its requests in progress finish."""

    _exit_at = 0.0
    _drained = False  # every request in progress at the stop finished in time

    def __init__(
        self, config: uvicorn.Config, serving: str, app: Litestar, on_stop: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._serving = serving
        self._app = app
        self._on_stop = on_stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("%s", self._serving)
            notify.notify("READY=1")
            self._watchdog = asyncio.create_task(notify.keep_watchdog_fed())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        notify.notify("STOPPING=1")
        await super().shutdown(sockets)

    async def _wait_tasks_to_complete(self) -> None:
        # uvicorn cancels this wait at timeout_graceful_shutdown (and then the requests).
        await super()._wait_tasks_to_complete()
        self._drained = True

    @property
    def overran(self) -> bool:
        """Requests were still running at stop_timeout_seconds, and were cut."""
        return self.started and not self._drained

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A Ctrl-C reaches the one-file build twice (from the terminal, and passed on by
        # its loader); uvicorn would take the second for "force quit" and skip the clean
        # shutdown. A repeat within a moment of the first is the same Ctrl-C.
        now = time.monotonic()
        if sig == signal.SIGINT and self.should_exit and now - self._exit_at < REPEAT_WINDOW_S:
            return
        if not self.should_exit:
            self._exit_at = now
            self._app.state.stopping = True  # /readyz: 503 from now on
            self._on_stop()
        super().handle_exit(sig, frame)


def show_first_key(secret: str, data_dir: DataDir) -> None:
    """Print the key made on a first start, once; under systemd (whose journal keeps
    stdout) write it to a file only the service user can read instead."""
    if "INVOCATION_ID" not in os.environ:
        print("No API key existed, so one was created. It is shown only this once:")
        print(secret, flush=True)
        return
    atomic_write(data_dir.first_key, (secret + "\n").encode())
    log.warning(
        "no API key existed: one was created and written to %s (delete it once copied)",
        data_dir.first_key,
    )
