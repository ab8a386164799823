"""Holes and discard in the engine, judged by QEMU.

- SEEK_DATA/SEEK_HOLE (``Chain.seek_data``/``seek_hole``) against ``qemu-img map`` of the
  chain, at the granularity of the chain's granule: every granule QEMU maps as data
  (``data`` and not ``zero``) is data for chainfs, every granule QEMU maps as no data at
  all is a hole (a granule of QEMU's "data, but reads zeros" may be either), and every
  hole reads as zeros.  Random chains (``test_map``'s: depth, clusters from 512 B to
  2 MiB, v2/v3, raw bases, short layers, zero and compressed clusters, discards) and
  chosen ones: a raw base with holes, a compressed base, a short backing file.
- ``Chain.discard``: the disk reads as the model, ``qemu-img check`` is clean, ``qemu-img
  map`` shows the whole discarded clusters unallocated or zero in the active layer, and
  the active image's allocated size shrinks by at least the clusters freed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from chainfs import chain as chain_module
from chainfs.chain import Chain

from . import images as im
from .images import KiB, MiB
from .test_map import random_chain


def qemu_map(path: str) -> list[dict[str, Any]]:
    proc = im.run([im.QEMU_IMG, "map", "--output=json", "-f", im.image_format(path), path])
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def seek_table(chain: Chain) -> list[tuple[int, int]]:
    """The data extents of the disk, by SEEK_DATA and SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        a = chain.seek_data(pos)
        if a is None:
            break
        b = chain.seek_hole(a)
        assert b is not None and b > a, (pos, a, b)
        out.append((a, b))
        if b >= chain.size:
            break
        pos = b
    return out


def granules(extents: list[tuple[int, int]], g: int, count: int) -> bytearray:
    """1 per granule touched by one of ``extents``."""
    out = bytearray(count)
    for a, b in extents:
        out[a // g : -(-b // g)] = b"\x01" * (-(-b // g) - a // g)
    return out


def assert_seek_like_qemu(top: str) -> None:
    ref = im.reference(top)
    mapped = qemu_map(top)
    with Chain.open(top) as chain:
        g, size = chain.granule, chain.size
        count = -(-size // g)
        table = seek_table(chain)
        # the table is well-formed: ascending, disjoint, granule-aligned but at the end
        for (a, b), (c, _) in itertools.pairwise(table):
            assert a < b < c
        for a, b in table:
            assert a % g == 0 and (b % g == 0 or b == size), (a, b, g)
        # SEEK_DATA/SEEK_HOLE from inside a granule: the granule's own answer
        for a, b in table:
            assert chain.seek_data(a + (b - a) // 2) == a + (b - a) // 2
            assert chain.seek_hole(a + (b - a) // 2) == b
        assert chain.seek_data(size) is None and chain.seek_hole(size) is None
        assert chain.seek_hole(size - 1) == size or chain.seek_hole(size - 1) == size - 1
    ours = granules(table, g, count)
    data = granules(
        [(e["start"], e["start"] + e["length"]) for e in mapped if e["data"] and not e["zero"]],
        g,
        count,
    )
    maybe = granules(
        [(e["start"], e["start"] + e["length"]) for e in mapped if e["data"]], g, count
    )
    for i in range(count):
        if data[i]:
            assert ours[i], f"granule {i} ({i * g:#x}) is data for QEMU, a hole for chainfs"
        elif not maybe[i]:
            assert not ours[i], f"granule {i} ({i * g:#x}) is a hole for QEMU, data for chainfs"
        if not ours[i]:
            chunk = ref[i * g : (i + 1) * g]
            assert chunk == bytes(len(chunk)), f"hole granule {i} ({i * g:#x}) reads non-zero"


@pytest.mark.parametrize("seed", range(12))
def test_seek_random_chains_like_qemu_map(tmp_path: Path, seed: int) -> None:
    top, _ = random_chain(tmp_path, random.Random(1000 + seed))
    assert_seek_like_qemu(top)


@pytest.mark.parametrize("cluster", [512, 64 * KiB, 2 * MiB])
def test_seek_raw_base_with_holes(tmp_path: Path, cluster: int) -> None:
    """A sparse raw base: its holes (SEEK_HOLE on the base file) are holes of the disk."""
    size = 16 * MiB
    layers: list[dict[str, Any]] = [
        {"name": "A.raw", "fmt": "raw", "writes": [(MiB, 4 * KiB, 0x11), (9 * MiB, 3 * MiB, 0x12)]},
        {
            "name": "B.qcow2",
            "create": {"cluster_size": cluster},
            "writes": [(4 * MiB, 100 * KiB, 0x21), (10 * MiB, 2 * cluster, None)],
        },
    ]
    paths, _ = im.build_chain(str(tmp_path), layers, size=size)
    assert_seek_like_qemu(paths[-1])
    with Chain.open(paths[-1]) as chain:
        # (QEMU writes the first 4 KiB of a new raw file, to probe alignment: data)
        g = chain.granule
        assert chain.seek_data(64 * KiB) == max(64 * KiB, MiB // g * g)
        assert chain.seek_hole(MiB) == max(-(-(MiB + 4 * KiB) // g) * g, 2 * MiB if g > MiB else 0)


@pytest.mark.parametrize("cluster", [512, 64 * KiB, 2 * MiB])
def test_seek_compressed_and_zero_clusters(tmp_path: Path, cluster: int) -> None:
    """A compressed base (``qemu-img convert -c``) under zero clusters and a short layer."""
    size = 12 * MiB
    src = tmp_path / "src.qcow2"
    im.create(str(src), size, cluster_size=cluster)
    im.write(str(src), [(0, 2 * MiB, 0x31), (6 * MiB, 2 * MiB + 512, 0x32)])
    base = im.convert_compressed(str(src), str(tmp_path / "A.qcow2"), cluster_size=cluster)
    assert im.compressed_clusters(base) > 0
    mid = im.create(
        str(tmp_path / "B.qcow2"),
        7 * MiB,
        backing="A.qcow2",
        backing_fmt="qcow2",
        cwd=str(tmp_path),
        cluster_size=cluster,
    )
    im.write(mid, [(MiB, 2 * cluster, None)])
    top = im.create(
        str(tmp_path / "C.qcow2"),
        size,
        backing="B.qcow2",
        backing_fmt="qcow2",
        cwd=str(tmp_path),
        cluster_size=cluster,
    )
    im.write(top, [(9 * MiB, 8 * KiB, 0x41)])
    assert_seek_like_qemu(top)
    with Chain.open(top) as chain:
        if chain.granule > MiB:
            return
        # B ends at 7 MiB: A's data from there on to 8 MiB is masked, reads zeros
        assert chain.seek_hole(6 * MiB) == 7 * MiB
        assert chain.seek_data(7 * MiB) == 9 * MiB // chain.granule * chain.granule


def test_seek_empty_and_full(tmp_path: Path) -> None:
    top = im.create(str(tmp_path / "E.qcow2"), 4 * MiB)
    with Chain.open(top) as chain:
        assert chain.seek_data(0) is None
        assert chain.seek_hole(0) == 0
        assert chain.seek_hole(4 * MiB - 1) == 4 * MiB - 1
        assert chain.allocated() == 0
    im.write(top, [(0, 4 * MiB, 0x55)])
    with Chain.open(top) as chain:
        assert chain.seek_data(123) == 123
        assert chain.seek_hole(0) == 4 * MiB
        assert chain.allocated() == 4 * MiB


def test_a_big_disks_count_of_its_data_goes_to_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a mount counts in the background (``Chain.background``), a disk with more
    than ``INLINE_COUNT`` regions (1 TiB: 2,048) is not counted by the stat that asks:
    it answers with what the layers take on the host and the count is sent once; the
    count then gives the data; a count of a closed chain stops, one across a change
    of shape is void and asked again, not sooner than ``BACKGROUND_PAUSE`` times the
    last count's time after it began."""
    top = im.create(str(tmp_path / "E.qcow2"), 1 << 40)
    im.write(top, [(0, MiB, 0x55), ((1 << 40) - 64 * KiB, 64 * KiB, 0x66)])
    sent: list[Chain] = []
    monkeypatch.setattr(Chain, "background", sent.append, raising=False)
    with Chain.open(top, writable=True) as chain:
        assert not chain.count_is_cheap()
        estimate = chain.allocated()
        assert sent == [chain] and estimate == chain.host_estimate()
        chain.refresh_allocation(force=True)
        chain.allocated()
        assert sent == [chain]  # once until it begins
        chain.count_in_background()
        assert chain.allocated() == MiB + 64 * KiB == sum(b - a for a, b in seek_table(chain))
        # a change of shape in the middle of a count voids it: asked again
        real = chain._holders

        def reshape(region: int, level: int = 0) -> Any:
            chain._shape += 1
            return real(region, level)

        chain.write(4 * MiB, b"x" * 4096)
        chain.allocation_stale = True
        monkeypatch.setattr(chain_module, "BACKGROUND_PAUSE", 1e9)
        chain.refresh_allocation()
        assert sent == [chain]  # not again so soon after a count (BACKGROUND_PAUSE)
        monkeypatch.setattr(chain_module, "BACKGROUND_PAUSE", 0)
        chain.refresh_allocation()
        assert sent == [chain, chain]
        monkeypatch.setattr(chain, "_holders", reshape)
        chain.count_in_background()
        assert chain.allocated() == MiB + 64 * KiB and chain.allocation_stale
        monkeypatch.setattr(chain, "_holders", real)
        chain.refresh_allocation()
        chain.count_in_background()
        assert chain.allocated() == MiB + 128 * KiB  # (the write's whole granule)
    chain.count_in_background()  # closed: nothing counted, nothing read
    assert chain.allocated() == MiB + 128 * KiB


@pytest.mark.parametrize("writable", [False, True])
def test_counting_a_sparse_petabyte_disk_skips_what_no_layer_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writable: bool
) -> None:
    """A 1 PiB disk of two layers with a few writes far apart: ``count_data`` gives the
    bytes written, and builds the map only of the regions some layer's L1 table maps
    (a few), not of the 131,072 of 8 GiB the disk has (``Layer.next_mapped``)."""
    PiB, TiB = 1 << 50, 1 << 40
    base = im.create(str(tmp_path / "A.qcow2"), PiB)
    im.write(base, [(0, MiB, 0x11), (300 * TiB, 64 * KiB, 0x12), (PiB - 64 * KiB, 64 * KiB, 0x13)])
    top = im.create(
        str(tmp_path / "B.qcow2"), PiB, backing="A.qcow2", backing_fmt="qcow2", cwd=str(tmp_path)
    )
    # one over the base's first MiB (counted once), one alone in a span of its own
    im.write(top, [(512 * KiB, MiB, 0x21), (700 * TiB + 5 * MiB, 128 * KiB, 0x22)])
    built: list[int] = []
    with Chain.open(top, writable=writable) as chain:
        real = chain._holders

        def counted(region: int, level: int = 0) -> Any:
            built.append(region)
            assert len(built) <= 64, "the count walks unmapped regions"
            return real(region, level)

        monkeypatch.setattr(chain, "_holders", counted)
        assert chain.count_data() == MiB + 512 * KiB + 64 * KiB + 64 * KiB + 128 * KiB
        # each write's region, once (the base's first MiB and the top's overlap)
        assert len(built) == len(set(built)) == 4
        assert chain.count_data(1) == MiB + 128 * KiB


# -- discard ---------------------------------------------------------------------------------


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def assert_discarded_in_map(top: str, ranges: list[tuple[int, int]], cs: int) -> None:
    """Every whole cluster of the ranges is unallocated or zero in the active layer."""
    for e in qemu_map(top):
        a, b = e["start"], e["start"] + e["length"]
        for o, n in ranges:
            lo, hi = -(-o // cs) * cs, (o + n) // cs * cs
            if max(a, lo) < min(b, hi):
                assert e["zero"] or not e["data"], (e, o, n)
                assert not (e["depth"] == 0 and e["data"]), (e, o, n)


def active_data(top: str) -> int:
    """Bytes of data clusters the active layer holds, by ``qemu-img map``."""
    return sum(e["length"] for e in qemu_map(top) if e["depth"] == 0 and e["data"])


BASES = ["none", "qcow2", "raw"]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("cluster", [512, 64 * KiB, 2 * MiB])
def test_discard(tmp_path: Path, compat: str, base: str, cluster: int) -> None:
    size = 24 * MiB
    layers: list[dict[str, Any]] = []
    if base != "none":
        layers.append(
            {
                "name": "A." + base,
                "fmt": base,
                "writes": [(0, 4 * MiB, 0x11), (16 * MiB, 2 * MiB, 0x12)],
            }
        )
    layers.append(
        {
            "name": "E.qcow2",
            "create": {"cluster_size": cluster, "compat": compat},
            "writes": [(2 * MiB, 12 * MiB, 0x21), (20 * MiB, 4 * MiB - 4 * KiB, 0x22)],
        }
    )
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    top = paths[-1]
    rng = random.Random(f"{compat}{base}{cluster}")
    ranges = [
        (3 * MiB, 2 * MiB),  # over the base's data and past it
        (6 * MiB + 1000, 5 * MiB + 3000),  # partial clusters at both ends
        (13 * MiB, 2 * MiB),  # the end of the data and a hole after it
        (20 * MiB, 4 * MiB),  # up to the disk's end
        (rng.randrange(size - 1), 700),  # within a cluster, most likely
    ]
    before = allocated(top)
    held_before = active_data(top)
    with Chain.open(top, writable=True) as chain:
        for o, n in ranges:
            chain.discard(o, n)
            model.put(o, bytes(n))
        assert chain.read(0, size) == bytes(model)
        chain.refresh_allocation()
        assert chain.allocated() == sum(b - a for a, b in seek_table(chain))
    im.assert_clean(top)
    assert im.reference(top) == bytes(model)
    if compat == "1.1" or base == "none":  # v2 over data below: written zeros, as said
        assert_discarded_in_map(top, ranges, cluster)
    # the data clusters the active layer gave back (by qemu-img map, before and after),
    # less what the partial clusters' copy-on-write took anew
    freed = held_before - active_data(top) - 2 * len(ranges) * cluster
    want = freed
    if cluster < 4 * KiB:
        # the host file system gives back whole 4 KiB blocks: those holding an L2 table
        # (one per 64 data clusters of 512 B) among freed data clusters stay
        want = want * 3 // 4
    assert before - allocated(top) >= want, (before, allocated(top), freed)
    # discarding again changes nothing; writing there again works
    with Chain.open(top, writable=True) as chain:
        chain.discard(3 * MiB, 2 * MiB)
        chain.write(3 * MiB + 5, b"\x77" * 10000)
        model.put(3 * MiB + 5, b"\x77" * 10000)
        assert chain.read(0, size) == bytes(model)
    im.assert_clean(top)
    assert im.reference(top) == bytes(model)


def test_discard_unallocates_where_nothing_below(tmp_path: Path) -> None:
    """Nothing below: the clusters go back to unallocated (QEMU would leave zero
    clusters in an overlay); data below: zero clusters, which mask it."""
    size = 8 * MiB
    layers = [
        {"name": "A.qcow2", "writes": [(0, MiB, 0x11)]},
        {"name": "E.qcow2", "writes": [(0, 4 * MiB, 0x21)]},
    ]
    paths, _ = im.build_chain(str(tmp_path), layers, size=size)
    with Chain.open(paths[-1], writable=True) as chain:
        chain.discard(0, 4 * MiB)
    m = qemu_map(paths[-1])
    assert {
        (e["start"], e["length"], e["depth"], e["zero"]) for e in m if e["start"] < 4 * MiB
    } == {
        (0, MiB, 0, True),
        (MiB, 7 * MiB, 1, True),
    }


def test_discard_compressed_clusters(tmp_path: Path) -> None:
    """Compressed clusters share host clusters: each discarded one drops a reference to
    the host clusters its sectors touch (QEMU's ``qcow2_free_any_cluster``); a host
    cluster is punched only when the last one left it.  ``qemu-img check`` counts them."""
    size = 8 * MiB
    src = tmp_path / "src.qcow2"
    im.create(str(src), size)
    rng = random.Random(5)
    data = bytes(b & 0x1F for b in rng.randbytes(4 * MiB))  # compresses to a few sectors
    with open(tmp_path / "src.raw", "wb") as f:
        f.write(data + bytes(size - len(data)))
    im.run(
        [
            im.QEMU_IMG,
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            str(tmp_path / "src.raw"),
            str(tmp_path / "E.qcow2"),
        ]
    )
    top = str(tmp_path / "E.qcow2")
    assert im.compressed_clusters(top) > 0
    model = bytearray(data + bytes(size - len(data)))
    before = allocated(top)
    with Chain.open(top, writable=True) as chain:
        for o, n in [(64 * KiB, 64 * KiB), (5 * 64 * KiB + 10, 200), (MiB, 2 * MiB + 64 * KiB)]:
            chain.discard(o, n)
            model[o : o + n] = bytes(n)
        chain.flush()
        assert chain.read(0, size) == model
    im.assert_clean(top)
    assert im.reference(top) == bytes(model)
    assert allocated(top) < before


def test_zero_range_is_discard_and_write_zeroes_unchanged(tmp_path: Path) -> None:
    """``write_zeroes`` (the copy engine's) still leaves zero clusters; ``discard`` frees."""
    size = 4 * MiB
    paths, _ = im.build_chain(
        str(tmp_path), [{"name": "E.qcow2", "writes": [(0, size, 0x5)]}], size=size
    )
    with Chain.open(paths[-1], writable=True) as chain:
        chain.write_zeroes(0, MiB)
        chain.discard(2 * MiB, MiB)
    m = {e["start"]: (e["depth"], e["zero"], e["data"]) for e in qemu_map(paths[-1])}
    assert m[0] == (0, True, False)
    assert m[2 * MiB] == (0, True, False)
    im.assert_clean(paths[-1])


def test_discard_raw_active_and_a_whole_large_disk(tmp_path: Path) -> None:
    """A raw image alone: holes punched in it (sector-aligned; zeros at the edges).  A
    1 TiB overlay discarded whole (what mkfs does to a new disk) over a base with data:
    zero clusters only over the base's data, nothing allocated elsewhere."""
    raw = tmp_path / "R.raw"
    with open(raw, "wb") as f:
        f.write(b"\x33" * (8 * MiB))
    model = bytearray(b"\x33" * (8 * MiB))
    with Chain.open(str(raw), writable=True, active_format="raw") as chain:
        chain.discard(MiB + 100, 3 * MiB)
        model[MiB + 100 : 4 * MiB + 100] = bytes(3 * MiB)
        assert chain.read(0, 8 * MiB) == model
        assert chain.seek_hole(0) == MiB + chain.granule  # the first whole granule
    assert raw.read_bytes() == model
    assert allocated(str(raw)) <= 5 * MiB + 8 * KiB

    size = 1 << 40
    base = im.create(str(tmp_path / "A.qcow2"), size)
    im.write(base, [(5 << 30, MiB, 0x44)])
    top = im.create(
        str(tmp_path / "E.qcow2"), size, backing="A.qcow2", backing_fmt="qcow2", cwd=str(tmp_path)
    )
    im.write(top, [(0, MiB, 0x55), (7 << 30, MiB, 0x66)])
    with Chain.open(top, writable=True) as chain:
        chain.discard(0, size)
        assert chain.seek_data(0) is None
        assert chain.read(5 << 30, MiB) == bytes(MiB)
    im.assert_clean(top)
    m = [e for e in qemu_map(top) if e["depth"] == 0]
    assert [(e["start"], e["length"], e["zero"]) for e in m] == [(5 << 30, MiB, True)]
