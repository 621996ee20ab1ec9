"""Starting the server: the data directory, a first key, the listening sockets, and one
server process or `workers` of them.

`serve(settings)` is what `collector serve` and `collector run` call. It makes the data
directory, binds the ports (so that a port in use fails here, at once), makes a first API
key when there is none (printed once; under systemd, whose journal keeps stdout, written
to `first-api-key`, mode 0600, instead; a key store that cannot be read is one log line,
and 503 for events until it is fixed), then serves: in this process (`serving.py`), or,
with `workers` above 1, in that many processes under a supervisor (`workers.py`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from collector.errors import KeyStoreUnavailable
from collector.server import serving, workers
from collector.server.app import create_app
from collector.server.auth import KeyStore, ensure_first_key
from collector.settings import Settings
from collector.store.datadir import DataDir, atomic_write

log = logging.getLogger("collector.server")

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
    sockets = listen(settings, settings.workers)
    try:
        first = ensure_first_key(KeyStore(data_dir))
    except KeyStoreUnavailable as exc:
        # Serve anyway: events are answered 503 (SDKs keep them and retry), and taken again
        # as soon as the file is fixed, without a restart.
        log.error(
            "%s: %s; events are answered 503 until it is fixed (restore it from a backup)",
            data_dir.keys,
            exc.message,
        )
        first = None
    if first is not None:
        show_first_key(first, data_dir)
    line = serving_line(settings)
    if settings.workers > 1:
        return workers.supervise(settings, sockets, line, on_stop)
    app = create_app(settings)
    return serving.run(settings, sockets[0], app, lambda: log.info("%s", line), on_stop)


def serving_line(settings: Settings) -> str:
    line = f"serving on http://{settings.host}:{settings.port}"
    if settings.health_port is not None:
        line += f", health on http://{settings.health_host}:{settings.health_port}"
    if settings.workers > 1:
        line += f" in {settings.workers} worker processes"
    return line + f", queue in {DataDir(settings.data_dir).path} (sync={settings.sync})"


def listen(settings: Settings, copies: int = 1) -> list[list[socket.socket]]:
    """The listening sockets, for each of `copies` server processes: events (and all routes)
    on host:port, and the health listener's when health_port is set. A port that cannot be
    bound ends the process here, before anything starts, with one line and uvicorn's own
    status for it (3).

    With more than one copy (`workers`) each gets sockets of its own, bound with
    SO_REUSEPORT, among which the kernel spreads new connections evenly: on one shared
    socket, one worker could take every connection of a burst. The port is first bound
    alone, so that one in use by anything else (another collector included) still fails."""
    addresses = [(settings.host, settings.port)]
    if settings.health_port is not None:
        addresses.append((settings.health_host, settings.health_port))
    per_copy: list[list[socket.socket]] = [[] for _ in range(copies)]
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            if copies == 1:
                per_copy[0].append(
                    socket.create_server((host, port), family=family, backlog=BACKLOG)
                )
                continue
            with socket.create_server((host, port), family=family) as alone:
                port = alone.getsockname()[1]  # port 0: every copy takes the one chosen
            for sockets in per_copy:
                sockets.append(
                    socket.create_server(
                        (host, port), family=family, backlog=BACKLOG, reuse_port=True
                    )
                )
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            raise SystemExit(STARTUP_FAILURE) from exc
    return per_copy


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
