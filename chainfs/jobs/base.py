"""The generic job: QEMU's state names, progress counters, rate limit and cancel.

A job's work runs as a trio task in the mount's nursery, in steps: each step is a short
synchronous piece of work under the chain's lock (so guest requests interleave between
steps), followed by a checkpoint that honours ``speed`` and cancellation.  Only the
``prepare`` step rewrites backing pointers, after ``run`` succeeded; a cancelled or
failed job changes no pointer.

Locking contract: everything runs on the trio thread; the chain's own lock guards the
chain against the (rare) callers on other threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
import trio.lowlevel

log = logging.getLogger(__name__)

# QEMU's job states that chainfs uses
CREATED, RUNNING, PAUSED, READY = "created", "running", "paused", "ready"
WAITING, PENDING, ABORTING, CONCLUDED = "waiting", "pending", "aborting", "concluded"


class JobCancelled(Exception):
    """Raised inside a job's run when ``cancel`` was asked for."""


class Job:
    """One running operation on one chain."""

    type = "job"

    def __init__(self, job_id: str, *, speed: int, emit: Callable[..., None]) -> None:
        self.id = job_id
        self.status = CREATED
        self.offset = 0
        self.len = 0
        self.speed = speed
        self.error: str | None = None
        self._emit = emit
        self._cancel = False
        self._wakeup = trio.Event()
        self.done = trio.Event()
        # rate limiting: bytes copied since ``_since``
        self._budget_start = 0.0
        self._copied = 0

    def details(self) -> list[tuple[str, object]]:
        """Job-specific key=value pairs for the ``jobs`` file."""
        return []

    def line(self) -> list[tuple[str, object]]:
        return [
            ("id", self.id),
            ("type", self.type),
            ("status", self.status),
            ("offset", self.offset),
            ("len", self.len),
            ("speed", self.speed),
            *self.details(),
        ]

    def cancel(self) -> None:
        self._cancel = True
        self._wakeup.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel

    async def checkpoint(self, copied: int) -> None:
        """Between steps: yield to guest requests, honour ``speed`` and ``cancel``."""
        if self._cancel:
            raise JobCancelled
        self._copied += copied
        if self.speed > 0:
            now = trio.current_time()
            if not self._budget_start:
                self._budget_start = now
            due = self._budget_start + self._copied / self.speed
            if due > now:
                with trio.move_on_at(due):
                    await self._wakeup.wait()
            # keep the window short so a speed change takes effect quickly
            if now - self._budget_start > 1.0:
                self._budget_start, self._copied = now, 0
        else:
            await trio.lowlevel.checkpoint()
        if self._cancel:
            raise JobCancelled

    async def run(self) -> None:
        """The job's copy loop; raises JobCancelled when cancelled."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the result permanent (backing pointers); only after ``run`` succeeded."""

    def abort(self) -> None:
        """Undo what must be undone after a failure or cancel (nothing, usually)."""

    async def execute(self) -> None:
        """Run the job through its states, reporting to ``events``."""
        self.status = RUNNING
        self._emit("JOB_STARTED", job=self.id, type=self.type)
        try:
            await self.run()
            self.status = PENDING
            self.prepare()
        except JobCancelled:
            self.status = ABORTING
            self._safe_abort()
            self.status = CONCLUDED
            self._emit("JOB_CANCELLED", job=self.id, type=self.type, offset=self.offset)
        except Exception as e:  # a failed job reports and leaves the chain as it was
            log.exception("job=%s failed", self.id)
            self.error = str(e) or type(e).__name__
            self.status = ABORTING
            self._safe_abort()
            self.status = CONCLUDED
            self._emit("JOB_COMPLETED", job=self.id, type=self.type, error=self.error)
        else:
            self.status = CONCLUDED
            self._emit("JOB_COMPLETED", job=self.id, type=self.type, offset=self.offset)
        finally:
            self.done.set()

    def _safe_abort(self) -> None:
        try:
            self.abort()
        except Exception:
            log.exception("job=%s abort failed", self.id)
