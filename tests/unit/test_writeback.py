"""Early write-back: the qcow2 driver has the kernel start writing new data clusters out
every ``WRITEBACK_BYTES`` (``HostFile.start_writeback``), so that a flush after a burst
of writes does not find all of it still to do.  Recorded here instead of issued: the
ranges must cover the new clusters, in order, without gaps, and the data must be what
was written.  No QEMU; images from chainfs's own ``create_overlay``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from chainfs import hostfile
from chainfs.chain import Chain
from chainfs.formats.qcow2 import create_overlay, driver

MiB = 1 << 20


@pytest.fixture
def kicks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        assert flags == hostfile.SYNC_FILE_RANGE_WRITE
        calls.append((offset, length))
        return 0

    monkeypatch.setattr(hostfile, "_start_writeback", record)
    return calls


def test_new_clusters_are_handed_to_write_back_in_order(
    tmp_path: Path, kicks: list[tuple[int, int]]
) -> None:
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=64 * MiB, backing=None, backing_format=None)
    data = [os.urandom(MiB) for _ in range(20)]
    with Chain.open(path, writable=True, lock=False) as chain:
        for i, piece in enumerate(data):
            chain.write(i * MiB, piece)
        assert len(kicks) == 20 // (driver.WRITEBACK_BYTES // MiB)
        assert all(n >= driver.WRITEBACK_BYTES for _, n in kicks)
        for (a, n), (b, _) in itertools.pairwise(kicks):
            assert a + n == b  # one range after the other, nothing left out
        # the first range starts at the first data cluster, and nothing is kicked twice
        first_host = chain.active.extents(0, 1)[0].host
        assert kicks[0][0] == first_host
        chain.flush()
    with Chain.open(path, lock=False) as chain:
        assert chain.read(0, 20 * MiB) == b"".join(data)


def test_overwrites_in_place_start_nothing(tmp_path: Path, kicks: list[tuple[int, int]]) -> None:
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=16 * MiB, backing=None, backing_format=None)
    with Chain.open(path, writable=True, lock=False) as chain:
        chain.write(0, bytes([1]) * MiB)
        for _ in range(3 * driver.WRITEBACK_BYTES // MiB):
            chain.write(0, os.urandom(MiB))
    assert kicks == []


def test_a_read_only_file_is_left_alone(tmp_path: Path, kicks: list[tuple[int, int]]) -> None:
    path = str(tmp_path / "top.qcow2")
    create_overlay(path, size=MiB, backing=None, backing_format=None)
    f = hostfile.HostFile(path, False)
    try:
        f.start_writeback(0, MiB)
    finally:
        f.close()
    assert kicks == []
