"""Hostile requests against a real server: each gets a clear 4xx or a bounded wait, never a
500, a hang, or a memory blow-up, and the server keeps serving everyone else.

Bodies: cut JSON, nesting 100,000 deep, a 9 MB string, numbers past any range, invalid
UTF-8, duplicate keys, a gzip of deep nesting, gzip with trailing data, content types
that are almost JSON. Connections (raw sockets, so nothing is tidied up by a client
library): headers or bodies trickled a byte at a time, 2,000 idle connections, more than
`max_connections`, a 100 KB header line, thousands of headers, unparseable requests. The
server's memory is read from /proc before and after (VmRSS). The gzip bomb and the usual
400/413/415 cases are in test_api.py.

The servers here run with `request_timeout_seconds` = TIMEOUT_S so slow clients are dealt
with in seconds; the deadline logic is the same at the default (30 s).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import resource
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, admin_key, event, serve_for_module, stored_bytes, wait_for

TIMEOUT_S = 2
JSON = {"Content-Type": "application/json"}
# A request must be answered within this many seconds of its last byte, at most.
PROMPT_S = 2.0
MIB = 1024 * 1024


# --- servers and helpers ----------------------------------------------------------------


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Iterator[Server]:
    for server in serve_for_module(tmp_path_factory, name, **env):
        yield server
        assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on the defaults but for a short request timeout."""
    yield from _serve(tmp_path_factory, "hostile", COLLECTOR_REQUEST_TIMEOUT_SECONDS=str(TIMEOUT_S))


def rss_bytes(server: Server) -> int:
    assert server.process is not None
    return memory(server.process.pid, "VmRSS")


def memory(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status (VmRSS: now, VmHWM: the peak), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def open_fds(server: Server) -> int:
    assert server.process is not None
    return len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))


def assert_serving(server: Server) -> None:
    """A normal request is answered, promptly."""
    started = time.monotonic()
    response = server.post({"events": [event(id=unique_id())]})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < PROMPT_S
    assert server.process is not None and server.process.poll() is None


def unique_id() -> str:
    return "trk_" + secrets.token_hex(8)


def post_and_collect(
    server: Server, content: bytes, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    before = len(server.stored())
    response = server.post(content=content, headers={**JSON, **(headers or {})})
    return response, server.stored()[before:]


def assert_error(response: httpx.Response, status: HTTPStatus) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    body: dict[str, Any] = response.json()
    assert body["error"] == status.phrase and body["message"]
    return body


@dataclass
class Answer:
    """What a raw connection got back: the status (None if closed without an answer)."""

    status: int | None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_answer(sock: socket.socket, started: float, limit_s: float = 30) -> Answer:
    """Read one answer (or the close) from `sock`, within `limit_s`."""
    sock.settimeout(limit_s)
    raw = b""
    try:
        while True:
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(
                    (name.strip().lower(), value.strip())
                    for name, value in (line.split(":", 1) for line in lines[1:])
                )
                length = int(headers.get("content-length", "0"))
                if len(rest) >= length:
                    status = int(lines[0].split()[1])
                    return Answer(status, rest[:length], headers, time.monotonic() - started)
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    except ConnectionResetError:
        pass
    return Answer(None, raw, {}, time.monotonic() - started)


def exchange(server: Server, data: bytes, limit_s: float = 30) -> Answer:
    with connect(server) as sock:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        return read_answer(sock, started, limit_s)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True if the server closes `sock` (EOF or reset) within `within_s`."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request_head(
    server: Server, content_length: int | None = None, key: str | None = None
) -> bytes:
    lines = [
        "POST /v1/events/batch HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Content-Type: application/json",
        f"Authorization: Bearer {server.key if key is None else key}",
    ]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def event_body(**fields: Any) -> bytes:
    return json.dumps({"events": [event(id=unique_id(), **fields)]}).encode()


# --- bodies -------------------------------------------------------------------------------


def test_a_body_cut_anywhere_answers_400_and_stores_nothing(api: Server) -> None:
    body = json.dumps({"events": [event(id=unique_id(), properties={"a": [1, "x"]})] * 3}).encode()
    before = len(api.stored())
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for cut in range(1, len(body), max(1, len(body) // 40)):
            response = client.post(
                "/v1/events/batch",
                content=body[:cut],
                headers={**JSON, "Authorization": f"Bearer {api.key}"},
            )
            assert_error(response, HTTPStatus.BAD_REQUEST)
    assert len(api.stored()) == before


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000,
        b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"events": [' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"]}",
    ],
    ids=["open-arrays", "closed-arrays", "objects"],
)
def test_nesting_100k_deep_answers_400_promptly(api: Server, content: bytes) -> None:
    started = time.monotonic()
    response, stored = post_and_collect(api, content)
    body = assert_error(response, HTTPStatus.BAD_REQUEST)
    assert "nested too deeply" in body["message"] or "not valid JSON" in body["message"]
    assert stored == [] and time.monotonic() - started < PROMPT_S
    assert_serving(api)


def test_an_event_nested_300_deep_is_stored_as_sent(api: Server) -> None:
    deep = {**event(id=unique_id()), "deep": json.loads("[" * 300 + "]" * 300)}
    shallow = {**event(id=unique_id()), "deep": json.loads("[" * 200 + "]" * 200)}
    response, stored = post_and_collect(api, json.dumps({"events": [deep, shallow]}).encode())
    assert response.status_code == 200, response.text
    assert response.json()["written"] == 2 and "validationErrors" not in response.json()
    assert stored == [deep, shallow]


def test_a_9_mb_string_is_stored_whole_and_memory_stays_bounded(api: Server) -> None:
    before = rss_bytes(api)
    blob = secrets.token_hex(9 * MIB // 2)  # 9 MiB of text
    sent = event(id=unique_id(), properties={"blob": blob})
    response, stored = post_and_collect(api, json.dumps({"events": [sent]}).encode())
    assert response.status_code == 200, response.text
    assert stored == [sent]
    first = rss_bytes(api) - before
    for _ in range(4):  # again and again: no growth per request
        again = event(id=unique_id(), properties={"blob": blob})
        assert api.post({"events": [again]}).status_code == 200
    grown = rss_bytes(api) - before
    print(f"\nRSS after one 9 MB body: +{first / MIB:.0f} MiB, after five: +{grown / MIB:.0f} MiB")
    assert grown < 200 * MIB
    assert grown < first + 60 * MIB
    assert_serving(api)


def test_a_string_past_the_body_limit_answers_413(api: Server) -> None:
    content = json.dumps({"events": [event(properties={"blob": "x" * (11 * MIB)})]}).encode()
    response, stored = post_and_collect(api, content)
    assert_error(response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    assert stored == []


def test_a_huge_content_length_answers_413_without_waiting_for_the_body(api: Server) -> None:
    answer = exchange(api, request_head(api, content_length=50 * 1024**3) + b'{"events": [')
    assert answer.status == 413, answer
    assert answer.seconds < PROMPT_S


@pytest.mark.parametrize(
    "number",
    [
        "1e999999",
        "-1e999999",
        "1" * 100_000,  # a 100,000-digit integer: past the double range
        "123456789012345678901234567890",  # past 64 bits
        "18446744073709551615",
        "0." + "0" * 100_000 + "1",
        "-0.0E+00",
    ],
    ids=["1e999999", "-1e999999", "100k-digits", "30-digits", "uint64-max", "100k-decimals", "-0"],
)
def test_numbers_past_any_range_are_stored_as_sent(api: Server, number: str) -> None:
    sent = event(id=unique_id())
    content = json.dumps({"events": [{**sent, "value": "NUMBER"}]}).encode()
    content = content.replace(b'"NUMBER"', number.encode())
    started = time.monotonic()
    response, _ = post_and_collect(api, content)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < PROMPT_S
    assert response.json()["written"] == 1
    (stored,) = [raw for raw in stored_bytes(api.data_dir) if sent["id"].encode() in raw]
    assert stored == json.dumps({**sent, "value": "NUMBER"}).encode().replace(
        b'"NUMBER"', number.encode()
    )


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"caf\xe9"],
    ids=["ff", "overlong-slash", "utf8-surrogate", "past-u10ffff", "latin-1"],
)
def test_invalid_utf8_inside_an_event_answers_400(api: Server, bad: bytes) -> None:
    content = event_body(unitKey="KEY").replace(b'"KEY"', b'"' + bad + b'"')
    response, stored = post_and_collect(api, content)
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []


def test_duplicate_keys_take_the_last_value_as_javascript_does(api: Server) -> None:
    track_id, broken_id = unique_id(), unique_id()
    content = (
        '{"events": ['
        f'{{"type": "track", "id": "{track_id}", "orgId": "org_test", "projectId": "proj_x",'
        ' "projectId": "proj_test", "env": "production", "unitKey": "u", "unitKey": "user-1",'
        ' "timestamp": "2026-05-21T10:30:00Z", "event": "first", "event": "purchase"},'
        f'{{"type": "track", "id": "{broken_id}", "orgId": "org_test", "projectId": "proj_test",'
        ' "env": "production", "unitKey": "u", "timestamp": "2026-05-21T10:30:00Z",'
        ' "event": "purchase", "type": "pageview"}'
        '], "events": "ignored, as the first one is"}'
    )
    response, stored = post_and_collect(api, content.encode())
    assert response.status_code == 400, response.text  # the second "events" wins: not an array
    content = content.replace(', "events": "ignored, as the first one is"', "")
    response, stored = post_and_collect(api, content.encode())
    assert response.status_code == 200, response.text
    body = response.json()
    assert [e["index"] for e in body["validationErrors"]] == [1]  # its type was "pageview"
    assert stored == [
        {
            "type": "track",
            "id": track_id,
            "orgId": "org_test",
            "projectId": "proj_test",
            "env": "production",
            "unitKey": "user-1",
            "timestamp": "2026-05-21T10:30:00Z",
            "event": "purchase",
        }
    ]


def test_a_gzip_of_deep_nesting_answers_400(api: Server) -> None:
    bomb = gzip.compress(b'{"events": ' + b"[" * (9 * MIB), compresslevel=9)
    assert len(bomb) < 50_000
    before = rss_bytes(api)
    response, stored = post_and_collect(api, bomb, {"Content-Encoding": "gzip"})
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []
    assert rss_bytes(api) - before < 100 * MIB


@pytest.mark.parametrize(
    "content",
    [
        gzip.compress(event_body()) + gzip.compress(event_body()),
        gzip.compress(event_body()) + b"trailing bytes",
    ],
    ids=["two-members", "trailing-bytes"],
)
def test_gzip_with_data_after_its_end_answers_400_not_half_taken(
    api: Server, content: bytes
) -> None:
    response, stored = post_and_collect(api, content, {"Content-Encoding": "gzip"})
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []


@pytest.mark.parametrize(
    "content_type",
    ["text/json", "application/jsonl", "application/json-seq", "application/vnd.api+json",
     "application/json5", "json", "*/*", "application/*"],
)  # fmt: skip
def test_content_types_that_are_almost_json_answer_415(api: Server, content_type: str) -> None:
    response, stored = post_and_collect(api, event_body(), {"Content-Type": content_type})
    assert_error(response, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    assert stored == []


def test_a_form_body_sent_as_json_answers_400(api: Server) -> None:
    response, stored = post_and_collect(api, b"events=%5B%5D&a=1")
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []


# --- slow clients -------------------------------------------------------------------------


def trickle(sock: socket.socket, data: bytes, every_s: float, stop: threading.Event) -> None:
    """Send `data` a byte at a time, until it is sent, the peer goes, or `stop`."""
    for i in range(len(data)):
        if stop.is_set():
            return
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return
        time.sleep(every_s)


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_client_trickling_bytes_gets_408_within_the_deadline_and_others_are_served(
    api: Server, part: str
) -> None:
    body = event_body()
    data = request_head(api, content_length=len(body)) + body
    if part == "body":  # the head at once, then the body a byte at a time
        head = request_head(api, content_length=len(body))
        sock = connect(api)
        sock.sendall(head)
        data = body
    else:
        sock = connect(api)
    stop = threading.Event()
    sender = threading.Thread(target=trickle, args=(sock, data, 0.2, stop), daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        for _ in range(3):  # meanwhile, everyone else is served as usual
            assert_serving(api)
        answer = read_answer(sock, started, limit_s=TIMEOUT_S + 5)
    finally:
        stop.set()
        sender.join(timeout=5)
        sock.close()
    assert answer.status == 408, answer
    assert json.loads(answer.body)["error"] == "Request Timeout"
    assert answer.headers.get("connection") == "close"
    assert TIMEOUT_S - 0.5 < answer.seconds < TIMEOUT_S + 2


def test_fifty_tricklers_at_once_are_all_cut_off_and_nothing_is_stored(api: Server) -> None:
    before = len(api.stored())
    body = event_body()
    data = request_head(api, content_length=len(body)) + body
    stop = threading.Event()
    socks = [connect(api) for _ in range(50)]
    senders = [
        threading.Thread(target=trickle, args=(sock, data, 0.1, stop), daemon=True)
        for sock in socks
    ]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    try:
        assert_serving(api)
        answers = [read_answer(sock, started, limit_s=TIMEOUT_S + 5) for sock in socks]
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert {answer.status for answer in answers} == {408}
    assert max(answer.seconds for answer in answers) < TIMEOUT_S + 3
    assert len(api.stored()) == before + 1  # assert_serving's own event only


def test_an_answered_request_whose_body_never_ends_is_closed_after_the_deadline(
    api: Server,
) -> None:
    # A wrong key is answered 401 at once, before the body is read; a client that keeps
    # trickling the rest cannot hold the connection open.
    with connect(api) as sock:
        started = time.monotonic()
        sock.sendall(request_head(api, content_length=1000, key="traffical_sk_nope") + b"{")
        answer = read_answer(sock, started, limit_s=5)
        assert answer.status == 401, answer
        stop = threading.Event()
        sender = threading.Thread(target=trickle, args=(sock, b" " * 100, 0.2, stop), daemon=True)
        sender.start()
        try:
            assert closed_by_server(sock, within_s=TIMEOUT_S + 3)
        finally:
            stop.set()
    assert time.monotonic() - started < TIMEOUT_S + 4


def test_an_early_answer_to_a_large_body_reaches_the_client(api: Server) -> None:
    # The same early 401, to a client sending 5 MB at full speed: it must get the 401,
    # not a reset (SDKs stop sending on 401; a network error they would retry for ever).
    content = b'{"events": [' + b" " * (5 * MIB) + b"]}"
    response = api.post(content=content, headers=JSON, key="traffical_sk_nope")
    assert_error(response, HTTPStatus.UNAUTHORIZED)


# --- many connections ---------------------------------------------------------------------


def _allow_open_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"this test needs {count} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


# The idle timeout of the server that takes 2000 idle connections: time to accept them all
# before the first is timed out (2 s, the module's TIMEOUT_S, was not enough once in CI).
IDLE_TIMEOUT_S = 6  # 2000 connections open in 0.03 s here (the test prints it)
# Files the server holds for a moment on its own (the last request's connection until it
# sees the close, the heartbeat's temporary file): counted in the "before" of a loaded
# machine, they made the test wait for one more fd than 2000 connections give, until the
# idle timeout had closed them all (it failed so in CI, 24 fds open of 25 before).
TRANSIENT_FDS = 5


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose request timeout is IDLE_TIMEOUT_S."""
    yield from _serve(
        tmp_path_factory, "patient", COLLECTOR_REQUEST_TIMEOUT_SECONDS=str(IDLE_TIMEOUT_S)
    )


def test_2000_idle_connections_neither_stop_service_nor_grow_memory_and_are_closed(
    patient: Server,
) -> None:
    _allow_open_files(2500)
    assert_serving(patient)
    rss_before, fds_before = rss_bytes(patient), open_fds(patient)
    socks: list[socket.socket] = []
    try:
        opening = time.monotonic()
        for _ in range(2000):
            socks.append(connect(patient))
        opened_s = time.monotonic() - opening
        all_open = fds_before + 2000 - TRANSIENT_FDS
        accepted_by = time.monotonic() + 10  # let the server accept them all
        while open_fds(patient) < all_open and time.monotonic() < accepted_by:
            time.sleep(0.1)
        assert open_fds(patient) >= all_open, (
            f"{open_fds(patient)} fds open ({fds_before} before), "
            f"2000 connections opened in {opened_s:.2f} s"
        )
        started = time.monotonic()
        assert_serving(patient)
        print(
            f"\n2000 idle connections (opened in {opened_s:.2f} s): a request answered in"
            f" {time.monotonic() - started:.3f} s,"
            f" server RSS +{(rss_bytes(patient) - rss_before) / MIB:.1f} MiB"
        )
        assert rss_bytes(patient) - rss_before < 100 * MIB
        # An idle connection is closed after the request timeout.
        assert all(closed_by_server(sock, within_s=IDLE_TIMEOUT_S + 3) for sock in socks[:20])
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 5
    while open_fds(patient) > fds_before + 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds(patient) <= fds_before + 20
    assert_serving(patient)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that takes at most CAP connections."""
    yield from _serve(
        tmp_path_factory,
        "capped",
        COLLECTOR_MAX_CONNECTIONS=str(CAP),
        COLLECTOR_REQUEST_TIMEOUT_SECONDS=str(TIMEOUT_S),
    )


CAP = 30


def test_connections_past_max_connections_are_closed_on_arrival(capped: Server) -> None:
    socks = [connect(capped) for _ in range(CAP)]
    try:
        time.sleep(0.3)
        with connect(capped) as extra:
            assert closed_by_server(extra, within_s=1)
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    assert_serving(capped)  # room again once they are gone


# --- heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
        + b"\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10 * MIB,  # never ends
    ],
    ids=["100kb-header-line", "20000-headers", "100kb-url", "10mb-unfinished-header"],
)
def test_a_head_over_the_limit_answers_431_at_once(api: Server, head: bytes) -> None:
    before = rss_bytes(api)
    answer = exchange(api, head, limit_s=10)
    assert answer.status == 431, answer
    assert json.loads(answer.body)["error"] == "Request Header Fields Too Large"
    assert answer.seconds < PROMPT_S
    assert rss_bytes(api) - before < 50 * MIB
    assert_serving(api)


def test_many_headers_under_the_limit_are_served(api: Server) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(1500))  # ~20 KB
    answer = exchange(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", 10)
    assert answer.status == 200, answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 100,  # a TLS hello
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHo\x00st: x\r\n\r\n",
    ],
    ids=["tls", "http-9.9", "cl-and-te", "negative-length", "nul-in-header"],
)
def test_an_unparseable_request_answers_400_in_the_error_shape(
    api: Server, request_bytes: bytes
) -> None:
    answer = exchange(api, request_bytes, limit_s=10)
    assert answer.status == 400, answer
    assert json.loads(answer.body)["error"] == "Bad Request"
    assert_serving(api)


def test_a_body_that_breaks_http_framing_is_cut_off_at_once(api: Server) -> None:
    # The head was fine, so the app is already answering: no second answer, just the close.
    answer = exchange(
        api, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    assert answer.status in (None, 400, 401), answer
    assert answer.seconds < PROMPT_S
    assert_serving(api)


# --- many large bodies at once -------------------------------------------------------------


def peak_rss(pid: int) -> int:
    return memory(pid, "VmHWM")


def writer_pid(server: Server) -> int:
    assert server.process is not None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
                if int(stat.rsplit(")", 1)[1].split()[1]) == server.process.pid and (
                    b"spawn_main" in cmdline
                ):
                    return int(entry.name)
    raise AssertionError("no queue writer")


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on the defaults (16 MiB of request bytes in flight)."""
    yield from _serve(tmp_path_factory, "crowded")


def test_48_parallel_9_mb_bodies_are_admitted_by_bytes_and_memory_stays_bounded(
    crowded: Server,
) -> None:
    """Each body reserves its bytes before it is read; those that do not fit get 503 with
    Retry-After at once, and commits are bounded by bytes too. The server's and its
    writer's peak memory stay bounded (they took 1.2 GB and 838 MB when only events were
    counted)."""
    assert crowded.process is not None
    writer = writer_pid(crowded)
    idle = {"server": rss_bytes(crowded), "writer": peak_rss(writer)}
    one = json.dumps(event(id="x", properties={"blob": "b" * 900})).encode()
    count = (9 * MIB) // (len(one) + 1)
    statuses: list[int] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        events = b",".join(one.replace(b'"x"', b'"big-%d-%d"' % (n, i)) for i in range(count))
        body = b'{"events":[' + events + b"]}"
        answer = crowded.post(content=body, headers=JSON)
        with lock:
            statuses.append(answer.status_code)
        if answer.status_code == 503:
            assert answer.headers["Retry-After"] == "1", answer.text
            assert "max_request_bytes_in_flight" in answer.json()["message"]

    threads = [threading.Thread(target=send, args=(n,)) for n in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    peaks = {"server": peak_rss(crowded.process.pid), "writer": peak_rss(writer)}
    print(f"\n48 x 9 MB: {Counter(statuses)}; peaks {peaks}, idle {idle}")
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
    # Bounded by what is admitted (16 MiB of bodies) and by the largest commit (16 MiB),
    # whatever the number of requests: measured here 137 and 123 MiB (idle 66 and 43), and
    # since the writer no longer imports the command line, 125 MiB for it at idle 28. A
    # group's bytes are held a few times over in the writer (the messages as received,
    # their objects, the joined row, SQLite's copy, what glibc keeps of them): so its bound
    # is its idle size and eight groups, not a multiple of its idle size.
    bounds = {"server": 2 * idle["server"] + 2 * 16 * MIB, "writer": idle["writer"] + 8 * 16 * MIB}
    for name, peak in peaks.items():
        assert peak < bounds[name], (name, peak, idle[name])
    assert_serving(crowded)


# --- names without end ----------------------------------------------------------------------


def test_200000_events_with_random_names_leave_counts_metrics_and_status_bounded(
    crowded: Server,
) -> None:
    """Every event names a new project, event, layer, policy and allocation: counts.db,
    /metrics and status stay small and quick (they reached 607 MB, 51 MB and 16.5 s)."""
    rng = secrets.token_hex
    for _ in range(200):
        events = []
        for _ in range(500):
            project = f"proj_{rng(6)}"
            layer = {"layerId": rng(6), "bucket": 1, "policyId": rng(6), "allocationName": rng(6)}
            events.append(event("exposure", projectId=project, layers=[layer]))
            events.append(event(projectId=project, event=f"name_{rng(6)}"))
        assert crowded.post({"events": events}).status_code == 200
    wait_for(  # the counts are flushed every second
        lambda: "(other)" in httpx.get(f"{crowded.url}/metrics", timeout=60).text,
        "the folded counts",
        10,
    )

    files = crowded.data_dir.glob("counts.db*")
    size = sum(path.stat().st_size for path in files)
    started = time.monotonic()
    metrics = httpx.get(f"{crowded.url}/metrics", timeout=60)
    metrics_s = time.monotonic() - started
    started = time.monotonic()
    stats = httpx.get(
        f"{crowded.url}/v1/stats",
        headers={"Authorization": f"Bearer {admin_key(crowded.data_dir)}"},
        timeout=60,
    )
    stats_s = time.monotonic() - started
    lines = metrics.text.count("\n")
    print(
        f"\n200,000 random names: counts.db {size / MIB:.1f} MiB, /metrics {lines} lines "
        f"in {metrics_s:.2f} s, /v1/stats in {stats_s:.2f} s"
    )
    assert metrics.status_code == stats.status_code == 200
    assert size < 32 * MIB
    assert lines < 30_000 and metrics_s < 5
    assert stats_s < 2
    assert "(other)" in metrics.text  # past the bound, counted as other
