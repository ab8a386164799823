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

What a crash leaves, step by step:

- during the copy: the old chain, showing the same content (the base changed only where
  the layers above it mask it); the job restarts from its last journalled checkpoint,
  which was recorded only after the base was flushed up to it;
- after the base was grown: the same, with a longer base whose new area reads zeros;
- after the state file retired the leaving layers: the old chain still, served under its
  name (the retired layers are inside it);
- after the overlay's backing pointer was rewritten (one header write, crash-safe):
  the new chain; the journal's phase record finishes whatever is left.

**Active commit** (``ActiveCommitJob``, the top is the active layer): the mirror in
``mirror.py`` with the base as target, where the base already sits: copy, track guest
writes, ``JOB_READY``, then pivot at once (or on ``complete JOB`` with ``wait=ready``):
the state file records the base as the chain's active layer and the layers above it as
retired, and the chain continues on the base, opened read-write since the start of the
job.  The flat file, its name and its open descriptors do not change.  A crash before
the state file changes leaves the old chain (showing the same content); after, the base
as the active layer holding every acknowledged write.  Cancel or failure: no pointer
and no record changes, the base goes back to read-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..formats.base import Layer
from . import journal
from .base import Job
from .mirror import MirrorJob, next_step

if TYPE_CHECKING:
    from ..disk import Disk

STEP = 1 << 20


def backing_string(node: Layer, old_over: Layer, base: Layer) -> str:
    """The backing string ``node`` gets to point at ``base``, which ``old_over`` pointed at.

    ``old_over``'s string when both sit in one directory (it resolves the same from
    there); a path relative to ``node`` when that string was relative (relative chains
    stay relative); otherwise the base's absolute path.
    """
    node_dir = os.path.dirname(node.path)
    old = old_over.backing_string
    if old and os.path.dirname(old_over.path) == node_dir:
        return old
    if old and not os.path.isabs(old):
        return os.path.relpath(base.path, node_dir)
    return base.path


class CommitJob(Job):
    """Intermediate commit: the top lies below the active layer."""

    type = "commit"

    def __init__(
        self,
        job_id: str,
        disk: Disk,
        top: Layer,
        base: Layer,
        *,
        speed: int,
        emit: Callable[..., None],
    ) -> None:
        super().__init__(job_id, speed=speed, emit=emit)
        self.disk = disk
        self.top = top
        self.base = base
        self.reopened: list[Layer] = []  # layers this job reopened read-write
        self.len = top.virtual_size

    def details(self) -> list[tuple[str, object]]:
        return [
            ("top", os.path.basename(self.top.path)),
            ("base", os.path.basename(self.base.path)),
        ]

    def intent(self) -> dict[str, object]:
        return {"top": self.top.path, "base": self.base.path, "speed": self.speed}

    def flush_progress(self) -> None:
        self.base.flush()

    def _indices(self) -> tuple[int, int]:
        chain = self.disk.chain
        return chain.index_of(self.top), chain.index_of(self.base)

    def _writable(self, layer: Layer) -> Layer:
        """``layer`` reopened read-write (as QEMU does for the base and the overlay)."""
        if layer.writable:
            return layer
        chain = self.disk.chain
        new = chain.reopen(chain.index_of(layer), writable=True)
        self.reopened.append(new)
        return new

    async def run(self) -> None:
        await self.checkpoint(0)  # a cancel before the job started
        chain = self.disk.chain
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
        chain = self.disk.chain
        self.base.flush()  # the copied data and its metadata, durable first
        t, b = self._indices()
        over = self._writable(chain.layers[t - 1])
        leaving = chain.layers[t:b]
        paths = [layer.path for layer in leaving]
        backing = backing_string(over, leaving[-1], self.base)
        fmt = self.base.format_name
        self.journal_phase(
            "prepare", [journal.retire(paths), journal.set_backing(over.path, backing, fmt)]
        )
        self.disk.source.retire(paths)
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
        self.disk.chain_changed()

    def abort(self) -> None:
        self._restore()

    def _restore(self) -> None:
        chain = self.disk.chain
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
        disk: Disk,
        base: Layer,
        *,
        speed: int,
        wait_ready: bool,
        emit: Callable[..., None],
    ) -> None:
        super().__init__(job_id, disk, speed=speed, wait_ready=wait_ready, emit=emit)
        self.top = disk.chain.active
        self.base = base
        self.reopened = False
        self.len = self.top.virtual_size

    def details(self) -> list[tuple[str, object]]:
        return [
            ("top", os.path.basename(self.top.path)),
            ("base", os.path.basename(self.base.path)),
        ]

    def intent(self) -> dict[str, object]:
        return {
            "top": self.top.path,
            "base": self.base.path,
            "speed": self.speed,
            "wait": "ready" if self.wait_ready else None,
        }

    def open_target(self) -> Layer:
        chain = self.disk.chain
        b = chain.index_of(self.base)
        if not self.base.writable:
            self.base = chain.reopen(b, writable=True)
            self.reopened = True
        if self.base.virtual_size < chain.size:
            chain.grow_layer(b, chain.size)
        return self.base

    def stop(self) -> int:
        return self.disk.chain.index_of(self.base)

    def below(self) -> int:
        return self.disk.chain.index_of(self.base)

    def pivot(self) -> None:
        chain, name = self.disk.chain, self.disk.name
        b = chain.index_of(self.base)
        paths = [layer.path for layer in chain.layers[:b]]
        self.journal_phase(
            "pivot", [journal.retire(paths), journal.record_active(name, self.base.path)]
        )
        self.disk.source.move_active(name, self.base.path, paths)
        # the old active layer still shows what it showed; the ones below it do not
        self.switch(b, None, [i == 0 for i in range(b)])

    def release(self) -> None:
        if self.reopened:
            chain = self.disk.chain
            self.base = chain.reopen(chain.index_of(self.base), writable=False)
            self.reopened = False
