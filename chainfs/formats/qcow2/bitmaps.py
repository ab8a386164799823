"""Persistent dirty bitmaps (the qcow2 bitmaps extension) of one writable layer.

QEMU (``docs/interop/qcow2.txt``, ``block/qcow2-bitmap.c``) keeps a bitmap in memory
while an image is open, marks it ``in_use`` on disk, and writes it back at close; after
a crash the flag stays set and the bitmap is inconsistent (useless).  chainfs keeps the
on-disk bitmap *a superset of the truth at every instant* instead, so it never needs the
flag:

- an enabled bitmap's data clusters are real clusters (an "all zeros"/"all ones" table
  entry is materialised first: new table and data clusters, switched to with the
  directory), updated in place;
- a guest write that sets new bits writes the changed bitmap bytes *before* the data
  write (``mark``); where the data goes in place (an allocated cluster that the write
  overwrites, visible on disk as soon as it lands) the driver flushes in between, so
  even a power cut cannot leave changed data with its bit unset; new clusters become
  visible only through an L2 entry written after a flush, which covers the bitmap too;
- ``clear`` and ``merge`` rewrite the data in place (a torn rewrite leaves bits of
  the old content or of the union: over-reporting only); adding, removing, enabling,
  disabling and materialising write a new directory (and tables) elsewhere and switch
  to it with one write of the 24-byte extension in cluster 0, after a flush; the first
  bitmap of an image adds the extension, and removing the last one drops it (QEMU
  refuses an extension with no bitmaps), through ``repoint.change_extensions``, which
  never leaves a torn header (the autoclear bit switches with the extension);
- the autoclear bit 0 ("bitmaps consistent") stays set.

So the bitmaps QEMU finds after an unmount, a kill -9 or a power cut are valid, not in
use, and may over-report but never under-report.  A bitmap QEMU found in use (marked
inconsistent by a crashed QEMU) is kept as it is, can only be removed, and is not
updated, as in QEMU; one of an unknown type or with unknown flags makes QEMU refuse the
image, and chainfs refuses to write to it too.

For an incremental backup, ``freeze`` hands out a bitmap as it is and restarts it, the
disk keeping the union until ``thaw`` (QEMU's frozen bitmap and its successor); the
rules that carry bitmaps across snapshot, commit, stream and copy are the functions at
the end (``carry_to_overlay``, ``merge_down``, ``keep_merged``).

Locking contract: not thread-safe; the owning layer (and its chain's lock) serialises.
"""

from __future__ import annotations

import errno
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...errors import ChainfsError, ImageError, UnsupportedFeature
from ...hostfile import HostFile
from . import header as hdr
from .entries import U64
from .refcounts import Refcounts
from .repoint import change_extensions

IN_USE = 1 << 0
AUTO = 1 << 1
EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME = 1023
MAX_BITMAPS = 65535
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


class BitmapError(ChainfsError):
    """A bitmap command QEMU would refuse (wording after ``block-dirty-bitmap-*``)."""

    errno = errno.EINVAL


class BitmapNotFound(BitmapError):
    errno = errno.ENOENT


class BitmapUnsupported(BitmapError):
    errno = errno.EOPNOTSUPP


class BitmapBusy(BitmapError):
    errno = errno.EBUSY


class BitmapExists(BitmapError):
    errno = errno.EEXIST


@dataclass
class Bitmap:
    """One bitmap of the directory; ``bits`` (bit i = granule i, least significant bit
    first) is None for one chainfs does not maintain (found in use: inconsistent)."""

    name: str
    flags: int
    gran_bits: int
    table_offset: int
    table_size: int
    raw: bytes  # the directory entry as read (kept verbatim while not maintained)
    bits: bytearray | None = None
    table: list[int] | None = None  # data cluster offsets (0: none) once materialised
    frozen: bytes | None = None  # a backup's bits (``freeze``): on disk ORed in

    @property
    def granularity(self) -> int:
        return 1 << self.gran_bits

    @property
    def enabled(self) -> bool:
        return bool(self.flags & AUTO)

    @property
    def inconsistent(self) -> bool:
        return self.bits is None

    def count(self, size: int) -> int:
        """Dirty bytes (granules times the granularity, the last one cut at ``size``)."""
        if self.bits is None:
            return 0
        return sum(b - a for a, b in self.ranges(size))

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """The dirty ranges ``(start, end)`` in bytes, merged, cut at ``size``."""
        if self.bits is None:
            return []
        out: list[tuple[int, int]] = []
        g = self.gran_bits
        for m in re.finditer(rb"[^\x00]+", bytes(self.bits)):
            # a run of non-zero bytes; split it at the bits inside its edge bytes
            v = int.from_bytes(self.bits[m.start() : m.end()], "little")
            base = m.start() * 8
            while v:
                low = (v & -v).bit_length() - 1
                w = v >> low
                run = (~w & (w + 1)).bit_length() - 1
                a, b = (base + low) << g, min((base + low + run) << g, size)
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], b)
                elif a < b:
                    out.append((a, b))
                v &= ~(((1 << run) - 1) << low)
        return out


def bits_bytes(size: int, gran_bits: int) -> int:
    granules = (size + (1 << gran_bits) - 1) >> gran_bits
    return (granules + 7) // 8


class Bitmaps:
    """The bitmaps of one writable qcow2 layer (see the module docstring)."""

    refs: Refcounts  # set by the layer before the first change

    def __init__(self, f: HostFile, h: hdr.Header, size: int) -> None:
        self.f, self.h, self.size = f, h, size
        self.cs = h.cluster_size
        self.list: list[Bitmap] = []
        self.dir_offset = self.dir_size = 0
        # the bitmaps of an image whose autoclear bit says they are stale are ignored
        # (as QEMU does; the extension is replaced at the first change)
        ext = next((d for k, d in h.extensions if k == hdr.EXT_BITMAPS), None)
        if ext is not None and h.autoclear & hdr.AUTOCLEAR_BITMAPS and len(ext) >= _EXT.size:
            count, _, self.dir_size, self.dir_offset = _EXT.unpack_from(ext)
            if count:
                self._read_directory(count)

    # -- reading -----------------------------------------------------------------------

    def _read_directory(self, count: int) -> None:
        f, cs = self.f, self.cs
        path = f.path
        if self.dir_offset % cs or self.dir_size > 64 << 20:
            raise ImageError(f"{path!r} has a corrupted bitmap directory")
        d = f.pread(self.dir_size, self.dir_offset)
        pos = 0
        for _ in range(count):
            if pos + _ENTRY.size > len(d):
                raise ImageError(f"{path!r} has a corrupted bitmap directory")
            t_off, t_size, flags, kind, gbits, nlen, extra = _ENTRY.unpack_from(d, pos)
            end = pos + _ENTRY.size + extra + nlen
            if end > len(d):
                raise ImageError(f"{path!r} has a corrupted bitmap directory")
            name = d[end - nlen : end].decode("utf-8", "replace")
            raw = bytes(d[pos:end])
            pos = end + (-end % 8)
            want = -(-bits_bytes(self.size, gbits) // cs) if 9 <= gbits <= 63 else -1
            if (
                flags & ~KNOWN_FLAGS
                or kind != TYPE_DIRTY_TRACKING
                or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS
                or t_size != want
                or not t_off
                or t_off % cs
                or (extra and not flags & EXTRA_DATA_COMPATIBLE)
            ):
                # QEMU refuses such an image ("doesn't satisfy the constraints")
                raise UnsupportedFeature(
                    f"bitmap {name!r} of {path!r} doesn't satisfy the constraints;"
                    " chainfs does not write to such images"
                )
            bm = Bitmap(name, flags, gbits, t_off, t_size, raw)
            if not flags & IN_USE:
                self._load(bm)
            self.list.append(bm)

    def _load(self, bm: Bitmap) -> None:
        cs, f = self.cs, self.f
        raw = f.pread(bm.table_size * 8, bm.table_offset)
        if len(raw) < bm.table_size * 8:
            raise ImageError(f"bitmap {bm.name!r} of {f.path!r} has a truncated table")
        n = bits_bytes(self.size, bm.gran_bits)
        bits = bytearray(bm.table_size * cs)
        table: list[int] = []
        for i in range(bm.table_size):
            e = U64.unpack_from(raw, i * 8)[0]
            off = e & ENTRY_OFFSET_MASK
            if e & ~ENTRY_OFFSET_MASK & ~1 or off % cs or (off and e & 1):
                raise ImageError(f"bitmap {bm.name!r} of {f.path!r} has a corrupted table")
            if off:
                bits[i * cs : (i + 1) * cs] = f.pread_padded(cs, off)
            elif e & 1:
                bits[i * cs : (i + 1) * cs] = b"\xff" * cs
            table.append(off)
        del bits[n:]
        _trim(bits, self.size, bm.gran_bits)
        bm.bits, bm.table = bits, table

    # -- lookups -----------------------------------------------------------------------

    @property
    def default_granularity(self) -> int:
        """QEMU's (``bdrv_get_default_bitmap_granularity``): the cluster size, kept
        between 4 KiB and 64 KiB."""
        return min(65536, max(4096, self.cs))

    def get(self, name: str) -> Bitmap:
        for bm in self.list:
            if bm.name == name:
                return bm
        raise BitmapNotFound(f"Dirty bitmap '{name}' not found")

    def _maintained(self, name: str) -> Bitmap:
        bm = self.get(name)
        if bm.bits is None:
            raise BitmapError(
                f"Bitmap '{name}' is inconsistent and cannot be used;"
                " try 'bitmap remove' to delete it"
            )
        return bm

    def references(self) -> Iterator[tuple[int, int]]:
        """Every (host offset, clusters) the directory references (for a refcount
        rebuild): the directory, and each bitmap's table and data clusters."""
        cs = self.cs
        if self.dir_offset and self.list:
            yield self.dir_offset, -(-self.dir_size // cs)
        for bm in self.list:
            yield bm.table_offset, max(1, -(-bm.table_size * 8 // cs))
            table = bm.table
            if table is None:  # in use: not loaded; its table is still referenced
                raw = self.f.pread(bm.table_size * 8, bm.table_offset)
                table = [
                    U64.unpack_from(raw, i * 8)[0] & ENTRY_OFFSET_MASK for i in range(len(raw) // 8)
                ]
            for off in table:
                if off:
                    yield off, 1

    # -- guest writes --------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> bool:
        """Set the bits of every enabled bitmap for a range about to change, writing the
        changed bytes to their data clusters; True if any bit was new."""
        new = False
        end = min(offset + length, self.size)
        if end <= offset:
            return False
        for bm in self.list:
            if bm.bits is None or not bm.flags & AUTO:
                continue
            g = bm.gran_bits
            a, b = offset >> g, (end - 1) >> g
            if _set_bits(bm.bits, a, b):
                new = True
                self._write_bits(bm, a >> 3, (b >> 3) + 1)
        return new

    def covered(self, offset: int, length: int) -> bool:
        """Whether every enabled bitmap has every bit of a range set already (a write
        there would set none: ``mark`` returns False for any part of it)."""
        end = min(offset + length, self.size)
        for bm in self.list:
            if bm.bits is None or not bm.flags & AUTO or end <= offset:
                continue  # (as ``mark``: an inconsistent bitmap is not maintained)
            g = bm.gran_bits
            a, b = offset >> g, (end - 1) >> g
            bits = bm.bits
            for i in range(a, b + 1):
                if not bits[i >> 3] >> (i & 7) & 1:
                    return False
        return True

    def _write_bits(self, bm: Bitmap, a: int, b: int) -> None:
        """Write bytes ``[a, b)`` of the bitmap data in place."""
        assert bm.bits is not None and bm.table is not None
        cs = self.cs
        while a < b:
            i = a // cs
            stop = min(b, (i + 1) * cs)
            off = bm.table[i]
            assert off, "an enabled bitmap's data clusters are materialised"
            piece: bytes | bytearray = bm.bits[a:stop]
            if bm.frozen is not None:  # on disk: the union until the backup ends
                n = stop - a
                piece = (
                    int.from_bytes(piece, "little") | int.from_bytes(bm.frozen[a:stop], "little")
                ).to_bytes(n, "little")
            self.f.pwrite(piece, off + a - i * cs)
            a = stop

    # -- commands (QEMU's block-dirty-bitmap-*) ------------------------------------------

    def add(self, name: str, granularity: int, *, disabled: bool = False) -> None:
        if self.h.version < 3:
            raise BitmapUnsupported("Cannot store dirty bitmaps in qcow2 v2 files")
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        if len(name.encode()) > MAX_NAME:
            raise BitmapError(f"Bitmap name is too long: {name}")
        if any(bm.name == name for bm in self.list):
            raise BitmapExists(f"Bitmap already exists: {name}")
        if len(self.list) >= MAX_BITMAPS:
            raise BitmapError("Maximum number of persistent bitmaps is already reached")
        gbits = granularity.bit_length() - 1
        if granularity != 1 << gbits or not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise BitmapError("Granularity must be power of 2 between 512 and 2147483648")
        bits = bytearray(bits_bytes(self.size, gbits))
        bm = Bitmap(name, 0 if disabled else AUTO, gbits, 0, -(-len(bits) // self.cs), b"")
        bm.bits = bits
        self._materialise(bm)
        self.list.append(bm)
        self._store_directory()

    def remove(self, name: str) -> None:
        bm = self.get(name)
        self._check_idle(bm)
        self.list.remove(bm)
        self._store_directory()
        self._free(bm)

    def clear(self, name: str) -> None:
        bm = self._maintained(name)
        self._check_writable(bm)
        self._check_idle(bm)
        assert bm.bits is not None
        bm.bits[:] = bytes(len(bm.bits))
        self._rewrite(bm)

    def enable(self, name: str) -> None:
        bm = self._maintained(name)
        self._check_idle(bm)
        if not bm.flags & AUTO:
            bm.flags |= AUTO
            self._store_directory()

    def disable(self, name: str) -> None:
        bm = self._maintained(name)
        self._check_idle(bm)
        if bm.flags & AUTO:
            bm.flags &= ~AUTO
            self._store_directory()

    def merge(self, target: str, sources: Sequence[Bitmap | str]) -> None:
        """OR the sources (names here, or bitmaps of another layer of the same size
        read with ``Bitmaps.read_only``) into ``target``."""
        bm = self._maintained(target)
        self._check_writable(bm)
        self._check_idle(bm)
        assert bm.bits is not None
        changed = False
        for s in sources:
            src = self._maintained(s) if isinstance(s, str) else s
            if isinstance(s, str):
                self._check_idle(src)  # frozen: its bits are split (QEMU: busy)
            if src.bits is None:
                raise BitmapError(f"Bitmap '{src.name}' is inconsistent and cannot be used")
            changed |= merge_bits(bm, src, self.size)
        if changed:
            self._rewrite(bm)

    # -- for an incremental backup (QEMU's frozen bitmap and its successor) ---------------

    def check_usable(self, name: str) -> None:
        """Refuse, as ``freeze`` would, a bitmap a backup cannot use."""
        self._check_idle(self._maintained(name))

    def freeze(self, name: str) -> Bitmap:
        """Start a backup of ``name``: return a copy of it as it is now (its ``ranges``
        are what the backup copies) and restart it empty in memory, so the writes from
        now on mark it afresh.  On disk it stays the union of both until ``thaw``, so a
        crash during the backup loses nothing (it over-reports).  The bitmap is busy
        meanwhile: the commands that would change it are refused."""
        bm = self._maintained(name)
        self._check_idle(bm)
        assert bm.bits is not None
        frozen = Bitmap(bm.name, bm.flags, bm.gran_bits, 0, 0, b"", bytearray(bm.bits))
        bm.frozen = bytes(bm.bits)
        bm.bits[:] = bytes(len(bm.bits))
        return frozen

    def thaw(self, name: str, *, success: bool) -> None:
        """End the backup ``freeze`` started: on success the bitmap keeps only the
        writes made since (rewritten on disk); on failure the frozen bits are merged
        back (QEMU's ``bitmap-mode``: the caller decides which applies)."""
        bm = self._maintained(name)
        frozen, bm.frozen = bm.frozen, None
        if frozen is None:
            raise BitmapError(f"Bitmap '{name}' is not frozen")
        assert bm.bits is not None
        if success:
            self._rewrite(bm)
        else:
            bm.bits[:] = (
                int.from_bytes(bm.bits, "little") | int.from_bytes(frozen, "little")
            ).to_bytes(len(bm.bits), "little")

    @staticmethod
    def _check_idle(bm: Bitmap) -> None:
        if bm.frozen is not None:
            raise BitmapBusy(
                f"Bitmap '{bm.name}' is currently in use by another operation and cannot be used"
            )

    @staticmethod
    def _check_writable(bm: Bitmap) -> None:
        if bm.flags & IN_USE:
            raise BitmapError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")

    # -- on disk ---------------------------------------------------------------------------

    def _alloc(self, clusters: int) -> int:
        return self.refs.alloc(clusters) if clusters else 0

    def _materialise(self, bm: Bitmap) -> None:
        """Give ``bm`` a new table and data clusters holding its bits (the old ones are
        freed once a new directory that no longer points at them is durable)."""
        assert bm.bits is not None
        cs, n = self.cs, bm.table_size
        data = self._alloc(n)
        table_clusters = max(1, -(-n * 8 // cs))
        table_off = self._alloc(table_clusters)
        self.f.reserve(max(data + n * cs, table_off + table_clusters * cs))
        payload = bytes(bm.bits) + bytes(n * cs - len(bm.bits))
        if n:
            self.f.pwrite(payload, data)
        table = bytearray(table_clusters * cs)
        for i in range(n):
            U64.pack_into(table, i * 8, data + i * cs)
        self.f.pwrite(table, table_off)
        old = (bm.table_offset, bm.table_size, bm.table)
        bm.table_offset, bm.table = table_off, [data + i * cs for i in range(n)]
        if old[0]:
            self._free(Bitmap(bm.name, 0, 0, old[0], old[1], b"", None, old[2]))

    def materialise_enabled(self) -> None:
        """Make every enabled bitmap's data clusters real, so that ``mark`` can update
        them in place (at open)."""
        todo = [
            bm
            for bm in self.list
            if bm.bits is not None and bm.flags & AUTO and bm.table and not all(bm.table)
        ]
        if todo:
            for bm in todo:
                self._materialise(bm)
            self._store_directory()

    def _rewrite(self, bm: Bitmap) -> None:
        """Write all of ``bm``'s bits (materialising it first if needed), durably."""
        assert bm.bits is not None and bm.table is not None
        if bm.table_size and not all(bm.table):
            self._materialise(bm)
            self._store_directory()
            return
        self._write_bits(bm, 0, len(bm.bits))
        self.f.flush()

    def _free(self, bm: Bitmap) -> None:
        """Free ``bm``'s table and data clusters once the change that dropped them is
        durable (the layer's next write-back)."""
        cs = self.cs
        for off in bm.table or []:
            if off:
                self.refs.defer_free(off, 1)
        if bm.table_offset:
            self.refs.defer_free(bm.table_offset, max(1, -(-bm.table_size * 8 // cs)))

    def _entry(self, bm: Bitmap) -> bytes:
        if bm.bits is None:
            return bm.raw  # kept verbatim
        name = bm.name.encode()
        if bm.raw:
            _, _, _, kind, _, _, extra = _ENTRY.unpack_from(bm.raw)
            extra_data = bm.raw[_ENTRY.size : _ENTRY.size + extra]
        else:
            kind, extra_data = TYPE_DIRTY_TRACKING, b""
        out = _ENTRY.pack(
            bm.table_offset, bm.table_size, bm.flags, kind, bm.gran_bits, len(name),
            len(extra_data),
        )  # fmt: skip
        return out + extra_data + name

    def _store_directory(self) -> None:
        """Write a new directory, make everything it points at durable, then switch the
        extension to it with one write; the old directory is freed after."""
        d = bytearray()
        for bm in self.list:
            e = self._entry(bm)
            d += e + bytes(-len(e) % 8)
        clusters = -(-len(d) // self.cs)
        off = self._alloc(clusters)
        if clusters:
            self.f.reserve(off + clusters * self.cs)
            self.f.pwrite(bytes(d) + bytes(-len(d) % self.cs), off)
        self.refs.write_back()  # flushes: refcounts before anything points at clusters
        self.f.flush()  # the new directory, tables and data before the switch
        old_off, old_size = self.dir_offset, self.dir_size
        self._switch(len(self.list), len(d), off)
        if old_off:
            self.refs.defer_free(old_off, -(-old_size // self.cs))
        self.dir_offset, self.dir_size = off, len(d)

    def _switch(self, count: int, size: int, offset: int) -> None:
        """Point the header at the new directory: one write of the 24-byte extension
        while there is one; adding the extension (the first bitmap) or dropping it (the
        last one: QEMU refuses an extension with no bitmaps) changes the header's
        extension area, crash-safely, as a re-point does (``repoint.change_extensions``),
        the autoclear bit switched with it."""
        h, f = self.h, self.f
        ext = _EXT.pack(count, 0, size, offset)
        at = _extension_offset(h, hdr.EXT_BITMAPS)
        valid = at is not None and bool(h.autoclear & hdr.AUTOCLEAR_BITMAPS)
        if count and valid:
            assert at is not None
            f.pwrite(ext, at)
            f.flush()
            h.extensions = [(k, ext if k == hdr.EXT_BITMAPS else d) for k, d in h.extensions]
            return
        if count:  # a new extension, or one in place of a stale one
            exts = [(k, ext if k == hdr.EXT_BITMAPS else d) for k, d in h.extensions]
            if at is None:
                exts.append((hdr.EXT_BITMAPS, ext))
            autoclear = h.autoclear | hdr.AUTOCLEAR_BITMAPS
        elif at is None and not h.autoclear & hdr.AUTOCLEAR_BITMAPS:
            return  # nothing to drop
        else:
            exts = [(k, d) for k, d in h.extensions if k != hdr.EXT_BITMAPS]
            autoclear = h.autoclear & ~hdr.AUTOCLEAR_BITMAPS
        try:
            change_extensions(f, h, exts, autoclear)
        except ImageError as e:
            raise ImageError(
                f"no room for the bitmaps extension in the header of {f.path!r}: {e}"
            ) from e


def _trim(bits: bytearray, size: int, gran_bits: int) -> None:
    """Clear the bits past the disk's last granule (padding in the last byte)."""
    n = -(-size >> gran_bits)
    if n % 8 and bits:
        bits[-1] &= (1 << (n % 8)) - 1


def _set_bits(bits: bytearray, a: int, b: int) -> bool:
    """Set bits ``a..b`` (inclusive); True if any was clear."""
    ba, bb = a >> 3, b >> 3
    if ba == bb:
        mask = ((1 << (b - a + 1)) - 1) << (a & 7)
        old = bits[ba]
        bits[ba] = old | mask
        return old & mask != mask
    head = (0xFF << (a & 7)) & 0xFF
    tail = (1 << ((b & 7) + 1)) - 1
    changed = bits[ba] & head != head or bits[bb] & tail != tail
    bits[ba] |= head
    bits[bb] |= tail
    if bb - ba > 1:
        mid = bits[ba + 1 : bb]
        if mid.count(0xFF) != len(mid):
            changed = True
            bits[ba + 1 : bb] = b"\xff" * len(mid)
    return changed


def merge_bits(target: Bitmap, source: Bitmap, size: int) -> bool:
    """OR ``source`` into ``target`` (granularities may differ: a source granule sets
    every target granule it overlaps); True if ``target`` changed."""
    assert target.bits is not None and source.bits is not None
    if source.gran_bits == target.gran_bits and len(source.bits) == len(target.bits):
        old = int.from_bytes(target.bits, "little")
        new = old | int.from_bytes(source.bits, "little")
        if new == old:
            return False
        target.bits[:] = new.to_bytes(len(target.bits), "little")
        return True
    changed = False
    g = target.gran_bits
    for a, b in source.ranges(size):
        b = min(b, size)
        if a < b:
            changed |= _set_bits(target.bits, a >> g, (b - 1) >> g)
    return changed


# -- bitmaps across chain changes (the rules libvirt follows; README "Dirty bitmaps") --


def of_layer(layer: object) -> list[Bitmap]:
    """The bitmaps of any layer: a writable qcow2 layer's live ones, a read-only one's
    read from disk, none for other formats."""
    live: Bitmaps | None = getattr(layer, "bitmaps", None)
    if live is not None:
        return live.list
    f, h = getattr(layer, "file", None), getattr(layer, "h", None)
    if isinstance(f, HostFile) and isinstance(h, hdr.Header):
        return read_only(f, h, int(getattr(layer, "virtual_size", 0)))
    return []


def carry_to_overlay(old: object, new: object) -> None:
    """snapshot: the new overlay gets an empty enabled bitmap for each enabled one of
    the old active layer (same name and granularity); then those are disabled, so
    that the chain of same-named bitmaps down the layers is one bitmap."""
    src: Bitmaps | None = getattr(old, "bitmaps", None)
    dst: Bitmaps | None = getattr(new, "bitmaps", None)
    if src is None or dst is None:
        return
    moving = [bm for bm in src.list if bm.enabled and bm.bits is not None]
    for bm in moving:
        if not any(b.name == bm.name for b in dst.list):
            dst.add(bm.name, bm.granularity)
    for bm in moving:
        src.disable(bm.name)


def merge_down(target: object, leaving: list[object], active: object | None) -> None:
    """commit, stream and copy: ``target`` (writable) takes over from the ``leaving``
    layers.  For every bitmap name ``target`` or a leaving layer has, ``target``'s
    bitmap of that name (created, with the granularity of the topmost one, if it has
    none) becomes the OR of all of them; with ``active`` (the layer that was active and
    leaves: an active commit, a copy), a bitmap enabled there is enabled in ``target``.
    Inconsistent (in-use) bitmaps are left out."""
    dst: Bitmaps | None = getattr(target, "bitmaps", None)
    if dst is None:
        return
    enabled = {bm.name for bm in of_layer(active) if bm.enabled} if active is not None else set()
    sources: dict[str, list[Bitmap]] = {}
    for layer in leaving:
        for bm in of_layer(layer):
            if bm.bits is not None:
                sources.setdefault(bm.name, []).append(bm)
    for name, found in sources.items():
        have = next((b for b in dst.list if b.name == name), None)
        if have is None:
            dst.add(name, found[0].granularity, disabled=name not in enabled)
        elif have.bits is None:
            continue  # inconsistent in the target: only removal helps, as in QEMU
        dst.merge(name, list(found))
        if name in enabled:
            dst.enable(name)


def keep_merged(node: object, leaving: list[object]) -> None:
    """stream: the node keeps its bitmaps; each takes in the same-named bitmaps of the
    layers that leave below it (the same bitmap, split by snapshots); names the node
    does not have are dropped with their layers."""
    dst: Bitmaps | None = getattr(node, "bitmaps", None)
    if dst is None:
        return
    for bm in dst.list:
        if bm.bits is None:
            continue
        found = [
            b
            for layer in leaving
            for b in of_layer(layer)
            if b.name == bm.name and b.bits is not None
        ]
        if found:
            dst.merge(bm.name, list(found))


def _extension_offset(h: hdr.Header, kind: int) -> int | None:
    """Where the data of the header extension ``kind`` lies in cluster 0."""
    pos = h.header_length
    for k, d in h.extensions:
        if k == kind:
            return pos + 8
        pos += 8 + len(d) + (-len(d) % 8)
    return None


def read_only(f: HostFile, h: hdr.Header, size: int) -> list[Bitmap]:
    """The bitmaps of an image opened read-only (a backing layer), loaded; in-use ones
    have ``bits`` None.  Nothing is written."""
    b = Bitmaps.__new__(Bitmaps)
    b.f, b.h, b.size, b.cs = f, h, size, h.cluster_size
    b.list, b.dir_offset, b.dir_size = [], 0, 0
    ext = next((d for k, d in h.extensions if k == hdr.EXT_BITMAPS), None)
    if ext is not None and h.autoclear & hdr.AUTOCLEAR_BITMAPS and len(ext) >= _EXT.size:
        count, _, b.dir_size, b.dir_offset = _EXT.unpack_from(ext)
        if count:
            try:
                b._read_directory(count)
            except UnsupportedFeature:
                return []
    return b.list
