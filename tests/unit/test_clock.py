"""collector/store/clock.py: every process of a boot reads one anchor, so their readings
agree; a file from another boot, or a broken one, is replaced; a reader writes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from collector.store.clock import BOOT_ID, Clock
from collector.store.datadir import DataDir

if not BOOT_ID.exists():
    pytest.skip(f"no {BOOT_ID}: the clock is the wall clock here", allow_module_level=True)


def test_a_reading_is_near_the_wall_clock_and_written_for_the_boot(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)

    now = Clock(data_dir).now()

    assert abs(now - time.time()) < 1.0
    recorded = json.loads(data_dir.clock.read_text())
    assert recorded["boot_id"] == BOOT_ID.read_text().strip()


def test_every_clock_of_a_boot_takes_the_recorded_anchor(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    Clock(data_dir)
    recorded = json.loads(data_dir.clock.read_text())
    data_dir.clock.write_text(json.dumps({**recorded, "anchor": recorded["anchor"] - 8 * 86400}))

    later = Clock(data_dir).now()  # as if the wall clock had since stepped 8 days forward

    assert abs(later - (time.time() - 8 * 86400)) < 1.0


@pytest.mark.parametrize("found", ['{"boot_id": "another boot", "anchor": 5}', "", "{not json"])
def test_a_record_of_another_boot_or_a_broken_one_is_replaced(tmp_path: Path, found: str) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.clock.write_text(found)

    now = Clock(data_dir).now()

    assert abs(now - time.time()) < 1.0
    assert json.loads(data_dir.clock.read_text())["boot_id"] == BOOT_ID.read_text().strip()


def test_a_reader_writes_nothing(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)

    assert abs(Clock(data_dir, write=False).now() - time.time()) < 1.0
    assert not data_dir.clock.exists()
