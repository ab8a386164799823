"""chainfs's image locks against QEMU's own, in both directions.

A ``qemu-io`` left running interactively holds an image the way a running VM does; while it
does, chainfs must refuse to lock it with QEMU's words.  The other way round, an image
chainfs has locked must make ``qemu-io`` and ``qemu-img`` refuse it, exactly as a second
QEMU would, and must let through what QEMU lets through (``-U``, a read-only open of a
backing layer, an overlay built on it).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfs.errors import LockError
from chainfs.locks import holders, lock_image, unlock_image

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
SIZE = 1024 * 1024

Hold = Callable[..., Callable[[], None]]  # hold(path, *qemu_io_opts) -> quit
OpenFd = Callable[..., int]  # open_(path, flags=os.O_RDWR) -> fd


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=60)


def create(path: Path, *, backing: Path | None = None) -> str:
    args = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    proc = run(*args, str(path), str(SIZE))
    assert proc.returncode == 0, proc.stderr
    return str(path)


def assert_refused(proc: subprocess.CompletedProcess[str], path: str) -> None:
    assert proc.returncode != 0, f"QEMU opened a locked image:\n{proc.stdout}{proc.stderr}"
    assert "Failed to get" in proc.stderr and "lock" in proc.stderr, proc.stderr
    assert f"Is another process using the image [{path}]?" in proc.stderr, proc.stderr


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
    assert "lock" not in proc.stderr, proc.stderr


@pytest.fixture
def image(tmp_path: Path) -> str:
    return create(tmp_path / "active.qcow2")


@pytest.fixture
def held_by_qemu() -> Iterator[Hold]:
    """Keep an image open in an interactive ``qemu-io``; the returned callable quits it."""
    procs: list[subprocess.Popen[str]] = []

    def quit_(proc: subprocess.Popen[str]) -> None:
        if proc.returncode is not None:
            return
        try:
            _, err = proc.communicate("quit\n", timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, err

    def hold(path: str, *opts: str) -> Callable[[], None]:
        proc = subprocess.Popen(
            [QEMU_IO, *opts, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        # qemu-io opens the image before reading its first command, so an answer to a
        # read proves it holds the image (and its locks); EOF means it failed to open it
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert "read 512/512 bytes at offset 0" in line, (
            f"qemu-io did not open {path}: {line!r} {proc.communicate(timeout=10)[1]}"
        )
        return lambda: quit_(proc)

    yield hold
    for proc in procs:
        quit_(proc)


@pytest.fixture
def fd_of() -> Iterator[OpenFd]:
    fds: list[int] = []

    def open_(path: str, flags: int = os.O_RDWR) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield open_
    for fd in fds:
        os.close(fd)


# --- QEMU holds the image, chainfs asks ------------------------------------------------


def test_qemu_writer_holds_the_bytes_chainfs_expects(
    image: str, held_by_qemu: Hold, fd_of: OpenFd
) -> None:
    held_by_qemu(image)
    assert holders(fd_of(image, os.O_RDONLY)) == {100, 101, 103, 201, 203}


def test_qemu_reader_holds_the_bytes_chainfs_expects(
    image: str, held_by_qemu: Hold, fd_of: OpenFd
) -> None:
    held_by_qemu(image, "-r")
    assert holders(fd_of(image, os.O_RDONLY)) == {100, 201, 203}


@pytest.mark.parametrize(
    ("write", "message"),
    [(True, 'Failed to get "write" lock'), (False, 'Failed to get shared "write" lock')],
)
def test_chainfs_refuses_image_qemu_writes(
    image: str,
    held_by_qemu: Hold,
    fd_of: OpenFd,
    write: bool,
    message: str,
) -> None:
    stop = held_by_qemu(image)
    fd, observer = fd_of(image), fd_of(image, os.O_RDONLY)
    with pytest.raises(LockError) as exc:
        lock_image(fd, image, write=write)
    assert str(exc.value) == f"{message}. Is another process using the image [{image}]?"
    stop()
    assert holders(observer) == set()  # the refusal kept nothing
    lock_image(fd, image, write=write)  # and the same fd can lock once QEMU is gone


def test_chainfs_shares_image_qemu_reads(image: str, held_by_qemu: Hold, fd_of: OpenFd) -> None:
    held_by_qemu(image, "-r")
    with pytest.raises(LockError, match=r'^Failed to get "write" lock\.'):
        lock_image(fd_of(image), image, write=True)
    lock_image(fd_of(image, os.O_RDONLY), image, write=False)


# --- chainfs holds the image, QEMU asks ------------------------------------------------


def test_qemu_refuses_image_chainfs_writes(image: str, fd_of: OpenFd) -> None:
    lock_image(fd_of(image), image, write=True)
    assert_refused(run(QEMU_IO, "-c", "read 0 512", image), image)
    assert_refused(run(QEMU_IO, "-r", "-c", "read 0 512", image), image)
    assert_refused(run(QEMU_IMG, "info", image), image)
    assert_ok(run(QEMU_IMG, "info", "-U", image))


def test_qemu_refuses_to_write_backing_layer_chainfs_reads(tmp_path: Path, fd_of: OpenFd) -> None:
    base = create(tmp_path / "base.qcow2")
    top = create(tmp_path / "top.qcow2", backing=Path(base))
    lock_image(fd_of(base, os.O_RDONLY), base, write=False)
    assert_refused(run(QEMU_IO, "-c", "write 0 512", base), base)
    assert_ok(run(QEMU_IMG, "info", base))
    assert_ok(run(QEMU_IO, "-r", "-c", "read 0 512", base))
    # QEMU's own active layer on top of it opens the base as a backing layer: no conflict
    assert_ok(run(QEMU_IO, "-c", "write -P 0x5a 0 512", top))


@pytest.mark.parametrize("write", [True, False])
def test_unlock_lets_qemu_write(image: str, fd_of: OpenFd, write: bool) -> None:
    fd = fd_of(image)
    lock_image(fd, image, write=write)
    assert_refused(run(QEMU_IO, "-c", "write -P 0xa5 0 512", image), image)
    unlock_image(fd)
    assert_ok(run(QEMU_IO, "-c", "write -P 0xa5 0 512", image))
    assert_ok(run(QEMU_IO, "-c", "read -P 0xa5 0 512", image))


def test_closing_the_fd_lets_qemu_write(image: str) -> None:
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        lock_image(fd, image, write=True)
        assert_refused(run(QEMU_IO, "-c", "write 0 512", image), image)
    finally:
        os.close(fd)
    assert_ok(run(QEMU_IO, "-c", "write 0 512", image))
