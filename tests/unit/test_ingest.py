"""collector/server/ingest.py: one events request in process, from body bytes to committed
events, through the real writer (`GroupWriter`: real spool and seen-ids files in tmp_path)
with only the process hop removed; and its pure steps (decompress, finding each event's
own bytes on the fast and the slow path, the envelope).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from collector.errors import BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType
from collector.server.auth import ApiKey, KeyStore
from collector.server.commit import Committer
from collector.server.counting import EventCounter, Note
from collector.server.ingest import (
    Envelope,
    Ingest,
    Outcome,
    decode_body,
    read_events,
    require_json,
)
from collector.server.writer import Events, GroupWriter, Invalid, WriterConfig
from collector.store.counts import Count, Counts
from collector.store.datadir import DataDir

from conftest import event, stored_events


class InProcessCommitter:
    """The server's `Committer` without its writer process: the same `GroupWriter.commit`,
    called here, one request per group."""

    def __init__(self, writer: GroupWriter) -> None:
        self.writer = writer

    async def write(
        self,
        events: Events,
        notes: list[Note],
        size: int = 0,
        invalid: list[Invalid] | None = None,
    ) -> list[int]:
        return self.writer.commit([events], [notes], invalid or [])[0]


@dataclass
class Pipeline:
    data_dir: Path
    ingest: Ingest
    counts: Counts
    keys: KeyStore

    def key(self, **limits: Any) -> ApiKey:
        _, secret = self.keys.create(["sdk:write"], **limits)
        return self.keys.authenticate(f"Bearer {secret}")

    def handle(self, events: list[Any], key: ApiKey) -> Outcome:
        return asyncio.run(self.ingest.handle(orjson.dumps({"events": events}), key))


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    data_dir = tmp_path / "data"
    writer = GroupWriter(
        WriterConfig(
            data_dir,
            sync="normal",
            budget_bytes=1 << 30,
            dedup_window_s=3600,
            dedup_max_bytes=1 << 27,
        )
    )
    counts = Counts.writer(DataDir(data_dir))
    committer = cast(Committer, InProcessCommitter(writer))
    try:
        yield Pipeline(
            data_dir,
            Ingest(committer, 1000, EventCounter(counts)),
            counts,
            KeyStore(DataDir(data_dir)),
        )
    finally:
        writer.close()
        counts.close()


def test_valid_events_are_committed_and_answered_accepted_and_written(
    pipeline: Pipeline,
) -> None:
    sent = [event(id="a"), event("exposure", id="b"), event("decision", id="c")]

    outcome = pipeline.handle(sent, pipeline.key())

    assert outcome.answer() == {"accepted": 3, "written": 3, "pipelineWritten": 3}
    assert stored_events(pipeline.data_dir) == sent


def test_invalid_events_are_reported_by_index_and_the_valid_ones_still_committed(
    pipeline: Pipeline,
) -> None:
    good = [event(id="a"), event(id="d")]
    sent = [good[0], {"type": "track"}, event("exposure", layers="nope"), good[1]]

    outcome = pipeline.handle(sent, pipeline.key())

    answer = outcome.answer()
    assert (answer["accepted"], answer["written"]) == (2, 2)
    assert [e["index"] for e in answer["validationErrors"]] == [1, 2]
    assert "layers" in answer["validationErrors"][1]["error"]
    assert stored_events(pipeline.data_dir) == good


def test_a_request_with_no_valid_event_is_a_bad_request_and_commits_nothing(
    pipeline: Pipeline,
) -> None:
    with pytest.raises(BadRequest, match="no event in the request is valid") as caught:
        pipeline.handle([{"type": "track"}, 42], pipeline.key())

    assert [e["index"] for e in caught.value.extra["validationErrors"]] == [0, 1]
    assert stored_events(pipeline.data_dir) == []


def test_a_retry_with_the_same_ids_is_accepted_but_not_written_again(
    pipeline: Pipeline,
) -> None:
    key = pipeline.key()
    sent = [event(id="a"), event(id="b")]
    pipeline.handle(sent, key)

    again = pipeline.handle([*sent, event(id="c")], key)

    assert again.answer() == {"accepted": 3, "written": 1, "pipelineWritten": 1}
    assert [e["id"] for e in stored_events(pipeline.data_dir)] == ["a", "b", "c"]
    retried = pipeline.handle(sent, key)
    assert retried.answer() == {"accepted": 2, "written": 0, "pipelineWritten": 0}
    assert len(stored_events(pipeline.data_dir)) == 3


def test_events_without_an_id_are_never_taken_for_retries(pipeline: Pipeline) -> None:
    key = pipeline.key()
    sent = [event(), event(id=""), event()]

    assert pipeline.handle(sent, key).answer() == {
        "accepted": 3,
        "written": 3,
        "pipelineWritten": 3,
    }
    assert pipeline.handle(sent, key).answer() == {
        "accepted": 3,
        "written": 3,
        "pipelineWritten": 3,
    }
    assert len(stored_events(pipeline.data_dir)) == 6


def test_a_key_restricted_to_another_project_is_forbidden_and_nothing_is_committed(
    pipeline: Pipeline,
) -> None:
    key = pipeline.key(project="proj_other")

    with pytest.raises(Forbidden, match="restricted to project 'proj_other'"):
        pipeline.handle([event(id="a", projectId="proj_other"), event(id="b")], key)

    assert stored_events(pipeline.data_dir) == []
    pipeline.counts.flush()
    assert pipeline.counts.recent(Count.EVENTS_REJECTED, 2) == {("Forbidden",): 2}
    assert sum(pipeline.counts.recent(Count.EVENTS_RECEIVED, 2).values()) == 2
    assert pipeline.counts.recent(Count.EVENTS_ACCEPTED, 2) == {}


def test_a_key_restricted_to_its_project_and_env_may_send_there(pipeline: Pipeline) -> None:
    key = pipeline.key(project="proj_test", env="production")

    assert pipeline.handle([event(id="a")], key).answer() == {
        "accepted": 1,
        "written": 1,
        "pipelineWritten": 1,
    }
    with pytest.raises(Forbidden, match="restricted to environment 'production'"):
        pipeline.handle([event(id="b", env="staging")], key)


def test_what_was_received_accepted_and_written_is_counted(pipeline: Pipeline) -> None:
    key = pipeline.key()
    pipeline.handle([event(id="a"), {"type": "track"}], key)
    pipeline.handle([event(id="a")], key)
    pipeline.counts.flush()

    labels = ("org_test", "proj_test", "production", "track")
    recent = pipeline.counts.recent
    assert recent(Count.EVENTS_RECEIVED, 2) == {labels: 2, ("", "", "", "track"): 1}
    assert recent(Count.EVENTS_ACCEPTED, 2) == {labels: 2}
    assert recent(Count.EVENTS_WRITTEN, 2) == {labels: 1}
    assert recent(Count.EVENTS_DEDUPLICATED, 2) == {labels: 1}
    assert sum(recent(Count.EVENTS_REJECTED, 2).values()) == 1


# --- the pure steps ----------------------------------------------------------------------------


def test_a_gzipped_body_is_inflated_and_a_plain_one_passed_through() -> None:
    body = orjson.dumps({"events": [event()]})

    assert decode_body(gzip.compress(body), "gzip", 1 << 20) == body
    assert decode_body(gzip.compress(body), " X-GZIP ", 1 << 20) == body
    assert decode_body(body, None, 1 << 20) == body


def test_a_body_over_the_limit_is_too_large_before_or_after_inflating() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_body(b"x" * 101, None, 100)
    with pytest.raises(PayloadTooLarge, match="after decompression"):
        decode_body(gzip.compress(b" " * 10_000), "gzip", 100)  # a tiny gzip, a large body


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not gzip at all", "not valid gzip"),
        (gzip.compress(b"{}")[:-4], "truncated"),
        (gzip.compress(b"{}") * 2, "data after its end"),
    ],
)
def test_a_broken_gzip_body_is_a_bad_request(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_body(raw, "gzip", 1 << 20)


def test_only_json_and_gzip_are_supported() -> None:
    require_json("application/json; charset=utf-8")
    require_json("Application/JSON")
    with pytest.raises(UnsupportedMediaType, match="not text/plain"):
        require_json("text/plain")
    with pytest.raises(UnsupportedMediaType, match="not missing"):
        require_json(None)
    with pytest.raises(UnsupportedMediaType, match="br"):
        decode_body(b"", "br", 100)


READ = Envelope(1000)


def test_each_event_is_found_as_the_bytes_it_spans_in_the_body() -> None:
    events = [
        b'{"a" : 1.0e+21 ,\n "b":"\\/\\u30e6"}',
        b"[ ]",
        b"-0",
        b"123456789012345678901234567890",
    ]
    body = b'{"sdk":"x", "events" :[ ' + b" ,\n\t".join(events) + b" ] }"

    stored, validated = read_events(body, READ)

    assert validated is stored
    assert [bytes(raw) for raw in stored] == events


def test_nan_and_infinity_become_null_only_in_the_events_that_hold_them() -> None:
    kept = b'{"s":"NaN Infinity \\" NaN", "n": 1.50}'
    body = b'{"events":[' + kept + b', {"a":NaN,"b":[-Infinity, Infinity],"c":"NaN"}]}'

    stored, validated = read_events(body, READ)

    assert stored == [kept, b'{"a":null,"b":[null, null],"c":"NaN"}']
    assert validated == stored


def test_a_lone_surrogate_is_stored_as_sent_and_validated_as_a_private_use_character() -> None:
    sent = [b'{"id":"a\\ud83d","pair":"\\ud83d\\ude00"}', b'{"id":"\\\\ud800 is text"}']
    body = b'{"events":[' + b",".join(sent) + b"]}"

    stored, validated = read_events(body, READ)

    assert stored == sent
    assert orjson.loads(validated[0]) == {"id": "a\ue83d", "pair": "\U0001f600"}
    assert orjson.loads(validated[1]) == {"id": "\\ud800 is text"}  # text after a backslash


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "not valid JSON"),
        (b'{"events":["\xff"]}', "not UTF-8"),
        (b'{"events":[' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested too deeply"),
        (b'{"events":[]}', "non-empty array"),
        (b'{"events":[1]} x', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),  # not an object, and not JSON either
        (b'{"events":{}}', "non-empty array"),
        (b'{"events":[' + b"1," * 1000 + b"1]}", "max 1000"),
    ],
    ids=["not-json", "not-utf8", "deep", "empty", "trailing", "open-array", "object", "too-many"],
)
def test_what_is_not_an_events_document_is_a_bad_request(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        read_events(body, READ)
