"""The work a guest write costs on its two common paths (issue 17), counted, not timed.

An overwrite of a cluster the active layer holds is one host write and nothing else:
no allocation, no copy-on-write, no change to the map of who holds what.  A write into
a cluster the active layer does not hold copies the rest of the cluster from the one
layer the map names as holding it, without asking the layers in between; where nothing
below shows data and the new cluster lies past the file's end, it writes its data
alone.  What they write is checked against a plain bytes model (``test_map`` covers
random chains, ``interop/test_crash`` the crash states).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from chainfs.chain import Chain
from chainfs.formats.qcow2 import create_overlay
from chainfs.formats.qcow2.driver import Qcow2Layer
from chainfs.hostfile import HostFile

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB
SIZE = 4 * MiB
DEPTH = 6


@pytest.fixture
def deep_chain(tmp_path: Path) -> Iterator[tuple[str, bytearray]]:
    """``DEPTH`` layers, data in the first half of the base and in one middle layer, the
    active one empty; the active path and the disk's content."""
    model = bytearray(SIZE)
    below: str | None = None
    for i in range(DEPTH):
        path = str(tmp_path / f"L{i}.qcow2")
        create_overlay(
            path,
            size=SIZE,
            backing=below,
            backing_format=None if below is None else "qcow2",
            cluster_size=CLUSTER,
        )
        data = None
        if i == 0:
            data = (0, bytes(range(256)) * (SIZE // 512))  # the first half
        elif i == 2:
            data = (CLUSTER * 5, b"\xc2" * (3 * CLUSTER))
        if data is not None:
            with Chain.open(path, writable=True, lock=False) as chain:
                chain.write(data[0], data[1])
            model[data[0] : data[0] + len(data[1])] = data[1]
        below = os.path.basename(path)
    assert below is not None
    yield str(tmp_path / below), model


def test_overwrite_of_an_allocated_cluster_is_one_host_write(
    deep_chain: tuple[str, bytearray],
) -> None:
    top, model = deep_chain
    events: list[tuple[str, str, int, int]] = []

    def observe(event: str, path: str, offset: int, data: bytes) -> None:
        events.append((event, os.path.basename(path), offset, len(data)))

    with Chain.open(top, writable=True, lock=False) as chain:
        chain.write(7 * CLUSTER + 4 * KiB, b"\x01" * (4 * KiB))  # allocates the cluster
        model[7 * CLUSTER + 4 * KiB : 7 * CLUSTER + 8 * KiB] = b"\x01" * (4 * KiB)
        chain.flush()
        active = chain.active
        assert isinstance(active, Qcow2Layer)
        with (
            mock.patch.object(HostFile, "observer", observe),
            mock.patch.object(Qcow2Layer, "write", side_effect=AssertionError("full write")),
            mock.patch.object(chain, "claim", side_effect=AssertionError("map changed")),
        ):
            chain.write(7 * CLUSTER + 12 * KiB, b"\x02" * (4 * KiB))
        model[7 * CLUSTER + 12 * KiB : 7 * CLUSTER + 16 * KiB] = b"\x02" * (4 * KiB)
        top_name = f"L{DEPTH - 1}.qcow2"
        assert [(e, name, n) for e, name, _, n in events] == [("write", top_name, 4096)]
        assert active.refs is not None
        assert not active.l2_dirty and not active.refs.needs_write_back
        assert chain.read(0, SIZE) == model


@pytest.mark.parametrize("holder", [0, 2], ids=["base", "middle"])
def test_copy_on_write_asks_only_the_holding_layer(
    deep_chain: tuple[str, bytearray], holder: int
) -> None:
    top, model = deep_chain
    offset = (6 if holder == 2 else 20) * CLUSTER + 8 * KiB
    with Chain.open(top, writable=True, lock=False) as chain:
        assert chain.read(0, SIZE) == model  # the map is built by reads
        asked: list[int] = []
        layers = chain.layers

        def spy(index: int) -> object:
            real = layers[index].extents

            def extents(offset: int, length: int) -> object:
                asked.append(index)
                return real(offset, length)

            return extents

        patches = [mock.patch.object(layers[i], "extents", spy(i)) for i in range(1, DEPTH)]
        for p in patches:
            p.start()
        try:
            chain.write(offset, b"\x03" * (4 * KiB))
        finally:
            for p in patches:
                p.stop()
        model[offset : offset + 4 * KiB] = b"\x03" * (4 * KiB)
        # layers[] runs from the active one down: the holder L{holder} is DEPTH-1-holder
        assert asked == [DEPTH - 1 - holder]
        assert chain.read(0, SIZE) == model


@pytest.mark.parametrize("past_the_end", [True, False])
def test_write_over_zeros_writes_the_data_alone_past_the_end(
    deep_chain: tuple[str, bytearray], past_the_end: bool
) -> None:
    """Into a cluster nothing below shows data in, a partial write allocates a cluster
    and writes only its data there when the cluster lies past the file's end (it reads as
    zeros already); where the file might hold anything there (a failed write's clusters
    handed out again), the whole cluster with its zeros."""
    top, model = deep_chain
    offset = 40 * CLUSTER + 12 * KiB  # past the data of every layer
    writes: list[tuple[int, int]] = []

    def observe(event: str, path: str, offset: int, data: bytes) -> None:
        if event == "write":
            writes.append((offset, len(data)))

    with Chain.open(top, writable=True, lock=False) as chain:
        size = HostFile.size
        with (
            mock.patch.object(HostFile, "observer", observe),
            mock.patch.object(
                HostFile, "size", lambda f: size(f) if past_the_end else size(f) + 1024 * MiB
            ),
        ):
            chain.write(offset, b"\x04" * (4 * KiB))
        model[offset : offset + 4 * KiB] = b"\x04" * (4 * KiB)
        assert len(writes) == 1
        host, n = writes[0]
        assert (host % CLUSTER, n) == ((12 * KiB, 4 * KiB) if past_the_end else (0, CLUSTER))
        assert chain.read(0, SIZE) == model
        chain.flush()
    with Chain.open(top, lock=False) as chain:
        assert chain.read(0, SIZE) == model
