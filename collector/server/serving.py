"""One server process: the app on uvicorn, until SIGTERM or Ctrl-C.

`run` serves an app (`app.py`) on sockets already bound, on uvicorn with uvloop and
httptools and the connection limits of `limits.py`; the server alone (`bootstrap.py`) and
each of `workers` (`workers.py`) run it. `NotifyingServer` says when it serves (to systemd,
or to the supervisor of workers) and, from the moment it is told to stop, answers /readyz
503 while its requests in progress finish.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from litestar import Litestar

from collector.ops import notify
from collector.server import limits
from collector.settings import Settings

log = logging.getLogger("collector.server")

# Seconds within which a second SIGINT is taken as the same Ctrl-C (see NotifyingServer).
REPEAT_WINDOW_S = 0.5
# Seconds a client connection may sit idle between requests.
KEEP_ALIVE_S = 30


def run(
    settings: Settings,
    sockets: list[socket.socket],
    app: Litestar,
    on_serving: Callable[[], None],
    on_stop: Callable[[], None] = lambda: None,
    *,
    systemd: bool = True,
) -> bool:
    """Serve `app` on `sockets` until SIGTERM or Ctrl-C; True when it stopped within
    `stop_timeout_seconds`. `on_serving` runs once it serves, `on_stop` as the stop
    begins; `systemd`: tell systemd too (READY, STOPPING, the watchdog)."""
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler of our
    # own receives it, so a SIGTERM ends the command normally (exit 0, `run` stops its
    # forwarder) instead of killing the process on the spot.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda received, frame: None)
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
        # Nothing here reads a client's address, so uvicorn's X-Forwarded-For rewriting
        # (a middleware around every request: 2% of the CPU of a 1-event request) is off.
        proxy_headers=False,
        # On stop, requests in progress get this long to finish (and be committed).
        timeout_graceful_shutdown=math.ceil(settings.stop_timeout_seconds),
    )
    limits.raise_open_files_limit(settings.max_connections)
    server = NotifyingServer(config, app, on_serving, on_stop, systemd=systemd)
    server.run(sockets=sockets)
    return not server.overran


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, saying that it serves once it does (its app started); and, from
    the moment it is told to stop, not ready (/readyz 503) while its requests in progress
    finish."""

    _exit_at = 0.0
    _drained = False  # every request in progress at the stop finished in time

    def __init__(
        self,
        config: uvicorn.Config,
        app: Litestar,
        on_serving: Callable[[], None],
        on_stop: Callable[[], None],
        *,
        systemd: bool,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_serving = on_serving
        self._on_stop = on_stop
        self._systemd = systemd

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_serving()
            if self._systemd:
                notify.notify("READY=1")
                self._watchdog = asyncio.create_task(notify.keep_watchdog_fed())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._systemd:
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
