"""collector/store/datadir.py: `atomic_write` (mode 0600, no temporary file left, the old
file or the new one and never a part) and the data directory's names of its databases.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from collector.store import datadir
from collector.store.datadir import DATABASES, DataDir, atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_makes_a_0600_file_and_leaves_no_temporary_file(
    tmp_path: Path, durable: bool
) -> None:
    target = tmp_path / "keys.json"

    atomic_write(target, b'{"keys": []}', durable=durable)

    assert target.read_bytes() == b'{"keys": []}'
    assert mode(target) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]


def test_atomic_write_replaces_the_file_whole_and_tightens_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "server.json"
    target.write_bytes(b"old contents")
    target.chmod(0o644)

    with target.open("rb") as reader_of_the_old_file:
        atomic_write(target, b"new")
        # A reader that opened the old file still reads all of it: the file was replaced
        # by a rename, never rewritten in place.
        assert reader_of_the_old_file.read() == b"old contents"

    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["server.json"]


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "in-the-way"
    target.mkdir()  # a directory cannot be replaced by a file: os.replace fails

    with pytest.raises(OSError):
        atomic_write(target, b"data")

    assert sorted(os.listdir(tmp_path)) == ["in-the-way"]
    assert target.is_dir()


def test_the_data_directory_names_its_five_databases_in_order(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)

    assert DATABASES == (
        "queue.db",
        "seen-ids.db",
        "counts.db",
        "dead-letters.db",
        "config-cache.db",
    )
    assert data_dir.databases() == [tmp_path / name for name in DATABASES]
    assert data_dir.databases() == [
        data_dir.queue,
        data_dir.seen_ids,
        data_dir.counts,
        data_dir.dead_letters,
        data_dir.config_cache,
    ]


def test_every_file_has_its_own_name_in_the_data_directory(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    paths = [
        data_dir.queue,
        data_dir.seen_ids,
        data_dir.counts,
        data_dir.dead_letters,
        data_dir.config_cache,
        data_dir.keys,
        data_dir.keys_lock,
        data_dir.server_state,
        data_dir.forwarder_state,
        data_dir.forwarder_lock,
        data_dir.first_key,
    ]

    assert all(path.parent == tmp_path for path in paths)
    assert len({path.name for path in paths}) == len(paths)
    assert data_dir.keys.name == datadir.KEYS


def test_the_directory_holds_data_once_any_file_of_the_collectors_is_there(
    tmp_path: Path,
) -> None:
    data_dir = DataDir(tmp_path / "new" / "data")
    assert not data_dir.holds_data()

    data_dir.create()
    data_dir.create()  # twice is fine
    assert data_dir.path.is_dir()
    assert not data_dir.holds_data()

    data_dir.queue.write_bytes(b"")
    assert data_dir.holds_data()
