"""Format drivers: open one image file as a layer, by its declared or probed format."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ..errors import ImageError
from ..hostfile import HostFile
from .base import Layer
from .qcow2 import Qcow2Layer
from .qcow2.header import MAGIC
from .raw import RawLayer

FORMATS = ("qcow2", "raw")


def probe(f: HostFile) -> str:
    """Guess a format the way QEMU does for the formats chainfs knows."""
    return "qcow2" if f.pread(4, 0) == MAGIC else "raw"


def is_qcow2(path: str) -> bool:
    """Whether the file at ``path`` starts with qcow2's magic (an image chainfs made is
    complete whenever it has its name); raises ``OSError`` when it cannot be read."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def open_layer(
    path: str, fmt: str | None, *, writable: bool, vet: Callable[[int], None] | None = None
) -> Layer:
    """Open ``path`` as a layer; ``fmt`` None means probe (safe only for the top).

    ``vet``, if given, is called with the open descriptor before anything is read from
    it, and may refuse the file by raising."""
    if fmt is not None and fmt not in FORMATS:
        raise ImageError(f"{path!r} has format {fmt!r}; chainfs handles qcow2 and raw")
    _check_file_type(path)
    return open_file(HostFile(path, writable), fmt, vet=vet)


def open_file(f: HostFile, fmt: str | None, *, vet: Callable[[int], None] | None = None) -> Layer:
    """A layer on the open file ``f`` (closed on failure); ``fmt`` and ``vet`` as for
    ``open_layer``."""
    try:
        if vet is not None:
            vet(f.fd)
        kind = fmt or probe(f)
        if kind == "qcow2":
            return Qcow2Layer(f)
        return RawLayer(f)
    except BaseException:
        f.close()
        raise


def _check_file_type(path: str) -> None:
    """Refuse what is not a regular file: a FIFO would block the open forever, and a
    device or /proc entry has no meaningful size."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # HostFile reports it, with the right error
    if not stat.S_ISREG(mode):
        raise ImageError(f"{os.path.abspath(path)!r} is not a regular file")


__all__ = ["FORMATS", "Layer", "is_qcow2", "open_file", "open_layer", "probe"]
