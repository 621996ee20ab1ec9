"""Logging for every collector process: one line per event worth knowing.

On a terminal the lines are for people (`12:00:01 INFO collector.forwarder: upstream ok`);
anywhere else (systemd's journal, a container's log) each line is one JSON object with `ts`,
`level`, `logger` and `message`, for machines. Nothing logs an API key or an event's
payload: messages carry counts, states and reasons only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

# Libraries that log every request at INFO; what matters is said by our own loggers.
# uvicorn's own start-up lines ("Started server process", "Uvicorn running on ...")
# repeat what `collector.server` says once the port is bound; its warnings and errors stay.
QUIET = ("httpx", "httpcore", "uvicorn.access", "uvicorn.error")
# uvicorn's records are the server's: they are written under its name.
RENAMED = {"uvicorn": "collector.server"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _renamed(record: logging.LogRecord) -> bool:
    """Write a library's record under the name of the part of ours it speaks for."""
    library = record.name.split(".")[0]
    if library in RENAMED:
        record.name = RENAMED[library]
    return True


def setup(level: str, stream: Any = None) -> None:
    """Send every logger's records to stderr, JSON unless stderr is a terminal; an error
    that nothing caught becomes one record too (JSON off a terminal), not a bare traceback
    across many lines of a JSON log."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stream.isatty():
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    else:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(_renamed)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    logging.getLogger("collector").critical(
        "stopped by an unexpected error: %s: %s", kind.__name__, error, exc_info=(kind, error, tb)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)
