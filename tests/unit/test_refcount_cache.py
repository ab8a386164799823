"""The refcount block cache under pressure: more dirty blocks than it holds.

A block just loaded to take a change must not be evicted before the change lands in it
(it was: with every other cached block dirty, the new one was the only one ``_evict``
could drop, and the change went into a block no longer cached, lost at the next lookup:
a leak for a decrement, a corruption for an increment).  Writes and then a discard over
clusters counted in many blocks, with a shared cache of 2 blocks, must leave an image
that chainfs's own check finds clean.  No QEMU; images from ``create_overlay``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.formats.qcow2 import cache, create_overlay
from chainfs.formats.qcow2.check import check_image
from chainfs.hostfile import HostFile

KiB, MiB = 1 << 10, 1 << 20


def test_changes_across_more_blocks_than_the_cache_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "E.qcow2")
    # 512 B clusters, 16-bit refcounts: a block counts 256 clusters (128 KiB)
    create_overlay(path, size=8 * MiB, backing=None, backing_format=None, cluster_size=512)
    monkeypatch.setattr(cache, "CACHE", cache.MetaCache(2 * (512 + cache.ENTRY_OVERHEAD)))
    with Chain.open(path, writable=True, lock=False) as chain:
        chain.write(0, b"\x5a" * (2 * MiB))  # ~16 blocks of refcounts
        chain.flush()
        chain.discard(0, 2 * MiB)  # the decrements, over the same blocks
        chain.write(3 * MiB, b"\x6b" * (512 * KiB))
        assert chain.read(0, 2 * MiB) == bytes(2 * MiB)
    f = HostFile(path, writable=False)
    try:
        result = check_image(f, path)
    finally:
        f.close()
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0), result.messages
