"""One upstream request, and what its answer means: the forwarder's only module that imports
httpx (the server's is `collector/proxy.py`).

Every answer is classified once, here, into what the forwarder must do next:

    Delivered     2xx: the upstream holds the events; acknowledge them
    RetryLater    408, 429, 5xx, any other unexpected answer, a timeout or a connection
                  error: nothing is known to be stored; send again after a delay
                  (honouring `Retry-After`)
    Rejected      400, 413, 422: the upstream refuses something in the batch; split it to
                  find the offending events, which go to the dead-letter store
    KeyRejected   401, 403: the key is wrong for these events; stop and keep everything
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import httpx

BATCH_ID_HEADER = "X-Batch-Id"
# Statuses that blame the batch's content rather than the moment.
REJECTED = frozenset({400, 413, 422})
KEY_REJECTED = frozenset({401, 403})
# How much of an upstream's error body is kept as the reason of a dead letter.
REASON_CHARS = 500


@dataclass(frozen=True)
class Delivered:
    status: int


@dataclass(frozen=True)
class RetryLater:
    reason: str
    retry_after: float | None = None  # seconds the upstream asked us to wait, if it did


@dataclass(frozen=True)
class Rejected:
    status: int
    reason: str


@dataclass(frozen=True)
class KeyRejected:
    status: int
    reason: str


Result = Delivered | RetryLater | Rejected | KeyRejected


class Upstream:
    """POSTs gzip-compressed event batches to `{base_url}/v1/events`."""

    def __init__(self, base_url: str, timeout_s: float, user_agent: str) -> None:
        self.url = base_url.rstrip("/") + "/v1/events"
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            headers={"User-Agent": user_agent},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, gzipped_body: bytes, key: str, batch_id: str) -> Result:
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            BATCH_ID_HEADER: batch_id,
        }
        try:
            response = await self._client.post(self.url, content=gzipped_body, headers=headers)
        except httpx.TimeoutException:
            return RetryLater("upstream timed out")
        except httpx.TransportError as exc:
            return RetryLater(f"upstream unreachable: {exc.__class__.__name__}: {exc}")
        return classify(response.status_code, response.text, response.headers.get("retry-after"))


def classify(status: int, body: str, retry_after: str | None) -> Result:
    if 200 <= status < 300:
        return Delivered(status)
    reason = f"HTTP {status}: {body.strip()[:REASON_CHARS]}"
    if status in REJECTED:
        return Rejected(status, reason)
    if status in KEY_REJECTED:
        return KeyRejected(status, reason)
    return RetryLater(reason, parse_retry_after(retry_after))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` of delay-seconds or an HTTP date; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))
