"""commit: merge layers down into a base, as QEMU's block-commit.

    [A] <- [B] <- [C] <- [D] <- [E]    commit top=D base=B   ->  [A] <- [B] <- [E]
    [A] <- [B] <- [C] <- [D] <- [E]    commit base=A         ->  [A]          (active)

**Intermediate commit** (``CommitJob``, top below the active layer): over the top's
length in 1 MiB steps, every cluster that the top or a layer between it and the base
holds is copied into the base as the top shows it (``CopyEngine.copy_step``: zero ranges as
zero writes, so the base stays sparse; a raw base gets real zeros only where it does
not read zeros already).  The base is reopened read-write for the job and first grown
to the top's size if it is shorter (the new area reading zeros, as the range past its
end did).  Guest writes go to the active layer, above everything the job touches, so
they need no tracking.  ``prepare`` then flushes the base, records the plan in the
journal, retires the leaving layers in the state file, rewrites the backing pointer of
the layer above the top (reopened read-write for it if needed) to the base, and
splices the chain.  The top stays a valid image; the layers between it and the base do
not (their base changed under them), and ``events`` says so (``LAYER_RETIRED
valid=false``).  Relative backing strings stay relative.

What a crash leaves at each step: README.md, "Crashes", commit.

**Active commit** (``ActiveCommitJob``, the top is the active layer): the mirror in
``mirror.py`` with the base as target, where the base already sits: copy, track guest
writes, ``JOB_READY``, then pivot at once (or on ``complete JOB`` with ``wait=ready``):
the state file records the base as the chain's active layer and the layers above it as
retired, and the chain continues on the base, opened read-write since the start of the
job.  The flat file, its name and its open descriptors do not change.  Cancel or
failure: no pointer and no record changes, the base goes back to read-only.
"""

from __future__ import annotations

import errno
import os

from ..control import BACKGROUND, CommandError, CommitCmd
from ..formats.base import Layer
from ..formats.qcow2 import bitmaps
from . import journal
from .backing import backing_string
from .base import Job
from .journal import Pending
from .mirror import MirrorJob, next_step
from .served import Served, chain_changed, launch, layer_of, refuse_busy, refuse_shared

STEP = 1 << 20


def start(served: Served, cmd: CommitCmd) -> None:
    """``commit [top=T] [base=B] [speed=RATE] [wait=ready] [copy-mode=MODE]``: the
    refusals of qemu-iotests 040, then an intermediate or an active commit."""
    refuse_busy(served)
    layers = served.chain.layers
    top = layer_of(served, cmd.top) if cmd.top else layers[0]
    base = layer_of(served, cmd.base) if cmd.base else layers[-1]
    job = _job(
        served, served.next_id("commit"), top, base, cmd.speed, cmd.wait_ready, cmd.copy_mode
    )
    launch(served, job)


def resume(served: Served, p: Pending) -> None:
    """Start again the commit ``p`` that a crash or an unmount interrupted."""
    top = layer_of(served, str(p.params.get("top")))
    base = layer_of(served, str(p.params.get("base")))
    speed = int(p.params.get("speed") or 0)
    mode = p.params.get("copy-mode")
    wait_ready = p.params.get("wait") == "ready"
    job = _job(served, p.id, top, base, speed, wait_ready, None if mode is None else str(mode))
    launch(served, job, resumes=p)


def _job(
    served: Served,
    job_id: str,
    top: Layer,
    base: Layer,
    speed: int,
    wait_ready: bool,
    copy_mode: str | None,
) -> Job:
    chain = served.chain
    t, b = chain.index_of(top), chain.index_of(base)
    top_name, base_name = os.path.basename(top.path), os.path.basename(base.path)
    if t == b:
        raise CommandError(
            errno.EINVAL, f"top and base are both {top_name!r}: a layer cannot commit into itself"
        )
    if b < t:
        raise CommandError(
            errno.EINVAL,
            f"{base_name!r} is not below {top_name!r} in chain {served.name!r} "
            "(top and base swapped?)",
        )
    # the base gets the data; an intermediate commit also rewrites the overlay above top
    refuse_shared(served, base, *([chain.layers[t - 1]] if t > 0 else []))
    if t > 0 and copy_mode is not None:
        # QEMU's block-commit has no copy mode: only the mirror of an active commit does
        raise CommandError(
            errno.EINVAL,
            f"copy-mode applies to an active commit only: {top_name!r} is not the active "
            f"layer of chain {served.name!r}, so guest writes never reach the commit",
        )
    if t == 0:
        return ActiveCommitJob(
            job_id,
            served,
            base,
            speed=speed,
            wait_ready=wait_ready,
            copy_mode=copy_mode or BACKGROUND,
        )
    return CommitJob(job_id, served, top, base, speed=speed)


class CommitJob(Job):
    """Intermediate commit: the top lies below the active layer."""

    type = "commit"

    def __init__(self, job_id: str, served: Served, top: Layer, base: Layer, *, speed: int) -> None:
        super().__init__(job_id, speed=speed, emit=served.emit)
        self.served = served
        self.top = top
        self.base = base
        self.reopened: list[Layer] = []  # layers this job reopened read-write
        self.len = top.virtual_size

    def details(self) -> list[tuple[str, object]]:
        return [
            ("top", os.path.basename(self.top.path)),
            ("base", os.path.basename(self.base.path)),
        ]

    def writes(self) -> list[str]:
        return [self.base.path]  # the overlay above the top reads it too

    def intent(self) -> dict[str, object]:
        return {"top": self.top.path, "base": self.base.path, "speed": self.speed}

    def flush_progress(self) -> None:
        self.base.flush()

    def _indices(self) -> tuple[int, int]:
        chain = self.served.chain
        return chain.index_of(self.top), chain.index_of(self.base)

    def _writable(self, layer: Layer) -> Layer:
        """``layer`` reopened read-write (as QEMU does for the base and the overlay)."""
        if layer.writable:
            return layer
        chain = self.served.chain
        new = chain.reopen(chain.index_of(layer), writable=True)
        self.reopened.append(new)
        return new

    async def run(self) -> None:
        await self.checkpoint(0)  # a cancel before the job started
        chain = self.served.chain
        t, b = self._indices()
        self.base = self._writable(self.base)
        over = chain.layers[t - 1]
        # past the top's end the overlay reads zeros through it: where the base is longer,
        # those zeros must reach the base too, or its data would show through afterwards
        length = max(self.top.virtual_size, min(over.virtual_size, self.base.virtual_size))
        if self.base.virtual_size < self.top.virtual_size:
            chain.grow_layer(b, self.top.virtual_size)
        self.len = length
        pos, copied = self.start, 0
        while pos < length:
            t, b = self._indices()
            n, held = next_step(chain, self.base, t, b, pos, length, STEP, copied=copied > 0)
            copied = chain.engine.copy_step(self.base, t, b, b, pos, n) if held else 0
            pos += n
            self.offset = pos
            self.journal_progress(pos)
            await self.checkpoint(copied)

    def prepare(self) -> None:
        chain = self.served.chain
        t, b = self._indices()
        with chain.lock:  # the leaving layers' bitmaps go into the base's
            bitmaps.merge_down(self.base, list(chain.layers[t:b]), None)
        self.base.flush()  # the copied data and its metadata, durable first
        over = self._writable(chain.layers[t - 1])
        leaving = chain.layers[t:b]
        paths = [layer.path for layer in leaving]
        old = leaving[-1]  # the layer that pointed at the base
        backing = backing_string(over.path, self.base.path, (old.path, old.backing_string))
        fmt = self.base.format_name
        self.journal_phase(
            "prepare", [journal.retire(paths), journal.set_backing(over.path, backing, fmt)]
        )
        self.served.source.retire(paths, self.served.name)
        over.set_backing(backing, fmt)
        chain.splice(t - 1, b)
        self._restore()
        for path in paths:
            # the top still shows what it showed; the layers below it had the base
            # changed under them
            self._emit(
                "LAYER_RETIRED",
                job=self.id,
                file=os.path.basename(path),
                path=path,
                valid=path == self.top.path,
            )
        chain_changed(self.served)

    def abort(self) -> None:
        self._restore()

    def _restore(self) -> None:
        chain = self.served.chain
        while self.reopened:
            layer = self.reopened.pop()
            if any(x is layer for x in chain.layers):
                new = chain.reopen(chain.index_of(layer), writable=False)
                if layer is self.base:
                    self.base = new


class ActiveCommitJob(MirrorJob):
    """Active commit: the top is the active layer; the base becomes it after a pivot."""

    type = "commit"

    def __init__(
        self,
        job_id: str,
        served: Served,
        base: Layer,
        *,
        speed: int,
        wait_ready: bool,
        copy_mode: str = BACKGROUND,
    ) -> None:
        super().__init__(job_id, served, speed=speed, wait_ready=wait_ready, copy_mode=copy_mode)
        self.top = served.chain.active
        self.base = base
        self.reopened = False
        self.len = self.top.virtual_size

    def details(self) -> list[tuple[str, object]]:
        return [
            ("top", os.path.basename(self.top.path)),
            ("base", os.path.basename(self.base.path)),
            *super().details(),
        ]

    def writes(self) -> list[str]:
        return [self.base.path]  # the overlay above the top reads it too

    def intent(self) -> dict[str, object]:
        return {
            "top": self.top.path,
            "base": self.base.path,
            "speed": self.speed,
            "wait": "ready" if self.wait_ready else None,
            "copy-mode": self.copy_mode,
        }

    def open_target(self) -> Layer:
        chain = self.served.chain
        b = chain.index_of(self.base)
        if not self.base.writable:
            self.base = chain.reopen(b, writable=True)
            self.reopened = True
        if self.base.virtual_size < chain.size:
            chain.grow_layer(b, chain.size)
        return self.base

    def stop(self) -> int:
        return self.served.chain.index_of(self.base)

    def below(self) -> int:
        return self.served.chain.index_of(self.base)

    def pivot(self) -> None:
        chain, name = self.served.chain, self.served.name
        b = chain.index_of(self.base)
        paths = [layer.path for layer in chain.layers[:b]]
        with chain.lock:  # the base takes over the bitmaps (enabled as in the active)
            bitmaps.merge_down(self.base, list(chain.layers[:b]), chain.active)
            self.base.flush()
        self.journal_phase(
            "pivot", [journal.retire(paths), journal.record_active(name, self.base.path)]
        )
        self.served.source.move_active(name, self.base.path, paths)
        # the old active layer still shows what it showed; the ones below it do not
        self.switch(b, None, [i == 0 for i in range(b)])

    def release(self) -> None:
        if self.reopened:
            chain = self.served.chain
            self.base = chain.reopen(chain.index_of(self.base), writable=False)
            self.reopened = False
