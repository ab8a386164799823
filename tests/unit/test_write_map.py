"""Overwrites pyfuse3 answers from the flat file's read map (``fastread``, ``write-map.patch``),
kept by the chain, judged by a model.

The model map (``test_read_map.ModelMap``) also keeps pyfuse3's writable marks and their
epoch.  Random steps change the chain as in ``test_read_map``, plus what must end the
marks (a write hook, the bitmaps taken) and overwrites done the way pyfuse3 does them
(``pwrite`` to the marked host bytes, nothing else).  After every step: what a mark lets
pyfuse3 overwrite is where the active layer holds that granule unshared, on the active
layer's open file, with no write hook and every enabled bitmap's bits set for it; and
the disk reads the model (pyfuse3's overwrites included).  Flushes after pyfuse3's
overwrites alone sync the file.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain
from chainfs.disk import Disk
from chainfs.formats.qcow2.bitmaps import Bitmaps
from chainfs.formats.qcow2.create import create_overlay
from chainfs.source import Source

from .test_map import build_chain
from .test_read_map import ModelMap, _step


class ModelWriteMap(ModelMap):
    """``ModelMap`` with pyfuse3's writable marks (granule -> epoch) and write count."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 1
        self.marks: dict[int, int] = {}
        self.count = 0
        self.last_ns = 0

    def reset(self, size: int, granule: int) -> None:
        super().reset(size, granule)
        self.marks.clear()

    def set(self, offset: int, fd: int | None, host: int = 0) -> None:
        super().set(offset, fd, host)
        self.marks.pop(offset // self.granule, None)

    def set_writable(self, offset: int, fd: int, host: int) -> None:
        super().set(offset, fd, host)
        self.marks[offset // self.granule] = self.epoch

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        super().clear(offset, length)
        self.marks = {gi: e for gi, e in self.marks.items() if gi in self.extents}

    def release(self) -> None:
        super().release()
        self.marks.clear()

    def revoke_writes(self) -> None:
        self.epoch += 1

    def writes(self) -> int:
        return self.count

    def written_ns(self) -> int:
        return self.last_ns

    def writable(self) -> list[int]:
        """The granules pyfuse3 would overwrite itself now."""
        return sorted(gi for gi, e in self.marks.items() if e == self.epoch)

    def overwrite(
        self, gi: int, rng: random.Random, model: bytearray, *, zeros: bool = False
    ) -> None:
        """What pyfuse3 does for a WRITE within marked granule ``gi`` (``zeros``: a guest
        write of zeros, e.g. ``dd if=/dev/zero``)."""
        g = self.granule
        ext = self.extents[gi]
        assert ext is not None
        fd, host, _ = ext
        n = min(g, self.size - gi * g)
        a = rng.randrange(n)
        data = rng.randbytes(rng.randrange(1, n - a + 1))
        if zeros:
            data = bytes(len(data))
        assert os.pwrite(fd, data, host + a) == len(data)
        model[gi * g + a : gi * g + a + len(data)] = data
        self.count += 1
        self.last_ns += 1

    def check_marks(self, chain: Chain) -> None:
        active, g = chain.active, self.granule
        for gi in self.writable():
            assert not chain.write_hooks, "a mark while a write hook is set"
            ext = self.extents[gi]
            assert ext is not None and ext[0] == active.file.fd, gi
            assert active.in_place_host(gi * g) == ext[1], f"granule {gi} not held in place"
            bm: Bitmaps | None = getattr(active, "bitmaps", None)
            for b in bm.list if bm is not None else []:
                if b.bits is None or not b.enabled:
                    continue
                last = (min((gi + 1) * g, self.size) - 1) >> b.gran_bits
                for bit in range((gi * g) >> b.gran_bits, last + 1):
                    if bit < len(b.bits) * 8:
                        assert b.bits[bit >> 3] >> (bit & 7) & 1, f"granule {gi}: bit {bit}"


class Hook:
    def before_write(self, offset: int, length: int) -> None:
        pass

    def after_write(self, offset: int, length: int) -> None:
        pass


def _write_step(chain: Chain, model: bytearray, rng: random.Random, rm: ModelWriteMap) -> None:
    kind = rng.choice(["chain", "chain", "overwrite", "overwrite", "mark", "hook", "bitmap"])
    if kind == "chain":
        _step(chain, model, rng)
    elif kind == "overwrite" and rm.writable():
        rm.overwrite(rng.choice(rm.writable()), rng, model)
    elif kind == "mark":  # a write through chainfs, then an overwrite: in place
        g = chain.granule
        gi = rng.randrange(-(-chain.size // g))
        n = min(g, chain.size - gi * g)
        for _ in range(2):
            data = rng.randbytes(min(n, rng.choice([512, 4096, n])))
            chain.write(gi * g, data)
            model[gi * g : gi * g + len(data)] = data
    elif kind == "hook":
        if chain.write_hooks:
            chain.write_hooks.clear()
        else:
            with chain.lock:
                chain.add_write_hook(Hook())
    elif kind == "bitmap" and chain.active.format_name == "qcow2":
        with chain.lock:
            b = chain.dirty_bitmaps()
            if b.list and rng.random() < 0.5:
                b.clear(b.list[0].name)
            elif len(b.list) < 2:
                try:
                    b.add(f"b{len(b.list)}", 65536)
                except Exception:  # (a v2 image: no bitmaps)
                    pass


def _run(seed: int, depth: int) -> int:
    """Random steps on a random chain, checked after each; pyfuse3's overwrites made."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        top, model = build_chain(d, rng, depth)
        rm = ModelWriteMap()
        with Chain.open(top, writable=True, lock=False) as chain:
            model = model[: chain.size] + bytes(max(0, chain.size - len(model)))
            chain.attach_read_map(rm, writes=True)
            for _ in range(80):
                _write_step(chain, model, rng, rm)
                rm.check(model)
                rm.check_marks(chain)
            assert chain.read(0, chain.size) == model
        return rm.count


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 4))
def test_marks_only_where_an_overwrite_is_one_pwrite(seed: int, depth: int) -> None:
    _run(seed, depth)


def test_marks_are_made() -> None:
    """(The steps above do reach pyfuse3's overwrites: over fixed seeds, many.)"""
    assert sum(_run(seed, 1 + seed % 4) for seed in range(12)) >= 12


def test_marks_need_the_write_map() -> None:
    """Without ``writes`` (a pyfuse3 without write maps) nothing is marked."""
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        top, _ = build_chain(d, rng, 2)
        rm = ModelWriteMap()
        with Chain.open(top, writable=True, lock=False) as chain:
            chain.attach_read_map(rm)
            for offset in range(0, chain.size, chain.granule):
                chain.write(offset, b"x" * 512)
                chain.write(offset, b"y" * 512)
            assert not rm.writable()


def _qcow2_chain(d: str) -> str:
    path = os.path.join(d, "top.qcow2")
    create_overlay(path, size=1 << 20, backing=None, backing_format=None, cluster_size=65536)
    return path


def test_flush_after_pyfuse3_overwrites_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush after overwrites pyfuse3 alone made (counted by the map) syncs the file,
    though chainfs wrote nothing since its last flush; one with none does not."""
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: Any) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)  # (hostfile calls os.fdatasync)
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        rm = ModelWriteMap()
        model = bytearray(1 << 20)
        with Chain.open(_qcow2_chain(d), writable=True, lock=False) as chain:
            chain.attach_read_map(rm, writes=True)
            chain.write(0, b"a" * 4096)  # allocates: not marked
            chain.write(0, b"b" * 4096)  # in place: marked
            model[:4096] = b"b" * 4096
            assert rm.writable() == [0]
            chain.flush()
            fd = chain.active.file.fd
            assert synced[-1:] == [fd]
            synced.clear()
            chain.flush()
            assert synced == []  # nothing new
            rm.overwrite(0, random.Random(1), model)  # pyfuse3's
            chain.flush()
            assert synced == [fd]
            synced.clear()
            chain.flush()
            assert synced == []
            assert chain.read(0, 1 << 20) == model


@contextlib.contextmanager
def _marked(offset: int) -> Iterator[tuple[str, Chain, ModelWriteMap]]:
    """(its directory, a one-layer qcow2 chain, its write map) with the granule at
    ``offset`` marked: written, then overwritten in place."""
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        rm = ModelWriteMap()
        with Chain.open(_qcow2_chain(d), writable=True, lock=False) as chain:
            chain.attach_read_map(rm, writes=True)
            for _ in range(2):
                chain.write(offset, b"a" * 4096)
            assert rm.writable() == [offset // chain.granule]
            yield d, chain, rm


def test_revoked_by_write_hooks_and_bitmaps() -> None:
    with _marked(65536) as (_, chain, rm):
        with chain.lock:
            chain.add_write_hook(Hook())
        assert rm.writable() == []
        chain.write(65536, b"b" * 4096)  # a hook: not marked again
        assert rm.writable() == []
        chain.write_hooks.clear()
        chain.write(65536, b"c" * 4096)
        assert rm.writable() == [1]
        with chain.lock:
            chain.dirty_bitmaps().add("b", 65536)
        assert rm.writable() == []
        chain.write(65536, b"d" * 4096)  # sets the bit, then marks
        assert rm.writable() == [1]
        bm = chain.dirty_bitmaps().list[0]
        assert bm.bits is not None and bm.bits[0] & 2


def test_a_finer_bitmap_keeps_its_granules_until_all_bits_are_set() -> None:
    """A 4 KiB-granular bitmap in 64 KiB granules: an overwrite of one page sets one bit,
    as QEMU's does (not the granule's sixteen), so the granule stays chainfs's until a
    write has set them all."""
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        rm = ModelWriteMap()
        with Chain.open(_qcow2_chain(d), writable=True, lock=False) as chain:
            chain.attach_read_map(rm, writes=True)
            with chain.lock:
                chain.dirty_bitmaps().add("b4k", 4096)
            for _ in range(2):
                chain.write(65536, b"a" * 4096)
            assert rm.writable() == []
            bm = chain.dirty_bitmaps().list[0]
            assert bm.count(chain.size) == 4096
            chain.write(65536, b"b" * 65536)
            assert rm.writable() == [1]
            assert bm.count(chain.size) == 65536


@pytest.mark.expect_log(r"lost ownership of vm|ownership of vm suspended")
@pytest.mark.parametrize("how", ["fence", "suspend"])
def test_lost_ownership_ends_the_marks_before_it_waits_for_the_lock(how: str) -> None:
    """A fence (or suspension) from the heartbeat's thread while a job step holds the
    chain's lock: the marks end before ``fenced`` is set, not once the map's release gets
    the lock, so no overwrite is pyfuse3's while the guest's own writes get EIO."""
    with _marked(0) as (d, chain, rm):
        disk = Disk(
            "vm", chain, Source(d, d), allowed_dirs=[d], readonly=False, spawn=lambda fn: None
        )
        disk.owned = True
        with chain.lock:  # a job step
            t = threading.Thread(target=getattr(disk, how), args=("lease lost",))
            t.start()
            deadline = time.monotonic() + 10
            while disk.fenced is None and disk.suspended is None:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            assert rm.writable() == []  # (the release still waits for the lock)
        t.join()


@pytest.mark.parametrize("zeros", [False, True], ids=["data", "zeros"])
def test_an_overwrite_during_a_snapshots_flush_is_synced(
    monkeypatch: pytest.MonkeyPatch, zeros: bool
) -> None:
    """pyfuse3 does not take the chain's lock: its overwrite may land in the old active
    layer while ``push_overlay`` holds the lock with the GIL let go, right after that
    layer's flush.  Forced there: the overwrite is in the old layer, the disk shows it,
    and the old layer is synced after it (its close flushes: the map's count moved)."""
    events: list[tuple[str, int]] = []
    real = os.fdatasync

    def fdatasync(fd: Any) -> None:
        events.append(("sync", fd))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with tempfile.TemporaryDirectory(prefix="chainfs-writemap-") as d:
        rm = ModelWriteMap()
        model = bytearray(1 << 20)
        base = _qcow2_chain(d)
        with Chain.open(base, writable=True, lock=False) as chain:
            chain.attach_read_map(rm, writes=True)
            for data in (b"a" * 4096, b"b" * 4096):
                chain.write(0, data)
            model[:4096] = b"b" * 4096
            assert rm.writable() == [0]
            old = chain.active
            fd = old.file.fd
            flush = old.file.flush
            once: list[int] = []

            def flush_then_overwrite() -> None:
                flush()
                if not once:  # the snapshot's flush, and pyfuse3's write right after
                    once.append(1)
                    rm.overwrite(0, random.Random(3), model, zeros=zeros)
                    events.append(("pyfuse3", fd))

            monkeypatch.setattr(old.file, "flush", flush_then_overwrite)
            top = os.path.join(d, "snap.qcow2")
            create_overlay(top, size=1 << 20, backing=base, backing_format="qcow2")
            chain.push_overlay(top)
            assert ("pyfuse3", fd) in events
            assert ("sync", fd) in events[events.index(("pyfuse3", fd)) :]
            assert rm.writable() == []  # (a new map: the new layer holds nothing)
            assert chain.read(0, 1 << 20) == model
        with Chain.open(base, writable=False, lock=False) as below:
            assert below.read(0, 1 << 20) == model
