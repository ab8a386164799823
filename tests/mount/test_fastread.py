"""Reads pyfuse3 answers from the flat file's read map (``chainfs/fastread.py``).

Clusters of data and of zeros are read twice with O_DIRECT (the first read fills the
map, the second is answered by pyfuse3 alone); then something changes what they show or
where it lies on the host — guest writes that copy on write or allocate, discard,
stream, commit and its pivot, a snapshot opening new files after layers were closed —
and every cluster must read the model's content again: a map that was not cleared would
answer from a host cluster that moved or was freed, from a closed file descriptor whose
number was reused, or with zeros where data now is.  The server's log at unmount says
how many reads the map answered; it must be many.
"""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Mount, Mounter, Seeds, first_difference, read_direct

KiB = 1024
PAGE = 4 * KiB
CLUSTER = 64 * KiB


def _clusters(content: bytes, limit: int = 48) -> list[int]:
    """Offsets of clusters whose first page holds data, and of as many that read as
    zeros (holes of the whole chain, zero clusters), mixed."""
    data: list[int] = []
    zeros: list[int] = []
    for off in range(0, len(content), CLUSTER):
        (zeros if content[off : off + PAGE].count(0) == PAGE else data).append(off)
    assert len(data) >= 8 and len(zeros) >= 8
    data = data[:: max(1, len(data) // limit)]
    zeros = zeros[:: max(1, len(zeros) // limit)][: len(data)]
    return sorted(data + zeros)


def _read_pages(img: Path, offsets: list[int]) -> dict[int, bytes]:
    """One O_DIRECT read of a page at each offset: one READ request each."""
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
    try:
        out = {}
        for off in offsets:
            assert os.preadv(fd, [buf], off) == PAGE
            out[off] = bytes(buf)
        return out
    finally:
        os.close(fd)
        buf.close()


def _check(img: Path, offsets: list[int], model: bytes | bytearray) -> None:
    for off, got in _read_pages(img, offsets).items():
        want = bytes(model[off : off + PAGE])
        assert got == want, f"at {off}: {first_difference(got, want)}"


def _write_pages(
    img: Path, offsets: list[int], model: bytearray, fill: int, flags: int = 0
) -> None:
    """One O_DIRECT write of a page at each offset (``flags``: or other flags, instead
    of O_DIRECT if they have O_DSYNC): one WRITE request each."""
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(img, os.O_WRONLY | (flags if flags & os.O_DSYNC else os.O_DIRECT | flags))
    try:
        for i, off in enumerate(offsets):
            data = bytes([(fill + i) % 255 + 1]) * PAGE
            buf[:] = data
            assert os.pwritev(fd, [buf], off) == PAGE
            model[off : off + PAGE] = data
    finally:
        os.close(fd)
        buf.close()


def _answered(m: Mount) -> int:
    """The server's count of reads pyfuse3 answered from the map (logged at unmount)."""
    found = re.findall(r"read map: (\d+) reads answered by pyfuse3", m.log_text())
    assert found, m.log_text()[-2000:]
    return int(found[-1])


def _warm(m: Mount, offsets: list[int], model: bytes | bytearray) -> None:
    """Read every page twice: the first fills the map, the second is pyfuse3's."""
    _check(m.img("E"), offsets, model)
    _check(m.img("E"), offsets, model)


def test_read_map_answers_reads(mounter: Mounter, seeds: Seeds, tmp_path: Path) -> None:
    """A read-only mount (as the benchmark's) and a read-write one: the second reads of
    data clusters and holes are answered by pyfuse3, with the right bytes."""
    seed = seeds(tmp_path / "src")
    offsets = _clusters(seed.content)
    for options in (("ro",), ()):
        m = mounter(tmp_path / "src", *options)
        _warm(m, offsets, seed.content)
        m.unmount()
        assert _answered(m) >= len(offsets)


def _write(m: Mount, offsets: list[int], model: bytearray) -> None:
    _write_pages(m.img("E"), offsets, model, 7)


def _discard(m: Mount, offsets: list[int], model: bytearray) -> None:
    for off in offsets[::2]:
        subprocess.run(
            ["fallocate", "-p", "-o", str(off), "-l", str(CLUSTER), str(m.img("E"))],
            check=True,
        )
        model[off : off + CLUSTER] = bytes(CLUSTER)


def _stream(m: Mount, offsets: list[int], model: bytearray) -> None:
    # every layer below E is dropped and closed; new files are opened after it
    _write_pages(m.img("E"), offsets[::3], model, 40)
    m.run_job("E", "stream", "speed=0")
    m.command("E", "snapshot", "F.qcow2")


def _commit(m: Mount, offsets: list[int], model: bytearray) -> None:
    # an active commit: E's clusters copied into D, then the pivot drops E and reopens D
    _write_pages(m.img("E"), offsets[::3], model, 80)
    m.run_job("E", "commit", "base=D.qcow2")
    m.command("E", "snapshot", "F.qcow2")


def _commit_below(m: Mount, offsets: list[int], model: bytearray) -> None:
    # an intermediate commit: C and D into B (rewriting B's clusters), C and D dropped
    m.run_job("E", "commit", "top=D.qcow2 base=B.qcow2")
    m.command("E", "snapshot", "F.qcow2")
    _write_pages(m.img("E"), offsets[1::4], model, 120)


@pytest.mark.parametrize(
    "change",
    [_write, _discard, _stream, _commit, _commit_below],
    ids=["write", "discard", "stream", "commit", "commit-intermediate"],
)
def test_read_after_change(
    mounter: Mounter,
    seeds: Seeds,
    tmp_path: Path,
    change: Callable[[Mount, list[int], bytearray], None],
) -> None:
    seed = seeds(tmp_path / "src")
    model = bytearray(seed.content)
    offsets = _clusters(seed.content)
    m = mounter(tmp_path / "src")
    _warm(m, offsets, model)
    change(m, offsets, model)
    _check(m.img("E"), offsets, model)  # the map was cleared where it had to be
    _warm(m, offsets, model)  # and is filled again, with the new places
    for off in offsets:  # whole clusters, past the first page
        got = read_direct(m.img("E"), off, CLUSTER)
        assert got == bytes(model[off : off + CLUSTER]), off
    m.unmount()
    assert _answered(m) >= len(offsets)


def test_job_runs_while_reads_stream(mounter: Mounter, seeds: Seeds, tmp_path: Path) -> None:
    """One O_DIRECT read in flight at a time, the next sent as soon as the last is
    answered (the server keeps asking the kernel for it instead of sleeping: pyfuse3's
    busy_poll): a stream job, the control files and the events still get their turns,
    and every read has the right bytes."""
    seed = seeds(tmp_path / "src")
    offsets = _clusters(seed.content)
    m = mounter(tmp_path / "src")
    _warm(m, offsets, seed.content)
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        buf = mmap.mmap(-1, PAGE)
        fd = os.open(m.img("E"), os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set():
                for off in offsets:
                    assert os.preadv(fd, [buf], off) == PAGE
                    assert bytes(buf) == seed.content[off : off + PAGE], off
                    reads.append(off)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(fd)
            buf.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        m.run_job("E", "stream", "base=B.qcow2 speed=0")
        during = len(reads)
        m.run_job("E", "stream", "speed=0")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert 0 < during < len(reads)
    assert m.layers("E") == ["E.qcow2"]
    _check(m.img("E"), offsets, seed.content)
    m.unmount()
    assert _answered(m) >= len(offsets)
