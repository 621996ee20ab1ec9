"""Sample-ratio check: do a policy's exposures split across allocations as declared?

For each policy, the exposures counted per allocation (over the counts window) are compared
by Pearson's chi-square test with the shares the exposures themselves declare (the mean
`probability` their layers carry for each allocation, normalised over the allocations
seen) or, where they do not all declare one (static policies: SDKs omit it), with the
split of the policy's bucket ranges in the newest config bundle the collector served for
its project and environment (`collector.ops.expected`). A mismatch is flagged when
p < `sample_ratio_p_threshold` (0.001), and only with enough exposures for the test to
mean something: at least `sample_ratio_min_exposures` (100) in all and an expected count
of at least 5 per allocation. Exposures in an allocation the
bundle gives no buckets are a mismatch at once. Policies with neither declared shares nor
a cached bundle are reported as not checked: there is nothing to compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The defaults of the settings sample_ratio_p_threshold and sample_ratio_min_exposures:
# at p < 0.001 a healthy programme of a few dozen policies sees a false alarm rarely.
P_THRESHOLD = 0.001
MIN_EXPOSURES = 100
MIN_EXPECTED = 5.0  # per allocation: below it the chi-square approximation is poor


@dataclass
class Verdict:
    project: str
    env: str
    policy: str
    exposures: dict[str, float] = field(default_factory=dict)
    expected_shares: dict[str, float] = field(default_factory=dict)
    checked: bool = False
    p_value: float | None = None
    mismatch: bool = False
    reason: str = ""
    bundle_version: str | None = None  # the config bundle compared with; None: declared

    def as_dict(self) -> dict[str, object]:
        return {
            "project": self.project,
            "env": self.env,
            "policy": self.policy,
            "exposures": self.exposures,
            "expected_shares": self.expected_shares,
            "checked": self.checked,
            "p_value": self.p_value,
            "mismatch": self.mismatch,
            "reason": self.reason,
            "bundle_version": self.bundle_version,
        }


def check(
    exposures: dict[str, float],
    share_sums: dict[str, float],
    share_counts: dict[str, float],
    bundle_shares: dict[str, float] | None = None,
    *,
    min_exposures: int = MIN_EXPOSURES,
) -> tuple[bool, float | None, dict[str, float], str]:
    """(checked, p value, expected shares, reason) for one policy's allocations: by the
    shares its exposures declare or, where they do not all declare one, by `bundle_shares`
    (the split of its static policy in the newest config bundle, `collector.ops.expected`)."""
    declares = declares_shares(exposures, share_counts)
    if not declares and bundle_shares is not None:
        return _against_bundle(exposures, bundle_shares, min_exposures)
    if len(exposures) < 2:
        return False, None, {}, "fewer than two allocations exposed"
    if not declares:
        return False, None, {}, "exposures do not all declare a probability"
    declared = {a: share_sums[a] / share_counts[a] for a in exposures}
    total_share = sum(declared.values())
    if total_share <= 0:
        return False, None, {}, "declared probabilities are zero"
    shares = {a: share / total_share for a, share in declared.items()}
    return _tested(exposures, shares, min_exposures)


def declares_shares(exposures: dict[str, float], share_counts: dict[str, float]) -> bool:
    """Whether every exposure of every allocation declared a probability."""
    return all(share_counts.get(a, 0) >= exposures[a] for a in exposures)


def _against_bundle(
    exposures: dict[str, float], shares: dict[str, float], min_exposures: int
) -> tuple[bool, float | None, dict[str, float], str]:
    """The check against a bundle's split: every allocation it gives buckets counts, those
    with no exposure too (a broken arm is the worst skew); exposures in an allocation it
    gives none (or does not name) are a mismatch by themselves, once there are enough."""
    stray = sorted(a for a, n in exposures.items() if n and not shares.get(a))
    if stray and sum(exposures.values()) >= min_exposures:
        return True, 0.0, shares, f"exposures in allocations the bundle gives no buckets: {stray}"
    given = {a: share for a, share in shares.items() if share > 0}
    return _tested({a: exposures.get(a, 0.0) for a in given}, given, min_exposures)


def _tested(
    exposures: dict[str, float], shares: dict[str, float], min_exposures: int
) -> tuple[bool, float | None, dict[str, float], str]:
    """Pearson's chi-square of `exposures` against `shares` (summing to 1), once enough."""
    if len(exposures) < 2:
        return False, None, shares, "fewer than two allocations to compare"
    total = sum(exposures.values())
    expected = {a: total * shares[a] for a in exposures}
    if total < min_exposures or min(expected.values()) < MIN_EXPECTED:
        return False, None, shares, f"not enough exposures yet ({total:.0f})"
    statistic = sum((exposures[a] - expected[a]) ** 2 / expected[a] for a in exposures)
    p_value = chi_square_sf(statistic, len(exposures) - 1)
    return True, p_value, shares, ""


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square with `dof` degrees of freedom."""
    if statistic <= 0:
        return 1.0
    return _upper_gamma_regularized(dof / 2.0, statistic / 2.0)


def _upper_gamma_regularized(s: float, x: float) -> float:
    """Q(s, x) = Γ(s, x) / Γ(s): a series below s + 1, a continued fraction above."""
    log_prefix = s * math.log(x) - x - math.lgamma(s)
    if x < s + 1:
        term = total = 1.0 / s
        n = s
        while abs(term) > abs(total) * 1e-15:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Lentz's method for the continued fraction of Γ(s, x).
    tiny = 1e-300
    b = x + 1 - s
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        a = -i * (i - s)
        b += 2
        d = a * d + b
        d = tiny if abs(d) < tiny else d
        c = b + a / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)
