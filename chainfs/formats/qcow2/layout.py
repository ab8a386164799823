"""What a qcow2 layer must prove about its metadata before chainfs writes to it.

Reading a damaged or hostile image can at worst return wrong bytes or fail with
``ImageError``; writing one could make the damage worse.  An L2 entry marked COPIED that
points into the L1 table would have guest data written over the L1 table; an entry
released on overwrite that points at a refcount block would lower that block's refcount
to zero; a data cluster past the end of the file would later be handed out again.  So a
writable layer first maps where its metadata lies (header, L1 table, refcount table and
blocks, L2 tables) and refuses overlaps and anything outside the file, then checks each
L2 table the first time it is loaded from disk: entries aligned, inside the file, not
into metadata, and with refcounts that agree with the COPIED flag.  These are QEMU's
metadata overlap check and the parts of ``qemu-img check`` that matter for writing, paid
once per table rather than per write.  What these checks cannot see is damage that
spans tables: a cluster referenced from two L2 tables but counted once, or a reference
past the end of the file in a table the session never loads (chainfs allocates there).
Finding those takes reading every table, which QEMU does not do at open either.

The metadata map is a bitmap with one bit per cluster of the file, so it costs at most
1/4096 of the file's size whatever the image claims.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ...errors import ImageError
from .entries import (
    COMPRESSED_BIT,
    COPIED,
    L1E_RESERVED,
    L2E_RESERVED,
    OFFSET_MASK,
    REFT_RESERVED,
    ZERO_FLAG,
    entries,
    nonzero_entries,
)
from .header import Header
from .refcounts import Refcounts

MAX_META_SET = 1 << 16  # metadata clusters kept as a set too (else the bitmap alone)

# refcount of a host cluster
Refcount = Callable[[int], int]


class Layout:
    """Where an image's metadata lies, checked for overlaps and the end of the file."""

    def __init__(
        self,
        path: str,
        h: Header,
        l1: bytes | bytearray,
        file_size: int,
        reftable: bytes | bytearray | None,
    ) -> None:
        self.path = path
        self.cs = cs = h.cluster_size
        self.eof = file_size
        self.clusters = -(-file_size // cs)
        self._bits = bytearray(-(-self.clusters // 8))
        self.regions: list[tuple[int, int]] = []  # (first cluster, clusters)
        self._claim(0, 1, "the header")
        if h.l1_size:
            self._claim(h.l1_table_offset, -(-h.l1_size * 8 // cs), "the L1 table")
        if reftable is not None:
            self._claim(h.refcount_table_offset, h.refcount_table_clusters, "the refcount table")
            for i, e in nonzero_entries(reftable):
                if e & REFT_RESERVED:
                    raise ImageError(f"{path!r} has reserved bits set in refcount table entry {i}")
                self._claim(e, 1, "a refcount block")
        # (L1 index, L2 table offset, COPIED)
        self.l2_tables: list[tuple[int, int, bool]] = []
        for i, e in nonzero_entries(l1):
            if e & L1E_RESERVED:
                raise ImageError(f"{path!r} has reserved bits set in L1 entry {i}")
            off = e & OFFSET_MASK
            if off:
                self._claim(off, 1, "an L2 table")
                self.l2_tables.append((i, off, bool(e & COPIED)))
        # the metadata clusters as a set too, where there are few enough (the usual case)
        self._set: frozenset[int] | None = None
        if sum(n for _, n in self.regions) <= MAX_META_SET:
            self._set = frozenset(c for first, n in self.regions for c in range(first, first + n))

    def _claim(self, off: int, clusters: int, what: str) -> None:
        if off % self.cs:
            raise ImageError(f"{self.path!r} has {what} at a misaligned offset {off:#x}")
        if off >= self.eof:
            raise ImageError(f"{self.path!r} has {what} past the end of the file (at {off:#x})")
        first = off // self.cs
        for c in range(first, min(first + clusters, self.clusters)):
            if self.is_metadata(c):
                raise ImageError(
                    f"{self.path!r} has {what} overlapping other metadata at {c * self.cs:#x}"
                )
            self._bits[c >> 3] |= 1 << (c & 7)
        self.regions.append((first, clusters))

    def _touches_metadata(self, clusters: list[int]) -> bool:
        if self._set is not None:
            return not self._set.isdisjoint(clusters)
        bits = self._bits
        return any(bits[c >> 3] >> (c & 7) & 1 for c in clusters)

    def is_metadata(self, cluster: int) -> bool:
        return cluster < self.clusters and bool(self._bits[cluster >> 3] >> (cluster & 7) & 1)

    def check_refcounts(self, refcount: Refcount) -> None:
        """Every metadata cluster is counted; an L2 table marked COPIED is not shared."""
        cs = self.cs
        for first, n in self.regions:
            for c in range(first, first + n):
                if refcount(c) == 0:
                    raise ImageError(f"{self.path!r} has metadata at {c * cs:#x} with refcount 0")
        for i, off, copied in self.l2_tables:
            if copied and refcount(off // cs) != 1:
                raise ImageError(
                    f"{self.path!r} has the L2 table of L1 entry {i} marked unshared"
                    f" but with refcount {refcount(off // cs)}"
                )

    def check_l2(
        self,
        l2_off: int,
        table: bytes | bytearray,
        *,
        v3: bool,
        compressed_clusters: Callable[[int], tuple[int, int]],
        refcounts: Refcounts | None,
        copied: set[int] | None = None,
    ) -> None:
        """Refuse an L2 table (just loaded from disk) that writing through could damage.

        With ``refcounts`` None (they are being rebuilt) the COPIED flags cannot be
        checked here; the host clusters of COPIED entries are added to ``copied`` for
        the caller to check once everything is counted.  The common entry (COPIED,
        aligned, inside the file) costs a few operations; anything else takes the slow
        path that names what is wrong.
        """
        cs = self.cs
        cb = cs.bit_length() - 1
        nonzero = [e for e in entries(table) if e]
        # bits no standard entry may have: reserved, offset below the cluster size
        odd = L2E_RESERVED | ((cs - 1) & ~0x1FF) | (0 if v3 else ZERO_FLAG) | COMPRESSED_BIT
        shared: list[int] = []
        if any(e & odd for e in nonzero):
            for j, e in enumerate(entries(table)):
                if e & odd:
                    shared += self._unusual(l2_off, j, e, v3, compressed_clusters)
            nonzero = [e for e in nonzero if not e & odd]
        unshared = [(e & OFFSET_MASK) >> cb for e in nonzero if e & COPIED and e & OFFSET_MASK]
        plain = [(e & OFFSET_MASK) >> cb for e in nonzero if e & OFFSET_MASK and not e & COPIED]
        shared += plain
        everything = unshared + shared
        if not everything:
            return
        if max(everything) >= self.clusters:
            raise ImageError(
                f"{self.path!r} has a data cluster past the end of the file"
                f" ({max(everything) * cs:#x}, in the L2 table at {l2_off:#x})"
            )
        if self._touches_metadata(everything):
            c = next(c for c in everything if self.is_metadata(c))
            raise ImageError(
                f"{self.path!r} has data pointing into metadata"
                f" ({c * cs:#x}, in the L2 table at {l2_off:#x})"
            )
        mine = set(unshared)
        if len(mine) != len(unshared) or not mine.isdisjoint(shared):
            raise ImageError(
                f"{self.path!r} has a data cluster referenced twice in the L2 table at {l2_off:#x}"
            )
        if refcounts is None:
            if copied is not None:
                copied.update(unshared)
            return
        wrong = refcounts.first_not(unshared, 1)
        if wrong is not None:
            raise ImageError(
                f"{self.path!r} has a data cluster at {wrong * cs:#x} marked unshared"
                f" but with refcount {refcounts.get(wrong)} (L2 table at {l2_off:#x})"
            )
        # a shared cluster must be counted at least as often as this table refers to
        # it, or releasing the references drops it to zero while one remains; a plain
        # data cluster not marked COPIED is shared with something else, so counted twice
        # (refcount 1 there is what qemu-img check calls an OFLAG_COPIED error: the other
        # reference may exist and go uncounted)
        plain_set = set(plain)
        for c, n in Counter(shared).items():
            least = max(n, 2) if c in plain_set else n
            if refcounts.get(c) < least:
                raise ImageError(
                    f"{self.path!r} has a data cluster at {c * cs:#x} with refcount"
                    f" {refcounts.get(c)} but {n} reference{'s' * (n > 1)} not marked"
                    f" unshared (L2 table at {l2_off:#x}); 'qemu-img check -r all' repairs"
                    " this"
                )

    def _unusual(
        self,
        l2_off: int,
        j: int,
        e: int,
        v3: bool,
        compressed_clusters: Callable[[int], tuple[int, int]],
    ) -> list[int]:
        """Check a compressed or suspicious entry; return the clusters it holds a
        reference to that writing may release."""
        cs, path = self.cs, self.path
        where = f"L2 entry {j} of the table at {l2_off:#x}"
        if e & COMPRESSED_BIT:
            if e & COPIED:
                raise ImageError(f"{path!r} has a compressed cluster marked unshared ({where})")
            first, n = compressed_clusters(e)
            if first // cs + n > self.clusters:
                raise ImageError(f"{path!r} has compressed data past the end of the file ({where})")
            return list(range(first // cs, first // cs + n))
        if e & L2E_RESERVED:
            raise ImageError(f"{path!r} has reserved bits set in {where}")
        if e & ZERO_FLAG and not v3:
            raise ImageError(f"{path!r} (qcow2 v2) has a zero cluster ({where})")
        raise ImageError(
            f"{path!r} has a misaligned data cluster at {e & OFFSET_MASK:#x} ({where})"
        )
