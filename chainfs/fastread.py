"""Flat-file reads answered by pyfuse3 itself, without Python (issue 17).

The patched pyfuse3 (``third_party/pyfuse3/read-map.patch``) keeps per inode a table of
fixed-size extents of the file, each unmapped or mapped to a range of a host file
descriptor, and answers a READ that lies entirely within mapped extents with ``pread``
from them, in its C callback, without a coroutine or any of chainfs's code.  Everything
else reaches ``Operations.read`` as before.

The flat file's extents are the chain's granules.  The chain fills its map from its
read path (``Chain.read``: a granule whose holder shows it as one data extent, or that
reads as zeros — a hole of the whole chain, zero clusters — after it planned it under
its lock) and clears it wherever what a granule shows may stop being
those host bytes: the claim of a guest write (copy-on-write or allocation), a discard, a
failed write, every step of a job, every change of the chain's shape, and before any of
its file descriptors is closed (their numbers get reused).  ``Disk`` drops the map when
ownership is suspended or lost; ``fs`` gives one only to a chain whose layers nobody
else may write (owned here, or held under QEMU's locks).
"""

from __future__ import annotations

from typing import Any

import pyfuse3

AVAILABLE = hasattr(pyfuse3, "read_map_create")


def stats() -> tuple[int, int]:
    """(READs answered from read maps, READs of mapped inodes passed to chainfs)."""
    if not AVAILABLE:
        return (0, 0)
    served, passed = pyfuse3.read_map_stats()
    return int(served), int(passed)


class ReadMap:
    """The read map of one flat file's inode, filled by at most one chain at a time."""

    def __init__(self, inode: int) -> None:
        self.inode = pyfuse3.InodeT(inode)
        self.owner: Any = None  # the chain whose read_map this is

    def take(self, chain: Any) -> None:
        """``chain`` fills this map from now on (the one before it, if any, no longer)."""
        if self.owner is not None and self.owner is not chain:
            self.owner.read_map = None
        self.owner = chain

    def reset(self, size: int, granule: int) -> None:
        """Empty, for a disk of ``size`` bytes in granules of ``granule``."""
        pyfuse3.read_map_create(self.inode, size, granule)

    def set(self, offset: int, fd: int | None, host: int = 0) -> None:
        """The granule at ``offset`` shows ``fd``'s bytes from ``host`` (None: zeros)."""
        pyfuse3.read_map_set(self.inode, offset, fd, host)

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        pyfuse3.read_map_clear(self.inode, offset, length)

    def release(self) -> None:
        """Empty and unowned: every READ goes to chainfs again."""
        pyfuse3.read_map_remove(self.inode)
        if self.owner is not None:
            self.owner.read_map = None
        self.owner = None
