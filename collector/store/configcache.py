"""The config bundle cache: the last good bundle per project, query and key, on disk.

The config proxy (`collector.server.proxy`) stores every 200 answer to a config call here
(`config-cache.db`), keyed by project, canonical query string (`env=`) and the SHA-256 of
the key it was given to, with its ETag; and serves it back when the upstream fails, so
SDKs keep starting and polling through an outage and across restarts. A bundle is served
only while the upstream accepted its key within `max_stale_seconds`. The cache is bounded
by entries and bytes, least recently used first out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from collector.store import db
from collector.store.datadir import DataDir

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bundles (project TEXT NOT NULL, query TEXT NOT NULL,"
    " key_hash TEXT NOT NULL, etag TEXT, content_type TEXT, cache_control TEXT,"
    " body BLOB NOT NULL, size INTEGER NOT NULL, verified_at REAL NOT NULL,"
    " used_at REAL NOT NULL, PRIMARY KEY (project, query, key_hash))",
    "CREATE INDEX IF NOT EXISTS bundles_used ON bundles (used_at)",
    "CREATE INDEX IF NOT EXISTS bundles_key ON bundles (key_hash)",
)
_translated = db.translated("config cache")


@dataclass(frozen=True)
class Slot:
    """Where a bundle is cached: project, canonical query string and the key's SHA-256."""

    project: str
    query: str
    key_hash: str


@dataclass(frozen=True)
class Bundle:
    """A cached 200 answer to a config call."""

    etag: str | None
    content_type: str | None
    cache_control: str | None
    body: bytes
    verified_at: float  # when the upstream last accepted the key for it (200 or 304)


class ConfigCache:
    """Config bundles in one SQLite file, least recently used evicted past the bounds.

    Blocking (SQLite): the server calls it through `asyncio.to_thread`, one call at a time
    per connection thanks to the lock. Every method raises `QueueBusy`/`QueueFull` when the
    file fails; the proxy then treats the cache as empty.
    """

    def __init__(
        self, data_dir: DataDir, max_entries: int, max_bytes: int, max_stale_seconds: float
    ) -> None:
        self.path = data_dir.config_cache
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_stale_seconds = max_stale_seconds
        self._lock = threading.Lock()
        data_dir.create()
        # A corrupt file is moved aside, as every other data file is (recovery.py). Losing
        # the last bundle stored to a power cut costs one full fetch later: NORMAL.
        with _translated:
            self._conn = db.open_writer(self.path, SCHEMA, recover=True)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get(self, slot: Slot) -> Bundle | None:
        """The bundle cached for `slot`, if its key was accepted recently enough."""
        now = time.time()
        with self._lock, _translated, self._conn:
            row = self._conn.execute(
                "SELECT etag, content_type, cache_control, body, verified_at FROM bundles"
                " WHERE project = ? AND query = ? AND key_hash = ?",
                (slot.project, slot.query, slot.key_hash),
            ).fetchone()
            if row is None:
                return None
            if now - row[4] > self.max_stale_seconds:
                self._delete(slot)
                return None
            self._conn.execute(
                "UPDATE bundles SET used_at = ? WHERE project = ? AND query = ? AND key_hash = ?",
                (now, slot.project, slot.query, slot.key_hash),
            )
        return Bundle(row[0], row[1], row[2], bytes(row[3]), row[4])

    def put(self, slot: Slot, bundle: Bundle) -> None:
        """Store `bundle` for `slot` (replacing what was there), then keep within the bounds."""
        if not self.enabled or len(bundle.body) > self.max_bytes:
            self.forget(slot)
            return
        with self._lock, _translated, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO bundles (project, query, key_hash, etag, content_type,"
                " cache_control, body, size, verified_at, used_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    slot.project,
                    slot.query,
                    slot.key_hash,
                    bundle.etag,
                    bundle.content_type,
                    bundle.cache_control,
                    bundle.body,
                    len(bundle.body),
                    bundle.verified_at,
                    bundle.verified_at,
                ),
            )
            self._evict()

    def verified(self, slot: Slot, etag: str) -> None:
        """The upstream accepted the key and says `etag` is still current (a 304)."""
        now = time.time()
        with self._lock, _translated, self._conn:
            self._conn.execute(
                "UPDATE bundles SET verified_at = ?, used_at = ?"
                " WHERE project = ? AND query = ? AND key_hash = ? AND etag = ?",
                (now, now, slot.project, slot.query, slot.key_hash, etag),
            )

    def forget(self, slot: Slot) -> None:
        with self._lock, _translated, self._conn:
            self._delete(slot)

    def forget_key(self, key_hash: str) -> None:
        """Every bundle cached for this key (the upstream refused it)."""
        with self._lock, _translated, self._conn:
            self._conn.execute("DELETE FROM bundles WHERE key_hash = ?", (key_hash,))

    def summary(self) -> tuple[int, int]:
        """(entries, bytes) held."""
        with self._lock, _translated:
            entries, size = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM bundles"
            ).fetchone()
        return int(entries), int(size)

    def _delete(self, slot: Slot) -> None:
        self._conn.execute(
            "DELETE FROM bundles WHERE project = ? AND query = ? AND key_hash = ?",
            (slot.project, slot.query, slot.key_hash),
        )

    def _evict(self) -> None:
        """Drop what can never be served again, then the least recently used past the bounds."""
        self._conn.execute(
            "DELETE FROM bundles WHERE verified_at < ?", (time.time() - self.max_stale_seconds,)
        )
        self._conn.execute(
            "DELETE FROM bundles WHERE rowid IN (SELECT rowid FROM ("
            " SELECT rowid, ROW_NUMBER() OVER w AS n, SUM(size) OVER w AS running"
            " FROM bundles WINDOW w AS (ORDER BY used_at DESC, rowid DESC))"
            " WHERE n > ? OR running > ?)",
            (self.max_entries, self.max_bytes),
        )


def bodies(data_dir: DataDir) -> list[bytes]:
    """Every distinct bundle body in the data directory's config cache, read-only (none
    without one): the same bundle cached for several keys is read once."""
    return [bytes(body) for (body,) in _read(data_dir, "SELECT DISTINCT body FROM bundles")]


def summary(data_dir: DataDir) -> tuple[int, int]:
    """(entries, bytes) in the data directory's config cache, read-only (0, 0 without one)."""
    found = _read(data_dir, "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM bundles")
    entries, size = found[0] if found else (0, 0)
    return int(entries), int(size)


def _read(data_dir: DataDir, sql: str) -> list[Any]:
    """The rows of `sql` on the config cache, read-only (none without the file)."""
    with _translated:
        conn = db.open_reader(data_dir.config_cache)
        try:
            return db.read(conn, sql)
        finally:
            if conn is not None:
                conn.close()
