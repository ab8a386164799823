"""``CopyEngine.stream_step`` on its own, as the stream job drives it, judged by QEMU.

The step picks the clusters to copy from the layers' allocation maps (big-integer lanes)
and copies each run of them in one go, so the cases here are the ones where lanes and
clusters do not line up: mixed cluster sizes either way, a virtual size that ends inside
a cluster, an intermediate layer shorter than the disk, zero clusters over data, a v2
target, a raw base, an intermediate node, and a guest write between two steps.  After
the copy the node is pointed at the base (as ``prepare`` does); ``qemu-img`` must then
read the same disk as before and find the node clean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from chainfs import engine as engine_module
from chainfs.chain import Chain
from chainfs.jobs.stream import STEP

from . import images as im
from .images import KiB, MiB


def stream(top: str, node: str, base: str | None, *, between: Any = None) -> None:
    """Stream into the layer named ``node`` from the layers above the one named ``base``
    (None: all below the node), then point the node at the base, as the stream job does;
    ``between(chain, pos)`` runs before each step (at each multiple of ``STEP`` the
    stream stops at)."""
    with Chain.open(top, writable=True) as chain:
        names = [os.path.basename(x.path) for x in chain.layers]
        n = names.index(node)
        stop = len(names) if base is None else names.index(base)
        assert stop > n
        if n > 0:
            chain.reopen(n, writable=True)
        size = chain.layers[n].virtual_size
        pos = 0
        while pos < size:
            if between is not None:
                between(chain, pos)
            # as the job does: whole steps with nothing to copy are passed over
            skip = (chain.engine.stream_next(n, stop, pos, size) - pos) // STEP * STEP
            if skip:
                pos += skip
            else:
                chain.engine.stream_step(n, stop, pos, STEP)
                pos += STEP
        target = chain.layers[n]
        target.flush()
        if base is None:
            target.set_backing(None, None)
        else:
            target.set_backing(base, chain.layers[stop].format_name)


def layer(name: str, cluster: int, pattern: int, size: int, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "create": {"cluster_size": cluster},
        "writes": im.varied_writes(size, cluster, pattern, salt=pattern),
    }
    spec.update(extra)
    return spec


def check_streamed(paths: list[str], node: int, model: im.Model, tmp_path: Path) -> None:
    """The disk reads as the model; the node (``node`` layers below the top) is clean."""
    im.assert_same_as(paths[-1], bytes(model), str(tmp_path))
    im.assert_clean(paths[-1 - node])


SIZE = 3 * MiB


@pytest.mark.parametrize(
    "clusters",
    [
        [64 * KiB, 4 * KiB, 512, 64 * KiB],  # the node's clusters span many of the others'
        [2 * MiB, 64 * KiB, 4 * KiB, 4 * KiB],  # the node's clusters are the smallest
        [4 * KiB, 2 * MiB, 512, 64 * KiB],
    ],
    ids=["big-over-small", "small-over-big", "mixed"],
)
@pytest.mark.parametrize("base", [True, False], ids=["base", "no-base"])
def test_mixed_cluster_sizes(tmp_path: Path, clusters: list[int], base: bool) -> None:
    layers = [layer(f"L{i}.qcow2", c, 0x11 * (i + 1), SIZE) for i, c in enumerate(clusters)]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "L3.qcow2", "L0.qcow2" if base else None)
    check_streamed(paths, 0, model, tmp_path)
    if base:
        assert im.info(paths[-1])["backing-filename"] == "L0.qcow2"
    else:
        assert "backing-filename" not in im.info(paths[-1])


@pytest.mark.parametrize("granules", [3, 1000])
def test_held_windows_smaller_than_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, granules: int
) -> None:
    # the "held between" lanes are cached by window; tiny windows make every step
    # span several of them, and 3 granules leave a window a fraction of a cluster
    monkeypatch.setattr(engine_module, "HELD_GRANULES", granules)
    clusters = [64 * KiB, 4 * KiB, 512, 64 * KiB]
    layers = [layer(f"L{i}.qcow2", c, 0x11 * (i + 1), SIZE) for i, c in enumerate(clusters)]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "L3.qcow2", "L0.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_lone_clusters_at_the_edges_of_steps(tmp_path: Path) -> None:
    # steps that hold nothing are passed over: the first and last clusters of a step,
    # alone, must still be copied
    c, size = 64 * KiB, 6 * STEP
    writes: list[im.Write] = [
        (STEP - c + 10, 100, 0x21),  # the last cluster of the first step
        (3 * STEP, 100, 0x22),  # the first cluster of the fourth
        (5 * STEP - 1, 1, 0x23),  # the last byte of the fifth
        (size - 1, 1, 0x24),  # the disk's last byte
    ]
    layers: list[dict[str, Any]] = [
        {"name": "A.qcow2", "writes": [(0, size, 0xAA)]},
        {"name": "B.qcow2", "writes": writes},
        {"name": "C.qcow2"},
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    stream(paths[-1], "C.qcow2", "A.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_lower_layer_holds_only_the_middle_of_a_node_cluster(tmp_path: Path) -> None:
    # B's 4 KiB clusters fill only the middle of C's 64 KiB clusters: a map lane per
    # granule that is not the cluster's first must still make the cluster count
    writes = [(64 * KiB * k + 4096 * k + 100, 300, 0x20 + k) for k in range(1, 15)]
    layers = [
        {"name": "A.qcow2", "create": {"cluster_size": 512}, "writes": [(0, SIZE, 0xAA)]},
        {"name": "B.qcow2", "create": {"cluster_size": 4 * KiB}, "writes": writes},
        {"name": "C.qcow2", "create": {"cluster_size": 64 * KiB}, "writes": [(0, 512, 0xCC)]},
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "C.qcow2", "A.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_size_ends_inside_a_cluster_held_only_between(tmp_path: Path) -> None:
    size = 2 * MiB + 3 * 512
    tail = [(size - 1000, 1000, 0x77)]
    layers = [
        {"name": "A.qcow2", "create": {"cluster_size": 64 * KiB}, "writes": [(0, 4096, 0x11)]},
        {"name": "B.qcow2", "create": {"cluster_size": 64 * KiB}, "writes": tail},
        {"name": "C.qcow2", "create": {"cluster_size": 64 * KiB}, "writes": [(4096, 512, 0x33)]},
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    stream(paths[-1], "C.qcow2", "A.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_short_layer_and_zero_clusters_between(tmp_path: Path) -> None:
    # B ends at 1 MiB: past its end it reads zeros and hides A's data there; C writes
    # zero clusters and an unaligned zero range over A's data
    layers: list[dict[str, Any]] = [
        {"name": "A.qcow2", "writes": [(0, SIZE, 0xAA)]},
        {"name": "B.qcow2", "size": 1 * MiB, "writes": [(5000, 70_000, 0xBB)]},
        {
            "name": "C.qcow2",
            "size": SIZE,
            "writes": [(1 * MiB + 64 * KiB, 128 * KiB, None), (100_000, 3000, None)],
        },
        {"name": "D.qcow2", "size": SIZE, "writes": [(2 * MiB, 4096, 0xDD)]},
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "D.qcow2", "A.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_v2_node_gets_real_zeros(tmp_path: Path) -> None:
    layers: list[dict[str, Any]] = [
        {"name": "A.qcow2", "writes": [(0, SIZE, 0xAA)]},
        {"name": "B.qcow2", "writes": [(64 * KiB, 256 * KiB, None), (1 * MiB, 5000, 0xBB)]},
        {"name": "C.qcow2", "create": {"compat": "0.10"}, "writes": [(0, 512, 0xCC)]},
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "C.qcow2", "A.qcow2")
    check_streamed(paths, 0, model, tmp_path)


def test_raw_base_full_stream(tmp_path: Path) -> None:
    layers = [
        {"name": "A.raw", "fmt": "raw", "writes": [(0, SIZE, 0xAA)]},
        layer("B.qcow2", 4 * KiB, 0xBB, SIZE),
        layer("C.qcow2", 64 * KiB, 0xCC, SIZE),
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "C.qcow2", None)
    check_streamed(paths, 0, model, tmp_path)


def test_intermediate_node(tmp_path: Path) -> None:
    # [A] <- [B] <- [C] <- [D] <- [E], stream node=D base=B  ->  [A] <- [B] <- [D] <- [E]
    layers = [layer(f"{n}.qcow2", 64 * KiB, 0x11 * (i + 1), SIZE) for i, n in enumerate("ABCDE")]
    paths, model = im.build_chain(str(tmp_path), layers, size=SIZE)
    stream(paths[-1], "D.qcow2", "B.qcow2")
    check_streamed(paths, 1, model, tmp_path)
    assert im.info(paths[3])["backing-filename"] == "B.qcow2"


def test_guest_write_between_steps_is_kept(tmp_path: Path) -> None:
    size = 4 * STEP
    layers = [layer(f"{n}.qcow2", 64 * KiB, 0x11 * (i + 1), size) for i, n in enumerate("ABC")]
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    writes = {
        STEP: (STEP * 3 + 1000, b"\xee" * 5000),  # ahead of the copy, partial clusters
        2 * STEP: (100, b"\xdd" * 200),  # behind it
    }

    def between(chain: Chain, pos: int) -> None:
        for at in [at for at in writes if at <= pos]:
            offset, data = writes.pop(at)
            chain.write(offset, data)
            model.put(offset, data)

    stream(paths[-1], "C.qcow2", "A.qcow2", between=between)
    assert not writes, "the stream ended before the writes were made"
    check_streamed(paths, 0, model, tmp_path)
