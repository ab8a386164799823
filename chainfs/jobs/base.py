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
last checkpoint, or completes its ``prepare`` from the recorded changes.  A user's
``pause`` and ``resume`` are recorded (synced) before they take effect, so the job comes
back paused from wherever it was paused last: an unmount, a crash, a hand-over.

A job's state is QEMU's (``states.py``): every change goes through the transition
table (assigning ``status`` does), and every verb a user sends (``cancel``, ``pause``,
``resume``, ``set-speed``, ``complete``, ``change``) through the verb table first.  A
paused job stops at its next checkpoint and waits there; a speed change wakes a job
waiting out its rate limit, so the new rate holds from the next step on.

Locking contract: everything runs on the trio thread; the chain's own lock guards the
chain against the (rare) callers on other threads.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar

import trio
import trio.lowlevel

from ..errors import ChainfsError
from . import states
from .journal import Action, Journal, Pending
from .states import (
    ABORTING,
    CANCEL,
    CHANGE,
    COMPLETE,
    CONCLUDED,
    CREATED,
    PAUSE,
    PAUSED,
    PENDING,
    READY,
    RESUME,
    RUNNING,
    SET_SPEED,
    STANDBY,
    WAITING,
    JobStateError,
    apply_verb,
)

log = logging.getLogger(__name__)

# a progress record (and the flush of the receiving image before it) at most this often:
# a crash then loses at most about a second of a job's copying
PROGRESS_INTERVAL = 1.0

# the rate limit counts its budget over a window this long: a job held up (a slow disk,
# a pause) does not make up for it in a burst, and a new speed holds at once
RATE_WINDOW = 1.0

__all__ = [
    "ABORTING",
    "CONCLUDED",
    "CREATED",
    "PAUSED",
    "PENDING",
    "READY",
    "RUNNING",
    "STANDBY",
    "WAITING",
    "Job",
    "JobCancelled",
    "JobStateError",
]


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
    # awaited as ``between_states(job)`` right after ``execute`` moved the job into
    # created, waiting, pending or aborting -- states a job otherwise passes through
    # without letting a request in: the fault point at which tests hold a job there
    # and send it every verb
    between_states: ClassVar[Callable[[Job], Awaitable[None]] | None] = None

    def __init__(self, job_id: str, *, speed: int, emit: Callable[..., None]) -> None:
        self.id = job_id
        self._status = CREATED
        self.offset = 0
        self.len = 0
        self.speed = speed
        # bytes this run has copied (or written to its target), as the rate limit counts
        # them: the rate a job really goes at, where ``offset`` passes over what needs no copy
        self.copied = 0
        self.error: str | None = None
        self._emit = emit
        self._cancel = False
        self._wakeup = trio.Event()  # set by cancel and by a speed change
        self._paused = False  # a user's pause is in force (QEMU's user_paused)
        # resumed from the record of a paused job: paused before it copies anything
        self.start_paused = False
        # set while the chain's ownership is suspended (``Disk.suspend``): the job waits
        # at its next checkpoint until the event is set (resumed, or fenced: it stops)
        self.hold: trio.Event | None = None
        self._unpaused = trio.Event()
        self.done = trio.Event()
        # rate limiting: bytes copied since ``_budget_start``
        self._budget_start = 0.0
        self._copied = 0
        # the journal: where this run started, and what of its progress is recorded
        self.journal: Journal | None = None
        self.journal_key = ""
        self.start = 0  # 0, or the checkpoint of the interrupted job this one resumes
        self.previous: str | None = None  # its id (this job resumes it under that id)
        self._suspend = False
        self._stopped_for = ""  # why a suspended job stopped (its JOB_CANCELLED reason)
        self._phase_begun = False
        self._reached = 0  # the job declared everything below this done
        self._logged_at = 0.0
        self._logged_offset = 0

    def details(self) -> list[tuple[str, object]]:
        """Job-specific key=value pairs for the ``jobs`` file."""
        return []

    def writes(self) -> list[str]:
        """The paths of the chain's layers the job writes into (data or backing pointer
        of a layer that stays readable below others): the layer views it would change."""
        return []

    def line(self) -> list[tuple[str, object]]:
        """The job's line in ``jobs``: QEMU's fields, the bytes copied, then the job's own."""
        fields = ("id", "type", "status", "offset", "len", "speed", "copied")
        return [(key, getattr(self, key)) for key in fields] + self.details()

    # -- the state machine ------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The job's state, one of QEMU's (``states.STATES``)."""
        return self._status

    @status.setter
    def status(self, new: str) -> None:
        """Move to ``new`` through the transition table (IllegalTransition if it forbids)."""
        old = self._status
        self._status = states.transition(self.id, old, new)
        log.debug("job=%s state=%s -> %s", self.id, old, new)

    async def _enter(self, new: str) -> None:
        """``execute``'s own state changes, with the test fault point after them."""
        self.status = new
        if Job.between_states is not None:
            await Job.between_states(self)

    # -- the verbs a user sends (each through the verb table) ---------------------------------

    def user_cancel(self) -> None:
        """QEMU's ``job-cancel``."""
        apply_verb(self.id, self.status, CANCEL)
        self.cancel()

    def user_pause(self) -> None:
        """QEMU's ``job-pause``: the job stops at its next checkpoint and shows ``paused``
        (``standby`` when it was ``ready``) until ``resume`` or ``cancel``."""
        apply_verb(self.id, self.status, PAUSE)
        if self._paused:
            raise JobStateError(errno.EINVAL, f"job {self.id!r} is already paused")
        self._journal_pause(True)
        self._pause()

    def _pause(self) -> None:
        self._paused = True
        self._unpaused = trio.Event()
        if self.status == RUNNING:
            self.status = PAUSED
        elif self.status == READY:
            self.status = STANDBY
        # created: the job pauses at its first checkpoint
        self._wakeup.set()

    def user_resume(self) -> None:
        """QEMU's ``job-resume``."""
        apply_verb(self.id, self.status, RESUME)
        if not self._paused:
            raise JobStateError(errno.EINVAL, f"job {self.id!r} is not paused: cannot resume it")
        self._journal_pause(False)
        self._unpause()

    def _unpause(self) -> None:
        self._paused = False
        if self.status == PAUSED:
            self.status = RUNNING
        elif self.status == STANDBY:
            self.status = READY
        self._unpaused.set()

    def set_speed(self, speed: int) -> None:
        """QEMU's ``block-job-set-speed``: the new rate limit (0: none) holds from the
        job's next step on; a job waiting out the old one wakes at once."""
        apply_verb(self.id, self.status, SET_SPEED)
        self.speed = speed
        self._budget_start, self._copied = 0.0, 0
        self._wakeup.set()

    def user_complete(self) -> None:
        """QEMU's ``job-complete``: pivot a job waiting in ``ready``."""
        apply_verb(self.id, self.status, COMPLETE)
        if self._paused:
            # QEMU: "The active block job '%s' cannot be completed" while paused
            raise JobStateError(
                errno.EINVAL, f"job {self.id!r} is paused: resume it before completing it"
            )
        self.complete()

    def complete(self) -> None:
        """Leave ``ready`` and finish (jobs that have a ready state override this)."""
        raise JobStateError(errno.EINVAL, f"job {self.id!r} cannot be completed")

    def user_change(self, copy_mode: str) -> None:
        """QEMU's ``block-job-change``: a running job's options (the copy mode of a mirror)."""
        apply_verb(self.id, self.status, CHANGE)
        self.change(copy_mode)

    def change(self, copy_mode: str) -> None:
        """Switch to ``copy_mode`` (jobs that have one override this)."""
        # QEMU: "Job type does not support change"
        raise JobStateError(
            errno.EINVAL,
            f"job {self.id!r} is a {self.type} job: its type does not support change "
            "(only copy and active commit have a copy mode)",
        )

    def cancel(self) -> None:
        self._cancel = True
        if self._paused:  # as QEMU's job_cancel_async: a paused job resumes to stop
            self._unpause()
        self._wakeup.set()
        if self.hold is not None:
            self.hold.set()

    def suspend(self, reason: str = "unmounted; the next mount resumes it") -> None:
        """Stop the job at its next checkpoint so that the next mount (at unmount), or
        the next owner (at a hand-over), resumes it from its journal record."""
        self._suspend = True
        self._stopped_for = reason
        self.cancel()

    @property
    def paused(self) -> bool:
        """A user's pause is in force."""
        return self._paused

    @property
    def cancelled(self) -> bool:
        return self._cancel

    @property
    def suspended(self) -> bool:
        """Stopped for unmount: the next mount resumes the job (not a cancel)."""
        return self._suspend

    async def checkpoint(self, copied: int) -> None:
        """Between steps: yield to guest requests, honour ``speed``, ``pause`` and
        ``cancel``."""
        if Job.between_steps is not None:
            Job.between_steps(self)
        if self._cancel:
            raise JobCancelled
        self._copied += copied
        self.copied += copied
        await self._wait_budget()
        while self.hold is not None and not self._cancel:
            hold = self.hold
            await hold.wait()
            if self.hold is hold:
                self.hold = None
        while self._paused and not self._cancel:
            if self.status == RUNNING:  # paused before it started
                self.status = PAUSED
            await self._unpaused.wait()
            self._budget_start, self._copied = 0.0, 0  # no burst after the pause
        if self._cancel:
            raise JobCancelled

    async def _wait_budget(self) -> None:
        """Wait until the bytes copied fit ``speed`` (none: just yield)."""
        if self.speed <= 0:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        if not self._budget_start:
            self._budget_start = now
        due = self._budget_start + self._copied / self.speed
        if due > now:
            self._wakeup = trio.Event()
            with trio.move_on_at(due):
                await self._wakeup.wait()  # woken early by a speed change or cancel
        # (a speed change restarted the budget: the next step runs at the new rate)
        # keep the window short so a speed change takes effect quickly
        if self._budget_start and now - self._budget_start > RATE_WINDOW:
            self._budget_start, self._copied = now, 0

    # -- the journal ----------------------------------------------------------------------

    def intent(self) -> dict[str, object]:
        """The job's parameters as the journal records them (absolute paths): enough
        to issue the same command again."""
        return {"speed": self.speed}

    def attach(self, journal: Journal | None, chain: str, resumes: Pending | None = None) -> None:
        """Record the job's intent, durably, before it starts or creates anything.

        A job that ``resumes`` an interrupted one takes its place in the journal and
        starts from its checkpoint (``start``).
        """
        if resumes is not None:
            self.id = resumes.id  # a job keeps its id across remounts and crashes
            if resumes.paused:  # and a user's pause, in force from now on (a resume
                self.start_paused = True  # sent before the job begins lifts it)
                self._pause()
        if journal is None:
            return
        pending = journal.begin(self.type, self.id, chain, self.intent(), resumes)
        self.journal, self.journal_key = journal, pending.key
        self.start = self.offset = self._reached = self._logged_offset = pending.offset
        self.previous = pending.previous

    def _journal_pause(self, paused: bool) -> None:
        """Record, durably, a user's pause or resume before it takes effect (a journal
        that cannot be written refuses the verb: the job stays as it was)."""
        if self.journal is not None:
            self.journal.pause(self.journal_key, paused)

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
        """Run the job through its states, reporting to ``events``.

        created -> running (-> ready) -> waiting -> pending -> concluded, or to aborting
        -> concluded from any of them when cancelled or failed; the test fault point
        ``between_states`` aside, nothing else runs between run's end and ``prepare``.
        """
        if Job.between_states is not None:
            await Job.between_states(self)  # held in created
        self.status = RUNNING
        self._logged_at = trio.current_time()
        self._emit("JOB_STARTED", job=self.id, type=self.type)
        if self.previous is not None:
            # the interrupted job, under its own id, from its checkpoint
            more = {"paused": True} if self._paused else {}
            self._emit("JOB_RESUMED", job=self.id, type=self.type, offset=self.start, **more)
        try:
            if self._cancel:
                raise JobCancelled
            if self.start_paused and self._paused:
                await self.checkpoint(0)  # until resume or cancel, before any step
            await self.run()
            await self._enter(WAITING)
            if self._cancel:
                raise JobCancelled
            await self._enter(PENDING)
            if self._cancel:
                raise JobCancelled
            self.prepare()
        except JobCancelled:
            await self._abort_state()
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
                    reason=self._stopped_for,
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
            await self._abort_state()
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

    async def _abort_state(self) -> None:
        if self._paused:  # failed while paused: out of paused first, as the table wants
            self._unpause()
        await self._enter(ABORTING)

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
