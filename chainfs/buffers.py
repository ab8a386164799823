"""Buffers the copies reuse: kept blocks of zeros to compare with (a memcmp), and
per-thread scratch buffers (fresh memory costs a page fault per 4 KiB, about as much as
the read into it)."""

from __future__ import annotations

import functools
import threading

ZERO_CHUNK = 1 << 20  # the largest block of zeros kept


@functools.lru_cache(maxsize=64)
def zeros(n: int) -> bytes:
    """``n`` zero bytes, kept: ``data.startswith(zeros(n), pos)`` is a memcmp."""
    return bytes(n)


def zero_at(data: bytes | bytearray, pos: int, n: int) -> bool:
    """Whether ``data[pos:pos+n]`` is all zeros: a memcmp per power-of-two piece (so
    only a few sizes of zero blocks are kept)."""
    end = pos + n
    while pos < end:
        p = min(ZERO_CHUNK, 1 << ((end - pos).bit_length() - 1))
        if not data.startswith(zeros(p), pos):
            return False
        pos += p
    return True


def zero_fill(view: memoryview) -> None:
    """Set ``view`` to zeros."""
    zero = memoryview(zeros(ZERO_CHUNK))
    for pos in range(0, len(view), ZERO_CHUNK):
        n = min(ZERO_CHUNK, len(view) - pos)
        view[pos : pos + n] = zero[:n]


_local = threading.local()


def scratch(n: int, name: str) -> bytearray:
    """This thread's buffer ``name``, of at least ``n`` bytes, reused from call to call.

    Each name has its own buffer, so that a user's data is never overwritten by
    another's: the qcow2 driver reads L2 tables into ``"l2"`` while a copy holds its
    data in ``"copy"``.  Nothing may keep a view of one past its use.
    """
    bufs: dict[str, bytearray] | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(name)
    if buf is None or len(buf) < n:
        buf = bufs[name] = bytearray(n)
    return buf
