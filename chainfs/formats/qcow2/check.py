"""``qemu-img check`` for qcow2 (QCOW2.md §1.8, QEMU's ``qcow2_check_refcounts``).

It counts every reference the header, the L1 and L2 tables (of the image and of its
internal snapshots), the snapshot table, the refcount structures and the persistent
bitmaps make to each host cluster, and compares the counts with the on-disk refcounts: a
refcount lower than the references is a **corruption**, a higher one a **leak**.  It
also checks alignment, reserved bits and the COPIED flags.  Nothing here writes: a check
never repairs.  Exit statuses follow qemu-img: 0 clean, 1 the check could not be
completed, 2 corruptions, 3 leaks only, 63 the format has nothing to check (raw).

``repair_leaks`` is the one writer: ``qemu-img check -r leaks``, lowering the refcount of
each leaked cluster to its reference count, nothing else, and only on an image the check
found no corruption in.

Locking contract: none; the caller holds the image's read lock (or chose not to), its
write lock for ``repair_leaks``.
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ...errors import ChainfsError
from ...hostfile import HostFile
from . import header as hdr
from .entries import (
    BME_ALL_ONES,
    BME_OFFSET_MASK,
    BME_RESERVED,
    COMPRESSED_BIT,
    COPIED,
    L1E_RESERVED,
    L2E_RESERVED,
    OFFSET_MASK,
    REFT_OFFSET_MASK,
    REFT_RESERVED,
    ZERO_FLAG,
)
from .refcounts import Refcounts, get_entry

# exit statuses of ``chainfs check``, as ``qemu-img check``
CHECK_OK, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 1, 2, 3, 63

BLOCK_CACHE = 16  # decoded refcount blocks kept
MAX_MESSAGES = 1000  # problems listed one by one; the counts are always complete

_SNAPSHOT = struct.Struct(">QIHHIIQII")  # 40 bytes, then extra data, id, name


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports, with the same counters."""

    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    marked_corrupt: bool = False
    marked_dirty: bool = False
    messages: list[str] = field(default_factory=list)
    unlisted: int = 0

    @property
    def status(self) -> int:
        if self.check_errors:
            return CHECK_FAILED
        if self.corruptions:
            return CHECK_CORRUPT
        if self.leaks:
            return CHECK_LEAKS
        return CHECK_OK

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)
        else:
            self.unlisted += 1

    def corrupt(self, message: str) -> None:
        self.corruptions += 1
        self.note(f"ERROR {message}")

    def to_json(self) -> dict[str, Any]:
        """The keys of ``qemu-img check --output=json`` (zero counters left out, as there)."""
        out: dict[str, Any] = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
        }
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.allocated_clusters:
            out["allocated-clusters"] = self.allocated_clusters
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        out["filename"] = self.filename
        out["format"] = self.format
        return out

    def text(self) -> str:
        lines = list(self.messages)
        if self.unlisted:
            lines.append(f"... and {self.unlisted} more problems of the kinds above")
        if lines:
            lines.append("")
        if self.marked_corrupt:
            lines.append("The image is marked corrupt (chainfs will not write to it).")
        if self.marked_dirty:
            lines.append("The image was not closed cleanly (lazy refcounts): leaks are expected.")
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines.append(
                f"{self.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it."
            )
        if self.leaks:
            lines.append(
                f"{self.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data."
            )
        if self.check_errors:
            lines.append(f"{self.check_errors} internal errors have occurred during the check.")
        if self.total_clusters:
            t = self.total_clusters

            def pct(n: int) -> str:
                return f"{n * 100 / t:.2f}%"

            lines.append(
                f"{self.allocated_clusters}/{t} = {pct(self.allocated_clusters)} allocated, "
                f"{pct(self.fragmented_clusters)} fragmented, "
                f"{pct(self.compressed_clusters)} compressed clusters"
            )
        lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)


class NotChecked(ChainfsError):
    """The format has nothing ``check`` can verify (raw)."""


class _Checker:
    """One pass over one qcow2 image's metadata."""

    def __init__(self, f: HostFile, h: hdr.Header, result: CheckResult) -> None:
        self.f = f
        self.h = h
        self.r = result
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.file_len = f.size()
        self.nb = -(-self.file_len // self.cs)
        # references counted from the metadata, one counter per host cluster
        self.refs = array("I", bytes(4 * self.nb))
        self.max_ref = min((1 << h.refcount_bits) - 1, 0xFFFFFFFF)
        self.csize_shift = 62 - (self.cb - 8)
        self.coff_mask = (1 << self.csize_shift) - 1
        self.nsec_mask = (1 << (self.cb - 8)) - 1
        self.l2_entries = self.cs // 8
        self.reftable = self._u64s(
            h.refcount_table_offset, h.refcount_table_clusters * self.cs // 8
        )
        self.rb_shift = self.cb + 3 - h.refcount_order
        self._blocks: OrderedDict[int, list[int] | None] = OrderedDict()
        self.leaked: list[tuple[int, int]] = []  # (cluster, refcount minus references)

    def _u64s(self, offset: int, count: int) -> tuple[int, ...]:
        data = self.f.pread(count * 8, offset)
        data += bytes(count * 8 - len(data))
        return struct.unpack(f">{count}Q", data)

    # -- counting references -------------------------------------------------------------

    def inc(self, offset: int, size: int) -> None:
        """Count one reference to every cluster of ``[offset, offset+size)``."""
        if size <= 0:
            return
        # the last cluster may be partly past the end of the file, not more
        if offset + size - self.file_len >= self.cs:
            self.r.corrupt(
                f"counting a reference to a region past the end of the file: "
                f"offset {offset:#x} size {size:#x}"
            )
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        if last >= len(self.refs):
            self.refs.extend(array("I", bytes(4 * (last + 1 - len(self.refs)))))
        for k in range(first, last + 1):
            if self.refs[k] >= self.max_ref:
                self.r.corrupt(f"refcount overflow at cluster offset {k << self.cb:#x}")
                continue
            self.refs[k] += 1

    def walk_l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        if not l1_size:
            return
        self.inc(l1_offset, l1_size * 8)
        for e in self._u64s(l1_offset, l1_size):
            if not e:
                continue
            if e & L1E_RESERVED:
                self.r.corrupt(f"L1 entry {e:#x} has reserved bits set")
            l2 = e & OFFSET_MASK
            self.inc(l2, self.cs)
            if l2 % self.cs:
                self.r.corrupt(f"L2 table at {l2:#x} is not cluster aligned; L1 entry corrupted")
            self.walk_l2(l2, active=active)

    def walk_l2(self, l2_offset: int, *, active: bool) -> None:
        next_contiguous = 0
        r = self.r
        for e in self._u64s(l2_offset, self.l2_entries):
            if not e:
                continue
            if e & COMPRESSED_BIT:
                if e & COPIED:
                    r.corrupt(
                        f"compressed cluster at {e & self.coff_mask:#x} has the copied flag set"
                    )
                coff = e & self.coff_mask
                nsec = ((e >> self.csize_shift) & self.nsec_mask) + 1
                self.inc(coff & ~511, nsec * 512)
                if active:
                    r.allocated_clusters += 1
                    r.compressed_clusters += 1
                    r.fragmented_clusters += 1  # compressed clusters are fragmented by nature
                continue
            if e & L2E_RESERVED:
                r.corrupt(f"L2 entry {e:#x} has reserved bits set")
            offset = e & OFFSET_MASK
            if not offset:
                continue  # unallocated, or a zero cluster without preallocation
            if offset % self.cs:
                kind = "preallocated zero" if e & ZERO_FLAG else "data"
                r.corrupt(f"{kind} cluster at {offset:#x} is not aligned; L2 entry corrupted")
            if active:
                r.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    r.fragmented_clusters += 1
                next_contiguous = offset + self.cs
            self.inc(offset, self.cs)

    def walk_snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            raw = self.f.pread(_SNAPSHOT.size, pos)
            if len(raw) < _SNAPSHOT.size:
                self.r.check_errors += 1
                self.r.note("ERROR the snapshot table runs past the end of the file")
                return
            l1_offset, l1_size, id_len, name_len, *_, extra = _SNAPSHOT.unpack(raw)
            pos += _SNAPSHOT.size + extra
            ident = self.f.pread(id_len, pos).decode(errors="replace")
            pos += id_len + name_len
            pos += -pos % 8
            if l1_offset % self.cs:
                self.r.corrupt(f"snapshot {ident} has an unaligned L1 table at {l1_offset:#x}")
                continue
            if l1_size > hdr.MAX_L1_BYTES // 8:
                self.r.corrupt(f"snapshot {ident} has an L1 table too large ({l1_size} entries)")
                continue
            self.walk_l1(l1_offset, l1_size, active=False)
        self.inc(h.snapshots_offset, pos - h.snapshots_offset)

    def walk_bitmaps(self) -> None:
        found = hdr.bitmap_directory(self.f, self.h)
        if found is None:
            return
        dir_offset, dir_size, bitmaps = found
        self.inc(dir_offset, dir_size)
        if bitmaps is None:
            self.r.check_errors += 1
            self.r.note("ERROR the bitmap directory is truncated")
            return
        for bm in bitmaps:
            self.inc(bm.table_offset, bm.table_size * 8)
            entries = self._u64s(bm.table_offset, bm.table_size)
            bad = [
                e
                for e in entries
                if e & BME_RESERVED
                or (e & BME_OFFSET_MASK and (e & BME_OFFSET_MASK) % self.cs)
                or (e & BME_OFFSET_MASK and e & BME_ALL_ONES)
            ]
            if bad:
                self.r.corrupt(f"bitmap {bm.name!r} has an invalid bitmap table entry")
                continue
            for e in entries:
                if e & BME_OFFSET_MASK:
                    self.inc(e & BME_OFFSET_MASK, self.cs)

    def walk_refcount_blocks(self) -> None:
        self.inc(self.h.refcount_table_offset, len(self.reftable) * 8)
        for i, e in enumerate(self.reftable):
            offset = e & REFT_OFFSET_MASK
            if e & REFT_RESERVED:
                self.r.corrupt(f"refcount table entry {i} has reserved bits set")
                continue
            if offset % self.cs:
                self.r.corrupt(f"refcount block {i} is not cluster aligned")
                continue
            cluster = offset >> self.cb
            if cluster >= max(self.nb, len(self.refs)):
                self.r.corrupt(f"refcount block {i} is outside the image")
                continue
            if offset:
                self.inc(offset, self.cs)
                if self.refs[cluster] != 1:
                    self.r.corrupt(f"refcount block {i} refcount={self.refs[cluster]}")

    # -- on-disk refcounts ---------------------------------------------------------------

    def _block(self, idx: int) -> list[int] | None:
        """The decoded refcount block ``idx``; None if it cannot be read."""
        if idx in self._blocks:
            self._blocks.move_to_end(idx)
            return self._blocks[idx]
        blk: list[int] | None = []
        e = self.reftable[idx] & REFT_OFFSET_MASK
        n = 1 << self.rb_shift
        if not e:
            blk = [0] * n
        elif e % self.cs:
            blk = None
        else:
            data = bytearray(self.f.pread(self.cs, e))
            data += bytes(self.cs - len(data))
            bits = self.h.refcount_bits
            if bits >= 8:
                blk = list(struct.unpack(f">{n}{'BHIQ'[bits.bit_length() - 4]}", data))
            else:
                blk = [get_entry(data, i, bits) for i in range(n)]
        self._blocks[idx] = blk
        if len(self._blocks) > BLOCK_CACHE:
            self._blocks.popitem(last=False)
        return blk

    def refcount(self, cluster: int) -> int | None:
        idx = cluster >> self.rb_shift
        if idx >= len(self.reftable):
            return 0
        blk = self._block(idx)
        if blk is None:
            return None
        return blk[cluster & ((1 << self.rb_shift) - 1)]

    def compare(self) -> int:
        """Compare counted references with refcounts; return the highest cluster in use."""
        highest = 0
        for i in range(max(self.nb, len(self.refs))):
            on_disk = self.refcount(i)
            if on_disk is None:
                self.r.check_errors += 1
                self.r.note(f"ERROR cannot read the refcount of cluster {i}")
                continue
            counted = self.refs[i] if i < len(self.refs) else 0
            if on_disk or counted:
                highest = i
            if on_disk < counted:
                self.r.corrupt(f"cluster {i} refcount={on_disk} reference={counted}")
            elif on_disk > counted:
                self.r.leaks += 1
                self.leaked.append((i, on_disk - counted))
                self.r.note(f"Leaked cluster {i} refcount={on_disk} reference={counted}")
        return highest

    def check_copied(self, l1: tuple[int, ...]) -> None:
        """COPIED must be set exactly on the active tables' entries with refcount 1."""
        for i, e in enumerate(l1):
            l2 = e & OFFSET_MASK
            if not l2:
                continue
            rc = self.refcount(l2 >> self.cb)
            if rc is not None and (rc == 1) != bool(e & COPIED):
                self.r.corrupt(
                    f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                )
            for entry in self._u64s(l2, self.l2_entries):
                offset = entry & OFFSET_MASK
                if entry & COMPRESSED_BIT or not offset:
                    continue
                rc = self.refcount(offset >> self.cb)
                if rc is not None and (rc == 1) != bool(entry & COPIED):
                    self.r.corrupt(f"OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}")

    def run(self) -> None:
        h = self.h
        self.r.total_clusters = -(-h.size // self.cs)
        self.inc(0, self.cs)
        self.walk_l1(h.l1_table_offset, h.l1_size, active=True)
        self.walk_snapshots()
        self.walk_bitmaps()
        self.walk_refcount_blocks()
        highest = self.compare()
        self.check_copied(self._u64s(h.l1_table_offset, h.l1_size) if h.l1_size else ())
        self.r.image_end_offset = (highest + 1) * self.cs


def _read_header(f: HostFile, result: CheckResult) -> hdr.Header:
    """The header, also of an image marked corrupt (which the drivers refuse to open)."""
    start = f.pread(hdr.V2_HEADER_LENGTH, 0)
    if len(start) < hdr.V2_HEADER_LENGTH or start[:4] != hdr.MAGIC:
        raise NotChecked(f"{f.path!r} is not a qcow2 image: a raw image has no metadata to check")
    raw = bytearray(hdr.header_cluster(f))
    version = struct.unpack_from(">I", raw, 4)[0]
    if version >= 3 and len(raw) >= 80:
        incompatible = struct.unpack_from(">Q", raw, 72)[0]
        if incompatible & hdr.INCOMPAT_CORRUPT:
            result.marked_corrupt = True
            struct.pack_into(">Q", raw, 72, incompatible & ~hdr.INCOMPAT_CORRUPT)
    h = hdr.parse(bytes(raw), f.path, f.size())
    result.marked_dirty = bool(h.incompatible & hdr.INCOMPAT_DIRTY)
    return h


def check_image(f: HostFile, filename: str) -> CheckResult:
    """Check the qcow2 image open as ``f`` (``filename`` as the user named it)."""
    result = CheckResult(filename=filename)
    h = _read_header(f, result)
    _Checker(f, h, result).run()
    return result


def repair_leaks(f: HostFile, refs: Refcounts, filename: str) -> CheckResult:
    """Check the image open writable as ``f`` and, if leaks are all it found, lower each
    leaked cluster's refcount to its reference count through ``refs`` (the refcounts of
    the layer open on ``f``, so that what it holds in memory stays true), then write
    them back and flush.  The result is the check's before the repair (its ``leaks``:
    the clusters repaired, if ``status`` was ``CHECK_LEAKS``); anything else it found
    (a corruption, an image marked corrupt or dirty) leaves the image untouched.

    Crash-safe in any order: nothing references a leaked cluster, so lowering its
    refcount can never leave a reference with a refcount below it.  The caller has
    written back what its layer held (``refs`` has nothing dirty)."""
    result = CheckResult(filename=filename)
    h = _read_header(f, result)
    checker = _Checker(f, h, result)
    checker.run()
    if result.status != CHECK_LEAKS or result.marked_corrupt or result.marked_dirty:
        return result
    for cluster, excess in checker.leaked:
        refs.change(cluster * h.cluster_size, 1, -excess)
    refs.write_back()
    f.flush()
    return result
