"""Compressed clusters written by chainfs (``Qcow2Layer.write_compressed``, the writer of
``backup compress=on``) as QEMU writes them: ``qemu-img check`` clean, ``qemu-io`` reads
every cluster back, ``qemu-img check`` counts them as compressed and ``qemu-img map``
shows them without a host offset (QEMU gives none for compressed data).

Covered: clusters that compress well (packed several to a host cluster), one that does
not compress (random data: written as an ordinary cluster), a short last cluster of a
disk whose size is not a multiple of the cluster size, a cluster already allocated
(written in place, uncompressed, as QEMU does), cluster sizes 4 KiB, 64 KiB and 2 MiB,
a compressed cluster rewritten later by an ordinary write (its reference dropped, no
leak), and a chain: a compressed cluster in an overlay over a backing file.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.formats import open_file
from chainfs.formats.qcow2 import Qcow2Layer, create_image

from . import images as im

KiB, MiB = im.KiB, im.MiB


def _zeros(offset: int, length: int) -> bytes:
    return bytes(length)


def pattern(n: int, seed: int) -> bytes:
    """Data that compresses: a short random phrase repeated."""
    phrase = random.Random(seed).randbytes(61)
    return (phrase * (n // len(phrase) + 1))[:n]


def compressed_count(path: Path) -> int:
    out = im.run([im.QEMU_IMG, "check", "--output=json", str(path)]).stdout
    return int(json.loads(out).get("compressed-clusters", 0))


def mapped(path: Path) -> list[dict[str, object]]:
    out = im.run([im.QEMU_IMG, "map", "--output=json", str(path)]).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


@pytest.mark.parametrize("cs", [4 * KiB, 64 * KiB, 2 * MiB])
def test_compressed_clusters_read_back_by_qemu(tmp_path: Path, cs: int) -> None:
    size = 12 * cs + 3 * 512  # ends inside a cluster
    path = tmp_path / "c.qcow2"
    layer = open_file(
        create_image(str(path), size=size, backing=None, backing_format=None, cluster_size=cs),
        "qcow2",
    )
    assert isinstance(layer, Qcow2Layer)
    model = bytearray(size)
    wrote: dict[int, bool] = {}
    try:
        for c in (0, 1, 2, 5, 6):
            data = pattern(cs, c)
            wrote[c] = layer.write_compressed(c * cs, data, _zeros)
            model[c * cs : (c + 1) * cs] = data
        noise = os.urandom(cs)  # does not compress: written as an ordinary cluster
        wrote[3] = layer.write_compressed(3 * cs, noise, _zeros)
        model[3 * cs : 4 * cs] = noise
        layer.write(7 * cs, b"x" * 512, _zeros)  # allocated: written in place
        model[7 * cs : 7 * cs + 512] = b"x" * 512
        wrote[7] = layer.write_compressed(7 * cs, pattern(cs, 7), _zeros)
        model[7 * cs : 8 * cs] = pattern(cs, 7)
        tail = pattern(size - 12 * cs, 12)  # the short last cluster
        wrote[12] = layer.write_compressed(12 * cs, tail, _zeros)
        model[12 * cs :] = tail
        layer.write(5 * cs + 100, b"y" * 1000, _zeros)  # over a compressed cluster
        model[5 * cs + 100 : 5 * cs + 1100] = b"y" * 1000
    finally:
        layer.close()
    assert wrote == {0: True, 1: True, 2: True, 5: True, 6: True, 3: False, 7: False, 12: True}
    im.assert_clean(str(path))  # no leak, no corruption
    assert compressed_count(path) == 5  # 0, 1, 2, 6, 12 (5 was rewritten)
    im.assert_same_as(str(path), bytes(model), str(tmp_path))
    for c in (0, 6):
        out = im.qemu_io(str(path), [f"read -P 0x{model[c * cs]:02x} {c * cs} 1"])
        assert "read 1/1" in out
    offsets = {int(str(e["start"])) // cs: e.get("offset") for e in mapped(path) if e["data"]}
    assert offsets[0] is None and offsets[3] is not None  # compressed: no host offset
    if cs < 2 * MiB:  # packed: the image is smaller than the clusters written
        assert os.path.getsize(path) < 8 * cs + 4 * cs


def test_compressed_cluster_in_an_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    im.create(str(base), 4 * MiB)
    im.write(str(base), [(0, 4 * MiB, 0x5A)])
    im.create(str(top), backing="base.qcow2", cwd=str(tmp_path))
    with Chain.open(str(top), writable=True) as chain:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer)
        with chain.lock:
            assert layer.write_compressed(MiB, pattern(64 * KiB, 1), _zeros)
    model = bytearray(b"\x5a" * 4 * MiB)
    model[MiB : MiB + 64 * KiB] = pattern(64 * KiB, 1)
    im.assert_chain_clean([str(base), str(top)])
    assert compressed_count(top) == 1
    im.assert_same_as(str(top), bytes(model), str(tmp_path))
    with Chain.open(str(top)) as chain:  # and chainfs reads it back
        assert chain.read(0, 4 * MiB) == model
