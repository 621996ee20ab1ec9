"""Where batches go: the upstream's events API, and what each answer means for them.

`EventsSink.send` posts one gzip-compressed batch to `{upstream_url}/v1/events` through
`collector.upstream` (one deadline for the whole exchange: `forward_timeout_seconds`), with a
batch id that stays the same across its retries, and turns the answer into what the
forwarder must do next:

    Delivered     2xx with the events API's answer (a JSON object with `accepted`): the
                  upstream holds the events, except those its answer names in
                  `validationErrors` (`rejected`: they go to the dead-letter store with the
                  upstream's reason) and those it did not accept without saying which
                  (`unconfirmed`: `accepted` short of the rest); `schemaWarnings` name the
                  events the upstream took with a warning
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
from dataclasses import dataclass, field
from typing import Any

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
    rejected: dict[int, str] = field(default_factory=dict)  # index -> the upstream's reason
    unconfirmed: int = 0  # events not accepted, and not named as rejected either
    warned: dict[int, str] = field(default_factory=dict)  # index -> event name, with a warning


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

    async def send(self, gzipped_body: bytes, events: int, key: str, batch_id: str) -> Result:
        """Post a batch of `events` events; what the answer means for them."""
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
        return result_of(reply.status, reply.text, reply.headers.get("retry-after"), events)


def events_answer(body: str) -> dict[str, Any] | None:
    """`body` read as the events API's answer: a JSON object with a count in `accepted`;
    None when it is not one."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    accepted = answer.get("accepted")
    if not isinstance(accepted, int) or isinstance(accepted, bool):
        return None
    return answer


def result_of(status: int, body: str, retry_after_header: str | None, sent: int) -> Result:
    """What an upstream answer to an events batch of `sent` events means for its events."""
    verdict = classify(status)
    if verdict is Verdict.ACCEPTED:
        answer = events_answer(body)
        if answer is not None:
            return delivered(status, answer, sent)
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


def delivered(status: int, answer: dict[str, Any], sent: int) -> Delivered:
    """What a 2xx events answer says of each of the `sent` events: the ones it names in
    `validationErrors` are rejected (each index once, in range; entries of another shape are
    ignored), those `accepted` leaves unexplained are unconfirmed, and `schemaWarnings`
    name the event of each warned index (the JavaScript SDK's `EventSchemaWarning`)."""
    rejected: dict[int, str] = {}
    for item in _items(answer.get("validationErrors")):
        index = _index(item, sent)
        if index is not None and index not in rejected:
            rejected[index] = redacted(str(item.get("error") or "no reason given"), REASON_CHARS)
    warned: dict[int, str] = {}
    for item in _items(answer.get("schemaWarnings")):
        index = _index(item, sent)
        if index is not None and index not in rejected:
            warned.setdefault(index, str(item.get("event") or ""))
    accepted = min(max(answer["accepted"], 0), sent)
    unconfirmed = max(0, sent - len(rejected) - accepted)
    return Delivered(status, rejected, unconfirmed, warned)


def _items(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _index(item: dict[str, Any], sent: int) -> int | None:
    index = item.get("index")
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < sent:
        return index
    return None


def redacted(body: str, chars: int) -> str:
    """The start of an upstream's answer, at most `chars` of it, with anything shaped like
    a key or a bearer token replaced (an upstream may echo what it was sent)."""
    return SECRET.sub("(redacted)", body.strip()[: chars * 2])[:chars]
