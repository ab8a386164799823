"""The exceptions chainfs raises, each carrying the errno it becomes at the FUSE boundary.

Everything below the filesystem layer raises these; only ``fs`` turns them into
``FUSEError`` and only ``cli`` turns them into exit codes.
"""

from __future__ import annotations

import errno


class ChainfsError(Exception):
    """Base class: a short, lower-case message naming the broken constraint."""

    errno: int = errno.EIO


class ImageError(ChainfsError):
    """An image file is malformed, corrupt or hostile."""

    errno = errno.EIO


class UnsupportedFeature(ImageError):
    """An image uses a feature chainfs refuses to handle (encryption, external data, ...)."""

    errno = errno.EOPNOTSUPP


class ChainError(ChainfsError):
    """A chain cannot be assembled: missing backing file, loop, absurd depth."""

    errno = errno.ENOENT


class ReadOnlyError(ChainfsError):
    """A write was attempted on something opened read-only."""

    errno = errno.EROFS


class LockError(ChainfsError):
    """Another process holds a conflicting QEMU image lock."""

    errno = errno.EBUSY
