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
import time
from typing import Any

# Libraries that log every request at INFO; what matters is said by our own loggers.
QUIET = ("httpx", "httpcore", "uvicorn.access")


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


def setup(level: str, stream: Any = None) -> None:
    """Send every logger's records to stderr, JSON unless stderr is a terminal."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stream.isatty():
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
