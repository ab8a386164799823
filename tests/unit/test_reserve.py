"""Space reserved ahead of a growing image (``HostFile.reserve``): the qcow2 driver has
the file system reserve blocks past the file's end before new clusters get there (the
kernel then writes them about a third cheaper), the file's size never shows it, a
close gives back what was not used, a file system that cannot reserve changes nothing
but the speed, and one short of free space gets no reservation at all.  No QEMU;
images from chainfs's own ``create_overlay``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from chainfs import hostfile
from chainfs.chain import Chain
from chainfs.formats.qcow2 import create_overlay

MiB = 1 << 20


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.skipif(hostfile._fallocate_fn is None, reason="no fallocate in the C library")
def test_a_growing_image_reserves_ahead_and_gives_it_back(tmp_path: Path) -> None:
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None)
    data = os.urandom(3 * MiB)
    with Chain.open(path, writable=True, lock=False) as chain:
        chain.write(0, data)
        size = os.stat(path).st_size
        assert size < 4 * MiB  # the reservation does not show in the size...
        assert allocated(path) >= size + hostfile.RESERVE_BYTES // 2  # ...but is there
        chain.flush()
    # closed: only what the file holds stays allocated
    assert allocated(path) <= os.stat(path).st_size + 64 * 1024
    with Chain.open(path, lock=False) as chain:
        assert chain.read(0, len(data)) == data


def test_reserving_goes_ahead_by_whole_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []

    def record(fd: int, mode: int, offset: int, length: int) -> int:
        assert mode == hostfile.FALLOC_FL_KEEP_SIZE
        calls.append((offset, length))
        return 0

    monkeypatch.setattr(hostfile, "_fallocate_fn", record)
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=256 * MiB, backing=None, backing_format=None)
    with Chain.open(path, writable=True, lock=False) as chain:
        for i in range(40):
            chain.write(i * MiB, os.urandom(MiB))
        end = os.stat(path).st_size
    step = hostfile.RESERVE_BYTES
    # one call per step of growth, each reaching at least a step past the writes
    assert 40 * MiB // step <= len(calls) <= 40 * MiB // step + 2
    for (a, n), (b, _) in itertools.pairwise(calls):
        assert a + n == b  # contiguous: nothing reserved twice, nothing left out
    assert calls[-1][0] + calls[-1][1] >= end


def test_a_file_system_that_cannot_reserve_changes_nothing_but_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(offset)
        return -1  # EOPNOTSUPP, ENOSPC ...

    monkeypatch.setattr(hostfile, "_fallocate_fn", refuse)
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None)
    data = os.urandom(20 * MiB)
    with Chain.open(path, writable=True, lock=False) as chain:
        for i in range(20):
            chain.write(i * MiB, data[i * MiB : (i + 1) * MiB])
        chain.flush()
    assert len(calls) == 1  # refused once: not asked again for every write
    with Chain.open(path, lock=False) as chain:
        assert chain.read(0, len(data)) == data


def test_a_file_system_short_of_space_gets_no_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def record(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(offset)
        return 0

    monkeypatch.setattr(hostfile, "_fallocate_fn", record)
    free = os.statvfs(tmp_path)
    monkeypatch.setattr(hostfile, "RESERVE_MIN_FREE", free.f_bavail * free.f_frsize + (1 << 40))
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None)
    with Chain.open(path, writable=True, lock=False) as chain:
        for i in range(20):
            chain.write(i * MiB, os.urandom(MiB))
    assert calls == []
