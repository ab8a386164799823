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

Overwrites too, with ``write-map.patch`` (``WRITES``): pyfuse3 answers a WRITE lying
entirely in granules the chain marked writable (``set_writable``) with a ``pwrite`` to
their host bytes, in its C callback.  The chain marks a
granule only right after its own write path overwrote it in place with nothing else
to do (``Chain._mark_writable``), and revokes every mark at once (``revoke_writes``, a
bump of the map's epoch) before anything that a later write would have to see: a write
hook, a change of the bitmaps; a change of shape, a claim or a discard clear the map
anyway.  What those writes skip is made good lazily: the flat file's times take
``written_ns`` (``Disk.mtime_ns``), and a flush of a layer's file syncs when ``writes``
moved since its last one (``HostFile.elsewhere``).
"""

from __future__ import annotations

from typing import Any

import pyfuse3

AVAILABLE = hasattr(pyfuse3, "read_map_create")
# overwrites answered by pyfuse3 too (``third_party/pyfuse3/write-map.patch``)
WRITES = hasattr(pyfuse3, "read_map_revoke_writes")


def stats() -> tuple[int, int]:
    """(READs answered from read maps, READs of mapped inodes passed to chainfs)."""
    if not AVAILABLE:
        return (0, 0)
    served, passed = pyfuse3.read_map_stats()
    return int(served), int(passed)


def write_stats() -> tuple[int, int]:
    """(WRITEs answered from read maps, WRITEs of mapped inodes passed to chainfs)."""
    if not WRITES:
        return (0, 0)
    served, passed = pyfuse3.read_map_write_stats()
    return int(served), int(passed)


class ReadMap:
    """The read map of one flat file's inode, filled by at most one chain at a time."""

    def __init__(self, inode: int) -> None:
        self.inode = pyfuse3.InodeT(inode)
        self.owner: Any = None  # the chain whose read_map this is
        # the writes pyfuse3 answered from the maps this inode had before its current
        # one, and the time of the last (``writes``: monotonic across resets)
        self._writes = 0
        self._written_ns = 0

    def take(self, chain: Any) -> None:
        """``chain`` fills this map from now on (the one before it, if any, no longer)."""
        if self.owner is not None and self.owner is not chain:
            self.owner.read_map = None
        self.owner = chain

    def reset(self, size: int, granule: int) -> None:
        """Empty, for a disk of ``size`` bytes in granules of ``granule``."""
        self._fold()
        pyfuse3.read_map_create(self.inode, size, granule)

    def set(self, offset: int, fd: int | None, host: int = 0) -> None:
        """The granule at ``offset`` shows ``fd``'s bytes from ``host`` (None: zeros)."""
        pyfuse3.read_map_set(self.inode, offset, fd, host)

    def set_writable(self, offset: int, fd: int, host: int) -> None:
        """``set``, and overwrites of the granule are pyfuse3's too until it is set or
        cleared again or ``revoke_writes`` (``WRITES`` only)."""
        pyfuse3.read_map_set(self.inode, offset, fd, host, writable=True)

    def revoke_writes(self) -> None:
        """Every overwrite through chainfs again (the granules stay mapped for reads)."""
        if WRITES:
            pyfuse3.read_map_revoke_writes(self.inode)

    def writes(self) -> int:
        """The overwrites pyfuse3 answered for this inode so far (only ever grows)."""
        if not WRITES:
            return 0
        return self._writes + int(pyfuse3.read_map_writes(self.inode)[0])

    def written_ns(self) -> int:
        """When pyfuse3 last answered an overwrite for this inode (CLOCK_REALTIME_COARSE
        ns, as ``Disk.touch``), 0 if never."""
        if not WRITES:
            return 0
        return max(self._written_ns, int(pyfuse3.read_map_writes(self.inode)[1]))

    def _fold(self) -> None:
        """Keep the current map's counts before it goes."""
        if WRITES:
            count, ns = pyfuse3.read_map_writes(self.inode)
            self._writes += int(count)
            self._written_ns = max(self._written_ns, int(ns))

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        pyfuse3.read_map_clear(self.inode, offset, length)

    def release(self) -> None:
        """Empty and unowned: every READ and WRITE goes to chainfs again."""
        self._fold()
        pyfuse3.read_map_remove(self.inode)
        if self.owner is not None:
            self.owner.read_map = None
        self.owner = None
