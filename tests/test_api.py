"""The events API as the spec (`spec/events-api.md`) states it, against a real server.

Every test talks HTTP to a real `collector serve` subprocess and reads what it committed
from the real SQLite queue. Three servers are shared by the module (each costs about a
second to start): one on the defaults, one with a small body limit and one with CORS
origins. Tests on a shared server compare the queue before and after their own request,
so they do not depend on each other's events.
"""

from __future__ import annotations

import gzip
import json
import secrets
import shutil
import socket
import string
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, create_key, event, run_cli, serve_for_module, wait_for

JSON = {"Content-Type": "application/json"}
ENVELOPE_MESSAGE = "events must be a non-empty array (max 10000)"
UNAUTHORIZED_MESSAGE = "Invalid or expired API key"
SMALL_BODY_BYTES = 4096
CORS_ORIGINS = ("https://app.example.com", "https://b.example.com")
# The headers a browser SDK sends cross-origin (the spec's list).
BROWSER_HEADERS = (
    "Authorization",
    "Content-Type",
    "If-None-Match",
    "X-Org-Id",
    "X-Project-Id",
    "X-Env",
)


# --- servers and helpers ----------------------------------------------------------------


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Iterator[Server]:
    yield from serve_for_module(tmp_path_factory, name, **env)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on the defaults, shared by the module."""
    yield from _serve(tmp_path_factory, "api")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose body limit is SMALL_BODY_BYTES."""
    yield from _serve(tmp_path_factory, "small", COLLECTOR_MAX_BODY_BYTES=str(SMALL_BODY_BYTES))


@pytest.fixture(scope="module")
def cors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that allows the CORS_ORIGINS."""
    yield from _serve(tmp_path_factory, "cors", COLLECTOR_CORS_ORIGINS=",".join(CORS_ORIGINS))


def unique_id(prefix: str) -> str:
    """An id in the iOS shape (prefix + 16 lowercase characters), unique to the run."""
    return prefix + "".join(secrets.choice(string.ascii_lowercase) for _ in range(16))


def post_and_collect(
    server: Server, body: Any = None, **kwargs: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """POST, then return the answer and the events this request added to the queue."""
    before = len(server.stored())
    response = server.post(body, **kwargs)
    return response, server.stored()[before:]


def canonical(value: Any) -> str:
    """JSON text that tells 1 from 1.0 and true from 1, for exact comparisons."""
    return json.dumps(value, sort_keys=True, allow_nan=False)


def assert_stored_as_sent(stored: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
    assert stored == sent
    assert [canonical(e) for e in stored] == [canonical(e) for e in sent]


def assert_error(
    response: httpx.Response, status: HTTPStatus, message: str | None = None
) -> dict[str, Any]:
    """The answer is `status` in the documented error shape; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == status.phrase
    assert isinstance(body["message"], str) and body["message"]
    if message is not None:
        assert body["message"] == message
    return body


def sized_body(size: int) -> bytes:
    """A valid one-event body of exactly `size` bytes (padded in `properties`)."""

    def body(pad: int) -> bytes:
        document = {"events": [event(properties={"pad": "x" * pad})]}
        return json.dumps(document, separators=(",", ":")).encode()

    raw = body(0)
    assert len(raw) <= size
    return body(size - len(raw))


def key_file(server: Server) -> Path:
    return server.data_dir / "keys.json"


# --- health (first, so the server is fresh) ---------------------------------------------


def test_healthz_and_readyz_answer_200_on_a_fresh_server(api: Server) -> None:
    assert api.stored() == []
    for path in ("/healthz", "/readyz"):
        response = httpx.get(f"{api.url}{path}", timeout=5)
        assert response.status_code == 200, response.text


# --- 200 ----------------------------------------------------------------------------------


def test_valid_events_are_accepted_written_and_stored_as_sent(api: Server) -> None:
    sent = [event("track", id=unique_id("trk_")), event("decision", id=unique_id("dec_"))]
    response, stored = post_and_collect(api, {"events": sent})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert_stored_as_sent(stored, sent)


def test_invalid_events_are_reported_by_index_and_the_valid_ones_stored(api: Server) -> None:
    valid = [event("track", id=unique_id("trk_")), event("exposure", id=unique_id("exp_"))]
    events: list[Any] = [
        valid[0],
        event("decision", layers=None),  # 1: layers not an array
        event("track", event=""),  # 2: empty event name
        valid[1],
        "not an object",  # 4
        event("pageview"),  # 5: unknown type
        event("track", timestamp="yesterday"),  # 6: not ISO 8601
        {k: v for k, v in event("decision").items() if k != "layers"},  # 7: layers missing
    ]
    response, stored = post_and_collect(api, {"events": events})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["written"]) == (2, 2)
    errors = body["validationErrors"]
    assert [e["index"] for e in errors] == [1, 2, 4, 5, 6, 7]
    assert all(isinstance(e["error"], str) and e["error"] for e in errors)
    by_index = {e["index"]: e["error"] for e in errors}
    assert by_index[1].startswith("layers")
    assert by_index[2].startswith("event")
    assert by_index[6].startswith("timestamp")
    assert by_index[7].startswith("layers")
    assert_stored_as_sent(stored, valid)


def test_retried_event_ids_are_accepted_but_not_written_twice(api: Server) -> None:
    first = event("track", id=unique_id("trk_"))
    second = event("track", id=unique_id("trk_"))
    response, stored = post_and_collect(api, {"events": [first]})
    assert response.json() == {"accepted": 1, "written": 1, "pipelineWritten": 1}
    # A client retry of the same batch, plus one new event and a repeat inside the request.
    response, again = post_and_collect(api, {"events": [first, second, second]})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 3, "written": 1, "pipelineWritten": 1}
    assert_stored_as_sent(stored + again, [first, second])


def test_events_with_an_empty_id_are_not_taken_for_retries(api: Server) -> None:
    sent = [event("track", id="", event="a"), event("track", id="", event="b")]
    response, stored = post_and_collect(api, {"events": sent})
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert_stored_as_sent(stored, sent)


def test_an_event_with_a_lone_surrogate_is_accepted_and_stored_as_sent(api: Server) -> None:
    # JSON.stringify of a string cut inside an emoji sends a lone "\ud83d" escape.
    good = event("track", id=unique_id("trk_"))
    cut = event("track", id=unique_id("trk_"), properties={"title": "cut \ud83d"})
    content = json.dumps({"events": [cut, good]}).encode()
    response, stored = post_and_collect(api, content=content, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert_stored_as_sent(stored, [cut, good])


def test_a_request_of_10000_events_is_taken_whole(api: Server) -> None:
    sent = [event("track", id=f"trk_{i:05d}_{unique_id('')}") for i in range(10_000)]
    response, stored = post_and_collect(api, {"events": sent})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 10_000, "written": 10_000, "pipelineWritten": 10_000}
    assert_stored_as_sent(stored, sent)


# --- 400 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"not json", b"", b'{"events": [', b"\xff\xfe{}"],
    ids=["text", "empty", "truncated", "not-utf8"],
)
def test_a_body_that_is_not_json_answers_400(api: Server, content: bytes) -> None:
    response, stored = post_and_collect(api, content=content, headers=JSON)
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []


@pytest.mark.parametrize(
    "document",
    [{}, {"events": None}, {"events": "x"}, {"events": {"0": {}}}, {"events": []}, [], None, 7],
    ids=["missing", "null", "string", "object", "empty", "top-array", "top-null", "top-number"],
)
def test_an_events_field_that_is_not_a_non_empty_array_answers_400(
    api: Server, document: Any
) -> None:
    response, stored = post_and_collect(api, content=json.dumps(document).encode(), headers=JSON)
    assert_error(response, HTTPStatus.BAD_REQUEST, ENVELOPE_MESSAGE)
    assert stored == []


def test_a_request_of_10001_events_answers_400_naming_the_limit(api: Server) -> None:
    events = [event("track") for _ in range(10_001)]
    response, stored = post_and_collect(api, {"events": events})
    assert_error(response, HTTPStatus.BAD_REQUEST, ENVELOPE_MESSAGE)
    assert stored == []


def test_a_request_with_no_valid_event_answers_400_with_validation_errors(api: Server) -> None:
    events = [{"type": "decision"}, event("track", event=""), 5]
    response, stored = post_and_collect(api, {"events": events})
    body = assert_error(response, HTTPStatus.BAD_REQUEST)
    assert [e["index"] for e in body["validationErrors"]] == [0, 1, 2]
    assert stored == []


# --- 401 ----------------------------------------------------------------------------------


def _post_with_authorization(server: Server, authorization: str | None) -> httpx.Response:
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization
    return httpx.post(
        f"{server.url}/v1/events/batch", json={"events": [event()]}, headers=headers, timeout=10
    )


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer traffical_sk_not_a_key_this_server_made",
        "Token {key}",
        "{key}",
    ],
    ids=["absent", "empty", "basic", "bearer-alone", "unknown", "token", "bare"],
)
def test_a_missing_or_unknown_key_answers_401(api: Server, authorization: str | None) -> None:
    header = None if authorization is None else authorization.format(key=api.key)
    before = len(api.stored())
    response = _post_with_authorization(api, header)
    assert_error(response, HTTPStatus.UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
    assert len(api.stored()) == before


def test_an_expired_key_answers_401(api: Server) -> None:
    key = create_key(
        api.data_dir, "--scope", "sdk:write", "--name", "expired", "--expires", "2020-01-01"
    )
    assert_error(api.post({"events": [event()]}, key=key), HTTPStatus.UNAUTHORIZED)


def test_a_key_created_while_serving_works_at_once_and_revoking_it_takes_effect(
    api: Server,
) -> None:
    key = create_key(api.data_dir, "--scope", "sdk:write", "--name", "revoke-me")
    accepted = api.post({"events": [event()]}, key=key)
    assert accepted.status_code == 200, accepted.text

    done = run_cli("keys", "revoke", "revoke-me", data_dir=api.data_dir)
    assert done.returncode == 0, done.stderr
    response, stored = post_and_collect(api, {"events": [event()]}, key=key)
    assert_error(response, HTTPStatus.UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
    assert stored == []
    # Other keys are untouched.
    assert api.post({"events": [event()]}).status_code == 200


# --- 403 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_args",
    [
        ["--scope", "sdk:read"],
        ["--scope", "sdk:write", "--project", "proj_other"],
        ["--scope", "sdk:write", "--env", "staging"],
        ["--scope", "sdk:write", "--project", "proj_test", "--env", "staging"],
    ],
    ids=["read-only", "other-project", "other-env", "right-project-other-env"],
)
def test_a_key_that_may_not_write_these_events_answers_403(
    api: Server, key_args: list[str]
) -> None:
    key = create_key(api.data_dir, *key_args, "--name", unique_id("forbidden-"))
    response, stored = post_and_collect(api, {"events": [event()]}, key=key)
    assert_error(response, HTTPStatus.FORBIDDEN)
    assert stored == []


def test_a_key_restricted_to_the_events_project_and_env_is_accepted(api: Server) -> None:
    key = create_key(
        api.data_dir, "--scope", "sdk:write", "--project", "proj_test", "--env", "production"
    )
    sent = [event(id=unique_id("trk_"))]
    response, stored = post_and_collect(api, {"events": sent}, key=key)
    assert response.status_code == 200, response.text
    assert_stored_as_sent(stored, sent)


def test_a_restricted_key_is_refused_when_one_event_targets_another_project(
    api: Server,
) -> None:
    key = create_key(api.data_dir, "--scope", "sdk:write", "--project", "proj_test")
    events = [event(), event(projectId="proj_other")]
    response, stored = post_and_collect(api, {"events": events}, key=key)
    assert_error(response, HTTPStatus.FORBIDDEN)
    assert stored == []


# --- 413 ----------------------------------------------------------------------------------


def test_a_body_at_the_byte_limit_is_accepted_and_one_byte_over_answers_413(
    small: Server,
) -> None:
    response, stored = post_and_collect(small, content=sized_body(SMALL_BODY_BYTES), headers=JSON)
    assert response.status_code == 200, response.text
    assert len(stored) == 1

    over = sized_body(SMALL_BODY_BYTES + 1)
    response, stored = post_and_collect(small, content=over, headers=JSON)
    assert_error(response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    assert stored == []


def test_a_chunked_body_over_the_byte_limit_answers_413(small: Server) -> None:
    over = sized_body(SMALL_BODY_BYTES + 1000)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count itself
        for start in range(0, len(over), 500):
            yield over[start : start + 500]

    before = len(small.stored())
    response = httpx.post(
        f"{small.url}/v1/events/batch",
        content=chunks(),
        headers={**JSON, "Authorization": f"Bearer {small.key}"},
        timeout=10,
    )
    assert_error(response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    assert len(small.stored()) == before


def test_a_gzip_body_is_capped_by_its_decompressed_size(small: Server) -> None:
    gzip_headers = {**JSON, "Content-Encoding": "gzip"}
    at_limit = gzip.compress(sized_body(SMALL_BODY_BYTES))
    response, stored = post_and_collect(small, content=at_limit, headers=gzip_headers)
    assert response.status_code == 200, response.text
    assert len(stored) == 1

    over = gzip.compress(sized_body(SMALL_BODY_BYTES + 1))
    assert len(over) < SMALL_BODY_BYTES  # only its decompressed size is over the limit
    response, stored = post_and_collect(small, content=over, headers=gzip_headers)
    assert_error(response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    assert stored == []


def test_a_gzip_bomb_answers_413_and_the_server_keeps_serving(api: Server) -> None:
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    response, stored = post_and_collect(
        api, content=bomb, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert_error(response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    assert stored == []
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200


# --- 415 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
    ],
    ids=["missing", "text", "text-charset", "form", "multipart", "xml"],
)
def test_a_content_type_other_than_json_answers_415(api: Server, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    content = json.dumps({"events": [event()]}).encode()
    response, stored = post_and_collect(api, content=content, headers=headers)
    assert_error(response, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    assert stored == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/json;charset=UTF-8", "Application/JSON"],
)
def test_json_content_types_with_parameters_are_accepted(api: Server, content_type: str) -> None:
    sent = [event(id=unique_id("trk_"))]
    content = json.dumps({"events": sent}).encode()
    response, stored = post_and_collect(
        api, content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    assert_stored_as_sent(stored, sent)


# --- 503 ----------------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    path.write_text('{"version": 1, "keys": [')


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("break_store", [_corrupt, _replace_with_directory], ids=["corrupt", "dir"])
def test_an_unreadable_key_store_answers_503_with_retry_after_then_recovers(
    api: Server, break_store: Callable[[Path], None]
) -> None:
    path = key_file(api)
    saved = path.read_bytes()
    try:
        break_store(path)
        for key in (api.key, "traffical_sk_unknown"):  # no key can be judged, so none is 401
            response, stored = post_and_collect(api, {"events": [event()]}, key=key)
            assert_error(response, HTTPStatus.SERVICE_UNAVAILABLE)
            assert int(response.headers["Retry-After"]) > 0
            assert stored == []
        assert httpx.get(f"{api.url}/readyz", timeout=5).status_code == 503
    finally:
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(saved)
        path.chmod(0o600)
    assert api.post({"events": [event()]}).status_code == 200
    assert httpx.get(f"{api.url}/readyz", timeout=5).status_code == 200


# --- routes, methods, redirects -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/nothing"), ("POST", "/v1/nothing"), ("POST", "/v2/events")],
)
def test_an_unknown_route_answers_404_in_the_error_shape(
    api: Server, method: str, path: str
) -> None:
    response = httpx.request(method, f"{api.url}{path}", timeout=5)
    assert_error(response, HTTPStatus.NOT_FOUND)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/events"),
        ("GET", "/v1/events/batch"),
        ("PUT", "/v1/events"),
        ("DELETE", "/v1/events/batch"),
        ("POST", "/healthz"),
    ],
)
def test_a_wrong_method_answers_405_in_the_error_shape(api: Server, method: str, path: str) -> None:
    response = httpx.request(method, f"{api.url}{path}", timeout=5)
    assert_error(response, HTTPStatus.METHOD_NOT_ALLOWED)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/events/"),
        ("POST", "/v1/events/batch/"),
        ("POST", "//v1/events/batch"),
        ("POST", "/V1/Events/Batch"),
        ("POST", "/v1/events/batch?x=1"),
        ("GET", "/v1/events/"),
        ("GET", "/healthz/"),
        ("GET", "/v1"),
        ("GET", "/v1/config/proj_test?env=production"),
    ],
)
def test_no_answer_is_a_redirect(api: Server, method: str, path: str) -> None:
    headers = {**JSON, "Authorization": f"Bearer {api.key}"}
    content = json.dumps({"events": [event()]}).encode() if method == "POST" else None
    response = httpx.request(
        method, f"{api.url}{path}", content=content, headers=headers, timeout=5
    )
    assert not 300 <= response.status_code < 400, (response.status_code, response.headers)
    assert "location" not in response.headers


# --- what real SDKs send ------------------------------------------------------------------


def _layer(**fields: Any) -> dict[str, Any]:
    return {"layerId": "layer_1", "bucket": 7, **fields}


REAL_SDK_EVENTS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "track-empty-unit-key": lambda: [event("track", unitKey="")],
    "track-numeric-unit-key": lambda: [event("track", unitKey=12345), event("track", unitKey=4.5)],
    "decision-skipped-layer": lambda: [event("decision", layers=[_layer(bucket=-1)])],
    "layers-without-policy-fields": lambda: [
        event("decision", layers=[_layer(), _layer(layerId="layer_2", bucket=0)]),
        event("exposure", layers=[_layer()]),
    ],
    "attribution-only-layer": lambda: [
        event("decision", layers=[_layer(policyId="pol_1", attributionOnly=True)]),
        event("exposure", layers=[_layer(policyId="pol_1", attributionOnly=False)]),
    ],
    "huge-bucket": lambda: [
        event("decision", layers=[_layer(bucket=9999), _layer(layerId="l2", bucket=123456)])
    ],
    "timestamp-ms-z": lambda: [event("track", timestamp="2026-05-21T10:30:00.123Z")],
    "timestamp-no-ms": lambda: [event("decision", timestamp="2026-05-21T10:30:00Z")],
    "timestamp-offset": lambda: [
        event(
            "track",
            timestamp="2026-05-21T12:30:00+02:00",
            eventTimestamp="2026-05-21T12:29:58.5-03:30",
        )
    ],
    "value-null": lambda: [event("track", value=None)],
    "values-non-numeric": lambda: [
        event(
            "track",
            value=3,
            values={"revenue": 10.5, "currency": "EUR", "ok": True, "n": None, "o": {"a": [1]}},
        )
    ],
    "large-properties": lambda: [
        event(
            "track",
            properties={"blob": "x" * 200_000, "list": list(range(2000)), "deep": {"a": {"b": 1}}},
        )
    ],
    "ios-ids": lambda: [
        event("decision", id=unique_id("exp_")),
        event("track", id=unique_id("exp_"), decisionId=unique_id("exp_")),
    ],
    "ulid-ids": lambda: [
        event("decision", id="dec_01HZY8K3T9QW4XJ5N6M7P8R9S0" + unique_id("")),
        event("exposure", id="exp_01HZY8K3T9QW4XJ5N6M7P8R9S1" + unique_id("")),
        event("track", id="trk_01HZY8K3T9QW4XJ5N6M7P8R9S2" + unique_id("")),
    ],
    "unknown-fields": lambda: [
        event(
            "decision",
            futureField={"nested": [1, 2.5, None, "Zürich 🚀"]},
            configVersion="v42",
            layers=[
                _layer(
                    policyKey="checkout",
                    allocationKey="treatment",
                    unitKey="userId",
                    unitKeyValue="user-1",
                    probability=0.5,
                    modelVersion="m3",
                    newLayerField={"x": 1},
                )
            ],
        ),
        event("track", anotherNewField=[True, False], properties=None),
    ],
    "every-documented-field": lambda: [
        event(
            "exposure",
            id=unique_id("exp_"),
            userId="u1",
            anonymousId="anon-1",
            sessionId="sess-1",
            requestId="req-1",
            context={"country": "DE", "plan": "pro"},
            sdkName="node",
            sdkVersion="1.2.3",
            assignments={"checkout.button_color": "green"},
            decisionId=unique_id("dec_"),
        ),
        event(
            "decision",
            id=unique_id("dec_"),
            requestedParameters=["checkout.button_color"],
            latencyMs=3,
            assignments={"checkout.button_color": "green", "n": 2},
        ),
        event(
            "track",
            id=unique_id("trk_"),
            properties={"sku": "SKU-1"},
            value=49.99,
            values={"revenue": 49.99},
            decisionId=unique_id("dec_"),
            attribution=[{"layerId": "layer_1", "policyId": "pol_1", "allocationName": "t"}],
            eventTimestamp="2026-05-21T10:29:00.000Z",
        ),
    ],
}


@pytest.mark.parametrize("case", list(REAL_SDK_EVENTS))
def test_what_real_sdks_send_is_accepted_and_stored_as_sent(api: Server, case: str) -> None:
    sent = REAL_SDK_EVENTS[case]()
    response, stored = post_and_collect(api, {"events": sent})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "accepted": len(sent),
        "written": len(sent),
        "pipelineWritten": len(sent),
    }
    assert_stored_as_sent(stored, sent)


@pytest.mark.parametrize("path", ["/v1/events", "/v1/events/batch"])
def test_both_event_paths_accept_and_store(api: Server, path: str) -> None:
    sent = [event("exposure", id=unique_id("exp_")), event("track", id=unique_id("trk_"))]
    response, stored = post_and_collect(api, {"events": sent}, path=path)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert_stored_as_sent(stored, sent)


def test_sdk_name_and_version_headers_are_accepted(api: Server) -> None:
    sent = [event("decision", id=unique_id("exp_")), event("track", id=unique_id("exp_"))]
    headers = {"X-SDK-Name": "traffical-ios", "X-SDK-Version": "0.9.1"}
    response, stored = post_and_collect(api, {"events": sent}, headers=headers)
    assert response.status_code == 200, response.text
    assert_stored_as_sent(stored, sent)


def test_bare_nan_and_infinity_tokens_are_accepted_and_stored_as_null(api: Server) -> None:
    track_id, decision_id = unique_id("trk_"), unique_id("dec_")
    # Python's json.dumps (allow_nan=True), as the Python SDK sends, pretty-printed.
    content = f"""{{"events": [
      {{"type": "track", "id": "{track_id}", "orgId": "org_test", "projectId": "proj_test",
        "env": "production", "unitKey": "", "timestamp": "2026-05-21T10:30:00.123Z",
        "event": "purchase", "value": NaN,
        "values": {{"up": Infinity, "down": -Infinity, "ok": 1.5, "n": 2}},
        "properties": {{"list": [NaN, 1, -Infinity], "name": "caf\\u00e9"}}}},
      {{"type": "decision", "id": "{decision_id}", "orgId": "org_test",
        "projectId": "proj_test", "env": "production", "unitKey": "user-1",
        "timestamp": "2026-05-21T10:30:00Z",
        "layers": [{{"layerId": "layer_1", "bucket": 3, "probability": NaN}}]}}
    ]}}""".encode()
    response, stored = post_and_collect(api, content=content, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    expected: list[dict[str, Any]] = [
        {
            "type": "track",
            "id": track_id,
            "orgId": "org_test",
            "projectId": "proj_test",
            "env": "production",
            "unitKey": "",
            "timestamp": "2026-05-21T10:30:00.123Z",
            "event": "purchase",
            "value": None,
            "values": {"up": None, "down": None, "ok": 1.5, "n": 2},
            "properties": {"list": [None, 1, None], "name": "café"},
        },
        {
            "type": "decision",
            "id": decision_id,
            "orgId": "org_test",
            "projectId": "proj_test",
            "env": "production",
            "unitKey": "user-1",
            "timestamp": "2026-05-21T10:30:00Z",
            "layers": [{"layerId": "layer_1", "bucket": 3, "probability": None}],
        },
    ]
    assert_stored_as_sent(stored, expected)


# --- gzip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP"])
def test_a_gzip_body_is_accepted_and_stored_as_sent(api: Server, encoding: str) -> None:
    sent = [event("decision", id=unique_id("dec_")), event("track", id=unique_id("trk_"))]
    content = gzip.compress(json.dumps({"events": sent}).encode())
    response, stored = post_and_collect(
        api, content=content, headers={**JSON, "Content-Encoding": encoding}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "written": 2, "pipelineWritten": 2}
    assert_stored_as_sent(stored, sent)


def _gzipped_events() -> bytes:
    return gzip.compress(json.dumps({"events": [event()] * 50}).encode())


@pytest.mark.parametrize(
    "content",
    [
        b"this is not gzip",
        _gzipped_events()[: len(_gzipped_events()) // 2],
        _gzipped_events()[:-8],  # the trailer (CRC and size) cut off
        b"",
    ],
    ids=["not-gzip", "truncated-half", "no-trailer", "empty"],
)
def test_a_corrupt_or_truncated_gzip_body_answers_400(api: Server, content: bytes) -> None:
    response, stored = post_and_collect(
        api, content=content, headers={**JSON, "Content-Encoding": "gzip"}
    )
    assert_error(response, HTTPStatus.BAD_REQUEST)
    assert stored == []


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, br"])
def test_an_unsupported_content_encoding_answers_415(api: Server, encoding: str) -> None:
    response, stored = post_and_collect(
        api, content=_gzipped_events(), headers={**JSON, "Content-Encoding": encoding}
    )
    assert_error(response, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    assert stored == []


# --- CORS ---------------------------------------------------------------------------------


def _header_set(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


@pytest.mark.parametrize("origin", CORS_ORIGINS)
@pytest.mark.parametrize("path", ["/v1/events/batch", "/v1/events"])
def test_a_preflight_from_an_allowed_origin_allows_the_browser_sdk_headers(
    cors: Server, origin: str, path: str
) -> None:
    response = httpx.options(
        f"{cors.url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": ",".join(BROWSER_HEADERS).lower(),
        },
        timeout=5,
    )
    assert 200 <= response.status_code < 300, response.text
    assert response.headers["access-control-allow-origin"] == origin
    allowed = _header_set(response.headers.get("access-control-allow-headers"))
    assert {h.lower() for h in BROWSER_HEADERS} <= allowed
    assert "post" in _header_set(response.headers.get("access-control-allow-methods"))


def test_a_post_from_an_allowed_origin_carries_allow_origin_and_exposes_etag(
    cors: Server,
) -> None:
    origin = CORS_ORIGINS[1]
    sent = [event(id=unique_id("trk_"))]
    response, stored = post_and_collect(cors, {"events": sent}, headers={"Origin": origin})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == origin
    assert "etag" in _header_set(response.headers.get("access-control-expose-headers"))
    assert_stored_as_sent(stored, sent)


def test_an_error_to_an_allowed_origin_carries_allow_origin(cors: Server) -> None:
    # Without it a browser sees a network error, not the 401 that stops the SDK.
    origin = CORS_ORIGINS[0]
    response = cors.post({"events": [event()]}, key="traffical_sk_nope", headers={"Origin": origin})
    assert_error(response, HTTPStatus.UNAUTHORIZED)
    assert response.headers["access-control-allow-origin"] == origin


# What the events route is sent, by case: the keyword arguments of `Server.post`, fresh
# ids each time (the two paths must each write their events).
ANSWERED_ALIKE: dict[str, Callable[[], dict[str, Any]]] = {
    "some events invalid": lambda: {
        "body": {"events": [event(id=unique_id("trk_")), {"type": "track"}, 7]}
    },
    "every event invalid": lambda: {"body": {"events": [{"type": "exposure"}]}},
    "not JSON": lambda: {"content": b'{"events": [', "headers": JSON},
    "no events array": lambda: {"body": {"event": [event()]}},
    "not a JSON content type": lambda: {
        "content": json.dumps({"events": [event()]}).encode(),
        "headers": {"Content-Type": "text/plain"},
    },
    "an unknown key": lambda: {"body": {"events": [event()]}, "key": "traffical_sk_nope"},
    "a corrupt gzip body": lambda: {
        "content": b"not gzip",
        "headers": {**JSON, "Content-Encoding": "gzip"},
    },
}


@pytest.mark.parametrize("case", ANSWERED_ALIKE)
def test_an_events_request_is_answered_alike_with_an_origin_and_without(
    cors: Server, case: str
) -> None:
    # With an Origin it takes Litestar's route (whose middleware adds the CORS headers);
    # without, the server's fast path (`events_fast_path`). Same status, body and type.
    request = ANSWERED_ALIKE[case]
    plain = cors.post(**request())
    with_origin = request()
    with_origin["headers"] = {**with_origin.get("headers", {}), "Origin": CORS_ORIGINS[0]}
    browser = cors.post(**with_origin)
    assert browser.headers["access-control-allow-origin"] == CORS_ORIGINS[0]
    assert "access-control-allow-origin" not in plain.headers
    assert (plain.status_code, plain.json()) == (browser.status_code, browser.json())
    assert plain.headers["content-type"] == browser.headers["content-type"]


def answered_500(server: Server) -> float:
    """The events requests `server` counts as answered 500 (`collector_requests`)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "collector_requests"
        for sample in family.samples
        if sample.name == "collector_requests_total" and sample.labels.get("status") == "500"
    )


@pytest.mark.parametrize("origin", [None, CORS_ORIGINS[0]], ids=["fast path", "Litestar's"])
def test_a_client_gone_before_its_body_is_in_is_no_error_and_stores_nothing(
    cors: Server, origin: str | None
) -> None:
    body = json.dumps({"events": [event(id=unique_id("trk_"))]}).encode()
    head = [
        "POST /v1/events/batch HTTP/1.1",
        f"Host: 127.0.0.1:{cors.port}",
        "Content-Type: application/json",
        f"Authorization: Bearer {cors.key}",
        f"Content-Length: {len(body)}",
        *([f"Origin: {origin}"] if origin else []),
    ]
    before, cut = len(cors.stored()), answered_500(cors)
    with socket.create_connection(("127.0.0.1", cors.port), timeout=5) as client:
        client.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[: len(body) // 2])
    # A request cut short is counted as a 500 once the server has seen it end (after it
    # logged whatever it logs of it).
    wait_for(lambda: answered_500(cors) > cut, "the server to count the cut request")
    after = cors.post({"events": [event(id=unique_id("trk_"))]})  # and serves on
    assert after.status_code == 200, after.text
    assert len(cors.stored()) == before + 1
    assert "unexpected error" not in cors.log()


def test_a_disallowed_origin_gets_no_allow_origin(cors: Server) -> None:
    origin = "https://evil.example.com"
    preflight = httpx.options(
        f"{cors.url}/v1/events/batch",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=5,
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert_error(preflight, HTTPStatus.BAD_REQUEST)  # our error shape, not text/plain
    assert (
        preflight.json()["message"]
        == "CORS preflight refused: Origin not allowed (see cors_origins)"
    )
    response = cors.post({"events": [event()]}, headers={"Origin": origin})
    assert "access-control-allow-origin" not in response.headers


def test_without_cors_origins_no_cors_headers_are_sent(api: Server) -> None:
    origin = CORS_ORIGINS[0]
    preflight = httpx.options(
        f"{api.url}/v1/events/batch",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=5,
    )
    response = api.post({"events": [event()]}, headers={"Origin": origin})
    assert response.status_code == 200, response.text
    for answer in (preflight, response):
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")]
