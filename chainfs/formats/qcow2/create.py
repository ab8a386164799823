"""Making qcow2 images and rewriting their backing pointer, without opening them as a
layer (QEMU's ``qcow2_co_create`` and ``qcow2_change_backing_file``).

``create_overlay`` writes everything but the header first and the header last, so a
crash leaves either a complete image or a file that is not qcow2; ``set_backing``
rewrites the header in the order ``header.rewrite_backing`` keeps crash-safe.
"""

from __future__ import annotations

import errno
import os

from ...errors import ImageError
from ...hostfile import HostFile, HostIOError, sync_dir
from . import header as hdr
from .entries import U64 as _U64
from .refcounts import set_entry


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
    """Create a new, empty qcow2 v3 image (refusing an existing path).

    Everything but the header is written and flushed first; the header with its magic
    comes last, so a crash leaves either a complete image or a file that is not qcow2.
    """
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
    f = HostFile(path, True, create=True)
    try:
        f.pwrite(meta, cs)
        f.flush()
        f.pwrite(head + name, 0)
        f.flush()
    finally:
        f.close()
    _sync_dir(os.path.dirname(os.path.abspath(path)))


def _sync_dir(path: str) -> None:
    try:
        sync_dir(path)
    except OSError as e:
        raise HostIOError(
            f"syncing the directory {path!r} failed: {e.strerror}", e.errno or errno.EIO
        ) from None


def set_backing(path: str, backing: str | None, backing_format: str | None) -> None:
    """Rewrite the backing string and format of the image at ``path``, crash-safely."""
    f = HostFile(path, True)
    try:
        h = hdr.read_header(f)
        hdr.rewrite_backing(f, h, backing, backing_format)
    finally:
        f.close()
