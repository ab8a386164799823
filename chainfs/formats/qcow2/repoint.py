"""Re-pointing a qcow2 image at another backing file, or changing its set of header
extensions, so that a power loss at any instant, even one that tears a write at a
512-byte sector boundary, leaves an image QEMU opens with either the old or the new
backing file (name and format) and either the old or the new extensions.

What QEMU reads (``qcow2_do_open``, ``qcow2_read_extensions``; ``docs/interop/qcow2.txt``):

- the header proper, ``header_length`` bytes from offset 0 (72 on v2, 104 or 112 on v3):
  always inside the first sector;
- the header extensions, from ``header_length`` on, one after the other with no gap,
  until an end marker (type 0) or, when there is a backing file, until
  ``backing_file_offset`` (an extension crossing it is an error).  They cannot be moved
  elsewhere: only ``header_length`` says where they start, and it is fixed (72) on v2;
  on v3 raising it would turn whatever lies below into "unknown header fields", which
  must be zero;
- the backing file name: ``backing_file_size`` bytes at ``backing_file_offset``, which
  QEMU accepts anywhere after the extensions inside the first cluster (an offset past
  the first cluster, or a name running past it, is refused), so a new name can never go
  into a newly allocated cluster.

Writes are atomic per 512-byte sector and ordered only across flushes.  So one write of
the first sector switches atomically between two headers, and everything else the new
header reads must be written, and flushed, before that switch, in bytes that the header
on disk does not read.  A step from the header on disk to a new one is therefore:

1. write the bytes the new header reads beyond the first sector (the tail of its
   extension area, its backing name) where they differ from what is on disk; it is
   possible only if none of them is a byte the header on disk reads; flush;
2. write the first sector (header fields, the extensions and the name that fall inside
   it; bytes it does not read are zeroed); flush.

The name goes at the lowest offset after the new extension area that the header on disk
does not read beyond the first sector (right after the extensions, as QEMU puts it,
whenever that is free), so successive re-points alternate between low and high offsets
rather than creep to the end of the cluster.  The extension list keeps its order; the
backing-format extension is replaced where it is (its size does not change between the
formats chainfs writes), added first (where QEMU puts it) or dropped.  One step suffices
whenever the extension bytes past the first sector stay the same: a new name, a new
format, a backing file added or removed on an image whose extensions fit in the first
sector (v2 images; v3 images without bitmaps), or a removal that makes them fit.

It does not suffice when the extension area runs past the first sector both before and
after and its bytes there change: the backing-format extension added to or removed from
a v3 image whose feature-name table (384 bytes from QEMU) and bitmaps extension push the
area past byte 512 shifts every byte behind it.  Then the re-point takes two steps,
through an intermediate header that already has the new backing file but an extension
area that fits in the first sector: the same extensions without the feature-name table,
which is optional and only names feature bits for error messages (QEMU writes it back
whenever it rewrites the header itself).  Its name goes where neither the old header nor
the final one reads.  The first step then writes only that name beyond the first sector;
the second writes the final extension tail and name, which the intermediate header does
not read.  A crash between the two steps leaves a valid image with the new backing file
and no feature-name table.  An image whose extensions fill the first sector even without
that table (large unknown extensions), or whose first cluster has no room for the names
placed this way, is refused with an error before anything is written.

Bytes of the first cluster that no header reads any more (an old name, an old extension
tail) are left as they are; QEMU and ``qemu-img check`` ignore them.  Every other header
field, unknown fields and extensions included (the bitmaps extension keeps its bytes and
the autoclear bit stays as it is), is kept byte for byte.

Changing the extensions (``change_extensions``: the bitmaps extension added with the
image's first bitmap, dropped with its last one, as QEMU's header update does) is the
same problem with the backing file kept: the planner takes the new extension list and
the new autoclear bits (in the first sector, switched with it), and everything above
holds as written, the name moving out of the way of a longer extension area.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import ImageError
from ...hostfile import HostFile
from . import header as hdr

SECTOR = 512

Ranges = list[tuple[int, int]]


@dataclass
class _Layout:
    """One header cluster: its bytes, and the ranges past the first sector it reads."""

    extensions: list[tuple[int, bytes]]
    name_offset: int
    name: bytes
    cluster: bytearray
    reads: Ranges
    autoclear: int | None = None


def _extensions(
    current: list[tuple[int, bytes]], backing: str | None, fmt: str | None
) -> list[tuple[int, bytes]]:
    """The extension list with the new backing format: replaced where it is, else added
    first, or dropped when there is no backing file or no format."""
    wanted = backing is not None and fmt is not None
    out: list[tuple[int, bytes]] = []
    placed = False
    for kind, data in current:
        if kind == hdr.EXT_BACKING_FORMAT:
            if wanted and not placed:
                out.append((kind, str(fmt).encode()))
                placed = True
            continue
        out.append((kind, data))
    if wanted and not placed:
        out.insert(0, (hdr.EXT_BACKING_FORMAT, str(fmt).encode()))
    return out


def _pack(extensions: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for kind, data in extensions:
        out += struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)
    return bytes(out + struct.pack(">II", hdr.EXT_END, 0))


def _past_sector(start: int, end: int) -> Ranges:
    return [(max(start, SECTOR), end)] if end > SECTOR else []


def _overlaps(a: tuple[int, int], ranges: Ranges) -> bool:
    return any(a[0] < e and s < a[1] for s, e in ranges)


def _place(low: int, n: int, avoid: Ranges, cs: int) -> int | None:
    """The lowest offset from ``low`` for an ``n``-byte name inside the cluster whose
    part past the first sector misses every range of ``avoid``."""
    for o in sorted({low, *(e for _, e in avoid if e >= low)}):
        if o + n > cs:
            return None
        if not any(_overlaps(r, avoid) for r in _past_sector(o, o + n)):
            return o
    return None


def _layout(
    disk: bytes,
    header_length: int,
    extensions: list[tuple[int, bytes]],
    name: bytes,
    at: int,
    autoclear: int | None = None,
) -> _Layout:
    """The header cluster with these extensions and this name at ``at``: ``disk`` with
    the backing fields, the extension area and the name replaced (and the autoclear
    feature bits, on v3, when given), and the rest of the first sector zeroed."""
    packed = _pack(extensions)
    end = header_length + len(packed)
    cluster = bytearray(disk)
    head = min(SECTOR, len(cluster))
    cluster[end:head] = bytes(max(0, head - end))
    struct.pack_into(">QI", cluster, 8, at if name else 0, len(name))
    if autoclear is not None:
        struct.pack_into(">Q", cluster, hdr.AUTOCLEAR_OFFSET, autoclear)
    cluster[header_length:end] = packed
    if name:
        cluster[at : at + len(name)] = name
    reads = _past_sector(header_length, end) + (_past_sector(at, at + len(name)) if name else [])
    return _Layout(extensions, at if name else 0, name, cluster, reads, autoclear)


def _writes(disk: bytes | bytearray, new: _Layout, reading: Ranges) -> Ranges | None:
    """The byte ranges past the first sector to write before the first sector can switch
    to ``new``: for each range ``new`` reads there, from its first to its last byte that
    differs from ``disk`` (the bytes between, equal on disk, are rewritten unchanged);
    None when a byte that differs is one the header on disk reads (``reading``)."""
    spans: Ranges = []
    for start, end in new.reads:
        differ = [i for i in range(start, end) if disk[i] != new.cluster[i]]
        if any(_overlaps((i, i + 1), reading) for i in differ):
            return None
        if differ:
            spans.append((differ[0], differ[-1] + 1))
    return spans


def _reads(h: hdr.Header) -> Ranges:
    """What the header ``h`` (as on disk) reads past the first sector."""
    end = h.header_length + len(_pack(h.extensions))  # at least what it reads
    out = _past_sector(h.header_length, end)
    if h.backing_file_offset:
        out += _past_sector(h.backing_file_offset, h.backing_file_offset + h.backing_file_size)
    return out


def plan(
    disk: bytes,
    h: hdr.Header,
    backing: str | None,
    fmt: str | None,
    path: str,
    *,
    extensions: list[tuple[int, bytes]] | None = None,
    autoclear: int | None = None,
) -> list[_Layout]:
    """The headers to switch to, in order (one or two), from the header cluster ``disk``
    whose parsed header is ``h``, to one with this backing file and format, and
    ``extensions`` (default: ``h``'s) and ``autoclear`` bits (default: unchanged), the
    backing-format extension placed as the module says; ``ImageError`` if no
    crash-safe order exists."""
    cs = h.cluster_size
    name = backing.encode() if backing else b""
    if len(name) > hdr.MAX_BACKING_NAME:
        raise ImageError(f"backing file name longer than {hdr.MAX_BACKING_NAME} bytes")
    exts = _extensions(h.extensions if extensions is None else extensions, backing, fmt)
    end = h.header_length + len(_pack(exts))
    if end + len(name) > cs:
        what = "backing file name" if extensions is None else "header extensions"
        raise ImageError(f"no room for the {what} in {path!r}'s header cluster")
    reading = _reads(h)
    at = _place(end, len(name), reading, cs)
    if at is not None:
        direct = _layout(disk, h.header_length, exts, name, at, autoclear)
        if _writes(disk, direct, reading) is not None:
            return [direct]
    # two steps, through a header with the new backing file and no feature-name table
    final = _layout(disk, h.header_length, exts, name, end, autoclear)
    small = [(k, d) for k, d in exts if k != hdr.EXT_FEATURE_TABLE]
    small_end = h.header_length + len(_pack(small))
    between = None
    if small_end <= SECTOR:
        mid_at = _place(small_end, len(name), reading + final.reads, cs)
        if mid_at is not None:
            between = _layout(disk, h.header_length, small, name, mid_at, autoclear)
    if between is None or _writes(disk, between, reading) is None:
        verb = "re-point" if extensions is None else "change the header extensions of"
        raise ImageError(
            f"cannot {verb} {path!r} crash-safely: its header extensions leave no room"
        )
    return [between, final]


def repoint(f: HostFile, h: hdr.Header, backing: str | None, backing_format: str | None) -> None:
    """Point the open, writable image ``f`` (parsed header ``h``, updated here) at a new
    backing file, crash-safely (see the module's docstring); returns once it is durable."""
    disk = bytearray(hdr.header_cluster(f))
    cur = hdr.parse(bytes(disk), f.path, f.size())
    if (cur.backing_file, cur.backing_format) == (backing, backing_format if backing else None):
        return
    steps = plan(bytes(disk), cur, backing, backing_format, f.path)
    _apply(f, disk, cur, steps)
    last = steps[-1]
    h.backing_file_offset, h.backing_file_size = last.name_offset, len(last.name)
    h.backing_file = backing if last.name else None
    h.extensions = list(last.extensions)


def change_extensions(
    f: HostFile, h: hdr.Header, extensions: list[tuple[int, bytes]], autoclear: int
) -> None:
    """Give the open, writable image ``f`` (parsed header ``h``, updated here) these
    header extensions and autoclear feature bits, its backing file kept, crash-safely
    (see the module's docstring); returns once it is durable."""
    disk = bytearray(hdr.header_cluster(f))
    cur = hdr.parse(bytes(disk), f.path, f.size())
    backing, fmt = cur.backing_file, cur.backing_format
    steps = plan(bytes(disk), cur, backing, fmt, f.path, extensions=extensions, autoclear=autoclear)
    _apply(f, disk, cur, steps)
    last = steps[-1]
    h.backing_file_offset, h.backing_file_size = last.name_offset, len(last.name)
    h.extensions = list(last.extensions)
    h.autoclear = autoclear


def _apply(f: HostFile, disk: bytearray, cur: hdr.Header, steps: list[_Layout]) -> None:
    """Switch the header cluster ``disk`` (parsed: ``cur``) to each step in turn."""
    reading = _reads(cur)
    for step in steps:
        runs = _writes(disk, step, reading)
        assert runs is not None, "plan() checked every step"
        for start, stop in runs:
            f.pwrite(step.cluster[start:stop], start)
            disk[start:stop] = step.cluster[start:stop]
        if runs:
            f.flush()  # everything the new header reads, before the switch to it
        head = min(SECTOR, len(disk))
        f.pwrite(step.cluster[:head], 0)
        f.flush()
        disk[:head] = step.cluster[:head]
        reading = step.reads
