"""Config, resolve and decide calls passed to the upstream, served from the cache when it fails.

An SDK has one base URL for everything, so once it points at the collector it also asks it
for its config bundle (`GET /v1/config/{projectId}?env=`) and, in server evaluation mode,
for decisions (`POST /v1/resolve`, `POST /v1/decide/...`). The collector passes each call to
`{upstream_url}` with the client's own headers (its key, `If-None-Match`, `X-Org-Id`, ...),
and the upstream's answer back: status, body, `ETag`, `Cache-Control`, `Content-Type`. The
upstream judges the key; the collector holds no opinion on it.

The exchange itself is `collector.upstream`'s: redirects are never followed nor passed on
(SDKs do not follow them), so a 3xx from the upstream becomes a 502; each call has one
deadline for the whole exchange, connection included (`proxy_config_timeout_seconds`,
`proxy_decide_timeout_seconds`).

The config cache (`collector.store.configcache`) keeps the last 200 bundle per project,
query (`env=`) and key (its SHA-256), with its ETag. When the upstream is unreachable,
times out, redirects or answers 408, 429 or 5xx, the last good bundle is served to the same
key (`X-Collector-Stale: true`, `Age`, `Warning`), or a 304 if the client already holds it,
so SDKs keep starting and polling through an outage and across restarts. A bundle is served
only to the key the upstream gave it to, and only while the upstream accepted that key
within `config_cache_max_stale_seconds`; a 401 from the upstream forgets every bundle of
that key, a 403 the one asked for.

`If-None-Match` is passed on when the cache holds the bundle it names (the upstream's 304
then also confirms the cached copy); otherwise it is left out, so the upstream sends the
whole bundle, which is cached, and the collector answers the client 304 itself when that is
the version it already has.

Every call is counted as `proxy_requests` by `ProxyRoute` and `ProxyOutcome`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode

from collector.errors import (
    Unavailable,
    UpstreamFailed,
    UpstreamNotConfigured,
    UpstreamRedirect,
)
from collector.ops.metrics import PROXY_BUCKETS
from collector.server.auth import bearer, digest
from collector.settings import Settings
from collector.store.configcache import Bundle, ConfigCache, Slot
from collector.store.counts import Count, Counts, ProxyOutcome, ProxyRoute, bucket
from collector.store.datadir import DataDir
from collector.upstream import Reply, Upstream, Verdict

log = logging.getLogger("collector.proxy")
T = TypeVar("T")

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
# 401 forgets every bundle of the key; 403 (the key may not read this project) only one.
KEY_REFUSED = 401
# At most this many connections to the upstream at once (decide calls can be many).
MAX_CONNECTIONS = 200


@dataclass(frozen=True)
class Answer:
    """What the collector answers the client: passed through, or from the cache."""

    status: int
    body: bytes
    headers: dict[str, str]


def key_hash(authorization: str | None) -> str | None:
    """SHA-256 of the Bearer token, or None when there is none (such calls are not cached)."""
    token = bearer(authorization)
    return digest(token) if token is not None else None


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


class Proxy:
    """Passes SDK calls to the upstream; serves config bundles from the cache when it fails."""

    def __init__(self, settings: Settings, counts: Counts) -> None:
        self.upstream = (
            Upstream(settings.upstream_url, max_connections=MAX_CONNECTIONS)
            if settings.upstream_url
            else None
        )
        self.config_timeout_s = settings.proxy_config_timeout_seconds
        self.decide_timeout_s = settings.proxy_decide_timeout_seconds
        self.max_answer_bytes = settings.proxy_max_answer_bytes
        self.cache = ConfigCache(
            DataDir(settings.data_dir),
            settings.config_cache_max_entries,
            settings.config_cache_max_bytes,
            settings.config_cache_max_stale_seconds,
        )
        self._counts = counts

    async def aclose(self) -> None:
        if self.upstream is not None:
            await self.upstream.aclose()
        self.cache.close()

    # --- the routes ---------------------------------------------------------------------

    async def config(self, project: str, query: str, headers: Mapping[str, str]) -> Answer:
        """`GET /v1/config/{project}?{query}`."""
        return await self._counted(ProxyRoute.CONFIG, self._config(project, query, headers))

    async def call(
        self, route: ProxyRoute, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> Answer:
        """`POST` `path` (resolve or decide) with `body`, passed through."""
        return await self._counted(route, self._call(path, query, headers, body))

    # --- config -------------------------------------------------------------------------

    async def _config(
        self, project: str, query: str, headers: Mapping[str, str]
    ) -> tuple[Answer, ProxyOutcome]:
        upstream = self._upstream()
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
        path = f"/v1/config/{segment(project)}" + (f"?{query}" if query else "")

        try:
            reply = await upstream.exchange(
                "GET",
                path,
                headers=sent,
                body=None,
                deadline_s=self.config_timeout_s,
                max_body_bytes=self.max_answer_bytes,
            )
        except UpstreamFailed as failure:
            return self._stale_or_raise(cached, wanted, failure)
        status, verdict = reply.status, reply.verdict

        if status == 304:
            etag = reply.headers.get("etag") or sent.get("if-none-match")
            if slot is not None and cached is not None and etag:
                await self._cached(self.cache.verified, slot, etag)
            return passed(reply), ProxyOutcome.NOT_MODIFIED
        if status == 200:
            etag = reply.headers.get("etag")
            if slot is not None and self.cache.enabled:
                bundle = Bundle(
                    etag,
                    reply.headers.get("content-type"),
                    reply.headers.get("cache-control"),
                    reply.body,
                    time.time(),
                )
                await self._cached(self.cache.put, slot, bundle)
            if matches(wanted, etag):
                return not_modified(reply.headers), ProxyOutcome.NOT_MODIFIED
            return passed(reply), ProxyOutcome.OK
        if verdict is Verdict.ACCEPTED:
            return passed(reply), ProxyOutcome.OK
        if verdict is Verdict.KEY_REFUSED:
            if hashed is not None:
                if status == KEY_REFUSED:
                    await self._cached(self.cache.forget_key, hashed)
                elif slot is not None:
                    await self._cached(self.cache.forget, slot)
            return passed(reply), ProxyOutcome.REJECTED
        if verdict is Verdict.REDIRECT:
            return self._stale_or_raise(cached, wanted, redirect(status))
        if verdict is Verdict.TRANSIENT:
            if cached is not None:
                return stale(cached, wanted), ProxyOutcome.STALE
            return passed(reply), ProxyOutcome.UPSTREAM_ERROR
        return passed(reply), ProxyOutcome.REJECTED

    def _stale_or_raise(
        self, cached: Bundle | None, wanted: set[str], failure: UpstreamFailed
    ) -> tuple[Answer, ProxyOutcome]:
        if cached is None:
            raise failure
        log.debug("config served from the cache: %s", failure.message)
        return stale(cached, wanted), ProxyOutcome.STALE

    # --- resolve and decide -------------------------------------------------------------

    async def _call(
        self, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Answer, ProxyOutcome]:
        reply = await self._upstream().exchange(
            "POST",
            path + (f"?{query}" if query else ""),
            headers=forwarded(headers),
            body=body,
            deadline_s=self.decide_timeout_s,
            max_body_bytes=self.max_answer_bytes,
        )
        verdict = reply.verdict
        if verdict is Verdict.REDIRECT:
            raise redirect(reply.status)
        if verdict is Verdict.ACCEPTED:
            outcome = ProxyOutcome.OK
        elif verdict is Verdict.TRANSIENT:
            outcome = ProxyOutcome.UPSTREAM_ERROR
        else:
            outcome = ProxyOutcome.REJECTED
        return passed(reply), outcome

    # --- plumbing -----------------------------------------------------------------------

    async def _cached(self, method: Callable[..., T], *args: object) -> T | None:
        """A cache call off the event loop; a failing cache is logged and treated as empty."""
        try:
            return await asyncio.to_thread(method, *args)
        except Unavailable as exc:
            log.warning("config cache %s failed: %s", self.cache.path, exc.message)
            return None

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise UpstreamNotConfigured()
        return self.upstream

    async def _counted(
        self, route: ProxyRoute, work: Awaitable[tuple[Answer, ProxyOutcome]]
    ) -> Answer:
        started = time.perf_counter()
        try:
            answer, outcome = await work
        except UpstreamFailed:
            self._count(route, ProxyOutcome.UPSTREAM_ERROR, started)
            raise
        self._count(route, outcome, started)
        return answer

    def _count(self, route: ProxyRoute, outcome: ProxyOutcome, started: float) -> None:
        seconds = time.perf_counter() - started
        self._counts.add(Count.PROXY_REQUESTS, (route, outcome))
        self._counts.add(Count.PROXY_DURATION, (route, bucket(PROXY_BUCKETS, seconds)))
        self._counts.add(Count.PROXY_DURATION_SUM, (route,), seconds)


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


def returned(
    headers: Mapping[str, str], names: tuple[str, ...] = RETURNED_HEADERS
) -> dict[str, str]:
    """Those of the upstream's headers (names lower-case) passed back, in their usual spelling."""
    return {name: headers[name.lower()] for name in names if name.lower() in headers}


def passed(reply: Reply) -> Answer:
    body = b"" if reply.status == 304 else reply.body
    return Answer(reply.status, body, returned(reply.headers))


def not_modified(headers: Mapping[str, str]) -> Answer:
    return Answer(304, b"", returned(headers, ("ETag", "Cache-Control")))


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
