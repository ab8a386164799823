"""The mirror: copy a live disk into another image while the guest writes, then pivot.

    [A] <- [B] <- [C] <- [D] <- [E]    commit base=B (active)   ->  [A] <- [B]
    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=top           ->  [A] <- ... <- [D] <- [F]
    [A] <- [B] <- [C] <- [D] <- [E]    copy F sync=full          ->  [F]

The common engine of active commit (``commit.py``) and copy (``copy.py``), as QEMU's
``mirror.c`` is of an active ``block-commit`` and of ``blockdev-mirror``.  The target
will sit on ``layers[stop]`` (nothing for a full copy), so it must come to hold what the
layers above that show:

1. a first pass over the disk copies into the target every cluster that a layer of
   ``layers[:stop]`` holds (``CopyEngine.copy_step``), while the job, as the chain's
   write hook, marks every granule the guest writes behind the pass as dirty;
2. the granules dirty at the end of the pass are copied once (not until none is left,
   which a guest writing faster than ``speed`` would never allow) and the job reports
   ``JOB_READY``;
3. with ``wait=ready`` the job stays ``ready``, copying what the guest dirties, until
   ``complete JOB``; otherwise it goes on at once;
4. from then on it mirrors actively (below), copies what is left at ``speed`` (the dirty
   set only shrinks now: ``remaining / speed`` plus one step at most), and
5. pivots (``prepare``), one synchronous step that no guest request can interleave
   with: the last dirty granules are copied, the target is flushed, the state file
   records the target as the active layer and the layers above it as retired (one
   atomic replace), and the chain switches to the target in memory.

Mirroring actively (QEMU's ``copy-mode=write-blocking``, which a job may have from the
start or switch to with ``change``, and every job from step 4 on): a guest write that
lies behind the pass is copied into the target, the granules it touches read through
the chain, in ``after_write``: under the chain's lock, before the guest is answered, not
counted against ``speed``; its granules are clean then.  Writes ahead of the pass are
left to it.  The copy is the engine's (``copy_step_locked``), with the same started
writes as the job's own steps, which the target's flush at the pivot settles.

A crash before the state file is replaced leaves the chain the job started from, on disk
and in what it shows (an active commit writes into the base only what the layers above
mask; a copy writes only into its own new file); the target holds a partial copy.  A
crash after it leaves the target as the active layer, holding every write acknowledged
so far (they were all copied and flushed before the state file changed).  Cancel or
failure before the pivot changes no pointer and no record.

Locking contract: everything runs on the trio thread; a copy step holds the chain's lock,
and so does a guest write with its hooks (the lock is not reentrant: a hook copies with
``copy_step_locked``).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..control import BACKGROUND, WRITE_BLOCKING
from ..formats.base import Layer
from .base import READY, Job, JobCancelled, JobStateError
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

    def mark(self, offset: int, length: int, *, wake: bool = True) -> None:
        """Record a guest write; ``wake`` the job unless the caller is about to copy the
        range itself (a write-blocking write: the job has nothing to do for it)."""
        g = self.granule
        end = min(offset + length, self.horizon)
        if offset < end:
            self._dirty.update(range(offset // g, -(-end // g)))
            if wake:
                self._wake()

    def discard(self, start: int, end: int) -> None:
        """The granules of ``[start, end)`` (granule-aligned) were copied: clean."""
        g = self.granule
        self._dirty.difference_update(range(start // g, -(-end // g)))

    def __len__(self) -> int:
        return len(self._dirty)

    def batches(self, limit: int) -> list[list[int]]:
        """The granules dirty now, lowest first, in batches of ``limit`` bytes: a drain
        that copies each batch's granules still dirty (``take_granules``) copies what is
        dirty now once, and not what the guest dirties meanwhile."""
        k = max(1, limit // self.granule)
        picked = sorted(self._dirty)
        return [picked[i : i + k] for i in range(0, len(picked), k)]

    def take_granules(self, granules: list[int]) -> list[tuple[int, int]]:
        """``take`` of those of ``granules`` (ascending) that are still dirty."""
        picked = [i for i in granules if i in self._dirty]
        self._dirty.difference_update(picked)
        return self._ranges(picked)

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
        return self._ranges(picked)

    def _ranges(self, picked: list[int]) -> list[tuple[int, int]]:
        g = self.granule
        ranges: list[tuple[int, int]] = []
        for i in picked:
            if ranges and ranges[-1][0] + ranges[-1][1] == i * g:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + g)
            else:
                ranges.append((i * g, g))
        return ranges


class MirrorJob(Job):
    """Copy the disk into a target with dirty tracking, report ready, pivot.

    It is the chain's write hook (``chain.WriteHook``): ``before_write`` marks what a
    guest write dirties behind the first pass; ``after_write`` copies it into the target
    at once, before the guest is answered, while the job mirrors actively
    (``write-blocking`` mode, or from ``complete`` on).
    """

    def __init__(
        self,
        job_id: str,
        served: Served,
        *,
        speed: int,
        wait_ready: bool,
        copy_mode: str = BACKGROUND,
    ) -> None:
        super().__init__(job_id, speed=speed, emit=served.emit)
        self.served = served
        self.wait_ready = wait_ready
        self.copy_mode = copy_mode
        self.target: Layer | None = None
        self.dirty: DirtyMap | None = None
        self.pivoted = False
        self._completing = False
        self._finishing = False  # complete (or ready without wait=ready): converge and pivot
        self._sync_error: Exception | None = None
        self._size = 0
        self._kick = trio.Event()

    def details(self) -> list[tuple[str, object]]:
        return [("copy-mode", self.copy_mode), ("remaining", self.remaining)]

    @property
    def remaining(self) -> int:
        """The bytes the job still has to copy: the dirty granules, and during the first
        pass what it has not reached yet."""
        dirty = self.dirty
        if dirty is None:
            return self.len
        return len(dirty) * dirty.granule + max(0, self._size - dirty.horizon)

    @property
    def blocking(self) -> bool:
        """Guest writes behind the first pass are copied before they are answered."""
        return self.copy_mode == WRITE_BLOCKING or self._finishing

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

    def change(self, copy_mode: str) -> None:
        """QEMU's ``mirror_change``: background -> write-blocking only."""
        if copy_mode == self.copy_mode:
            return
        if copy_mode != WRITE_BLOCKING:
            # QEMU: "Change to copy mode '%s' is not implemented"
            raise JobStateError(
                errno.EINVAL,
                f"job {self.id!r}: change to copy mode {copy_mode!r} is not implemented "
                f"(the job is in {self.copy_mode!r} mode; only background -> write-blocking)",
            )
        self.copy_mode = WRITE_BLOCKING
        log.info("job=%s copy-mode=%s", self.id, copy_mode)

    def _wake(self) -> None:
        self._kick.set()

    # -- the guest's writes (``chain.WriteHook``) --------------------------------------------

    def before_write(self, offset: int, length: int) -> None:
        # marked even when ``after_write`` is to copy it: a write that fails half-way
        # leaves its granules dirty for the job (or the pivot) to copy
        if self.dirty is not None:
            self.dirty.mark(offset, length, wake=not self.blocking or self._sync_error is not None)

    def after_write(self, offset: int, length: int) -> None:
        """While mirroring actively: copy the granules the write touched behind the first
        pass into the target (under the chain's lock, held by the caller) and count them
        clean.  Not rate-limited: the guest waits for it.  A failure fails the job at its
        next checkpoint; the guest's write itself succeeded (the granules stay dirty)."""
        dirty, target = self.dirty, self.target
        if not self.blocking or dirty is None or target is None or self._sync_error:
            return
        end = min(offset + length, dirty.horizon)
        if offset >= end:
            return  # ahead of the first pass: it copies that when it gets there
        g = dirty.granule
        a, b = offset - offset % g, -(-end // g) * g
        try:
            self.served.chain.engine.copy_step_locked(
                target, 0, self.stop(), self.below(), a, b - a
            )
        except Exception as e:
            self._sync_error = e
            self._kick.set()
            self._wakeup.set()
            return
        dirty.discard(a, b)
        self._progress(b - a)

    def _progress(self, n: int) -> None:
        """``n`` more bytes copied again: QEMU's offset and len both grow."""
        self.offset += n
        self.len += n

    async def checkpoint(self, copied: int) -> None:
        await super().checkpoint(copied)
        self._check_sync()

    def _check_sync(self) -> None:
        if self._sync_error is not None:
            raise self._sync_error

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
        self._size = size = min(chain.size, self.target.virtual_size)
        granule = max(GRANULE, self.target.cluster_size)
        step = max(STEP, granule)
        self.dirty = dirty = DirtyMap(granule, self._wake)
        chain.add_write_hook(self)
        self.offset, self.len = 0, size  # both grow by what is copied again
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
            self.offset += n
            await self.checkpoint(copied)
        dirty.horizon = size
        # ready: the granules dirty at the end of the pass copied once (not until none is
        # left, which a guest writing faster than ``speed`` would never let happen)
        for batch in dirty.batches(step):
            await self._copy_ranges(dirty.take_granules(batch))
        self.status = READY
        self._emit("JOB_READY", job=self.id, type=self.type)
        while self.wait_ready and not self._completing:
            self._kick = trio.Event()
            if not dirty and not self.cancelled and not self._sync_error:
                await self._kick.wait()
            if self.cancelled:
                raise JobCancelled
            self._check_sync()
            if dirty and not self._completing:
                await self._copy_ranges(dirty.take(step))  # background: what the guest dirtied
        # from here on guest writes are copied before they are answered: the dirty set
        # only shrinks, and what is left is copied at ``speed``, then the pivot
        self._finishing = True
        while dirty:
            await self._copy_ranges(dirty.take(step))
        await self.checkpoint(0)

    async def _copy_ranges(self, ranges: list[tuple[int, int]]) -> None:
        n = sum(length for _, length in ranges)
        copied = sum(self._copy(offset, length) for offset, length in ranges)
        self._progress(n)
        await self.checkpoint(copied)

    def prepare(self) -> None:
        assert self.target is not None and self.dirty is not None
        self._check_sync()
        # synchronous from here on: no guest write can land between this copy and the pivot
        for offset, length in self.dirty.take():
            self._copy(offset, length)
            self._progress(length)
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
        if self in hooks:
            hooks.remove(self)

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
