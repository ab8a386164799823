"""kill -9 at random instants of every live operation, while a guest writes and fsyncs.

For stream, intermediate commit, active commit, copy and snapshot on the seed chain
``[A] <- [B] <- [C] <- [D] <- [E]``: mount, start a guest that writes through the flat
file and fsyncs after every write, start the operation, and SIGKILL the server at a
random (seeded) instant.  Then, with the mount lazily detached:

- ``qemu-img check`` finds no corruption in any image of the directory (leaks are
  allowed: a crash may leak clusters, never corrupt);
- the next mount resumes or rolls back what the journal says was interrupted, and the
  resumed job completes (no job stuck; the journal is gone once all are done);
- the flat file equals the model of the guest's acknowledged writes (each written
  only after its fsync returned; the one write in flight at the kill may read old or
  new, block by block);
- the chain is the one the operation started from or the one it was heading to, under
  the same name, and no partial target shows up as a chain of its own;
- after a clean unmount every image passes ``qemu-img check``.

Three instants per operation by default; ``--runslow`` adds 20 per operation.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from chainfs import source as sources
from chainfs.jobs import journal as jn
from chainfs.jobs.journal import Journal, journal_path

from .conftest import (
    DEADLINE,
    GuestThread,
    Mount,
    Mounter,
    Seeds,
    first_difference,
    read_direct,
    run,
    wait_for,
)

MiB = im.MiB
SIZE = 16 * MiB
BLOCK = 4096
FAST_RUNS, SLOW_RUNS = 3, 20
NAME = "E"
START = ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]  # active first

# a read-only mount leaves an interrupted job in the journal, and says so
interrupted_job_left_alone = pytest.mark.expect_log(
    r"WARNING chainfs\.jobs\.recovery: chain=\S+ job=\S+ type=\w+ was interrupted; "
    "a read-write mount resumes it$"
)


@dataclass(frozen=True)
class Operation:
    kind: str  # the control file
    text: str  # what is written to it
    target: list[str]  # the chain once the operation is done, active first
    window: float  # kill within this many seconds after the command


OPERATIONS = {
    "stream": Operation("stream", "base=A.qcow2 speed=1M", ["E.qcow2", "A.qcow2"], 1.6),
    "commit": Operation(
        "commit", "top=D.qcow2 base=B.qcow2 speed=2M", ["E.qcow2", "B.qcow2", "A.qcow2"], 1.4
    ),
    "active-commit": Operation("commit", "base=B.qcow2 speed=2M", ["B.qcow2", "A.qcow2"], 1.6),
    "copy-full": Operation("copy", "F.qcow2 sync=full speed=4M", ["F.qcow2"], 1.4),
    "copy-top": Operation("copy", "F.qcow2 sync=top speed=2M", ["F.qcow2", *START[1:]], 1.0),
    "snapshot": Operation("snapshot", "S.qcow2", ["S.qcow2", *START], 0.08),
}


class Guest(GuestThread):
    """Writes 4 KiB-aligned random data through the flat file and fsyncs after each write;
    ``model`` takes a write only once its fsync returned, ``inflight`` is the one that
    may or may not have landed when the server died."""

    def __init__(self, path: Path, model: bytearray, seed: int) -> None:
        super().__init__()
        self.path = path
        self.model = model
        self.rng = random.Random(seed)
        self.inflight: tuple[int, bytes] | None = None
        self.killed = False  # set by the test just before it kills the server

    def _loop(self) -> None:
        rng, blocks = self.rng, len(self.model) // BLOCK
        fd = os.open(self.path, os.O_RDWR)
        try:
            while True:
                n = rng.randint(1, 16)
                off = rng.randrange(0, blocks - n) * BLOCK
                data = bytes(n * BLOCK) if rng.random() < 0.1 else rng.randbytes(n * BLOCK)
                self.inflight = (off, data)
                try:
                    assert os.pwrite(fd, data, off) == len(data)
                    os.fsync(fd)
                except OSError as e:
                    if self.killed and e.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
                        return
                    raise
                self.model[off : off + len(data)] = data
                self.inflight = None
                self.count += 1
        finally:
            try:
                os.close(fd)
            except OSError:
                if not self.killed:
                    raise


def check_images(directory: Path) -> None:
    """No image in ``directory`` is corrupt (leaked clusters are allowed)."""
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or not p.is_file() or im.image_format(str(p)) != "qcow2":
            continue
        rc, report = im.check(str(p))
        assert rc in (0, 3) and not report.get("corruptions"), f"{p.name}: {rc} {report}"


def assert_model(got: bytes, model: bytearray, inflight: tuple[int, bytes] | None) -> None:
    """``got`` is the model, except that the in-flight write may show, block by block."""
    if got == model:
        return
    assert len(got) == len(model)
    if inflight is not None:
        off, data = inflight
        for i in range(0, len(data), BLOCK):
            if got[off + i : off + i + BLOCK] == data[i : i + BLOCK]:
                model[off + i : off + i + BLOCK] = data[i : i + BLOCK]
    assert got == model, first_difference(got, model)


def journal_of(src: Path) -> Path:
    return Path(journal_path(str(src), NAME))


def wait_recovered(m: Mount, pending: list[str]) -> list[dict[str, str]]:
    """Wait until every interrupted job was resumed and ended, or rolled back, and no job
    runs; return the events."""

    def settled() -> tuple[list[dict[str, str]]] | None:
        events = m.events(NAME)
        for job in pending:
            mine = [e for e in events if e.get("job") == job]  # a resumed job keeps its id
            if not {e["event"] for e in mine} & {"JOB_RESUMED", "JOB_ROLLED_BACK"}:
                return None
        if m.control(NAME, "jobs").read_text():
            return None
        return (events,)

    return wait_for(settled, "the interrupted jobs to be resumed and to end")[0]


def crash_once(tmp_path: Path, seeds: Seeds, mounter: Mounter, op: Operation, seed: int) -> str:
    """One kill at a random instant of ``op``; return where the journal says it was."""
    rng = random.Random(seed)
    src = tmp_path / f"src{seed}"
    seed_chain = seeds(src, size=SIZE)
    model = bytearray(seed_chain.content)
    m = mounter(src)
    guest = Guest(m.img(NAME), model, seed)
    guest.start()
    guest.wait_writes(rng.randint(1, 20))
    command = threading.Thread(target=_command, args=(m, op), daemon=True)
    command.start()
    # the random instant is the point of the test: no condition to wait for
    time.sleep(rng.uniform(0, op.window))
    guest.killed = True
    m.kill(signal.SIGKILL)
    m.wait_exit(None)
    m.cleanup()  # the lazy unmount of the dead mount
    guest.join(DEADLINE)
    command.join(DEADLINE)
    assert not guest.is_alive() and not command.is_alive()
    guest.check()

    check_images(src)
    journal = Journal.load(str(src), NAME, writable=False)
    pending = journal.pending()
    where = "+".join(p.phase or "running" for p in pending) or "no job"

    again = mounter(src)
    events = wait_recovered(again, [p.id for p in pending])
    names = sorted(os.listdir(again.mountpoint))
    assert names == ["E.img", "control", "layers"], (names, events)
    layers = again.layers(NAME)
    assert layers in (START, op.target), (layers, events)
    got = read_direct(again.img(NAME))
    assert_model(got, model, guest.inflight)
    for e in events:
        assert e.get("event") != "JOB_COMPLETED" or "error" not in e, events
    again.unmount()
    assert not journal_of(src).read_bytes(), "a job was left in the journal"
    check_images(src)
    outcome = {e["event"] for e in events} & {"JOB_RESUMED", "JOB_ROLLED_BACK"}
    if any(int(e.get("offset", 0)) for e in events if e["event"] == "JOB_RESUMED"):
        outcome = {"JOB_RESUMED from a checkpoint"}
    end = "target" if layers == op.target else "start"
    return f"{where}, {'/'.join(sorted(outcome)) or 'nothing to do'}, {end} chain"


def _command(m: Mount, op: Operation) -> None:
    try:
        m.command(NAME, op.kind, op.text)
    except OSError as e:
        # the server died under the write
        assert e.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED), e


def run_crashes(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, operation: str, n: int, base: int
) -> None:
    op = OPERATIONS[operation]
    seen: dict[str, int] = {}
    for i in range(n):
        where = crash_once(tmp_path, seeds, mounter, op, seed=base + i)
        seen[where] = seen.get(where, 0) + 1
        mounter.close()
        mounter.mounts.clear()
    print(f"\n{operation}: {n} kills:")
    for where, count in sorted(seen.items()):
        print(f"  {count:3d}  {where}")


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_kill_during(tmp_path: Path, seeds: Seeds, mounter: Mounter, operation: str) -> None:
    run_crashes(tmp_path, seeds, mounter, operation, FAST_RUNS, base=0)


@pytest.mark.slow
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_kill_during_many(tmp_path: Path, seeds: Seeds, mounter: Mounter, operation: str) -> None:
    run_crashes(tmp_path, seeds, mounter, operation, SLOW_RUNS, base=1000)


# -- a crash at each step of a job's last phase, set up exactly -----------------------------
#
# Random instants rarely fall into the few milliseconds of a pivot, so here the state a
# crash leaves is built directly: the data copied (by QEMU's tools), the journal as the
# job wrote it (through the journal's own API), and the first ``done`` of the phase's
# changes applied.  The next mount must finish the rest.


def qemu_img(*args: str | Path) -> None:
    run("qemu-img", *args)


def interrupted(
    src: Path,
    kind: str,
    params: dict[str, object],
    *,
    phase: str | None = None,
    actions: list[jn.Action] | None = None,
    done: int = 0,
    offset: int = 0,
) -> str:
    """Leave a journal as a job that stopped there would have; apply ``done`` actions."""
    j = Journal(str(src), NAME)
    p = j.begin(kind, f"{kind}-7", NAME, params)
    if offset:
        j.progress(p.key, offset)
    if phase is not None:
        assert actions is not None
        j.phase(p.key, phase, actions)
        state = sources.load(str(src), {NAME: j.locks()})
        jn.redo(actions[:done], state, NAME)
    j.close()
    return p.id


def remount_finishes(mounter: Mounter, src: Path, job: str, layers: list[str]) -> Mount:
    m = mounter(src)
    events = wait_recovered(m, [job])
    mine = [(e["event"], e.get("phase")) for e in events if e.get("job") == job]
    assert ("JOB_RESUMED", mine[0][1]) == mine[0] and mine[-1][0] == "JOB_COMPLETED", events
    assert m.layers(NAME) == layers, events
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "control", "layers"]
    return m


def read_only_view(mounter: Mounter, src: Path, content: bytes, done: int) -> None:
    """A read-only mount changes nothing but still serves the one chain, exact.

    (``done == 1`` is left out: a pivot records its state-file changes in one replace,
    so a crash never leaves half of them.)
    """
    if done == 1:
        return
    ro = mounter(src, "ro")
    assert sorted(os.listdir(ro.mountpoint)) == ["E.img", "control", "layers"]
    assert read_direct(ro.img(NAME)) == content
    ro.unmount()


def finish(m: Mount, src: Path, content: bytes) -> None:
    assert read_direct(m.img(NAME)) == content
    m.unmount()
    assert not journal_of(src).read_bytes()
    check_images(src)


@pytest.mark.parametrize("done", [0, 1, 2])
def test_stream_prepare_is_finished(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, done: int
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src, (a, b, c, d, e) = tmp_path / "src", seed.layers
    qemu_img("rebase", "-f", "qcow2", "-b", a.name, "-F", "qcow2", e)  # copies the data
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", d.name, "-F", "qcow2", e)
    actions = [jn.retire([str(b), str(c), str(d)]), jn.set_backing(str(e), a.name, "qcow2")]
    params = {"node": str(e), "base": str(a), "speed": 0}
    job = interrupted(src, "stream", params, phase="prepare", actions=actions, done=done)
    m = remount_finishes(mounter, src, job, ["E.qcow2", "A.qcow2"])
    finish(m, src, seed.content)


@pytest.mark.parametrize("done", [0, 1, 2])
def test_commit_prepare_is_finished(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, done: int
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src, (_, b, c, d, e) = tmp_path / "src", seed.layers
    qemu_img("commit", "-d", "-f", "qcow2", "-b", b, d)  # C and D into B, D kept
    actions = [jn.retire([str(d), str(c)]), jn.set_backing(str(e), b.name, "qcow2")]
    params = {"top": str(d), "base": str(b), "speed": 0}
    job = interrupted(src, "commit", params, phase="prepare", actions=actions, done=done)
    m = remount_finishes(mounter, src, job, ["E.qcow2", "B.qcow2", "A.qcow2"])
    finish(m, src, seed.content)


@pytest.mark.parametrize("done", [0, 1, 2])
@interrupted_job_left_alone
def test_active_commit_pivot_is_finished(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, done: int
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src, (_, b, c, d, e) = tmp_path / "src", seed.layers
    qemu_img("commit", "-d", "-f", "qcow2", "-b", b, e)
    actions = [jn.retire([str(e), str(d), str(c)]), jn.record_active(NAME, str(b))]
    params = {"top": str(e), "base": str(b), "speed": 0, "wait": None}
    job = interrupted(src, "commit", params, phase="pivot", actions=actions, done=done)
    read_only_view(mounter, src, seed.content, done)
    m = remount_finishes(mounter, src, job, ["B.qcow2", "A.qcow2"])
    finish(m, src, seed.content)


@pytest.mark.parametrize("done", [0, 1, 2])
@interrupted_job_left_alone
def test_copy_pivot_is_finished(tmp_path: Path, seeds: Seeds, mounter: Mounter, done: int) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src, layers = tmp_path / "src", seed.layers
    f = src / "F.qcow2"
    qemu_img("convert", "-f", "qcow2", "-O", "qcow2", layers[-1], f)
    actions = [jn.retire([str(x) for x in reversed(layers)]), jn.record_active(NAME, str(f))]
    params = {"dest": str(f), "sync": "full", "speed": 0, "wait": None}
    job = interrupted(src, "copy", params, phase="pivot", actions=actions, done=done)
    read_only_view(mounter, src, seed.content, done)
    m = remount_finishes(mounter, src, job, ["F.qcow2"])
    finish(m, src, seed.content)


@interrupted_job_left_alone
def test_a_partial_copy_is_never_a_chain(tmp_path: Path, seeds: Seeds, mounter: Mounter) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src = tmp_path / "src"
    f = src / "F.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", f, str(SIZE))
    im.write(str(f), [(0, 65536, 0x5A)])
    params = {"dest": str(f), "sync": "full", "speed": 0, "wait": None}
    job = interrupted(src, "copy", params)
    ro = mounter(src, "ro")
    assert sorted(os.listdir(ro.mountpoint)) == ["E.img", "control", "layers"]
    ro.unmount()
    m = mounter(src)
    events = wait_recovered(m, [job])
    assert m.layers(NAME) in (START, ["F.qcow2"]), events
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "control", "layers"]
    finish(m, src, seed.content)
    again = mounter(src)
    assert sorted(os.listdir(again.mountpoint)) == ["E.img", "control", "layers"]
    again.unmount()


@pytest.mark.parametrize("state", ["absent", "unfinished", "complete", "foreign"])
def test_an_interrupted_snapshot_is_settled(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, state: str
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src = tmp_path / "src"
    s = src / "S.qcow2"
    # the creation's temporary file: written up to the crash, never renamed into place
    unfinished = src / ".chainfs-new-0123abcd-S.qcow2"
    if state == "unfinished":
        with open(unfinished, "wb") as f:
            f.truncate(65536)
            f.seek(65536)
            f.write(b"\x00\x00\x00\x00\x00\x02\x00\x00" + bytes(65528))
    elif state == "complete":
        qemu_img("create", "-q", "-f", "qcow2", "-b", "E.qcow2", "-F", "qcow2", s)
    elif state == "foreign":
        s.write_bytes(b"my notes, not an image\n")
    job = interrupted(src, "snapshot", {"target": str(s), "below": str(seed.active)})
    m = mounter(src)
    events = wait_recovered(m, [job])
    mine = [e for e in events if e.get("job") == job]
    if state == "complete":
        assert [e["event"] for e in mine] == ["JOB_RESUMED", "SNAPSHOT_TAKEN"], events
        assert m.layers(NAME) == ["S.qcow2", *START]
    else:
        assert [e["event"] for e in mine] == ["JOB_ROLLED_BACK"], events
        assert m.layers(NAME) == START
    assert s.exists() == (state in ("complete", "foreign"))
    assert not unfinished.exists()
    if state == "foreign":
        assert s.read_bytes() == b"my notes, not an image\n"
    finish(m, src, seed.content)


@pytest.mark.expect_log(r"WARNING chainfs\.jobs\.journal: .* damaged or torn records$")
def test_a_stream_resumes_from_its_checkpoint_past_a_torn_record(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src, (a, _, _, _, e) = tmp_path / "src", seed.layers
    # what the stream copied before its checkpoint (copy-on-read takes A's data too,
    # which changes nothing the disk shows)
    run("qemu-io", "-C", "-f", "qcow2", "-c", f"read 0 {4 * MiB}", e)
    params = {"node": str(e), "base": str(a), "speed": 0}
    job = interrupted(src, "stream", params, offset=4 * MiB)
    with open(journal_of(src), "ab") as f:
        f.write(jn.encode({"r": "progress", "key": "x", "offset": 8 * MiB})[:-9])
    m = mounter(src)
    events = wait_recovered(m, [job])
    [resumed] = [x for x in events if x["event"] == "JOB_RESUMED"]
    assert resumed["job"] == job and resumed["offset"] == str(4 * MiB), events
    assert m.layers(NAME) == ["E.qcow2", "A.qcow2"]
    finish(m, src, seed.content)


@pytest.mark.parametrize("operation", ["stream", "commit", "active-commit", "copy-full"])
def test_an_unmount_stops_a_job_for_the_next_mount_to_resume(
    tmp_path: Path, seeds: Seeds, mounter: Mounter, operation: str
) -> None:
    op = OPERATIONS[operation]
    src = tmp_path / "src"
    seed = seeds(src, size=SIZE)
    m = mounter(src)
    job = m.start_job(NAME, op.kind, op.text.rsplit(" ", 1)[0] + " speed=1M")
    wait_for(lambda: int(m.lines(NAME, "jobs")[0]["offset"]), f"{job} to make progress")
    m.unmount()
    [pending] = Journal.load(str(src), NAME, writable=False).pending()
    assert pending.id == job
    again = mounter(src)
    events = wait_recovered(again, [job])
    [resumed] = [e for e in events if e["event"] == "JOB_RESUMED"]
    if operation in ("stream", "commit"):
        # resumed from where it was stopped; a mirror's dirty map died with the mount
        assert int(resumed["offset"]) > 0, events
    assert again.layers(NAME) == op.target, events
    finish(again, src, seed.content)


def test_a_job_that_cannot_resume_is_rolled_back(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed = seeds(tmp_path / "src", size=SIZE)
    src = tmp_path / "src"
    params: dict[str, object] = {"node": str(tmp_path / "x.qcow2"), "base": None, "speed": 0}
    job = interrupted(src, "stream", params)
    m = mounter(src)
    events = wait_recovered(m, [job])
    [rolled] = [e for e in events if e["event"] == "JOB_ROLLED_BACK"]
    assert rolled["job"] == job and "not a layer" in rolled["reason"], events
    assert m.layers(NAME) == START
    finish(m, src, seed.content)
