"""Where batches go: the upstream's events API, and what each answer means for them.

`EventsSink.send` posts one gzip-compressed batch to `{upstream_url}/v1/events` through
`collector.upstream` (one deadline for the whole exchange: `forward_timeout_seconds`), with a
batch id that stays the same across its retries, and turns the answer into what the
forwarder must do next:

    Delivered     2xx with the events API's answer (a JSON object with `accepted`): the
                  upstream holds the events; settle them
    RetryLater    408, 429, 5xx, a redirect, a 2xx with any other body (a proxy's or a
                  captive portal's HTML page: the API never saw the events), any other
                  unexpected answer, a timeout or a connection error: nothing is known to
                  be stored; send again after a delay (honouring `Retry-After`)
    Rejected      400, 413, 422: the upstream refuses something in the batch; split it to
                  find the offending events, which go to the dead-letter store
    KeyRejected   401, 403: the key is wrong for these events; stop and keep everything
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from collector.errors import UpstreamFailed
from collector.store.counts import UpstreamOutcome
from collector.upstream import Upstream, Verdict, classify, retry_after

BATCH_ID_HEADER = "X-Batch-Id"
# Bytes of an answer read at most: the events API's is its counts and at most one
# validation error per event (1000), far below this; an error body is kept in its first
# REASON_CHARS.
MAX_ANSWER_BYTES = 1024 * 1024
EVENTS_PATH = "/v1/events"
# How much of an upstream's error body is kept in a reason: as a dead letter's (which
# stays in the data directory), and in the state and the log (which status and journals
# show: an error body can quote the batch, so they get less).
REASON_CHARS = 500
SHOWN_CHARS = 200
# What looks like a secret in an upstream's answer (it may echo the request's headers):
# an API key, or a bearer token.
SECRET = re.compile(r"traffical_(?:sk|pk)_[A-Za-z0-9_-]+|(?i:bearer)\s+[^\s\"',;]+")
# How much of a 2xx page that is not the API's answer is shown (enough to recognise it).
PAGE_CHARS = 120


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

# Each result as counted in `upstream_requests`.
OUTCOME = {
    Delivered: UpstreamOutcome.DELIVERED,
    RetryLater: UpstreamOutcome.RETRY,
    Rejected: UpstreamOutcome.REJECTED,
    KeyRejected: UpstreamOutcome.KEY_REJECTED,
}


class EventsSink:
    """POSTs gzip-compressed event batches to the upstream's events API."""

    def __init__(self, upstream_url: str, *, deadline_s: float, connections: int) -> None:
        self._upstream = Upstream(upstream_url, max_connections=connections)
        self._deadline_s = deadline_s
        self.url = self._upstream.url(EVENTS_PATH)

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def send(self, gzipped_body: bytes, key: str, batch_id: str) -> Result:
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            BATCH_ID_HEADER: batch_id,
        }
        try:
            reply = await self._upstream.exchange(
                "POST",
                EVENTS_PATH,
                headers=headers,
                body=gzipped_body,
                deadline_s=self._deadline_s,
                max_body_bytes=MAX_ANSWER_BYTES,
                cut=True,  # what it says is in the start; a 2xx cut short is no answer
            )
        except UpstreamFailed as exc:
            return RetryLater(exc.message)
        return result_of(reply.status, reply.text, reply.headers.get("retry-after"))


def is_events_answer(body: str) -> bool:
    """Whether `body` is what the events API answers: a JSON object with a count in
    `accepted`."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    accepted = answer.get("accepted") if isinstance(answer, dict) else None
    return isinstance(accepted, int) and not isinstance(accepted, bool)


def result_of(status: int, body: str, retry_after_header: str | None) -> Result:
    """What an upstream answer to an events batch means for its events."""
    verdict = classify(status)
    if verdict is Verdict.ACCEPTED:
        if is_events_answer(body):
            return Delivered(status)
        return RetryLater(
            f"HTTP {status} without the events API's answer (is upstream_url the API, not a "
            f"proxy's or portal's page?): {redacted(body, PAGE_CHARS)!r}"
        )
    if verdict is Verdict.CONTENT_REFUSED:
        return Rejected(status, f"HTTP {status}: {redacted(body, REASON_CHARS)}")
    shown = f"HTTP {status}: {redacted(body, SHOWN_CHARS)}"
    if verdict is Verdict.KEY_REFUSED:
        return KeyRejected(status, shown)
    return RetryLater(shown, retry_after(retry_after_header))


def redacted(body: str, chars: int) -> str:
    """The start of an upstream's answer, at most `chars` of it, with anything shaped like
    a key or a bearer token replaced (an upstream may echo what it was sent)."""
    return SECRET.sub("(redacted)", body.strip()[: chars * 2])[:chars]
