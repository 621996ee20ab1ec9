"""Power cuts: with `sync = "full"` (the default) no event answered 200 is lost.

The data directory is on `tests/powercut_fs.py`, a FUSE filesystem that keeps every write
in memory until the file is fsynced, so a power cut (SIGKILL of its process) loses exactly
what was not fsynced, as a disk's volatile cache and the page cache would; its docstring
says what it does not emulate (metadata is kept at once, writes are never torn). The real
`collector serve` takes batches from several clients at once; then the power goes: the
server, its queue writer and the filesystem are SIGKILLed together, the mount is detached,
a fresh filesystem process mounts the same backing directory (the disk after the cut),
and the restarted server must hold every event it answered 200 for.

Two more tests make sure that this one could fail: the filesystem drops a file's unsynced
writes and keeps its synced ones, and with `sync = "normal"` (documented to lose recent
commits to a power cut) answered events are lost on it. They need root and /dev/fuse, as
CI has, and libfuse (.ci/run installs Debian's fuse3) with mfusepy (the dev extra);
elsewhere they are skipped, saying which is missing (`TEST_PACKAGES=required`, as CI
sets, makes that a failure). All are in the slow group
(`pytest -m slow`). Figures (events answered per cut) are printed: see them with `-s`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from collector.store.datadir import QUEUE as QUEUE_FILE

from conftest import Server, create_key, event, free_port, wait_for
from test_durability import ids, posting_clients
from test_forward_faults import descendants

pytestmark = pytest.mark.slow

FS_SCRIPT = Path(__file__).with_name("powercut_fs.py")
# The external measurement this reproduces (the issue): 0 of 63,980 answered events lost
# over 3 cuts.
CUTS = 3
# How long the clients post before the power goes, drawn per cut: 35,000 to 80,000 events
# a cut on the reference machine, so the queue's write-ahead log passes SQLite's automatic
# checkpoint (1000 pages, 4 MiB) several times and a cut can land in one.
LOAD_S = (2.0, 4.0)
MOUNT_TIMEOUT_S = 20.0  # the filesystem's process: Python, mfusepy and libfuse to start


def fuse_missing() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or None when it can."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse: this kernel or container has no FUSE device"
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem needs root here (CI runs as root)"
    try:
        importlib.import_module("mfusepy")
    except (ImportError, OSError) as exc:  # OSError: mfusepy found no libfuse
        return f"no FUSE library ({exc}): .ci/run installs Debian's fuse3, pip the dev extra"
    return None


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


@dataclass
class PowercutFs:
    """`backing` mounted at `mountpoint` by a `tests/powercut_fs.py` process."""

    backing: Path
    mountpoint: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    servers: list[Server] = field(default_factory=list)  # on it, SIGKILLed before its cut

    def mount(self) -> PowercutFs:
        assert not mounted(self.mountpoint)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(FS_SCRIPT), str(self.backing), str(self.mountpoint)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        wait_for(
            lambda: mounted(self.mountpoint) or process.poll() is not None,
            "the power-cut filesystem to mount",
            timeout=MOUNT_TIMEOUT_S,
        )
        assert process.poll() is None, f"it exited:\n{self.log()}"
        return self

    def kill(self) -> None:
        """SIGKILL: everything not fsynced is gone with the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def unmount(self) -> None:
        """Detach the mount (lazily: whatever still has a file open there lets go)."""
        if mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=True)

    def cut(self) -> None:
        """A power cut, then the disk as it is after one: unmounted, nothing pending."""
        self.kill()
        self.unmount()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def powercut_fs(tmp_path: Path) -> Iterator[Callable[[], PowercutFs]]:
    """Factory: a PowercutFs over a fresh backing directory of `tmp_path`, mounted; every
    one is cut and unmounted after the test."""
    missing = fuse_missing()
    if missing and os.environ.get("TEST_PACKAGES") == "required":
        pytest.fail(f"TEST_PACKAGES=required but {missing}")
    if missing:
        pytest.skip(missing)
    made: list[PowercutFs] = []

    def make() -> PowercutFs:
        name = f"fs{len(made)}"
        backing, mountpoint = tmp_path / f"{name}-backing", tmp_path / f"{name}-mnt"
        backing.mkdir()
        mountpoint.mkdir()
        fs = PowercutFs(backing, mountpoint, tmp_path / f"{name}.log")
        made.append(fs)
        return fs.mount()

    yield make
    for fs in made:
        for server in fs.servers:
            kill_with_children(server)
        fs.cut()


def sigkill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_with_children(server: Server) -> None:
    """SIGKILL the server and every process under it (its queue writer), and reap it."""
    if server.process is not None and server.process.poll() is None:
        sigkill([server.process.pid, *descendants(server.process.pid)])
        server.kill()


def cut_power(server: Server, fs: PowercutFs) -> None:
    """SIGKILL the server, every process under it (its queue writer) and the filesystem at
    one moment (the signals first, then the waits), and detach the mount."""
    assert server.process is not None and fs.process is not None
    sigkill([server.process.pid, *descendants(server.process.pid), fs.process.pid])
    server.kill()  # reaps it
    fs.cut()


def on_the_mount(fs: PowercutFs, name: str) -> Server:
    """A server (not started) with its data directory on `fs` and a write key; its log is
    kept off the mount, where a cut would take its last lines."""
    data_dir = fs.mountpoint / "data"
    server = Server(data_dir, free_port(), {})
    server.log_path = fs.backing.parent / f"server-{name}.log"
    server.key = create_key(data_dir, "--scope", "sdk:write", "--name", name)
    fs.servers.append(server)
    return server


def queue_is_intact(server: Server) -> None:
    """SQLite's integrity check of the queue file, read-only (the server has it open)."""
    queue = sqlite3.connect(f"{(server.data_dir / QUEUE_FILE).as_uri()}?mode=ro", uri=True)
    try:
        assert queue.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        queue.close()


def load_then_cut(
    server: Server, fs: PowercutFs, prefix: str, seconds: float, answered: list[str]
) -> int:
    """Clients post unique batches back to back; `seconds` after the first 200 the power
    goes. The ids of every batch answered 200 are added to `answered`; returns how many."""
    before = len(answered)
    join = posting_clients(server, prefix, answered)
    time.sleep(seconds)  # the cut lands at a random point of the stream
    cut_power(server, fs)
    unexpected = join()
    assert not unexpected, f"{prefix}: {unexpected[:3]}"
    return len(answered) - before


def test_a_power_cut_under_load_loses_no_answered_event_with_sync_full(
    powercut_fs: Callable[[], PowercutFs], request: pytest.FixtureRequest
) -> None:
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    print(f"{request.node.name}: FAULT_SEED={seed}")
    rng = random.Random(seed)
    fs = powercut_fs()
    server = on_the_mount(fs, "full")
    server.start()
    assert "sync=full" in server.log()  # the default, which is what this test is about
    answered: list[str] = []
    per_cut: list[int] = []
    started = time.monotonic()
    for cut in range(CUTS):
        per_cut.append(load_then_cut(server, fs, f"p{cut}", rng.uniform(*LOAD_S), answered))
        fs.mount()  # the same backing directory: the power is back
        server.start()  # the first to open the files as the cut left them
        queue_is_intact(server)
        stored = set(ids(server.stored()))
        missing = [eid for eid in answered if eid not in stored]
        assert not missing, (
            f"cut {cut} (FAULT_SEED={seed}): {len(missing)} of {len(answered)} answered "
            f"events lost, e.g. {missing[:3]}"
        )
    elapsed = time.monotonic() - started

    print(
        f"power cuts survived with sync=full: {CUTS} cuts in {elapsed:.0f} s, "
        f"{len(answered)} events answered 200 ({', '.join(map(str, per_cut))} per cut), "
        "0 lost"
    )


def test_with_sync_normal_a_power_cut_loses_answered_events_on_this_filesystem(
    powercut_fs: Callable[[], PowercutFs],
) -> None:
    """`sync = "normal"` fsyncs at SQLite's checkpoints only, and is documented to lose the
    commits since the last one to a power cut: on this filesystem it does. Its first
    batches, far below the automatic checkpoint, are the ones certain to be lost."""
    fs = powercut_fs()
    server = on_the_mount(fs, "normal")
    server.env["COLLECTOR_SYNC"] = "normal"
    server.start()
    assert "sync=normal" in server.log()
    answered: list[str] = []
    for n in range(10):
        body = {"events": [event(id=f"normal-{n}-{i}") for i in range(50)]}
        assert server.post(body).status_code == 200
        answered += ids(body["events"])
    assert set(answered) <= set(ids(server.stored()))  # committed, as a crash would keep them

    cut_power(server, fs)
    fs.mount()
    server.start()

    stored = set(ids(server.stored()))
    lost = [eid for eid in answered if eid not in stored]
    assert lost, "nothing was lost: the filesystem kept writes that were never fsynced"
    print(f"sync=normal: {len(lost)} of {len(answered)} answered events lost to the cut")


def test_the_filesystem_keeps_across_a_cut_what_was_fsynced_and_nothing_else(
    powercut_fs: Callable[[], PowercutFs],
) -> None:
    """What makes the power-cut test able to fail: unsynced writes and truncates are
    seen while the power is on and gone after the cut; synced ones stay."""
    fs = powercut_fs()
    root = fs.mountpoint

    def write(name: str, data: bytes, *, fsync: bool, flags: int = 0) -> None:
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | flags, 0o600)
        try:
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    write("unsynced", b"never fsynced", fsync=False)
    write("synced", b"fsynced", fsync=True)
    write("synced", b" then more", fsync=False, flags=os.O_APPEND)
    write("datasynced", b"x" * 10_000, fsync=False)
    fd = os.open(root / "datasynced", os.O_RDWR)
    try:
        os.fdatasync(fd)  # another descriptor than the writer's: the file's writes count
        os.ftruncate(fd, 10)
    finally:
        os.close(fd)
    write("renamed", b"fsynced, then renamed", fsync=True)
    write("renamed", b"rewritten", fsync=False, flags=os.O_TRUNC)
    os.rename(root / "renamed", root / "moved")  # metadata: kept at once
    # Seen while the power is on, from this process and another.
    assert (root / "unsynced").read_bytes() == b"never fsynced"
    assert (root / "synced").read_bytes() == b"fsynced then more"
    assert os.stat(root / "datasynced").st_size == 10
    assert (root / "moved").read_bytes() == b"rewritten"
    done = subprocess.run(["cat", str(root / "synced")], capture_output=True, check=True)
    assert done.stdout == b"fsynced then more"
    assert (fs.backing / "unsynced").read_bytes() == b""  # not on the disk yet

    fs.cut()
    fs.mount()

    assert (root / "synced").read_bytes() == b"fsynced"
    assert (root / "datasynced").read_bytes() == b"x" * 10_000  # the truncate was not synced
    assert (root / "unsynced").read_bytes() == b""  # its creation, metadata, was kept
    assert (root / "moved").read_bytes() == b"fsynced, then renamed"
    assert not (root / "renamed").exists()
