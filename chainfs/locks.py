"""QEMU-compatible image locks, so chainfs and QEMU never write the same image at once.

QEMU (``block/file-posix.c``) announces what it does with an image through 1-byte shared
(``F_RDLCK``) locks on the image file itself.  There are four permissions, numbered as in
QEMU: 0 "consistent read", 1 "write", 2 "write unchanged", 3 "resize".  Byte ``100 + p``
locked means "I hold permission p"; byte ``200 + p`` locked means "I do not let anyone
else hold permission p".  Shared locks never conflict with each other, so nobody is ever
refused a lock: a would-be user first takes its own bytes, then asks the kernel whether
anyone *else* holds a byte that rules it out (``F_OFD_GETLK`` with ``F_WRLCK``): ``200 + p``
for each permission it wants, ``100 + p`` for each one it refuses to share.  A conflict
undoes its own bytes and fails.  Taking first and testing second makes this race-free:
of two openers racing, at least one sees the other.

QEMU's active layer holds {100, 101, 103, 201, 203} and a backing layer {100, 201, 203};
chainfs takes exactly the same sets (``write=True`` / ``write=False``), so to QEMU a
chainfs-served layer looks like one of its own.

The locks must be open file description (OFD) locks, as QEMU's are: classic POSIX locks
(``fcntl.lockf``) belong to the process, so they never conflict between two opens in one
process and are all dropped when *any* descriptor of the file is closed; ``flock`` locks
are invisible to ``fcntl`` byte-range tests.  OFD locks belong to the open file
description, live until its last descriptor is closed, and ``F_OFD_GETLK`` ignores the
caller's own locks, which is what makes "take, then test" work.

Locking contract: ``lock_image`` is called on a descriptor that holds no image locks
(freshly opened, or after ``unlock_image``); on success it holds the mode's bytes, on
failure it holds none.  The locks live as long as the descriptor's open file description:
keep the descriptor open for as long as the image is in use.  Two descriptors of the same
file are two lockers, even in one process, so a layer reopened for writing conflicts with
its own read-only descriptor: unlock the old one before locking the new one.  The
functions keep no state and are safe to call from several threads.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import platform
import struct
import sys

from .errors import ChainfsError, LockError

log = logging.getLogger(__name__)

# permission bits, as QEMU numbers them (BLK_PERM_*)
CONSISTENT_READ = 0
WRITE = 1
WRITE_UNCHANGED = 2
RESIZE = 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")

PERM_BASE = 100  # byte 100 + p: "I hold permission p"
SHARED_BASE = 200  # byte 200 + p: "I don't share permission p"
ALL_BYTES = frozenset(
    [PERM_BASE + p for p in range(len(PERM_NAMES))]
    + [SHARED_BASE + p for p in range(len(PERM_NAMES))]
)

# (permissions held, permissions not shared) for each mode, as QEMU's qcow2 over file-posix
# asks for them: the active layer reads, writes and may grow the image and lets nobody else
# write or resize it; a backing layer only reads, but still lets nobody write or resize.
_WRITER = ((CONSISTENT_READ, WRITE, RESIZE), (WRITE, RESIZE))
_READER = ((CONSISTENT_READ,), (WRITE, RESIZE))

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK

# struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;}:
# this packing is right for the 64-bit Linux ABIs below (both pad after l_whence and at
# the end); 32-bit ABIs and some other architectures lay it out differently.
_FLOCK = "hh4xqqi4x"
_FLOCK_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})


def _check_platform() -> None:
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in _FLOCK_MACHINES:
        raise ChainfsError(f"image locking is not supported on {sys.platform}/{machine}")


def _fcntl(fd: int, cmd: int, ltype: int, start: int, length: int = 1) -> int:
    """One OFD lock call on ``length`` bytes from ``start``; returns the resulting l_type."""
    # l_pid must be 0 for OFD requests; GETLK reports -1 there for an OFD holder.
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    ltype_out: int = struct.unpack(_FLOCK, out)[0]
    return ltype_out


def _held_by_other(fd: int, byte: int) -> bool:
    """Whether anyone other than ``fd``'s open file description holds a lock on ``byte``."""
    return _fcntl(fd, F_OFD_GETLK, F_WRLCK, byte) != F_UNLCK


def _release(fd: int, taken: list[int]) -> None:
    for byte in taken:
        try:
            _fcntl(fd, F_OFD_SETLK, F_UNLCK, byte)
        except OSError as e:
            # unlocking cannot conflict; if the kernel still refuses, the lock goes away
            # when the descriptor is closed, so report and carry on, as QEMU does
            log.warning("failed to unlock byte %d: fd=%d error=%s", byte, fd, e.strerror)


def _lock_failure(message: str, err: int) -> str:
    # QEMU's raw_lock_error_setg_errno: a plain conflict needs no strerror
    if err in (errno.EAGAIN, errno.EACCES):
        return message
    return f"{message}: {os.strerror(err)}"


def lock_image(fd: int, path: str, *, write: bool) -> None:
    """Take QEMU's image locks on ``fd``: a writer's with ``write``, else a backing layer's.

    ``write=True`` takes {100, 101, 103, 201, 203} then tests 200, 201, 203, 101, 103;
    ``write=False`` takes {100, 201, 203} then tests 200, 101, 103.  A read lock needs
    only a readable descriptor, so an ``O_RDONLY`` fd is fine for either mode.  On a
    conflict every byte this call took is released and ``LockError`` raised with QEMU's
    words; ``path`` only names the image in that message.
    """
    _check_platform()
    perms, unshared = _WRITER if write else _READER
    wanted = sorted([PERM_BASE + p for p in perms] + [SHARED_BASE + p for p in unshared])
    hint = f"Is another process using the image [{path}]?"
    taken: list[int] = []
    try:
        for byte in wanted:
            try:
                _fcntl(fd, F_OFD_SETLK, F_RDLCK, byte)
            except OSError as e:
                err = e.errno or errno.EIO
                raise LockError(
                    f"{_lock_failure(f'Failed to lock byte {byte}', err)}. {hint}"
                ) from None
            taken.append(byte)
        # the same order as raw_check_lock_bytes: what we want, then what we won't share
        checks = [(SHARED_BASE + p, f'"{PERM_NAMES[p]}"') for p in perms]
        checks += [(PERM_BASE + p, f'shared "{PERM_NAMES[p]}"') for p in unshared]
        for byte, what in checks:
            try:
                conflict = _held_by_other(fd, byte)
            except OSError as e:
                err = e.errno or errno.EIO
                raise LockError(
                    f"{_lock_failure(f'Failed to get {what} lock', err)}. {hint}"
                ) from None
            if conflict:
                raise LockError(f"Failed to get {what} lock. {hint}")
    except BaseException:
        _release(fd, taken)
        raise
    log.debug("locked image: path=%s mode=%s fd=%d", path, "write" if write else "read", fd)


def unlock_image(fd: int) -> None:
    """Release every image lock ``fd`` holds (bytes 100 to 299, as QEMU's range)."""
    _check_platform()
    try:
        _fcntl(fd, F_OFD_SETLK, F_UNLCK, PERM_BASE, 200)  # bytes 100 to 299
    except OSError as e:
        raise ChainfsError(f"failed to unlock image locks: {e.strerror}") from None


def holders(fd: int) -> set[int]:
    """Which of bytes 100-103 and 200-203 someone other than ``fd`` holds a lock on.

    A diagnostic (``chainfs info``, tests): it says that a byte is taken, not by whom,
    and a holder may appear or go away right after the answer.
    """
    _check_platform()
    try:
        return {byte for byte in sorted(ALL_BYTES) if _held_by_other(fd, byte)}
    except OSError as e:
        raise ChainfsError(f"failed to test image locks: {e.strerror}") from None
