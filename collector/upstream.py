"""The upstream: the one module that talks HTTP to it, and the only importer of httpx.

Both processes reach the upstream (`upstream_url`: the Traffical cloud, or another
collector) through `Upstream`: the forwarder posts event batches (`forwarder/sink.py`), the
server passes SDK calls on (`collector.server.proxy`). Here is, once for both:

- the client: redirects never followed (SDKs do not follow them, and a 3xx from the upstream
  means `upstream_url` is wrong), our user agent unless the caller passes the client's;
- the timeout policy: `exchange` has one deadline for the whole exchange, connecting,
  sending and reading the whole answer included. httpx's own timeouts apply per phase and
  per read, so an upstream trickling a byte every few seconds would never trip them;
- the size policy: an answer is read up to a bound the caller gives, never whole (a 1 GiB
  error body once took the forwarder to 5 GB to keep 500 characters of it); past it, the
  answer is cut (`truncated`) or refused (`UpstreamAnswerTooLarge`), as the caller asks;
- what failed: no answer at all is `UpstreamUnreachable` or `UpstreamTimeout`
  (`collector.errors`); an answer is a `Reply`, and `classify` says what its status means;
- `Retry-After`, as seconds (`retry_after`).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import httpx

from collector.errors import UpstreamAnswerTooLarge, UpstreamTimeout, UpstreamUnreachable

USER_AGENT = "traffical-collector"


class Verdict(Enum):
    """What an upstream answer's status says, before the caller decides what to do."""

    ACCEPTED = "accepted"  # 2xx
    REDIRECT = "redirect"  # 3xx (304 included; the config proxy looks at it first)
    KEY_REFUSED = "key_refused"  # 401, 403: the key is wrong for this request
    CONTENT_REFUSED = "content_refused"  # 400, 413, 422: something in the request is refused
    TRANSIENT = "transient"  # 408, 429, 5xx: the moment is to blame; try again later
    OTHER = "other"  # any other status (another 4xx, a 1xx)


KEY_REFUSED = frozenset({401, 403})
CONTENT_REFUSED = frozenset({400, 413, 422})
TRANSIENT = frozenset({408, 429})


def classify(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.ACCEPTED
    if 300 <= status < 400:
        return Verdict.REDIRECT
    if status in KEY_REFUSED:
        return Verdict.KEY_REFUSED
    if status in CONTENT_REFUSED:
        return Verdict.CONTENT_REFUSED
    if status >= 500 or status in TRANSIENT:
        return Verdict.TRANSIENT
    return Verdict.OTHER


@dataclass(frozen=True)
class Reply:
    """A whole answer from the upstream; header names lower-case, repeats joined by ", "."""

    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool = False  # the answer went on past the bound; `body` is its start

    @property
    def verdict(self) -> Verdict:
        return classify(self.status)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class Upstream:
    """A connection pool to `base_url`, shared by every call of one process."""

    def __init__(self, base_url: str, *, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def url(self, path: str) -> str:
        return self.base_url + path

    async def aclose(self) -> None:
        await self._client.aclose()

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        deadline_s: float,
        max_body_bytes: int,
        cut: bool = False,
    ) -> Reply:
        """Send one request to `base_url + path` and read its answer, all within
        `deadline_s` seconds, and at most `max_body_bytes` of its body (decompressed): past
        that, with `cut` the reply holds the start (`truncated`), else it is refused.
        Raises UpstreamTimeout, UpstreamUnreachable or UpstreamAnswerTooLarge."""
        try:
            async with (
                asyncio.timeout(deadline_s),
                self._client.stream(
                    method, self.url(path), headers=headers, content=body, timeout=deadline_s
                ) as response,
            ):
                read, truncated = await _read_at_most(response, max_body_bytes)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UpstreamTimeout(
                f"upstream timed out: it did not answer within {deadline_s:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(
                f"upstream unreachable: {exc.__class__.__name__}: {exc}"
            ) from exc
        if truncated and not cut:
            raise UpstreamAnswerTooLarge(
                f"the upstream's answer is larger than {max_body_bytes} bytes"
            )
        headers_read = {name.lower(): value for name, value in response.headers.items()}
        return Reply(response.status_code, headers_read, read, truncated)


async def _read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body of `response` up to `limit` bytes, and whether there was more (left
    unread: the connection is closed rather than drained)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` of delay-seconds or an HTTP date; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", a digit to str.isdigit alone
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))
