"""Writes through chainfs leave images that QEMU finds clean and reads as the model says.

Hypothesis drives random write sequences (partial clusters, cluster boundaries, zeros, over
compressed and zero clusters, onto backing files of other cluster sizes) through
``Chain.open(p, writable=True)``, mirrored in a bytearray.  After ``close()``: ``qemu-img
check`` exits 0 on every layer (a leak, exit 3, fails too), ``qemu-img compare`` finds the
active image equal to the model, the layers below are byte-for-byte untouched, and a fresh
chainfs open reads the model back.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain
from chainfs.errors import ChainfsError

from . import images as im
from .images import KiB, MiB

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Setup:
    """A freshly built chain: layer paths bottom first (the last is the one written)."""

    paths: list[str]
    model: im.Model
    directory: Path

    @property
    def top(self) -> str:
        return self.paths[-1]

    @property
    def size(self) -> int:
        return len(self.model.data)


def two_layers(
    d: Path,
    base: dict[str, object],
    top: dict[str, object],
    *,
    size: int = 2 * MiB,
    base_fmt: str = "qcow2",
    top_zeros: bool = False,
) -> Setup:
    bcluster = int(str(base.get("cluster_size", 64 * KiB)))
    tcluster = int(str(top.get("cluster_size", 64 * KiB)))
    top_writes = im.varied_writes(size, tcluster, 0x22, salt=2)
    if top_zeros:
        top_writes += im.clip(
            [(0, 2 * tcluster, None), (size // 2 // tcluster * tcluster, 3 * tcluster, None)],
            size,
        )
    paths, model = im.build_chain(
        str(d),
        [
            {
                "name": f"base.{base_fmt}",
                "fmt": base_fmt,
                "create": base,
                "writes": im.varied_writes(size, bcluster, 0x11),
            },
            {"name": "top.qcow2", "create": top, "writes": top_writes},
        ],
        size=size,
    )
    return Setup(paths, model, d)


def single(d: Path, *, size: int = 2 * MiB, data: bool = True, **create: object) -> Setup:
    cluster = int(str(create.get("cluster_size", 64 * KiB)))
    writes = im.varied_writes(size, cluster, 0x33) if data else []
    paths, model = im.build_chain(
        str(d), [{"name": "top.qcow2", "create": create, "writes": writes}], size=size
    )
    return Setup(paths, model, d)


def compressed(d: Path, *, cluster_size: int, compat: str = "1.1") -> Setup:
    src = two_layers(d, {"cluster_size": cluster_size}, {"cluster_size": cluster_size})
    dst = im.convert_compressed(
        src.top, str(d / "c.qcow2"), cluster_size=cluster_size, options=[f"compat={compat}"]
    )
    assert im.compressed_clusters(dst) > 0
    return Setup([dst], src.model, d)


def short_backing(d: Path) -> Setup:
    """base (2M, full of data) <- mid (1M + 1.5K) <- top (2M): past mid's end reads zeros."""
    size = 2 * MiB
    paths, model = im.build_chain(
        str(d),
        [
            {"name": "base.qcow2", "writes": [(0, size, 0x11)]},
            {
                "name": "mid.qcow2",
                "size": MiB + 1536,
                "create": {"cluster_size": 4 * KiB},
                "writes": [(MiB - 100, 1636, 0x22)],
            },
            {"name": "top.qcow2", "create": {"cluster_size": 64 * KiB}},
        ],
        size=size,
    )
    return Setup(paths, model, d)


def compressed_overlay(d: Path) -> Setup:
    """base (4K clusters) <- top with compressed clusters written by qemu-io over it."""
    size = 2 * MiB
    paths, model = im.build_chain(
        str(d),
        [
            {
                "name": "base.qcow2",
                "create": {"cluster_size": 4 * KiB},
                "writes": im.varied_writes(size, 4 * KiB, 0x11),
            },
            {"name": "top.qcow2"},
        ],
        size=size,
    )
    compressed = [(0, 256 * KiB, 0x21), (MiB, 128 * KiB, 0x22), (size - 64 * KiB, 64 * KiB, 0x23)]
    im.write_compressed(paths[-1], compressed)
    model.apply(compressed)
    return Setup(paths, model, d)


def preallocated(d: Path) -> Setup:
    """preallocation=metadata: every L2 entry points at a host cluster from the start."""
    size = 2 * MiB
    top = im.create(
        str(d / "top.qcow2"), size, cluster_size=4 * KiB, options=["preallocation=metadata"]
    )
    writes = im.varied_writes(size, 4 * KiB, 0x31)
    im.write(top, writes)
    model = im.Model(size)
    model.apply(writes)
    return Setup([top], model, d)


SETUPS: dict[str, Callable[[Path], Setup]] = {
    "fresh-64k": lambda d: single(d, data=False),
    "v3-64k-over-4k": lambda d: two_layers(d, {"cluster_size": 4 * KiB}, {}),
    "v3-512-over-64k": lambda d: two_layers(d, {}, {"cluster_size": 512}),
    "v3-64k-over-2m": lambda d: two_layers(d, {"cluster_size": 2 * MiB}, {}, size=4 * MiB),
    "v3-2m-over-512": lambda d: two_layers(
        d, {"cluster_size": 512}, {"cluster_size": 2 * MiB}, size=4 * MiB
    ),
    "v2-4k-over-64k": lambda d: two_layers(
        d, {"compat": "0.10"}, {"compat": "0.10", "cluster_size": 4 * KiB}
    ),
    "v2-single-64k": lambda d: single(d, compat="0.10"),
    "compressed-64k": lambda d: compressed(d, cluster_size=64 * KiB),
    "compressed-v2-4k": lambda d: compressed(d, cluster_size=4 * KiB, compat="0.10"),
    "compressed-overlay": compressed_overlay,
    "preallocated-metadata": preallocated,
    "zero-clusters": lambda d: two_layers(d, {}, {"cluster_size": 4 * KiB}, top_zeros=True),
    "refcount1": lambda d: two_layers(
        d, {"refcount_bits": 1}, {"refcount_bits": 1, "cluster_size": 4 * KiB}
    ),
    "refcount2-512": lambda d: single(d, refcount_bits=2, cluster_size=512),
    "raw-base": lambda d: two_layers(d, {}, {"cluster_size": 4 * KiB}, base_fmt="raw"),
    "short-backing": short_backing,
    "lazy-refcounts": lambda d: two_layers(d, {}, {"lazy_refcounts": True}),
}

Op = tuple[str, int, int, int]  # (kind, offset, length, seed)


def ops(size: int) -> st.SearchStrategy[list[Op]]:
    near_boundary = st.sampled_from([512, 4 * KiB, 64 * KiB, 2 * MiB]).flatmap(
        lambda c: st.tuples(st.integers(0, size // c), st.integers(-700, 700)).map(
            lambda t: t[0] * c + t[1]
        )
    )
    offset = st.one_of(st.integers(0, size - 1), near_boundary).map(
        lambda o: min(max(o, 0), size - 1)
    )
    length = st.one_of(
        st.integers(1, 1100),
        st.sampled_from([512, 4 * KiB, 64 * KiB, 128 * KiB]),
        st.integers(1, 200 * KiB),
    )
    kind = st.sampled_from(["data", "data", "zeros", "fill", "flush"])
    op = st.tuples(kind, offset, length, st.integers(0, 2**32 - 1)).map(
        lambda t: (t[0], t[1], min(t[2], size - t[1]), t[3])
    )
    return st.lists(op, min_size=1, max_size=12)


def payload(kind: str, length: int, seed: int) -> bytes:
    if kind == "zeros":
        return bytes(length)
    if kind == "fill":
        return bytes([seed % 255 + 1]) * length
    return random.Random(seed).randbytes(length)


def apply_ops(setup: Setup, sequence: list[Op]) -> None:
    """Write through chainfs, mirror in the model, read back while still open."""
    model = setup.model
    with Chain.open(setup.top, writable=True) as chain:
        assert chain.size == setup.size
        for kind, offset, length, seed in sequence:
            if kind == "flush":
                chain.flush()
                continue
            data = payload(kind, length, seed)
            chain.write(offset, data)
            model.put(offset, data)
            lo, hi = max(0, offset - 700), min(setup.size, offset + length + 700)
            assert chain.read(lo, hi - lo) == bytes(model.data[lo:hi])
        assert chain.read(0, setup.size) == bytes(model)


def verify(setup: Setup, below_before: dict[str, str]) -> None:
    """The QEMU verdicts after close: clean images, equal content, lower layers untouched."""
    assert im.file_digests(setup.paths[:-1]) == below_before, "a backing file was modified"
    im.assert_chain_clean(setup.paths)
    im.assert_same_as(setup.top, bytes(setup.model), str(setup.directory))
    with Chain.open(setup.top) as chain:
        assert chain.read(0, chain.size) == bytes(setup.model)


def build(tmp_path_factory: pytest.TempPathFactory, name: str) -> Setup:
    d = tmp_path_factory.mktemp(name)
    setup = SETUPS[name](d)
    # the builders must agree with QEMU about the starting content
    assert im.reference(setup.top) == bytes(setup.model)
    return setup


@pytest.mark.parametrize("name", list(SETUPS))
@SETTINGS
@given(data=st.data())
def test_random_writes(
    tmp_path_factory: pytest.TempPathFactory, name: str, data: st.DataObject
) -> None:
    setup = build(tmp_path_factory, name)
    sequence = data.draw(ops(setup.size), label="ops")
    before = im.file_digests(setup.paths[:-1])
    apply_ops(setup, sequence)
    verify(setup, before)


def test_open_and_close_without_writes_changes_nothing_qemu_can_see(tmp_path: Path) -> None:
    setup = two_layers(tmp_path, {}, {"cluster_size": 4 * KiB})
    before = im.file_digests(setup.paths[:-1])
    with Chain.open(setup.top, writable=True):
        pass
    verify(setup, before)


def test_write_past_the_end_is_refused(tmp_path: Path) -> None:
    setup = single(tmp_path, size=MiB + 512)
    with Chain.open(setup.top, writable=True) as chain:
        with pytest.raises((ChainfsError, ValueError, OSError)):
            chain.write(setup.size - 1, b"ab")
        with pytest.raises((ChainfsError, ValueError, OSError)):
            chain.write(setup.size + 512, b"x")
        chain.write(setup.size - 1, b"z")
        setup.model.put(setup.size - 1, b"z")
    verify(setup, {})


def test_whole_disk_rewrite_unaligned_size(tmp_path: Path) -> None:
    size = 2 * MiB + 3 * 512
    setup = two_layers(tmp_path, {"cluster_size": 4 * KiB}, {}, size=size)
    before = im.file_digests(setup.paths[:-1])
    data = random.Random(7).randbytes(size)
    with Chain.open(setup.top, writable=True) as chain:
        chain.write(0, data)
    setup.model.put(0, data)
    verify(setup, before)


def refcount_table_clusters(path: str) -> int:
    return int(struct.unpack(">I", im.read_header(path)[56:60])[0])


@pytest.mark.parametrize("refcount_bits", [64, 32])
def test_refcount_blocks_and_table_grow(tmp_path: Path, refcount_bits: int) -> None:
    """512-byte clusters with wide refcounts: one refcount table cluster covers only
    64 blocks of 512 / (refcount_bits / 8) clusters, so a few MiB of writes must add
    refcount blocks and then move the refcount table."""
    size = 16 * MiB
    setup = single(tmp_path, size=size, data=False, cluster_size=512, refcount_bits=refcount_bits)
    covered = 64 * (512 * 8 // refcount_bits) * 512  # host bytes one table cluster covers
    assert refcount_table_clusters(setup.top) == 1
    rng = random.Random(refcount_bits)
    written = 0
    with Chain.open(setup.top, writable=True) as chain:
        offset = 0
        while written < covered * 3 // 2:
            # scattered 3 KiB writes at an odd phase: partial clusters, many L2 tables
            length = 3 * KiB
            data = rng.randbytes(length)
            chain.write(offset + 100, data)
            setup.model.put(offset + 100, data)
            written += length
            offset = (offset + 5 * KiB) % (size - 8 * KiB)
    assert refcount_table_clusters(setup.top) > 1, "the refcount table never grew"
    verify(setup, {})


def test_dirty_lazy_refcounts_image_is_repaired_when_opened_writable(tmp_path: Path) -> None:
    setup = two_layers(tmp_path, {}, {"lazy_refcounts": True, "cluster_size": 4 * KiB})
    writes: list[im.Write] = [(10 * KiB, 300 * KiB, 0x77), (MiB + 5, 70 * KiB, 0x78)]
    im.make_dirty(setup.top, writes)
    setup.model.apply(writes)
    assert im.check(setup.top)[0] != 0, "the killed image checks clean; nothing tested"
    before = im.file_digests(setup.paths[:-1])
    with Chain.open(setup.top, writable=True) as chain:
        assert chain.read(0, chain.size) == bytes(setup.model)
        data = random.Random(1).randbytes(9000)
        chain.write(500 * KiB - 3, data)
        setup.model.put(500 * KiB - 3, data)
    assert not im.incompatible_features(setup.top) & im.INCOMPAT_DIRTY, "dirty bit left set"
    verify(setup, before)


def test_dirty_lazy_refcounts_image_repaired_without_writes(tmp_path: Path) -> None:
    setup = single(tmp_path, lazy_refcounts=True, cluster_size=512, refcount_bits=1)
    writes: list[im.Write] = [(0, 100 * KiB, 0x41), (MiB, 3, 0x42)]
    im.make_dirty(setup.top, writes)
    setup.model.apply(writes)
    with Chain.open(setup.top, writable=True):
        pass
    assert not im.incompatible_features(setup.top) & im.INCOMPAT_DIRTY
    verify(setup, {})


def test_lazy_refcounts_image_killed_mid_write_session_by_qemu_then_written(
    tmp_path: Path,
) -> None:
    """Writes over clusters that the dirty session allocated (refcounts 0 on disk) must
    not reuse them as free space."""
    setup = single(tmp_path, data=False, lazy_refcounts=True, cluster_size=4 * KiB)
    writes: list[im.Write] = [(i * 16 * KiB, 4 * KiB, 0x50 + i) for i in range(32)]
    im.make_dirty(setup.top, writes)
    setup.model.apply(writes)
    rng = random.Random(3)
    with Chain.open(setup.top, writable=True) as chain:
        for i in range(32):
            data = rng.randbytes(4 * KiB)
            chain.write(i * 16 * KiB + 8 * KiB, data)
            setup.model.put(i * 16 * KiB + 8 * KiB, data)
    verify(setup, {})


def test_chainfs_and_qemu_take_turns(tmp_path: Path) -> None:
    """Allocations by either side respect the other's: chainfs must not cache free space
    across opens, and QEMU must find chainfs's metadata sound to extend it."""
    setup = two_layers(
        tmp_path, {"cluster_size": 4 * KiB}, {"cluster_size": 512, "refcount_bits": 1}
    )
    before = im.file_digests(setup.paths[:-1])
    rng = random.Random(5)
    for turn in range(4):
        with Chain.open(setup.top, writable=True) as chain:
            for _ in range(8):
                offset = rng.randrange(setup.size - 70 * KiB)
                data = rng.randbytes(rng.randrange(1, 70 * KiB))
                chain.write(offset, data)
                setup.model.put(offset, data)
        im.assert_clean(setup.top)
        writes: list[im.Write] = [
            (rng.randrange(setup.size - 70 * KiB), rng.randrange(1, 70 * KiB), 0x40 + turn)
            for _ in range(8)
        ]
        writes.append((rng.randrange(setup.size - 8 * KiB) // 512 * 512, 4 * KiB, None))
        im.write(setup.top, writes)
        setup.model.apply(writes)
        im.assert_clean(setup.top)
    verify(setup, before)


def test_persistent_bitmaps_are_kept_by_a_write(tmp_path: Path) -> None:
    """chainfs maintains dirty bitmaps (QCOW2.md 1.10), so it keeps the autoclear
    'bitmaps' bit: after a write the bitmap is still valid for QEMU, not in use, and the
    image clean (no leaks: nothing was dropped).  (test_bitmaps checks what it marks.)"""
    setup = single(tmp_path, cluster_size=64 * KiB)
    im.run([im.QEMU_IMG, "bitmap", "--add", setup.top, "bm0"])
    more: list[im.Write] = [(MiB, 100 * KiB, 0x44)]
    im.write(setup.top, more)  # recorded in bm0 by QEMU
    setup.model.apply(more)
    assert im.info(setup.top)["format-specific"]["data"].get("bitmaps")
    autoclear = int.from_bytes(im.read_header(setup.top)[88:96], "big")
    assert autoclear & 1
    with Chain.open(setup.top, writable=True) as chain:
        chain.write(5000, b"\x55" * 70000)
    setup.model.put(5000, b"\x55" * 70000)
    autoclear = int.from_bytes(im.read_header(setup.top)[88:96], "big")
    assert autoclear & 1, "bitmaps no longer claimed consistent after chainfs wrote"
    bitmaps = im.info(setup.top)["format-specific"]["data"].get("bitmaps")
    assert bitmaps == [{"flags": ["auto"], "name": "bm0", "granularity": 65536}]
    rc, report = im.check(setup.top)
    assert rc == 0, report
    im.assert_same_as(setup.top, bytes(setup.model), str(tmp_path))
    with Chain.open(setup.top) as chain:
        assert chain.read(0, chain.size) == bytes(setup.model)
