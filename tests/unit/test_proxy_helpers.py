"""collector/server/proxy.py, its pure helpers: the cache's query and key, entity tags and
their weak comparison, which headers go upstream and which come back, a stale answer from
the cache, and a redirect as an error.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from collector.errors import UpstreamRedirect
from collector.server.proxy import (
    STALE_HEADER,
    STALE_WARNING,
    canonical_query,
    entity_tags,
    forwarded,
    key_hash,
    matches,
    not_modified,
    passed,
    redirect,
    returned,
    segment,
    stale,
)
from collector.store.configcache import Bundle
from collector.upstream import Reply


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("env=a&x=1", "env=a&x=1"),
        ("x=1&env=a", "env=a&x=1"),
        ("", ""),
        ("b=&a=2", "a=2&b="),  # blank values kept
        ("env=a%20b", "env=a+b"),
        ("a=2&a=1", "a=1&a=2"),
    ],
)
def test_canonical_query_sorts_parameters_so_the_same_query_matches(
    query: str, canonical: str
) -> None:
    assert canonical_query(query) == canonical


def test_key_hash_is_the_sha256_of_the_bearer_token_or_none() -> None:
    assert key_hash("Bearer secret") == hashlib.sha256(b"secret").hexdigest()
    assert key_hash("bearer secret") == key_hash("Bearer secret")
    assert key_hash("Basic secret") is None
    assert key_hash(None) is None


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        ('"v1"', {'"v1"'}),
        ('W/"v1", "v2" ,', {'"v1"', '"v2"'}),
        ("*", {"*"}),
        ("", set()),
        (None, set()),
    ],
)
def test_entity_tags_are_the_opaque_tags_with_weak_prefixes_dropped(
    header: str | None, tags: set[str]
) -> None:
    assert entity_tags(header) == tags


def test_matches_compares_weakly_and_star_matches_any_tag() -> None:
    assert matches({'"v1"'}, '"v1"')
    assert matches({'"v1"'}, 'W/"v1"')
    assert matches(entity_tags('W/"v1"'), '"v1"')
    assert matches({"*"}, '"anything"')
    assert not matches({'"v1"'}, '"v2"')
    assert not matches(set(), '"v1"')
    assert not matches({"*"}, None)
    assert not matches({'"v1"'}, "")


def test_only_the_sdks_headers_go_upstream_with_lower_case_names() -> None:
    sent = forwarded(
        {
            "Authorization": "Bearer k",
            "If-None-Match": '"v1"',
            "X-Org-Id": "org",
            "X-SDK-Version": "1.2",
            "x-sdk-name": "js",
            "Cookie": "session=secret",
            "Host": "collector.local",
            "Content-Length": "12",
        }
    )

    assert sent == {
        "authorization": "Bearer k",
        "if-none-match": '"v1"',
        "x-org-id": "org",
        "x-sdk-version": "1.2",
        "x-sdk-name": "js",
    }


def test_only_the_answer_headers_that_matter_come_back_in_their_usual_spelling() -> None:
    upstream = {
        "etag": '"v1"',
        "cache-control": "max-age=60",
        "content-type": "application/json",
        "retry-after": "5",
        "set-cookie": "x=y",
        "server": "upstream",
    }

    assert returned(upstream) == {
        "ETag": '"v1"',
        "Cache-Control": "max-age=60",
        "Content-Type": "application/json",
        "Retry-After": "5",
    }
    assert returned({}) == {}


def test_a_passed_answer_keeps_the_status_and_body_but_a_304_has_none() -> None:
    ok = passed(Reply(200, {"etag": '"v1"', "x-internal": "1"}, b"{}"))
    unchanged = passed(Reply(304, {"etag": '"v1"'}, b"ignored"))

    assert (ok.status, ok.body, ok.headers) == (200, b"{}", {"ETag": '"v1"'})
    assert (unchanged.status, unchanged.body) == (304, b"")
    assert not_modified({"etag": '"v1"', "content-type": "x"}).headers == {"ETag": '"v1"'}


def bundle(age_s: float, etag: str | None = '"v1"') -> Bundle:
    return Bundle(etag, None, "max-age=60", b'{"config":1}', time.time() - age_s)


def test_a_stale_answer_serves_the_cached_bundle_marked_stale_with_its_age() -> None:
    answer = stale(bundle(age_s=90), wanted=set())

    assert answer.status == 200
    assert answer.body == b'{"config":1}'
    assert answer.headers[STALE_HEADER] == "true"
    assert answer.headers["Warning"] == STALE_WARNING
    assert 89 <= int(answer.headers["Age"]) <= 91
    assert answer.headers["ETag"] == '"v1"'
    assert answer.headers["Cache-Control"] == "max-age=60"
    assert answer.headers["Content-Type"] == "application/json"  # the default


def test_a_stale_answer_to_a_client_holding_that_version_is_a_304() -> None:
    answer = stale(bundle(age_s=1), wanted={'"v1"'})

    assert (answer.status, answer.body) == (304, b"")
    assert answer.headers[STALE_HEADER] == "true"
    assert "Content-Type" not in answer.headers


def test_a_stale_bundle_without_an_etag_is_served_whole() -> None:
    answer = stale(bundle(age_s=0, etag=None), wanted={"*"})

    assert answer.status == 200
    assert "ETag" not in answer.headers


def test_a_redirect_is_an_upstream_error_naming_the_status() -> None:
    error = redirect(307)

    assert isinstance(error, UpstreamRedirect)
    assert "307" in error.message and "upstream_url" in error.message


def test_a_project_is_one_path_segment() -> None:
    assert segment("proj_a") == "proj_a"
    assert segment("../admin?x=1#y") == "..%2Fadmin%3Fx%3D1%23y"
