"""Making qcow2 images and rewriting their backing pointer, without opening them as a
layer (QEMU's ``qcow2_co_create`` and ``qcow2_change_backing_file``).

A new image is written whole under a temporary name beside its final one
(``hostfile.temporary_name``), locked with QEMU's write locks before its first byte,
flushed, then renamed to its final name without replacing anything there, and the
directory synced (``HostFile.publish``).  A crash therefore leaves, under the final name,
nothing or the complete image, never a header torn from its backing name; at most a
temporary file stays behind, which no directory scan serves and which the next
read-write mount removes (``remove_unfinished``: only names chainfs gives, and only
files nobody holds locked, i.e. no creation under way elsewhere).  The lock stays on the
open file under its final name, which ``create_image`` hands to the caller, so nobody
can open the image for writing between its creation and its use.

``set_backing`` re-points an image in the crash-safe order of ``repoint``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from ...errors import ChainfsError, ImageError
from ...hostfile import HostFile, HostIOError, is_temporary, sync_dir, temporary_name
from ...locks import lock_image
from . import header as hdr
from .entries import U64 as _U64
from .refcounts import set_entry
from .repoint import repoint

log = logging.getLogger(__name__)


def _log2(n: int) -> int:
    b = n.bit_length() - 1
    if n <= 0 or 1 << b != n:
        raise ImageError(f"{n} is not a power of two")
    return b


def create_overlay(
    path: str,
    *,
    size: int,
    backing: str | None,
    backing_format: str | None,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
) -> None:
    """Create a new, empty qcow2 v3 image at ``path`` (refusing an existing path), as
    ``create_image`` does, and close it."""
    create_image(
        path,
        size=size,
        backing=backing,
        backing_format=backing_format,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
    ).close()


def create_image(
    path: str,
    *,
    size: int,
    backing: str | None,
    backing_format: str | None,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    vet: Callable[[int], None] | None = None,
) -> HostFile:
    """Create a new, empty qcow2 v3 image at ``path`` (``ChainfsError`` if it exists),
    complete and durable under that name, and return it open read-write, holding QEMU's
    write locks (see the module's docstring).  ``vet``, if given, is called with the
    new file's descriptor once it is created and again once it has its name, and may
    refuse it (raise): the file is removed then (the place a caller checked by path may
    have changed since: a directory on it swapped for a symlink)."""
    cb = _log2(cluster_size)
    if not 9 <= cb <= 21:
        raise ImageError(f"cluster size {cluster_size} outside 512 B .. 2 MiB")
    order = _log2(refcount_bits)
    size -= size % 512
    cs = cluster_size
    l1_size = -(-size // (cs * (cs // 8)))
    l1_clusters = -(-l1_size * 8 // cs)
    shift = cb + 3 - order
    nblocks, tclusters = 1, 1
    while True:
        total = 1 + tclusters + nblocks + l1_clusters
        need_b = ((total - 1) >> shift) + 1
        need_t = -(-need_b * 8 // cs)
        if need_b <= nblocks and need_t <= tclusters:
            break
        nblocks, tclusters = max(nblocks, need_b), max(tclusters, need_t)
    h = hdr.Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cb,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=(1 + tclusters + nblocks) * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=tclusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=hdr.QEMU_HEADER_LENGTH,
        extra=bytes(hdr.QEMU_HEADER_LENGTH - hdr.V3_HEADER_LENGTH),
    )
    head, name = hdr.layout(h, backing, backing_format)
    if name:
        h.backing_file_offset, h.backing_file_size = len(head), len(name)
        head = h.pack_fields() + h.pack_extensions()
    if len(head) + len(name) > cs:
        raise ImageError(f"backing file name too long for a {cs}-byte header cluster")
    total = 1 + tclusters + nblocks + l1_clusters
    meta = bytearray((total - 1) * cs)
    for b in range(nblocks):
        _U64.pack_into(meta, b * 8, (1 + tclusters + b) * cs)
        blk = bytearray(cs)
        for i in range(1 << shift):
            if (b << shift) + i < total:
                set_entry(blk, i, 1, refcount_bits)
        start = (tclusters + b) * cs
        meta[start : start + cs] = blk
    first = bytearray(cs)
    first[: len(head)] = head
    first[len(head) : len(head) + len(name)] = name
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise ChainfsError(f"{path!r} already exists")
    f = HostFile(temporary_name(path), True, create=True)
    try:
        if vet is not None:
            vet(f.fd)
        lock_image(f.fd, path, write=True)  # before anybody could read a byte of it
        f.pwrite(first + meta, 0)
        f.flush()
        f.publish(path)
        if vet is not None:
            vet(f.fd)
    except BaseException:
        try:
            f.remove()  # ours: the temporary file, or the image under its new name
        except ChainfsError as e:
            log.warning("file=%s cannot be removed after a failed creation: %s", f.path, e)
        raise
    return f


def unfinished(directory: str) -> list[str]:
    """The temporary files of image creations in ``directory`` (a crash interrupted
    them, or they are under way), by path."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return sorted(
        e.path for e in entries if is_temporary(e.name) and e.is_file(follow_symlinks=False)
    )


def remove_unfinished(directory: str) -> list[str]:
    """Remove the temporary files of interrupted image creations in ``directory``; leave
    one that somebody holds locked (a creation under way).  Returns the paths removed."""
    removed: list[str] = []
    for path in unfinished(directory):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                lock_image(fd, path, write=True)
            except ChainfsError as e:
                log.info("file=%s left alone: %s", path, e)
                continue
            os.unlink(path)
            removed.append(path)
        except OSError as e:
            raise HostIOError(
                f"removing the unfinished image {path!r} failed: {e.strerror}",
                e.errno or errno.EIO,
            ) from None
        finally:
            os.close(fd)
    if removed:
        try:
            sync_dir(directory)
        except OSError as e:
            raise HostIOError(
                f"syncing the directory {directory!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
    return removed


def set_backing(path: str, backing: str | None, backing_format: str | None) -> None:
    """Rewrite the backing string and format of the image at ``path``, crash-safely."""
    f = HostFile(path, True)
    try:
        repoint(f, hdr.read_header(f), backing, backing_format)
    finally:
        f.close()
