"""QEMU image locks between descriptors of one process, with no QEMU involved.

OFD locks belong to an open file description, so two ``os.open`` calls on one file are two
lockers exactly as two processes would be; a third descriptor sees both through
``holders``.  QEMU's own side of the protocol is checked in ``tests/interop/test_locks.py``.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfs.errors import ChainfsError, LockError
from chainfs.locks import holders, lock_image, unlock_image

WRITER_BYTES = {100, 101, 103, 201, 203}
READER_BYTES = {100, 201, 203}

Opener = Callable[..., int]


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "x.qcow2"
    path.write_bytes(bytes(4096))
    return str(path)


@pytest.fixture
def opener(image: str) -> Iterator[Opener]:
    """Open ``image`` as often as a test likes; every descriptor is closed afterwards."""
    fds: list[int] = []

    def open_(flags: int = os.O_RDWR) -> int:
        fd = os.open(image, flags | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield open_
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # a test closed it itself


def test_writer_holds_qemus_active_layer_bytes(image: str, opener: Opener) -> None:
    a, observer = opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=True)
    assert holders(observer) == WRITER_BYTES
    assert holders(a) == set()  # OFD GETLK does not report the caller's own locks


def test_reader_holds_qemus_backing_layer_bytes(image: str, opener: Opener) -> None:
    a, observer = opener(os.O_RDONLY), opener(os.O_RDONLY)
    lock_image(a, image, write=False)  # F_RDLCK on a read-only descriptor
    assert holders(observer) == READER_BYTES


def test_writer_excludes_writer(image: str, opener: Opener) -> None:
    a, b = opener(), opener()
    lock_image(a, image, write=True)
    with pytest.raises(LockError) as exc:
        lock_image(b, image, write=True)
    assert str(exc.value) == (
        f'Failed to get "write" lock. Is another process using the image [{image}]?'
    )


def test_writer_excludes_later_reader(image: str, opener: Opener) -> None:
    a, b = opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=True)
    with pytest.raises(LockError, match=r'^Failed to get shared "write" lock\. Is another'):
        lock_image(b, image, write=False)


def test_reader_excludes_later_writer(image: str, opener: Opener) -> None:
    a, b = opener(os.O_RDONLY), opener()
    lock_image(a, image, write=False)
    with pytest.raises(LockError, match=r'^Failed to get "write" lock\. Is another'):
        lock_image(b, image, write=True)


def test_readers_coexist(image: str, opener: Opener) -> None:
    a, b, c = opener(os.O_RDONLY), opener(os.O_RDONLY), opener(os.O_RDONLY)
    lock_image(a, image, write=False)
    lock_image(b, image, write=False)
    assert holders(c) == READER_BYTES
    assert holders(a) == READER_BYTES  # b's locks, seen from a


def test_lock_error_is_ebusy(image: str, opener: Opener) -> None:
    a, b = opener(), opener()
    lock_image(a, image, write=True)
    with pytest.raises(LockError) as exc:
        lock_image(b, image, write=True)
    assert exc.value.errno == 16  # EBUSY, what the FUSE layer reports


@pytest.mark.parametrize("first_write", [True, False])
def test_unlock_releases(image: str, opener: Opener, first_write: bool) -> None:
    a, b, observer = opener(), opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=first_write)
    unlock_image(a)
    assert holders(observer) == set()
    lock_image(b, image, write=True)
    assert holders(observer) == WRITER_BYTES


@pytest.mark.parametrize(
    ("first_write", "second_write"), [(True, True), (True, False), (False, True)]
)
def test_failed_lock_leaves_nothing_behind(
    image: str, opener: Opener, first_write: bool, second_write: bool
) -> None:
    a, b, observer = opener(), opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=first_write)
    with pytest.raises(LockError):
        lock_image(b, image, write=second_write)
    unlock_image(a)
    assert holders(observer) == set()  # so b took nothing, or gave it all back
    lock_image(b, image, write=True)  # and b can lock once a is gone


def test_byte_locked_exclusively_fails_and_rolls_back(image: str, opener: Opener) -> None:
    """A foreign exclusive lock makes taking a byte fail, not just the test afterwards."""
    other, a, observer = opener(), opener(os.O_RDONLY), opener(os.O_RDONLY)
    # an exclusive OFD lock on byte 201: lock_image(write=False) takes 100, then fails on 201
    fcntl.fcntl(other, 37, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 201, 1, 0))
    with pytest.raises(LockError, match=r"^Failed to lock byte 201\. Is another process"):
        lock_image(a, image, write=False)
    assert holders(observer) == {201}  # 100 was given back


def test_closing_another_descriptor_keeps_locks(image: str, opener: Opener) -> None:
    """The reason for OFD locks: with lockf this close would drop the process's locks."""
    a, observer = opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=True)
    os.close(opener(os.O_RDONLY))
    assert holders(observer) == WRITER_BYTES


def test_closing_the_descriptor_releases(image: str, opener: Opener) -> None:
    a, observer = opener(), opener(os.O_RDONLY)
    lock_image(a, image, write=True)
    os.close(a)
    assert holders(observer) == set()


def test_unlock_without_locks_is_harmless(image: str, opener: Opener) -> None:
    a, observer = opener(), opener(os.O_RDONLY)
    unlock_image(a)
    assert holders(observer) == set()


def test_write_only_descriptor_cannot_take_read_locks(image: str, opener: Opener) -> None:
    a = opener(os.O_WRONLY)
    with pytest.raises(LockError, match=r"^Failed to lock byte 100: Bad file descriptor\."):
        lock_image(a, image, write=True)


def test_closed_descriptor(image: str, opener: Opener) -> None:
    a = opener()
    os.close(a)
    with pytest.raises(ChainfsError):
        holders(a)
    with pytest.raises(ChainfsError):
        unlock_image(a)
