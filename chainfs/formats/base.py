"""What every format driver offers: the answer for its own layer only.

A driver never looks at its backing file.  It says, for a range of the virtual disk,
whether this layer holds the bytes (as data, as zeros, compressed, or because the range
lies past its end, which reads as zeros and masks everything below) and where they are
on the host; composing those answers down a chain is ``chain.py``'s job, as
``block_status`` is the format's and ``bdrv_is_allocated_above`` the core's in QEMU.

Locking contract: drivers are not thread-safe; the chain that owns them serialises every
call that touches metadata under its own lock.  ``Extent`` plans may be executed (host
reads) outside that lock because drivers never reuse a host cluster freed in the same
session.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import UnsupportedFeature
from ..hostfile import HostFile

# extent kinds
UNALLOCATED = 0  # this layer defers to its backing file
DATA = 1  # bytes at host offset ``host``
ZERO = 2  # reads as zeros (zero cluster, or past the layer's end)
COMPRESSED = 3  # one compressed cluster at ``host``, ``clen`` bytes; ``skip`` into it

Buffer = bytes | bytearray | memoryview

# fill(offset, length) -> the chain's content below the active layer for that range; a
# shorter result reads as zeros past its end (b"": all zeros, known without comparing
# bytes); a bytearray it returns is the caller's (a driver may change it and write it)
Fill = Callable[[int, int], Buffer]


class Extent(NamedTuple):
    offset: int  # guest offset
    length: int
    kind: int
    host: int = 0
    clen: int = 0  # compressed: bytes of compressed data at ``host``
    skip: int = 0  # compressed: offset of ``offset`` within the decompressed cluster


class FormatInfo(NamedTuple):
    """What ``qemu-img info`` shows of a format's own fields."""

    cluster_size: int
    dirty: bool  # not closed cleanly (lazy refcounts)
    specific: dict[str, Any]  # "Format specific information", under QEMU's keys


@functools.cache
def lane_ones(count: int) -> int:
    """``count`` 8-bit lanes, each holding 1."""
    return int.from_bytes(b"\x01" * count, "little")


class Layer(ABC):
    """One image file of a chain, opened through its format driver."""

    format_name: str
    file: HostFile
    virtual_size: int
    cluster_size: int  # granularity of this layer's allocation answers
    backing_string: str | None = None
    backing_format: str | None = None

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def writable(self) -> bool:
        return self.file.writable

    @abstractmethod
    def allocation_map(self, start: int, count: int, granule: int) -> int:
        """Which of ``count`` granules from ``start`` this layer answers for.

        The answer is an integer of 8-bit lanes, lane ``i`` (bits ``8i..8i+7``) being 1
        where the layer answers for granule ``i`` and 0 where it defers to its backing
        file: the form in which the chain composes layers with big-integer arithmetic.
        ``granule`` divides ``cluster_size``; ``start`` is granule-aligned.  Granules
        reaching past the layer's end answer 1 (past the end reads as zeros).

        The chain asks for a region of thousands of granules of every layer at once, in
        the timed path of a read, so a driver should answer at C speed (skipping what is
        plainly unallocated without looking at it granule by granule) and may keep what
        it read for the ``extents`` lookups that reads of those granules will make.
        """

    def next_mapped(self, offset: int) -> int | None:
        """A cheap lower bound of where, at or after ``offset``, this layer may itself
        answer for a granule (hold data, zeros or a compressed cluster): everything in
        between defers to the backing file or lies past this layer's end; None if
        nothing from ``offset`` on does.  Lets a count of the chain's data skip, without
        building the map, what no layer maps (``Chain.count_data``).  By default
        ``offset`` itself: anything may be there."""
        return offset

    @abstractmethod
    def extents(self, offset: int, length: int) -> list[Extent]:
        """Where the bytes of ``[offset, offset+length)`` are, in order, covering it all."""

    @abstractmethod
    def read_compressed(self, host: int, clen: int) -> Buffer:
        """The decompressed cluster whose compressed data is at ``host``."""

    @abstractmethod
    def write(self, offset: int, data: Buffer, fill: Fill) -> None:
        """Write into this layer; ``fill`` supplies backing content for copy-on-write."""

    def write_guest(self, offset: int, data: Buffer, fill: Fill) -> bool:
        """``write`` of a guest request: True if this layer may now answer for clusters
        of the range it did not answer for before (the chain's map of who holds what
        must claim them), False if it only overwrote, in place, what it held (nothing
        allocated, no copy-on-write, no metadata changed).  By default ``write``, and
        True; a driver answers the common request (within one cluster: in place, or
        into one new cluster) with one lookup."""
        self.write(offset, data, fill)
        return True

    def write_started(self, offset: int, data: Buffer, fill: Fill) -> None:
        """``write``, allowed to return before the data landed; ``data`` must not change
        until ``settle`` (which the next write, flush or close does first).

        Readers never see the difference: ``extents`` and ``allocation_map`` over a range
        the started write touches answer as after it landed (a driver settles first), so
        a caller may ask the layer anything at any time and get the truth.  By default,
        simply ``write``."""
        self.write(offset, data, fill)

    def settle(self) -> None:
        """Finish a ``write_started`` (raising its failure)."""
        self.file.wait_written()

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, fill: Fill) -> None:
        """Make the range read as zeros, sparsely where the format allows."""

    def discard(self, offset: int, length: int, fill: Fill, below_has_data: bytes) -> None:
        """Make the range read as zeros and give back the space it held where the format
        can.  ``below_has_data``: one byte per ``cluster_size`` unit from the one holding
        ``offset``, 1 where a layer below holds data (so the range must mask it).  By
        default, ``write_zeroes``."""
        self.write_zeroes(offset, length, fill)

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        """``extents``, with the ranges that hold no data on the host (holes in a raw
        file) as ZERO: what ``lseek(SEEK_DATA/SEEK_HOLE)`` of the flat file reports.
        By default, ``extents``."""
        return self.extents(offset, length)

    def grow(self, size: int, fill: Fill, *, backing_size: int) -> None:
        """Make this (writable) image ``size`` bytes long, crash-safely; never shrinks.

        The new area reads as zeros, not as the backing file's content (which is
        ``backing_size`` bytes long and supplied by ``fill``), as QEMU's truncate with
        zero-write does, so the chain above keeps showing what it showed.
        """
        raise UnsupportedFeature(f"{self.path!r} ({self.format_name}) cannot be resized")

    def set_backing(self, backing: str | None, backing_format: str | None) -> None:
        """Point this (writable) image at another backing file, crash-safely."""
        raise UnsupportedFeature(f"{self.path!r} ({self.format_name}) has no backing file")

    def allocated_bytes(self) -> int:
        """Host bytes in use: what the file system allocated to the file (qemu-img
        info's "disk size"), not its length, which a sparse raw image far exceeds."""
        try:
            return os.fstat(self.file.fd).st_blocks * 512
        except OSError:
            return 0

    def in_place_host(self, offset: int) -> int | None:
        """The host offset of the guest byte at ``offset`` if an overwrite of its cluster
        is one ``pwrite`` there and nothing else (this layer holds the cluster, writable,
        allocated unshared: no copy-on-write, no metadata to change), else None: then
        pyfuse3 may do such overwrites itself (``fastread``).  By default None."""
        return None

    def dirty_covered(self, offset: int, length: int) -> bool:
        """Whether the layer's persistent dirty bitmaps say all of a range is dirty
        already (``mark_dirty`` there would change nothing); True without bitmaps."""
        return True

    def mark_dirty(self, offset: int, length: int) -> None:  # noqa: B027 (most keep none)
        """A guest write is about to change the range: the layer's persistent dirty
        bitmaps (if it keeps any) must say so, durably before the change can be."""

    def format_info(self) -> FormatInfo | None:
        """This format's own fields for ``chainfs info`` (None: it has none, as raw)."""
        return None

    @abstractmethod
    def flush(self) -> None:
        """Write back all cached metadata in crash-safe order and make it durable."""

    @abstractmethod
    def close(self) -> None:
        """Flush if writable, mark clean, close the file."""
