"""The qcow2 driver: one qcow2 layer, read and written as QEMU does.

Lookups go through the L1 and L2 tables and their caches (``tables``).  Writes allocate
at the end of the file and update the L2 cache in memory; metadata reaches the disk in
``write_back`` in QEMU's order:

    refcount blocks -> flush -> refcount-table entries -> flush
    -> (data already written) -> L2 tables -> flush -> L1 entries
    -> flush -> deferred refcount decrements

so on-disk refcounts always cover on-disk references, data is durable before the L2
entry that points at it, and an L2 table is durable before the L1 entry that points at
it.  A crash therefore leaves old or new content for every cluster and at worst leaks.

A discard (``discard``) goes the other way, in QEMU's order (``qcow2_cluster_discard``,
then ``update_refcount`` and ``qcow2_process_discards``):

    L2 entries (unallocated, or zero clusters) -> flush -> refcount decrements
    -> refcount blocks written -> holes punched in the image file for the host
    clusters left with no reference (fallocate PUNCH_HOLE|KEEP_SIZE)

so no on-disk entry ever points at a cluster whose refcount dropped or whose blocks
were given back: a crash leaves each discarded cluster with its old entry (old content)
or its new one (zeros), and at worst leaks the clusters whose decrement was lost.

Locking contract: not thread-safe; the owning chain serialises calls.  Host reads
planned by ``extents`` may run outside that lock (see ``refcounts``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

from ...errors import ChainfsError, ImageError, UnsupportedFeature
from ...hostfile import HostFile
from ..base import COMPRESSED, DATA, UNALLOCATED, ZERO, Buffer, Extent, Fill, FormatInfo
from . import header as hdr
from .bitmaps import Bitmaps
from .entries import COMPRESSED_BIT, COPIED, OFFSET_MASK, ZERO_FLAG, in_place
from .entries import U64 as _U64
from .layout import Layout
from .refcounts import Refcounts, set_entry
from .repoint import repoint
from .tables import DEFAULT_L2_CACHE, Tables

WRITEBACK_BYTES = 8 << 20  # new data clusters written before their write-back is started


class Qcow2Layer(Tables):
    format_name = "qcow2"

    def __init__(self, file: HostFile, *, l2_cache_bytes: int = DEFAULT_L2_CACHE) -> None:
        h = hdr.read_header(file)
        if file.writable and h.nb_snapshots:
            raise UnsupportedFeature(
                f"{file.path!r} has internal snapshots; chainfs does not write to such images"
            )
        super().__init__(file, h, l2_cache_bytes=l2_cache_bytes)
        self.backing_string = h.backing_file
        self.backing_format = h.backing_format
        self._zcache: tuple[int, int, bytes] | None = None
        self._zfree = 0  # where the next compressed cluster may go (``write_compressed``)
        self._writeback_from = -1  # where the new clusters not yet written back start
        # a started write of new clusters (``write_started``) and a failure of one that
        # a reader settled, kept for the writer's next write, flush or close
        self._started: _Started | None = None
        self._unsettled: ChainfsError | None = None
        self.bitmaps: Bitmaps | None = None  # the persistent dirty bitmaps (writable)
        if file.writable:
            self._open_for_writing()

    # -- opening ---------------------------------------------------------------------------

    def _open_for_writing(self) -> None:
        h, f = self.h, self.file
        # before the first write: refuse metadata that writing could damage further
        dirty = bool(h.incompatible & hdr.INCOMPAT_DIRTY)
        refs = None if dirty else self._refcounts()
        self._layout = Layout(f.path, h, self.l1, f.size(), None if refs is None else refs.table)
        if refs is not None:
            self._layout.check_refcounts(refs.get)
        if h.autoclear & ~hdr.AUTOCLEAR_BITMAPS:
            # the autoclear features other than bitmaps we do not maintain: clear them
            # before the first write, which tells QEMU those structures are stale
            h.autoclear &= hdr.AUTOCLEAR_BITMAPS
            f.pwrite(struct.pack(">Q", h.autoclear), 88)
            f.flush()
        # read (and refuse, as QEMU does, bitmaps of unknown types or flags) first; a
        # refcount rebuild counts their clusters too
        self.bitmaps = bitmaps = Bitmaps(f, h, self.virtual_size)
        if dirty:
            self._rebuild_refcounts()
        self.refs = refs or self._refcounts()
        bitmaps.refs = self.refs
        bitmaps.materialise_enabled()

    def _refcounts(self) -> Refcounts:
        """The refcounts of this (writable) layer, their clean blocks in the shared cache."""
        return Refcounts(self.file, self.h, cache=self.cache, owner=self.owner)

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
        if self.bitmaps is not None:
            yield from self.bitmaps.references()

    # -- lookups ---------------------------------------------------------------------------

    def allocation_map(self, start: int, count: int, granule: int) -> int:
        self._settle_for_reader(start, start + count * granule)
        return self._map(start, count, granule)

    def next_mapped(self, offset: int) -> int | None:
        found = super().next_mapped(offset)
        started = self._started  # a started write's clusters count as mapped
        if started is not None and started.end > offset:
            first = max(offset, started.first)
            found = first if found is None else min(found, first)
        return found

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

    def _release(self, e: int, *, punch: bool = False) -> None:
        """Drop the reference an overwritten L2 entry held (once that is durable); with
        ``punch``, give the host cluster's blocks back once nothing references it."""
        assert self.refs is not None
        if e & COMPRESSED_BIT:
            # as QEMU (``qcow2_free_any_cluster``): the host clusters the compressed
            # sectors touch, each dropping one reference; a host cluster other
            # compressed clusters share keeps theirs and stays
            host, n = self._compressed_clusters(e)
            self.refs.defer_free(host, n, punch=punch)
            self._zfree = 0  # its host cluster may be freed: pack no more into it
        elif e & OFFSET_MASK:
            self.refs.defer_free(e & OFFSET_MASK, 1, punch=punch)

    def _old_content(self, cluster: int, e: int, fill: Fill) -> bytearray | None:
        """What the whole cluster reads as now (for copy-on-write), in a buffer of its
        own for the caller to change: what ``fill`` or the host read gave, when that is
        one already (no copy of a cluster the COW then copies again).  None when the
        metadata says it reads as zeros (a zero cluster; nothing below shows data)."""
        cs = self.cluster_size
        start = cluster * cs
        if e & COMPRESSED_BIT:
            coff = e & self.coff_mask
            nsec = ((e >> self.csize_shift) & self.nsec_mask) + 1
            return bytearray(self.read_compressed(coff, nsec * 512 - (coff & 511)))
        if e & ZERO_FLAG and self.v3:
            return None
        if e & OFFSET_MASK:
            return self.file.pread_padded(cs, e & OFFSET_MASK)
        n = min(cs, self.virtual_size - start)
        below = fill(start, n)
        if not len(below):
            return None
        if len(below) == cs and type(below) is bytearray:
            return below
        out = bytearray(cs)
        out[: len(below)] = below
        return out

    def mark_dirty(self, offset: int, length: int) -> None:
        """Set the bits of the enabled bitmaps for a range about to change, durably
        before the change can be (``bitmaps``): where a cluster of the range is
        overwritten in place, the new bits are flushed before the data write."""
        bm = self.bitmaps
        if bm is None or not bm.list or not bm.mark(offset, length):
            return
        cb = self.cluster_bits
        first, last = offset >> cb, (offset + max(length, 1) - 1) >> cb
        if last - first > 64:  # a large range: not worth looking
            self.file.flush()
            return
        for c in range(first, last + 1):
            e = self._entry(c)
            if in_place(e):
                self.file.flush()
                return

    def in_place_host(self, offset: int) -> int | None:
        """``Layer.in_place_host``: ``write_guest``'s in-place branch would take the
        cluster (its one lookup finds an entry ``in_place``)."""
        if offset >= self.virtual_size:
            return None
        e = self._guest_entry(offset >> self.cluster_bits)
        if e is None or not in_place(e):
            return None
        return (e & OFFSET_MASK) + (offset & (self.cluster_size - 1))

    def _guest_entry(self, c: int) -> int | None:
        """The entry of cluster ``c`` for a guest write's one lookup (``write_guest``),
        or None where such a write is ``write``'s: a started write or its failure to
        settle (``write`` settles first and raises it), not writable, past the L1
        table."""
        if (
            self._started is not None
            or self._unsettled is not None
            or self.refs is None  # (not writable)
            or c >> self.l2_bits >= self.h.l1_size
        ):
            return None
        return self._entry(c)

    def dirty_covered(self, offset: int, length: int) -> bool:
        bm = self.bitmaps
        return bm is None or not bm.list or bm.covered(offset, length)

    def write(self, offset: int, data: Buffer, fill: Fill) -> None:
        """Overwrite allocated clusters in place; give the others new clusters, allocated
        together at the end of the file and written with one ``pwrite``.

        Runs of whole new clusters are written straight from ``data`` (no copy); so are
        runs of in-place clusters that lie contiguously on the host.
        """
        self._write(offset, data, fill, started=False)

    def write_guest(self, offset: int, data: Buffer, fill: Fill) -> bool:
        """``Layer.write_guest``: a write within one cluster looks its entry up once —
        this layer holds the cluster unshared (COPIED): one ``pwrite`` in place and
        nothing else (no entry, refcount or map changes, so nothing to order); no entry
        at all: a new cluster (``_write_new``, as ``write`` does it, without its loop
        and lists).  Anything else (other entries, writes over more than one cluster,
        a started write or its failure to settle: ``write`` settles first and raises
        it) is ``write``'s."""
        cb = self.cluster_bits
        c = offset >> cb
        n = len(data)
        e = (
            self._guest_entry(c)
            if n and (offset + n - 1) >> cb == c and offset + n <= self.virtual_size
            else None
        )
        if e is None:
            return super().write_guest(offset, data, fill)
        if in_place(e):
            self.file.pwrite(data, (e & OFFSET_MASK) + (offset & (self.cluster_size - 1)))
            return False
        if e:
            self._write(offset, data, fill, started=False)
            return True
        # a cluster this layer has nothing for: its content is what lies below
        payload: Buffer = data
        zero_cow = -1
        if n < self.cluster_size:
            content = self._old_content(c, 0, fill)
            if content is None:
                zero_cow = offset & (self.cluster_size - 1)
            else:
                in_off = offset & (self.cluster_size - 1)
                content[in_off : in_off + n] = data
                payload = content
        self._write_new([(c, 0)], payload, zero_cow, started=False)
        return True

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
        # where in its cluster the data of a write lies that is the whole write, into one
        # cluster that reads as zeros (then maybe written alone, below); -1: no such write
        zero_cow = -1
        while pos < end:
            c = pos >> cb
            in_off = pos & (cs - 1)
            n = min(cs - in_off, end - pos)
            a = pos - offset
            e = self._entry(c)
            if in_place(e):
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
                content = self._old_content(c, e, fill)
                fresh.append((c, e))
                if content is None and n == len(view):
                    zero_cow = in_off
                    pieces.append(view)
                else:
                    if content is None:
                        content = bytearray(cs)
                    content[in_off : in_off + n] = view[a : a + n]
                    pieces.append(content)
                merged_to = -1
            pos += n
        if run_b >= 0:
            self.file.pwrite(view[run_a:run_b], run_host)
        if fresh:
            payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self._write_new(fresh, payload, zero_cow, started=started)

    def _write_new(
        self, fresh: list[tuple[int, int]], payload: Buffer, zero_cow: int, *, started: bool
    ) -> None:
        """Give the clusters ``fresh`` (cluster, old entry; consecutive) new host
        clusters, allocated together at the end of the file, write ``payload`` (their
        whole content) there and point their entries at it.  ``zero_cow`` >= 0: one
        cluster that reads as zeros, ``payload`` being the data alone, at that offset in
        it."""
        assert self.refs is not None
        cs = self.cluster_size
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
        at = host
        if zero_cow >= 0:
            # One cluster that reads as zeros, partly written.  The zeros of a COW need not
            # be written where the new cluster lies wholly past the end of the file (as
            # allocation from the end makes it, unless a failed write's clusters were
            # taken back and handed out again over what it may have left): there the
            # file reads as zeros already, the part of the cluster before the data as a
            # hole once the data write extends the file, the part after it as the bytes
            # past the end, which every reader pads with zeros (``HostFile.preadinto``,
            # QEMU's file driver; ``qemu-img check`` accepts a last cluster partly past
            # the end, and the next session allocates after it).  The order that keeps a
            # crash safe is unchanged: the data is flushed before the L2 entry pointing
            # at the cluster is written (``write_back``), and the zeros are zeros in
            # every state the file can crash in.  QEMU saves the same write with a
            # write-zeroes of the cluster (``handle_alloc_space``).
            if host >= self.file.size():
                at = host + zero_cow
            else:
                content = bytearray(cs)
                content[zero_cow : zero_cow + len(payload)] = payload
                payload = content
        try:
            if started:
                self.file.pwrite_started(payload, at, writeback)
                self._started = _Started(host, fresh, fresh[0][0] * cs, (fresh[-1][0] + 1) * cs)
                return
            self.file.pwrite(payload, at)
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

    def write_compressed(self, offset: int, data: Buffer, fill: Fill) -> bool:
        """Write one whole cluster at ``offset`` (cluster-aligned; the disk's last
        cluster may be short and is padded with zeros) as a compressed cluster, as
        QEMU's ``qcow2_co_pwritev_compressed``: raw deflate (zlib, no header), into an
        unallocated cluster only.  An allocated cluster, or data that does not shrink
        below a cluster, is written uncompressed (``write``).  Whether it was compressed.

        Compressed clusters are packed byte by byte into host clusters, as QEMU's
        ``qcow2_alloc_bytes``: the next one starts where the last one ended when it fits
        in the rest of that host cluster (whose refcount then counts one more
        reference), else in a newly allocated host cluster.  The entry gives the byte
        offset and the 512-byte sectors the data touches (QCOW2.md, compressed cluster
        descriptor); the data is written before the entry, which reaches the disk at
        ``write_back`` as every new entry does.
        """
        self.settle()
        cs = self.cluster_size
        n = len(data)
        if (
            offset % cs
            or offset + n > self.virtual_size
            or (n != cs and offset + n != self.virtual_size)
        ):
            raise ImageError(f"compressed write of {n} bytes at {offset} in {self.path!r}")
        c = offset // cs
        if self._entry(c) != 0:
            self.write(offset, data, fill)
            return False
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        raw = bytes(data) if n == cs else bytes(data) + bytes(cs - n)
        out = z.compress(raw) + z.flush()
        if len(out) >= cs - 1:  # QEMU's limit: it must fit in cluster_size - 1 bytes
            self.write(offset, data, fill)
            return False
        assert self.refs is not None
        self._l2_for_write(c)  # the table first: it is not to split a packed cluster
        free = self._zfree
        if free > 0 and free % cs and free % cs + len(out) <= cs and self.refs.get(free // cs):
            host = free
            self.refs.change(free - free % cs, 1, 1)
            fresh = False
        else:
            host = self.refs.alloc(1)
            self.file.reserve(host + cs)
            fresh = True
        try:
            self.file.pwrite(out, host)
        except BaseException:
            if fresh:
                self.refs.unalloc(host, 1)
            else:
                self.refs.change(host - host % cs, 1, -1)
            raise
        self._zfree = host + len(out)
        self._zcache = None
        extra = ((host + len(out) - 1) >> 9) - (host >> 9)  # sectors beyond the first
        self._set_entry(c, COMPRESSED_BIT | (extra << self.csize_shift) | host)
        return True

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

    def discard(self, offset: int, length: int, fill: Fill, below_has_data: bytes) -> None:
        """Make the range read as zeros and give back what it held (QEMU's discard with
        the guarantee of zeros).  ``below_has_data`` has one byte per cluster of this
        layer from the one holding ``offset``: 1 where a layer below holds data.

        A whole cluster becomes unallocated where nothing below holds data, else a zero
        cluster (v3) or, in a v2 image, written zeros; the host clusters it referenced
        are freed in the order at the top of this module, and their blocks punched out
        of the image file once no reference is left.  A partial cluster is written as
        zeros (copy-on-write) unless it reads as zeros already."""
        self.settle()
        if offset + length > self.virtual_size:
            raise ImageError(f"write past the end of {self.path!r}")
        cs = self.cluster_size
        c0 = offset // cs
        pos, end = offset, offset + length
        # whole clusters end here (the disk's end counts as a cluster's)
        whole_end = end if end == self.virtual_size else end - end % cs
        while pos < end:
            c = pos // cs
            n = min(cs - pos % cs, end - pos)
            whole = n == cs or (pos % cs == 0 and pos + n == self.virtual_size)
            below = below_has_data[c - c0]
            if whole and not below and not self._has_table(c):
                # no L2 table and nothing below (mkfs discarding a whole new disk): the
                # clusters are unallocated already, up to the table's end or data below
                stop = min(((c >> self.l2_bits) + 1) << self.l2_bits, -(-whole_end // cs))
                j = below_has_data.find(1, c - c0, stop - c0)
                pos = min(whole_end, (stop if j < 0 else c0 + j) * cs)
                continue
            e = self._entry(c)
            if not whole:
                zero = (self.v3 and e & ZERO_FLAG and not e & COMPRESSED_BIT) or (
                    not e and not below
                )
                if not zero:
                    self.write(pos, bytes(n), fill)
            elif below and not self.v3:
                self.write(pos, bytes(n), fill)  # v2: only data reads as zeros over data
            else:
                new = ZERO_FLAG if below else 0
                if e != new:
                    self._set_entry(c, new)
                    self._release(e, punch=True)
            pos += n

    def _has_table(self, cluster: int) -> bool:
        """Whether the L1 entry of ``cluster``'s L2 table points at one."""
        return bool(self._l1e(cluster >> self.l2_bits) & OFFSET_MASK)

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
        self._unpin()  # written: clean, back to the shared cache
        if refs.pending_free:
            f.flush()  # the metadata no longer referencing the clusters, then decrement
            punch = refs.apply_frees()
            refs.write_back()
            self._punch(punch)
        if sync:
            f.flush()

    def _punch(self, clusters: list[int]) -> None:
        """Give back the blocks of the (ascending, unreferenced) host ``clusters``,
        consecutive ones at once.  Best effort: the space stays used where the host
        file system cannot punch holes, and the clusters stay free either way."""
        cs, i = self.cluster_size, 0
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            self.file.punch_hole(clusters[i] * cs, (j - i) * cs)
            i = j

    def flush(self) -> None:
        self.write_back(sync=True)

    def set_backing(self, backing: str | None, backing_format: str | None) -> None:
        """Point this (open, writable) image at another backing file, crash-safely."""
        repoint(self.file, self.h, backing, backing_format)
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

    def format_info(self) -> FormatInfo:
        h = self.h
        specific: dict[str, Any] = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": "zlib" if h.compression_type == 0 else "zstd",
        }
        if h.version >= 3:
            specific["lazy-refcounts"] = bool(h.compatible & hdr.COMPAT_LAZY_REFCOUNTS)
        found = hdr.bitmap_directory(self.file, h)
        if found is not None and found[2]:
            specific["bitmaps"] = [
                {"flags": bm.flag_names, "name": bm.name, "granularity": bm.granularity}
                for bm in found[2]
            ]
        specific["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            specific["corrupt"] = bool(h.incompatible & hdr.INCOMPAT_CORRUPT)
            specific["extended-l2"] = bool(h.incompatible & hdr.INCOMPAT_EXTL2)
        return FormatInfo(h.cluster_size, bool(h.incompatible & hdr.INCOMPAT_DIRTY), specific)

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
            self.cache.forget(self.owner)


class _Started(NamedTuple):
    """A started write of new clusters: where on the host, the (cluster, old entry)
    pairs to point at it once it landed, in order, and the guest range they span."""

    host: int
    fresh: list[tuple[int, int]]
    first: int
    end: int
