"""collector/server/eventtime.py: a request's timestamps against their arrival, sorted as
text when all are in the SDKs' form and parsed one by one otherwise, with the same result."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from collector.server import eventtime
from collector.server.eventtime import SORT_FROM, tally
from collector.settings import Settings

NOW = datetime(2026, 12, 3, 18, 0, 0, 500000, tzinfo=UTC)


def stamp(seconds_before: float, form: str = "ms") -> str:
    moment = NOW - timedelta(seconds=seconds_before)
    if form == "ms":
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if form == "naive":
        return moment.replace(tzinfo=None).isoformat(timespec="milliseconds")
    return moment.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")


@pytest.mark.parametrize("copies", [1, 4], ids=["parsed", "sorted"])  # 10 or 40 stamps
def test_each_event_lands_in_the_bucket_of_its_delay_and_future_and_late_are_counted(
    copies: int,
) -> None:
    delays = [-400.0, -30.0, 0.2, 5.0, 30.0, 300.0, 2000.0, 50_000.0, 90_000.0, 10**6]
    found = tally([stamp(d) for d in delays] * copies, NOW.timestamp(), 300.0, 86_400.0)
    les = ["-60.0", "-1.0", "1.0", "10.0", "60.0", "600.0", "3600.0", "86400.0", "604800.0"]
    assert found.delays == Counter(dict.fromkeys([*les, "+Inf"], copies))
    assert (found.future, found.late) == (copies, 2 * copies)


def test_sorted_text_and_parsed_moments_agree() -> None:
    rng = random.Random(16)
    delays = [rng.uniform(-1000.0, 200_000.0) for _ in range(500)]
    now = NOW.timestamp()
    by_text = tally([stamp(d) for d in delays], now, 300.0, 86_400.0)
    by_moment = tally([stamp(d, "offset") for d in delays], now, 300.0, 86_400.0)
    naive = tally([stamp(d, "naive") for d in delays], now, 300.0, 86_400.0)
    assert by_text == by_moment == naive
    assert sum(by_text.delays.values()) == 500
    assert by_text.future == sum(1 for d in delays if d < -300.0)
    assert by_text.late == sum(1 for d in delays if d > 86_400.0)


def test_offsets_are_read_as_moments_in_a_big_request_too() -> None:
    # Ten minutes ahead in local text (+02:00) is on time in UTC: not from the future.
    stamps = [stamp(1.5, "offset")] * SORT_FROM
    found = tally(stamps, NOW.timestamp(), 300.0, 86_400.0)
    assert found == eventtime.Tally(Counter({"10.0": SORT_FROM}), 0, 0)


def test_nothing_to_tally() -> None:
    assert tally([], NOW.timestamp(), 300.0, 86_400.0) == eventtime.Tally(Counter(), 0, 0)


def test_the_counters_defaults_are_the_settings_defaults() -> None:
    settings = Settings(data_dir=Path("unused"))
    assert settings.event_future_margin_seconds == eventtime.FUTURE_MARGIN_S
    assert settings.event_late_after_seconds == eventtime.LATE_AFTER_S
