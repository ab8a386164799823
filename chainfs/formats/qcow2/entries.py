"""qcow2's table entries (QCOW2.md): the bits of L1, L2, refcount-table and bitmap-table
entries, and reading a table as its entries.  The one home of these constants: the
driver, the metadata layout, the refcounts and the image check all take them from here.
"""

from __future__ import annotations

import struct
import sys
from array import array

U64 = struct.Struct(">Q")

# L1 and L2 entries
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # the host offset of an L2 table or a data cluster
COPIED = 1 << 63  # refcount exactly 1: may be written in place
COMPRESSED_BIT = 1 << 62  # an L2 entry that is a compressed cluster descriptor
ZERO_FLAG = 1  # an L2 entry that reads as zeros (v3)
L1E_RESERVED = 0x7F000000000001FF


def in_place(e: int) -> bool:
    """Whether an L2 entry is a data cluster the layer holds unshared (COPIED, an
    offset, neither compressed nor a zero cluster): a guest write there overwrites it in
    place, nothing else."""
    return bool(e & COPIED and e & OFFSET_MASK and not e & (COMPRESSED_BIT | ZERO_FLAG))


L2E_RESERVED = 0x3F000000000001FE

# refcount-table entries
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF

# bitmap-table entries (persistent dirty bitmaps)
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED = 0xFF000000000001FE
BME_ALL_ONES = 1


def entries(table: bytes | bytearray) -> array[int]:
    """The big-endian 64-bit entries of a table, as integers."""
    a = array("Q")
    a.frombytes(table[: len(table) - len(table) % 8])
    if sys.byteorder == "little":
        a.byteswap()
    return a


def nonzero_entries(table: bytes | bytearray) -> list[tuple[int, int]]:
    """(index, value) of the non-zero entries of a table."""
    return [(i, e) for i, e in enumerate(entries(table)) if e]
