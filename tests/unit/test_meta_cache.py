"""The mount's metadata cache (``formats/qcow2/cache.py``): one byte budget for the clean
metadata of every layer, whatever the disks' sizes or the number of chains.

- the cache itself: LRU eviction within the budget, ``take`` and ``forget``, an entry
  larger than the whole budget not kept;
- an idle layer holds no table: a read-only layer opens with no L1 table, no L2 table
  and no refcount state, and a job that reopens it writable gets them; a writable one
  keeps its refcount table only up to the last entry in use and no refcount block;
- clean and dirty tables under a tiny budget and a tiny dirty limit: writes over many
  L2 tables and many refcount blocks, clean ones evicted and read again, dirty ones
  written back early, and the image stays right (chainfs's own check, the content);
- a budget smaller than one table: nothing is kept, everything still reads right;
- no stale metadata: a layer rewritten through another open is read afresh.

No QEMU; images from ``create_overlay``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.formats.qcow2 import Qcow2Layer, cache, create_overlay
from chainfs.formats.qcow2.cache import ENTRY_OVERHEAD, MetaCache
from chainfs.formats.qcow2.check import check_image
from chainfs.hostfile import HostFile

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def _clean(path: str) -> None:
    f = HostFile(path, writable=False)
    try:
        result = check_image(f, path)
    finally:
        f.close()
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0), result.messages


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch) -> MetaCache:
    """A process cache of 3 tables' worth of 64 KiB clusters."""
    c = MetaCache(3 * (64 * KiB + ENTRY_OVERHEAD))
    monkeypatch.setattr(cache, "CACHE", c)
    return c


def test_lru_within_the_budget() -> None:
    c = MetaCache(3 * (100 + ENTRY_OVERHEAD))
    for i in range(3):
        c.put((1, 0, i), bytes(100))
    assert c.get((1, 0, 0)) is not None  # now the most recent
    c.put((2, 0, 9), bytes(100))
    assert c.get((1, 0, 1)) is None  # the least recently used went
    assert c.get((1, 0, 0)) is not None and c.get((2, 0, 9)) is not None
    assert c.used == 3 * (100 + ENTRY_OVERHEAD) <= c.budget
    assert c.take((1, 0, 0)) == bytes(100) and c.get((1, 0, 0)) is None
    c.forget(1)
    assert len(c) == 1 and c.held(2) == 100 + ENTRY_OVERHEAD
    c.put((3, 0, 0), bytes(c.budget))  # larger than everything: not kept
    assert c.get((3, 0, 0)) is None and len(c) == 1
    c.resize(0)
    assert len(c) == 0 and c.used == 0


def test_parse_size() -> None:
    assert cache.parse_size("32M") == 32 * MiB
    assert cache.parse_size("64MiB") == 64 * MiB
    assert cache.parse_size("1g") == GiB
    assert cache.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        cache.parse_size("lots")


def test_read_only_layer_opens_with_no_tables_until_a_job_needs_them(
    tmp_path: Path, small_cache: MetaCache
) -> None:
    base, top = str(tmp_path / "B.qcow2"), str(tmp_path / "T.qcow2")
    size = 16 * TiB  # an L1 table of 256 KiB
    create_overlay(base, size=size, backing=None, backing_format=None)
    with Chain.open(base, writable=True, lock=False) as chain:
        chain.write(5 * TiB, b"\x11" * (64 * KiB))
    create_overlay(top, size=size, backing=base, backing_format="qcow2")
    with Chain.open(top, writable=True, lock=False) as chain:
        layer = chain.layers[1]
        assert isinstance(layer, Qcow2Layer) and not layer.writable
        # idle: no L1 table, no L2 table, no refcount state
        assert len(layer.l1) == 0 and layer.refs is None and not layer.l2_cache
        assert small_cache.held(layer.owner) == 0
        assert chain.read(5 * TiB, 4 * KiB) == b"\x11" * (4 * KiB)
        # what the read cached is slices (an L1 slice of 64 KiB, an L2 slice of 4 KiB
        # and markers for the table's all-zero ones), not the L1 table of 256 KiB
        assert 0 < small_cache.held(layer.owner) < 80 * KiB
        # a job (commit, stream) takes the layer read-write: now it has refcounts
        new = chain.reopen(1, writable=True)
        assert isinstance(new, Qcow2Layer) and new.refs is not None
        new.write(7 * TiB, b"\x22" * (64 * KiB), lambda o, n: bytes(n))
        new.flush()
        assert small_cache.held(layer.owner) == 0  # the old open's entries went with it
        chain.reopen(1, writable=False)
        assert chain.read(7 * TiB, 4 * KiB) == b"\x22" * (4 * KiB)  # not stale
        assert chain.read(5 * TiB, 4 * KiB) == b"\x11" * (4 * KiB)
    _clean(base)


def test_idle_writable_layer_keeps_no_refcount_block_nor_whole_table(
    tmp_path: Path, small_cache: MetaCache
) -> None:
    path = str(tmp_path / "E.qcow2")
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None)
    with Chain.open(path, writable=True, lock=False) as chain:
        layer = chain.layers[0]
        assert isinstance(layer, Qcow2Layer) and layer.refs is not None
        # one block in use: the table's one entry, not its whole cluster
        assert len(layer.refs.table) == 8 and not layer.refs.cache
        chain.write(0, b"\x33" * (128 * KiB))
        chain.flush()
        # written back: nothing pinned, everything clean in the shared cache
        assert not layer.refs.cache and not layer.l2_cache
        assert small_cache.used <= small_cache.budget
    _clean(path)


@pytest.mark.parametrize("budget", [3 * (64 * KiB + ENTRY_OVERHEAD), 1 * KiB])
def test_clean_and_dirty_tables_under_a_small_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """Budget of 3 tables, then one smaller than a single table (nothing kept); at most
    4 dirty tables before a write-back: 12 L2 tables written, read back, reopened."""
    c = MetaCache(budget)
    monkeypatch.setattr(cache, "CACHE", c)
    path = str(tmp_path / "E.qcow2")
    # 4 KiB clusters: an L2 table maps 2 MiB, a refcount block counts 8 MiB
    cs = 4 * KiB
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None, cluster_size=cs)
    offsets = [t * 2 * MiB + 3 * cs for t in range(12)] + [5 * MiB, 40 * MiB]
    with Chain.open(path, writable=True, lock=False) as chain:
        layer = chain.layers[0]
        assert isinstance(layer, Qcow2Layer)
        layer.l2_cache_tables = 4
        for k, off in enumerate(offsets):
            chain.write(off, bytes([k + 1]) * (2 * cs))
            assert len(layer.l2_cache) <= 4  # dirty tables are written back early
        # the tables evicted clean are read again from the file, right
        for k, off in enumerate(offsets):
            assert chain.read(off, 2 * cs) == bytes([k + 1]) * (2 * cs)
        chain.discard(offsets[0], 2 * cs)
        chain.flush()
        assert not layer.l2_cache and not layer.l2_dirty and not layer.refs.cache  # type: ignore[union-attr]
        assert c.used <= c.budget
        if budget < cs:  # nothing as large as a table or a block was kept
            assert all(len(p) < cs for p in c._lru.values())
    assert c.used == 0  # the closed layer's entries went with it
    _clean(path)
    with Chain.open(path, writable=False, lock=False) as chain:
        assert chain.read(offsets[0], 2 * cs) == bytes(2 * cs)
        for k, off in enumerate(offsets[1:], 1):
            assert chain.read(off, 2 * cs) == bytes([k + 1]) * (2 * cs)
