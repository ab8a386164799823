"""QEMU's job verbs through the control files of a real mount.

- Every (state, verb) pair of the table: a copy job is brought into the state (created,
  waiting, pending and aborting held there by ``jobhold.py``), the verb is written to
  its control file, and the job either moves as QEMU's would or the write fails with
  EINVAL/EBUSY and QEMU's words in ``events``; a concluded job is gone (ENOENT), as
  QEMU's auto-dismissed jobs are.
- ``speed JOB RATE``: the job's measured rate (its ``offset`` in ``jobs``) follows a new
  rate within a second, up and down.
- ``pause JOB``: ``jobs`` shows ``paused`` and the offset stays put for 2 s;
  ``resume JOB`` and it moves again.
- A job keeps its id, and ``events`` its history, across ``chainfs umount`` + mount and
  ``kill -9`` + mount; a new job after that gets an id never used on the chain.
"""

from __future__ import annotations

import errno
import itertools
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chainfs.jobs import states
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
)

from . import conftest
from .conftest import DEADLINE, Mount, Mounter, Seeds, read_direct, run, wait_for

MiB = 1 << 20
NAME = "E"
JOBHOLD = Path(__file__).with_name("jobhold.py")
# the control file of each verb, and what it is written with besides the job id
FILES = {CANCEL: "cancel", PAUSE: "pause", RESUME: "resume", SET_SPEED: "speed"}
FILES[COMPLETE] = "complete"
FILES[CHANGE] = "change"
# what each verb is written with after the job id
ARGS = {SET_SPEED: " 2M", CHANGE: " copy-mode=write-blocking"}
HELD = (CREATED, WAITING, PENDING, ABORTING)

# every refused command is logged as a warning by the server
pytestmark = pytest.mark.expect_log(r"command refused")


@dataclass
class Held:
    """A mount whose jobs ``jobhold.py`` holds in the state the hold file names."""

    mount: Mount
    hold: Path
    names: Iterator[int]

    def hold_in(self, state: str) -> None:
        self.hold.write_text(state + "\n")

    def release(self) -> None:
        self.hold.write_text("")


@pytest.fixture(scope="module")
def held(module_mounter: Mounter, seeds: Seeds) -> Iterator[Held]:
    root = module_mounter.root
    seeds(root / "src", size=8 * MiB)
    hold = root / "hold"
    hold.write_text("")
    saved = conftest.CHAINFS
    conftest.CHAINFS = (sys.executable, str(JOBHOLD), str(hold))
    try:
        m = module_mounter(root / "src")
    finally:
        conftest.CHAINFS = saved
    yield Held(m, hold, itertools.count(1))


def job_line(m: Mount) -> dict[str, str] | None:
    jobs = m.lines(NAME, "jobs")
    return jobs[0] if jobs else None


def status_of(m: Mount) -> str | None:
    line = job_line(m)
    return line["status"] if line else None


def wait_status(m: Mount, state: str) -> dict[str, str]:
    def there() -> dict[str, str] | None:
        line = job_line(m)
        return line if line and line["status"] == state else None

    return wait_for(there, f"a job in state {state}")


def start_copy(h: Held, state: str) -> str:
    """Start a copy (to a new file) and bring it into ``state``; return its id."""
    m = h.mount
    dest = f"F{next(h.names)}.qcow2"
    slow = state in (RUNNING, PAUSED, ABORTING)
    ready = state in (READY, STANDBY)
    text = f"{dest} speed={'256K' if slow else '0'}" + (" wait=ready" if ready else "")
    if state in HELD:
        h.hold_in(state)
    if state == ABORTING:
        h.release()
        job = m.start_job(NAME, "copy", text)
        h.hold_in(ABORTING)
        m.command(NAME, "cancel", job)
    else:
        m.command(NAME, "copy", text)
    line = wait_status(m, {PAUSED: RUNNING, STANDBY: READY}.get(state, state))
    if state in (PAUSED, STANDBY):
        m.command(NAME, "pause", line["id"])
        line = wait_status(m, state)
    return line["id"]


def send(m: Mount, verb: str, job: str) -> None:
    m.command(NAME, FILES[verb], job + ARGS.get(verb, ""))


def refused(m: Mount, verb: str, job: str, err: int) -> str:
    return m.refuse(NAME, FILES[verb], job + ARGS.get(verb, ""), err)["reason"]


def finish(h: Held, job: str) -> None:
    """Let the job go and end it (cancel where it still runs)."""
    m = h.mount
    h.release()
    if status_of(m) not in (None, WAITING, PENDING, ABORTING, CONCLUDED):
        try:
            m.command(NAME, "cancel", job)
        except OSError as e:
            assert e.errno == errno.ENOENT  # it ended meanwhile
    m.wait_job(NAME, job)
    wait_for(lambda: status_of(m) is None, "the job to go from jobs")


def table_refuses(state: str, verb: str) -> bool:
    return not states.allowed(verb, state)


def job_refuses(state: str, verb: str) -> bool:
    """What QEMU's job_user_pause/resume and job_complete refuse past the table."""
    return (
        (verb == PAUSE and state in (PAUSED, STANDBY))
        or (verb == RESUME and state not in (PAUSED, STANDBY))
        or (verb == COMPLETE and state == STANDBY)
    )


PAIRS = [(s, v) for s in states.STATES if s != CONCLUDED for v in states.VERB_NAMES]


@pytest.mark.parametrize(("state", "verb"), PAIRS)
def test_every_verb_in_every_state(held: Held, state: str, verb: str) -> None:
    m = held.mount
    job = start_copy(held, state)
    try:
        if table_refuses(state, verb):
            ending = state in (WAITING, PENDING, ABORTING)
            reason = refused(m, verb, job, errno.EBUSY if ending else errno.EINVAL)
            why = ": it is not ready" if verb == "complete" and not ending else ""
            assert reason == f"job {job!r} in state {state!r} cannot accept {verb!r}{why}"
            assert status_of(m) == state
        elif job_refuses(state, verb):
            reason = refused(m, verb, job, errno.EINVAL)
            assert f"job {job!r}" in reason and ("paused" in reason), reason
            assert status_of(m) == state
        else:
            send(m, verb, job)
            if verb == PAUSE:
                assert status_of(m) == {RUNNING: PAUSED, READY: STANDBY}.get(state, state)
            elif verb == RESUME:
                assert status_of(m) == {PAUSED: RUNNING, STANDBY: READY}[state]
            elif verb == SET_SPEED:
                line = job_line(m)
                assert line is not None and line["speed"] == str(2 * MiB)
            elif verb == CHANGE:  # a copy is a mirror: it switches, in the state it is in
                line = job_line(m)
                assert line is not None and line["copy-mode"] == "write-blocking", line
                assert line["status"] == state, line
            elif verb == COMPLETE:
                end = m.wait_job(NAME, job)
                assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
            else:
                held.release()
                assert m.wait_job(NAME, job)["event"] == "JOB_CANCELLED"
    finally:
        finish(held, job)


@pytest.mark.parametrize("verb", states.VERB_NAMES)
def test_a_concluded_job_is_gone(held: Held, verb: str) -> None:
    m = held.mount
    job = start_copy(held, RUNNING)
    finish(held, job)
    reason = refused(m, verb, job, errno.ENOENT)
    assert reason == f"no job {job!r} on chain {NAME!r}"


# -- speed, pause and resume as a user sees them --------------------------------------------


def offset_after(m: Mount, seconds: float) -> tuple[int, int]:
    """The job's offset now and ``seconds`` later."""
    line = job_line(m)
    assert line is not None
    first = int(line["offset"])
    time.sleep(seconds)  # the rate over a stretch of time is what is measured
    line = job_line(m)
    assert line is not None, "the job ended too soon"
    return first, int(line["offset"])


def filled(tmp_path: Path, seeds: Seeds, mounter: Mounter) -> Mount:
    """A mount of a 64 MiB seed chain whose every cluster the guest wrote: a copy of it
    copies everything, so its offset moves at its rate."""
    seeds(tmp_path / "src", size=64 * MiB)
    m = mounter(tmp_path / "src")
    with open(m.img(NAME), "r+b") as f:
        for _ in range(64):
            f.write(b"\x5a" * MiB)
    return m


def test_a_speed_change_is_followed_within_a_second(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    m = filled(tmp_path, seeds, mounter)
    job = m.start_job(NAME, "copy", "F.qcow2 speed=1M")
    wait_for(lambda: int(m.lines(NAME, "jobs")[0]["offset"]), "the copy to start")
    a, b = offset_after(m, 3.0)
    assert 1 * MiB <= b - a <= 5 * MiB, (a, b)  # ~3 MiB at 1 MiB/s (steps of 1 MiB)
    m.command(NAME, "speed", f"{job} 8M")
    line = job_line(m)
    assert line is not None and line["speed"] == str(8 * MiB), line
    time.sleep(1.0)  # within a second the new rate holds
    a, b = offset_after(m, 2.0)
    assert 12 * MiB <= b - a <= 20 * MiB, (a, b)  # ~16 MiB at 8 MiB/s
    m.command(NAME, "speed", f"{job} 512K")
    time.sleep(1.0)
    a, b = offset_after(m, 4.0)
    assert b - a <= 4 * MiB, (a, b)  # ~2 MiB at 512 KiB/s, not 32 at the old rate
    m.command(NAME, "cancel", job)
    assert m.wait_job(NAME, job)["event"] == "JOB_CANCELLED"


def test_pause_stops_progress_and_resume_continues(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    m = filled(tmp_path, seeds, mounter)
    job = m.start_job(NAME, "copy", "F.qcow2 speed=4M")
    wait_for(lambda: int(m.lines(NAME, "jobs")[0]["offset"]), "the copy to start")
    m.command(NAME, "pause", job)
    assert status_of(m) == PAUSED
    time.sleep(0.5)  # a step under way when the pause came may still land
    a, b = offset_after(m, 2.0)
    assert a == b and status_of(m) == PAUSED, (a, b)
    m.command(NAME, "resume", job)
    assert status_of(m) == RUNNING
    wait_for(lambda: int((job_line(m) or {"offset": "0"})["offset"]) > b, "progress again")
    m.command(NAME, "speed", f"{job} 0")
    end = m.wait_job(NAME, job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers(NAME) == ["F.qcow2"]


# -- ids and events across unmount and crash ------------------------------------------------


def ended_in(events: list[dict[str, str]], job: str) -> list[dict[str, str]]:
    return [e for e in events if e.get("job") == job]


@pytest.mark.expect_log(r"ignored=\d+ damaged or torn records", r"events: dropped \d+ torn")
@pytest.mark.parametrize("how", ["umount", "kill -9"])
def test_ids_and_events_survive(tmp_path: Path, seeds: Seeds, mounter: Mounter, how: str) -> None:
    src = tmp_path / "src"
    seeds(src, size=16 * MiB)
    m = mounter(src)
    first = m.run_job(NAME, "commit", "top=D.qcow2 base=C.qcow2")["job"]
    # a stream, interrupted: at unmount (it is journalled and resumed) or by SIGKILL
    job = m.start_job(NAME, "stream", "base=A.qcow2 speed=1M")
    assert job != first
    wait_for(lambda: int(m.lines(NAME, "jobs")[0]["offset"]), f"{job} to make progress")
    history = m.events(NAME)
    stop(m, how)

    again = mounter(src)
    events = again.events(NAME)
    # the history is there, line for line, before what this mount added
    assert events[: len(history)] == history
    assert any(e["event"] == "JOB_COMPLETED" and e["job"] == first for e in events)

    # the stream comes back under its own id and ends
    def completed() -> list[dict[str, str]] | None:
        events = again.events(NAME)
        done = [e for e in ended_in(events, job) if e["event"] == "JOB_COMPLETED"]
        return events if done else None

    events = wait_for(completed, f"{job} to complete", DEADLINE)
    mine = [e["event"] for e in ended_in(events[len(history) :], job)]
    resumed = mine.index("JOB_RESUMED")
    assert mine[resumed - 1 : resumed + 1] == ["JOB_STARTED", "JOB_RESUMED"], mine
    assert mine[-1] == "JOB_COMPLETED" and "error" not in ended_in(events, job)[-1], mine
    assert again.layers(NAME) == ["E.qcow2", "A.qcow2"]
    # a new job gets an id never used on the chain
    new = again.start_job(NAME, "commit", "speed=0 base=A.qcow2 wait=ready")
    used = {e["job"] for e in again.events(NAME) if "job" in e and e["job"] != new}
    assert new not in used and new.startswith("commit-"), (new, used)
    again.command(NAME, "cancel", new)
    again.wait_job(NAME, new)
    again.unmount()
    # and once more: grep after a remount still finds the last job's end
    third = mounter(src)
    assert any(e["event"] == "JOB_CANCELLED" and e["job"] == new for e in third.events(NAME))
    assert any(e["event"] == "JOB_COMPLETED" and e["job"] == job for e in third.events(NAME))


# -- a pause across unmount and crash ----------------------------------------------------------


def stop(m: Mount, how: str) -> None:
    """End the server: ``chainfs umount``, or SIGKILL."""
    if how == "umount":
        run(*conftest.CHAINFS, "umount", m.mountpoint)
        m.wait_exit(0)
    else:
        m.kill(signal.SIGKILL)
        m.wait_exit(None)
        m.cleanup()


def held_paused(m: Mount, job: str) -> dict[str, str]:
    """The job is back paused, said so when it resumed, and copies nothing."""
    resumed = wait_for(
        lambda: [e for e in m.events(NAME) if e["event"] == "JOB_RESUMED" and e["job"] == job],
        f"{job} to be resumed",
    )
    assert resumed[-1].get("paused") == "true", resumed
    line = job_line(m)
    assert line is not None and line["id"] == job and line["status"] == PAUSED, line
    time.sleep(1)  # (at its speed it would have copied a step by now)
    again = job_line(m)
    assert again == {**line, "copied": "0"}, (line, again)
    return line


@pytest.mark.expect_log(r"ignored=\d+ damaged or torn records", r"events: dropped \d+ torn")
@pytest.mark.parametrize(
    ("kind", "how"), [("stream", "umount"), ("stream", "kill -9"), ("copy", "kill -9")]
)
def test_a_paused_job_comes_back_paused(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, kind: str, how: str
) -> None:
    """``pause`` is journalled (synced before the write returns): after an unmount or a
    kill -9 the next mount resumes the job paused (a stream from its checkpoint; a copy,
    whose dirty map died with the mount, from the start: ``paused``, not ``standby``),
    it copies nothing until ``resume``, then ends exact; paused twice over (unmounted
    again while held) it stays paused too."""
    src = tmp_path / "src"
    seed = seeds(src, size=16 * MiB)
    m = mounter(src)
    if kind == "stream":
        job = m.start_job(NAME, "stream", "base=A.qcow2 speed=1M")
        wait_for(lambda: int(m.lines(NAME, "jobs")[0]["offset"]), f"{job} to make progress")
    else:
        m.command(NAME, "copy", "F.qcow2 speed=0 wait=ready")
        line = wait_status(m, READY)
        job = line["id"]
    m.command(NAME, "pause", job)
    assert status_of(m) == (PAUSED if kind == "stream" else STANDBY)
    stop(m, how)

    again = mounter(src)
    line = held_paused(again, job)
    if how == "umount":
        assert int(line["offset"]) > 0, line  # from its checkpoint
        stop(again, "umount")  # held paused, stopped again: still paused
        again = mounter(src)
        assert held_paused(again, job)["offset"] == line["offset"]
    again.command(NAME, "resume", job)
    again.command(NAME, "speed", f"{job} 0")
    if kind == "copy":
        wait_status(again, READY)
        again.command(NAME, "complete", job)
    end = again.wait_job(NAME, job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert again.layers(NAME) == (["E.qcow2", "A.qcow2"] if kind == "stream" else ["F.qcow2"])
    assert read_direct(again.img(NAME)) == seed.content
    again.unmount()


@pytest.mark.expect_log(r"ignored=\d+ damaged or torn records", r"events: dropped \d+ torn")
def test_a_resumed_job_comes_back_running_after_a_kill(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    """``resume`` is journalled as well: paused, resumed, then kill -9: the next mount
    resumes the job running, and it ends exact."""
    src = tmp_path / "src"
    seed = seeds(src, size=16 * MiB)
    m = mounter(src)
    job = m.start_job(NAME, "stream", "base=A.qcow2 speed=256K")
    m.command(NAME, "pause", job)
    m.command(NAME, "resume", job)
    assert status_of(m) == RUNNING
    stop(m, "kill -9")

    again = mounter(src)
    resumed = wait_for(
        lambda: [e for e in again.events(NAME) if e["event"] == "JOB_RESUMED"], "the resumption"
    )
    assert resumed[0]["job"] == job and "paused" not in resumed[0], resumed
    line = job_line(again)
    assert line is None or line["status"] == RUNNING, line
    again.command(NAME, "speed", f"{job} 0")
    end = again.wait_job(NAME, job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert again.layers(NAME) == ["E.qcow2", "A.qcow2"]
    assert read_direct(again.img(NAME)) == seed.content
    again.unmount()
