"""collector/ops/srm.py against a config bundle's split (`collector.ops.expected`): every
allocation the bundle gives buckets is compared, exposed or not; exposures in one it gives
none are a mismatch; declared probabilities still win where every exposure has one."""

from __future__ import annotations

from collector.ops import srm

HALF = {"control": 0.5, "treatment": 0.5}


def test_a_fair_split_passes_and_a_skewed_one_is_flagged() -> None:
    fair = srm.check({"control": 510.0, "treatment": 490.0}, {}, {}, HALF)
    skewed = srm.check({"control": 600.0, "treatment": 400.0}, {}, {}, HALF)

    assert fair[0] and fair[1] is not None and fair[1] > srm.P_THRESHOLD
    assert skewed[0] and skewed[1] is not None and skewed[1] < srm.P_THRESHOLD
    assert skewed[2] == HALF


def test_an_allocation_the_bundle_gives_buckets_but_nobody_reaches_is_a_mismatch() -> None:
    checked, p_value, shares, _ = srm.check({"control": 1000.0}, {}, {}, HALF)

    assert checked and p_value is not None and p_value < 1e-100
    assert shares == HALF


def test_exposures_in_an_allocation_the_bundle_does_not_give_are_a_mismatch() -> None:
    exposures = {"control": 500.0, "treatment": 480.0, "ghost": 20.0}
    checked, p_value, _, reason = srm.check(exposures, {}, {}, HALF)
    assert (checked, p_value) == (True, 0.0)
    assert "ghost" in reason

    zero = {"control": 1.0, "treatment": 0.0}
    assert srm.check({"control": 990.0, "treatment": 10.0}, {}, {}, zero)[:2] == (True, 0.0)


def test_few_exposures_are_not_checked_yet() -> None:
    checked, p_value, _, reason = srm.check({"control": 30.0, "treatment": 20.0}, {}, {}, HALF)
    assert (checked, p_value) == (False, None)
    assert "not enough exposures" in reason

    fewer = srm.check({"control": 30.0, "treatment": 20.0}, {}, {}, HALF, min_exposures=50)
    assert fewer[0] and fewer[1] is not None


def test_stray_exposures_wait_for_min_exposures_too() -> None:
    exposures = {"control": 40.0, "ghost": 2.0}
    assert srm.check(exposures, {}, {}, HALF)[:2] == (False, None)
    assert srm.check(exposures, {}, {}, HALF, min_exposures=40)[:2] == (True, 0.0)


def test_declared_probabilities_win_over_the_bundle() -> None:
    exposures = {"control": 900.0, "treatment": 100.0}
    sums, counts = {"control": 810.0, "treatment": 10.0}, exposures  # 0.9 and 0.1 declared

    checked, p_value, shares, _ = srm.check(exposures, sums, counts, HALF)

    assert checked and p_value is not None and p_value > srm.P_THRESHOLD
    assert shares == {"control": 0.9, "treatment": 0.1}
