"""The L1 and L2 tables of a qcow2 layer: their caches, lookups through them, the
allocation map, and finding or allocating the L2 table a write needs (QEMU's
``qcow2-cluster.c`` and ``qcow2-cache.c``).

Clean metadata lives in the mount's one cache (``cache.CACHE``: one byte budget, one LRU
for every layer of every chain, ``cache_size=``).  A read-only layer (whose file cannot
change while open) reads its L2 tables in 4 KiB slices through it (QEMU's
l2-cache-entry-size: a random read in a deep chain costs 4 KiB per layer, not a whole
table) and its L1 table in 64 KiB slices (8,192 entries: 4 TiB of disk at 64 KiB
clusters); an all-zero slice is remembered as a marker, not kept.  So an idle read-only
layer holds no table at all, whatever its size.  A writable layer keeps its L1
table whole, as QEMU does, and caches whole L2 tables, each checked against the
metadata layout the first time it is loaded.  A write first takes the table it changes
out of the shared cache (``_pin``: nothing another chain's eviction could drop) and
marks it dirty; ``write_back`` (the driver's) brings the dirty tables to the disk in
crash-safe order and only then hands them back to the shared cache (``_unpin``).  More
than ``l2_cache_tables`` pinned tables start a write-back early.

Locking contract: not thread-safe; the owning chain serialises calls (the shared cache
is thread-safe).
"""

from __future__ import annotations

import re
import struct
from abc import abstractmethod
from collections import OrderedDict

from ...buffers import scratch, zeros
from ...errors import ImageError, UnsupportedFeature
from ...hostfile import HostFile
from ..base import Layer, lane_ones
from . import cache as _cache
from . import header as hdr
from .cache import L1_PIECE, L2_PIECE, L2_TABLE, MetaCache
from .entries import COPIED, OFFSET_MASK
from .entries import U64 as _U64
from .layout import Layout
from .refcounts import Refcounts

# the L2 tables a writable layer may keep changed (dirty) before a write-back; clean
# tables go to the mount's cache
DEFAULT_L2_CACHE = 4 << 20
# bytes of an L2 table per read-side cache entry (QEMU's l2-cache-entry-size): a random
# read costs 4 KiB of cache, not a whole table, and a sparse table's all-zero slices
# are never kept at all (a marker says they are zero)
L2_SLICE = 4096
L1_SLICE_BYTES = 65536  # bytes of a read-only layer's L1 table per cache entry
_ZERO = b""  # the cached marker of an all-zero slice
_NONZERO = re.compile(rb"[^\x00]")  # a byte of a table that says something


class Tables(Layer):
    """A qcow2 layer's L1 table and L2 caches (the driver, ``Qcow2Layer``, is built on it)."""

    def __init__(
        self, file: HostFile, h: hdr.Header, *, l2_cache_bytes: int, cache: MetaCache | None = None
    ) -> None:
        self.file = f = file
        self.h = h
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.l2_bits = cb - 3
        self.l2_mask = (1 << self.l2_bits) - 1
        self.virtual_size = h.size - h.size % 512
        self.v3 = h.version >= 3
        # compressed descriptors
        self.csize_shift = 62 - (cb - 8)
        self.coff_mask = (1 << self.csize_shift) - 1
        self.nsec_mask = (1 << (cb - 8)) - 1
        self.cache = cache if cache is not None else _cache.CACHE
        self.owner = _cache.owner()  # this open's key in the shared cache
        # a read-only layer looks its L1 table up in slices (none held while idle)
        self.l1 = f.pread_padded(h.l1_size * 8, h.l1_table_offset) if f.writable else bytearray()
        self.l1_dirty: set[int] = set()
        # writable: the L2 tables taken out of the shared cache to be changed (dirty,
        # or about to be), until the write-back has written them
        self.l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_cache_tables = max(4, l2_cache_bytes // cs)
        self._hold = -1  # a pinned table a write-back in progress must not hand back
        # a read-only layer (whose file cannot change while open) looks entries up in
        # slices of its tables; a writable one caches whole tables
        self.l2_slice = min(L2_SLICE, cs)
        self.refs: Refcounts | None = None
        # writable only: where the metadata lies, the L2 tables already checked, and
        # (while refcounts are rebuilt) the host clusters of entries marked COPIED
        self._layout: Layout | None = None
        self._checked: set[int] = set()
        self._copied: set[int] | None = None

    @abstractmethod
    def write_back(self, *, sync: bool) -> None:
        """Bring the on-disk metadata up to date (evicting a dirty table needs it)."""

    def _l1e(self, i: int) -> int:
        """L1 entry ``i`` (0 past the table): from the whole table of a writable layer,
        from a cached slice of a read-only one."""
        if i >= self.h.l1_size:
            return 0
        if self.file.writable:
            e: int = _U64.unpack_from(self.l1, i * 8)[0]
            return e
        a = i * 8
        start = a - a % L1_SLICE_BYTES
        piece = self._l1_slice(start)
        if not piece:
            return 0
        e = _U64.unpack_from(piece, a - start)[0]
        return e

    def _l1_slice(self, start: int) -> bytes | bytearray:
        """The slice of a read-only layer's L1 table from byte ``start``, through the
        shared cache (empty: all zero)."""
        key = (self.owner, L1_PIECE, start)
        piece = self.cache.get(key)
        if piece is None:
            n = min(L1_SLICE_BYTES, self.h.l1_size * 8 - start)
            piece = bytes(self.file.pread_padded(n, self.h.l1_table_offset + start))
            if piece == zeros(n):
                piece = _ZERO
            self.cache.put(key, piece)
        return piece

    def next_mapped(self, offset: int) -> int | None:
        """The start of the first L1 entry's span at or after ``offset``'s that has an
        L2 table (``Layer.next_mapped``): the table searched at C speed, a read-only
        layer's slice by slice through the shared cache (an all-zero slice is one
        lookup of its marker), so a count skips 512 MiB (64 KiB clusters) per zero
        entry, 4 TiB per zero slice, without building the map."""
        span_bits = self.cluster_bits + self.l2_bits
        a, end = (offset >> span_bits) * 8, self.h.l1_size * 8
        found = -1
        if self.file.writable:
            m = _NONZERO.search(self.l1, a, end)
            found = -1 if m is None else m.start()
        else:
            start = a - a % L1_SLICE_BYTES
            while start < end:
                piece = self._l1_slice(start)
                m = _NONZERO.search(piece, max(0, a - start)) if piece else None
                if m is not None:
                    found = start + m.start()
                    break
                start += L1_SLICE_BYTES
        if found < 0:
            return None
        return max(offset, (found // 8) << span_bits)

    def _l2(self, off: int) -> bytearray:
        """The whole L2 table at ``off``, cached (writable layers; others use slices).

        Not to be changed: ``_pin`` gives the table a write may change."""
        table = self.l2_cache.get(off)
        if table is not None:
            return table
        key = (self.owner, L2_TABLE, off)
        cached = self.cache.get(key)
        if cached is not None:
            assert isinstance(cached, bytearray)
            return cached
        self._check_aligned(off)
        table = self.file.pread_padded(self.cluster_size, off)
        layout = self._layout
        # tables past the file's end at open were made by this session: nothing to check
        if layout is not None and off < layout.eof and off not in self._checked:
            layout.check_l2(
                off,
                table,
                v3=self.v3,
                compressed_clusters=self._compressed_clusters,
                refcounts=self.refs,
                copied=self._copied,
            )
            self._checked.add(off)
        self.cache.put(key, table)
        return table

    def _pin(self, off: int) -> bytearray:
        """The L2 table at ``off``, taken out of the shared cache to be changed: it
        stays with this layer until a write-back has written it (``_unpin``)."""
        table = self.l2_cache.get(off)
        if table is not None:
            self.l2_cache.move_to_end(off)
            return table
        table = self._l2(off)
        self.cache.take((self.owner, L2_TABLE, off))
        self.l2_cache[off] = table
        if len(self.l2_cache) > self.l2_cache_tables:
            self._evict_l2(keep=off)
        return table

    def _unpin(self, keep: int = -1) -> None:
        """Hand the clean pinned tables other than ``keep`` back to the shared cache."""
        for off in [o for o in self.l2_cache if o not in self.l2_dirty]:
            if off != keep and off != self._hold:
                self.cache.put((self.owner, L2_TABLE, off), self.l2_cache.pop(off))

    def _evict_l2(self, keep: int) -> None:
        """Too many tables pinned: hand back the clean ones, and if all are dirty,
        write them back first (``keep``, which the caller is about to change, stays)."""
        self._unpin(keep)
        if len(self.l2_cache) > self.l2_cache_tables:
            self._hold = keep
            try:
                self.write_back(sync=False)
            finally:
                self._hold = -1
            self._unpin(keep)

    def _slice(self, l2_off: int, a: int) -> bytes:
        """The cached slice of the on-disk L2 table at ``l2_off`` holding byte ``a``."""
        s = self.l2_slice
        off = l2_off + a - a % s
        key = (self.owner, L2_PIECE, off)
        piece = self.cache.get(key)
        if piece is None:
            self._check_aligned(l2_off)
            piece = bytes(self.file.pread_padded(s, off))
            self.cache.put(key, _ZERO if piece == zeros(s) else piece)
        elif not piece:
            return zeros(s)
        assert isinstance(piece, bytes)
        return piece

    def _check_aligned(self, l2_off: int) -> None:
        if l2_off % self.cluster_size:
            raise ImageError(f"{self.path!r} has a misaligned L2 table at {l2_off:#x}")

    def _entry(self, cluster: int) -> int:
        l2_off = self._l1e(cluster >> self.l2_bits) & OFFSET_MASK
        if not l2_off:
            return 0
        a = (cluster & self.l2_mask) * 8
        if self.file.writable:  # whole tables, checked as they are loaded
            e: int = _U64.unpack_from(self._l2(l2_off), a)[0]
        else:
            e = _U64.unpack_from(self._slice(l2_off, a), a % self.l2_slice)[0]
        return e

    def _compressed_clusters(self, e: int) -> tuple[int, int]:
        """The host clusters a compressed entry's data touches (as QEMU counts them)."""
        coff = e & self.coff_mask
        nsec = ((e >> self.csize_shift) & self.nsec_mask) + 1
        start = coff & ~511
        first = start // self.cluster_size
        last = (start + nsec * 512 - 1) // self.cluster_size
        return first * self.cluster_size, last - first + 1

    def _map(self, start: int, count: int, granule: int) -> int:
        """``allocation_map`` (``Layer``) from the tables as they stand."""
        cs, l2b = self.cluster_size, self.l2_bits
        k = cs // granule
        first = start // cs
        skip = (start % cs) // granule
        nclusters = -(-(count + skip) // k)
        vclusters = -(-self.virtual_size // cs)
        x = 0  # 8-bit lanes, one per cluster
        c, c_end = first, first + nclusters
        while c < c_end:
            if c >= vclusters:
                x |= lane_ones(c_end - c) << (8 * (c - first))
                break
            i = c >> l2b
            span_end = min((i + 1) << l2b, c_end, vclusters)
            l2_off = self._l1e(i) & OFFSET_MASK
            if l2_off:
                a = (c & self.l2_mask) * 8
                x |= self._table_lanes(l2_off, a, a + (span_end - c) * 8) << (8 * (c - first))
            c = span_end
        if k > 1:
            # one lane per cluster -> k per cluster, in min(k, nclusters) C-speed steps
            per_cluster = x.to_bytes(nclusters, "little")
            out: bytes | bytearray
            if k <= nclusters:
                out = bytearray(nclusters * k)
                for j in range(k):
                    out[j::k] = per_cluster
            else:
                ones, zeros = b"\x01" * k, bytes(k)
                out = b"".join(ones if v else zeros for v in per_cluster)
            x = int.from_bytes(out[skip : skip + count], "little")
        # a granule reaching past the layer's end is answered here: past the end reads
        # zeros; any unallocated part before the end comes back from ``extents``
        full = max(0, (self.virtual_size - start) // granule)
        if full < count:
            x |= lane_ones(count - full) << (8 * full)
        return x

    def _table_lanes(self, l2_off: int, a: int, b: int) -> int:
        """Allocation lanes of the entries at bytes ``[a, b)`` of the L2 table at ``l2_off``.

        A table not cached whole is read for the span in one go, into a buffer reused
        from call to call (fresh memory costs a page fault per 4 KiB), and only its slices
        holding some non-zero entry are kept for the lookups that reads will make: the
        map sends no read to this layer for the others.  The offsets of the all-zero
        ones are remembered, so a span whose slices are all known is answered without a
        read (a commit or copy asks for the same few clusters several times per step).
        """
        s = self.l2_slice
        if self.file.writable:  # whole tables, as in ``_entry``
            table = self._l2(l2_off)
            return _allocated_lanes(table, a, b, s, _nonzero_pieces(table, a, b, s))
        self._check_aligned(l2_off)
        lo, hi = a - a % s, -(-b // s) * s
        data = scratch(hi - lo, "l2")
        cache, owner = self.cache, self.owner
        offsets = range(l2_off + lo, l2_off + hi, s)
        known = [cache.get((owner, L2_PIECE, o)) for o in offsets]
        if all(piece is not None for piece in known):
            pieces = []
            for p, piece in zip(range(0, hi - lo, s), known, strict=True):
                if piece:  # the others are all zero: not looked at
                    data[p : p + s] = piece
                    pieces.append(p)
            return _allocated_lanes(data, a - lo, b - lo, s, pieces)
        with memoryview(data) as view:
            self.file.preadinto(view[: hi - lo], l2_off + lo)
            pieces = _nonzero_pieces(data, 0, hi - lo, s)
            kept = set(pieces)
            for p in range(0, hi - lo, s):
                piece = view[p : p + s].tobytes() if p in kept else _ZERO
                cache.put((owner, L2_PIECE, l2_off + lo + p), piece)
        return _allocated_lanes(data, a - lo, b - lo, s, pieces)

    def _entries(self, cluster: int) -> tuple[bytes | bytearray, int, int]:
        """The L2 entries from ``cluster`` on, as far as one cached piece holds them:
        (the piece, the byte offset of ``cluster``'s entry in it, how many entries from
        there).  An empty piece means no L2 table: that many entries read as 0."""
        i = cluster >> self.l2_bits
        a = (cluster & self.l2_mask) * 8
        l2_off = self._l1e(i) & OFFSET_MASK
        if not l2_off:
            return b"", 0, (self.cluster_size - a) // 8
        if self.file.writable:  # whole tables, checked as they are loaded
            return self._l2(l2_off), a, (self.cluster_size - a) // 8
        s = self.l2_slice
        return self._slice(l2_off, a), a % s, (s - a % s) // 8

    def _l2_for_write(self, cluster: int) -> bytearray:
        """The L2 table for ``cluster``, allocating it if needed; returns it (cached)."""
        assert self.refs is not None
        i = cluster >> self.l2_bits
        if i >= self.h.l1_size:
            raise ImageError(f"write past the L1 table of {self.path!r}")
        l1e = _U64.unpack_from(self.l1, i * 8)[0]
        l2_off = l1e & OFFSET_MASK
        if l2_off and not l1e & COPIED:
            if self.refs.get(l2_off // self.cluster_size) != 1:
                raise UnsupportedFeature(f"{self.path!r} has a shared L2 table; refusing to write")
            _U64.pack_into(self.l1, i * 8, l2_off | COPIED)
            self.l1_dirty.add(i)
        if l2_off:
            return self._pin(l2_off)
        l2_off = self.refs.alloc(1)
        table = bytearray(self.cluster_size)
        self.l2_cache[l2_off] = table
        self.l2_dirty.add(l2_off)
        _U64.pack_into(self.l1, i * 8, l2_off | COPIED)
        self.l1_dirty.add(i)
        if len(self.l2_cache) > self.l2_cache_tables:
            self._evict_l2(keep=l2_off)
        return table

    def _set_entry(self, cluster: int, value: int) -> None:
        table = self._l2_for_write(cluster)
        _U64.pack_into(table, (cluster & self.l2_mask) * 8, value)
        i = cluster >> self.l2_bits
        self.l2_dirty.add(_U64.unpack_from(self.l1, i * 8)[0] & OFFSET_MASK)

    def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place (QCOW2.md §1.7)."""
        h, f = self.h, self.file
        if entries <= h.l1_size:
            return
        if entries * 8 > hdr.MAX_L1_BYTES:
            raise ImageError(f"the L1 table of {self.path!r} would grow too large")
        assert self.refs is not None
        self.write_back(sync=True)  # the old table on disk is complete
        cs = self.cluster_size
        clusters = -(-entries * 8 // cs)
        table = bytearray(self.l1) + bytes(entries * 8 - len(self.l1))
        off = self.refs.alloc(clusters)
        try:
            f.pwrite(table, off)
            self.refs.write_back()
            f.flush()
        except BaseException:
            self.refs.unalloc(off, clusters)  # the header never pointed there
            raise
        old_off, old_clusters = h.l1_table_offset, -(-h.l1_size * 8 // cs)
        f.pwrite(struct.pack(">IQ", entries, off), 36)
        f.flush()
        h.l1_size, h.l1_table_offset = entries, off
        self.l1 = table
        if old_off and old_clusters:
            self.refs.defer_free(old_off, old_clusters)
            self.write_back(sync=True)


def _nonzero_pieces(entries: bytes | bytearray, a: int, b: int, step: int) -> list[int]:
    """The offsets of the ``step``-aligned pieces of ``entries`` overlapping ``[a, b)``
    that are not all zero: one memcmp each, no copy, so a sparse table is skimmed fast."""
    zero = zeros(step)
    return [p for p in range(a - a % step, b, step) if not entries.startswith(zero, p)]


def _allocated_lanes(
    entries: bytes | bytearray, a: int, b: int, step: int, pieces: list[int]
) -> int:
    """One 8-bit lane per 8-byte L2 entry of ``entries[a:b]``: 1 if it says anything.

    Only the runs of the non-zero ``pieces`` (from ``_nonzero_pieces``) are looked at.
    """
    x = 0
    run = end = -1
    for p in pieces:
        if p != end:
            if run >= 0:
                x |= _column_lanes(entries, run, end) << (run - a)
            run = max(p, a)
        end = p + step
    if run >= 0:
        x |= _column_lanes(entries, run, min(end, b)) << (run - a)
    return x


def _column_lanes(entries: bytes | bytearray, a: int, b: int) -> int:
    """The allocation lanes of ``entries[a:b]``, with C-speed bulk operations.

    The entries' byte columns are OR-ed together as big integers, then each lane is
    folded down to its lowest bit.  The first byte (COPIED, compressed, reserved bits) is
    left out: every entry that says anything has a non-zero offset, descriptor or zero
    flag in the other seven.  All-zero columns (high offset bits; low ones below the
    cluster size) are skipped after a memcmp.
    """
    n = (b - a) // 8
    zero = zeros(n)
    x = 0
    for k in (7, 6, 5, 4, 3, 2, 1):
        column = entries[a + k : b : 8]
        if column != zero:
            x |= int.from_bytes(column, "little")
    x |= x >> 4
    x |= x >> 2
    x |= x >> 1
    return x & lane_ones(n)
