"""The one door through which chainfs touches image files on the host.

Every byte chainfs reads or writes of an image, every flush and every file it creates
goes through a ``HostFile``.  That keeps the I/O in one place (errors translated once)
and lets the crash-safety tests install an ``observer`` that records the exact sequence
of writes and flushes an operation issues, to replay every prefix of it afterwards (or
that raises ``OSError``, to fail that operation as the kernel would).

A new image is made under a temporary name beside its final one (``temporary_name``:
dot-prefixed, so no directory scan takes it for an image) and given its final name only
once complete and durable (``publish``: a rename that never replaces an existing file,
then a sync of the directory), so no crash leaves a half-written image under a name
anyone uses.

A failed flush fails every later flush of the file too, as QEMU's ``file-posix`` does:
Linux marks the pages it could not write back clean, so a second ``fdatasync`` would
succeed without writing them, and nothing written since the last good flush can be
known durable again.  The qcow2 driver writes metadata that depends on earlier writes
only after a good flush, so from then on nothing points at data that never landed.

Locking contract: a ``HostFile`` holds no lock of its own; ``pread``/``pwrite`` are
positional and safe to call from several threads at once.  ``pwrite_started`` hands one
write to glibc's AIO threads, so that the caller reads its next piece while the kernel
copies this one (the two cores work at once); ``flush``, ``truncate`` and ``close`` wait
for it first.  ``start_writeback`` hands its ``sync_file_range`` to a thread of its own
(``_Writebacks``); ``flush`` and ``close`` wait for that too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import secrets
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from .errors import ChainfsError, ImageError

# observer(event, path, offset, data): event is "write", "flush", "truncate", "create",
# "rename" (data: the new path, encoded), "unlink" or "syncdir" (path: the directory);
# for "truncate" the offset is the new size.
Observer = Callable[[str, str, int, bytes], None]

SYNC_FILE_RANGE_WRITE = 2  # start writing back dirty pages of the range; do not wait


def _libc(name: str, *argtypes: str) -> Callable[[int, int, int, int], int] | None:
    """A Linux call Python has no binding for, from the C library (``argtypes`` named
    as in ``ctypes``), or None."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


# start writing back a range of a file's dirty pages (fd, offset, length, flags)
_start_writeback = _libc("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")


class _Writebacks:
    """The thread that starts the kernel's write-back of ranges (``start_writeback``) for
    every file of the process, so that the thread serving requests does not wait in
    ``sync_file_range``: for a growing image's 8 MiB of new clusters the kernel allocates
    the blocks and queues the I/O there, milliseconds of which only a few are CPU, the
    rest waiting for the disk's queue.  ``ctypes`` lets go of the interpreter lock
    meanwhile.  Started at the first range; a forked child starts its own
    (``os.register_at_fork``: the parent's thread, and what it had queued, do not exist
    there, so nothing waits for them)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: deque[tuple[HostFile, int, int]] = deque()
        self.pending: dict[HostFile, int] = {}  # ranges queued or being started, by file
        self.thread: threading.Thread | None = None

    def submit(self, file: HostFile, offset: int, length: int) -> None:
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="chainfs-writeback", daemon=True
                )
                self.thread.start()
            self.pending[file] = self.pending.get(file, 0) + 1
            self.queue.append((file, offset, length))
            self.cond.notify_all()

    def drain(self, file: HostFile) -> None:
        """Wait until no range of ``file`` is queued or being started (before its
        descriptor is closed, and its number possibly given to another file)."""
        with self.cond:
            while file in self.pending:
                self.cond.wait()

    def _run(self) -> None:
        assert _start_writeback is not None
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                file, offset, length = self.queue.popleft()
            try:
                _start_writeback(file.fd, offset, length, SYNC_FILE_RANGE_WRITE)
            finally:
                with self.cond:
                    left = self.pending.pop(file) - 1
                    if left:
                        self.pending[file] = left
                    self.cond.notify_all()


_writebacks = _Writebacks()


def _after_fork() -> None:
    global _writebacks
    _writebacks = _Writebacks()


os.register_at_fork(after_in_child=_after_fork)

FALLOC_FL_KEEP_SIZE = 1  # reserve blocks without changing the file's size
FALLOC_FL_PUNCH_HOLE = 2  # give a range's blocks back (with KEEP_SIZE); it reads zeros
RESERVE_BYTES = 8 << 20  # space reserved at a time past the end of a growing file
RESERVE_MIN_FREE = 1 << 30  # ... only while the file system has this much free at least


# Python's posix_fallocate cannot keep the size (fd, mode, offset, length)
_fallocate_fn = _libc("fallocate", "c_int", "c_int", "c_int64", "c_int64")


class _Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on 64-bit Linux (``aio_sigevent`` left zero but for
    ``sigev_notify``: SIGEV_NONE, no signal at completion)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int),
        ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t),
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_rest", ctypes.c_byte * 48),
        ("glibc_internal", ctypes.c_byte * 32),
        ("aio_offset", ctypes.c_int64),
        ("glibc_reserved", ctypes.c_byte * 32),
    ]


SIGEV_NONE = 1
EINPROGRESS = errno.EINPROGRESS


def _aio() -> tuple[Any, Any, Any, Any] | None:
    """glibc's POSIX AIO calls (aio_write, aio_error, aio_return, aio_suspend), where
    ``struct aiocb`` is known to be ``_Aiocb``: glibc on 64-bit Linux."""
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or sys.maxsize <= 2**32
        or ctypes.sizeof(_Aiocb) != 168
    ):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        calls = libc.aio_write, libc.aio_error, libc.aio_return, libc.aio_suspend
    except (OSError, AttributeError):
        return None
    cb = ctypes.POINTER(_Aiocb)
    for fn in calls[:3]:
        fn.argtypes = [cb]
    calls[2].restype = ctypes.c_ssize_t
    calls[3].argtypes = [ctypes.POINTER(cb), ctypes.c_int, ctypes.c_void_p]
    return calls


# glibc's AIO threads are C threads: they start a write at once, where a Python thread
# would first wait for the interpreter lock (until the caller blocks, as it measured)
_aio_calls = _aio()


class _Started:
    """A write on its way: the control block and the buffer it reads from, kept alive
    until it landed."""

    def __init__(self, cb: _Aiocb, keep: object, view: memoryview, offset: int) -> None:
        self.cb, self.keep, self.view, self.offset = cb, keep, view, offset


class HostIOError(ChainfsError):
    """The file system under the images failed (EIO, ENOSPC, ...)."""

    def __init__(self, message: str, err: int, reason: str = "") -> None:
        super().__init__(message)
        self.errno = err
        self.reason = reason or os.strerror(err)  # the system's words, without the path


# the names of images being made (``temporary_name``): chainfs's own, and only those
TEMPORARY_PREFIX = ".chainfs-new-"
_TEMPORARY = re.compile(r"\.chainfs-new-[0-9a-f]{8}-.*", re.DOTALL)
NAME_MAX = 255

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28 and later; Python has no binding), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _renameat2()


def temporary_name(path: str) -> str:
    """A fresh name, beside ``path``, for a file that is to become ``path`` once complete:
    dot-prefixed (the directory scan and the state file ignore such names) and
    recognisably chainfs's (``is_temporary``), with as much of the final name as fits."""
    directory, base = os.path.split(os.path.abspath(path))
    head = f"{TEMPORARY_PREFIX}{secrets.token_hex(4)}-"
    tail = os.fsencode(base)[: NAME_MAX - len(head)]
    return os.path.join(directory, head + os.fsdecode(tail))


def is_temporary(name: str) -> bool:
    """Whether a file name is one ``temporary_name`` gives."""
    return _TEMPORARY.fullmatch(name) is not None


def rename_noreplace(old: str, new: str) -> None:
    """Rename ``old`` to ``new`` unless ``new`` exists (``FileExistsError``), atomically:
    ``renameat2(RENAME_NOREPLACE)``, or ``link`` then ``unlink`` where the file system
    lacks it (a crash between the two leaves both names on the one file)."""
    if _renameat2_fn is not None:
        src, dst = os.fsencode(old), os.fsencode(new)
        if _renameat2_fn(AT_FDCWD, src, AT_FDCWD, dst, RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), new)
    os.link(old, new)
    os.unlink(old)


def sync_dir(path: str) -> None:
    """Make the directory ``path`` durable, so that a file created, renamed or removed in
    it survives a power loss (``fsync`` of the file itself does not cover its name).
    Raises ``OSError``: each caller names what it was doing."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYMLINK_REFUSED = "a symlink, which chainfs never follows among its own files"
NOT_REGULAR = "not a regular file (a FIFO or device planted among chainfs's own files)"


def open_meta(path: str, flags: int, mode: int = 0o644) -> int:
    """Open one of chainfs's own files (``.chainfs/CHAIN.journal``, ``.state``,
    ``.owner``, ``.events``...) by ``os.open`` ``flags``, never through a symlink: not
    the file's name (``O_NOFOLLOW``), nor its directory's (opened first, ``O_NOFOLLOW``,
    the file then opened relative to it).  Whoever can write the image directory can
    plant a symlink there; followed, a journal compaction would truncate, a state save
    overwrite, a file elsewhere on the host; a FIFO there would block the open forever.
    ``OSError`` (ELOOP for a symlink, EINVAL for what is not a regular file)."""
    directory, name = os.path.split(path)
    try:
        dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise OSError(errno.ELOOP, SYMLINK_REFUSED, directory) from None
        raise
    try:
        # O_NONBLOCK so that a FIFO planted under the name cannot block the open
        # forever (a read-only mount opening a journal would hang); refused below
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, SYMLINK_REFUSED, path) from None
        raise
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_meta(path: str, limit: int = -1) -> bytes:
    """The content (up to ``limit`` bytes; -1: all) of one of chainfs's own files,
    opened as ``open_meta`` does: never through a symlink, never blocking on a FIFO.
    ``OSError`` as ``open_meta``, ``FileNotFoundError`` when there is none."""
    with open(open_meta(path, os.O_RDONLY), "rb") as f:
        return f.read(limit)


class HostFile:
    """An open image file with positional I/O."""

    observer: ClassVar[Observer | None] = None

    def __init__(self, path: str, writable: bool, *, create: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            raise ChainfsError(f"{self.path!r} already exists") from None
        except FileNotFoundError:
            raise ChainfsError(f"{self.path!r} does not exist") from None
        except IsADirectoryError:
            raise ImageError(f"{self.path!r} is a directory, not an image") from None
        except OSError as e:
            raise HostIOError(
                f"cannot open {self.path!r}: {e.strerror}", e.errno or errno.EIO
            ) from None
        self._unflushed = False  # a write was issued since the last flush
        # writes made to this file elsewhere (pyfuse3's overwrites, ``fastread``): a count
        # that grows with them, and its value at the last flush
        self.elsewhere: Callable[[], int] | None = None
        self._elsewhere_seen = 0
        self._reserved = -1  # space is reserved up to here (-1: nothing reserved)
        self._flush_error: HostIOError | None = None  # a flush failed: all later ones fail
        self._started: _Started | None = None  # the write on its way, if any
        self._writeback = 0  # then start the write-back of this much before its end
        # the file's size as this object last saw or made it, -1 when unknown: a
        # writable file changes only through this object while it is open (see ``size``)
        self._size = -1
        if create and HostFile.observer is not None:
            HostFile.observer("create", self.path, 0, b"")

    def _fail(self, what: str, e: OSError) -> HostIOError:
        err = e.errno or errno.EIO
        reason = e.strerror or os.strerror(err)
        return HostIOError(f"{what} {self.path!r} failed: {reason}", err, reason)

    def publish(self, path: str) -> None:
        """Give this file, made under a ``temporary_name`` and flushed, its final name
        ``path`` in the same directory, and make the name durable.  Never replaces a file:
        ``ChainfsError`` if ``path`` exists (this file keeps its temporary name).  A
        failure after the rename leaves the file under ``path`` (``self.path``)."""
        path = os.path.abspath(path)
        try:
            if HostFile.observer is not None:
                HostFile.observer("rename", self.path, 0, os.fsencode(path))
            rename_noreplace(self.path, path)
        except FileExistsError:
            raise ChainfsError(f"{path!r} already exists") from None
        except OSError as e:
            raise self._fail("naming", e) from None
        self.path = path
        directory = os.path.dirname(path)
        try:
            if HostFile.observer is not None:
                HostFile.observer("syncdir", directory, 0, b"")
            sync_dir(directory)
        except OSError as e:
            raise HostIOError(
                f"syncing the directory {directory!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None

    def remove(self) -> None:
        """Close the file and remove its name (a file this process made, that failed)."""
        self.close()
        try:
            if HostFile.observer is not None:
                HostFile.observer("unlink", self.path, 0, b"")
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._fail("removing", e) from None

    def pread(self, length: int, offset: int) -> bytes:
        """Read up to ``length`` bytes; the result is short only at end of file."""
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise self._fail("reading", e) from None

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; bytes past end of file read as zeros."""
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            raise self._fail("reading", e) from None
        if n < len(buf):
            # a short read means end of file (regular files); the rest reads as zeros
            buf[n:] = bytes(len(buf) - n)

    def pread_padded(self, length: int, offset: int) -> bytearray:
        """``length`` bytes from ``offset``, those past end of file as zeros (a metadata
        table may reach past a file that ends inside its cluster)."""
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)
        return buf

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if not self.writable:
            raise ChainfsError(f"{self.path!r} is open read-only")
        self._unflushed = True
        try:
            if HostFile.observer is not None:
                HostFile.observer("write", self.path, offset, bytes(data))
            end = offset + len(data)
            n = os.pwrite(self.fd, data, offset)
        except OSError as e:
            self._size = -1  # a failed write may have landed in part (a full disk)
            raise self._fail("writing", e) from None
        if n < len(data):  # (short: the rest as ``_pwrite`` does it)
            self._pwrite(memoryview(data)[n:], offset + n)
        if end > self._size >= 0:
            self._size = end

    def _pwrite(self, view: memoryview, offset: int) -> None:
        try:
            while len(view):
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            self._size = -1  # (part of it may have landed)
            raise self._fail("writing", e) from None
        if offset > self._size >= 0:
            self._size = offset

    def pwrite_started(
        self, data: bytes | bytearray | memoryview, offset: int, writeback: int = 0
    ) -> None:
        """Start ``pwrite(data, offset)`` and return at once, where the system can (glibc's
        AIO); then, with ``writeback``, ``start_writeback`` of that many bytes before
        ``offset + len(data)``.  Until ``wait_written`` returns, ``data`` must not change
        and nothing may depend on the write having landed.  One write at a time: a
        second one waits for the first (and raises its failure)."""
        if not self.writable:
            raise ChainfsError(f"{self.path!r} is open read-only")
        self.wait_written()
        self._unflushed = True
        self._size = -1  # it grows as the started write lands (a failed one: in part)
        try:
            if HostFile.observer is not None:  # in order, and its failure raised here
                HostFile.observer("write", self.path, offset, bytes(data))
        except OSError as e:
            raise self._fail("writing", e) from None
        view = memoryview(data)
        self._writeback = writeback
        if _aio_calls is not None and not view.readonly and len(view):
            keep = (ctypes.c_char * len(view)).from_buffer(view)
            cb = _Aiocb(
                aio_fildes=self.fd,
                aio_buf=ctypes.addressof(keep),
                aio_nbytes=len(view),
                aio_offset=offset,
                sigev_notify=SIGEV_NONE,
            )
            if _aio_calls[0](ctypes.byref(cb)) == 0:
                self._started = _Started(cb, keep, view, offset)
                return
            del keep  # no AIO to be had: written here, as below
        self._pwrite(view, offset)
        self._written(offset + len(view))

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give the blocks of ``[offset, offset+length)`` back to the file system; the
        range reads as zeros afterwards (fallocate PUNCH_HOLE|KEEP_SIZE, as QEMU's
        file-posix discard).  Best effort: False where the file system cannot (nothing
        changed then).  For the crash tests' observer it is a write of zeros, which is
        what the range reads as once it landed; like a write, it is durable only after
        the next ``flush``."""
        if not self.writable:
            raise ChainfsError(f"{self.path!r} is open read-only")
        if _fallocate_fn is None or length <= 0:
            return False
        self.wait_written()
        try:
            if HostFile.observer is not None:
                HostFile.observer("write", self.path, offset, bytes(length))
        except OSError as e:
            self._size = -1  # (as a failed write)
            raise self._fail("punching", e) from None
        self._unflushed = True
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate_fn(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise self._fail("punching", OSError(err, os.strerror(err)))

    def next_data(self, offset: int) -> int:
        """Where the file's data starts at or after ``offset`` (SEEK_DATA), or its size
        when only a hole follows; a file system without SEEK_DATA: ``offset``."""
        return self._seek(offset, os.SEEK_DATA)

    def next_hole(self, offset: int) -> int:
        """Where the file's next hole starts at or after ``offset`` (SEEK_HOLE; the end of
        the file counts as one)."""
        return self._seek(offset, os.SEEK_HOLE)

    def _seek(self, offset: int, whence: int) -> int:
        try:
            return os.lseek(self.fd, offset, whence)
        except OSError as e:
            if e.errno == errno.ENXIO:  # at or past the end (no data after ``offset``)
                return max(offset, self.size())
            if e.errno == errno.EINVAL:  # no SEEK_DATA/SEEK_HOLE: all data, no hole
                return offset if whence == os.SEEK_DATA else max(offset, self.size())
            raise self._fail("inspecting", e) from None

    def wait_written(self) -> None:
        """Wait for the started write to land; raise its failure (once)."""
        started, self._started = self._started, None
        if started is None:
            return
        assert _aio_calls is not None
        _, aio_error, aio_return, aio_suspend = _aio_calls
        cb = started.cb
        ptr = ctypes.pointer(cb)
        waiting = (ctypes.POINTER(_Aiocb) * 1)(ptr)
        while (err := aio_error(ptr)) == EINPROGRESS:
            aio_suspend(waiting, 1, None)  # returns early on a signal: asks again
        n = aio_return(ptr)
        del started.keep
        view, offset = started.view, started.offset
        if err:
            raise self._fail("writing", OSError(err, os.strerror(err)))
        if n < len(view):  # a short write: the rest as ``pwrite`` does it
            self._pwrite(view[n:], offset + n)
        self._written(offset + len(view))

    def _written(self, end: int) -> None:
        if self._writeback:
            self.start_writeback(end - self._writeback, self._writeback)
            self._writeback = 0

    def start_writeback(self, offset: int, length: int) -> None:
        """Have the kernel start writing ``[offset, offset+length)`` to the disk now,
        without waiting for it, so that the next ``flush`` finds most of it written
        instead of writing it all then.  Best effort (Linux only): durability and the
        order of writes still come from ``flush`` alone, and an error of this write-back
        is reported by the next ``flush`` (the kernel keeps it for ``fdatasync``).  Done
        by a thread of its own (``_Writebacks``), not the caller's; ``flush`` and ``close``
        wait for it.
        """
        if _start_writeback is not None and self.writable and length > 0:
            _writebacks.submit(self, offset, length)

    def reserve(self, end: int) -> None:
        """Have the file system reserve blocks up to at least ``end`` past the file's end
        (its size does not change), ``RESERVE_BYTES`` at a time, before a growing file's
        writes get there: writing into reserved blocks costs the kernel about a third
        less than allocating them write by write (ext4).  Best effort: a file system
        without ``fallocate`` just does not reserve.  Neither does one with less than
        ``RESERVE_MIN_FREE`` free: when space runs short, what is left goes to whichever
        write comes first, as without reserving (the journal and the state file must
        not find it taken by an image's reservation).  ``close`` gives back what was not
        used.
        """
        if _fallocate_fn is None or not self.writable or end <= self._reserved:
            return
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            return
        if st.f_bavail * st.f_frsize < RESERVE_MIN_FREE:
            return
        start = max(self._reserved, end - end % RESERVE_BYTES)
        length = end - start + RESERVE_BYTES
        if _fallocate_fn(self.fd, FALLOC_FL_KEEP_SIZE, start, length) == 0:
            self._reserved = start + length
        else:
            self._reserved = 1 << 62  # unsupported or no space: stop trying

    def _release_reserve(self) -> None:
        """Give back the blocks reserved past the file's end (a truncation to its own
        size does that)."""
        if self._reserved < 0:
            return
        self._reserved = -1
        try:
            os.ftruncate(self.fd, os.fstat(self.fd).st_size)
        except OSError:
            pass  # only space is at stake, and the next close tries again

    def flush(self) -> None:
        """Make every write issued so far durable (a no-op when nothing was written).

        Once a flush failed, every later one fails with the same errno (see above).
        """
        if not self.writable:
            return
        self.wait_written()
        _writebacks.drain(self)  # (what it started, the flush would write anyway)
        failed = self._flush_error
        if failed is not None:
            raise HostIOError(
                f"{self.path!r} failed to flush earlier ({failed.reason}): writes since "
                "its last good flush may be lost",
                failed.errno,
            )
        if self.elsewhere is not None:
            # counted before the sync: a write after the count is flushed next time
            n = self.elsewhere()
            if n != self._elsewhere_seen:
                self._elsewhere_seen = n
                self._unflushed = True
        if not self._unflushed:
            return
        self._unflushed = False
        try:
            if HostFile.observer is not None:
                HostFile.observer("flush", self.path, 0, b"")
            os.fdatasync(self.fd)
        except OSError as e:
            self._flush_error = self._fail("flushing", e)
            raise self._fail("flushing", e) from None

    def truncate(self, size: int) -> None:
        self.wait_written()
        self._unflushed = True
        self._size = -1
        try:
            if HostFile.observer is not None:
                HostFile.observer("truncate", self.path, size, b"")
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise self._fail("resizing", e) from None

    def size(self) -> int:
        """The file's size.  A writable file's is asked of the kernel once and then kept
        up to date by this object's own writes, without an ``fstat`` each time (a write
        into a fresh cluster asks whether it lies past the end): while chainfs has an
        image open for writing, nothing else changes it — QEMU's write lock keeps other
        processes out, and the refcounts' allocation from the end (``next_free``, taken
        once at open) already counts on it.  Unknown again after a failed or started
        write and a truncation, which may have changed it by an amount not known here."""
        if self._size >= 0:
            return self._size
        try:
            size = os.fstat(self.fd).st_size
        except OSError as e:
            raise self._fail("inspecting", e) from None
        if self.writable:
            self._size = size
        return size

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.wait_written()
            except HostIOError:
                pass  # nothing points at what it wrote (the writer reports its failure)
            _writebacks.drain(self)
            self._release_reserve()
            os.close(self.fd)
            self.fd = -1
