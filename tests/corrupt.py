"""Ways a disk damages an SQLite file, done to a real file of the data directory, for the
tests of what is read back from it (`tests/unit/test_salvage.py`, and system tests).

Each writes into the file in place (close every connection to it first); offsets are
those of SQLite's file format (https://www.sqlite.org/fileformat.html): a 100-byte header
at the start of page 1, whose b-tree (the schema's) follows it.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

HEADER_BYTES = 100
# Header fields: the page size (2 bytes; 1 means 65536) and the number of freelist pages.
PAGE_SIZE_AT = 16
FREELIST_COUNT_AT = 36
# Freelist pages the header claims beyond those there are: any number but 0 will do.
FREELIST_EXCESS = 7


def page_size(path: Path) -> int:
    with path.open("rb") as file:
        file.seek(PAGE_SIZE_AT)
        (size,) = struct.unpack(">H", file.read(2))
    return 65536 if size == 1 else int(size)


def overwrite(path: Path, at: int, size: int, seed: int = 1) -> None:
    """`size` bytes of garbage (the same for the same seed) at offset `at`."""
    with path.open("r+b") as file:
        file.seek(at)
        file.write(random.Random(seed).randbytes(size))


def overwrite_middle(path: Path, size: int = 3 * 1024, seed: int = 1) -> None:
    """Garbage in the middle of the file: part of a page or two of a table's rows."""
    overwrite(path, path.stat().st_size // 2 - size // 2, size, seed)


def zero_schema_page(path: Path) -> None:
    """Zeros over page 1 after its header: the schema's b-tree, so that SQLite no longer
    knows where any table is (the header, and every other page, stay as they were)."""
    with path.open("r+b") as file:
        file.seek(HEADER_BYTES)
        file.write(bytes(page_size(path) - HEADER_BYTES))


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut the file short, at a page boundary, keeping about `keep` of it."""
    size = page_size(path)
    pages = path.stat().st_size // size
    with path.open("r+b") as file:
        file.truncate(max(1, int(pages * keep)) * size)


def corrupt_recoverably(path: Path) -> None:
    """Damage that `PRAGMA quick_check` (`recovery.corruption`) calls corruption ("Main
    freelist: size is 0 but should be 7") but that loses no row: the header's count of
    freelist pages raised by FREELIST_EXCESS. Every row still reads through its b-tree,
    so `.dump` and `.recover` both give back all of them (`salvage.py`)."""
    with path.open("r+b") as file:
        file.seek(FREELIST_COUNT_AT)
        (count,) = struct.unpack(">I", file.read(4))
        file.seek(FREELIST_COUNT_AT)
        file.write(struct.pack(">I", (count + FREELIST_EXCESS) % 2**32))
