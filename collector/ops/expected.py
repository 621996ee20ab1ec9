"""Expected splits from config bundles: what share of units each allocation should get.

An SDK in bundle mode hashes a unit into one of the bundle's `hashing.bucketCount` buckets
per layer and gives it the first running policy of the layer whose conditions match and
whose `eligibleBucketRange` holds the bucket, then the allocation whose `bucketRange`
([start, end], both inclusive) holds it. Conditions filter units before any bucket is
looked at, so among the units a policy takes, each allocation's expected share is the
number of its buckets (within the eligible range) over the buckets of all its
allocations. That is what the sample-ratio check compares with when exposures declare no
`probability` (static policies, the common A/B test).

Only static policies are read: adaptive ones move their ranges as they learn, and their
exposures declare the probability they were given (`collector.ops.srm`'s own path).
A bundle is the config proxy's cached answer (`collector.store.configcache`), one per
project, environment and key; for each project and environment the newest `version`
counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson


@dataclass(frozen=True)
class Split:
    """A static policy's expected split in one bundle: allocation -> share of its units
    (summing to 1; 0 for an allocation given no bucket)."""

    project: str
    env: str
    layer: str
    policy: str
    version: str
    shares: dict[str, float]


def splits(body: bytes) -> list[Split]:
    """The expected split of each running static policy in a bundle's JSON `body`; none
    for a body that is not a bundle, or for what in it cannot be read as one."""
    read = _read(body)
    return [] if read is None else read[1]


def latest(bodies: Iterable[bytes]) -> dict[tuple[str, str], tuple[str, list[Split]]]:
    """(project, env) -> the version and splits of its newest bundle among `bodies`."""
    bundles: dict[tuple[str, str], tuple[str, list[Split]]] = {}
    for body in bodies:
        read = _read(body)
        if read is None:
            continue
        (project, env, version), found = read
        held = bundles.get((project, env))
        if held is None or _moment(version) > _moment(held[0]):
            bundles[(project, env)] = (version, found)
    return bundles


def by_policy(
    bundles: dict[tuple[str, str], tuple[str, list[Split]]],
) -> dict[tuple[str, str, str], Split]:
    """`latest`'s splits by (project, env, policy): each policy's in the newest bundle of
    its project and env (a policy gone from the newest bundle, or stopped in it, has none)."""
    return {(s.project, s.env, s.policy): s for _, found in bundles.values() for s in found}


def age_seconds(version: str, now: float) -> float | None:
    """How long before `now` a bundle version (an ISO 8601 time) was made; None for a
    version that is not a time."""
    _, moment = _moment(version)
    return None if isinstance(moment, str) else now - moment.timestamp()


def _read(body: bytes) -> tuple[tuple[str, str, str], list[Split]] | None:
    """A bundle's (project, env, version) and its static policies' splits; None for what
    is not a bundle."""
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(bundle, dict):
        return None
    project, env = _text(bundle.get("projectId")), _text(bundle.get("env"))
    version = _text(bundle.get("version"))
    hashing = bundle.get("hashing")
    buckets = _count(hashing.get("bucketCount")) if isinstance(hashing, dict) else None
    if project is None or env is None or version is None or buckets is None:
        return None
    found = []
    for layer in _dicts(bundle.get("layers")):
        layer_id = _text(layer.get("id"))
        for policy in _dicts(layer.get("policies")):
            policy_id = _text(policy.get("id"))
            if policy.get("state") != "running" or policy.get("kind", "static") != "static":
                continue
            shares = _shares(policy, buckets)
            if shares and layer_id is not None and policy_id is not None:
                found.append(Split(project, env, layer_id, policy_id, version, shares))
    return (project, env, version), found


def _shares(policy: dict[str, Any], buckets: int) -> dict[str, float]:
    """Each allocation's buckets (within the policy's eligible range) over all of theirs."""
    low, high = 0, buckets - 1
    eligible = policy.get("eligibleBucketRange")
    if isinstance(eligible, dict):
        start, end = _bucket(eligible.get("start")), _bucket(eligible.get("end"))
        if start is not None and end is not None:
            low, high = max(low, start), min(high, end)
    widths: dict[str, int] = {}
    for allocation in _dicts(policy.get("allocations")):
        # As exposures name it (`allocationName`, else `allocationId`).
        name = _text(allocation.get("name")) or _text(allocation.get("id"))
        span = allocation.get("bucketRange")
        first, last = _range(span)
        if name is None or first is None or last is None:
            return {}  # a policy read in part would be compared with a wrong split
        width = max(0, min(high, last) - max(low, first) + 1)
        widths[name] = widths.get(name, 0) + width
    total = sum(widths.values())
    if len(widths) < 2 or total == 0:
        return {}
    return {name: width / total for name, width in widths.items()}


def _moment(version: str) -> tuple[int, datetime | str]:
    """A bundle version's order: ISO 8601 times by their time, any other text after them."""
    try:
        moment = datetime.fromisoformat(version)
    except ValueError:
        return (1, version)
    return (0, moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _bucket(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _range(value: Any) -> tuple[int | None, int | None]:
    """A `bucketRange`'s [start, end], or Nones."""
    if isinstance(value, list) and len(value) == 2:
        return _bucket(value[0]), _bucket(value[1])
    return None, None
