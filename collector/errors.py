"""Every way a request can fail, as one exception type each.

The types say what went wrong, not which HTTP status it becomes: `collector/server/app.py`
maps them to statuses in one place (`STATUS_FOR`), so the rules of the events API live in
one table. The store raises them too (`collector.store.db.translated`), never SQLite's own.

    CollectorError
    ├── BadRequest            the body is not a usable events envelope, or no event is valid
    ├── Unauthorized          no key, or a key that is certainly unknown, expired or revoked
    ├── Forbidden             a valid key that may not do this (scope, project, environment)
    ├── PayloadTooLarge       the body, after decompression, is over the byte limit
    ├── UnsupportedMediaType  the body is not JSON
    ├── RequestTimeout        the client did not send its whole body in time
    ├── RateLimited           the key is over its rate limit; it may retry after `retry_after` s
    ├── Unavailable           the events cannot be made durable now; the client should retry
    │   ├── QueueFull         the disk budget is reached (or the disk is full)
    │   ├── QueueBusy         the queue file is locked or failing
    │   └── KeyStoreUnavailable  the key store cannot be read, so no key can be judged
    └── UpstreamFailed        a config/resolve/decide call passed upstream got no usable answer
        ├── UpstreamNotConfigured  no `upstream_url`, so there is nowhere to pass it
        ├── UpstreamUnreachable    connection refused, reset or cut, or a name not resolved
        ├── UpstreamTimeout        no whole answer within the call's timeout
        └── UpstreamRedirect       the upstream answered 3xx, which is never passed on

Three more stop a command or a process rather than answer a request (the CLI prints them as
one line and exits non-zero):

    ConfigFileError   the settings file is missing or not TOML, or a secret file unreadable
    AlreadyRunning    another forwarder holds the data directory's lock
    SalvageFailed     a corrupt file's rows could not be read back (no sqlite3 tool, or it
                      read nothing); a CollectorError, for its `message`, never answered
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


class RequestTimeout(CollectorError):
    pass


class RateLimited(CollectorError):
    """Over the key's rate limit; `retry_after` (whole seconds) joins the answer as the
    Retry-After header, through `extra`, which the error answer turns into that header."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


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


class Overloaded(Unavailable):
    """The server holds as many request bytes as it may (max_request_bytes_in_flight)."""


# Seconds a client is told to wait after an upstream failure on a proxied call.
UPSTREAM_RETRY_AFTER_S = 5
# ... and when no upstream is configured: that needs a person, not a quick retry.
NOT_CONFIGURED_RETRY_AFTER_S = 60


class UpstreamFailed(CollectorError):
    """A call passed to the upstream (config, resolve, decide) got no usable answer."""

    def __init__(self, message: str, retry_after: int = UPSTREAM_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamNotConfigured(UpstreamFailed):
    def __init__(
        self,
        message: str = "no upstream is configured (upstream_url), so config, resolve and "
        "decide calls cannot be served",
    ) -> None:
        super().__init__(message, NOT_CONFIGURED_RETRY_AFTER_S)


class UpstreamUnreachable(UpstreamFailed):
    pass


class UpstreamTimeout(UpstreamFailed):
    pass


class UpstreamRedirect(UpstreamFailed):
    pass


class UpstreamAnswerTooLarge(UpstreamFailed):
    pass


class ConfigFileError(Exception):
    """The TOML file named by `--config` is missing or is not valid TOML, or a secret file
    it names cannot be read."""


class AlreadyRunning(Exception):
    """Another forwarder holds this data directory's lock."""


class SalvageFailed(CollectorError):
    """The rows of a corrupt file could not be read back (`collector.store.salvage`): the
    sqlite3 tool is missing, failed or read nothing. `message` says which, and that the
    file is kept, unchanged, where it is."""
