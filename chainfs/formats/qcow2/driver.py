"""The qcow2 driver: one qcow2 layer, read and written as QEMU does.

Lookups go through the L1 table (kept whole in memory, as QEMU does) and bounded LRU
caches: of 4 KiB slices of L2 tables in a read-only layer (QEMU's l2-cache-entry-size, so
a random read in a deep chain touches 4 KiB per layer, not a whole table), of whole L2
tables in a writable one.  Writes allocate at the end of the file and update the L2 cache
in memory; metadata reaches the disk in ``write_back`` in QEMU's order:

    refcount blocks -> flush -> refcount-table entries -> flush
    -> (data already written) -> L2 tables -> flush -> L1 entries
    -> flush -> deferred refcount decrements

so on-disk refcounts always cover on-disk references, data is durable before the L2
entry that points at it, and an L2 table is durable before the L1 entry that points at
it.  A crash therefore leaves old or new content for every cluster and at worst leaks.

Locking contract: not thread-safe; the owning chain serialises calls.  Host reads
planned by ``extents`` may run outside that lock (see ``refcounts``).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

from ...buffers import scratch, zeros
from ...errors import ChainfsError, ImageError, UnsupportedFeature
from ...hostfile import HostFile, HostIOError, sync_dir
from ..base import COMPRESSED, DATA, UNALLOCATED, ZERO, Buffer, Extent, Fill, Layer, lane_ones
from . import header as hdr
from .check import Layout
from .refcounts import Refcounts, set_entry

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED_BIT = 1 << 62
ZERO_FLAG = 1
_U64 = struct.Struct(">Q")

DEFAULT_L2_CACHE = 4 << 20
ZERO_SLICES_MAX = 1 << 16  # all-zero L2 slices a read-only layer remembers (8 bytes each)
WRITEBACK_BYTES = 8 << 20  # new data clusters written before their write-back is started
# bytes of an L2 table per read-side cache entry (QEMU's l2-cache-entry-size): a random
# read costs 4 KiB of cache, not a whole table, and a sparse table's all-zero slices
# are never kept at all
L2_SLICE = 4096


class Qcow2Layer(Layer):
    format_name = "qcow2"

    def __init__(self, file: HostFile, *, l2_cache_bytes: int = DEFAULT_L2_CACHE) -> None:
        self.file = f = file
        self.h = h = hdr.read_header(f)
        if file.writable and h.nb_snapshots:
            raise UnsupportedFeature(
                f"{f.path!r} has internal snapshots; chainfs does not write to such images"
            )
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.l2_bits = cb - 3
        self.l2_mask = (1 << self.l2_bits) - 1
        self.virtual_size = h.size - h.size % 512
        self.backing_string = h.backing_file
        self.backing_format = h.backing_format
        self.v3 = h.version >= 3
        # compressed descriptors
        self.csize_shift = 62 - (cb - 8)
        self.coff_mask = (1 << self.csize_shift) - 1
        self.nsec_mask = (1 << (cb - 8)) - 1
        self.l1 = bytearray(f.pread(h.l1_size * 8, h.l1_table_offset))
        self.l1 += bytes(h.l1_size * 8 - len(self.l1))
        self.l1_dirty: set[int] = set()
        self.l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.l2_dirty: set[int] = set()
        self.l2_cache_tables = max(4, l2_cache_bytes // cs)
        # a read-only layer (whose file cannot change while open) looks entries up in
        # slices of its tables; a writable one caches whole tables
        self.l2_slice = min(L2_SLICE, cs)
        self.l2_slices: OrderedDict[int, bytes] = OrderedDict()
        self.l2_slices_max = max(16, l2_cache_bytes // self.l2_slice)
        self._zero_slices: set[int] = set()  # slices read and found all zero (not kept)
        self._zcache: tuple[int, int, bytes] | None = None
        self.refs: Refcounts | None = None
        self._writeback_from = -1  # where the new clusters not yet written back start
        # a started write of new clusters (``write_started``) and a failure of one that
        # a reader settled, kept for the writer's next write, flush or close
        self._started: _Started | None = None
        self._unsettled: ChainfsError | None = None
        # writable only: where the metadata lies, the L2 tables already checked, and
        # (while refcounts are rebuilt) the host clusters of entries marked COPIED
        self._layout: Layout | None = None
        self._checked: set[int] = set()
        self._copied: set[int] | None = None
        if file.writable:
            self._open_for_writing()

    # -- opening ---------------------------------------------------------------------------

    def _open_for_writing(self) -> None:
        h, f = self.h, self.file
        # before the first write: refuse metadata that writing could damage further
        dirty = bool(h.incompatible & hdr.INCOMPAT_DIRTY)
        refs = None if dirty else Refcounts(f, h)
        self._layout = Layout(f.path, h, self.l1, f.size(), None if refs is None else refs.table)
        if refs is not None:
            self._layout.check_refcounts(refs.get)
        if h.autoclear:
            # we maintain none of the autoclear features (bitmaps): clear them before
            # the first write, which tells QEMU those structures are stale, as intended
            h.autoclear = 0
            f.pwrite(struct.pack(">Q", 0), 88)
            f.flush()
        if dirty:
            self._rebuild_refcounts()
        self.refs = refs or Refcounts(f, h)

    def _rebuild_refcounts(self) -> None:
        """Recount every reference of a dirty (lazy-refcounts) image and start afresh."""
        f, h, cs = self.file, self.h, self.cluster_size
        counts: dict[int, int] = {}
        self._copied = set()
        for host, n in self._references():
            for c in range(host // cs, host // cs + n):
                counts[c] = counts.get(c, 0) + 1
        for c in self._copied:
            if counts[c] != 1:
                raise ImageError(
                    f"{f.path!r} has a data cluster at {c * cs:#x} marked unshared"
                    f" but referenced {counts[c]} times"
                )
        self._copied = None
        start = max([-(-f.size() // cs), *(c + 1 for c in counts)])
        shift = h.cluster_bits + 3 - h.refcount_order
        # lay out: blocks, then the table, all counted in the new blocks themselves
        nblocks, tclusters = 0, 1
        while True:
            total = start + nblocks + tclusters
            need_blocks = ((total - 1) >> shift) + 1
            need_t = -(-need_blocks * 8 // cs)
            if need_blocks <= nblocks and need_t <= tclusters:
                break
            nblocks, tclusters = max(nblocks, need_blocks), max(tclusters, need_t)
        for c in range(start, start + nblocks + tclusters):
            counts[c] = 1
        h.refcount_table_clusters = tclusters
        h.refcount_table_offset = (start + nblocks) * cs
        bits = h.refcount_bits
        table = bytearray(tclusters * cs)
        for b in range(nblocks):
            blk = bytearray(cs)
            for i in range(1 << shift):
                v = counts.get((b << shift) + i)
                if v:
                    if v >= 1 << bits:
                        raise ImageError(f"a refcount in {f.path!r} exceeds its width")
                    set_entry(blk, i, v, bits)
            f.pwrite(blk, (start + b) * cs)
            _U64.pack_into(table, b * 8, (start + b) * cs)
        f.pwrite(table, h.refcount_table_offset)
        f.flush()
        f.pwrite(struct.pack(">QI", h.refcount_table_offset, tclusters), 48)
        f.flush()
        h.incompatible &= ~hdr.INCOMPAT_DIRTY
        f.pwrite(struct.pack(">Q", h.incompatible), 72)
        f.flush()

    def _references(self) -> Iterator[tuple[int, int]]:
        """Every (host offset, clusters) the image's metadata references."""
        h, cs = self.h, self.cluster_size
        yield 0, 1
        yield h.l1_table_offset, -(-h.l1_size * 8 // cs)
        for i in range(h.l1_size):
            l2_off = _U64.unpack_from(self.l1, i * 8)[0] & OFFSET_MASK
            if not l2_off:
                continue
            yield l2_off, 1
            table = self._l2(l2_off)
            for j in range(cs // 8):
                e = _U64.unpack_from(table, j * 8)[0]
                if e & COMPRESSED_BIT:
                    first, n = self._compressed_clusters(e)
                    yield first, n
                elif e & OFFSET_MASK:
                    yield e & OFFSET_MASK, 1

    # -- lookups ---------------------------------------------------------------------------

    def _l2(self, off: int) -> bytearray:
        """The whole L2 table at ``off``, cached (writable layers; others use slices)."""
        table = self.l2_cache.get(off)
        if table is not None:
            self.l2_cache.move_to_end(off)
            return table
        if off % self.cluster_size:
            raise ImageError(f"{self.path!r} has a misaligned L2 table at {off:#x}")
        table = bytearray(self.file.pread(self.cluster_size, off))
        table += bytes(self.cluster_size - len(table))
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
        self.l2_cache[off] = table
        if len(self.l2_cache) > self.l2_cache_tables:
            self._evict_l2(keep=off)
        return table

    def _evict_l2(self, keep: int) -> None:
        """Drop the least recently used clean table other than ``keep``."""
        victim = next((o for o in self.l2_cache if o != keep and o not in self.l2_dirty), None)
        if victim is None:
            self.write_back(sync=False)
            victim = next(o for o in self.l2_cache if o != keep)
        del self.l2_cache[victim]

    def _slice(self, l2_off: int, a: int) -> bytes:
        """The cached slice of the on-disk L2 table at ``l2_off`` holding byte ``a``."""
        s = self.l2_slice
        off = l2_off + a - a % s
        piece = self.l2_slices.get(off)
        if piece is not None:
            self.l2_slices.move_to_end(off)
            return piece
        if l2_off % self.cluster_size:
            raise ImageError(f"{self.path!r} has a misaligned L2 table at {l2_off:#x}")
        piece = self.file.pread(s, off)
        if len(piece) < s:
            piece += bytes(s - len(piece))
        self._keep_slice(off, piece)
        return piece

    def _keep_slice(self, off: int, piece: bytes) -> None:
        self.l2_slices[off] = piece
        if len(self.l2_slices) > self.l2_slices_max:
            self.l2_slices.popitem(last=False)

    def _entry(self, cluster: int) -> int:
        i = cluster >> self.l2_bits
        if i * 8 >= len(self.l1):
            return 0
        l2_off = _U64.unpack_from(self.l1, i * 8)[0] & OFFSET_MASK
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

    def allocation_map(self, start: int, count: int, granule: int) -> int:
        self._settle_for_reader(start, start + count * granule)
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
            l2_off = _U64.unpack_from(self.l1, i * 8)[0] & OFFSET_MASK if i < self.h.l1_size else 0
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
        if l2_off % self.cluster_size:
            raise ImageError(f"{self.path!r} has a misaligned L2 table at {l2_off:#x}")
        lo, hi = a - a % s, -(-b // s) * s
        data = scratch(hi - lo, "l2")
        known = self.l2_slices
        zero = self._zero_slices
        offsets = range(l2_off + lo, l2_off + hi, s)
        if all(o in known or o in zero for o in offsets):
            pieces = []
            for p, o in zip(range(0, hi - lo, s), offsets, strict=True):
                piece = known.get(o)
                if piece is not None:  # the others are all zero: not looked at
                    data[p : p + s] = piece
                    pieces.append(p)
            return _allocated_lanes(data, a - lo, b - lo, s, pieces)
        with memoryview(data) as view:
            self.file.preadinto(view[: hi - lo], l2_off + lo)
            pieces = _nonzero_pieces(data, 0, hi - lo, s)
            for p in pieces:
                self._keep_slice(l2_off + lo + p, view[p : p + s].tobytes())
        if len(zero) > ZERO_SLICES_MAX:
            zero.clear()
        kept = set(pieces)
        zero.update(l2_off + lo + p for p in range(0, hi - lo, s) if p not in kept)
        return _allocated_lanes(data, a - lo, b - lo, s, pieces)

    def _entries(self, cluster: int) -> tuple[bytes | bytearray, int, int]:
        """The L2 entries from ``cluster`` on, as far as one cached piece holds them:
        (the piece, the byte offset of ``cluster``'s entry in it, how many entries from
        there).  An empty piece means no L2 table: that many entries read as 0."""
        i = cluster >> self.l2_bits
        a = (cluster & self.l2_mask) * 8
        l2_off = _U64.unpack_from(self.l1, i * 8)[0] & OFFSET_MASK if i * 8 < len(self.l1) else 0
        if not l2_off:
            return b"", 0, (self.cluster_size - a) // 8
        if self.file.writable:  # whole tables, checked as they are loaded
            return self._l2(l2_off), a, (self.cluster_size - a) // 8
        s = self.l2_slice
        return self._slice(l2_off, a), a % s, (s - a % s) // 8

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._settle_for_reader(offset, offset + length)
        out: list[Extent] = []
        cs, cb = self.cluster_size, self.cluster_bits
        pos, end = offset, offset + length
        stop = min(end, self.virtual_size)
        last = -(-stop // cs)  # clusters up to this one (exclusive) hold the range
        kind = host = 0
        run_start = run_host = -1
        unpack = _U64.unpack_from
        while pos < stop:
            c = pos >> cb
            piece, a, count = self._entries(c)
            c_end = min(c + count, last)
            if not piece:  # no L2 table: the whole span is unallocated
                if run_start >= 0 and kind != UNALLOCATED:
                    out.append(Extent(run_start, pos - run_start, kind, run_host))
                    run_start = -1
                if run_start < 0:
                    run_start, run_host, kind = pos, 0, UNALLOCATED
                pos = min(c_end << cb, stop)
                continue
            for j in range(a, a + 8 * (c_end - c), 8):
                e = unpack(piece, j)[0]
                in_off = pos & (cs - 1)
                n = min(cs - in_off, stop - pos)
                if not e:
                    k, host = UNALLOCATED, 0
                elif e & COMPRESSED_BIT:
                    k, host = COMPRESSED, 0
                elif e & ZERO_FLAG:
                    if not self.v3:
                        # as QEMU: bit 0 is no zero flag in v2, and set it means corruption
                        raise ImageError(f"{self.path!r} (qcow2 v2) has a zero cluster")
                    k, host = ZERO, 0
                elif e & OFFSET_MASK:
                    host = e & OFFSET_MASK
                    if host % cs:
                        raise ImageError(
                            f"{self.path!r} has a misaligned data cluster at {host:#x}"
                        )
                    k, host = DATA, host + in_off
                else:
                    k, host = UNALLOCATED, 0
                if run_start >= 0 and (
                    k != kind
                    or k == COMPRESSED
                    or (k == DATA and host != run_host + pos - run_start)
                ):
                    out.append(Extent(run_start, pos - run_start, kind, run_host))
                    run_start = -1
                if k == COMPRESSED:
                    coff = e & self.coff_mask
                    nsec = ((e >> self.csize_shift) & self.nsec_mask) + 1
                    out.append(Extent(pos, n, COMPRESSED, coff, nsec * 512 - (coff & 511), in_off))
                elif run_start < 0:
                    run_start, run_host, kind = pos, host, k
                pos += n
        if run_start >= 0:
            out.append(Extent(run_start, pos - run_start, kind, run_host))
        if pos < end:  # past the end reads zeros
            out.append(Extent(pos, end - pos, ZERO))
        return out

    def read_compressed(self, host: int, clen: int) -> Buffer:
        z = self._zcache
        if z is not None and z[0] == host and z[1] == clen:
            return z[2]
        data = self.file.pread(clen, host)
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, self.cluster_size)
        except zlib.error:
            raise ImageError(
                f"{self.path!r} has a damaged compressed cluster at {host:#x}"
            ) from None
        if len(out) != self.cluster_size:
            raise ImageError(f"{self.path!r} has a short compressed cluster at {host:#x}")
        self._zcache = (host, clen, out)
        return out

    # -- writing ---------------------------------------------------------------------------

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
            return self._l2(l2_off)
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

    def _release(self, e: int) -> None:
        """Drop the reference an overwritten L2 entry held (once that is durable)."""
        assert self.refs is not None
        if e & COMPRESSED_BIT:
            self.refs.defer_free(*self._compressed_clusters(e))
        elif e & OFFSET_MASK:
            self.refs.defer_free(e & OFFSET_MASK, 1)

    def _old_content(self, cluster: int, e: int, fill: Fill) -> Buffer:
        """What the whole cluster reads as now (for copy-on-write)."""
        cs = self.cluster_size
        start = cluster * cs
        if e & COMPRESSED_BIT:
            coff = e & self.coff_mask
            nsec = ((e >> self.csize_shift) & self.nsec_mask) + 1
            return self.read_compressed(coff, nsec * 512 - (coff & 511))
        if e & ZERO_FLAG and self.v3:
            return bytes(cs)
        if e & OFFSET_MASK:
            data = self.file.pread(cs, e & OFFSET_MASK)
            return data + bytes(cs - len(data))
        n = min(cs, self.virtual_size - start)
        below = fill(start, n)
        return bytes(below) + bytes(cs - len(below))

    def write(self, offset: int, data: Buffer, fill: Fill) -> None:
        """Overwrite allocated clusters in place; give the others new clusters, allocated
        together at the end of the file and written with one ``pwrite``.

        Runs of whole new clusters are written straight from ``data`` (no copy); so are
        runs of in-place clusters that lie contiguously on the host.
        """
        self._write(offset, data, fill, started=False)

    def write_started(self, offset: int, data: Buffer, fill: Fill) -> None:
        """``write``, with the data of new clusters written while this returns
        (``HostFile.pwrite_started``): the entries point at them only once it landed
        (``settle``).  Clusters written in place, and every cluster outside the started
        write, are done when this returns.

        The rule for readers: no answer about this layer depends on whether a started
        write has landed.  A lookup whose range touches its clusters (``extents``,
        ``allocation_map``) settles it first, so it answers with what they hold once it
        landed; a lookup elsewhere answers at once.  The next write, flush or close
        settles too.  A reader may assume nothing else: a host read of a planned extent
        is of landed data only because the plan was made after the settle."""
        self._write(offset, data, fill, started=True)

    def settle(self) -> None:
        """Wait for the started write, then point its clusters' entries at it; when it
        failed, take the clusters back and raise (also a failure a reader's settle
        found: the writer learns of it at its next write, flush or close)."""
        failed, self._unsettled = self._unsettled, None
        if failed is not None:
            raise failed
        started, self._started = self._started, None
        if started is None:
            return
        assert self.refs is not None
        try:
            self.file.wait_written()
        except BaseException:
            self.refs.unalloc(started.host, len(started.fresh))
            raise
        self._point(started.host, started.fresh)

    def _settle_for_reader(self, offset: int, end: int) -> None:
        """Settle a started write whose clusters lie in ``[offset, end)`` (the one place
        the readers' rule of ``write_started`` is kept).  A failure is not the reader's:
        the clusters are taken back, so the old entries it then reads are the truth,
        and the failure waits for the writer."""
        started = self._started
        if started is None or end <= started.first or offset >= started.end:
            return
        try:
            self.settle()
        except ChainfsError as e:
            self._unsettled = e

    def _write(self, offset: int, data: Buffer, fill: Fill, *, started: bool) -> None:
        self.settle()
        if offset + len(data) > self.virtual_size:
            raise ImageError(f"write past the end of {self.path!r}")
        assert self.refs is not None
        cs, cb = self.cluster_size, self.cluster_bits
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        fresh: list[tuple[int, int]] = []  # (cluster, old entry) of the new clusters
        pieces: list[Buffer] = []  # their content, in order (runs of ``view`` merged)
        merged_to = -1  # where the last piece ends in ``view``, if it is a slice of it
        # in place: (host, start in view, end in view) of the pending contiguous run
        run_host = run_a = run_b = -1
        while pos < end:
            c = pos >> cb
            in_off = pos & (cs - 1)
            n = min(cs - in_off, end - pos)
            a = pos - offset
            e = self._entry(c)
            if e & COPIED and e & OFFSET_MASK and not e & (COMPRESSED_BIT | ZERO_FLAG):
                host = (e & OFFSET_MASK) + in_off
                if run_b == a and run_host + (run_b - run_a) == host:
                    run_b = a + n
                else:
                    if run_b >= 0:
                        self.file.pwrite(view[run_a:run_b], run_host)
                    run_host, run_a, run_b = host, a, a + n
            elif n == cs:
                fresh.append((c, e))
                if merged_to == a:
                    start = a - len(pieces[-1])
                    pieces[-1] = view[start : a + n]
                else:
                    pieces.append(view[a : a + n])
                merged_to = a + n
            else:
                content = bytearray(self._old_content(c, e, fill))
                content[in_off : in_off + n] = view[a : a + n]
                fresh.append((c, e))
                pieces.append(content)
                merged_to = -1
            pos += n
        if run_b >= 0:
            self.file.pwrite(view[run_a:run_b], run_host)
        if not fresh:
            return
        # make sure the L2 tables exist before the data clusters are allocated, so data
        # clusters stay contiguous
        table_no = -1
        for c, _ in fresh:
            if c >> self.l2_bits != table_no:
                table_no = c >> self.l2_bits
                self._l2_for_write(c)
        host = self.refs.alloc(len(fresh))
        end_host = host + len(fresh) * cs
        self.file.reserve(end_host)
        # new clusters only move forward through the file: every WRITEBACK_BYTES of
        # them, have the kernel start writing them out, so a flush does not find a
        # whole burst of writes still to do
        if not 0 <= self._writeback_from <= host:
            self._writeback_from = host
        writeback = 0
        if end_host - self._writeback_from >= WRITEBACK_BYTES:
            writeback = end_host - self._writeback_from
            self._writeback_from = end_host
        payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        try:
            if started:
                self.file.pwrite_started(payload, host, writeback)
                self._started = _Started(host, fresh, fresh[0][0] * cs, (fresh[-1][0] + 1) * cs)
                return
            self.file.pwrite(payload, host)
        except BaseException:
            # the data did not land (a full disk): no entry points at the new clusters,
            # so they go back, and the refcounts claim nothing the file does not hold
            self.refs.unalloc(host, len(fresh))
            raise
        if writeback:
            self.file.start_writeback(end_host - writeback, writeback)
        self._point(host, fresh)

    def _point(self, host: int, fresh: list[tuple[int, int]]) -> None:
        """Point the entries of the new clusters ``fresh`` (cluster, old entry) at the
        clusters from ``host`` on, one table at a time."""
        cs = self.cluster_size
        i = 0
        while i < len(fresh):
            table_no = fresh[i][0] >> self.l2_bits
            table = self._l2_for_write(fresh[i][0])
            self.l2_dirty.add(_U64.unpack_from(self.l1, table_no * 8)[0] & OFFSET_MASK)
            while i < len(fresh) and fresh[i][0] >> self.l2_bits == table_no:
                c, e = fresh[i]
                _U64.pack_into(table, (c & self.l2_mask) * 8, (host + i * cs) | COPIED)
                if e:
                    self._release(e)
                i += 1

    def write_zeroes(self, offset: int, length: int, fill: Fill) -> None:
        self.settle()
        if offset + length > self.virtual_size:
            raise ImageError(f"write past the end of {self.path!r}")
        cs = self.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            c = pos // cs
            n = min(cs - pos % cs, end - pos)
            whole = n == cs or (pos % cs == 0 and pos + n == self.virtual_size)
            if whole and (self.v3 or self.backing_string is None):
                e = self._entry(c)
                new = ZERO_FLAG if self.v3 else 0
                if e != new:
                    self._set_entry(c, new)
                    self._release(e)
            else:
                self.write(pos, bytes(n), fill)
            pos += n

    # -- write-back ------------------------------------------------------------------------

    def write_back(self, *, sync: bool) -> None:
        """Bring the on-disk metadata up to date, in crash-safe order."""
        f, refs = self.file, self.refs
        if refs is None:
            return
        self.settle()
        refs.write_back()
        if self.l2_dirty or self.l1_dirty:
            f.flush()  # data (and the refcounts covering it) before the L2 entries
            for off in sorted(self.l2_dirty):
                f.pwrite(self.l2_cache[off], off)
            self.l2_dirty.clear()
            if self.l1_dirty:
                f.flush()  # new L2 tables before the L1 entries that point at them
                for i in sorted(self.l1_dirty):
                    f.pwrite(self.l1[i * 8 : i * 8 + 8], self.h.l1_table_offset + i * 8)
                self.l1_dirty.clear()
        if refs.pending_free:
            f.flush()  # the metadata no longer referencing the clusters, then decrement
            refs.apply_frees()
            refs.write_back()
        if sync:
            f.flush()

    def flush(self) -> None:
        self.write_back(sync=True)

    def set_backing(self, backing: str | None, backing_format: str | None) -> None:
        """Point this (open, writable) image at another backing file, crash-safely."""
        hdr.rewrite_backing(self.file, self.h, backing, backing_format)
        self.backing_string, self.backing_format = backing, self.h.backing_format

    def grow(self, size: int, fill: Fill, *, backing_size: int) -> None:
        """Grow the virtual size, as QEMU's ``qcow2_co_truncate`` with zero-write does.

        Order: a larger L1 table is written elsewhere and switched to with one header
        write; then the new area that would otherwise show the backing file (and the
        tail of a partial last cluster that holds data) is zeroed, still beyond the old
        size, and made durable; only then does one 8-byte header write change the size.
        A crash leaves the old size with at most unreferenced or invisible clusters.
        """
        size -= size % 512
        old = self.virtual_size
        if size <= old:
            return
        if size > hdr.MAX_VIRTUAL_SIZE:
            raise ImageError(f"cannot grow {self.path!r} to {size} bytes")
        cs = self.cluster_size
        self._grow_l1(-(-size // (cs * (cs // 8))))
        zero_end = old
        if self.backing_string is not None and backing_size > old:
            zero_end = min(size, backing_size)
        if old % cs:
            e = self._entry(old // cs)
            holds = e & COMPRESSED_BIT or (e & OFFSET_MASK and not (self.v3 and e & ZERO_FLAG))
            if holds or zero_end > old:
                zero_end = max(zero_end, min(size, -(-old // cs) * cs))

        def below(offset: int, length: int) -> Buffer:
            part = bytes(fill(offset, min(length, old - offset))) if offset < old else b""
            return part + bytes(length - len(part))

        self.virtual_size = size  # in memory only, so the zeroing may reach the new area
        try:
            if zero_end > old:
                self.write_zeroes(old, zero_end - old, below)
            self.write_back(sync=True)
            self.file.pwrite(_U64.pack(size), 24)
            self.file.flush()
        except BaseException:
            self.virtual_size = old
            raise
        self.h.size = size

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

    def allocated_bytes(self) -> int:
        try:
            return os.fstat(self.file.fd).st_blocks * 512
        except OSError:
            return 0

    def close(self) -> None:
        """Write back and close; the descriptor (and its image locks) goes even when the
        write-back fails, which is raised: the disk then holds the last metadata that
        was written in order, consistent, and the rest is lost (never acknowledged)."""
        if self.file.fd < 0:
            return
        try:
            if self.file.writable:
                self.write_back(sync=True)
        finally:
            self.file.close()


class _Started(NamedTuple):
    """A started write of new clusters: where on the host, the (cluster, old entry)
    pairs to point at it once it landed, in order, and the guest range they span."""

    host: int
    fresh: list[tuple[int, int]]
    first: int
    end: int


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


def _log2(n: int) -> int:
    b = n.bit_length() - 1
    if n <= 0 or 1 << b != n:
        raise ImageError(f"{n} is not a power of two")
    return b


def create_overlay(
    path: str,
    *,
    size: int,
    backing: str | None,
    backing_format: str | None,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
) -> None:
    """Create a new, empty qcow2 v3 image (refusing an existing path).

    Everything but the header is written and flushed first; the header with its magic
    comes last, so a crash leaves either a complete image or a file that is not qcow2.
    """
    cb = _log2(cluster_size)
    if not 9 <= cb <= 21:
        raise ImageError(f"cluster size {cluster_size} outside 512 B .. 2 MiB")
    order = _log2(refcount_bits)
    size -= size % 512
    cs = cluster_size
    l1_size = -(-size // (cs * (cs // 8)))
    l1_clusters = -(-l1_size * 8 // cs)
    shift = cb + 3 - order
    nblocks, tclusters = 1, 1
    while True:
        total = 1 + tclusters + nblocks + l1_clusters
        need_b = ((total - 1) >> shift) + 1
        need_t = -(-need_b * 8 // cs)
        if need_b <= nblocks and need_t <= tclusters:
            break
        nblocks, tclusters = max(nblocks, need_b), max(tclusters, need_t)
    h = hdr.Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cb,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + tclusters + nblocks) * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=tclusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=hdr.QEMU_HEADER_LENGTH,
        extra=bytes(hdr.QEMU_HEADER_LENGTH - hdr.V3_HEADER_LENGTH),
    )
    head, name = hdr.layout(h, backing, backing_format)
    if name:
        h.backing_file_offset, h.backing_file_size = len(head), len(name)
        head = h.pack_fields() + h.pack_extensions()
    if len(head) + len(name) > cs:
        raise ImageError(f"backing file name too long for a {cs}-byte header cluster")
    total = 1 + tclusters + nblocks + l1_clusters
    meta = bytearray((total - 1) * cs)
    for b in range(nblocks):
        _U64.pack_into(meta, b * 8, (1 + tclusters + b) * cs)
        blk = bytearray(cs)
        for i in range(1 << shift):
            if (b << shift) + i < total:
                set_entry(blk, i, 1, refcount_bits)
        start = (tclusters + b) * cs
        meta[start : start + cs] = blk
    f = HostFile(path, True, create=True)
    try:
        f.pwrite(meta, cs)
        f.flush()
        f.pwrite(head + name, 0)
        f.flush()
    finally:
        f.close()
    _sync_dir(os.path.dirname(os.path.abspath(path)))


def _sync_dir(path: str) -> None:
    try:
        sync_dir(path)
    except OSError as e:
        raise HostIOError(
            f"syncing the directory {path!r} failed: {e.strerror}", e.errno or errno.EIO
        ) from None


def set_backing(path: str, backing: str | None, backing_format: str | None) -> None:
    """Rewrite the backing string and format of the image at ``path``, crash-safely."""
    f = HostFile(path, True)
    try:
        h = hdr.read_header(f)
        hdr.rewrite_backing(f, h, backing, backing_format)
    finally:
        f.close()
