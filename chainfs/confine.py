"""Where a mount may open image files: the backing-file rule.

A backing string can name any file on the host, and a mount serves what its chains'
layers hold to whoever may open the flat file (with ``allow_other``, every user): an
image whose backing file is ``/etc/shadow`` (raw) would make the file's bytes readable.
So a mount opens a chain's layers, the active one included, only when the file's real
path (every symlink followed, ``..`` resolved) lies inside one of its ``Confinement``'s
roots: by default the directories the source gives (a directory source: that directory;
a TOML source: the TOML file's directory and the directory of the active layer it names
for the chain), then every ``allow_dir`` and every ``allow_backing`` (a directory, or
one file).  The test is a path-prefix test on real paths: ``/srv/img2`` is not inside
``/srv/img``.

Race safety: a file is checked by its real path before it is opened (so a file outside
is normally not even opened), and again after, by the path the kernel gives for the open
descriptor (``/proc/self/fd/N``): a symlink swapped in between the two cannot make the
mount serve a file it did not check.

``chainfs info``, ``check`` and ``digest`` run as the invoking user on files that user
names, and open chains without a confinement.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ChainError


class OutsideError(ChainError):
    """A layer lies outside the directories the mount may serve files from."""

    errno = errno.EACCES


def inside(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` or lies below it (a path-prefix test,
    not a string one: ``/srv/img2`` is not inside ``/srv/img``)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _fd_path(fd: int) -> str | None:
    """The path the kernel gives for an open descriptor (None: no /proc to ask)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@dataclass(frozen=True)
class Confinement:
    """The real paths a mount may open layers inside: directories, or single files."""

    roots: tuple[str, ...]

    @classmethod
    def of(cls, paths: Iterable[str]) -> Confinement:
        """The confinement to ``paths``, each resolved to its real path now."""
        return cls(tuple(dict.fromkeys(os.path.realpath(p) for p in paths)))

    def widened(self, paths: Iterable[str]) -> Confinement:
        return Confinement.of([*self.roots, *paths])

    def admits(self, real: str) -> bool:
        return any(inside(real, root) for root in self.roots)

    def check_path(self, path: str, what: str, shown: str) -> None:
        """Refuse ``path`` (about to be opened) unless its real path is admitted;
        ``what`` names it in the refusal ("backing file 'x' of 'y'"), by the string
        ``shown`` (the backing string, or the path)."""
        # the file opened is the one at the absolute path (``HostFile`` resolves ``..``
        # textually, before the kernel follows any symlink)
        real = os.path.realpath(os.path.abspath(path))
        if not self.admits(real):
            raise self._refusal(what, shown, real)

    def check_open(self, fd: int, path: str, what: str, shown: str) -> None:
        """Refuse the file open as ``fd`` (opened by ``path``) unless the file the
        kernel opened lies inside: what was checked by path may have been swapped."""
        real = _fd_path(fd)
        if real is None:
            # no /proc: the descriptor must be the file the real path names now
            real = os.path.realpath(os.path.abspath(path))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(real))
            except OSError:
                same = False
            if not same:
                raise OutsideError(f"{what} changed while it was opened; not served")
        if not self.admits(real):
            raise self._refusal(what, shown, real)

    def _refusal(self, what: str, shown: str, real: str) -> OutsideError:
        where = "lies" if real == shown else f"resolves to {real!r},"
        roots = ", ".join(repr(r) for r in self.roots)
        return OutsideError(
            f"{what} {where} outside the directories this mount serves files from "
            f"({roots}); -o allow_backing={os.path.dirname(real)} allows it"
        )
