"""Admission by bytes: how many request bytes one server process holds at once.

Each events request's body is held while it is read, parsed and waiting for its commit,
and costs a few times its size in memory on the way. Bounding requests by count alone let
48 parallel 9 MB bodies take the server to 1.2 GB. So a request reserves its body's bytes
before the body is read (its `Content-Length`; a gzip or chunked body reserves
`max_body_bytes`, which is what it may grow to) and gives them back once answered; a
request that does not fit is answered 503 with `Retry-After` at once (the SDKs retry), and
never refused for its size alone: one request always fits when nothing else is held.
"""

from __future__ import annotations

from collector.errors import Overloaded

# Seconds a refused client is told to wait: bodies in flight are answered within that.
RETRY_AFTER_S = 1


class ByteBudget:
    """Bytes held by requests in progress, up to `budget` (on the event loop: no lock)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        """Reserve `size` bytes, or raise Overloaded (503) when they do not fit."""
        if self.held and self.held + size > self.budget:
            raise Overloaded(
                f"the server holds {self.held} bytes of requests already (at most "
                f"{self.budget}: max_request_bytes_in_flight); retry later",
                retry_after=RETRY_AFTER_S,
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


def reserved_size(content_length: str | None, encoding: str | None, max_body: int) -> int:
    """What a request reserves: its declared length, unless it is compressed or has none
    (then what it may decompress or grow to)."""
    if encoding and encoding.strip().lower() not in ("", "identity"):
        return max_body
    if content_length is not None and content_length.strip().isdigit():
        return min(int(content_length), max_body)
    return max_body
