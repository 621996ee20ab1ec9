"""Where events' timestamps fall against their arrival: the arrival delay histogram, and
the events stamped more than a margin in the future (a client clock ahead) or older than
a set age (late: the browser SDK re-sends a failed unload flush in a later session).

The collector never rewrites a timestamp; it only counts. A request's timestamps are
tallied together (`tally`), for every event of every request, so the usual case costs no
Python work per event: when every timestamp is in the extended ISO 8601 form SDKs write
(`2026-12-03T10:30:00.123Z`, or without the fraction, or without the `Z`, read as UTC),
their text sorts as their moments do, so they are sorted once (in C) and each bound is
found by bisection against the bound's own text. Any other form (an offset such as
`+02:00`, a space for `T`, a week date) is parsed one by one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from collector.store.counts import DELAY_BUCKETS, bucket

# The defaults of the settings event_future_margin_seconds and event_late_after_seconds:
# NTP keeps servers within a second, but phones and laptops drift by minutes; and a day
# late is a saved flush re-sent in another session, not an SDK's batching.
FUTURE_MARGIN_S = 300.0
LATE_AFTER_S = 86400.0

# From how many stamps they are sorted rather than parsed: the bounds' texts cost some 15 us
# a request, a stamp parsed some 0.4 us (measured).
SORT_FROM = 32
# Each bucket's `le` label (`bucket`), by its index in DELAY_BUCKETS, and "+Inf" last.
_LES = [bucket(DELAY_BUCKETS, bound) for bound in (*DELAY_BUCKETS, float("inf"))]
_ISO_MS = "%Y-%m-%dT%H:%M:%S.%f"


class Tally(NamedTuple):
    """A request's events by the `le` label of their delay's bucket (`bucket`), and how
    many were ahead by more than the margin (`future`) or older than the age (`late`)."""

    delays: dict[str, int]
    future: int
    late: int


def tally(stamps: Sequence[str], now: float, margin: float, late_after: float) -> Tally:
    """`stamps` (valid ISO 8601 date-times, as `collector.events` checks them) arrived at
    Unix time `now`: future past `margin` seconds ahead, late past `late_after` old."""
    if not stamps:
        return Tally({}, 0, 0)
    if len(stamps) >= SORT_FROM and _sortable(stamps):
        return _by_text(sorted(stamps), now, margin, late_after)
    return _by_moment([_moment(stamp) for stamp in stamps], now, margin, late_after)


def _sortable(stamps: Sequence[str]) -> bool:
    """Whether every stamp reads `YYYY-MM-DDTHH:MM:SS` first and has no offset: counted on
    the joined text (each such stamp has two hyphens and one T, and no sign or space)."""
    joined = "".join(stamps)
    n = len(stamps)
    return (
        joined.count("-") == 2 * n
        and joined.count("T") == n
        and joined.count(":") == 2 * n
        and "+" not in joined
        and " " not in joined
        and "W" not in joined
    )


def _by_text(ordered: list[str], now: float, margin: float, late_after: float) -> Tally:
    """Counted by bisection of the sorted `ordered` stamps: an event's delay is at most
    `bound` when its stamp is at or after the text of `now - bound` (to the millisecond;
    a stamp without a fraction sorts after every fraction of its second)."""
    n = len(ordered)
    delays: dict[str, int] = {}
    at_most = 0  # events with a delay at or below the previous bound
    for index, bound in enumerate(DELAY_BUCKETS):
        below = n - bisect.bisect_left(ordered, _text(now - bound))
        if below > at_most:
            delays[_LES[index]] = below - at_most
        at_most = below
    if at_most < n:
        delays[_LES[-1]] = n - at_most
    future = n - bisect.bisect_right(ordered, _text(now + margin) + "\uffff")
    late = bisect.bisect_left(ordered, _text(now - late_after))
    return Tally(delays, future, late)


def _by_moment(moments: list[float], now: float, margin: float, late_after: float) -> Tally:
    delays: dict[str, int] = {}
    future = late = 0
    for moment in moments:  # few: a small request's
        delay = now - moment
        le = _LES[bisect.bisect_left(DELAY_BUCKETS, delay)]
        delays[le] = delays.get(le, 0) + 1
        future += delay < -margin
        late += delay > late_after
    return Tally(delays, future, late)


def _moment(stamp: str) -> float:
    """A stamp's Unix time; without an offset it is read as UTC."""
    parsed = datetime.fromisoformat(stamp)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _text(moment: float) -> str:
    """`moment` as the sortable form, to the millisecond, without a zone."""
    return datetime.fromtimestamp(moment, UTC).strftime(_ISO_MS)[:-3]
