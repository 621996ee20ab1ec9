"""collector/store/spool.py, the forwarder's side: rows are taken in order without being
marked in the file, a row given back (`nack`) is taken again before newer ones, an acked
row is gone, and a forwarder that starts again takes every row not acked.

Real queue files in tmp paths; nothing mocked.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from collector.events import Target
from collector.store.datadir import DataDir
from collector.store.spool import IN_FLIGHT, TABLE, Spool

TARGET = Target("proj_test", "production")


def filled(tmp_path: Path, count: int) -> Spool:
    spool = Spool(DataDir(tmp_path), budget_bytes=1 << 30, resume_in_flight=True)
    for n in range(count):
        spool.append({TARGET: [b'{"n":%d}' % n]})
    return spool


def taken_ids(spool: Spool) -> list[int]:
    ids = []
    while (row := spool.take()) is not None:
        ids.append(row.id)
    return ids


def test_rows_are_taken_oldest_first_each_once_and_never_marked(tmp_path: Path) -> None:
    spool = filled(tmp_path, 3)
    try:
        assert taken_ids(spool) == [1, 2, 3]
        assert spool.take() is None
        with sqlite3.connect(DataDir(tmp_path).queue) as conn:
            statuses = {status for (status,) in conn.execute(f"SELECT status FROM {TABLE}")}
        assert IN_FLIGHT not in statuses  # no UPDATE rewrote a row
    finally:
        spool.close()


def test_a_row_given_back_is_taken_again_before_newer_ones(tmp_path: Path) -> None:
    spool = filled(tmp_path, 3)
    try:
        assert [spool.take().id for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
        spool.nack([2, 1])
        spool.append({TARGET: [b'{"n":"new"}']})

        assert taken_ids(spool) == [1, 2, 3, 4]
    finally:
        spool.close()


def test_acked_rows_are_gone_and_a_restart_takes_every_row_not_acked(tmp_path: Path) -> None:
    spool = filled(tmp_path, 4)
    try:
        assert taken_ids(spool) == [1, 2, 3, 4]
        spool.ack([1, 3], {})
        spool.nack([2])
        spool.ack([2], {})  # given back, then settled before it was taken again
        assert spool.take() is None
    finally:
        spool.close()

    again = Spool(DataDir(tmp_path), budget_bytes=1 << 30, resume_in_flight=True)
    try:
        assert taken_ids(again) == [4]
    finally:
        again.close()
