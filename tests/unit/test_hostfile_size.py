"""A writable ``HostFile`` keeps its size from its own writes instead of an ``fstat``
per question (a write into a fresh cluster asks whether the cluster lies past the
file's end, issue 17): the size it gives must be the file's after every kind of write,
and asked of the kernel again wherever a write may have changed it by an unknown amount
(a failed or started write, a truncation).  A read-only file is always asked."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from unittest import mock

import pytest

from chainfs.errors import ChainfsError
from chainfs.hostfile import HostFile


@pytest.fixture
def fstats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fstat

    def counted(fd: int) -> os.stat_result:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fstat", counted)
    return calls


def test_own_writes_keep_the_size_without_asking(tmp_path: Path, fstats: list[int]) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    try:
        assert f.size() == 0
        f.pwrite(b"a" * 100, 0)
        f.pwrite(b"b" * 10, 4096)
        assert f.size() == 4106
        f.pwrite(b"c" * 10, 50)  # inside: no change
        assert f.size() == 4106
        assert fstats.count(f.fd) == 1
        assert f.size() == os.stat(f.path).st_size
    finally:
        f.close()


def test_truncate_and_started_writes_ask_again(tmp_path: Path, fstats: list[int]) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    try:
        f.pwrite(b"a" * 100, 0)
        assert f.size() == 100
        f.truncate(10)
        assert f.size() == 10
        f.pwrite_started(bytearray(b"s" * 1000), 5000)
        f.wait_written()
        assert f.size() == 6000
        assert fstats.count(f.fd) == 3
    finally:
        f.close()


def test_a_failed_write_asks_again(tmp_path: Path, fstats: list[int]) -> None:
    f = HostFile(str(tmp_path / "f"), True, create=True)
    try:
        assert f.size() == 0
        real = os.pwrite

        def half_then_fail(fd: int, data: bytes, offset: int) -> int:
            if len(data) > 4096:  # part of it lands, then the disk is full
                return real(fd, memoryview(data)[:4096], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with mock.patch.object(os, "pwrite", half_then_fail), pytest.raises(ChainfsError):
            f.pwrite(b"x" * 8192, 0)
        assert f.size() == 4096 == os.stat(f.path).st_size
        assert fstats.count(f.fd) == 2
    finally:
        f.close()


def test_a_read_only_file_is_asked_every_time(tmp_path: Path, fstats: list[int]) -> None:
    path = str(tmp_path / "f")
    with open(path, "wb") as out:
        out.write(b"a" * 10)
    f = HostFile(path, False)
    try:
        assert f.size() == 10
        with open(path, "ab") as out:  # another writer: a read-only open sees it
            out.write(b"b" * 10)
        assert f.size() == 20
        assert fstats.count(f.fd) == 2
    finally:
        f.close()


def test_a_write_the_observer_fails_asks_again(tmp_path: Path, fstats: list[int]) -> None:
    """The fault injector of the engine's I/O-error tests fails a write from the
    observer after landing half of it through a descriptor of its own: the size is
    unknown after it, as after any failed write (a cluster the failed write took, handed
    out again, must not be taken for one past the end)."""
    f = HostFile(str(tmp_path / "f"), True, create=True)

    def half_then_fail(event: str, path: str, offset: int, data: bytes) -> None:
        with open(path, "r+b") as other:
            other.seek(offset)
            other.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        assert f.size() == 0
        with mock.patch.object(HostFile, "observer", half_then_fail):
            with pytest.raises(ChainfsError):
                f.pwrite(b"x" * 8192, 0)
            with pytest.raises(ChainfsError):
                f.pwrite_started(bytearray(b"y" * 8192), 16384)
        assert f.size() == 16384 + 4096 == os.stat(f.path).st_size
        assert fstats.count(f.fd) == 2
    finally:
        f.close()
