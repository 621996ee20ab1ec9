"""collector/store/counts.py: counts added by a writer and read back by a reader of the
same file: per-minute sums over recent minutes, running totals, names stored as the enums'
strings, and a reader of a missing file that sees none and creates nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.store import counts as counts_module
from collector.store.counts import (
    OTHER,
    Count,
    Counts,
    DeadLetterReason,
    ProxyOutcome,
    ProxyRoute,
    UpstreamOutcome,
    bucket,
)
from collector.store.datadir import DataDir


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    return DataDir(tmp_path)


@pytest.fixture
def writer(data_dir: DataDir) -> Iterator[Counts]:
    counts = Counts.writer(data_dir, window_minutes=60)
    yield counts
    counts.close()


def read(data_dir: DataDir) -> Counts:
    return Counts.reader(data_dir, window_minutes=60)


def test_counts_flushed_by_the_writer_are_read_back_by_a_reader(
    data_dir: DataDir, writer: Counts
) -> None:
    writer.add(Count.EVENTS_REJECTED, ("invalid layers",), 3)
    writer.add(Count.EVENTS_REJECTED, ("invalid layers",))
    writer.add(Count.EVENTS_REJECTED, ("QueueFull",), 2)
    writer.counter(Count.FORWARDED)[("proj_a", "production")] += 10
    writer.flush()

    reader = read(data_dir)
    try:
        assert reader.recent(Count.EVENTS_REJECTED, 2) == {
            ("invalid layers",): 4,
            ("QueueFull",): 2,
        }
        assert reader.recent(Count.FORWARDED, 5) == {("proj_a", "production"): 10}
        assert reader.recent(Count.EXPOSURES, 60) == {}
    finally:
        reader.close()


def test_flushes_add_up_and_float_counts_stay_floats(data_dir: DataDir, writer: Counts) -> None:
    key = ("p", "e", "layer", "pol", "treatment")
    writer.add(Count.EXPOSURE_SHARES, key, 0.25)
    writer.flush()
    writer.add(Count.EXPOSURE_SHARES, key, 0.5)
    writer.flush()
    writer.flush()  # nothing pending: nothing changes

    reader = read(data_dir)
    try:
        assert reader.recent(Count.EXPOSURE_SHARES, 2) == {key: 0.75}
        assert reader.all_totals() == {}  # a window-only count: no totals
        writer.add(Count.EVENTS_REJECTED, ("QueueFull",), 0.5)
        writer.flush()
        assert reader.all_totals() == {"events_rejected": {("QueueFull",): 0.5}}
    finally:
        reader.close()


def test_recent_counts_only_the_last_minutes_while_totals_keep_everything(
    data_dir: DataDir, writer: Counts
) -> None:
    now = time.time()
    writer.counter(Count.REQUESTS, at=now)[("200",)] += 1
    writer.counter(Count.REQUESTS, at=now - 180)[("200",)] += 2  # three minutes ago
    writer.counter(Count.REQUESTS, at=now - 2 * 3600)[("200",)] += 4  # past the window
    writer.flush()

    reader = read(data_dir)
    try:
        # Two minutes: this one and the last, in case a minute ended since `now`.
        assert reader.recent(Count.REQUESTS, 2) == {("200",): 1}
        assert reader.recent(Count.REQUESTS, 5) == {("200",): 3}
        assert reader.recent(Count.REQUESTS, 24 * 60) == {("200",): 3}  # older minute forgotten
        assert reader.all_totals()["requests"] == {("200",): 7}
    finally:
        reader.close()


def test_names_and_labels_are_stored_as_the_enums_strings(
    data_dir: DataDir, writer: Counts
) -> None:
    writer.add(Count.UPSTREAM_REQUESTS, (UpstreamOutcome.KEY_REJECTED,))
    writer.add(Count.DEAD_LETTERED, (DeadLetterReason.MAX_AGE,), 5)
    writer.add(Count.PROXY_REQUESTS, (ProxyRoute.CONFIG, ProxyOutcome.STALE))
    writer.flush()

    reader = read(data_dir)
    try:
        totals = reader.all_totals()
    finally:
        reader.close()

    assert totals == {
        "upstream_requests": {("key_rejected",): 1},
        "dead_lettered": {("max_age",): 5},
        "proxy_requests": {("config", "stale"): 1},
    }
    assert all(type(name) is str for name in totals)
    assert all(type(label) is str for values in totals.values() for key in values for label in key)
    assert {str(c) for c in Count} == {c.value for c in Count}  # a name is its stored string


def test_a_reader_of_a_missing_file_sees_no_counts_and_creates_no_file(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))

    reader = Counts.reader(DataDir(tmp_path))
    try:
        assert reader.recent(Count.REQUESTS, 60) == {}
        assert reader.all_totals() == {}
    finally:
        reader.close()

    assert sorted(os.listdir(tmp_path)) == before


def test_take_hands_over_what_was_added_so_nothing_is_written_twice(
    data_dir: DataDir, writer: Counts
) -> None:
    writer.add(Count.REQUESTS, ("200",))
    pending = writer.take()
    writer.add(Count.REQUESTS, ("503",))  # added while `pending` is being written
    writer.write(pending)
    writer.flush()

    reader = read(data_dir)
    try:
        assert reader.all_totals() == {"requests": {("200",): 1, ("503",): 1}}
    finally:
        reader.close()


def test_a_duration_is_counted_in_the_bucket_of_the_first_bound_at_or_above_it() -> None:
    bounds = (0.005, 0.01, 1.0)

    assert bucket(bounds, 0.0) == "0.005"
    assert bucket(bounds, 0.005) == "0.005"  # a bound holds durations equal to it
    assert bucket(bounds, 0.0051) == "0.01"
    assert bucket(bounds, 0.5) == "1.0"
    assert bucket(bounds, 1.5) == "+Inf"


def test_label_sets_past_max_series_are_folded_into_other_and_the_bound_outlives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(counts_module, "MAX_SERIES", 3)
    writer = Counts.writer(DataDir(tmp_path))
    for n in range(5):
        writer.add(Count.EVENTS_WRITTEN, ("org", f"proj_{n}", "prod", "track"), n + 1)
        writer.add(Count.REQUESTS, (str(200 + n),))  # fixed labels: never folded
    writer.flush()
    writer.close()
    again = Counts.writer(DataDir(tmp_path))  # a restart: the file's series count
    again.add(Count.EVENTS_WRITTEN, ("org", "proj_new", "prod", "exposure"), 10)
    again.flush()
    totals = again.all_totals()
    again.close()

    assert totals["events_written"] == {
        ("org", "proj_0", "prod", "track"): 1,
        ("org", "proj_1", "prod", "track"): 2,
        ("org", "proj_2", "prod", "track"): 3,
        (OTHER, OTHER, OTHER, "track"): 4 + 5,  # the type, a fixed label, is kept
        (OTHER, OTHER, OTHER, "exposure"): 10,
    }
    assert len(totals["requests"]) == 5


def test_window_only_counts_keep_no_totals_and_bound_their_series_by_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New policies and config versions every week must not run out of series: once the
    old ones leave the window, new ones are counted by their own labels again."""
    monkeypatch.setattr(counts_module, "MAX_SERIES", 2)
    clock = [time.time() - 3600]
    monkeypatch.setattr(counts_module.time, "time", lambda: clock[0])
    writer = Counts.writer(DataDir(tmp_path), window_minutes=5)
    for n in range(3):  # the third is past the bound
        writer.add(Count.CONFIG_VERSIONS, ("p", "e", f"v{n}"))
    writer.flush()
    assert len(writer.recent(Count.CONFIG_VERSIONS, 5)) == 3  # two, and (other)
    clock[0] += 3600  # an hour on: those minutes have left the window
    for name in ("v_new", "v_newer", "v_newest"):  # the last past the bound again
        writer.add(Count.CONFIG_VERSIONS, ("p", "e", name))
    writer.flush()

    assert writer.recent(Count.CONFIG_VERSIONS, 5) == {
        ("p", "e", "v_new"): 1,
        ("p", "e", "v_newer"): 1,
        (OTHER, OTHER, OTHER): 1,
    }
    assert "config_versions" not in writer.all_totals()
    writer.close()
