"""Config, resolve and decide calls passed to the upstream, and the config bundle cache.

An SDK has one base URL for everything, so once it points at the collector it also asks it
for its config bundle (`GET /v1/config/{projectId}?env=`) and, in server evaluation mode,
for decisions (`POST /v1/resolve`, `POST /v1/decide/...`). The collector passes each call to
`{upstream_url}` with the client's own headers (its key, `If-None-Match`, `X-Org-Id`, ...),
and the upstream's answer back: status, body, `ETag`, `Cache-Control`, `Content-Type`. The
upstream judges the key; the collector holds no opinion on it.

This is the server's only module that imports httpx (the forwarder's is
`forwarder/upstream.py`). Redirects are never followed nor passed on (SDKs do not follow
them): a 3xx from the upstream becomes a 502. Each call has one deadline for the whole
exchange, connection included (`proxy_config_timeout_seconds`,
`proxy_decide_timeout_seconds`).

The config cache (`config-cache.db` in the data directory) keeps the last 200 bundle per
project, query (`env=`) and key (its SHA-256), with its ETag. When the upstream is
unreachable, times out, redirects or answers 408, 429 or 5xx, the last good bundle is served
to the same key (`X-Collector-Stale: true`, `Age`, `Warning`), or a 304 if the client already
holds it, so SDKs keep starting and polling through an outage and across restarts. A bundle
is served only to the key the upstream gave it to, and only while the upstream accepted that
key within `config_cache_max_stale_seconds`; a 401 from the upstream forgets every bundle of
that key, a 403 the one asked for. The cache is bounded by entries and bytes, least recently
used first out.

`If-None-Match` is passed on when the cache holds the bundle it names (the upstream's 304
then also confirms the cached copy); otherwise it is left out, so the upstream sends the
whole bundle, which is cached, and the collector answers the client 304 itself when that is
the version it already has.

Every call is counted in `counts.db` as `proxy_requests` by route (`config`, `resolve`,
`decide`) and outcome (`ok`, `not_modified`, `stale`, `upstream_error`, `rejected`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode

import httpx
from prometheus_client import Histogram

from collector.counts import Counts
from collector.errors import (
    UpstreamFailed,
    UpstreamNotConfigured,
    UpstreamRedirect,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from collector.settings import Settings

log = logging.getLogger("collector.proxy")
T = TypeVar("T")

CACHE_FILE = "config-cache.db"
USER_AGENT = "traffical-collector"
STALE_HEADER = "X-Collector-Stale"
STALE_WARNING = '110 - "Response is Stale"'
# Request headers passed on as the client sent them (and any X-SDK-* header).
FORWARDED_HEADERS = frozenset(
    {
        "authorization",
        "if-none-match",
        "x-org-id",
        "x-project-id",
        "x-env",
        "content-type",
        "content-encoding",
        "accept",
        "user-agent",
    }
)
FORWARDED_PREFIX = "x-sdk-"
# Answer headers passed back, with their usual spelling.
RETURNED_HEADERS = ("ETag", "Cache-Control", "Content-Type", "Retry-After")
# Upstream answers that blame the moment, not the request: a cached bundle is served instead.
RETRYABLE = frozenset({408, 429})
KEY_REFUSED = 401
SCOPE_REFUSED = 403
# Outcomes counted per route.
OK, NOT_MODIFIED, STALE, UPSTREAM_ERROR, REJECTED = (
    "ok",
    "not_modified",
    "stale",
    "upstream_error",
    "rejected",
)
OUTCOMES = (OK, NOT_MODIFIED, STALE, UPSTREAM_ERROR, REJECTED)
ROUTES = ("config", "resolve", "decide")
# At most this many connections to the upstream at once (decide calls can be many).
MAX_CONNECTIONS = 200


@dataclass(frozen=True)
class Answer:
    """What the collector answers the client: passed through, or from the cache."""

    status: int
    body: bytes
    headers: dict[str, str]


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


def key_hash(authorization: str | None) -> str | None:
    """SHA-256 of the Bearer token, or None when there is none (such calls are not cached)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return hashlib.sha256(token.encode()).hexdigest()


def canonical_query(query: str) -> str:
    """The query string with its parameters sorted, so `env=a&x=1` and `x=1&env=a` match."""
    return urlencode(sorted(parse_qsl(query, keep_blank_values=True)))


def entity_tags(header: str | None) -> set[str]:
    """The opaque tags of an `If-None-Match` header (weak prefixes dropped: weak comparison)."""
    tags = set()
    for part in (header or "").split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag:
            tags.add(tag)
    return tags


def matches(tags: set[str], etag: str | None) -> bool:
    if not tags or not etag:
        return False
    bare = etag[2:] if etag.startswith("W/") else etag
    return "*" in tags or bare in tags


class ConfigCache:
    """Config bundles in one SQLite file, least recently used evicted past the bounds.

    Blocking (SQLite): the server calls it through `asyncio.to_thread`, one call at a time
    per connection thanks to the lock.
    """

    def __init__(
        self, path: Path, max_entries: int, max_bytes: int, max_stale_seconds: float
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_stale_seconds = max_stale_seconds
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            # Only a cache: start it afresh rather than keep the server from starting.
            log.warning("config cache %s unreadable (%s): starting it afresh", path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5)
        try:
            self._create(conn)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        with conn:
            conn.execute("PRAGMA journal_mode=WAL")
            # Losing the last bundle stored to a power cut costs one full fetch later.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bundles (project TEXT NOT NULL, query TEXT NOT NULL,"
                " key_hash TEXT NOT NULL, etag TEXT, content_type TEXT, cache_control TEXT,"
                " body BLOB NOT NULL, size INTEGER NOT NULL, verified_at REAL NOT NULL,"
                " used_at REAL NOT NULL, PRIMARY KEY (project, query, key_hash))"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS bundles_used ON bundles (used_at)")
            conn.execute("CREATE INDEX IF NOT EXISTS bundles_key ON bundles (key_hash)")

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get(self, slot: Slot) -> Bundle | None:
        """The bundle cached for `slot`, if its key was accepted recently enough."""
        now = time.time()
        with self._lock, self._conn:
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
        with self._lock, self._conn:
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
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE bundles SET verified_at = ?, used_at = ?"
                " WHERE project = ? AND query = ? AND key_hash = ? AND etag = ?",
                (now, now, slot.project, slot.query, slot.key_hash, etag),
            )

    def forget(self, slot: Slot) -> None:
        with self._lock, self._conn:
            self._delete(slot)

    def forget_key(self, key_hash: str) -> None:
        """Every bundle cached for this key (the upstream refused it)."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM bundles WHERE key_hash = ?", (key_hash,))

    def summary(self) -> tuple[int, int]:
        """(entries, bytes) held."""
        with self._lock:
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


def cache_summary(data_dir: Path) -> tuple[int, int]:
    """(entries, bytes) in the data directory's config cache, without creating it."""
    path = data_dir / CACHE_FILE
    if not path.exists():
        return 0, 0
    try:
        conn = sqlite3.connect(path, timeout=5)
    except sqlite3.Error:
        return 0, 0
    try:
        entries, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM bundles"
        ).fetchone()
        return int(entries), int(size)
    except sqlite3.Error:
        return 0, 0
    finally:
        conn.close()


class Proxy:
    """Passes SDK calls to the upstream; serves config bundles from the cache when it fails."""

    def __init__(
        self, settings: Settings, counts: Counts, latency: Histogram | None = None
    ) -> None:
        self.base = settings.upstream_url.rstrip("/") if settings.upstream_url else None
        self.config_timeout_s = settings.proxy_config_timeout_seconds
        self.decide_timeout_s = settings.proxy_decide_timeout_seconds
        self.cache = ConfigCache(
            settings.data_dir / CACHE_FILE,
            settings.config_cache_max_entries,
            settings.config_cache_max_bytes,
            settings.config_cache_max_stale_seconds,
        )
        self._counts = counts
        self._latency = latency
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=50),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
        self.cache.close()

    # --- the routes ---------------------------------------------------------------------

    async def config(self, project: str, query: str, headers: Mapping[str, str]) -> Answer:
        """`GET /v1/config/{project}?{query}`."""
        return await self._counted("config", self._config(project, query, headers))

    async def call(
        self, route: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Answer:
        """`POST` `path` (resolve or decide) with `body`, passed through."""
        return await self._counted(route, self._call(path, query, headers, body))

    # --- config -------------------------------------------------------------------------

    async def _config(
        self, project: str, query: str, headers: Mapping[str, str]
    ) -> tuple[Answer, str]:
        base = self._base()
        hashed = key_hash(headers.get("authorization"))
        slot = Slot(project, canonical_query(query), hashed) if hashed else None
        cached = None
        if slot is not None and self.cache.enabled:
            cached = await self._cached(self.cache.get, slot)
        wanted = entity_tags(headers.get("if-none-match"))
        sent = forwarded(headers)
        if wanted and not (cached is not None and matches(wanted, cached.etag)):
            # The cache lacks the version the client holds: ask for the whole bundle.
            sent.pop("if-none-match", None)
        url = f"{base}/v1/config/{segment(project)}" + (f"?{query}" if query else "")

        try:
            response = await self._send("GET", url, sent, None, self.config_timeout_s)
        except UpstreamFailed as failure:
            return self._stale_or_raise(cached, wanted, failure)
        status = response.status_code

        if status == 304:
            etag = response.headers.get("etag") or sent.get("if-none-match")
            if slot is not None and cached is not None and etag:
                await self._cached(self.cache.verified, slot, etag)
            return passed(response), NOT_MODIFIED
        if status == 200:
            etag = response.headers.get("etag")
            if slot is not None and self.cache.enabled:
                bundle = Bundle(
                    etag,
                    response.headers.get("content-type"),
                    response.headers.get("cache-control"),
                    response.content,
                    time.time(),
                )
                await self._cached(self.cache.put, slot, bundle)
            if matches(wanted, etag):
                return not_modified(response.headers), NOT_MODIFIED
            return passed(response), OK
        if 200 < status < 300:
            return passed(response), OK
        if status in (KEY_REFUSED, SCOPE_REFUSED):
            if hashed is not None:
                if status == KEY_REFUSED:
                    await self._cached(self.cache.forget_key, hashed)
                elif slot is not None:
                    await self._cached(self.cache.forget, slot)
            return passed(response), REJECTED
        if 300 <= status < 400:
            return self._stale_or_raise(cached, wanted, redirect(status))
        if status >= 500 or status in RETRYABLE:
            if cached is not None:
                return stale(cached, wanted), STALE
            return passed(response), UPSTREAM_ERROR
        return passed(response), REJECTED

    def _stale_or_raise(
        self, cached: Bundle | None, wanted: set[str], failure: UpstreamFailed
    ) -> tuple[Answer, str]:
        if cached is None:
            raise failure
        log.debug("config served from the cache: %s", failure.message)
        return stale(cached, wanted), STALE

    # --- resolve and decide -------------------------------------------------------------

    async def _call(
        self, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Answer, str]:
        url = f"{self._base()}{path}" + (f"?{query}" if query else "")
        response = await self._send("POST", url, forwarded(headers), body, self.decide_timeout_s)
        status = response.status_code
        if 300 <= status < 400:
            raise redirect(status)
        if status < 300:
            outcome = OK
        elif status >= 500 or status in RETRYABLE:
            outcome = UPSTREAM_ERROR
        else:
            outcome = REJECTED
        return passed(response), outcome

    # --- plumbing -----------------------------------------------------------------------

    async def _cached(self, method: Callable[..., T], *args: object) -> T | None:
        """A cache call off the event loop; a failing cache is logged and treated as empty."""
        try:
            return await asyncio.to_thread(method, *args)
        except sqlite3.Error as exc:
            log.warning("config cache %s failed: %s", self.cache.path, exc)
            return None

    def _base(self) -> str:
        if self.base is None:
            raise UpstreamNotConfigured()
        return self.base

    async def _send(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float
    ) -> httpx.Response:
        """One exchange with the upstream, whole answer read, within `timeout` seconds."""
        headers.setdefault("user-agent", USER_AGENT)
        try:
            async with asyncio.timeout(timeout):
                return await self._client.request(
                    method, url, headers=headers, content=body, timeout=timeout
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UpstreamTimeout(f"the upstream did not answer within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(
                f"the upstream could not be reached: {exc.__class__.__name__}: {exc}"
            ) from exc

    async def _counted(self, route: str, work: Awaitable[tuple[Answer, str]]) -> Answer:
        started = time.perf_counter()
        try:
            answer, outcome = await work
        except UpstreamFailed:
            self._count(route, UPSTREAM_ERROR, started)
            raise
        self._count(route, outcome, started)
        return answer

    def _count(self, route: str, outcome: str, started: float) -> None:
        self._counts.add("proxy_requests", (route, outcome))
        if self._latency is not None:
            self._latency.labels(route).observe(time.perf_counter() - started)


def segment(value: str) -> str:
    """`value` as one path segment: every reserved character escaped."""
    return quote(value, safe="")


def forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that go to the upstream (names lower-case)."""
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower() in FORWARDED_HEADERS or name.lower().startswith(FORWARDED_PREFIX)
    }


def returned(headers: httpx.Headers) -> dict[str, str]:
    return {name: headers[name] for name in RETURNED_HEADERS if name in headers}


def passed(response: httpx.Response) -> Answer:
    body = b"" if response.status_code == 304 else response.content
    return Answer(response.status_code, body, returned(response.headers))


def not_modified(headers: httpx.Headers) -> Answer:
    kept = {name: headers[name] for name in ("ETag", "Cache-Control") if name in headers}
    return Answer(304, b"", kept)


def stale(bundle: Bundle, wanted: set[str]) -> Answer:
    headers = {
        STALE_HEADER: "true",
        "Age": str(max(0, int(time.time() - bundle.verified_at))),
        "Warning": STALE_WARNING,
    }
    if bundle.etag:
        headers["ETag"] = bundle.etag
    if bundle.cache_control:
        headers["Cache-Control"] = bundle.cache_control
    if matches(wanted, bundle.etag):
        return Answer(304, b"", headers)
    headers["Content-Type"] = bundle.content_type or "application/json"
    return Answer(200, bundle.body, headers)


def redirect(status: int) -> UpstreamRedirect:
    return UpstreamRedirect(
        f"the upstream answered {status}, a redirect; the collector never passes one on "
        "(check upstream_url: scheme, host and path)"
    )
