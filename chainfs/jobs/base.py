"""The generic job: QEMU's state names, progress counters, rate limit and cancel.

A job's work runs as a trio task in the mount's nursery, in steps: each step is a short
synchronous piece of work under the chain's lock (so guest requests interleave between
steps), followed by a checkpoint that honours ``speed`` and cancellation.  Only the
``prepare`` step rewrites backing pointers, after ``run`` succeeded; a cancelled or
failed job changes no pointer.

Every job is journalled (``journal.py``): ``attach`` records its intent before it
starts, ``journal_progress`` records now and then how far it got (after
``flush_progress`` made that durable), ``journal_phase`` records the exact changes
``prepare`` is about to make, and the end is recorded when it is over.  A job stopped
by ``suspend`` (at unmount) or by a crash has no end: the next mount resumes it from its
last checkpoint, or completes its ``prepare`` from the recorded changes.

Locking contract: everything runs on the trio thread; the chain's own lock guards the
chain against the (rare) callers on other threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import trio
import trio.lowlevel

from ..errors import ChainfsError
from .journal import Action, Journal

log = logging.getLogger(__name__)

# a progress record (and the flush of the receiving image before it) at most this often:
# a crash then loses at most about a second of a job's copying
PROGRESS_INTERVAL = 1.0

# QEMU's job states that chainfs uses
CREATED, RUNNING, PAUSED, READY = "created", "running", "paused", "ready"
WAITING, PENDING, ABORTING, CONCLUDED = "waiting", "pending", "aborting", "concluded"


class JobCancelled(Exception):
    """Raised inside a job's run when ``cancel`` was asked for."""


class Job:
    """One running operation on one chain."""

    type = "job"
    # called as ``between_steps(job)`` at every checkpoint, right after a step and before
    # guest requests may run: the fault point at which tests land a guest request in
    # each window deterministically (a started write still on its way, a pass's
    # position just moved), as ``HostFile.observer`` is for the host's writes
    between_steps: ClassVar[Callable[[Job], None] | None] = None

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
        # the journal: where this run started, and what of its progress is recorded
        self.journal: Journal | None = None
        self.journal_key = ""
        self.start = 0  # 0, or the checkpoint of the interrupted job this one resumes
        self.previous: str | None = None  # that job's id
        self._suspend = False
        self._phase_begun = False
        self._reached = 0  # the job declared everything below this done
        self._logged_at = 0.0
        self._logged_offset = 0

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

    def suspend(self) -> None:
        """Stop the job so that the next mount resumes it (at unmount)."""
        self._suspend = True
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel

    @property
    def suspended(self) -> bool:
        """Stopped for unmount: the next mount resumes the job (not a cancel)."""
        return self._suspend

    async def checkpoint(self, copied: int) -> None:
        """Between steps: yield to guest requests, honour ``speed`` and ``cancel``."""
        if Job.between_steps is not None:
            Job.between_steps(self)
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

    # -- the journal ----------------------------------------------------------------------

    def intent(self) -> dict[str, object]:
        """The job's parameters as the journal records them (absolute paths): enough
        to issue the same command again."""
        return {"speed": self.speed}

    def attach(self, journal: Journal | None, chain: str) -> None:
        """Record the job's intent, durably, before it starts or creates anything.

        When the journal is resuming an interrupted job with the same intent, this job
        takes its place and starts from its checkpoint (``start``).
        """
        if journal is None:
            return
        pending = journal.begin(self.type, self.id, chain, self.intent())
        self.journal, self.journal_key = journal, pending.key
        self.start = self.offset = self._reached = self._logged_offset = pending.offset
        self.previous = pending.previous

    def journal_progress(self, offset: int) -> None:
        """Everything the job does below ``offset`` is done; record it now and then.

        Only jobs whose progress survives a crash call this (a stream, an intermediate
        commit); a job that tracks guest writes in memory restarts from the beginning.
        """
        self._reached = offset
        if self.journal is None:
            return
        now = trio.current_time()
        if now - self._logged_at >= PROGRESS_INTERVAL:
            self._log_progress()
            self._logged_at = now

    def _log_progress(self) -> None:
        assert self.journal is not None
        if self._reached == self._logged_offset:
            return
        self.flush_progress()  # the data first: a record never runs ahead of it
        self.journal.progress(self.journal_key, self._reached)
        self._logged_offset = self._reached

    def flush_progress(self) -> None:
        """Make durable everything the job has written so far."""

    def journal_phase(self, phase: str, actions: list[Action]) -> None:
        """Record, durably, the changes the job is about to make (from ``prepare``).

        From here on the job is completed by the next mount if it stops, so every
        action must be safe to apply twice.
        """
        self._phase_begun = True
        if self.journal is not None:
            self.journal.phase(self.journal_key, phase, actions)

    def _journal_end(self, how: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.end(self.journal_key, how)
        except ChainfsError as e:  # the disk under the journal failed, say
            log.warning("job=%s cannot record its end in the journal: %s", self.id, e)
        except Exception:
            log.exception("job=%s cannot record its end in the journal", self.id)

    # -- running ---------------------------------------------------------------------------

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
        self._logged_at = trio.current_time()
        self._emit("JOB_STARTED", job=self.id, type=self.type)
        if self.previous is not None:
            self._emit(
                "JOB_RESUMED",
                job=self.id,
                type=self.type,
                previous=self.previous,
                offset=self.start,
            )
        try:
            await self.run()
            self.status = PENDING
            self.prepare()
        except JobCancelled:
            self.status = ABORTING
            if self._suspend:
                self._record_resume_point()
            self._safe_abort()
            self.status = CONCLUDED
            if self._suspend:
                self._emit(
                    "JOB_CANCELLED",
                    job=self.id,
                    type=self.type,
                    offset=self.offset,
                    reason="unmounted; the next mount resumes it",
                )
            else:
                self._journal_end("cancelled")
                self._emit("JOB_CANCELLED", job=self.id, type=self.type, offset=self.offset)
        except Exception as e:  # a failed job reports and leaves the chain as it was
            if isinstance(e, ChainfsError):  # the disk under the images failed, say
                log.warning("job=%s failed: %s", self.id, e)
            else:
                log.exception("job=%s failed", self.id)
            self.error = str(e) or type(e).__name__
            self.status = ABORTING
            self._safe_abort()
            self.status = CONCLUDED
            if self._phase_begun:
                # the recorded changes are half made: the next mount makes the rest
                log.error("job=%s will be completed at the next mount", self.id)
            else:
                self._journal_end("failed")
            self._emit("JOB_COMPLETED", job=self.id, type=self.type, error=self.error)
        else:
            self.status = CONCLUDED
            self._journal_end("done")
            self._emit("JOB_COMPLETED", job=self.id, type=self.type, offset=self.offset)
        finally:
            self.done.set()

    def _record_resume_point(self) -> None:
        """Stopped for unmount: the journal keeps the job, with its latest checkpoint."""
        if self.journal is not None:
            try:
                self._log_progress()
            except Exception:
                log.exception("job=%s cannot record its progress", self.id)

    def _safe_abort(self) -> None:
        try:
            self.abort()
        except ChainfsError as e:
            log.warning("job=%s abort failed: %s", self.id, e)
        except Exception:
            log.exception("job=%s abort failed", self.id)
