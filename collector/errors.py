"""Every way a request can fail, as one exception type each.

The types say what went wrong, not which HTTP status it becomes: `app.py` maps them to
statuses in one place (`STATUS_FOR`), so the rules of the events API live in one table.

    CollectorError
    ├── BadRequest            the body is not a usable events envelope, or no event is valid
    ├── Unauthorized          no key, or a key that is certainly unknown, expired or revoked
    ├── Forbidden             a valid key that may not do this (scope, project, environment)
    ├── PayloadTooLarge       the body, after decompression, is over the byte limit
    ├── UnsupportedMediaType  the body is not JSON
    └── Unavailable           the events cannot be made durable now; the client should retry
        ├── QueueFull         the disk budget is reached (or the disk is full)
        ├── QueueBusy         the queue file is locked or failing
        └── KeyStoreUnavailable  the key store cannot be read, so no key can be judged
"""

from __future__ import annotations

from typing import Any

# Seconds a client is told to wait when the queue cannot take events. Short, because the
# usual causes (a lock held by the forwarder, a budget freed by forwarding) clear quickly,
# and SDKs that honour nothing still retry on their own schedule.
DEFAULT_RETRY_AFTER_S = 5


class CollectorError(Exception):
    """Base class: `message` tells the client what to fix; `extra` joins the JSON answer."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(CollectorError):
    pass


class Unauthorized(CollectorError):
    def __init__(self, message: str = "Invalid or expired API key") -> None:
        super().__init__(message)


class Forbidden(CollectorError):
    pass


class PayloadTooLarge(CollectorError):
    pass


class UnsupportedMediaType(CollectorError):
    pass


class Unavailable(CollectorError):
    def __init__(self, message: str, retry_after: int = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    pass


class QueueBusy(Unavailable):
    pass


class KeyStoreUnavailable(Unavailable):
    pass
