"""What a job sees of the chain it runs on, and the checks every job command makes.

A job module owns its command from end to end (arguments checked against the chain,
refusal with an errno and a reason, start, run, prepare, abort); the served chain it
works on reaches it only through ``Served``, a ``Protocol`` that the mount's ``Disk``
satisfies (and a test's stand-in can), so no job imports the module that serves the
chain.  The checks here are the ones several commands share: a layer named by file name
or path, a chain already busy, a layer another chain of the mount reads, a new file's
place.  Each raises ``CommandError`` with the SPEC's errno.

Locking contract: used only from the trio thread.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..confine import _fd_path
from ..control import CommandError
from .base import CONCLUDED

if TYPE_CHECKING:
    from ..chain import Chain
    from ..formats.base import Layer
    from ..source import Source
    from ..views import Views
    from .base import Job
    from .journal import Journal, Pending

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


class Served(Protocol):
    """A chain as the mount serves it, as far as its jobs are concerned."""

    name: str
    chain: Chain
    source: Source  # the state file: active layers and retired ones
    journal: Journal | None  # None on a read-only mount
    allowed_dirs: list[str]  # where new files may go (real paths)
    job: Job | None  # the chain's job (the last one, maybe over)
    spawn: Spawn  # runs a job's task in the mount's nursery
    next_id: Callable[[str], str]  # a new job id of a kind, never used before
    views: Views  # the chain's layer views (``layers/NAME/``)
    readonly: bool  # served read-only (the mount's option, or ``warning`` says why)
    warning: str | None  # why, shown in ``status``

    readers: Readers  # the mount's chains by the layers they read

    def status_changed(self) -> None:
        """The chain's layers changed: what ``.status`` and ``readers`` know of it."""

    @property
    def emit(self) -> Callable[..., None]:
        """``emit(EVENT, key=value, ...)``: append one line to the chain's ``events``."""


class Readers:
    """The mount's chains by the real path of each layer file they read: who else reads
    a layer, found without a walk of the mount's chains (``refuse_shared``).

    A chain is added when it is served and again whenever its layers change
    (``chain_changed``), and never taken out: a layer leaves a chain (stream, commit,
    copy) but no job makes a chain read a file another one reads (what a job creates is
    new), so the readers found are a superset, each then checked against its chain's
    layers of the moment.  A check costs the layers of the chains that share the
    layer, not the mount's chains."""

    def __init__(self) -> None:
        # real path -> the chains by identity (a golden base of thousands: no scan to add)
        self._by_path: dict[str, dict[int, Served]] = {}

    def add(self, served: Served, reals: list[str] | None = None) -> None:
        """``served`` reads its chain's layers (``reals``: their real paths, when the
        caller resolved them already, in a worker thread)."""
        if reals is None:
            reals = [os.path.realpath(layer.path) for layer in served.chain.layers]
        for real in reals:
            self._by_path.setdefault(real, {})[id(served)] = served

    def of(self, path: str) -> list[Served]:
        """The chains that read, or once read, the layer at real path ``path``."""
        return list(self._by_path.get(path, {}).values())


class Watched:
    """The served chain's ``.status`` line kept up to date: whoever sets a field the line
    shows (``SHOWN_IN_STATUS`` in ``disk.py``) says so, ``shown_changed``, and a change of
    its layers is said by ``status_changed`` (from ``chain_changed``); either tells
    ``on_status`` (the mount then renders that chain's line again).  Said, not watched: a
    ``__setattr__`` would cost a Python call at every set of any attribute, the flat
    file's times at each guest write among them.  Here rather than in the mount's
    ``Disk``, which inherits it: a job that changes the chain stays in the job modules
    (``tests/interop/test_job_model.py``)."""

    on_status: Callable[[Any], None]
    readers: Readers

    def shown_changed(self) -> None:
        """A field of the chain's line of ``.status`` was set (its chain, ownership,
        warning): the line is rendered again at the next read."""
        self.on_status(self)

    def status_changed(self) -> None:
        """The chain's layers changed: its active layer may be another, and other chains
        may read its new layers."""
        self.readers.add(cast("Served", self))
        self.on_status(self)


def chain_changed(served: Served) -> None:
    """Say in ``events`` that the chain's layers changed, and how they stand; the layer
    views, ``.status`` and the mount's ``readers`` follow."""
    served.views.refresh()
    served.status_changed()
    layers = served.chain.layers
    served.emit(
        "CHAIN_CHANGED",
        layers=" <- ".join(os.path.basename(x.path) for x in reversed(layers)),
    )


def refuse_busy(served: Served) -> None:
    """One job at a time on a chain."""
    job = served.job
    if job is not None and job.status != CONCLUDED:
        raise CommandError(errno.EBUSY, f"chain {served.name!r} is busy: job {job.id!r} is running")


def layer_of(served: Served, ref: str) -> Layer:
    """A layer named by its file name (as in ``chain``) or its absolute path."""
    layers = served.chain.layers
    if os.path.isabs(ref):
        found = [x for x in layers if x.path == os.path.normpath(ref)]
    else:
        found = [x for x in layers if os.path.basename(x.path) == ref]
    if not found:
        raise CommandError(errno.EINVAL, f"{ref!r} is not a layer of chain {served.name!r}")
    if len(found) > 1:
        raise CommandError(errno.EINVAL, f"{ref!r} names several layers; give a full path")
    return found[0]


def refuse_shared(served: Served, *layers: Layer) -> None:
    """Refuse a job that would write into a layer another chain of the mount reads (a
    shared base): its image lock would refuse the job anyway, as QEMU's does, but in
    words that blame another process.  Only the chains that ever read the layer are
    looked at (``Readers``), never every chain of the mount."""
    for layer in layers:
        path = os.path.realpath(layer.path)
        for other in served.readers.of(path):
            if other is not served and any(
                os.path.realpath(x.path) == path for x in other.chain.layers
            ):
                raise CommandError(
                    errno.EBUSY,
                    f"{os.path.basename(layer.path)!r} is also a layer of chain "
                    f"{other.name!r}: no job may write into it while another chain reads it",
                )


def check_target(served: Served, target: str) -> str:
    """Where a new file may go: an allowed directory, not existing yet (relative names
    go beside the active layer)."""
    if not os.path.isabs(target):
        target = os.path.join(os.path.dirname(served.chain.active.path), target)
    target = os.path.normpath(target)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise CommandError(errno.ENOENT, f"directory {parent!r} does not exist")
    real_parent = os.path.realpath(parent)
    if _outside(real_parent, served):
        raise CommandError(
            errno.EACCES, f"{target!r} is outside the directories chainfs may write to"
        )
    if os.path.lexists(target):
        raise CommandError(errno.EEXIST, f"{target!r} already exists")
    return target


def _outside(real: str, served: Served) -> bool:
    return not any(real == d or real.startswith(d + "/") for d in served.allowed_dirs)


def vet_new_file(served: Served, target: str) -> Callable[[int], None]:
    """What checks, by its open descriptor, that the file made at ``target`` (passed by
    ``check_target``, by path, a while ago) lies in an allowed directory: the kernel's
    path of the descriptor, after every symlink, not the one checked (``create_image``
    removes it otherwise)."""

    def vet(fd: int) -> None:
        real = _fd_path(fd)
        if real is not None and _outside(real, served):
            raise CommandError(
                errno.EACCES,
                f"{target!r} is outside the directories chainfs may write to (it resolves "
                f"to {real!r}: a directory on its path changed)",
            )

    return vet


def remove_inside(served: Served, path: str) -> None:
    """Remove the file ``path`` (``OSError``) if its directory, as the kernel finds it
    now, is an allowed one (``CommandError`` otherwise): relative to a descriptor of the
    directory, so that no symlink swapped in after the check sends the removal
    elsewhere."""
    parent, name = os.path.split(os.path.abspath(path))
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        real = _fd_path(dfd) or os.path.realpath(parent)
        if _outside(real, served):
            raise CommandError(
                errno.EACCES, f"{path!r} is outside the directories chainfs may write to"
            )
        os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


def launch(served: Served, job: Job, resumes: Pending | None = None) -> None:
    """Journal a new job's intent (taking the place of the interrupted job it
    ``resumes``), then run it in the background; refused (EBUSY) while an open layer
    view reads a layer the job would write into."""
    served.views.refuse(job.id, job.writes())
    try:
        job.attach(served.journal, served.name, resumes)
    except BaseException:
        served.views.writing.clear()
        raise
    served.job = job

    async def run() -> None:
        try:
            await job.execute()
        finally:  # before any task waiting for the job runs again
            served.chain.engine.drop_buffers()
            served.views.job_ended()

    served.spawn(run)
