"""QEMU's job state machine (``chainfs/jobs/states.py``) and the generic job that runs
through it (``chainfs/jobs/base.py``), without FUSE or images.

The tables are stated again here, apart from the implementation, in QEMU's ``job.c``
layout, so that a changed bit fails as surely as a wrong one.  Then every (state, verb)
pair is sent to a real ``Job`` held in that state: the verb either moves the job as QEMU
would or is refused with QEMU's words and the errno the control file returns.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from chainfs.errors import ChainfsError
from chainfs.jobs import states
from chainfs.jobs.base import Job, JobCancelled
from chainfs.jobs.journal import Journal
from chainfs.jobs.states import (
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
    IllegalTransition,
    JobStateError,
    apply_verb,
)

# QEMU's job.c (JobSTT, JobVerbTable) without the undefined and null columns
COLUMNS = ["C", "R", "P", "Y", "S", "W", "D", "X", "E"]
NAMES = dict(zip(COLUMNS, states.STATES, strict=True))
STT = {
    CREATED: "0 1 0 0 0 0 0 1 0",
    RUNNING: "0 0 1 1 0 1 0 1 0",
    PAUSED: "0 1 0 0 0 0 0 0 0",
    READY: "0 0 0 0 1 1 0 1 0",
    STANDBY: "0 0 0 1 0 0 0 0 0",
    WAITING: "0 0 0 0 0 0 1 1 0",
    PENDING: "0 0 0 0 0 0 0 1 1",
    ABORTING: "0 0 0 0 0 0 0 1 1",
    CONCLUDED: "0 0 0 0 0 0 0 0 0",
}
VERB_TABLE = {
    CANCEL: "1 1 1 1 1 1 1 0 0",
    PAUSE: "1 1 1 1 1 0 0 0 0",
    RESUME: "1 1 1 1 1 0 0 0 0",
    SET_SPEED: "1 1 1 1 1 0 0 0 0",
    COMPLETE: "0 0 0 1 1 0 0 0 0",
    CHANGE: "1 1 1 1 1 0 0 0 0",
}


def bits(row: str) -> dict[str, bool]:
    return {NAMES[c]: b == "1" for c, b in zip(COLUMNS, row.split(), strict=True)}


PAIRS = [(s, v) for s in states.STATES for v in states.VERB_NAMES]


def test_the_tables_are_qemus() -> None:
    assert set(states.VERB_NAMES) == set(VERB_TABLE)
    for old, row in STT.items():
        for new, ok in bits(row).items():
            assert (new in states.TRANSITIONS[old]) == ok, (old, new)
            if ok:
                assert states.transition("j", old, new) == new
            else:
                with pytest.raises(IllegalTransition, match=f"from state '{old}' to '{new}'"):
                    states.transition("j", old, new)


@pytest.mark.parametrize(("state", "verb"), PAIRS)
def test_apply_verb(state: str, verb: str) -> None:
    ok = bits(VERB_TABLE[verb])[state]
    assert states.allowed(verb, state) == ok
    if ok:
        apply_verb("commit-1", state, verb)
        return
    with pytest.raises(JobStateError) as info:
        apply_verb("commit-1", state, verb)
    ending = state in (WAITING, PENDING, ABORTING, CONCLUDED)
    why = ": it is not ready" if verb == "complete" and not ending else ""
    assert str(info.value) == f"job 'commit-1' in state '{state}' cannot accept '{verb}'{why}"
    assert info.value.errno == (errno.EBUSY if ending else errno.EINVAL)


# -- a real job, held in each state -------------------------------------------------------


async def until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (the job moves on its own task) for up to five seconds."""
    with trio.fail_after(5):
        while True:
            if cond():
                return
            await trio.sleep(0.001)


class Looping(Job):
    """Copies ``steps`` pieces of 1 KiB, checkpointing after each; with ``ready``, then
    waits in ready until completed, as a mirror does."""

    type = "loop"

    def __init__(self, steps: int = 10**9, *, ready: bool = False, fail: bool = False) -> None:
        super().__init__("loop-1", speed=0, emit=self.record)
        self.steps, self.ready, self.fail = steps, ready, fail
        self.events: list[str] = []
        self.completed = trio.Event()
        self.prepared = self.aborted = False

    def record(self, event: str, **fields: object) -> None:
        self.events.append(event)

    async def run(self) -> None:
        for _ in range(self.steps):
            self.offset += 1024
            await self.checkpoint(1024)
        if self.fail:
            raise ChainfsError("the disk went away")
        if self.ready:
            self.status = READY
            while not self.completed.is_set():
                with trio.move_on_after(0.01):
                    await self.completed.wait()
                await self.checkpoint(0)

    def complete(self) -> None:
        self.completed.set()

    def prepare(self) -> None:
        self.prepared = True

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def hold() -> Iterator[Callable[[str], Callable[[Job], Awaitable[None]]]]:
    """``Job.between_states`` set to a hook that parks a job entering ``state``."""

    def make(state: str) -> Callable[[Job], Awaitable[None]]:
        async def hook(job: Job) -> None:
            if job.status == state:
                await trio.sleep_forever()

        return hook

    yield make
    Job.between_states = None


async def reach(job: Looping, state: str, nursery: trio.Nursery) -> None:
    """Start ``job`` and bring it into ``state``."""
    if state in (PAUSED, STANDBY):
        await reach(job, RUNNING if state == PAUSED else READY, nursery)
        job.user_pause()
    else:
        nursery.start_soon(job.execute)
        await until(lambda: job.status == state)
    assert job.status == state


def expected_after(state: str, verb: str) -> str:
    """The state a job is in right after an accepted verb."""
    if verb == PAUSE:
        return {RUNNING: PAUSED, READY: STANDBY}.get(state, state)
    if verb == CANCEL and state in (PAUSED, STANDBY):
        return RUNNING if state == PAUSED else READY  # resumed to stop
    if verb == RESUME:
        return {PAUSED: RUNNING, STANDBY: READY}.get(state, state)
    return state


HELD = {CREATED, WAITING, PENDING, ABORTING}  # only the fault point holds a job there


@pytest.mark.parametrize(("state", "verb"), [p for p in PAIRS if p[0] != CONCLUDED])
def test_every_verb_in_every_state(
    state: str, verb: str, hold: Callable[[str], Callable[[Job], Awaitable[None]]]
) -> None:
    async def main() -> None:
        job = Looping(3, ready=True) if state in (READY, STANDBY) else Looping()
        if state in HELD:
            Job.between_states = hold(state)
        async with trio.open_nursery() as nursery:
            if state == ABORTING:
                await reach(job, RUNNING, nursery)
                job.user_cancel()
                await until(lambda: job.status == ABORTING)
            else:
                if state in (WAITING, PENDING):
                    job.steps = 3
                await reach(job, state, nursery)
            refused = not bits(VERB_TABLE[verb])[state]
            # QEMU's job_user_pause/resume/complete refuse what the table lets through
            refused |= verb == PAUSE and state in (PAUSED, STANDBY)
            refused |= verb == RESUME and state not in (PAUSED, STANDBY)
            refused |= verb == COMPLETE and state == STANDBY
            refused |= verb == CHANGE  # a job that is no mirror has no copy mode to change
            sends: dict[str, Callable[[], None]] = {
                CANCEL: job.user_cancel,
                PAUSE: job.user_pause,
                RESUME: job.user_resume,
                SET_SPEED: lambda: job.set_speed(1 << 20),
                COMPLETE: job.user_complete,
                CHANGE: lambda: job.user_change("write-blocking"),
            }
            send = sends[verb]
            if refused:
                with pytest.raises(JobStateError) as info:
                    send()
                assert job.status == state
                assert info.value.errno in (errno.EINVAL, errno.EBUSY)
                assert re.search(r"job 'loop-1' (in state|is)", str(info.value))
            else:
                send()
                assert job.status == expected_after(state, verb)
                if verb == SET_SPEED:
                    assert job.speed == 1 << 20
            nursery.cancel_scope.cancel()

    trio.run(main)


def run_to_end(job: Looping, script: Callable[[Looping], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.execute)
            await script(job)
            with trio.fail_after(5):
                await job.done.wait()

    trio.run(main)


def test_a_job_goes_through_waiting_and_pending_to_concluded() -> None:
    seen: list[str] = []

    async def note(job: Job) -> None:
        seen.append(job.status)

    Job.between_states = note
    try:
        job = Looping(3)

        async def nothing(job: Looping) -> None:
            pass

        run_to_end(job, nothing)
    finally:
        Job.between_states = None
    assert seen == [CREATED, WAITING, PENDING]
    assert job.status == CONCLUDED and job.prepared and not job.aborted
    assert job.events == ["JOB_STARTED", "JOB_COMPLETED"]


def test_a_cancelled_paused_job_resumes_to_stop() -> None:
    async def script(job: Looping) -> None:
        await until(lambda: job.status == RUNNING)
        job.user_pause()
        assert job.status == PAUSED
        offset = job.offset
        await trio.sleep(0.05)
        assert job.offset == offset  # no step while paused
        job.user_cancel()

    job = Looping()
    run_to_end(job, script)
    assert job.status == CONCLUDED and job.aborted and not job.prepared
    assert job.events == ["JOB_STARTED", "JOB_CANCELLED"]


def test_pause_holds_progress_and_resume_continues() -> None:
    async def script(job: Looping) -> None:
        await until(lambda: job.offset >= 10 * 1024)
        job.user_pause()
        offset = job.offset
        await trio.sleep(0.05)
        assert job.offset == offset and job.status == PAUSED
        job.user_resume()
        assert job.status == RUNNING
        await until(lambda: job.offset != offset)
        job.user_cancel()

    run_to_end(Looping(), script)


def test_a_job_paused_before_it_starts_pauses_at_its_first_checkpoint(
    hold: Callable[[str], Callable[[Job], Awaitable[None]]],
) -> None:
    async def main() -> None:
        job = Looping()
        held = trio.Event()

        async def hook(j: Job) -> None:
            if j.status == CREATED and not held.is_set():
                held.set()
                await trio.sleep(0.01)  # the pause arrives while created

        Job.between_states = hook
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.execute)
            await held.wait()
            job.user_pause()
            assert job.status == CREATED
            await until(lambda: job.status == PAUSED)
            assert job.offset <= 1024
            job.user_resume()
            job.user_cancel()

    trio.run(main)


def test_set_speed_wakes_a_job_waiting_out_its_rate_limit() -> None:
    async def main() -> None:
        clock_job = Looping()
        clock_job.speed = 1024  # one step a second
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock_job.execute)
            await trio.sleep(1.5)
            slow = clock_job.offset
            assert 1024 <= slow <= 3 * 1024
            clock_job.set_speed(1024 * 1024)  # a thousand steps a second
            await trio.sleep(1.0)
            assert clock_job.offset - slow > 200 * 1024
            clock_job.set_speed(1024)
            await trio.sleep(0.1)
            before = clock_job.offset
            await trio.sleep(2.0)
            assert clock_job.offset - before <= 3 * 1024
            clock_job.user_cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failure_while_ready_aborts_through_the_table() -> None:
    async def script(job: Looping) -> None:
        await until(lambda: job.status == READY)
        job.user_pause()
        assert job.status == STANDBY
        with pytest.raises(JobStateError, match="paused"):
            job.user_complete()
        job.user_resume()
        job.user_complete()

    job = Looping(2, ready=True)
    run_to_end(job, script)
    assert job.status == CONCLUDED and job.prepared


@pytest.mark.expect_log(r"WARNING chainfs\.jobs\.base: job=loop-1 failed: the disk went away")
def test_a_failed_job_concludes_with_its_error() -> None:
    async def nothing(job: Looping) -> None:
        pass

    job = Looping(2, fail=True)
    run_to_end(job, nothing)
    assert job.status == CONCLUDED and job.aborted and job.error == "the disk went away"


def test_status_cannot_skip_the_table() -> None:
    job = Looping()
    with pytest.raises(IllegalTransition):
        job.status = PENDING
    assert job.status == CREATED


def test_job_cancelled_is_what_checkpoint_raises() -> None:
    async def main() -> None:
        job = Looping()
        job.cancel()
        with pytest.raises(JobCancelled):
            await job.checkpoint(0)

    trio.run(main)


def test_change_is_refused_by_a_job_that_is_no_mirror() -> None:
    # QEMU's block_job_change: the verb table first, then "Job type does not support change"
    job = Looping()
    with pytest.raises(JobStateError) as info:
        job.user_change("write-blocking")
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == (
        "job 'loop-1' is a loop job: its type does not support change (only copy and "
        "active commit have a copy mode)"
    )
    job._status = CONCLUDED  # the table refuses before the job is asked
    with pytest.raises(JobStateError, match="in state 'concluded' cannot accept 'change'"):
        job.user_change("write-blocking")


@pytest.mark.parametrize("then", ["wait", "resume while created"])
def test_a_job_resumed_from_the_record_of_a_paused_one_starts_paused(
    tmp_path: Path, then: str
) -> None:
    """A pause is journalled: the job resumed from the record (after an unmount, a
    crash, a hand-over) is paused from the moment it is attached -- ``resume`` before it
    begins lifts it -- and copies nothing until resumed; a resume is journalled too."""
    journal = Journal(str(tmp_path), "vm1")
    first = Looping()
    first.attach(journal, "vm1")
    first.user_pause()
    first.journal = None  # (stopped by a crash: no end)
    journal.close()
    journal = Journal.load(str(tmp_path), "vm1")
    [pending] = journal.pending()
    assert pending.paused

    async def main() -> None:
        job = Looping(steps=3)
        job.attach(journal, "vm1", resumes=pending)
        assert job.paused and job.status == CREATED
        if then == "resume while created":
            job.user_resume()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.execute)
            if then == "wait":
                await until(lambda: job.status == PAUSED)
                await trio.sleep(0.05)
                assert job.offset == 0 and job.copied == 0
                [again] = Journal.load(str(tmp_path), "vm1", writable=False).pending()
                assert again.paused and again.key == job.journal_key
                job.user_resume()
                [again] = Journal.load(str(tmp_path), "vm1", writable=False).pending()
                assert not again.paused
        assert job.status == CONCLUDED and job.offset == 3 * 1024
        assert job.events[:2] == ["JOB_STARTED", "JOB_RESUMED"], job.events

    trio.run(main)
    assert Journal.load(str(tmp_path), "vm1").pending() == []
    journal.close()
