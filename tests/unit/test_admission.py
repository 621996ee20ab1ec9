"""collector/server/admission.py: the byte budget of requests in progress (a request that
does not fit is Overloaded, one always fits alone) and what a request reserves."""

from __future__ import annotations

import pytest

from collector.errors import Overloaded
from collector.server.admission import RETRY_AFTER_S, ByteBudget, reserved_size

MAX_BODY = 10_000


def test_requests_are_admitted_until_the_budget_then_refused_until_one_is_answered() -> None:
    budget = ByteBudget(100)
    budget.take(60)
    budget.take(40)

    with pytest.raises(Overloaded, match="holds 100 bytes") as refused:
        budget.take(1)
    assert refused.value.retry_after == RETRY_AFTER_S
    budget.give(60)
    budget.take(50)
    assert budget.held == 90


def test_one_request_always_fits_when_nothing_else_is_held() -> None:
    budget = ByteBudget(100)
    budget.take(500)  # larger than the budget, alone: admitted (max_body_bytes bounds it)

    with pytest.raises(Overloaded):
        budget.take(1)


@pytest.mark.parametrize(
    ("length", "encoding", "reserved"),
    [
        ("1234", None, 1234),
        ("1234", "identity", 1234),
        ("1234", "gzip", MAX_BODY),  # may decompress to max_body_bytes
        (None, None, MAX_BODY),  # chunked: may grow to it
        ("99999999", None, MAX_BODY),  # refused later (413); never reserves more
        ("12x", None, MAX_BODY),
    ],
)
def test_a_request_reserves_its_length_or_what_it_may_grow_to(
    length: str | None, encoding: str | None, reserved: int
) -> None:
    assert reserved_size(length, encoding, MAX_BODY) == reserved
