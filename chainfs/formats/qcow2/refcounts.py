"""qcow2 reference counts: lookup, allocation, growth, crash-ordered write-back, rebuild.

Invariant kept on disk at every instant: a cluster's on-disk refcount is at least the
number of on-disk references to it.  So increments reach the disk (and are flushed)
before anything that references the new clusters is written, and decrements are applied
only after the last reference to the cluster is durably gone (``defer_free``).  A crash
may leak clusters, never corrupt the image.

Allocation only moves forward from the end of the file and never hands out a cluster
freed in the same session, so readers that planned a host read outside the lock never
read a cluster that was meanwhile given to other data.  The one exception is
``unalloc``: clusters whose data write failed were never referenced, so nobody can have
planned a read of them, and handing them out again keeps a full disk from leaking.

Memory: the refcount table is kept up to its last used entry (one entry for an image
of up to 2 GiB with 64 KiB clusters, not the table's whole cluster); clean refcount
blocks live in the mount's shared cache (``cache``), and a block is taken out of it
(``_block_for_change``) before it is changed, kept dirty until ``write_back`` has
written it, then handed back.

Locking contract: not thread-safe; the owning driver serialises all calls.
"""

from __future__ import annotations

import bisect
import struct
from collections import OrderedDict

from ...errors import ImageError
from ...hostfile import HostFile
from . import cache as _cache
from .cache import REFCOUNT_BLOCK, MetaCache
from .entries import REFT_OFFSET_MASK
from .entries import U64 as _U64
from .header import MAX_REFTABLE_BYTES, Header


def get_entry(blk: bytearray, i: int, bits: int) -> int:
    """Entry ``i`` of a refcount block of ``bits``-wide entries (LSB-first below 8 bits)."""
    if bits >= 8:
        n = bits >> 3
        return int.from_bytes(blk[i * n : i * n + n], "big")
    per = 8 // bits
    return (blk[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


def set_entry(blk: bytearray, i: int, value: int, bits: int) -> None:
    if bits >= 8:
        n = bits >> 3
        blk[i * n : i * n + n] = value.to_bytes(n, "big")
        return
    per = 8 // bits
    shift = (i % per) * bits
    byte = blk[i // per] & ~(((1 << bits) - 1) << shift)
    blk[i // per] = byte | (value << shift)


def _used(table: bytes | bytearray) -> bytearray:
    """``table`` up to its last non-zero 8-byte entry."""
    n = len(table.rstrip(b"\0"))
    return bytearray(table[: -(-n // 8) * 8])


class Refcounts:
    """The refcount table and a write-back cache of refcount blocks."""

    def __init__(
        self, f: HostFile, h: Header, *, cache: MetaCache | None = None, owner: int = 0
    ) -> None:
        self.f = f
        self.h = h
        self.cs = h.cluster_size
        self.bits = h.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        # entries per block, as a power of two
        self.rb_shift = h.cluster_bits + 3 - h.refcount_order
        # the table up to its last non-zero entry (the rest reads as 0)
        self.table = _used(f.pread(h.refcount_table_clusters * self.cs, h.refcount_table_offset))
        self.shared = cache if cache is not None else _cache.CACHE
        self.owner = owner or _cache.owner()
        # the blocks taken out of the shared cache to be changed, until written back
        self.cache: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()  # block offsets with unwritten changes
        self.new_entries: dict[int, int] = {}  # table index -> new block offset, unwritten
        # (host offset, clusters, punch: give the clusters' blocks back once free)
        self.pending_free: list[tuple[int, int, bool]] = []
        self.next_free = -(-f.size() // self.cs)

    @property
    def table_entries(self) -> int:
        """How many entries the table on disk has room for."""
        return self.h.refcount_table_clusters * self.cs // 8

    # -- lookup --------------------------------------------------------------------------

    def _table_entry(self, idx: int) -> int:
        if idx in self.new_entries:
            return self.new_entries[idx]
        if idx * 8 >= len(self.table):
            return 0
        e: int = _U64.unpack_from(self.table, idx * 8)[0]
        return e & REFT_OFFSET_MASK

    def _block(self, off: int) -> bytearray:
        """The block at ``off``, to look at (``_block_for_change`` to change it)."""
        blk = self.cache.get(off)
        if blk is not None:
            return blk
        key = (self.owner, REFCOUNT_BLOCK, off)
        cached = self.shared.get(key)
        if cached is not None:
            assert isinstance(cached, bytearray)
            return cached
        if off % self.cs:
            raise ImageError(f"{self.f.path!r} has a misaligned refcount block")
        blk = self.f.pread_padded(self.cs, off)
        self.shared.put(key, blk)
        return blk

    def _block_for_change(self, off: int) -> bytearray:
        """The block at ``off``, taken out of the shared cache (no eviction can drop a
        change): it stays here until ``write_back`` has written it."""
        blk = self.cache.get(off)
        if blk is None:
            blk = self._block(off)
            self.shared.take((self.owner, REFCOUNT_BLOCK, off))
            self.cache[off] = blk
        return blk

    def _evict(self) -> None:
        """Hand the clean blocks back to the shared cache."""
        for off in [o for o in self.cache if o not in self.dirty]:
            self.shared.put((self.owner, REFCOUNT_BLOCK, off), self.cache.pop(off))

    def get(self, cluster: int) -> int:
        blk_off = self._table_entry(cluster >> self.rb_shift)
        if not blk_off:
            return 0
        return self._get_in(self._block(blk_off), cluster & ((1 << self.rb_shift) - 1))

    def first_not(self, clusters: list[int], value: int) -> int | None:
        """The first of ``clusters`` (distinct) whose refcount is not ``value``, or None.

        Runs of consecutive clusters within one block, the usual shape of an L2 table's
        data, are compared as one slice of the block.
        """
        shift, width = self.rb_shift, self.bits >> 3
        ordered = sorted(clusters)
        pos = 0
        while pos < len(ordered):
            c = ordered[pos]
            b = c >> shift
            end = bisect.bisect_left(ordered, (b + 1) << shift, pos)
            run = ordered[pos:end]
            off = self._table_entry(b)
            if width and off and run[-1] - run[0] == len(run) - 1:
                i = (run[0] & ((1 << shift) - 1)) * width
                if self._block(off)[i : i + len(run) * width] == value.to_bytes(width, "big") * len(
                    run
                ):
                    pos = end
                    continue
            for c in run:
                if self.get(c) != value:
                    return c
            pos = end
        return None

    def _get_in(self, blk: bytearray, i: int) -> int:
        return get_entry(blk, i, self.bits)

    def _set_in(self, blk: bytearray, i: int, value: int) -> None:
        set_entry(blk, i, value, self.bits)

    def _set(self, cluster: int, value: int) -> None:
        blk_off = self._table_entry(cluster >> self.rb_shift)
        assert blk_off, "refcount block must exist before setting a refcount"
        self._set_in(self._block_for_change(blk_off), cluster & ((1 << self.rb_shift) - 1), value)
        self.dirty.add(blk_off)

    def change(self, host: int, clusters: int, delta: int) -> None:
        """Add ``delta`` to the refcount of ``clusters`` clusters from ``host``."""
        first = host // self.cs
        for c in range(first, first + clusters):
            v = self.get(c) + delta
            if v < 0 or v > self.max_refcount:
                raise ImageError(f"refcount of cluster {c} in {self.f.path!r} out of range")
            if delta > 0 and not self._table_entry(c >> self.rb_shift):
                self._make_block_for(c)
            self._set(c, v)

    # -- allocation ------------------------------------------------------------------------

    def alloc(self, clusters: int) -> int:
        """Allocate ``clusters`` contiguous clusters (refcount 1); return the host offset."""
        while True:
            c = self.next_free
            if self._alloc_in_block(c, clusters):
                return c * self.cs
            busy = next((i for i in range(clusters) if self.get(c + i)), None)
            if busy is not None:
                self.next_free = c + busy + 1
                continue
            missing = next(
                (i for i in range(clusters) if not self._table_entry((c + i) >> self.rb_shift)),
                None,
            )
            if missing is not None:
                # the block for that range is placed at the first free cluster, then retry
                self._make_block_for(c + missing)
                continue
            for i in range(clusters):
                self._set(c + i, 1)
            self.next_free = c + clusters
            return c * self.cs

    def _alloc_in_block(self, c: int, clusters: int) -> bool:
        """The usual case of ``alloc`` as one slice of one block: clusters ``c`` on all
        free and counted in one existing block of byte-wide entries.  False if not."""
        shift, width = self.rb_shift, self.bits >> 3
        if not width or c >> shift != (c + clusters - 1) >> shift:
            return False
        off = self._table_entry(c >> shift)
        if not off:
            return False
        blk = self._block(off)
        i = (c & ((1 << shift) - 1)) * width
        n = clusters * width
        if blk.count(0, i, i + n) != n:
            return False
        blk = self._block_for_change(off)
        if blk.count(0, i, i + n) != n:
            return False
        blk[i : i + n] = (1).to_bytes(width, "big") * clusters
        self.dirty.add(off)
        self.next_free = c + clusters
        return True

    def unalloc(self, host: int, clusters: int) -> None:
        """Take back the latest ``alloc`` of ``clusters`` at ``host``: nothing references
        them (the write of their data failed), so they are free again, in memory and,
        at the next write-back, on disk, and the next allocation reuses them."""
        first = host // self.cs
        for c in range(first, first + clusters):
            self._set(c, 0)
        if self.next_free == first + clusters:
            self.next_free = first

    def _make_block_for(self, cluster: int) -> None:
        """Create the (missing) refcount block covering ``cluster``."""
        idx = cluster >> self.rb_shift
        if idx + 1 > self.table_entries:
            self._grow_table(idx + 1)
            if self._table_entry(idx):
                return
        # first free cluster for the new block
        c = self.next_free
        while self.get(c):
            c += 1
        if c >> self.rb_shift == idx:
            # the new block covers itself
            blk = bytearray(self.cs)
            self._set_in(blk, c & ((1 << self.rb_shift) - 1), 1)
            off = c * self.cs
            self.cache[off] = blk
            self.new_entries[idx] = off
            self.dirty.add(off)
            self.next_free = c + 1
            return
        off = self.alloc(1)  # counted in an existing block
        self.cache[off] = bytearray(self.cs)
        self.new_entries[idx] = off
        self.dirty.add(off)

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the file.

        The new blocks needed to count the new table (and themselves) are laid out first,
        all describing themselves; everything is written and flushed before the header
        switches to the new table with one small write.
        """
        self.write_back()  # start from a clean, fully written state
        cs, shift = self.cs, self.rb_shift
        entries = max(min_entries, self.table_entries * 2)
        start = self.next_free
        while True:
            t_clusters = -(-entries * 8 // cs)
            # blocks for the ranges of [start, end) that have none yet, laid out first
            nblocks = 0
            while True:
                end = start + nblocks + t_clusters
                need = [
                    r
                    for r in range(start >> shift, ((end - 1) >> shift) + 1)
                    if not self._table_entry(r)
                ]
                if len(need) == nblocks:
                    break
                nblocks = len(need)
            busy = next((c for c in range(start, end) if self.get(c)), None)
            if busy is not None:
                start = busy + 1
                continue
            top = max([*need, min_entries - 1])
            if top < entries:
                break
            entries = (top + 1) * 2
        if t_clusters * cs > MAX_REFTABLE_BYTES:
            raise ImageError(f"refcount table of {self.f.path!r} would grow too large")
        new_table = bytearray(t_clusters * cs)
        new_table[: len(self.table)] = self.table
        new_blocks: dict[int, bytearray] = {}
        for i, r in enumerate(need):
            off = (start + i) * cs
            new_blocks[off] = bytearray(cs)
            _U64.pack_into(new_table, r * 8, off)
        table_off = (start + nblocks) * cs
        counted: list[int] = []  # clusters counted in existing blocks
        for c in range(start, start + nblocks + t_clusters):
            r = c >> shift
            blk_off = _U64.unpack_from(new_table, r * 8)[0] & REFT_OFFSET_MASK
            if blk_off in new_blocks:
                self._set_in(new_blocks[blk_off], c & ((1 << shift) - 1), 1)
            else:
                counted.append(c)
                self._set(c, 1)
        try:
            for off, blk in new_blocks.items():
                self.f.pwrite(blk, off)
                self.cache[off] = blk
            for off in sorted(self.dirty):
                self.f.pwrite(self.cache[off], off)
            self.dirty.clear()
            self.f.pwrite(new_table, table_off)
            self.f.flush()
        except BaseException:
            # the header never pointed at the new table (a full disk): its clusters are
            # free again, so the refcounts claim nothing the file does not hold
            for c in counted:
                self._set(c, 0)
            for off in new_blocks:
                self.cache.pop(off, None)
            raise
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.f.pwrite(struct.pack(">QI", table_off, t_clusters), 48)
        self.f.flush()
        self.h.refcount_table_offset, self.h.refcount_table_clusters = table_off, t_clusters
        self.table = _used(new_table)
        self.next_free = start + nblocks + t_clusters
        self.defer_free(old_off, old_clusters)

    def defer_free(self, host: int, clusters: int, *, punch: bool = False) -> None:
        """Drop one reference once the metadata no longer pointing there is durable;
        with ``punch`` (a discard's), ``apply_frees`` names the clusters this leaves free
        so that their blocks can be given back to the host file system."""
        self.pending_free.append((host, clusters, punch))

    # -- write-back ------------------------------------------------------------------------

    @property
    def needs_write_back(self) -> bool:
        return bool(self.dirty or self.new_entries)

    def write_back(self) -> None:
        """Write dirty blocks, flush, then hook new blocks into the table, flush.

        A new block that another new block counts (its cluster was allocated while
        that block was being made) is hooked in only after that block's entry is
        durable, one flush later: otherwise a crash could keep the entry pointing at
        it and lose the one of the block holding its refcount, and the block would be
        referenced with a refcount of 0.
        """
        if not self.needs_write_back:
            return
        for off in sorted(self.dirty):
            self.f.pwrite(self.cache[off], off)
        self.dirty.clear()
        self.f.flush()
        pending = dict(self.new_entries)
        while pending:
            ready = {
                idx: off
                for idx, off in pending.items()
                if (off // self.cs) >> self.rb_shift not in pending
                or (off // self.cs) >> self.rb_shift == idx
            } or pending  # (no cycle can form; should one, hook them all in at once)
            for idx, off in sorted(ready.items()):
                if len(self.table) < idx * 8 + 8:
                    self.table += bytes(idx * 8 + 8 - len(self.table))
                _U64.pack_into(self.table, idx * 8, off)
                self.f.pwrite(
                    self.table[idx * 8 : idx * 8 + 8], self.h.refcount_table_offset + idx * 8
                )
                del pending[idx]
            self.f.flush()
        self.new_entries.clear()
        self._evict()

    def apply_frees(self) -> list[int]:
        """Apply deferred decrements; the caller has made the unreferencing durable.

        Returns the host clusters (by number, ascending) that a ``punch`` decrement left
        with a refcount of 0, as QEMU's ``update_refcount`` queues a discard only for a
        cluster whose refcount reached 0: a host cluster shared by several compressed
        clusters is given back only with the last of them."""
        frees, self.pending_free = self.pending_free, []
        punch: list[int] = []
        for host, clusters, give_back in frees:
            self.change(host, clusters, -1)
            if give_back:
                first = host // self.cs
                punch += [c for c in range(first, first + clusters) if not self.get(c)]
        return sorted(set(punch))
