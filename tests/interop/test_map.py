"""The "who holds it" map on chains QEMU built, judged by ``qemu-img convert``.

Random chains (random depth, cluster sizes from 512 B to 2 MiB, qcow2 v2 and v3, a raw
base or not, layers shorter than the disk) get random ``qemu-io`` writes: data, ``write
-z`` (zero clusters on v3), ``discard`` and compressed clusters.  chainfs must read the
whole disk and random windows of it exactly as ``qemu-img convert -O raw`` does, with the
real region and L2-slice sizes and with tiny ones that put region, table and slice
boundaries everywhere; and a sparse chain of 64 KiB clusters larger than one L2 slice
covers checks the real sizes across several slices of a table.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from unit.map_geometry import GEOMETRIES, geometry

from chainfs.chain import Chain

from . import images as im
from .images import KiB, MiB

CLUSTERS = [512, 4 * KiB, 64 * KiB, 2 * MiB]


def random_writes(rng: random.Random, size: int, cluster: int, pattern: int) -> list[im.Write]:
    writes: list[im.Write] = []
    for _ in range(rng.randrange(2, 9)):
        unit = rng.choice([512, cluster])
        offset = rng.randrange(max(1, size // unit)) * unit + rng.choice([0, 0, rng.randrange(512)])
        length = rng.choice([rng.randrange(1, 3 * cluster), unit, 4 * unit])
        writes.append((offset, length, None if rng.random() < 0.25 else pattern))
    return im.clip(writes, size)


def random_chain(directory: Path, rng: random.Random) -> tuple[str, int]:
    """Build a random chain; return its active path and disk size."""
    size = rng.choice([4 * MiB, 6 * MiB + 1536, 9 * MiB])
    depth = rng.randrange(1, 11)
    layers: list[dict[str, Any]] = []
    for i in range(depth):
        cluster = rng.choice(CLUSTERS)
        short = i < depth - 1 and rng.random() < 0.3  # the active layer sets the size
        lsize = rng.randrange(1, size // 512) * 512 if short else size
        layer: dict[str, Any] = {
            "name": f"L{i:02d}.qcow2",
            "size": lsize,
            "create": {"cluster_size": cluster, "compat": rng.choice(["0.10", "1.1", "1.1"])},
            "writes": random_writes(rng, lsize, cluster, 1 + (i * 37) % 255),
        }
        if i == 0 and rng.random() < 0.3:
            layer.update(name="L00.raw", fmt="raw", create={})
        layers.append(layer)
    top_layer = layers[-1]
    if top_layer.get("fmt") == "raw":
        paths, _ = im.build_chain(str(directory), layers, size=size)
        return paths[-1], size
    # the active layer's writes come last, after compressed clusters (which qemu-io writes
    # only where the layer holds nothing yet) and before discards
    top_writes, top_layer["writes"] = top_layer["writes"], []
    paths, _ = im.build_chain(str(directory), layers, size=size)
    top = paths[-1]
    cluster = int(top_layer["create"]["cluster_size"])
    commands: list[str] = []
    if depth > 1 and size >= 2 * cluster and rng.random() < 0.5:
        commands.append(f"write -c -P 0xcc {(size // cluster - 2) * cluster} {cluster}")
    commands += [im.io_command(w) for w in top_writes]
    for _ in range(rng.randrange(0, 3)):
        offset = rng.randrange(size // cluster) * cluster if size >= cluster else 0
        commands.append(f"discard {offset} {min(cluster * rng.randrange(1, 4), size - offset)}")
    im.qemu_io(top, commands, fmt="qcow2")
    return top, size


def assert_reads_like_qemu(top: str, ref: bytes, rng: random.Random) -> None:
    for bits, l2_slice in GEOMETRIES:
        with geometry(bits, l2_slice), Chain.open(top) as chain:
            for _ in range(30):
                offset = rng.randrange(len(ref))
                length = rng.choice([4096, rng.randrange(1, 200 * KiB)])
                got = chain.read(offset, length)
                assert got == ref[offset : offset + length], (bits, l2_slice, offset, length)
            assert chain.read(0, chain.size) == ref, (bits, l2_slice)


@pytest.mark.parametrize("seed", range(8))
def test_random_chains_read_like_qemu(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    top, size = random_chain(tmp_path, rng)
    ref = im.reference(top)
    assert len(ref) == size
    assert_reads_like_qemu(top, ref, rng)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8, 40))
def test_more_random_chains_read_like_qemu(tmp_path: Path, seed: int) -> None:
    test_random_chains_read_like_qemu(tmp_path, seed)


def test_sparse_chain_across_l2_slices(tmp_path: Path) -> None:
    """64 KiB clusters over 80 MiB: each L2 table spans three 4 KiB slices (32 MiB each),
    written sparsely by every layer at slice edges, with zero clusters above data."""
    size = 80 * MiB
    slice_span = 32 * MiB
    layers: list[dict[str, Any]] = []
    for i in range(12):
        pattern = 0x10 + i
        edge = slice_span * (1 + i % 2)
        writes: list[im.Write] = [
            (edge - 64 * KiB * (1 + i), 64 * KiB, pattern),
            (edge + 64 * KiB * i, 100 * KiB, pattern),
            (i * 3 * MiB + 4096, 5000, pattern),
            (size - 64 * KiB * (i + 1), 64 * KiB, None if i % 3 == 2 else pattern),
        ]
        layers.append({"name": f"L{i:02d}.qcow2", "writes": writes})
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    ref = im.reference(paths[-1])
    assert ref == bytes(model)
    assert_reads_like_qemu(paths[-1], ref, random.Random(3))
