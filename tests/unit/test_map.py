"""The "who holds it" map, judged by plain models (no QEMU; see interop/test_map.py).

Chains of random depth are built with chainfs's own ``create_overlay`` and writes (data
and zeros, copy-on-write through the chain, layers shorter and longer than their backing
files, sometimes a raw base), mirrored in a bytearray.  Then every layer's
``allocation_map`` must agree granule by granule with what its ``extents`` say, and the
chain must read the model back, read-only and while being written — with the real region
and L2-slice sizes and with tiny ones, so that region, table and slice boundaries fall
everywhere in small images.
"""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain
from chainfs.formats.base import UNALLOCATED, Layer
from chainfs.formats.qcow2 import create_overlay

from .map_geometry import GEOMETRIES, geometry

KiB = 1024
MiB = 1024 * KiB
CLUSTERS = [512, 1024, 4 * KiB, 64 * KiB]
SIZES = [MiB, MiB + 1536, 700 * KiB, 2 * MiB - 512]


def expected_lanes(layer: Layer, start: int, count: int, granule: int) -> list[int]:
    """What ``allocation_map`` must answer, from the layer's ``extents``."""
    out = [0] * count
    for e in layer.extents(start, count * granule):
        if e.kind != UNALLOCATED:
            first = (e.offset - start) // granule
            last = -(-(e.offset + e.length - start) // granule)
            out[first:last] = [1] * (last - first)
    # a granule reaching past the layer's end answers for itself (zeros past the end)
    full = max(0, (layer.virtual_size - start) // granule)
    out[full:] = [1] * max(0, count - full)
    return out


def check_maps(chain: Chain, rng: random.Random) -> None:
    g = chain.granule
    whole = -(-chain.size // g)
    for layer in chain.layers:
        windows = [(0, whole)]
        for _ in range(4):
            count = rng.randrange(1, whole + 1)
            windows.append((rng.randrange(whole) * g, count))
        for start, count in windows:
            got = list(layer.allocation_map(start, count, g).to_bytes(count, "little"))
            want = expected_lanes(layer, start, count, g)
            assert got == want, (
                f"{layer.path} ({layer.cluster_size}-byte clusters, granule {g}): "
                f"map of {count} granules from {start} differs at granule "
                f"{next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)}"
            )


def random_window(rng: random.Random, size: int) -> tuple[int, int]:
    offset = rng.choice([rng.randrange(size), rng.randrange(size // 512) * 512])
    length = rng.choice([rng.randrange(1, 5000), rng.randrange(1, 300 * KiB)])
    return offset, length


def check_reads(chain: Chain, model: bytearray, rng: random.Random, count: int = 12) -> None:
    assert chain.read(0, chain.size) == model
    for _ in range(count):
        offset, length = random_window(rng, len(model))
        assert chain.read(offset, length) == model[offset : offset + length], (offset, length)


def write_some(top: str, model: bytearray, rng: random.Random, count: int) -> None:
    """Random data and zero writes through chainfs, each followed by a read of its area."""
    with Chain.open(top, writable=True, lock=False) as chain:
        size = len(model)
        for _ in range(count):
            cluster = rng.choice(CLUSTERS)
            offset = min(
                size - 1,
                rng.choice([rng.randrange(size), rng.randrange(size // cluster) * cluster]),
            )
            length = min(
                size - offset, rng.choice([rng.randrange(1, 3 * cluster), cluster, 3 * cluster])
            )
            if rng.random() < 0.3:
                chain.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                chain.write(offset, data)
                model[offset : offset + length] = data
            a = max(0, offset - 3000)
            b = min(size, offset + length + 3000)
            assert chain.read(a, b - a) == model[a:b]


def build_chain(d: str, rng: random.Random, depth: int) -> tuple[str, bytearray]:
    """A chain of ``depth`` layers in ``d``; returns the active path and the model."""
    size = rng.choice(SIZES)
    if rng.random() < 0.3:
        path, fmt = os.path.join(d, "L0.raw"), "raw"
        model = bytearray(size)
        for _ in range(3):
            offset, length = random_window(rng, size)
            length = min(length, size - offset)
            model[offset : offset + length] = rng.randbytes(length)
        with open(path, "wb") as f:
            f.write(model)
    else:
        path, fmt = os.path.join(d, "L0.qcow2"), "qcow2"
        create_overlay(
            path, size=size, backing=None, backing_format=None, cluster_size=rng.choice(CLUSTERS)
        )
        model = bytearray(size)
        write_some(path, model, rng, rng.randrange(0, 8))
    for i in range(1, depth):
        size = rng.choice(SIZES)
        below = os.path.basename(path)
        path = os.path.join(d, f"L{i}.qcow2")
        create_overlay(
            path, size=size, backing=below, backing_format=fmt, cluster_size=rng.choice(CLUSTERS)
        )
        fmt = "qcow2"
        # past its backing file's end an overlay reads zeros
        model = model[:size] + bytes(max(0, size - len(model)))
        write_some(path, model, rng, rng.randrange(0, 8))
    return path, model


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 7))
def test_maps_and_reads_agree_with_the_model(seed: int, depth: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="chainfs-map-") as d:
        top, model = build_chain(d, rng, depth)
        for bits, l2_slice in GEOMETRIES:
            with geometry(bits, l2_slice):
                with Chain.open(top, lock=False) as chain:
                    check_maps(chain, rng)
                    check_reads(chain, model, rng)
                    check_reads(chain, model, rng)  # again, from the cached map
                # the active layer written: its map answers from whole cached tables
                write_some(top, model, rng, 4)
                with Chain.open(top, writable=True, lock=False) as chain:
                    check_maps(chain, rng)
                    check_reads(chain, model, rng)


def test_tiny_regions_cover_a_read_across_many_of_them() -> None:
    """A read spanning dozens of regions, some cached and some not, reads the model."""
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="chainfs-map-") as d:
        top, model = build_chain(d, rng, 5)
        with geometry(2, 16), Chain.open(top, lock=False) as chain:
            for _ in range(20):
                offset, length = random_window(rng, len(model))
                assert chain.read(offset, length) == model[offset : offset + length]
            assert chain.read(0, chain.size) == model
