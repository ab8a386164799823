"""Whether this chainfs has holes and discard on its flat files: the one place that says.

They need pyfuse3's ``lseek`` (SEEK_DATA/SEEK_HOLE) and ``fallocate`` handlers, which
pyfuse3 up to 3.5.0 lacks and ``third_party/pyfuse3`` adds (``pip install
./third_party/pyfuse3``, see the README's "Installing"). With a pyfuse3 without them,
chainfs works as before and says that holes and discard are off: the kernel then treats
the whole flat file as data and fails fallocate with EOPNOTSUPP.

pyfuse3 is imported only when asked (and cached), so that ``chainfs --version`` and the
commands that need no mount run without it and without its import time.
"""

from __future__ import annotations

import functools
import importlib
import inspect

from . import __version__

HANDLERS = ("lseek", "fallocate")


def has_handlers(operations: object) -> bool:
    """Does this pyfuse3 ``Operations`` class have the handlers holes and discard need?"""
    return all(callable(getattr(operations, name, None)) for name in HANDLERS)


@functools.cache
def pyfuse3_version() -> str | None:
    """The running pyfuse3's version (``3.5.0+chainfs.1``), None when it is missing."""
    try:
        module = importlib.import_module("pyfuse3")
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


@functools.cache
def holes() -> bool:
    """True when the running pyfuse3 passes SEEK_DATA/SEEK_HOLE and fallocate on."""
    try:
        module = importlib.import_module("pyfuse3")
    except ImportError:
        return False
    return has_handlers(module.Operations)


@functools.cache
def busy_poll() -> bool:
    """True when the running pyfuse3's ``main`` takes ``busy_poll``
    (``third_party/pyfuse3/busy-poll.patch``)."""
    try:
        module = importlib.import_module("pyfuse3")
        return "busy_poll" in inspect.signature(module.main).parameters
    except (ImportError, TypeError, ValueError):  # (no signature: not the patched one)
        return False


def describe(version: str | None, on: bool) -> str:
    """``pyfuse3 3.5.0+chainfs.1: holes and discard on``, or off with why."""
    if version is None:
        return "pyfuse3 not installed: holes and discard off"
    if on:
        return f"pyfuse3 {version}: holes and discard on"
    return f"pyfuse3 {version}: holes and discard off (unpatched pyfuse3, see README)"


def version_text() -> str:
    """What ``chainfs --version`` prints."""
    return f"chainfs {__version__} ({describe(pyfuse3_version(), holes())})"
