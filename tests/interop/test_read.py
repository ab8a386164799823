"""chainfs reads every qcow2 variant QEMU writes exactly as QEMU reads it.

Each case builds a small chain with qemu-img/qemu-io and compares ``Chain.read`` with
``qemu-img convert -O raw`` of the same chain, for the whole disk and for reads at odd
offsets and lengths.  A read-only open must leave every file byte-for-byte untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain

from . import images as im
from .images import KiB, MiB

CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]


def odd_reads(size: int, cluster: int) -> list[tuple[int, int]]:
    """Reads that start and end off sector and cluster boundaries, and run past the end."""
    reads = [
        (0, 1),
        (1, 511),
        (511, 2),
        (cluster - 1, 2),
        (max(0, cluster - 100), cluster + 200),
        (size // 2 + 3, size // 4 + 5),
        (size - 1, 1),
        (size - 1, 100),
        (size - 513, 1025),
        (0, size + 4096),
        (size, 10),
    ]
    return [(o, n) for o, n in reads if 0 <= o <= size]


def assert_reads_like_qemu(top: str, model: im.Model | None = None) -> bytes:
    """Whole-disk and odd-offset reads of chainfs equal QEMU's; files stay untouched."""
    ref = im.reference(top)
    if model is not None:
        # the builders themselves must agree with QEMU, or the test proves nothing
        assert ref == bytes(model), "test builder and qemu disagree about the chain"
    with Chain.open(top) as chain:
        paths = [layer.path for layer in chain.layers]
        before = im.file_digests(paths)
        assert chain.size == len(ref)
        got = chain.read(0, chain.size)
        assert len(got) == len(ref)
        assert got == ref, f"first difference at byte {first_difference(got, ref)}"
        cluster = 64 * KiB
        for offset, length in odd_reads(len(ref), cluster) + odd_reads(len(ref), 512):
            assert chain.read(offset, length) == ref[offset : offset + length], (offset, length)
    assert im.file_digests(paths) == before, "a read-only open modified an image"
    return ref


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def two_layer_chain(
    d: Path,
    *,
    size: int = 4 * MiB,
    base_fmt: str = "qcow2",
    zeros: bool = False,
    cluster_size: int = 64 * KiB,
    compat: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool = False,
) -> tuple[str, im.Model]:
    """base (pattern 0x11) <- top (pattern 0x22), both made with the same options."""
    cluster = cluster_size
    create = {
        "cluster_size": cluster_size,
        "compat": compat,
        "refcount_bits": refcount_bits,
        "lazy_refcounts": lazy_refcounts,
    }
    top_writes = im.varied_writes(size, cluster, 0x22, salt=3)
    if zeros:
        # whole clusters (become zero clusters) and a partial one, over the base's data
        top_writes += im.clip(
            [
                ((size * 4 // 8) // cluster * cluster, cluster, None),
                ((size * 1 // 8) // cluster * cluster + 10, 300, None),
                (size * 5 // 8 // cluster * cluster, 2 * cluster, None),
            ],
            size,
        )
    layers = [
        {
            "name": "base." + base_fmt,
            "fmt": base_fmt,
            "create": create if base_fmt == "qcow2" else {},
            "writes": im.varied_writes(size, cluster, 0x11),
        },
        {"name": "top.qcow2", "create": create, "writes": top_writes},
    ]
    paths, model = im.build_chain(str(d), layers, size=size)
    return paths[-1], model


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_versions_and_cluster_sizes(tmp_path: Path, compat: str, cluster_size: int) -> None:
    top, model = two_layer_chain(tmp_path, compat=compat, cluster_size=cluster_size)
    assert_reads_like_qemu(top, model)
    with Chain.open(top) as chain:
        assert [os.path.realpath(layer.path) for layer in chain.layers] == [
            os.path.realpath(tmp_path / "top.qcow2"),
            os.path.realpath(tmp_path / "base.qcow2"),
        ]
        assert [layer.format_name for layer in chain.layers] == ["qcow2", "qcow2"]
        assert [layer.virtual_size for layer in chain.layers] == [4 * MiB, 4 * MiB]


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("cluster_size", [512, 64 * KiB])
def test_refcount_widths(tmp_path: Path, refcount_bits: int, cluster_size: int) -> None:
    top, model = two_layer_chain(
        tmp_path, size=2 * MiB, refcount_bits=refcount_bits, cluster_size=cluster_size
    )
    assert_reads_like_qemu(top, model)


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB, 2 * MiB])
def test_zero_clusters_mask_backing(tmp_path: Path, cluster_size: int) -> None:
    top, model = two_layer_chain(tmp_path, zeros=True, compat="1.1", cluster_size=cluster_size)
    assert im.zero_extents(top), "qemu did not make zero clusters; the test proves nothing"
    assert_reads_like_qemu(top, model)


def test_zero_clusters_without_backing(tmp_path: Path) -> None:
    path = im.create(str(tmp_path / "z.qcow2"), 2 * MiB, cluster_size=4 * KiB)
    writes: list[im.Write] = [(0, MiB, 0x5A), (64 * KiB, 64 * KiB, None), (200 * KiB, 100, None)]
    im.write(path, writes)
    # -u also deallocates: a zero cluster vs an unallocated one must read the same
    im.qemu_io(path, ["write -z -u 300k 8k"])
    model = im.Model(2 * MiB)
    model.apply(writes + [(300 * KiB, 8 * KiB, None)])
    assert im.zero_extents(path)
    assert_reads_like_qemu(path, model)


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_compressed_clusters(tmp_path: Path, compat: str, cluster_size: int) -> None:
    src, model = two_layer_chain(tmp_path, cluster_size=cluster_size)
    dst = im.convert_compressed(
        src, str(tmp_path / "c.qcow2"), cluster_size=cluster_size, options=[f"compat={compat}"]
    )
    assert im.compressed_clusters(dst) > 0, "qemu-img convert -c compressed nothing"
    assert_reads_like_qemu(dst, model)


def test_compressed_clusters_in_an_overlay(tmp_path: Path) -> None:
    size, cluster = 2 * MiB, 64 * KiB
    base = im.create(str(tmp_path / "base.qcow2"), size, cluster_size=4 * KiB)
    base_writes = im.varied_writes(size, 4 * KiB, 0x11)
    im.write(base, base_writes)
    top = im.create(str(tmp_path / "top.qcow2"), backing="base.qcow2", cwd=str(tmp_path))
    # qemu only writes compressed clusters where the image has none allocated yet
    compressed = [(0, 2 * cluster, 0x33), (5 * cluster, cluster, 0x44)]
    compressed += [(size - cluster, cluster, 0x55)]
    im.write_compressed(top, compressed)
    # partial writes over compressed clusters: qemu decompresses into a new cluster
    partial: list[im.Write] = [(cluster + 1000, 10, 0x66), (4 * cluster + 7, cluster, 0x67)]
    im.write(top, partial)
    model = im.Model(size)
    model.apply(base_writes + compressed + partial)
    assert im.compressed_clusters(top) >= 2
    assert_reads_like_qemu(top, model)


def incompressible(length: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(length)


def test_compressed_and_incompressible_clusters_mixed(tmp_path: Path) -> None:
    """Compressed data of many sizes, packed back to back across host clusters."""
    size, cluster = MiB, 4 * KiB
    raw = tmp_path / "src.raw"
    data = bytearray(size)
    for i in range(size // cluster):
        # some clusters compress to a few bytes, some barely, some not at all (stored raw)
        kind = i % 4
        if kind == 0:
            continue
        chunk = incompressible(cluster, i)
        if kind == 1:
            chunk = bytes([i % 251]) * (cluster - 7) + chunk[:7]
        elif kind == 2:
            chunk = (chunk[: cluster // 8]) * 8
        data[i * cluster : (i + 1) * cluster] = chunk
    raw.write_bytes(bytes(data))
    dst = im.convert_compressed(str(raw), str(tmp_path / "c.qcow2"), cluster_size=cluster)
    assert im.compressed_clusters(dst) > 0
    assert_reads_like_qemu(dst, im.Model(size, bytes(data)))


@pytest.mark.parametrize("compat", ["1.1"])
def test_dirty_lazy_refcounts_image(tmp_path: Path, compat: str) -> None:
    top, model = two_layer_chain(tmp_path, compat=compat, lazy_refcounts=True)
    writes: list[im.Write] = [(100 * KiB, 300 * KiB, 0x77), (3 * MiB + 5, 70 * KiB, 0x78)]
    im.make_dirty(top, writes)
    model.apply(writes)
    assert im.check(top)[0] != 0, "qemu-img check finds a dirty image clean; nothing tested"
    assert_reads_like_qemu(top, model)
    # a reader may ignore the dirty bit, but it must not clear it
    assert im.incompatible_features(top) & im.INCOMPAT_DIRTY


@pytest.mark.parametrize(
    ("size", "cluster_size"),
    [
        (4 * MiB + 3 * 512, 64 * KiB),
        (MiB + 64 * KiB + 512, 2 * MiB),
        (3 * 512, 64 * KiB),
        (5 * MiB - 512, 4 * KiB),
        (1000 * 512 + 512, 512),
    ],
)
def test_virtual_size_not_cluster_aligned(tmp_path: Path, size: int, cluster_size: int) -> None:
    top, model = two_layer_chain(tmp_path, size=size, cluster_size=cluster_size)
    ref = assert_reads_like_qemu(top, model)
    assert len(ref) == size


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB])
def test_raw_base(tmp_path: Path, cluster_size: int) -> None:
    top, model = two_layer_chain(tmp_path, base_fmt="raw", cluster_size=cluster_size)
    assert_reads_like_qemu(top, model)
    with Chain.open(top) as chain:
        assert [layer.format_name for layer in chain.layers] == ["qcow2", "raw"]


def test_raw_base_shorter_than_overlay(tmp_path: Path) -> None:
    base = im.create(str(tmp_path / "base.raw"), MiB, fmt="raw")
    im.write(base, [(0, MiB, 0x11)])
    top = im.create(
        str(tmp_path / "top.qcow2"),
        3 * MiB,
        backing="base.raw",
        backing_fmt="raw",
        cwd=str(tmp_path),
    )
    im.write(top, [(MiB - 100, 200, 0x22)])
    model = im.Model(3 * MiB)
    model.apply([(0, MiB, 0x11), (MiB - 100, 200, 0x22)])
    assert_reads_like_qemu(top, model)


def test_preallocated_metadata(tmp_path: Path) -> None:
    size = 2 * MiB + 512
    top = im.create(
        str(tmp_path / "p.qcow2"), size, cluster_size=4 * KiB, options=["preallocation=metadata"]
    )
    writes = im.varied_writes(size, 4 * KiB, 0x31)
    im.write(top, writes)
    model = im.Model(size)
    model.apply(writes)
    assert_reads_like_qemu(top, model)


def test_image_with_persistent_bitmap(tmp_path: Path) -> None:
    top, model = two_layer_chain(tmp_path, size=2 * MiB)
    im.run([im.QEMU_IMG, "bitmap", "--add", top, "bm0"])
    more: list[im.Write] = [(MiB, 100 * KiB, 0x44)]
    im.write(top, more)
    model.apply(more)
    # reading must not touch the header, so the bitmap stays valid for QEMU
    assert_reads_like_qemu(top, model)
    assert im.info(top)["format-specific"]["data"].get("bitmaps")


def test_empty_image_reads_zeros(tmp_path: Path) -> None:
    top = im.create(str(tmp_path / "e.qcow2"), 3 * MiB)
    assert_reads_like_qemu(top, im.Model(3 * MiB))


# ---- random reads of one rich chain: v2 4K ← v3 512 (zeros) ← v3 64K (compressed) ----


RICH_SIZE = 3 * MiB + 1536


class Rich:
    """An open chain and QEMU's reading of it (with a short repr for hypothesis reports)."""

    def __init__(self, chain: Chain, ref: bytes) -> None:
        self.chain = chain
        self.ref = ref

    def __repr__(self) -> str:
        return f"Rich({[layer.path for layer in self.chain.layers]})"


@pytest.fixture(scope="module")
def rich_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rich]:
    d = tmp_path_factory.mktemp("rich")
    size = RICH_SIZE
    layers: list[dict[str, Any]] = [
        {
            "name": "a.qcow2",
            "create": {"compat": "0.10", "cluster_size": 4 * KiB},
            "writes": im.varied_writes(size, 4 * KiB, 0x11),
        },
        {
            "name": "b.qcow2",
            "create": {"cluster_size": 512, "refcount_bits": 2},
            "writes": im.varied_writes(size, 512, 0x22, salt=1)
            + [(0, 8 * KiB, None), (size // 2, 64 * KiB, None)],
        },
        {
            "name": "c.qcow2",
            "create": {"cluster_size": 64 * KiB},
        },
    ]
    paths, model = im.build_chain(str(d), layers, size=size)
    top = paths[-1]
    # compressed first: qemu writes compressed clusters only where none is allocated
    compressed = [(2 * MiB, 128 * KiB, 0x44), (0, 64 * KiB, 0x45)]
    im.write_compressed(top, compressed)
    model.apply(compressed)
    later = im.varied_writes(size, 64 * KiB, 0x33, salt=5)
    im.write(top, later)
    model.apply(later)
    ref = im.reference(top)
    assert ref == bytes(model)
    with Chain.open(top) as chain:
        yield Rich(chain, ref)


@settings(max_examples=200, deadline=None)
@given(
    offset=st.one_of(
        st.integers(0, RICH_SIZE),
        st.integers(0, RICH_SIZE // 512).map(lambda s: s * 512),
        st.integers(0, RICH_SIZE // 65536).flatmap(
            lambda c: st.integers(-3, 3).map(lambda d: max(0, c * 65536 + d))
        ),
    ),
    length=st.one_of(st.integers(0, 1024), st.integers(0, 300 * KiB)),
)
def test_random_reads(rich_chain: Rich, offset: int, length: int) -> None:
    got = rich_chain.chain.read(offset, length)
    want = rich_chain.ref[offset : offset + length]
    assert got == want, (
        f"read({offset}, {length}): first difference at {first_difference(got, want)}"
    )
