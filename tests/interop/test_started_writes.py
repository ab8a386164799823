"""Writes that return before the data landed: ``HostFile.pwrite_started`` (glibc's AIO
threads), the qcow2 driver's ``write_started``/``settle`` and ``CopyEngine.copy_step``,
which reads its next piece into one buffer while the last piece is written from the
other.

Most cases swap the AIO for a writer that is as late as can be: it writes nothing until
``wait_written`` (which the driver calls at the next write, flush or close).  A reader
that saw the new clusters too early, an entry pointing at them before they landed, or
a copy reusing a buffer still being written from shows up as wrong bytes, every time.
Verdicts: the bytes read back, ``qemu-img check`` and ``qemu-img compare``.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs import hostfile
from chainfs.chain import Chain
from chainfs.engine import COPY_PIECE, _put
from chainfs.formats.base import UNALLOCATED
from chainfs.formats.qcow2 import create_overlay
from chainfs.hostfile import HostFile, HostIOError

from . import images as im
from .conftest import Waiting

MiB = im.MiB

needs_aio = pytest.mark.skipif(hostfile._aio_calls is None, reason="no glibc AIO here")


# -- HostFile, with the real AIO ------------------------------------------------------------


@needs_aio
def test_a_started_write_lands(tmp_path: Path) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    data = bytearray(os.urandom(3 * MiB + 512))
    f.pwrite_started(data, 4096)
    f.wait_written()
    assert f.pread(len(data), 4096) == data
    # flush and close wait for a started write themselves
    f.pwrite_started(memoryview(data)[:MiB], 8 * MiB)
    f.flush()
    assert f.pread(MiB, 8 * MiB) == data[:MiB]
    f.pwrite_started(memoryview(data)[MiB:], 16 * MiB)
    f.close()
    with open(tmp_path / "f", "rb") as g:
        g.seek(16 * MiB)
        assert g.read() == data[MiB:]


@needs_aio
def test_a_failed_started_write_is_raised_once(tmp_path: Path) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    f.pwrite_started(bytearray(4096), -4096)  # the AIO thread's pwrite fails
    with pytest.raises(HostIOError) as e:
        f.wait_written()
    assert e.value.errno == errno.EINVAL and "writing" in str(e.value)
    f.wait_written()  # reported once
    f.flush()
    f.close()


def test_a_read_only_buffer_is_written_at_once(tmp_path: Path) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    f.pwrite_started(b"x" * 5000, 100)  # bytes cannot be handed to the AIO thread
    assert f._started is None
    assert f.pread(5000, 100) == b"x" * 5000
    f.close()


def test_the_observer_sees_a_started_write_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def observe(event: str, path: str, offset: int, data: bytes) -> None:
        seen.append((event, offset))
        if offset == 666:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HostFile, "observer", observe)
    f = HostFile(str(tmp_path / "f"), True, create=True)
    f.pwrite_started(bytearray(10), 0)
    f.flush()
    with pytest.raises(HostIOError):  # an injected failure is raised when it starts
        f.pwrite_started(bytearray(10), 666)
    assert seen == [("create", 0), ("write", 0), ("flush", 0), ("write", 666)]
    f.close()


# -- the qcow2 driver ---------------------------------------------------------------------


def make_chain(tmp_path: Path, size: int = 16 * MiB) -> tuple[str, str, bytes]:
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    im.create(base, size)
    im.write(base, [(0, size, 0x11)])
    im.create(top, backing="base.qcow2", cwd=str(tmp_path))
    return base, top, b"\x11" * size


def test_readers_see_a_started_write_as_landed(tmp_path: Path, late: Waiting) -> None:
    """No answer about a layer depends on whether its started write landed: a lookup
    over its clusters settles it first; a lookup elsewhere leaves it on its way."""
    _, top, old = make_chain(tmp_path)
    new = bytearray(os.urandom(3 * MiB))
    with Chain.open(top, writable=True, lock=False) as chain:
        layer = chain.active
        fill = chain.read_below
        layer.write_started(MiB, memoryview(new), lambda o, n: fill(0, o, n))
        assert late  # nothing written yet
        # a lookup beside it answers at once, the write still on its way
        assert [e.kind for e in layer.extents(5 * MiB, MiB)] == [UNALLOCATED]
        assert layer.allocation_map(4 * MiB, 16, 65536) == 0
        assert late
        chain.invalidate()  # (the layer was written behind the chain's back)
        assert chain.read(0, 5 * MiB) == old[:MiB] + new + old[4 * MiB : 5 * MiB]
        assert not late  # the read's lookup settled it
        # an allocation map over its last cluster settles it too
        layer.write_started(8 * MiB, memoryview(new), lambda o, n: fill(0, o, n))
        assert layer.allocation_map(11 * MiB - 65536, 1, 65536) == 1
        assert not late
        # and so does the next write
        layer.write_started(12 * MiB, memoryview(new[:MiB]), lambda o, n: fill(0, o, n))
        chain.write(14 * MiB, b"y" * 4096)
        assert not late
        chain.invalidate()
        assert chain.read(8 * MiB, 3 * MiB) == new
    im.assert_clean(top)
    expected = bytearray(old)
    expected[MiB : 4 * MiB] = new
    expected[8 * MiB : 11 * MiB] = new
    expected[12 * MiB : 13 * MiB] = new[:MiB]
    expected[14 * MiB : 14 * MiB + 4096] = b"y" * 4096
    im.assert_same_as(top, bytes(expected), str(tmp_path))


def failing(late: Waiting) -> Callable[[HostFile], None]:
    """A ``wait_written`` under which the write waiting in ``late`` fails (a full disk)."""

    def fail(self: HostFile) -> None:
        if late.pop(self, None) is not None:
            raise HostIOError("writing failed: No space left on device", errno.ENOSPC)

    return fail


def test_a_started_write_that_fails_points_at_nothing(
    tmp_path: Path, late: Waiting, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, top, old = make_chain(tmp_path)

    with Chain.open(top, writable=True, lock=False) as chain:
        layer = chain.active
        layer.write_started(0, memoryview(bytearray(b"z" * MiB)), lambda o, n: old[o : o + n])
        monkeypatch.setattr(HostFile, "wait_written", failing(late))
        with pytest.raises(HostIOError):
            layer.settle()
        monkeypatch.undo()
        assert chain.read(0, 2 * MiB) == old[: 2 * MiB]
        chain.write(MiB, b"w" * MiB)  # reuses the clusters taken back
    im.assert_clean(top)
    im.assert_same_as(top, old[:MiB] + b"w" * MiB + old[2 * MiB :], str(tmp_path))


def test_a_failure_a_reader_settles_waits_for_the_writer(
    tmp_path: Path, late: Waiting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest read that settles a job's failed started write is not failed by it: it
    reads the old entries (the clusters were taken back); the job's next flush fails."""
    _, top, old = make_chain(tmp_path)

    with Chain.open(top, writable=True, lock=False) as chain:
        layer = chain.active
        layer.write_started(0, memoryview(bytearray(b"z" * MiB)), lambda o, n: old[o : o + n])
        monkeypatch.setattr(HostFile, "wait_written", failing(late))
        assert [e.kind for e in layer.extents(0, MiB)] == [UNALLOCATED]
        monkeypatch.undo()
        chain.invalidate()
        assert chain.read(0, 2 * MiB) == old[: 2 * MiB]
        with pytest.raises(HostIOError):
            layer.flush()
        layer.flush()  # raised once
    im.assert_clean(top)
    im.assert_same_as(top, old, str(tmp_path))


# -- the copy engine's zero test (_put) -----------------------------------------------------


def zero_region_chain(tmp_path: Path, masked: bool) -> tuple[str, bytes]:
    """``A <- E``, 16 MiB, data everywhere but 4..6 MiB, which reads zeros: nothing holds
    it, or (``masked``) A holds data there that E's zero clusters mask."""
    base = str(tmp_path / "A.qcow2")
    top = str(tmp_path / "E.qcow2")
    size = 16 * MiB
    im.create(base, size)
    im.write(base, [(0, size if masked else 4 * MiB, 0x11)])
    im.create(top, backing="A.qcow2", cwd=str(tmp_path))
    im.write(top, [(8 * MiB, MiB, 0x22)])
    if masked:
        im.write(top, [(4 * MiB, 2 * MiB, 0)])
    return top, im.reference(top)


@pytest.mark.parametrize("masked", [False, True], ids=["hole", "zero-masked"])
@pytest.mark.parametrize("length", [4096, 65536])
@pytest.mark.parametrize("mode", ["full", "top", "commit"])
def test_zeros_over_a_started_write_are_copied(
    tmp_path: Path, late: Waiting, mode: str, length: int, masked: bool
) -> None:
    """The data loss of copy and active commit at their pivot, on the engine: the guest
    writes data where the disk reads zeros, a copy step starts writing it to the target,
    the guest writes zeros over the same bytes, the next copy step copies the zeros: the
    target must read zeros there, never the data of the started write."""
    top, expected = zero_region_chain(tmp_path, masked)
    size = len(expected)
    off = 5 * MiB + 8192
    with Chain.open(top, writable=True, lock=False) as chain:
        if mode == "commit":  # E into A, active
            target = chain.reopen(1, writable=True)
            stop, below = 1, 1
        else:
            dest = str(tmp_path / "X.qcow2")
            backing = None if mode == "full" else "A.qcow2"
            create_overlay(
                dest, size=size, backing=backing, backing_format="qcow2" if backing else None
            )
            target = chain.open_layer(dest, "qcow2", writable=True)
            stop, below = (2, 1) if mode == "full" else (1, 0)
        chain.engine.copy_step(target, 0, stop, below, 0, size)  # the first pass
        target.flush()
        chain.write(off, b"\xaa" * length)
        chain.engine.copy_step(target, 0, stop, below, off - off % 65536, 65536)
        assert late  # the data is on its way to the target
        chain.write(off, bytes(length))
        chain.engine.copy_step(target, 0, stop, below, off - off % 65536, 65536)
        target.flush()
        assert not late
        dest_path = target.path
        if mode != "commit":
            target.close()
        assert chain.read(0, size) == expected
    im.assert_clean(dest_path)
    if mode == "full":
        im.assert_same_as(dest_path, expected, str(tmp_path))
    elif mode == "commit":
        assert im.reference(dest_path)[off : off + length] == bytes(length)
    else:  # the target over the active layer's backing shows the disk
        im.assert_same_as(dest_path, expected, str(tmp_path))


def test_put_zeros_after_data_into_one_cluster(tmp_path: Path, late: Waiting) -> None:
    """``_put`` itself: data started into a cluster of a fresh target, then a piece of
    zeros over the same cluster, then a flush: the zeros win."""
    dest = str(tmp_path / "X.qcow2")
    create_overlay(dest, size=4 * MiB, backing=None, backing_format=None)
    with Chain.open(dest, writable=True, lock=False) as chain:
        target = chain.active
        buf = bytearray(b"\xaa" * 65536)
        assert _put(target, MiB, buf, memoryview(buf), zero_fill_below)
        assert late
        zeros = bytearray(65536)
        assert not _put(target, MiB, zeros, memoryview(zeros), zero_fill_below)
        target.flush()
        assert not late
        assert chain.read(MiB, 65536) == bytes(65536)
    im.assert_clean(dest)
    im.assert_same_as(dest, bytes(4 * MiB), str(tmp_path))


def zero_fill_below(offset: int, length: int) -> bytes:
    return bytes(length)


# -- copy_step's two buffers --------------------------------------------------------------


def piece_pattern(rng: random.Random, size: int) -> list[bool]:
    """Which COPY_PIECE-sized pieces hold data: data, zeros, data, ... mixed at random,
    with a run of zero pieces right after a data piece (the case that must not reuse
    the buffer still being written)."""
    n = size // COPY_PIECE
    holds = [rng.random() < 0.6 for _ in range(n)]
    holds[:4] = [True, False, False, True]
    return holds


@pytest.mark.parametrize("mode", ["commit", "copy"])
@pytest.mark.parametrize("seed", [1, 2])
def test_copy_step_never_reuses_a_buffer_being_written(
    tmp_path: Path, late: Waiting, mode: str, seed: int
) -> None:
    size = 12 * COPY_PIECE
    rng = random.Random(seed)
    base = str(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    im.create(base, size)
    im.create(mid, backing="base.qcow2", cwd=str(tmp_path))
    im.create(top, backing="mid.qcow2", cwd=str(tmp_path))
    writes: list[im.Write] = []
    for i, holds in enumerate(piece_pattern(rng, size)):
        # zero pieces are written as zeros (allocated, reading zero): copied as nothing
        writes.append((i * COPY_PIECE, COPY_PIECE, 0x40 + i if holds else 0))
    im.write(mid, writes)
    expected = im.reference(top)
    with Chain.open(top, writable=True, lock=False) as chain:
        if mode == "commit":  # mid into base
            target = chain.reopen(2, writable=True)
            top_i, stop, below = 1, 2, 2
        else:  # the whole disk into a new image
            dest = str(tmp_path / "dest.qcow2")
            create_overlay(dest, size=size, backing=None, backing_format=None)
            target = chain.open_layer(dest, "qcow2", writable=True)
            top_i, stop, below = 0, 3, 2
        pos = 0
        step = MiB * rng.choice([1, 3, 8])  # steps shorter and longer than a piece
        while pos < size:
            chain.engine.copy_step(target, top_i, stop, below, pos, min(step, size - pos))
            pos += step
        target.flush()
        if mode == "copy":
            target.close()
    checked = base if mode == "commit" else str(tmp_path / "dest.qcow2")
    im.assert_clean(checked)
    im.assert_same_as(checked, expected, str(tmp_path))
