"""collector/ops/statusview.py: sizes and durations as a person reads them, and the status
document of a real (empty, then hand-filled) data directory rendered as rich tables.
"""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from collector.ops import status
from collector.ops.statusview import _bytes, _duration, render
from collector.settings import Settings


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1023, "1,023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (2048 * 1024**3, "2,048.0 GiB"),  # no unit past GiB
    ],
)
def test_bytes_are_shown_in_binary_units(size: float, shown: str) -> None:
    assert _bytes(size) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s"),
        (42.4, "42 s"),
        (119, "119 s"),
        (120, "2 min"),
        (3599, "60 min"),
        (7199, "120 min"),
        (7200, "2.0 h"),
        (90_000, "25.0 h"),
    ],
)
def test_durations_are_shown_in_seconds_minutes_or_hours(seconds: float, shown: str) -> None:
    assert _duration(seconds) == shown


def printed(document: dict[str, Any], width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width)
    console.print(render(document))
    output = console.file.getvalue()
    assert isinstance(output, str)
    return output


@pytest.fixture
def empty_document(tmp_path: Path) -> dict[str, Any]:
    return status.collect(Settings(data_dir=tmp_path))


def test_an_empty_data_directory_renders_the_unhealthy_headline_and_every_table(
    empty_document: dict[str, Any],
) -> None:
    text = printed(empty_document)

    assert text.startswith("UNHEALTHY: server is down; forwarder is down")
    for title in (
        "processes",
        "queue",
        "rates",
        "exposures and conversions per allocation (window)",
        "top track events (window)",
    ):
        assert f"\n{title}" in text
    assert "upstream unknown (forwarder down)" in text
    assert "last forward: never" in text
    assert "0.0% of 1.0 GiB" in text
    assert "SDK calls passed upstream" not in text  # none were


def test_a_busy_healthy_document_renders_its_warnings_rows_and_proxy_table(
    empty_document: dict[str, Any],
) -> None:
    document = copy.deepcopy(empty_document)
    document.update(healthy=True, problems=[], warnings=["3 dead-lettered events"])
    document["server"].update(up=True, url="http://127.0.0.1:8787")
    document["forwarder"].update(up=True, upstream="ok", last_success="2026-05-21T10:30:00+00:00")
    document["queue"].update(events=12_345, bytes=3 * 1024**2, oldest_event_age_seconds=150)
    document["top_events"] = [{"project": "p", "env": "e", "event": "purchase", "count": 1500}]
    document["allocations"] = [
        {"project": "p", "env": "e", "policy": "pol_a", "allocation": "control"}
        | {"exposures": 1000, "conversions": 10},
    ]
    document["sample_ratio"] = [
        {"project": "p", "env": "e", "policy": "pol_a", "checked": True, "mismatch": True}
        | {"p_value": 1e-9, "reason": "", "bundle_version": "v7"}
        | {"exposures": {"control": 1000}, "expected_shares": {"control": 0.5, "treatment": 0.5}},
    ]
    document["proxy"]["requests"]["config"] = {"ok": 7, "stale": 2}

    text = printed(document, width=140)  # wide enough that no cell wraps

    assert text.startswith("healthy\nwarning: 3 dead-lettered events")
    assert "http://127.0.0.1:8787" in text
    assert "last forward: 2026-05-21T10:30:00+00:00" in text
    assert "12,345" in text and "3.0 MiB" in text and "2 min" in text
    assert "purchase" in text and "1,500" in text
    assert "pol_a" in text and "1,000" in text and "MISMATCH p=1.0e-09 vs bundle v7" in text
    assert "100.0% (50.0%)" in text
    # The allocation the bundle expects but nobody reached is a row of zeros, not nothing.
    assert re.search(r"pol_a\s+│\s+treatment\s+│\s+0\s+│\s+0\.0% \(50\.0%\)", text), text
    assert "SDK calls passed upstream (window)" in text
    assert "stale" in text
