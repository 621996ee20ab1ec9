"""A controllable stand-in for the central events API, for the forwarder's integration tests.

`Upstream` is a stdlib `ThreadingHTTPServer` on 127.0.0.1 (a free port), served from a
background thread of the test process. It records every request it gets and can be told at
any time to fail, reject some events or keys, answer slowly, refuse large bodies, cut the
connection, or stop listening (`down()`) and listen again on the same port (`up()`), so
forwarder tests drive real HTTP with nothing mocked. Waiting is done on a condition variable
(`wait_for_events`, `wait_for_requests`), never by sleeping blindly.

Like the real API it checks the envelope (JSON content type, gzip, strict JSON without
`NaN`, 1..max_events events), so a forwarder bug shows up as a 4xx in `requests`.

It also serves the other routes an SDK calls through its base URL, for the collector's
proxy tests: `GET /v1/config/{projectId}?env=` answers the bundle set with `set_bundle`
(200 with an `ETag`, or 304 when `If-None-Match` names it; 404 when none is set),
`POST /v1/resolve` and `POST /v1/decide/...` answer what `answer_with` set (by default an
echo: `{"path", "received"}`). Keys (`accept_keys`, `require_keys`: 403 for a config or
resolve call outside a key's scope), `fail`, `drop`, `slow` and `redirect` apply to these
routes too, and every request is recorded with its method, query string, headers and body.
This is a support module: pytest collects no tests from it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import parse_qs, unquote, urlsplit

Json = dict[str, Any]
Scope = tuple[str, str]  # (projectId, env)

HOST: Final = "127.0.0.1"
EVENTS_PATHS: Final = frozenset({"/v1/events", "/v1/events/batch"})
CONFIG_PREFIX: Final = "/v1/config/"
DECIDE_PREFIX: Final = "/v1/decide/"
RESOLVE_PATH: Final = "/v1/resolve"
CONFIG_CACHE_CONTROL: Final = "private, max-age=60"
DROPPED: Final = 0  # `Received.status` of a request whose connection was closed unanswered
DEFAULT_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.01  # serve_forever's shutdown poll: down() takes about this long
_JOIN_S: Final = 2.0
_REBIND_S: Final = 2.0


@dataclass(frozen=True)
class Received:
    """One request as the upstream saw and answered it.

    `events` is what the body held ([] if it could not be read), whatever the answer;
    `status` is `DROPPED` (0) when the connection was closed unanswered; `headers` names
    are lower-case.
    """

    batch_id: str | None
    key: str | None
    events: list[Json]
    status: int
    headers: dict[str, str]
    path: str = "/v1/events"
    method: str = "POST"
    query: str = ""
    body: bytes = b""

    page: bool = False  # answered with an HTML page: the API never saw the events

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300 and not self.page


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Json | None  # None: close the connection without answering
    headers: dict[str, str] = field(default_factory=dict)
    page: bytes | None = None  # sent as text/html instead of `body` (a proxy's page)


_DROP: Final = _Answer(DROPPED, None)


@dataclass
class _Failure:
    status: int
    retry_after: str | None
    remaining: int | None  # None: until changed
    page: bytes | None = None
    message: str = "failure injected by the test upstream"


@dataclass
class _Settings:
    failure: _Failure | None = None
    reject: frozenset[str] = frozenset()
    reject_status: int = 400
    drop_ids: frozenset[str] = frozenset()  # dropped inside a 200 (schema `reject` mode)
    name_dropped: bool = True  # ... naming them in validationErrors, or only counting
    warn_names: frozenset[str] = frozenset()  # event names answered with a schema warning
    keys: dict[str, frozenset[Scope] | None] | None = None  # None: any key; scope None: any
    delay_s: float = 0.0
    max_body: int | None = None
    redirect: tuple[int, str] | None = None  # (status, Location) answered to every request


@dataclass(frozen=True)
class _Parsed:
    size: int  # body bytes after decompression (raw bytes if it could not be decompressed)
    events: list[Json]
    error: _Answer | None
    body: bytes = b""  # after decompression, as received (for byte-for-byte checks)


class Upstream:
    """The fake upstream; every method is safe to call from any thread at any time."""

    def __init__(self, *, max_events: int = 1000) -> None:
        self.max_events = max_events
        self._cond = threading.Condition(threading.RLock())
        self._settings = _Settings()
        self._requests: list[Received] = []
        self._events: list[Json] = []
        self._in_flight = 0
        self._life = threading.Lock()  # serialises start/stop/down/up
        self._server: _Server | None = None
        self._port: int | None = None
        self._bundles: dict[Scope, tuple[Json, str]] = {}  # (project, env) -> (bundle, ETag)
        self._answers: dict[str, _Answer] = {}  # resolve/decide path -> answer
        self._extra: dict[str, Any] = {}  # method, query, body of the request being recorded

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1."""
        with self._life:
            if self._port is not None:
                raise RuntimeError("Upstream already started")
            self._listen(0)
        return self

    def stop(self) -> None:
        """Stop listening, cut open connections and join every thread (idempotent)."""
        self.down()

    def down(self) -> None:
        """Close the socket: new connections are refused, open ones are cut unanswered."""
        with self._life:
            if self._server is not None:
                self._server.close()
                self._server = None

    def up(self) -> None:
        """Listen again on the same port (after `down()`)."""
        with self._life:
            if self._port is None:
                raise RuntimeError("Upstream was never started")
            if self._server is None:
                self._listen(self._port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("Upstream not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:PORT` (stable across `down()`/`up()`)."""
        return f"http://{HOST}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def _listen(self, port: int) -> None:
        deadline = time.monotonic() + _REBIND_S
        while True:
            try:
                server = _Server(port, self)
                break
            except OSError:
                if port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(_POLL_S)  # the port is briefly held elsewhere: try again
        self._port = server.server_address[1]
        self._server = server
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_S},
            name=f"upstream-{self._port}",
            daemon=True,
        )
        server.serve_thread = thread
        thread.start()

    # -- behaviour ------------------------------------------------------------------------

    def ok(self) -> None:
        """Answer normally again: clears fail/drop, reject_ids, slow and too_large_over.

        Keys set by `accept_keys`/`require_keys` stay; `reset()` clears those too.
        """
        with self._cond:
            self._settings = _Settings(keys=self._settings.keys)

    def reset(self) -> None:
        """Back to the defaults: answer 200 to any key."""
        with self._cond:
            self._settings = _Settings()

    def fail(
        self,
        status: int,
        retry_after: int | str | None = None,
        times: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer `status` (with `Retry-After` if given, and `message` in the error body) to
        the next `times` requests, or all."""
        header = None if retry_after is None else str(retry_after)
        with self._cond:
            self._settings.failure = _Failure(status, header, times)
            if message is not None:
                self._settings.failure.message = message

    def answer_page(self, page: bytes, status: int = 200, times: int | None = None) -> None:
        """Answer the next `times` events requests (or all) with an HTML `page`, as a proxy
        or captive portal would: the API never sees their events."""
        with self._cond:
            self._settings.failure = _Failure(status, None, times, page)

    def drop(self, times: int | None = None) -> None:
        """Read the next `times` requests (or all) and close the connection unanswered."""
        self.fail(DROPPED, times=times)

    def reject_ids(self, ids: Iterable[str], status: int = 400) -> None:
        """Answer `status` to any batch holding one of `ids`; empty `ids` stops rejecting."""
        with self._cond:
            self._settings.reject = frozenset(ids)
            self._settings.reject_status = status

    def drop_in_200(self, ids: Iterable[str], *, named: bool = True) -> None:
        """Answer 200 to batches holding any of `ids` but keep only the other events, as
        the Traffical API's schema enforcement in `reject` mode does: with `named`, each
        dropped one is listed in `validationErrors` by index; else `accepted` is merely
        lower than the batch (an upstream that does not say which)."""
        with self._cond:
            self._settings.drop_ids = frozenset(ids)
            self._settings.name_dropped = named

    def warn_schema(self, names: Iterable[str]) -> None:
        """Accept track events named one of `names`, with a `schemaWarnings` entry each."""
        with self._cond:
            self._settings.warn_names = frozenset(names)

    def accept_keys(self, keys: Iterable[str] | None) -> None:
        """Answer 401 unless the Bearer key is one of `keys` (None: any key, the default)."""
        with self._cond:
            self._settings.keys = None if keys is None else dict.fromkeys(keys)

    def require_keys(self, keys: Mapping[Scope, str] | None) -> None:
        """`{(projectId, env): key}`: 401 for other keys, 403 for events outside a key's scope."""
        scopes: dict[str, set[Scope]] = {}
        for scope, key in (keys or {}).items():
            scopes.setdefault(key, set()).add(scope)
        with self._cond:
            self._settings.keys = (
                None if keys is None else {k: frozenset(s) for k, s in scopes.items()}
            )

    def slow(self, seconds: float) -> None:
        """Wait `seconds` before answering each request (0: no wait); other requests go on."""
        with self._cond:
            self._settings.delay_s = seconds

    def redirect(self, location: str, status: int = 307) -> None:
        """Answer every request with `status` and `Location: location` (until `ok()`)."""
        with self._cond:
            self._settings.redirect = (status, location)

    def set_bundle(self, project: str, env: str, bundle: Json, etag: str | None = None) -> str:
        """Serve `bundle` at `/v1/config/{project}?env={env}`; returns its (quoted) ETag."""
        if etag is None:
            digest = hashlib.sha256(json.dumps(bundle, sort_keys=True).encode()).hexdigest()
            etag = f'"{digest[:16]}"'
        with self._cond:
            self._bundles[(project, env)] = (bundle, etag)
        return etag

    def remove_bundle(self, project: str, env: str) -> None:
        with self._cond:
            self._bundles.pop((project, env), None)

    def answer_with(
        self, path: str, body: Json, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        """Answer POSTs to `path` (`/v1/resolve`, `/v1/decide/...`) with `status` and `body`."""
        with self._cond:
            self._answers[path] = _Answer(status, body, dict(headers or {}))

    def sdk_requests(self, prefix: str = "/v1/") -> list[Received]:
        """The recorded requests to config, resolve and decide routes under `prefix`."""
        return [
            r for r in self.requests if r.path.startswith(prefix) and r.path not in EVENTS_PATHS
        ]

    def too_large_over(self, n_bytes: int | None) -> None:
        """Answer 413 when the decompressed body is over `n_bytes` (None: no limit)."""
        with self._cond:
            self._settings.max_body = n_bytes

    # -- records --------------------------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """Every request, answered or not, in the order they were decided."""
        with self._cond:
            return list(self._requests)

    @property
    def events(self) -> list[Json]:
        """Every event of the requests answered 2xx, in order (a resent batch appears twice)."""
        with self._cond:
            return list(self._events)

    @property
    def in_flight(self) -> int:
        """Requests read but not yet answered (e.g. held by `slow()`)."""
        with self._cond:
            return self._in_flight

    def accepted(self) -> list[Received]:
        return [request for request in self.requests if request.accepted]

    def event_ids(self) -> list[str | None]:
        return [event.get("id") for event in self.events]

    def clear(self) -> None:
        """Forget recorded requests and events (the behaviour settings stay)."""
        with self._cond:
            self._requests.clear()
            self._events.clear()

    def summary(self) -> str:
        with self._cond:
            statuses = Counter(request.status for request in self._requests)
            last = [(r.status, r.batch_id, len(r.events)) for r in self._requests[-10:]]
            return (
                f"{len(self._requests)} requests {dict(statuses)}, "
                f"{len(self._events)} accepted events; last (status, batch, events): {last}; "
                f"up={self.is_up} settings={self._settings}"
            )

    # -- waiting --------------------------------------------------------------------------

    def wait_for_events(self, n: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[Json]:
        """Return the accepted events once there are at least `n`."""
        self.wait_until(lambda up: len(up._events) >= n, timeout, f"{n} accepted events")
        return self.events

    def wait_for_requests(self, n: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[Received]:
        """Return the recorded requests once there are at least `n`."""
        self.wait_until(lambda up: len(up._requests) >= n, timeout, f"{n} requests")
        return self.requests

    def wait_until(
        self,
        predicate: Callable[[Upstream], bool],
        timeout: float = DEFAULT_TIMEOUT_S,
        what: str = "condition",
    ) -> None:
        """Block until `predicate(self)` holds (checked after each request); else fail."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}: {self.summary()}"
                )

    # -- serving (called from handler threads) --------------------------------------------

    def _handle(
        self, path: str, headers: dict[str, str], raw: bytes, closing: threading.Event
    ) -> _Answer:
        parsed = _parse(headers, raw, self.max_events)
        with self._cond:
            delay = self._settings.delay_s
            self._in_flight += 1
            self._cond.notify_all()
        interrupted = closing.wait(delay)  # down() wakes a slow request at once
        with self._cond:
            self._in_flight -= 1
            answer = _DROP if interrupted else self._decide(path, headers, parsed)
            self._extra = {"body": parsed.body}
            self._record(path, headers, parsed.events, answer.status, page=answer.page is not None)
            return answer

    def _decide(self, path: str, headers: Mapping[str, str], parsed: _Parsed) -> _Answer:
        settings, key = self._settings, _bearer(headers)
        return (
            self._take_failure()
            or _route_check(path)
            or _key_check(settings.keys, key)
            or _size_check(settings.max_body, parsed.size)
            or parsed.error
            or _scope_check(settings.keys, key, parsed.events)
            or _reject_check(settings.reject, settings.reject_status, parsed.events)
            or _accepted(settings, parsed)
        )

    def _handle_sdk(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
        closing: threading.Event,
    ) -> _Answer:
        """A config, resolve or decide call (any path not an events path)."""
        with self._cond:
            delay = self._settings.delay_s
            self._in_flight += 1
            self._cond.notify_all()
        interrupted = closing.wait(delay)
        with self._cond:
            self._in_flight -= 1
            answer = _DROP if interrupted else self._decide_sdk(method, path, query, headers, raw)
            self._extra = {"method": method, "query": query, "body": raw}
            self._record(path, headers, [], answer.status)
            return answer

    def _decide_sdk(
        self, method: str, path: str, query: str, headers: Mapping[str, str], raw: bytes
    ) -> _Answer:
        settings, key = self._settings, _bearer(headers)
        early = self._take_failure() or _redirect_answer(settings.redirect)
        if early is not None:
            return early
        if method == "GET" and path.startswith(CONFIG_PREFIX):
            project = unquote(path[len(CONFIG_PREFIX) :])
            env = parse_qs(query).get("env", [""])[0]
            return (
                _key_check(settings.keys, key)
                or _target_check(settings.keys, key, (project, env))
                or self._bundle_answer(project, env, headers.get("if-none-match"))
            )
        if method == "POST" and (path == RESOLVE_PATH or path.startswith(DECIDE_PREFIX)):
            target = (headers.get("x-project-id"), headers.get("x-env"))
            checked = _key_check(settings.keys, key)
            if checked is None and path == RESOLVE_PATH and None not in target:
                checked = _target_check(settings.keys, key, cast(Scope, target))
            return checked or self._answers.get(path) or _echo(path, raw)
        return _error(404, f"no route {method} {path}")

    def _bundle_answer(self, project: str, env: str, if_none_match: str | None) -> _Answer:
        found = self._bundles.get((project, env))
        if found is None:
            return _error(404, f"no config for project {project!r} in env {env!r}")
        bundle, etag = found
        headers = {"ETag": etag, "Cache-Control": CONFIG_CACHE_CONTROL}
        tags = {tag.strip() for tag in (if_none_match or "").split(",")}
        if etag in tags or "*" in tags:
            return _Answer(304, {}, headers)
        return _Answer(200, bundle, headers)

    def _take_failure(self) -> _Answer | None:
        failure = self._settings.failure
        if failure is None:
            return None
        if failure.remaining is not None:
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._settings.failure = None
            if failure.remaining < 0:
                return None
        if failure.status == DROPPED:
            return _DROP
        if failure.page is not None:
            return _Answer(failure.status, {}, page=failure.page)
        extra = {} if failure.retry_after is None else {"Retry-After": failure.retry_after}
        return _error(failure.status, failure.message, extra)

    def _record(
        self,
        path: str,
        headers: dict[str, str],
        events: list[Json],
        status: int,
        page: bool = False,
    ) -> None:
        extra, self._extra = self._extra, {}
        received = Received(
            headers.get("x-batch-id"),
            _bearer(headers),
            events,
            status,
            headers,
            path,
            page=page,
            **extra,
        )
        self._requests.append(received)
        if received.accepted:
            self._events.extend(events)
        self._cond.notify_all()


# -- request checks (pure) -------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> _Answer:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return _Answer(status, {"error": phrase, "message": message}, headers or {})


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _route_check(path: str) -> _Answer | None:
    return None if path in EVENTS_PATHS else _error(404, f"no route {path}")


def _key_check(keys: Mapping[str, object] | None, key: str | None) -> _Answer | None:
    if keys is None or (key is not None and key in keys):
        return None
    return _error(401, "Invalid or expired API key")


def _target_check(
    keys: Mapping[str, frozenset[Scope] | None] | None, key: str | None, target: Scope
) -> _Answer | None:
    scope = None if keys is None or key is None else keys.get(key)
    if scope is None or target in scope:
        return None
    return _error(403, "key is restricted to another project or environment")


def _redirect_answer(redirect: tuple[int, str] | None) -> _Answer | None:
    if redirect is None:
        return None
    status, location = redirect
    return _Answer(status, {"moved": location}, {"Location": location})


def _echo(path: str, raw: bytes) -> _Answer:
    try:
        received = json.loads(raw) if raw else None
    except ValueError:
        received = raw.decode(errors="replace")
    return _Answer(200, {"path": path, "received": received})


def _size_check(max_body: int | None, size: int) -> _Answer | None:
    if max_body is None or size <= max_body:
        return None
    return _error(413, f"body is {size} bytes, over the {max_body} byte limit")


def _scope_check(
    keys: Mapping[str, frozenset[Scope] | None] | None, key: str | None, events: list[Json]
) -> _Answer | None:
    scope = None if keys is None or key is None else keys.get(key)
    if scope is None:
        return None
    for event in events:
        if (event.get("projectId"), event.get("env")) not in scope:
            return _error(403, "key is restricted to another project or environment")
    return None


def _accepted(settings: _Settings, parsed: _Parsed) -> _Answer:
    """200, with what the settings drop or warn about said as the Traffical API says it;
    `parsed.events` keeps only the events stored."""
    events = parsed.events
    dropped = [i for i, e in enumerate(events) if e.get("id") in settings.drop_ids]
    warned = [
        {"index": i, "event": e.get("event"), "violations": [{"path": "properties",
         "message": "not in the tracking plan", "rule": "additionalProperties"}]}
        for i, e in enumerate(events) if e.get("event") in settings.warn_names
    ]  # fmt: skip
    kept = len(events) - len(dropped)
    answer: Json = {"accepted": kept, "written": kept}
    if dropped and settings.name_dropped:
        answer["validationErrors"] = [
            {"index": i, "error": f"properties: event {events[i]['id']} breaks its schema"}
            for i in dropped
        ]
    if warned:
        answer["schemaWarnings"] = warned
    events[:] = [e for i, e in enumerate(events) if i not in set(dropped)]
    return _Answer(200, answer)


def _reject_check(reject: frozenset[str], status: int, events: list[Json]) -> _Answer | None:
    for event in events:
        if event.get("id") in reject:
            return _error(status, f"event {event['id']} is invalid")
    return None


def _parse(headers: Mapping[str, str], raw: bytes, max_events: int) -> _Parsed:
    body = _decode(headers, raw)
    if isinstance(body, _Answer):
        return _Parsed(len(raw), [], body)
    events = _events_of(body, max_events)
    if isinstance(events, _Answer):
        return _Parsed(len(body), [], events, body)
    return _Parsed(len(body), events, None, body)


def _decode(headers: Mapping[str, str], raw: bytes) -> bytes | _Answer:
    content_type = headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return _error(415, f"Content-Type must be application/json, not {content_type!r}")
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        return _error(415, f"unsupported Content-Encoding {encoding!r}")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error):
        return _error(400, "body is not valid gzip")


def _events_of(body: bytes, max_events: int) -> list[Json] | _Answer:
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except ValueError as exc:
        return _error(400, f"body is not strict JSON: {exc}")
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, list) or not 0 < len(events) <= max_events:
        return _error(400, f"events must be a non-empty array (max {max_events})")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            return _error(400, f"events[{index}] is not an object")
    return events


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


# -- HTTP plumbing ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """Tracks its connections and their threads so `close()` can cut and join them."""

    daemon_threads = True
    block_on_close = False  # close() joins its own threads, with a timeout

    def __init__(self, port: int, upstream: Upstream) -> None:
        self.upstream = upstream
        self.closing = threading.Event()
        self.serve_thread: threading.Thread | None = None
        self._open: dict[Any, threading.Thread] = {}
        self._open_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's slow getfqdn()
        self.server_name, self.server_port = HOST, int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs on the serve thread, so once shutdown() returns every connection is listed.
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"upstream-{self.server_port}-conn",
            daemon=True,
        )
        with self._open_lock:
            self._open[request] = thread
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a cut connection is expected
            super().handle_error(request, client_address)

    def close(self) -> None:
        """Refuse new connections, cut open ones, and join every thread of this server."""
        self.closing.set()
        self.shutdown()
        self.server_close()
        with self._open_lock:
            open_connections = list(self._open.items())
        for connection, _ in open_connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_S
        threads = [thread for _, thread in open_connections]
        threads += [self.serve_thread] if self.serve_thread else []
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real upstream
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

    def do_POST(self) -> None:
        server = cast(_Server, self.server)
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True  # the framing is lost: cannot read the next request
            self._send(_error(400, "unreadable body (Content-Length or chunking)"))
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        url = urlsplit(self.path)
        if url.path in EVENTS_PATHS:
            answer = server.upstream._handle(url.path, headers, raw, server.closing)
        else:
            answer = server.upstream._handle_sdk(
                "POST", url.path, url.query, headers, raw, server.closing
            )
        self._send(answer)
        if server.closing.is_set():
            self.close_connection = True

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        headers = {name.lower(): value for name, value in self.headers.items()}
        url = urlsplit(self.path)
        self._send(
            server.upstream._handle_sdk("GET", url.path, url.query, headers, b"", server.closing)
        )
        if server.closing.is_set():
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunks()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length)

    def _read_chunks(self) -> bytes:
        parts: list[bytes] = []
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _send(self, answer: _Answer) -> None:
        if answer.body is None:
            self.close_connection = True
            return
        if answer.page is not None:
            self.send_response(answer.status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(answer.page)))
            self.end_headers()
            self.wfile.write(answer.page)
            return
        if answer.status in (204, 304):  # no body, by definition
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        data = json.dumps(answer.body).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read `Upstream.requests` instead
