"""systemd's notify protocol, without a dependency: READY, STOPPING and watchdog pings.

Under `Type=notify` systemd passes a datagram socket in `$NOTIFY_SOCKET`; a process says
`READY=1` once it serves, `STOPPING=1` when it begins to stop, and, when the unit sets
`WatchdogSec=`, `WATCHDOG=1` more often than `$WATCHDOG_USEC` (systemd restarts a process
that goes quiet). Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket


def notify(message: str) -> bool:
    """Send `message` to systemd; False when not run under Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half of what systemd allows), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


async def keep_watchdog_fed() -> None:
    """Ping the watchdog for as long as this event loop runs (and so is not stuck)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
