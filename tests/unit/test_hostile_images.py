"""Damaged and hostile images, made by chainfs itself and then broken on purpose.

Every case must end one of two ways: refused with an ``ImageError`` whose message names
the file and the problem, or read without an exception of any other kind.  Memory stays
bounded (no read longer than the file or two clusters), a refused or read-only open
never changes a byte, and a writable open refuses metadata that writing through could
damage further — at open for the L1 and refcount structures, and when an L2 table is
first loaded for the tables themselves.  QEMU's verdict on the same damage is in
``tests/interop/test_hostile_images.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from chainfs.chain import Chain
from chainfs.errors import ChainfsError, ImageError
from chainfs.formats import open_layer
from chainfs.formats.qcow2 import create_overlay
from chainfs.formats.qcow2 import header as hdr
from chainfs.hostfile import HostFile

KiB, MiB = 1024, 1 << 20
CS = 4 * KiB
SIZE = 3 * MiB  # two L2 tables with 4 KiB clusters (each maps 2 MiB)
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

# (guest offset, pattern, length): data in both L2 tables' ranges
WRITES = [(0, 0x11, 3 * CS), (100 * KiB + 7, 0x22, 5000), (2 * MiB + CS, 0x33, 2 * CS)]


@pytest.fixture(autouse=True)
def _bounded(bounded_reads: None) -> None:
    """Every host read in this module is bounded (``bounded_reads``, tests/conftest.py)."""


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_image(path: str, *, size: int = SIZE, cluster_size: int = CS) -> bytes:
    """A v3 image written by chainfs; returns the disk content."""
    create_overlay(path, size=size, backing=None, backing_format=None, cluster_size=cluster_size)
    content = bytearray(size)
    with Chain.open(path, writable=True, lock=False) as chain:
        for offset, pattern, length in WRITES:
            chain.write(offset, bytes([pattern]) * length)
            content[offset : offset + length] = bytes([pattern]) * length
    return bytes(content)


@dataclass
class Image:
    """Where an image's structures are, read straight from the file."""

    path: str
    cs: int
    l1_offset: int
    l1_size: int
    reftable: int
    refblocks: list[int]
    l2: list[int]  # L2 table offsets, in L1 order

    @classmethod
    def load(cls, path: str) -> Image:
        with open(path, "rb") as f:
            data = f.read()
        h = hdr.parse(data[: 1 << struct.unpack_from(">I", data, 20)[0]], path, len(data))
        cs = h.cluster_size
        l1 = [u64(data, h.l1_table_offset + 8 * i) & OFFSET_MASK for i in range(h.l1_size)]
        rt = [
            u64(data, h.refcount_table_offset + 8 * i)
            for i in range(h.refcount_table_clusters * cs // 8)
        ]
        return cls(
            path, cs, h.l1_table_offset, h.l1_size, h.refcount_table_offset,
            [e for e in rt if e], [e for e in l1 if e],
        )  # fmt: skip

    def entry_at(self, table: int, index: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(table + 8 * index)
            return int.from_bytes(f.read(8), "big")

    def data_entries(self, table_no: int = 0) -> list[tuple[int, int]]:
        """(index, entry) of the allocated entries of an L2 table."""
        with open(self.path, "rb") as f:
            f.seek(self.l2[table_no])
            table = f.read(self.cs)
        entries = [(i, u64(table, 8 * i)) for i in range(self.cs // 8)]
        return [(i, e) for i, e in entries if e & OFFSET_MASK]

    def put(self, offset: int, value: int, width: int = 8) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(value.to_bytes(width, "big"))

    def put_l2(self, index: int, value: int, table_no: int = 0) -> None:
        self.put(self.l2[table_no] + 8 * index, value)

    def set_refcount(self, cluster: int, value: int) -> None:
        """16-bit refcounts, one block covers the whole (small) file."""
        self.put(self.refblocks[0] + 2 * cluster, value, 2)

    def size(self) -> int:
        return os.path.getsize(self.path)


def u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Image, bytes]]:
    path = str(tmp_path / "hostile.qcow2")
    content = make_image(path)
    yield Image.load(path), content


def read_all(path: str, *, writable: bool = False) -> bytes:
    with Chain.open(path, writable=writable, lock=False) as chain:
        return bytes(chain.read(0, chain.size))


def refused(path: str, words: str, *, writable: bool) -> str:
    """Opening (and reading through) ``path`` fails with an ImageError naming it and
    ``words``; the file does not change."""
    before = digest(path)
    with pytest.raises(ImageError) as info:
        read_all(path, writable=writable)
    message = str(info.value)
    assert os.path.basename(path) in message, message
    assert words in message, message
    assert digest(path) == before
    return message


def read_or_refused(path: str) -> bytes | None:
    """A read-only open and full read: the content, or None after an ImageError."""
    before = digest(path)
    try:
        data = read_all(path)
    except ImageError as e:
        assert os.path.basename(path) in str(e), str(e)
        data = None
    assert digest(path) == before
    return data


# -- damage to the L1 and L2 tables: refused for writing, harmless for reading --------

Damage = Callable[[Image], None]


def l1_past_eof(im: Image) -> None:
    im.put(im.l1_offset, COPIED | (im.size() + 16 * im.cs))


def l1_misaligned(im: Image) -> None:
    im.put(im.l1_offset, COPIED | (im.l2[0] + 512))


def l1_onto_l1(im: Image) -> None:
    im.put(im.l1_offset, COPIED | im.l1_offset)


def l1_onto_reftable(im: Image) -> None:
    im.put(im.l1_offset, COPIED | im.reftable)


def l1_onto_refblock(im: Image) -> None:
    im.put(im.l1_offset, COPIED | im.refblocks[0])


def l1_twice_the_same_table(im: Image) -> None:
    im.put(im.l1_offset + 8, COPIED | im.l2[0])


def l1_reserved_bits(im: Image) -> None:
    im.put(im.l1_offset, COPIED | im.l2[0] | 0x100)


def l1_unshared_but_shared(im: Image) -> None:
    im.set_refcount(im.l2[0] // im.cs, 2)


def l2_onto(target: Callable[[Image], int]) -> Damage:
    def damage(im: Image) -> None:
        im.put_l2(0, COPIED | target(im))

    return damage


def l2_past_eof(im: Image) -> None:
    im.put_l2(0, COPIED | (im.size() + 8 * im.cs))


def l2_misaligned(im: Image) -> None:
    i, e = im.data_entries()[0]
    im.put_l2(i, e + 512)


def l2_reserved_bits(im: Image) -> None:
    i, e = im.data_entries()[0]
    im.put_l2(i, e | 0x10)


def l2_twice_the_same_cluster(im: Image) -> None:
    (_, e), (j, _) = im.data_entries()[:2]
    im.put_l2(j, e)


def l2_unshared_but_refcount_2(im: Image) -> None:
    _, e = im.data_entries()[0]
    im.set_refcount((e & OFFSET_MASK) // im.cs, 2)


def l2_shared_with_refcount_0(im: Image) -> None:
    i, e = im.data_entries()[0]
    im.put_l2(i, e & ~COPIED)
    im.set_refcount((e & OFFSET_MASK) // im.cs, 0)


def l2_copied_flag_missing(im: Image) -> None:
    """COPIED clear with refcount 1: another reference may exist, uncounted."""
    i, e = im.data_entries()[0]
    im.put_l2(i, e & ~COPIED)


def l2_compressed_marked_unshared(im: Image) -> None:
    i, e = im.data_entries()[0]
    im.put_l2(i, COPIED | COMPRESSED | (e & OFFSET_MASK))


def l2_compressed_past_eof(im: Image) -> None:
    im.put_l2(0, COMPRESSED | (im.size() + 3 * im.cs + 100))


def l2_compressed_into_unshared(im: Image) -> None:
    """A compressed entry whose data lies in a cluster another entry owns (found by the
    fuzzer: releasing it dropped the owned cluster's refcount to zero)."""
    (_, e), (j, _) = im.data_entries()[:2]
    im.put_l2(j, COMPRESSED | (e & OFFSET_MASK) + 16)


def l2_two_compressed_counted_once(im: Image) -> None:
    (i, e), (j, _) = im.data_entries()[:2]
    im.put_l2(i, COMPRESSED | (e & OFFSET_MASK))
    im.put_l2(j, COMPRESSED | (e & OFFSET_MASK) + 100)


def reftable_onto(target: Callable[[Image], int]) -> Damage:
    def damage(im: Image) -> None:
        im.put(im.reftable, target(im))

    return damage


def reftable_second_entry_onto_first_block(im: Image) -> None:
    im.put(im.reftable + 8, im.refblocks[0])


def metadata_refcount_0(im: Image) -> None:
    im.set_refcount(im.l1_offset // im.cs, 0)


def l1_table_on_the_reftable(im: Image) -> None:
    im.put(40, im.reftable)


WRITE_REFUSALS: dict[str, tuple[Damage, str]] = {
    "l1-past-eof": (l1_past_eof, "an L2 table past the end of the file"),
    "l1-misaligned": (l1_misaligned, "an L2 table at a misaligned offset"),
    "l1-onto-l1": (l1_onto_l1, "an L2 table overlapping other metadata"),
    "l1-onto-reftable": (l1_onto_reftable, "an L2 table overlapping other metadata"),
    "l1-onto-refblock": (l1_onto_refblock, "an L2 table overlapping other metadata"),
    "l1-same-table-twice": (l1_twice_the_same_table, "an L2 table overlapping other metadata"),
    "l1-reserved-bits": (l1_reserved_bits, "reserved bits set in L1 entry 0"),
    "l1-shared-table": (l1_unshared_but_shared, "marked unshared but with refcount 2"),
    "l2-onto-l1": (l2_onto(lambda im: im.l1_offset), "data pointing into metadata"),
    "l2-onto-reftable": (l2_onto(lambda im: im.reftable), "data pointing into metadata"),
    "l2-onto-refblock": (l2_onto(lambda im: im.refblocks[0]), "data pointing into metadata"),
    "l2-onto-itself": (l2_onto(lambda im: im.l2[0]), "data pointing into metadata"),
    "l2-onto-other-l2": (l2_onto(lambda im: im.l2[1]), "data pointing into metadata"),
    "l2-past-eof": (l2_past_eof, "data cluster past the end of the file"),
    "l2-misaligned": (l2_misaligned, "misaligned data cluster"),
    "l2-reserved-bits": (l2_reserved_bits, "reserved bits set in L2 entry"),
    "l2-same-cluster-twice": (l2_twice_the_same_cluster, "referenced twice"),
    "l2-shared-but-unshared": (l2_unshared_but_refcount_2, "marked unshared but with refcount 2"),
    "l2-refcount-0": (l2_shared_with_refcount_0, "with refcount 0"),
    "l2-copied-flag-missing": (l2_copied_flag_missing, "refcount 1 but 1 reference not marked"),
    "compressed-unshared": (l2_compressed_marked_unshared, "compressed cluster marked unshared"),
    "compressed-past-eof": (l2_compressed_past_eof, "compressed data past the end of the file"),
    "compressed-in-owned": (l2_compressed_into_unshared, "referenced twice"),
    "compressed-undercounted": (l2_two_compressed_counted_once, "refcount 1 but 2 references"),
    "reftable-onto-itself": (
        reftable_onto(lambda im: im.reftable),
        "refcount block overlapping other metadata",
    ),
    "reftable-onto-l1": (
        reftable_onto(lambda im: im.l1_offset),
        "refcount block overlapping other metadata",
    ),
    "reftable-onto-l2": (
        reftable_onto(lambda im: im.l2[0]),
        "L2 table overlapping other metadata",
    ),
    "reftable-twice-the-same-block": (
        reftable_second_entry_onto_first_block,
        "refcount block overlapping other metadata",
    ),
    "reftable-past-eof": (
        reftable_onto(lambda im: im.size() + im.cs),
        "refcount block past the end of the file",
    ),
    "reftable-misaligned": (
        reftable_onto(lambda im: im.refblocks[0] + 512),
        "refcount block at a misaligned offset",
    ),
    "reftable-reserved-bits": (
        reftable_onto(lambda im: im.refblocks[0] | 1),
        "reserved bits set in refcount table",
    ),
    "metadata-refcount-0": (metadata_refcount_0, "with refcount 0"),
    "l1-on-reftable": (l1_table_on_the_reftable, "overlapping other metadata"),
}


@pytest.mark.parametrize("case", list(WRITE_REFUSALS))
def test_damage_is_refused_for_writing(image: tuple[Image, bytes], case: str) -> None:
    im, _ = image
    damage, words = WRITE_REFUSALS[case]
    damage(im)
    refused(im.path, words, writable=True)
    # reading the same image never fails other than with an ImageError
    read_or_refused(im.path)


@pytest.mark.parametrize(
    "case",
    ["l1-past-eof", "l2-past-eof", "reftable-onto-itself", "reftable-past-eof",
     "metadata-refcount-0", "l1-reserved-bits", "l2-shared-but-unshared"],
)  # fmt: skip
def test_damage_only_writing_cares_about_reads_like_qemu(
    image: tuple[Image, bytes], case: str
) -> None:
    """Past the end of the file reads zeros (QEMU pads short reads); refcounts and
    reserved L1 bits do not matter to a reader."""
    im, content = image
    WRITE_REFUSALS[case][0](im)
    expected = content
    if case == "l1-past-eof":
        expected = bytes(2 * MiB) + expected[2 * MiB :]
    if case == "l2-past-eof":
        expected = bytes(CS) + expected[CS:]
    assert read_or_refused(im.path) == expected


def test_misaligned_tables_fail_reads_with_a_reason(image: tuple[Image, bytes]) -> None:
    im, _ = image
    l2_misaligned(im)
    with pytest.raises(ImageError, match="misaligned data cluster"):
        read_all(im.path)
    l1_misaligned(im)
    with pytest.raises(ImageError, match="misaligned L2 table"):
        read_all(im.path)


def test_a_refused_write_changes_nothing(image: tuple[Image, bytes]) -> None:
    """The damage sits in the second L2 table: the open succeeds, and the first write
    that loads that table is refused before anything reaches the file."""
    im, _ = image
    (i, _), (_, e) = im.data_entries(1)[:2]
    im.put_l2(i, e, table_no=1)  # two entries, one cluster, both "unshared"
    before = digest(im.path)
    with (
        Chain.open(im.path, writable=True, lock=False) as chain,
        pytest.raises(ImageError, match="referenced twice"),
    ):
        chain.write(2 * MiB + 5, b"x")
    assert digest(im.path) == before


def test_dirty_image_with_damage_is_refused_before_the_rebuild(
    image: tuple[Image, bytes],
) -> None:
    """A dirty image's refcounts are rebuilt from its tables; tables pointing into
    metadata or past the end of the file must not be counted into a new refcount
    structure (far past the end of the file, for an entry near 2^56)."""
    im, _ = image
    im.put(72, hdr.INCOMPAT_DIRTY)
    for damage, words in [
        (l2_onto(lambda im: im.l1_offset), "data pointing into metadata"),
        (lambda im: im.put_l2(0, COPIED | (1 << 55)), "past the end of the file"),
    ]:
        damage(im)
        refused(im.path, words, writable=True)


def test_dirty_image_with_a_cluster_in_two_tables_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "dirty.qcow2")
    make_image(path)
    im = Image.load(path)
    _, e = im.data_entries(0)[0]
    j, _ = im.data_entries(1)[0]
    im.put_l2(j, e, table_no=1)
    im.put(72, hdr.INCOMPAT_DIRTY)
    refused(path, "marked unshared but referenced 2 times", writable=True)


# -- absurd sizes: refused before anything big is allocated ----------------------------


@pytest.mark.parametrize(
    ("offset", "width", "value", "words"),
    [
        (36, 4, (32 << 20) // 8, "L1 table (offset"),  # 32 MiB of L1 in a small file
        (36, 4, 0xFFFFFFFF, "absurd L1 table size"),
        (56, 4, (8 << 20) // CS, "refcount table (offset"),  # 8 MiB of refcount table
        (56, 4, 0xFFFFFFFF, "invalid refcount table size"),
        (24, 8, 1 << 63, "absurd virtual size"),
        (60, 4, 0xFFFFFFFF, "internal snapshots"),
        (40, 8, (1 << 64) - CS, "L1 table (offset"),
        (48, 8, (1 << 63), "refcount table (offset"),
    ],
)
def test_absurd_sizes_are_refused_in_bounded_memory(
    image: tuple[Image, bytes], offset: int, width: int, value: int, words: str
) -> None:
    im, _ = image
    im.put(offset, value, width)
    if offset == 60:
        im.put(64, im.cs, 8)
    tracemalloc.start()
    try:
        for writable in (False, True):
            refused(im.path, words, writable=writable)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB, f"opening allocated {peak} bytes"


def test_huge_but_legal_l1_table_is_read(tmp_path: Path) -> None:
    """The other side of the bound: a large L1 table that lies inside the file is fine."""
    path = str(tmp_path / "wide.qcow2")
    create_overlay(path, size=64 << 30, backing=None, backing_format=None, cluster_size=512)
    im = Image.load(path)
    assert im.l1_size * 8 > MiB  # 128 Ki entries
    with Chain.open(path, lock=False) as chain:
        assert chain.read(chain.size - 512, 512) == bytes(512)


def test_internal_snapshot_table_garbage(image: tuple[Image, bytes]) -> None:
    """nb_snapshots with a table of garbage: reading ignores snapshots; writing refuses."""
    im, content = image
    im.put(60, 5, 4)
    im.put(64, im.l2[0], 8)  # the "snapshot table" is an L2 table
    assert read_or_refused(im.path) == content
    refused(im.path, "internal snapshots", writable=True)


# -- backing strings ----------------------------------------------------------------


def with_backing_name(path: str, name: bytes, *, length: int | None = None) -> None:
    """Write ``name`` after the header extensions and point the header at it."""
    h = hdr.read_header(HostFile(path, False))
    offset = h.header_length + len(h.pack_extensions())
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(name)
        f.seek(8)
        f.write(struct.pack(">QI", offset, len(name) if length is None else length))


def test_backing_string_of_exactly_1023_bytes(tmp_path: Path) -> None:
    """Accepted; the chain then needs that file, whose absence is named."""
    path = str(tmp_path / "top.qcow2")
    make_image(path)
    name = ("d" * 200 + "/") * 5 + "b" * 18  # 1023 bytes, every component legal
    assert len(name) == 1023
    with_backing_name(path, name.encode())
    assert hdr.read_header(HostFile(path, False)).backing_file == name
    with pytest.raises(ChainfsError) as info:
        read_all(path)
    assert name in str(info.value)
    # and with the file there, it is a chain like any other
    target = tmp_path / name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x44" * SIZE)
    with Chain.open(path, lock=False) as chain:
        assert [layer.format_name for layer in chain.layers] == ["qcow2", "raw"]


@pytest.mark.parametrize("length", [1024, 4000, 0xFFFFFFFF])
def test_backing_string_longer_than_1023_bytes(tmp_path: Path, length: int) -> None:
    path = str(tmp_path / "top.qcow2")
    make_image(path)
    with_backing_name(path, b"x" * min(length, 3000), length=length)
    for writable in (False, True):
        message = refused(path, "backing file name", writable=writable)
        assert f"{length} bytes" in message or "past the header cluster" in message


def test_backing_loop_onto_itself(tmp_path: Path) -> None:
    path = str(tmp_path / "self.qcow2")
    make_image(path)
    with_backing_name(path, b"self.qcow2")
    with pytest.raises(ChainfsError, match="backing loop"):
        read_all(path)


def test_backing_name_offset_past_cluster_0(image: tuple[Image, bytes]) -> None:
    im, _ = image
    im.put(8, im.cs + 8, 8)
    im.put(16, 10, 4)
    for writable in (False, True):
        refused(im.path, "outside the header cluster", writable=writable)


# -- raw images and what is not an image at all ----------------------------------


@pytest.mark.parametrize(
    ("data", "size"), [(b"", 0), (b"abc", 512), (b"x" * 512, 512), (b"y" * 1000, 1024)]
)
def test_tiny_raw_images_read_as_qemu_shows_them(tmp_path: Path, data: bytes, size: int) -> None:
    """QEMU rounds a raw file's length up to whole sectors; the tail reads as zeros."""
    path = tmp_path / "tiny.raw"
    path.write_bytes(data)
    with Chain.open(str(path), active_format="raw", lock=False) as chain:
        assert chain.size == size
        assert chain.read(0, size + 100) == data + bytes(size - len(data))


def test_tiny_raw_backing_under_a_larger_overlay(tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"abc")
    top = str(tmp_path / "top.qcow2")
    create_overlay(top, size=64 * KiB, backing="base.raw", backing_format="raw", cluster_size=CS)
    with Chain.open(top, writable=True, lock=False) as chain:
        assert chain.read(0, 64 * KiB) == b"abc" + bytes(64 * KiB - 3)
        chain.write(1, b"Z")  # copy-on-write of the partial first cluster
        assert chain.read(0, 600) == b"aZc" + bytes(597)
    assert raw.read_bytes() == b"abc"


def test_empty_file_is_not_a_qcow2_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.qcow2"
    path.write_bytes(b"")
    for writable in (False, True):
        with pytest.raises(ImageError, match="not a qcow2 image"):
            open_layer(str(path), "qcow2", writable=writable)


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("opening blocked")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_what_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    """A backing string may name any path: a FIFO would block the open for ever, a
    device has no size."""
    target = {"fifo": str(tmp_path / "fifo"), "device": "/dev/zero", "directory": str(tmp_path)}
    if kind == "fifo":
        os.mkfifo(target[kind])
    top = str(tmp_path / "top.qcow2")
    create_overlay(top, size=MiB, backing=target[kind], backing_format="raw", cluster_size=CS)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        with pytest.raises(ImageError) as info:
            read_all(top)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert target[kind] in str(info.value)
    assert "regular file" in str(info.value) or "directory" in str(info.value)
    assert info.value.errno in (errno.EIO, errno.EOPNOTSUPP)
