"""Early write-back: the qcow2 driver has the kernel start writing new data clusters out
every ``WRITEBACK_BYTES`` (``HostFile.start_writeback``), so that a flush after a burst
of writes does not find all of it still to do.  Recorded here instead of issued: the
ranges must cover the new clusters, in order, without gaps, and the data must be what
was written.  No QEMU; images from chainfs's own ``create_overlay``.
"""

from __future__ import annotations

import itertools
import os
import threading
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
        chain.flush()  # (waits for the write-back thread)
        assert len(kicks) == 20 // (driver.WRITEBACK_BYTES // MiB)
        assert all(n >= driver.WRITEBACK_BYTES for _, n in kicks)
        for (a, n), (b, _) in itertools.pairwise(kicks):
            assert a + n == b  # one range after the other, nothing left out
        # the first range starts at the first data cluster, and nothing is kicked twice
        first_host = chain.active.extents(0, 1)[0].host
        assert kicks[0][0] == first_host
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


def test_the_kernel_is_asked_on_a_thread_of_its_own(
    tmp_path: Path, kicks: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving thread does not wait in ``sync_file_range`` (for the disk's queue, ms
    at a time): the call is made by the write-back thread, and ``close`` waits for it,
    so the descriptor it names is never closed (and its number reused) under it."""
    threads: list[int] = []
    entered, release = threading.Event(), threading.Event()
    fds_open: list[bool] = []

    me = threading.get_ident()

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        threads.append(threading.get_ident())
        entered.set()
        if threading.get_ident() != me:  # (on the caller's, it would wait for itself)
            release.wait()
        try:
            os.fstat(fd)
            fds_open.append(True)
        except OSError:
            fds_open.append(False)
        return 0

    monkeypatch.setattr(hostfile, "_start_writeback", record)
    path = str(tmp_path / "f")
    f = hostfile.HostFile(path, True, create=True)
    f.pwrite(b"x" * MiB, 0)
    f.start_writeback(0, MiB)  # returns with the call not done
    assert entered.wait(timeout=60)
    closer = threading.Thread(target=f.close)
    closer.start()
    closer.join(timeout=0.5)  # (a close that did not wait would have closed by now)
    release.set()
    closer.join()
    assert threads and threading.get_ident() not in threads
    assert fds_open == [True]
    assert f.fd == -1
