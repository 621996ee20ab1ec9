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
import sys


def notify(message: str) -> bool:
    """Send `message` to systemd; False when not run under Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        # Nobody listens (any more): there is no one to tell, and no reason to fail, above
        # all not while stopping.
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half of what systemd allows), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) not in _main_pids()):
        return None
    return int(usec) / 1_000_000 / 2


def _main_pids() -> tuple[int, ...]:
    """The pids systemd may know as this program's main process.

    In the one-file build (PyInstaller) the process systemd started is the bootloader,
    which runs the program as its child: there the parent counts as the main process too
    (the units set NotifyAccess=all so that systemd takes the child's messages).
    """
    if getattr(sys, "frozen", False):
        return (os.getpid(), os.getppid())
    return (os.getpid(),)


async def keep_watchdog_fed() -> None:
    """Ping the watchdog for as long as this event loop runs (and so is not stuck)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
