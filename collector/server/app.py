"""The HTTP face of the collector: the Litestar app, its routes, and errors mapped to HTTP.

Routes: `POST /v1/events` and its alias `/v1/events/batch` (the events API), `GET /v1/stats`
(the status document of `collector.ops.status`, for any valid key), `GET /metrics`
(Prometheus), `GET /healthz` (the process answers) and `GET /readyz` (the queue can take a
write and the disk budget is not reached). The queue, key store and group committer are
opened in the lifespan and kept on `app.state`. Every failure is a `collector.errors` type;
`STATUS_FOR` is the one place that says which HTTP status each becomes, and every error
answer has the documented shape `{"error": <reason phrase>, "message": <what to fix>}`.

The events route runs on every request and is served straight from ASGI
(`events_fast_path`), without Litestar's request and response objects, which were most of
a small request's cost; Litestar's route for it stays, for CORS requests and the OpenAPI
description, and both call `take_events`.

The SDK calls that are not events (`GET /v1/config/{projectId}`, `POST /v1/resolve`,
`POST /v1/decide/...`) are passed to the upstream by `proxy.py`, which serves the config
bundle cache through upstream outages.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any, cast

import orjson
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, InternalServerException
from litestar.handlers import HTTPRouteHandler
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from prometheus_client import CONTENT_TYPE_LATEST

from collector.errors import (
    BadRequest,
    CollectorError,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    UpstreamFailed,
    UpstreamNotConfigured,
    UpstreamTimeout,
)
from collector.ops import status
from collector.ops.metrics import LATENCY_BUCKETS, Metrics
from collector.server import limits, openapi
from collector.server.admission import ByteBudget, reserved_size
from collector.server.auth import ADMIN_READ, ApiKey, KeyStore
from collector.server.commit import Committer
from collector.server.counting import EventCounter
from collector.server.ingest import Ingest, decode_body, require_json, sdk_of
from collector.server.proxy import STALE_HEADER, Answer, Proxy, segment
from collector.server.ratelimit import RateLimiter
from collector.server.writer import WriterConfig, WriterLink
from collector.settings import Settings
from collector.store import heartbeats
from collector.store.counts import Count, Counts, ProxyRoute, bucket
from collector.store.datadir import DataDir

log = logging.getLogger("collector.server")

STATUS_FOR: dict[type[CollectorError], HTTPStatus] = {
    BadRequest: HTTPStatus.BAD_REQUEST,
    Unauthorized: HTTPStatus.UNAUTHORIZED,
    Forbidden: HTTPStatus.FORBIDDEN,
    PayloadTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    UnsupportedMediaType: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    RequestTimeout: HTTPStatus.REQUEST_TIMEOUT,
    RateLimited: HTTPStatus.TOO_MANY_REQUESTS,
    Unavailable: HTTPStatus.SERVICE_UNAVAILABLE,
    UpstreamFailed: HTTPStatus.BAD_GATEWAY,
    UpstreamNotConfigured: HTTPStatus.SERVICE_UNAVAILABLE,
    UpstreamTimeout: HTTPStatus.GATEWAY_TIMEOUT,
}
# Headers a browser SDK sends cross-origin (the spec's list), and the one it must read.
CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "If-None-Match",
    "X-Org-Id",
    "X-Project-Id",
    "X-Env",
    "X-SDK-Name",
    "X-SDK-Version",
]
CORS_EXPOSE_HEADERS = ["ETag", STALE_HEADER]
EVENTS_PATHS = ("/v1/events", "/v1/events/batch")
# What the health listener (health_port) serves: probes and scrapes, nothing else.
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
HEALTH_ONLY = "the health listener serves only /healthz, /readyz and /metrics"
# How often the server writes its counts to counts.db (and so how fresh status is).
COUNTS_FLUSH_S = 1.0
# Browsers may cache a preflight answer this many seconds (10 minutes: Chromium's cap).
CORS_MAX_AGE_S = 600
# prometheus-client's media type without its charset, which Litestar adds to every text
# type: given whole, the answer said `charset=utf-8` twice, and Prometheus 3 refuses a
# repeated parameter (every scrape failed).
METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")


def status_for(exc: CollectorError) -> HTTPStatus:
    for kind in type(exc).__mro__:
        if kind in STATUS_FOR:
            return STATUS_FOR[kind]
    return HTTPStatus.INTERNAL_SERVER_ERROR


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        content=orjson.dumps(body), status_code=status, media_type=MediaType.JSON, headers=headers
    )


def error_answer(
    status: HTTPStatus, message: str, **extra: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of an error answer: the documented shape, and `retry_after`
    (in `extra`) as the Retry-After header."""
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return {"error": status.phrase, "message": message, **extra}, headers


def error_response(status: HTTPStatus, message: str, **extra: Any) -> Response[bytes]:
    body, headers = error_answer(status, message, **extra)
    return json_response(body, status=status, headers=headers)


def collector_error_answer(
    exc: CollectorError,
) -> tuple[HTTPStatus, dict[str, Any], dict[str, str]]:
    """What `exc` is answered with, whichever path the request took."""
    status = status_for(exc)
    extra = dict(exc.extra)
    if isinstance(exc, Unavailable | UpstreamFailed):
        extra["retry_after"] = exc.retry_after
        log.warning("answered %d: %s", status, exc.message)
    return status, *error_answer(status, exc.message, **extra)


def on_collector_error(_: Request[Any, Any, Any], exc: CollectorError) -> Response[bytes]:
    status, body, headers = collector_error_answer(exc)
    return json_response(body, status=status, headers=headers)


def on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (404, 405, body over the size limit) in our error shape."""
    status = HTTPStatus(exc.status_code)
    message = exc.detail if exc.detail and exc.detail != status.phrase else status.description
    response = error_response(status, message)
    response.headers.update(exc.headers or {})  # 405's Allow, which RFC 9110 requires
    return response


def unexpected_answer(exc: Exception) -> dict[str, Any]:
    """Log `exc` (a bug) and say so, without details, to the client."""
    log.exception("unexpected error while handling a request", exc_info=exc)
    return error_answer(HTTPStatus.INTERNAL_SERVER_ERROR, "unexpected error; see the log")[0]


def on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return json_response(unexpected_answer(exc), status=HTTPStatus.INTERNAL_SERVER_ERROR)


async def take_events(
    state: State, headers: Mapping[str, str], read_body: Callable[[], Awaitable[bytes]]
) -> bytes:
    """Accept a batch of exposure, decision and track events: the 200 answer's body, or a
    CollectorError. `headers` by lower-case name; `read_body` reads the whole body."""
    key = state.key_store.authenticate(headers.get("authorization"))
    state.rate_limiter.take(key)
    key.require("sdk:write")
    require_json(headers.get("content-type"))
    encoding = headers.get("content-encoding")
    size = reserved_size(headers.get("content-length"), encoding, state.max_body_bytes)
    state.admission.take(size)  # before the body is read
    try:
        body = decode_body(await read_body(), encoding, state.max_body_bytes)
        sdk = sdk_of(headers.get("x-sdk-name"), headers.get("x-sdk-version"))
        outcome = await state.ingest.handle(body, key, sdk)
    finally:
        state.admission.give(size)
    return orjson.dumps(outcome.answer())


async def post_events(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The events route as Litestar serves it: for CORS requests (`events_fast_path`
    takes the others) and for the OpenAPI description."""
    state = request.app.state

    def read() -> Awaitable[bytes]:
        return read_body(
            request.receive, request.headers.get("content-length"), state.max_body_bytes
        )

    try:
        answer = await take_events(state, request.headers, read)
    except ClientGone:  # what Litestar's own body reader raises then (never a logged bug)
        raise InternalServerException("client disconnected prematurely") from None
    return Response(content=answer, media_type=MediaType.JSON)


def events_route(settings: Settings) -> HTTPRouteHandler:
    """The events route, described in OpenAPI with this app's limits."""
    return post(
        list(EVENTS_PATHS),
        status_code=200,
        operation_class=openapi.events_operation(settings.max_events_per_request),
        name="events",
    )(post_events)


def proxied(answer: Answer) -> Response[bytes]:
    headers = dict(answer.headers)
    media_type = headers.pop("Content-Type", MediaType.JSON)
    return Response(
        content=answer.body, status_code=answer.status, headers=headers, media_type=media_type
    )


def query_of(request: Request[Any, Any, Any]) -> str:
    return bytes(request.scope.get("query_string", b"")).decode("latin-1")


@get("/v1/config/{project_id:str}")
async def get_config(request: Request[Any, Any, Any], project_id: str) -> Response[bytes]:
    """The SDK config bundle, passed through from the upstream (or from the cache)."""
    if project_id in ("", ".", ".."):
        raise HTTPException(status_code=404, detail="no such project")
    answer = await request.app.state.proxy.config(project_id, query_of(request), request.headers)
    return proxied(answer)


@post("/v1/resolve", status_code=200)
async def post_resolve(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Server-side evaluation, passed through to the upstream."""
    proxy: Proxy = request.app.state.proxy
    body = await request.body()
    return proxied(
        await proxy.call(
            ProxyRoute.RESOLVE, "/v1/resolve", query_of(request), request.headers, body
        )
    )


@post(["/v1/decide/batch", "/v1/decide/entity/batch"], status_code=200)
async def post_decide_batch(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Batch decisions, passed through to the upstream."""
    proxy: Proxy = request.app.state.proxy
    path = request.scope["path"]
    body = await request.body()
    return proxied(
        await proxy.call(ProxyRoute.DECIDE, path, query_of(request), request.headers, body)
    )


@post("/v1/decide/{policy_id:str}", status_code=200)
async def post_decide(request: Request[Any, Any, Any], policy_id: str) -> Response[bytes]:
    """One policy's decision, passed through to the upstream."""
    if policy_id in ("", ".", ".."):
        raise HTTPException(status_code=404, detail="no such policy")
    proxy: Proxy = request.app.state.proxy
    path = f"/v1/decide/{segment(policy_id)}"
    body = await request.body()
    return proxied(
        await proxy.call(ProxyRoute.DECIDE, path, query_of(request), request.headers, body)
    )


@get("/v1/stats")
async def stats(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The status document of `collector status --json`: whole for an admin:read key; for
    an sdk:read secret key without paths, pids and the upstream; for a key restricted to a
    project, that project's figures only."""
    key: ApiKey = request.app.state.key_store.authenticate(request.headers.get("authorization"))
    if not key.may_read_stats():
        raise Forbidden(f"API key '{key.name}' may not read stats: it needs {ADMIN_READ}")
    document = await asyncio.to_thread(status.collect, request.app.state.settings)
    return json_response(
        status.shown_to(document, admin=ADMIN_READ in key.scopes, project=key.project)
    )


@get("/metrics")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The server's and the forwarder's figures in Prometheus text format."""
    body = await asyncio.to_thread(request.app.state.metrics.render)
    return Response(content=body, media_type=METRICS_MEDIA_TYPE)


@get("/healthz")
async def healthz() -> Response[bytes]:
    """The process is alive and answering."""
    return json_response({"status": "ok"})


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Not stopping, keys can be judged, the queue can take a write now, and the disk budget
    is not reached."""
    if request.app.state.stopping:
        raise Unavailable("the collector is stopping")
    request.app.state.key_store.check_readable()
    await request.app.state.committer.check_writable()
    return json_response({"status": "ready"})


def tune_garbage_collector() -> None:
    """Make Python's cyclic collector run far less often on the request path.

    A 1000-event body parses into ~30,000 objects, which with the default threshold (700)
    sets off a collection every few requests: a quarter of the server's time in the bench.
    The request path makes no reference cycles worth collecting quickly, so: freeze what
    start-up allocated (never scanned again) and collect young objects every 100,000.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def measured(app: ASGIApp, counts: Counts) -> ASGIApp:
    """Wrap `app` to time each events request and count it by status and latency bucket."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] not in EVENTS_PATHS:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_code[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            counts.add(Count.REQUESTS, (str(status_code[0]),))
            counts.add(Count.REQUEST_DURATION, (bucket(LATENCY_BUCKETS, seconds),))
            counts.add(Count.REQUEST_DURATION_SUM, (), seconds)

    return wrapper


def write_heartbeat(settings: Settings, started: float) -> None:
    state = {"url": f"http://{settings.host}:{settings.port}", "started": started}
    heartbeats.write(DataDir(settings.data_dir).server_state, state)


async def keep_house(settings: Settings, counts: Counts, started: float) -> None:
    """Every second flush the counts; every few, tell the data directory we are alive."""
    beat = time.monotonic()  # the lifespan wrote the first heartbeat
    while True:
        await asyncio.sleep(COUNTS_FLUSH_S)
        try:
            await asyncio.to_thread(counts.write, counts.take())
            if time.monotonic() - beat >= heartbeats.BEAT_EVERY_S:
                beat = time.monotonic()
                await asyncio.to_thread(write_heartbeat, settings, started)
        except Exception as exc:  # never let this task die: status would call us down
            log.warning("could not write counts or heartbeat: %s", exc)


def writer_config(settings: Settings) -> WriterConfig:
    return WriterConfig(
        data_dir=settings.data_dir,
        sync=settings.sync,
        budget_bytes=settings.disk_budget_bytes,
        dedup_window_s=settings.dedup_window_seconds,
        # A quarter of the budget at most: the queue keeps the rest.
        dedup_max_bytes=min(settings.dedup_max_bytes, settings.disk_budget_bytes // 4),
        quarantine_max_bytes=settings.quarantine_max_bytes,
        counts_window_minutes=settings.counts_window_minutes,
        log_level=settings.log_level,
    )


def create_app(
    settings: Settings, writer: WriterLink | None = None, limiter: RateLimiter | None = None
) -> Litestar:
    """The collector's app for `settings`; the queue is opened when the app starts.

    Alone, the app starts its own queue writer and rate limiter. As one of `workers`
    server processes it is given the link to the supervisor's writer and the limiter
    shared by all of them."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        timeout = settings.commit_timeout_seconds
        if writer is None:  # alone: this server runs its own writer
            committer = Committer(owned=writer_config(settings), commit_timeout_s=timeout)
        else:
            committer = Committer(link=writer, commit_timeout_s=timeout)
        await committer.start()
        app.state.committer = committer
        app.state.ingest = Ingest(
            committer,
            settings.max_events_per_request,
            EventCounter(
                counts,
                future_margin_s=settings.event_future_margin_seconds,
                late_after_s=settings.event_late_after_seconds,
            ),
        )
        app.state.proxy = Proxy(settings, counts)
        # Before the first request is served, so that a server answering /healthz is
        # up to `collector status` at once (it said "server is down" for a second or two).
        started = time.time()
        try:
            await asyncio.to_thread(write_heartbeat, settings, started)
        except OSError as exc:  # a full disk, say: serve anyway; keep_house tries again
            log.warning("could not write the heartbeat: %s", exc)
        house = asyncio.create_task(keep_house(settings, counts, started))
        tune_garbage_collector()
        try:
            yield
        finally:
            await committer.stop()
            await app.state.proxy.aclose()
            house.cancel()
            try:
                counts.flush()
            except Exception as exc:  # a full disk, say: the last second of counts is lost
                log.warning("could not write the last counts: %s", exc)
            counts.close()

    cors = None
    if settings.cors_origins:
        cors = CORSConfig(
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=CORS_MAX_AGE_S,
        )
    data_dir = DataDir(settings.data_dir)
    # Only one process may move a corrupt file aside: the supervisor, when there are workers.
    counts = Counts.writer(data_dir, settings.counts_window_minutes, recover=writer is None)
    app_metrics = Metrics(settings)
    app = Litestar(
        route_handlers=[
            events_route(settings),
            get_config,
            post_resolve,
            post_decide_batch,
            post_decide,
            stats,
            metrics,
            healthz,
            readyz,
        ],
        lifespan=[lifespan],
        cors_config=cors,
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,  # collector.ops.logs configures every logger, uvicorn's too
        openapi_config=openapi.config(),
        exception_handlers={
            CollectorError: on_collector_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.state.key_store = KeyStore(data_dir)
    app.state.rate_limiter = limiter or RateLimiter(
        settings.rate_limit_per_second, settings.rate_limit_burst
    )
    app.state.max_body_bytes = settings.max_body_bytes
    app.state.admission = ByteBudget(settings.max_request_bytes_in_flight)
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.stopping = False  # set on SIGTERM (bootstrap.NotifyingServer)
    fast = events_fast_path(app.asgi_handler, app.state, cors is not None)
    guarded = limits.guarded(fast, settings.request_timeout_seconds)
    app.asgi_handler = measured(guarded, counts)
    if settings.health_port is not None:
        app.asgi_handler = health_only(app.asgi_handler, settings.health_port)
    if cors is not None:
        app.asgi_handler = preflight_errors_as_json(app.asgi_handler)
    return app


def events_fast_path(app: ASGIApp, state: State, cors: bool) -> ASGIApp:
    """Wrap `app`: a POST to an events path is served here, straight from ASGI, with the
    same `take_events` and the same error answers as Litestar's route.

    Why: Litestar's route machinery (its request, signature and response objects) is most
    of what a small request costs. Measured with `bench/ingest.py`'s bare endpoint, 1-event
    requests on 64 connections: 0.12 ms of CPU a request as a Litestar route, 0.04 served
    from ASGI. CORS requests (an Origin header while `cors_origins` is set) still take
    Litestar's route, whose middleware adds the CORS headers; so does every other method
    and path."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != ScopeType.HTTP
            or scope["path"] not in EVENTS_PATHS
            or scope["method"] != "POST"
        ):
            await app(scope, receive, send)
            return
        # By lower-case name (ASGI's); the first of a repeated header, as Litestar reads it.
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        if cors and "origin" in headers:
            await app(scope, receive, send)
            return

        def read() -> Awaitable[bytes]:
            return read_body(receive, headers.get("content-length"), state.max_body_bytes)

        extra: dict[str, str] = {}
        try:
            answer = await take_events(state, headers, read)
            status = HTTPStatus.OK
        except CollectorError as exc:
            status, body, extra = collector_error_answer(exc)
            answer = orjson.dumps(body)
        except ClientGone:
            return  # nobody to answer
        except Exception as exc:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            answer = orjson.dumps(unexpected_answer(exc))
        await send_json(send, status, answer, extra)

    return wrapper


class ClientGone(Exception):
    """The client closed the connection before its body was in."""


async def read_body(receive: Receive, content_length: str | None, max_bytes: int) -> bytes:
    """The whole body from ASGI `receive`; PayloadTooLarge as soon as it is past
    `max_bytes` (at once when its Content-Length says so), ClientGone if it never ends."""
    too_large = PayloadTooLarge(f"body is larger than {max_bytes} bytes")
    declared = (content_length or "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = cast(bytes, message.get("body", b""))
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def preflight_errors_as_json(app: ASGIApp) -> ASGIApp:
    """Wrap `app`: a CORS preflight Litestar refuses (origin, method or headers not
    allowed) is answered 400 in our error shape, not its `text/plain` "Disallowed CORS
    Origin"."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        preflight = (
            scope["type"] == ScopeType.HTTP
            and scope["method"] == "OPTIONS"
            and any(name == b"access-control-request-method" for name, _ in scope["headers"])
        )
        if not preflight:
            await app(scope, receive, send)
            return
        refused: list[HTTPResponseStartEvent] = []

        async def send_json(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 400:
                refused.append(message)  # held: the body says what was refused
                return
            if message["type"] == "http.response.body" and refused:
                text = bytes(message.get("body", b"")).decode("utf-8", "replace")
                refusal = text.removeprefix("Disallowed CORS ")
                why = f"CORS preflight refused: {refusal} not allowed (see cors_origins)"
                await send_error(send, HTTPStatus.BAD_REQUEST, why)
                return
            await send(message)

        await app(scope, receive, send_json)

    return wrapper


def health_only(app: ASGIApp, health_port: int) -> ASGIApp:
    """Wrap `app`: on the health listener's port, only HEALTH_PATHS; every other path is
    404 there (events and stats stay on the events listener, which may be loopback)."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == ScopeType.HTTP
            and (scope.get("server") or ("", None))[1] == health_port
            and scope["path"] not in HEALTH_PATHS
        ):
            await send_error(send, HTTPStatus.NOT_FOUND, HEALTH_ONLY)
            return
        await app(scope, receive, send)

    return wrapper


async def send_error(send: Send, status: HTTPStatus, message: str) -> None:
    """Answer `status` in the error shape straight to ASGI `send`, for the wrappers that
    answer before (or instead of) the app's handlers."""
    await send_json(send, status, orjson.dumps({"error": status.phrase, "message": message}))


async def send_json(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """Answer `status` with the JSON `body` (and `headers`) straight to ASGI `send`."""
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *(
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in (headers or {}).items()
            ),
        ],
    }
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)
