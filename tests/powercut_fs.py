"""A FUSE filesystem, for tests only, on which a power cut loses every write not fsynced.

    python tests/powercut_fs.py BACKING MOUNTPOINT

mounts BACKING (a directory) at MOUNTPOINT in the foreground until the process ends.
tests/test_powercut.py uses it to cut the power under a running `collector serve`: the test
SIGKILLs the server and this process, detaches the mount (`umount -l`), mounts BACKING anew
with a fresh process and checks that every event answered 200 is still there. Ending this
process in any way (SIGKILL, SIGTERM, `umount`) is a power cut; nothing else is.

What it emulates, file data (what a disk's volatile write cache and the page cache hold):
- `write` and `truncate` (`ftruncate`, `open(O_TRUNC)`) of a file are kept in this
  process's memory, per file (its inode, so they follow a rename), and BACKING is left as
  it was. Reads and `stat` see them over the durable contents, as a page cache shows dirty
  data, from every open descriptor and process.
- `fsync` and `fdatasync` of any descriptor of the file (or a write to an `O_SYNC` /
  `O_DSYNC` one, for which the kernel sends an fsync) make everything pending for that file
  durable: it is written into BACKING before the call returns. Nothing else does: not
  `close`, not `flush`, not an fsync of another file or of the directory, not time.
- The end of this process drops all that is pending, so BACKING holds exactly what was
  fsynced.

What it does not emulate, and why:
- Metadata is applied to BACKING at once and survives the cut: `create`, `mkdir`,
  `unlink`, `rmdir`, `rename`, `link`, `symlink`, `chmod`, `chown`, `utimens`. A real disk
  can lose them too until the directory is fsynced (a renamed-into-place file can vanish,
  a new file's name can be missing), so this is more lenient than a disk for metadata; it
  makes the test about the data SQLite commits, which is what the queue's guarantee rests
  on. (A file created and written but never fsynced survives as an empty file.)
- A cut keeps nothing unsynced and tears nothing: a disk may also keep some unsynced
  writes, in any order, or half of a sector being written; SQLite's write-ahead log is
  built for that (checksummed frames), and this filesystem does not test it.
- A disk whose flush lies (a write cache without power-loss protection that acknowledges
  a flush it has not done) loses even fsynced data; nothing can be promised on one.
- BACKING itself is not fsynced when a file is: the host's power is never cut, only this
  filesystem's.
- mtime is BACKING's: a pending write moves it only once fsynced (SQLite never reads it).

Locks (`fcntl`, `flock`) are the kernel's own (the filesystem implements none, so the
kernel keeps them locally, which is right for processes on one machine), and SQLite's
`-shm` file, which it maps shared, works through the page cache: `direct_io` is off, and
`kernel_cache` keeps the cache across opens (every change goes through this mount, so the
cache is never stale) instead of dropping a mapped file's pages each time a process opens
it. Every operation on file data or handles holds one lock: simple, and fast enough for
the tests (the power-cut test queues 35,000 to 80,000 events in its 2 to 4 s a cut).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mfusepy  # type: ignore[import-untyped]  # ships no type information

# The granularity of the pending data: a page of the page cache, and SQLite's page size.
PAGE = 4096
# How BACKING's file is opened for each of the kernel's handles, whatever the caller's
# flags: read-write (the kernel has checked the caller's access mode; fsync writes through
# the handle), never O_APPEND (os.pwrite would ignore its offset; the kernel gives each
# write its offset) nor O_TRUNC (a truncate is data: `open` keeps it pending).
BACKING_FLAGS = os.O_RDWR | os.O_CLOEXEC
# utimensat(2)'s "now" and "leave it" (`touch` sends them), as libfuse passes them: in the
# nanoseconds, with 0 seconds, so mfusepy's nanosecond times are these values exactly.
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_rdev",
    "st_size",
    "st_blksize",
    "st_blocks",
)
STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


@dataclass
class Pending:
    """What is not yet durable of one file.

    `size` is the size readers see. Durable bytes at or past `cut` read as zeros: the file
    was truncated to `cut` since its last fsync (`cut <= size` always). `pages` holds every
    page written since, whole, as readers see it (zeros past `size`)."""

    size: int
    cut: int
    pages: dict[int, bytearray] = field(default_factory=dict)


class PowercutFS(mfusepy.Operations):  # type: ignore[misc]  # mfusepy is untyped
    """BACKING mirrored, with file data kept pending until fsync (the module docstring)."""

    use_ns = True  # times in nanoseconds (mfusepy's float seconds are deprecated)

    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self.mutex = threading.Lock()  # not `lock`: that name is a FUSE operation
        self.pending: dict[int, Pending] = {}  # by inode of BACKING's file
        self.handles: dict[int, int] = {}  # open descriptor (the kernel's fh) -> inode
        self.opened: dict[int, int] = {}  # inode -> how many handles are open on it

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    # --- file data: pending until fsync --------------------------------------------------

    def _state(self, fh: int) -> Pending:
        inode = self.handles[fh]
        state = self.pending.get(inode)
        if state is None:
            size = os.fstat(fh).st_size
            state = self.pending[inode] = Pending(size=size, cut=size)
        return state

    def _page(self, fh: int, state: Pending, index: int) -> bytearray:
        """Page `index` as readers see it now (durable data clipped at `cut`, zero-padded)."""
        page = state.pages.get(index)
        if page is None:
            start = index * PAGE
            page = bytearray(os.pread(fh, max(0, min(PAGE, state.cut - start)), start))
            page += bytes(PAGE - len(page))
        return page

    def _truncate(self, fh: int, length: int) -> None:
        state = self._state(fh)
        if length < state.size:
            for index in [i for i in state.pages if i * PAGE >= length]:
                del state.pages[index]
            tail = state.pages.get(length // PAGE)
            if tail is not None:
                tail[length % PAGE :] = bytes(PAGE - length % PAGE)
            state.cut = min(state.cut, length)
        state.size = length

    def _apply(self, fh: int) -> None:
        """Make what is pending for `fh`'s file durable: write it into BACKING."""
        state = self.pending.pop(self.handles[fh], None)
        if state is None:
            return
        if os.fstat(fh).st_size > state.cut:
            os.ftruncate(fh, state.cut)
        run: list[int] = []  # consecutive pages, written with one pwrite
        for index in [*sorted(state.pages), None]:
            if run and (index is None or index != run[-1] + 1):
                start = run[0] * PAGE
                data = b"".join(state.pages[i] for i in run)[: max(0, state.size - start)]
                os.pwrite(fh, data, start)
                run = []
            if index is not None:
                run.append(index)
        os.ftruncate(fh, state.size)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            state = self.pending.get(self.handles[fh])
            if state is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, state.size)
            if offset >= end:
                return b""
            out = bytearray(os.pread(fh, max(0, min(end, state.cut) - offset), offset))
            out += bytes(end - offset - len(out))
            for index in range(offset // PAGE, (end - 1) // PAGE + 1):
                page = state.pages.get(index)
                if page is not None:
                    lo, hi = max(offset, index * PAGE), min(end, (index + 1) * PAGE)
                    out[lo - offset : hi - offset] = page[lo - index * PAGE : hi - index * PAGE]
            return bytes(out)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            state = self._state(fh)
            done = 0
            while done < len(data):
                index, start = divmod(offset + done, PAGE)
                take = min(PAGE - start, len(data) - done)
                page = self._page(fh, state, index)
                page[start : start + take] = data[done : done + take]
                state.pages[index] = page
                done += take
            state.size = max(state.size, offset + len(data))
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            if fh is not None:
                self._truncate(fh, length)
                return 0
            opened = self._open(path)  # a truncate by path: a handle of its own
            try:
                self._truncate(opened, length)
            finally:
                self._release(opened)
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._apply(fh)
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0  # metadata is durable at once (the module docstring)

    # --- handles -------------------------------------------------------------------------

    def _open(self, path: str, flags: int = 0, mode: int = 0) -> int:
        fh = os.open(self._path(path), BACKING_FLAGS | flags, mode)
        inode = os.fstat(fh).st_ino
        self.handles[fh] = inode
        self.opened[inode] = self.opened.get(inode, 0) + 1
        return fh

    def _release(self, fh: int) -> None:
        inode = self.handles.pop(fh)
        self.opened[inode] -= 1
        if not self.opened[inode]:
            del self.opened[inode]
            if os.fstat(fh).st_nlink == 0:  # unlinked while open: gone with its last handle
                self.pending.pop(inode, None)
        os.close(fh)

    def _forget_if_unused(self, path: str) -> None:
        """Before `path` is unlinked or renamed over: drop its pending data if that was its
        last name and no handle is open (the inode number can be reused for another file)."""
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            return
        if st.st_nlink <= 1 and st.st_ino not in self.opened:
            self.pending.pop(st.st_ino, None)

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            fh = self._open(path)
            if flags & os.O_TRUNC:
                self._truncate(fh, 0)
            return fh

    def create(self, path: str, mode: int, flags: int) -> int:
        with self.mutex:
            try:
                fh = self._open(path, os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fh = self._open(path)  # made by another process since the kernel looked
            else:
                self.pending.pop(self.handles[fh], None)  # a new file: nothing of an old one
            if flags & os.O_TRUNC:
                self._truncate(fh, 0)
            return fh

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            self._release(fh)
            return 0

    # --- metadata: applied to BACKING at once --------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
            attrs: dict[str, Any] = {name: getattr(st, name) for name in STAT_FIELDS}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            state = self.pending.get(st.st_ino)
            if state is not None:
                attrs.update(st_size=state.size, st_blocks=-(-state.size // 512))
            return attrs

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With use_ino each entry needs its inode: readdir(3) skips an entry whose is 0.
        here = self._path(path)
        found = [(name, os.lstat(os.path.join(here, name))) for name in (".", "..")]
        with os.scandir(here) as entries:
            found += [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
        return [(name, {"st_ino": st.st_ino, "st_mode": st.st_mode}, 0) for name, st in found]

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        return {name: getattr(st, name) for name in STATVFS_FIELDS}

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            self._forget_if_unused(path)
            os.unlink(self._path(path))
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            self._forget_if_unused(new)
            os.rename(self._path(old), self._path(new))
            return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._path(source), self._path(target))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._path(target))
        return 0

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        full = self._path(path)
        st, now = os.lstat(full), time.time_ns()
        atime, mtime = (now, now) if times is None else times
        atime = {UTIME_NOW: now, UTIME_OMIT: st.st_atime_ns}.get(atime, atime)
        mtime = {UTIME_NOW: now, UTIME_OMIT: st.st_mtime_ns}.get(mtime, mtime)
        os.utime(full, ns=(atime, mtime), follow_symlinks=False)
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    backing, mountpoint = argv[1:]
    # foreground: the test's process is this one, to SIGKILL; threads: the server's writer,
    # its workers and the test's reader are served side by side.
    mfusepy.FUSE(
        PowercutFS(backing),
        mountpoint,
        foreground=True,
        fsname=f"powercut:{os.path.realpath(backing)}",
        subtype="powercut",
        kernel_cache=True,
        use_ino=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
