"""The qcow2 header cluster: parsing, validation, and crash-safe rewriting.

Cluster 0 holds the fixed header, the header extensions (starting at
``header_length``) and the backing file name.  Parsing refuses everything chainfs cannot
handle safely, naming the feature and the file.  ``layout`` serialises a header for a
new image; rewriting the backing file of an existing one, in an order that a crash
(even a write torn at a sector boundary) cannot turn into an image QEMU refuses, is
``repoint``'s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import ImageError, UnsupportedFeature
from ...hostfile import HostFile

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
QEMU_HEADER_LENGTH = 112

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
KNOWN_INCOMPAT |= INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_OFFSET = 88  # of the autoclear feature bits (v3), inside the first sector

MAX_BACKING_NAME = 1023
# QEMU's own ceilings for table sizes; anything larger is hostile or broken
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_VIRTUAL_SIZE = 1 << 62
MAX_SNAPSHOTS = 65536

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # bytes 0..71
_V3 = struct.Struct(">QQQII")  # bytes 72..103
_BITMAP_EXT = struct.Struct(">IIQQ")
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data, name


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    # header bytes past the fields above (unknown fields), kept verbatim
    extra: bytes = b""
    # (type, data) in file order, unknown ones included
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def backing_format(self) -> str | None:
        for kind, data in self.extensions:
            if kind == EXT_BACKING_FORMAT:
                return data.decode("utf-8", "replace")
        return None

    def has_extension(self, kind: int) -> bool:
        return any(k == kind for k, _ in self.extensions)

    # -- serialisation ---------------------------------------------------------------

    def pack_fields(self) -> bytes:
        """The header proper: ``header_length`` bytes (72 on v2)."""
        out = _FIXED.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            out += _V3.pack(
                self.incompatible,
                self.compatible,
                self.autoclear,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > V3_HEADER_LENGTH:
                tail = bytearray(self.extra)
                tail[0:1] = bytes([self.compression_type])
                out += bytes(tail)
        return out

    def pack_extensions(self) -> bytes:
        out = bytearray()
        for kind, data in self.extensions:
            out += struct.pack(">II", kind, len(data)) + data
            out += bytes(-len(data) % 8)
        out += struct.pack(">II", EXT_END, 0)
        return bytes(out)


def parse(raw: bytes, path: str, file_size: int) -> Header:
    """Parse and validate the header cluster (``raw`` = at least the first cluster)."""
    if len(raw) < V2_HEADER_LENGTH or raw[:4] != MAGIC:
        raise ImageError(f"{path!r} is not a qcow2 image")
    f = _FIXED.unpack_from(raw, 0)
    h = Header(*f[1:])
    if h.version not in (2, 3):
        raise UnsupportedFeature(f"{path!r} is qcow2 version {h.version}; only 2 and 3 are known")
    if not 9 <= h.cluster_bits <= 21:
        raise ImageError(f"{path!r} has an invalid cluster size (2^{h.cluster_bits})")
    cs = h.cluster_size
    if h.version >= 3:
        if len(raw) < V3_HEADER_LENGTH:
            raise ImageError(f"{path!r} has a truncated header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length) = (
            _V3.unpack_from(raw, 72)
        )
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise ImageError(f"{path!r} has an invalid header length {h.header_length}")
        if len(raw) < h.header_length:
            raise ImageError(f"{path!r} has a truncated header")
        h.extra = bytes(raw[V3_HEADER_LENGTH : h.header_length])
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = raw[V3_HEADER_LENGTH]
    else:
        h.refcount_order = 4
        h.header_length = V2_HEADER_LENGTH
    _parse_extensions(h, raw, path)
    _check_features(h, path)
    _check_geometry(h, path, file_size)
    if h.backing_file_offset:
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_size > MAX_BACKING_NAME:
            raise ImageError(
                f"{path!r} has a backing file name of {h.backing_file_size} bytes;"
                f" at most {MAX_BACKING_NAME} are allowed"
            )
        if end > cs:
            raise ImageError(f"{path!r} has a backing file name running past the header cluster")
        if end > len(raw):
            raise ImageError(f"{path!r} has a backing file name running past the end of the file")
        name = raw[h.backing_file_offset : end]
        try:
            h.backing_file = name.decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"{path!r} has a backing file name that is not UTF-8") from None
        if "\0" in h.backing_file:
            raise ImageError(f"{path!r} has a backing file name with a NUL byte")
        if not h.backing_file:
            h.backing_file = None
    return h


def _parse_extensions(h: Header, raw: bytes, path: str) -> None:
    pos = h.header_length
    limit = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    limit = min(limit, len(raw))
    while pos + 8 <= limit:
        kind, length = struct.unpack_from(">II", raw, pos)
        pos += 8
        if kind == EXT_END:
            return
        if length > limit - pos:
            raise ImageError(f"{path!r} has a header extension running past its end")
        h.extensions.append((kind, bytes(raw[pos : pos + length])))
        pos += length + (-length % 8)


def _check_features(h: Header, path: str) -> None:
    if h.crypt_method or h.has_extension(EXT_CRYPTO):
        raise UnsupportedFeature(f"{path!r} is encrypted; chainfs does not handle encryption")
    if h.incompatible & INCOMPAT_DATA_FILE or h.has_extension(EXT_DATA_FILE):
        raise UnsupportedFeature(f"{path!r} uses an external data file, which chainfs refuses")
    if h.incompatible & INCOMPAT_EXTL2:
        raise UnsupportedFeature(f"{path!r} uses extended L2 entries, which chainfs refuses")
    unknown = h.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        raise UnsupportedFeature(
            f"{path!r} has unknown incompatible feature bits {unknown:#x}; refusing it"
        )
    if h.incompatible & INCOMPAT_CORRUPT:
        raise UnsupportedFeature(
            f"{path!r} is marked corrupt; repair it with 'qemu-img check -r all' first"
        )
    if bool(h.incompatible & INCOMPAT_COMPRESSION) != (h.compression_type != 0):
        raise ImageError(f"{path!r} has an inconsistent compression type")
    if h.compression_type not in (0,):
        raise UnsupportedFeature(
            f"{path!r} uses compression type {h.compression_type} (zstd); only zlib is handled"
        )
    if h.refcount_order > 6:
        raise ImageError(f"{path!r} has an invalid refcount order {h.refcount_order}")


def _check_geometry(h: Header, path: str, file_size: int) -> None:
    """Sizes and offsets of the tables: sane, aligned, and inside the file.

    Every table chainfs loads whole (the L1 table, the refcount table) must lie inside the
    file, so a hostile header cannot make chainfs allocate more memory than the file has
    bytes, nor read at offsets the operating system cannot even express.
    """
    cs = h.cluster_size
    if h.size > MAX_VIRTUAL_SIZE:
        raise ImageError(f"{path!r} has an absurd virtual size {h.size}")
    l2_entries = cs // 8
    need = -(-h.size // (cs * l2_entries))
    if h.l1_size < need:
        raise ImageError(f"{path!r} has an L1 table too small for its size")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{path!r} has an absurd L1 table size {h.l1_size}")
    if h.l1_size:
        _check_table(path, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError(
            f"{path!r} has an invalid refcount table size ({h.refcount_table_clusters} clusters)"
        )
    _check_table(
        path, "refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs,
        cs, file_size,
    )  # fmt: skip
    if h.nb_snapshots:
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise ImageError(f"{path!r} claims an absurd {h.nb_snapshots} internal snapshots")
        # entries have variable length; the table must at least start inside the file
        _check_table(path, "snapshot table", h.snapshots_offset, 1, cs, file_size)
    if h.backing_file_offset >= cs:
        raise ImageError(f"{path!r} has its backing file name outside the header cluster")
    if h.backing_file_offset and h.backing_file_offset < h.header_length:
        raise ImageError(f"{path!r} has its backing file name inside the header fields")


def _check_table(path: str, what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset == 0 or offset % cs:
        raise ImageError(f"{path!r} has a misaligned {what} (offset {offset:#x})")
    if offset + length > file_size:
        raise ImageError(
            f"{path!r} has its {what} (offset {offset:#x}, {length} bytes) "
            f"past the end of the file ({file_size} bytes)"
        )


def header_cluster(f: HostFile) -> bytes:
    """Cluster 0 of an open image, unparsed (``ImageError`` if it is not qcow2)."""
    start = f.pread(V3_HEADER_LENGTH, 0)
    if len(start) < V2_HEADER_LENGTH or start[:4] != MAGIC:
        raise ImageError(f"{f.path!r} is not a qcow2 image")
    bits = struct.unpack_from(">I", start, 20)[0]
    if not 9 <= bits <= 21:
        raise ImageError(f"{f.path!r} has an invalid cluster size (2^{bits})")
    return f.pread(1 << bits, 0)


HEAD_READ = 4096  # read_header's first read: the header's bytes in nearly every image


def read_header(f: HostFile) -> Header:
    """Read and parse cluster 0 of an open image: its first 4 KiB alone when the header,
    its extensions and the backing file name all lie there (parsed the same: ``parse``
    reads nothing past them), else the whole cluster (64 KiB read for every image made
    a mount's scan of thousands of images a third of its time)."""
    head = f.pread(HEAD_READ, 0)
    if _used_within(head):
        return parse(head, f.path, f.size())
    return parse(header_cluster(f), f.path, f.size())


def _used_within(raw: bytes) -> bool:
    """Whether everything ``parse`` reads of a header cluster lies in ``raw``, its start
    (shorter than the cluster): the header, the extensions up to the backing file name
    (and that name) or, with no name, up to their end marker."""
    if len(raw) < V3_HEADER_LENGTH or raw[:4] != MAGIC:
        return False
    _, version, backing_offset, backing_size, bits = struct.unpack_from(">4sIQII", raw, 0)
    if version not in (2, 3) or not 9 <= bits <= 21 or 1 << bits <= len(raw):
        return False
    length = V2_HEADER_LENGTH if version == 2 else _V3.unpack_from(raw, 72)[4]
    if not V2_HEADER_LENGTH <= length <= len(raw):
        return False
    if backing_offset:  # the extensions end where the name begins
        return bool(length <= backing_offset and backing_offset + backing_size <= len(raw))
    pos = length
    while pos + 8 <= len(raw):
        kind, size = struct.unpack_from(">II", raw, pos)
        if kind == EXT_END:
            return True
        pos += 8 + size + (-size % 8)
    return False


def read_backing(path: str) -> str | None:
    """The backing string recorded in the header of the qcow2 image at ``path``."""
    f = HostFile(path, False)
    try:
        return read_header(f).backing_file
    finally:
        f.close()


@dataclass
class Bitmap:
    """One entry of a qcow2 image's persistent bitmap directory."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity: int

    @property
    def flag_names(self) -> list[str]:
        return [n for bit, n in ((0, "in-use"), (1, "auto")) if self.flags & (1 << bit)]


def bitmap_directory(f: HostFile, h: Header) -> tuple[int, int, list[Bitmap] | None] | None:
    """(offset, size, bitmaps) of the bitmap directory; None when QEMU would see none.

    QEMU ignores the bitmaps of an image whose autoclear bit says they are stale.  The
    list is None when the directory is truncated.
    """
    if not h.autoclear & AUTOCLEAR_BITMAPS:
        return None
    ext = next((d for k, d in h.extensions if k == EXT_BITMAPS), None)
    if ext is None or len(ext) < _BITMAP_EXT.size:
        return None
    count, _, dir_size, dir_offset = _BITMAP_EXT.unpack_from(ext)
    if not count:
        return None
    directory = f.pread(dir_size, dir_offset)
    bitmaps: list[Bitmap] = []
    pos = 0
    for _ in range(count):
        if pos + _BITMAP_ENTRY.size > len(directory):
            return dir_offset, dir_size, None
        table_offset, table_size, flags, _, gran_bits, name_len, extra = _BITMAP_ENTRY.unpack_from(
            directory, pos
        )
        start = pos + _BITMAP_ENTRY.size + extra
        name = directory[start : start + name_len].decode(errors="replace")
        bitmaps.append(Bitmap(name, table_offset, table_size, flags, 1 << gran_bits))
        pos = start + name_len
        pos += -pos % 8
    return dir_offset, dir_size, bitmaps


def layout(h: Header, backing: str | None, backing_format: str | None) -> tuple[bytes, bytes]:
    """Return (header + extensions, backing name) for a new image's header."""
    exts = [(k, d) for k, d in h.extensions if k != EXT_BACKING_FORMAT]
    if backing is not None and backing_format is not None:
        # first, so that a change of format keeps the other extensions where they were
        exts.insert(0, (EXT_BACKING_FORMAT, backing_format.encode()))
    h.extensions = exts
    name = backing.encode() if backing else b""
    if len(name) > MAX_BACKING_NAME:
        raise ImageError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    return h.pack_fields() + h.pack_extensions(), name
