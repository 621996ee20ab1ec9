"""collector/ops/expected.py: the split each static policy of a config bundle should give,
from its allocations' bucket ranges. (That the ranges split units as the official SDK buckets
them is tests/test_experiments.py's, which has the SDK of the dev extra.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from collector.ops.expected import Split, by_policy, latest, splits


def allocation(name: str, start: int, end: int) -> dict[str, Any]:
    return {"id": f"alloc_{name}", "key": name, "name": name, "bucketRange": [start, end]}


def bundle(
    *policies: dict[str, Any], version: str = "2026-12-01T10:00:00.000Z", **top: Any
) -> bytes:
    return orjson.dumps(
        {
            "version": version,
            "orgId": "org_1",
            "projectId": "proj_1",
            "env": "production",
            "hashing": {"unitKey": "userId", "bucketCount": 1000},
            "parameters": [],
            "layers": [{"id": "layer_1", "policies": list(policies)}],
            **top,
        }
    )


def policy(pid: str, *allocations: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "id": pid,
        "state": "running",
        "kind": "static",
        "conditions": [],
        "allocations": list(allocations),
        **fields,
    }


def test_a_static_policy_is_split_by_the_width_of_its_bucket_ranges() -> None:
    body = bundle(
        policy("pol_ab", allocation("control", 0, 499), allocation("treatment", 500, 999)),
        policy(
            "pol_3", allocation("a", 0, 199), allocation("b", 200, 599), allocation("c", 600, 999)
        ),
    )

    assert splits(body) == [
        Split(
            "proj_1",
            "production",
            "layer_1",
            "pol_ab",
            "2026-12-01T10:00:00.000Z",
            {"control": 0.5, "treatment": 0.5},
        ),
        Split(
            "proj_1",
            "production",
            "layer_1",
            "pol_3",
            "2026-12-01T10:00:00.000Z",
            {"a": 0.2, "b": 0.4, "c": 0.4},
        ),
    ]


def test_a_partial_ramp_splits_only_the_buckets_given_out() -> None:
    # 10% of the layer in the test, and an eligible range that cuts the treatment's range.
    ramp = policy("pol_ramp", allocation("control", 0, 49), allocation("treatment", 50, 99))
    cut = policy(
        "pol_cut",
        allocation("control", 0, 499),
        allocation("treatment", 500, 999),
        eligibleBucketRange={"start": 250, "end": 599},
    )
    zero = policy("pol_zero", allocation("control", 0, 999), allocation("new", 1000, 999))

    found = {s.policy: s.shares for s in splits(bundle(ramp, cut, zero))}

    assert found["pol_ramp"] == {"control": 0.5, "treatment": 0.5}
    assert found["pol_cut"] == pytest.approx({"control": 250 / 350, "treatment": 100 / 350})
    assert found["pol_zero"] == {"control": 1.0, "new": 0.0}


@pytest.mark.parametrize(
    "changed",
    [
        {"state": "paused"},
        {"kind": "adaptive"},
        {"allocations": [allocation("only", 0, 999)]},
        {"allocations": [allocation("a", 0, 499), {"name": "b", "bucketRange": "500-999"}]},
        {"allocations": [allocation("a", 0, 499), {"bucketRange": [500, 999]}]},
    ],
)
def test_policies_not_running_adaptive_or_unreadable_have_no_split(changed: dict[str, Any]) -> None:
    body = bundle({**policy("pol", allocation("a", 0, 499), allocation("b", 500, 999)), **changed})
    assert splits(body) == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"version": "v"}', bundle(hashing={"bucketCount": 0}), bundle(env="")],
)
def test_what_is_not_a_bundle_has_no_split(body: bytes) -> None:
    assert splits(body) == []


def test_the_newest_bundle_of_each_project_and_env_counts() -> None:
    ab = policy("pol_ab", allocation("control", 0, 499), allocation("treatment", 500, 999))
    ramped = policy("pol_ab", allocation("control", 0, 899), allocation("treatment", 900, 999))
    old = bundle(ab, version="2026-12-01T10:00:00.000Z")
    new = bundle(ramped, version="2026-12-01T11:00:00+00:00")
    staging = bundle(ab, version="2026-11-01T00:00:00Z", env="staging")

    found = by_policy(latest([new, staging, old, b"garbage"]))

    assert found[("proj_1", "production", "pol_ab")].shares == {"control": 0.9, "treatment": 0.1}
    assert found[("proj_1", "production", "pol_ab")].version == "2026-12-01T11:00:00+00:00"
    assert found[("proj_1", "staging", "pol_ab")].shares == {"control": 0.5, "treatment": 0.5}
    assert len(found) == 2


def test_a_policy_stopped_in_the_newest_bundle_has_no_split_from_an_older_one() -> None:
    running = policy("pol_ab", allocation("control", 0, 499), allocation("treatment", 500, 999))
    old = bundle(running, version="2026-12-01T10:00:00Z")
    stopped = bundle({**running, "state": "completed"}, version="2026-12-02T10:00:00Z")

    assert by_policy(latest([old, stopped])) == {}
    assert by_policy(latest([stopped, old])) == {}
