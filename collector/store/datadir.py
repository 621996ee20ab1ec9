"""The data directory: the name of every file the collector keeps, in one place.

    queue.db          the durable queue of events not yet forwarded (`spool.py`)
    seen-ids.db       ids of events already stored, to drop client retries (`seen.py`)
    counts.db         per-minute counts and running totals (`counts.py`)
    dead-letters.db   events that left the queue without an upstream 2xx (`deadletters.py`)
    ledger.json       the witness: a copy of the queue's outcomes ledger (`ledger.py`)
    config-cache.db   SDK config bundles, served through upstream outages (`configcache.py`)
    keys.json         the API keys clients use, hashed (`collector.server.auth`), mode 0600
    keys.lock         held while `keys.json` is edited
    server.json       the server's state and heartbeat (`heartbeats.py`)
    forwarder.json    the forwarder's state and heartbeat (`heartbeats.py`)
    forwarder.lock    held by the one forwarder allowed per data directory
    first-api-key     under systemd, the key made on a first start (mode 0600)
    clock.json        this boot's anchor of the clock ages are measured on (`clock.py`)
    *.corrupt-<time>  a database found corrupt at start, moved aside (`recovery.py`)

Every other module asks `DataDir` for a path instead of spelling a file name, so this
list is the whole truth: `collector status`, `recovery` and the docs read it from here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

QUEUE = "queue.db"
SEEN_IDS = "seen-ids.db"
COUNTS = "counts.db"
DEAD_LETTERS = "dead-letters.db"
CONFIG_CACHE = "config-cache.db"
KEYS = "keys.json"
KEYS_LOCK = "keys.lock"
SERVER_STATE = "server.json"
FORWARDER_STATE = "forwarder.json"
FORWARDER_LOCK = "forwarder.lock"
FIRST_KEY = "first-api-key"
CLOCK = "clock.json"
LEDGER_WITNESS = "ledger.json"
WRITE_PROBE = "write-probe"

# The SQLite databases, in the order a person would look at them.
DATABASES = (QUEUE, SEEN_IDS, COUNTS, DEAD_LETTERS, CONFIG_CACHE)
# What the collector creates is its user's alone: the directory 0700, every file 0600 (the
# queue holds every event, keys.json the key digests), whatever umask it was started with.
PRIVATE_UMASK = 0o077


def make_private() -> None:
    """From now on, this process and its children create files for their user alone.

    A umask rather than a mode per file: SQLite creates its databases, write-ahead logs and
    shared-memory files itself (0644 less the umask), and so do persist-queue and the
    lock files; one process-wide setting covers them all, now and in later code."""
    os.umask(PRIVATE_UMASK)


@dataclass(frozen=True)
class DataDir:
    """The collector's data directory and the paths of its files, always absolute: the
    default (`./collector-data`) depends on the working directory, so every message and
    the status document name the directory that was actually looked at."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", self.path.absolute())

    @property
    def queue(self) -> Path:
        return self.path / QUEUE

    @property
    def seen_ids(self) -> Path:
        return self.path / SEEN_IDS

    @property
    def counts(self) -> Path:
        return self.path / COUNTS

    @property
    def dead_letters(self) -> Path:
        return self.path / DEAD_LETTERS

    @property
    def config_cache(self) -> Path:
        return self.path / CONFIG_CACHE

    @property
    def keys(self) -> Path:
        return self.path / KEYS

    @property
    def keys_lock(self) -> Path:
        return self.path / KEYS_LOCK

    @property
    def server_state(self) -> Path:
        return self.path / SERVER_STATE

    @property
    def forwarder_state(self) -> Path:
        return self.path / FORWARDER_STATE

    @property
    def forwarder_lock(self) -> Path:
        return self.path / FORWARDER_LOCK

    @property
    def first_key(self) -> Path:
        return self.path / FIRST_KEY

    @property
    def clock(self) -> Path:
        return self.path / CLOCK

    @property
    def ledger_witness(self) -> Path:
        return self.path / LEDGER_WITNESS

    def probe_write(self) -> None:
        """Write and fsync a byte in the directory: raises OSError when the filesystem
        cannot take a write now (read-only, say), and blocks while it is frozen. SQLite's
        own checks cannot tell: taking its write lock writes nothing."""
        fd = os.open(self.path / WRITE_PROBE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"1")
            os.fsync(fd)
        finally:
            os.close(fd)

    def databases(self) -> list[Path]:
        return [self.path / name for name in DATABASES]

    def side_bytes(self) -> int:
        """Bytes on disk of the databases besides the queue: they count against the disk
        budget with the queue's, so that no side file can fill the disk while the queue is
        empty. Not their write-ahead logs, which SQLite keeps to about 4 MiB each (it
        checkpoints them at 1000 pages)."""
        total = 0
        for name in DATABASES:
            if name != QUEUE:
                with contextlib.suppress(FileNotFoundError):
                    total += (self.path / name).stat().st_size
        return total

    def holds_data(self) -> bool:
        """True when any file of the collector's is here (`keys create` makes the first)."""
        names = (*DATABASES, KEYS, SERVER_STATE, FORWARDER_STATE, FORWARDER_LOCK)
        return any((self.path / name).exists() for name in names)

    def unusable(self) -> str | None:
        """Why this process could not create or write the directory, or None when it can
        (found without creating anything)."""
        if self.path.exists():
            if not self.path.is_dir():
                return f"{self.path} is not a directory"
            if os.statvfs(self.path).f_flag & os.ST_RDONLY:
                return (
                    f"{self.path} is on a read-only filesystem (remount it read-write, or check "
                    "the disk)"
                )
            if not os.access(self.path, os.W_OK | os.X_OK):
                return f"{self.path} is not writable by this user"
            return None
        parent = self.path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{self.path} cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{self.path} cannot be created: {parent} is not writable by this user"
        return None

    def create(self) -> None:
        """Make the directory (0700, with `make_private`) if it is not there."""
        self.path.mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` (mode 0600) so that a reader or a crash sees the old
    file or the new one, never a part. `durable`: fsync the file before the rename and the
    directory after it (else a power cut can keep the old name's entry), for files whose
    loss would matter (keys); a heartbeat rewritten every two seconds needs neither."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
