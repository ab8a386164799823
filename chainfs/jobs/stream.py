"""stream: copy into a layer what the layers between it and a base hold, then drop them.

    [A] <- [B] <- [C] <- [D] <- [E]    stream base=A          ->  [A] <- [E]
    [A] <- [B] <- [C] <- [D] <- [E]    stream node=D base=B   ->  [A] <- [B] <- [D] <- [E]
    [A] <- [B] <- [C] <- [D] <- [E]    stream (no base)       ->  [E]

As QEMU's block-stream: over the node's length in 1 MiB steps (steps with nothing to
copy passed over together), every cluster the node lacks and some layer strictly between
it and the base holds is copied in (zeros as zero clusters), with the check and the copy
under the chain's lock so a guest write is never overwritten by older data.  Progress
counts every step; the rate limit counts copied bytes.  Only after the copy is durable
does ``prepare`` record the leaving layers in the state file and rewrite the node's
backing pointer (crash-safely); the leaving layers stay on disk untouched.  A cancelled
or failed stream changes no pointer: what it copied is harmless, and it can simply be
started again.

After a crash it resumes from its last journalled checkpoint: what lies below it was
flushed into the node before the checkpoint was recorded, and every step re-checks
allocation anyway.  A crash inside ``prepare`` is finished by the next mount from the
journalled changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..formats.base import Layer
from . import journal
from .base import Job

if TYPE_CHECKING:
    from ..disk import Disk

STEP = 1 << 20  # as commit's and copy's; 512 KiB cost 12% more time in per-step work


def backing_string(layers: list[Layer], node: int, base: int) -> str:
    """The backing string ``layers[node]`` should get to point at ``layers[base]``.

    The string the base's current overlay uses is kept when that overlay sits in the
    node's directory (so relative chains stay relative); otherwise a name relative to
    the node when the base is beside it or that string was relative (``../dir1/b.img``
    pointing at a sibling directory stays relative, as libvirt keeps it, so the tree
    can move), else the absolute path.
    """
    target, over = layers[base], layers[base - 1]
    node_dir = os.path.dirname(layers[node].path)
    if over.backing_string and os.path.dirname(over.path) == node_dir:
        return over.backing_string
    if os.path.dirname(target.path) == node_dir:
        return os.path.basename(target.path)
    if over.backing_string and not os.path.isabs(over.backing_string):
        return os.path.relpath(target.path, node_dir)
    return target.path


class StreamJob(Job):
    type = "stream"

    def __init__(
        self,
        job_id: str,
        disk: Disk,
        node: Layer,
        base: Layer | None,
        *,
        speed: int,
        emit: Callable[..., None],
    ) -> None:
        super().__init__(job_id, speed=speed, emit=emit)
        self.disk = disk
        self.node = node
        self.base = base
        self.reopened = False
        self.len = node.virtual_size

    def details(self) -> list[tuple[str, object]]:
        base = os.path.basename(self.base.path) if self.base else None
        return [("node", os.path.basename(self.node.path)), ("base", base)]

    def intent(self) -> dict[str, object]:
        base = self.base.path if self.base else None
        return {"node": self.node.path, "base": base, "speed": self.speed}

    def flush_progress(self) -> None:
        self.node.flush()

    def _indices(self) -> tuple[int, int]:
        chain = self.disk.chain
        n = chain.index_of(self.node)
        stop = chain.index_of(self.base) if self.base else len(chain.layers)
        return n, stop

    async def run(self) -> None:
        chain = self.disk.chain
        n, _ = self._indices()
        if not self.node.writable:
            # an intermediate layer is reopened read-write for the job, as QEMU does
            self.node = chain.reopen(n, writable=True)
            self.reopened = True
        pos = self.start
        while pos < self.len:
            n, stop = self._indices()
            # whole steps with nothing to copy are passed over in one go
            skip = (chain.engine.stream_next(n, stop, pos, self.len) - pos) // STEP * STEP
            if skip:
                pos = min(pos + skip, self.len)
                copied = 0
            else:
                copied = chain.engine.stream_step(n, stop, pos, STEP)
                pos = min(pos + STEP, self.len)
            self.offset = pos
            self.journal_progress(pos)
            await self.checkpoint(copied)

    def prepare(self) -> None:
        chain = self.disk.chain
        n, stop = self._indices()
        self.node.flush()  # the copied data and its metadata, durable first
        leaving = [layer.path for layer in chain.layers[n + 1 : stop]]
        if self.base is None:
            backing, fmt = None, None
        else:
            backing = backing_string(chain.layers, n, stop)
            fmt = self.base.format_name
        self.journal_phase(
            "prepare",
            [journal.retire(leaving), journal.set_backing(self.node.path, backing, fmt)],
        )
        if leaving:
            self.disk.source.retire(leaving)
        self.node.set_backing(backing, fmt)
        chain.splice(n, None if self.base is None else stop)
        self._restore()
        self.disk.chain_changed()

    def abort(self) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.reopened:
            chain = self.disk.chain
            self.node = chain.reopen(chain.index_of(self.node), writable=False)
            self.reopened = False
