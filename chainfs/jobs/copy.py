"""copy: live block copy into a new image, as QEMU's blockdev-mirror.

    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=full   ->  [F]
    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=top    ->  [A] <- [B] <- [C] <- [D] <- [F]

The command checks DEST (allowed directory, not existing) so a bad target is refused by
the write itself; the job creates it when it starts, once the journal holds its intent:
a qcow2 v3 image of the disk's size, with no backing file for ``full``, backed by the
active layer's backing file for ``top`` (its string kept verbatim when DEST sits beside
the active layer, absolute otherwise).  The job is the mirror of ``mirror.py``
with DEST as target: copy what the whole chain (``full``) or only the active layer
(``top``) holds, track guest writes so they reach DEST too, ``JOB_READY``, then pivot
at once (or on ``complete JOB`` with ``wait=ready``): the state file records DEST as the
chain's active layer and the layers it replaces as retired (they stay valid images,
nothing changed them), and the chain continues on DEST.  The flat file, its name and its
open descriptors do not change.

What a crash leaves: before DEST is complete as an empty image (it is written under a
temporary name, then renamed into place), no DEST at all, at most a temporary file that
the next mount removes; before the pivot's state-file replace, the original chain,
untouched, and DEST as a partial copy (an ordinary file; in the source directory the
next mount would serve it as a chain of its own, as it would any image it finds);
after it, DEST as the active layer holding every acknowledged write (all were copied
and flushed first).  Cancel or failure before the pivot leaves the original chain
active and DEST behind, closed and consistent, as an ordinary file: chainfs never
deletes it, and records it as retired so that the next mount does not serve it as a
chain (``COPY_ABANDONED`` in ``events`` names it).  An unmount only suspends the
job: DEST stays its target, and the next mount resumes the copy.
"""

from __future__ import annotations

import os

from ..control import BACKGROUND, CopyCmd
from ..formats.base import Layer
from ..formats.qcow2 import bitmaps, create_image
from . import journal
from .backing import backing_string
from .journal import Pending
from .mirror import MirrorJob
from .served import Served, check_target, launch, refuse_busy, vet_new_file

FULL, TOP = "full", "top"


def start(served: Served, cmd: CopyCmd) -> None:
    """``copy DEST [sync=full|top] [speed=RATE] [wait=ready] [copy-mode=MODE]``: DEST
    must be new and in a directory chainfs may write to; the job creates it when it
    starts."""
    refuse_busy(served)
    dest = check_target(served, cmd.dest)
    job = CopyJob(
        served.next_id("copy"),
        served,
        dest,
        cmd.sync,
        speed=cmd.speed,
        wait_ready=cmd.wait_ready,
        copy_mode=cmd.copy_mode,
    )
    launch(served, job)


def resume(served: Served, p: Pending) -> None:
    """Start again the copy ``p`` that a crash or an unmount interrupted, into its own
    partial DEST (copied over again)."""
    refuse_busy(served)
    job = CopyJob(
        p.id,
        served,
        str(p.params.get("dest")),
        str(p.params.get("sync") or FULL),
        speed=int(p.params.get("speed") or 0),
        wait_ready=p.params.get("wait") == "ready",
        copy_mode=str(p.params.get("copy-mode") or BACKGROUND),
    )
    launch(served, job, resumes=p)


class CopyJob(MirrorJob):
    type = "copy"

    def __init__(
        self,
        job_id: str,
        served: Served,
        dest: str,
        sync: str,
        *,
        speed: int,
        wait_ready: bool,
        copy_mode: str = BACKGROUND,
    ) -> None:
        super().__init__(job_id, served, speed=speed, wait_ready=wait_ready, copy_mode=copy_mode)
        self.dest = dest
        self.sync = sync
        self.created = False
        self.len = served.chain.size

    def details(self) -> list[tuple[str, object]]:
        return [("dest", self.dest), ("sync", self.sync), *super().details()]

    def intent(self) -> dict[str, object]:
        return {
            "dest": self.dest,
            "sync": self.sync,
            "speed": self.speed,
            "wait": "ready" if self.wait_ready else None,
            "copy-mode": self.copy_mode,
        }

    def open_target(self) -> Layer:
        # created here, after the journal recorded the intent, not by the command
        chain = self.served.chain
        active = chain.active
        backing: str | None = None
        fmt: str | None = None
        if self.sync == TOP and len(chain.layers) > 1:
            below = chain.layers[1]
            fmt = below.format_name
            backing = backing_string(self.dest, below.path, (active.path, active.backing_string))
        if self.previous is not None and os.path.lexists(self.dest):
            # resuming, on the partial copy of the interrupted job (complete as an image:
            # it got its name only then; the mirror's first pass copies everything
            # again, as what was copied after its last flush is unknown)
            self.created = True
            return chain.open_layer(self.dest, "qcow2", writable=True)
        vet = vet_new_file(self.served, self.dest)
        image = create_image(
            self.dest, size=chain.size, backing=backing, backing_format=fmt, vet=vet
        )
        self.created = True
        return chain.adopt_layer(image)  # on the descriptor that holds its lock

    def stop(self) -> int:
        layers = self.served.chain.layers
        return len(layers) if self.sync == FULL else 1

    def below(self) -> int:
        # full: DEST has no backing file (read_below of the last layer is all zeros)
        return len(self.served.chain.layers) - 1 if self.sync == FULL else 0

    def pivot(self) -> None:
        chain, name = self.served.chain, self.served.name
        count = self.stop()
        paths = [layer.path for layer in chain.layers[:count]]
        assert self.target is not None
        with chain.lock:  # DEST takes over the bitmaps (enabled as in the active)
            bitmaps.merge_down(self.target, list(chain.layers[:count]), chain.active)
            self.target.flush()
        self.journal_phase("pivot", [journal.retire(paths), journal.record_active(name, self.dest)])
        self.served.source.move_active(name, self.dest, paths)
        self.switch(count, self.target, [True] * count)

    def release(self) -> None:
        target, self.target = self.target, None
        try:
            if target is not None:
                target.close()  # closed even when its write-back fails (a full disk)
        finally:
            if self.created and not self.suspended:
                # an ordinary file from now on, not a chain the next mount should serve
                # (should the state file not take that now, its next save records it);
                # a copy suspended at unmount stays the target of the job the next
                # mount resumes (the journal keeps it from being served meanwhile)
                self._emit("COPY_ABANDONED", job=self.id, file=self.dest)
                self.served.source.retire([self.dest], self.served.name)
