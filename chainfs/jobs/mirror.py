"""The mirror: copy a live disk into another image while the guest writes, then pivot.

    [A] <- [B] <- [C] <- [D] <- [E]    commit base=B (active)   ->  [A] <- [B]
    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=top           ->  [A] <- ... <- [D] <- [F]
    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=full          ->  [F]

The common engine of active commit (``commit.py``) and copy (``copy.py``), as QEMU's
``mirror.c`` is of an active ``block-commit`` and of ``blockdev-mirror``.  The target
will sit on ``layers[stop]`` (nothing for a full copy), so it must come to hold what the
layers above that show:

1. a first pass over the disk copies into the target every cluster that a layer of
   ``layers[:stop]`` holds (``CopyEngine.copy_step``), while a write hook on the chain marks
   every granule the guest writes behind the pass as dirty;
2. dirty granules are copied again until none is left: the target is in sync and the
   job reports ``JOB_READY``;
3. with ``wait=ready`` the job stays ``ready``, copying what the guest dirties, until
   ``complete JOB``; otherwise it goes on at once;
4. the pivot (``prepare``), one synchronous step that no guest request can interleave
   with: the last dirty granules are copied, the target is flushed, the state file
   records the target as the active layer and the layers above it as retired (one
   atomic replace), and the chain switches to the target in memory.

A crash before the state file is replaced leaves the chain the job started from, on disk
and in what it shows (an active commit writes into the base only what the layers above
mask; a copy writes only into its own new file); the target holds a partial copy.  A
crash after it leaves the target as the active layer, holding every write acknowledged
so far (they were all copied and flushed before the state file changed).  Cancel or
failure before the pivot changes no pointer and no record.

Locking contract: everything runs on the trio thread; a copy step holds the chain's lock.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..formats.base import Layer
from .base import READY, Job, JobCancelled
from .served import Served, chain_changed

if TYPE_CHECKING:
    from ..chain import Chain

log = logging.getLogger(__name__)

STEP = 1 << 20  # bytes per copy step
SCAN = 64 << 20  # bytes checked at once for anything to copy
GRANULE = 64 << 10  # dirty-tracking granularity (at least the target's cluster size)


def next_held(chain: Chain, target: Layer, top: int, stop: int, pos: int, end: int) -> int:
    """Where, from ``pos`` on, a layer of ``layers[top:stop]`` first answers for
    something, widened to whole clusters of ``target`` as ``CopyEngine.copy_step`` widens it:
    ``pos`` itself, or the start of the first unit holding something (a multiple of the
    unit, larger than ``pos``), or ``end`` if nothing does before it.

    One ``Chain.held_map`` per window of ``SCAN`` bytes, where ``copy_step`` walks every
    cluster's extents: the stretches of a sparse disk with nothing to copy are skipped
    at C speed.  Conservative: a layer shorter than the range answers for what lies past
    its end.
    """
    g = chain.granule
    a = max(g, target.cluster_size)  # both powers of two: aligned for both
    k = a // g  # granules per unit
    unit = pos - pos % a
    n = 1  # the unit at ``pos`` first (in a run of data, the usual answer), then windows
    while unit < end:
        i = chain.held_map(top, stop, unit, n * k).find(1)
        if i >= 0:
            return max(pos, unit + i // k * a)
        unit += n * a
        n = -(-(min(end, unit - unit % SCAN + SCAN) - unit) // a)  # units to the window end
    return end


def next_step(
    chain: Chain,
    target: Layer,
    top: int,
    stop: int,
    pos: int,
    end: int,
    step: int,
    *,
    copied: bool = False,
) -> tuple[int, bool]:
    """How far a copy pass goes from ``pos`` next, and whether to copy there: up to where
    a layer of ``layers[top:stop]`` first holds something (nothing to copy), or one
    ``step`` from ``pos`` when one holds something at ``pos`` (``pos`` stays aligned to
    the target's clusters, as the steps are).  Right after a step that ``copied``
    something, the next one is taken without looking (data comes in runs; a step that
    finds nothing costs ``copy_step`` no more than the look would)."""
    if copied:
        return min(step, end - pos), True
    start = next_held(chain, target, top, stop, pos, end)
    if start > pos:
        return start - pos, False
    return min(step, end - pos), True


class DirtyMap:
    """The granules the guest wrote since the job last copied them.

    Kept as a set of granule numbers, so memory follows what was written, not the size
    of the disk.  Writes at or past ``horizon`` (the first pass's position) are not
    recorded: the pass will copy them when it gets there.
    """

    def __init__(self, granule: int, wake: Callable[[], None]) -> None:
        self.granule = granule
        self.horizon = 0
        self._dirty: set[int] = set()
        self._wake = wake

    def mark(self, offset: int, length: int) -> None:
        g = self.granule
        end = min(offset + length, self.horizon)
        if offset < end:
            self._dirty.update(range(offset // g, -(-end // g)))
            self._wake()

    def __len__(self) -> int:
        return len(self._dirty)

    def take(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Up to ``limit`` bytes (None: all) of dirty ranges, lowest first, as
        ``(offset, length)``; they count as clean from now on."""
        g = self.granule
        if limit is None:
            picked = sorted(self._dirty)
            self._dirty.clear()
        else:
            picked = heapq.nsmallest(max(1, limit // g), self._dirty)
            self._dirty.difference_update(picked)
        ranges: list[tuple[int, int]] = []
        for i in picked:
            if ranges and ranges[-1][0] + ranges[-1][1] == i * g:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + g)
            else:
                ranges.append((i * g, g))
        return ranges


class MirrorJob(Job):
    """Copy the disk into a target with dirty tracking, report ready, pivot."""

    def __init__(self, job_id: str, served: Served, *, speed: int, wait_ready: bool) -> None:
        super().__init__(job_id, speed=speed, emit=served.emit)
        self.served = served
        self.wait_ready = wait_ready
        self.target: Layer | None = None
        self.dirty: DirtyMap | None = None
        self.pivoted = False
        self._completing = False
        self._kick = trio.Event()

    # -- what the operations supply ----------------------------------------------------------

    def open_target(self) -> Layer:
        """Open (or reopen read-write) the target; called when the job starts."""
        raise NotImplementedError

    def stop(self) -> int:
        """The target is to hold what ``layers[:stop]`` hold."""
        raise NotImplementedError

    def below(self) -> int:
        """The target's backing shows what ``Chain.read_below(below)`` does."""
        raise NotImplementedError

    def pivot(self) -> None:
        """Record the new chain on disk, then switch to it (target flushed, in sync)."""
        raise NotImplementedError

    def release(self) -> None:
        """Undo ``open_target`` after a cancel or failure before the pivot."""

    # -- control -----------------------------------------------------------------------------

    def cancel(self) -> None:
        super().cancel()
        self._kick.set()

    def complete(self) -> None:
        """Pivot a job waiting in ``ready`` (the caller checked that it is)."""
        self._completing = True
        self._kick.set()

    def _wake(self) -> None:
        self._kick.set()

    # -- the copy ----------------------------------------------------------------------------

    def _copy(self, offset: int, length: int) -> int:
        assert self.target is not None
        return self.served.chain.engine.copy_step(
            self.target, 0, self.stop(), self.below(), offset, length
        )

    async def run(self) -> None:
        await self.checkpoint(0)  # a cancel before the job started
        chain = self.served.chain
        self.target = self.open_target()
        size = min(chain.size, self.target.virtual_size)
        granule = max(GRANULE, self.target.cluster_size)
        step = max(STEP, granule)
        self.dirty = dirty = DirtyMap(granule, self._wake)
        chain.write_hooks.append(dirty.mark)
        self.len = size
        pos = copied = 0
        while pos < size:
            # the check and the horizon move in one synchronous stretch: a guest write
            # lands before both (and is copied or found) or after (and is marked dirty)
            n, held = next_step(
                chain, self.target, 0, self.stop(), pos, size, step, copied=copied > 0
            )
            copied = self._copy(pos, n) if held else 0
            pos += n
            dirty.horizon = pos
            self.offset = pos
            await self.checkpoint(copied)
        dirty.horizon = size
        await self._drain(step)
        self.status = READY
        self._emit("JOB_READY", job=self.id, type=self.type)
        while self.wait_ready and not self._completing:
            self._kick = trio.Event()
            if not dirty and not self.cancelled:
                await self._kick.wait()
            if self.cancelled:
                raise JobCancelled
            await self._drain(step)

    async def _drain(self, step: int) -> None:
        """Copy dirty granules until none is left."""
        assert self.dirty is not None
        while self.dirty:
            ranges = self.dirty.take(step)
            n = sum(length for _, length in ranges)
            self.len += n
            copied = sum(self._copy(offset, length) for offset, length in ranges)
            self.offset += n
            await self.checkpoint(copied)

    def prepare(self) -> None:
        assert self.target is not None and self.dirty is not None
        # synchronous from here on: no guest write can land between this copy and the pivot
        for offset, length in self.dirty.take():
            self._copy(offset, length)
        self.target.flush()
        self._untrack()
        self.pivot()
        chain_changed(self.served)

    def abort(self) -> None:
        self._untrack()
        if not self.pivoted:
            self.release()

    def _untrack(self) -> None:
        hooks = self.served.chain.write_hooks
        if self.dirty is not None and self.dirty.mark in hooks:
            hooks.remove(self.dirty.mark)

    def switch(self, count: int, new: Layer | None, leaving_valid: list[bool]) -> None:
        """The in-memory pivot, after the state file has been replaced: ``layers[:count]``
        leave (reported in ``events``, ``valid`` as given), ``new`` or ``layers[count]``
        becomes active."""
        chain = self.served.chain
        leaving = [layer.path for layer in chain.layers[:count]]
        self.pivoted = True
        try:
            chain.replace_top(count, new)
        except Exception as e:  # the pivot is done; a layer that left failed to close
            log.warning("job=%s a layer that left the chain did not close cleanly: %s", self.id, e)
        for path, valid in zip(leaving, leaving_valid, strict=True):
            self._emit(
                "LAYER_RETIRED", job=self.id, file=os.path.basename(path), path=path, valid=valid
            )
