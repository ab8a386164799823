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

import errno
import os

from ..control import CommandError, StreamCmd
from ..formats.base import Layer
from ..formats.qcow2 import bitmaps
from . import journal
from .backing import backing_string
from .base import Job
from .journal import Pending
from .served import Served, chain_changed, launch, layer_of, refuse_busy, refuse_shared

STEP = 1 << 20  # as commit's and copy's; 512 KiB cost 12% more time in per-step work


def start(served: Served, cmd: StreamCmd) -> None:
    """``stream [node=N] [base=B] [speed=RATE]``: check it against the chain, then run it."""
    refuse_busy(served)
    node = layer_of(served, cmd.node) if cmd.node else served.chain.active
    base = layer_of(served, cmd.base) if cmd.base else None
    launch(served, _job(served, served.next_id("stream"), node, base, cmd.speed))


def resume(served: Served, p: Pending) -> None:
    """Start again the stream ``p`` that a crash or an unmount interrupted."""
    node, base = p.params.get("node"), p.params.get("base")
    job = _job(
        served,
        p.id,
        layer_of(served, str(node)),
        layer_of(served, str(base)) if base else None,
        int(p.params.get("speed") or 0),
    )
    launch(served, job, resumes=p)


def _job(served: Served, job_id: str, node: Layer, base: Layer | None, speed: int) -> StreamJob:
    if node.format_name != "qcow2":
        raise CommandError(errno.EINVAL, f"cannot stream into {node.path!r}: it is raw")
    chain = served.chain
    n = chain.index_of(node)
    if base is not None and chain.index_of(base) <= n:
        raise CommandError(
            errno.EINVAL,
            f"{os.path.basename(base.path)!r} is not below "
            f"{os.path.basename(node.path)!r} in chain {served.name!r}",
        )
    refuse_shared(served, node)
    return StreamJob(job_id, served, node, base, speed=speed)


class StreamJob(Job):
    type = "stream"

    def __init__(
        self, job_id: str, served: Served, node: Layer, base: Layer | None, *, speed: int
    ) -> None:
        super().__init__(job_id, speed=speed, emit=served.emit)
        self.served = served
        self.node = node
        self.base = base
        self.reopened = False
        self.len = node.virtual_size

    def details(self) -> list[tuple[str, object]]:
        base = os.path.basename(self.base.path) if self.base else None
        return [("node", os.path.basename(self.node.path)), ("base", base)]

    def writes(self) -> list[str]:
        return [self.node.path]

    def intent(self) -> dict[str, object]:
        base = self.base.path if self.base else None
        return {"node": self.node.path, "base": base, "speed": self.speed}

    def flush_progress(self) -> None:
        self.node.flush()

    def _indices(self) -> tuple[int, int]:
        chain = self.served.chain
        n = chain.index_of(self.node)
        stop = chain.index_of(self.base) if self.base else len(chain.layers)
        return n, stop

    async def run(self) -> None:
        chain = self.served.chain
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
        chain = self.served.chain
        n, stop = self._indices()
        with chain.lock:  # the node keeps its bitmaps, with the leaving layers' merged in
            bitmaps.keep_merged(self.node, list(chain.layers[n + 1 : stop]))
        self.node.flush()  # the copied data and its metadata, durable first
        leaving = [layer.path for layer in chain.layers[n + 1 : stop]]
        if self.base is None:
            backing, fmt = None, None
        else:
            over = chain.layers[stop - 1]
            backing = backing_string(
                self.node.path, self.base.path, (over.path, over.backing_string)
            )
            fmt = self.base.format_name
        self.journal_phase(
            "prepare",
            [journal.retire(leaving), journal.set_backing(self.node.path, backing, fmt)],
        )
        if leaving:
            self.served.source.retire(leaving, self.served.name)
        self.node.set_backing(backing, fmt)
        chain.splice(n, None if self.base is None else stop)
        self._restore()
        chain_changed(self.served)

    def abort(self) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.reopened:
            chain = self.served.chain
            self.node = chain.reopen(chain.index_of(self.node), writable=False)
            self.reopened = False
