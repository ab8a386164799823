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

Three instants per operation by default; ``--runslow`` runs 24 per operation.
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

from chainfs.jobs.journal import JOURNAL_NAME, Journal

from .conftest import DEADLINE, Mount, Mounter, Seeds, first_difference, read_direct, wait_for

MiB = im.MiB
SIZE = 16 * MiB
BLOCK = 4096
FAST_RUNS, SLOW_RUNS = 3, 24
NAME = "E"
START = ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]  # active first


@dataclass(frozen=True)
class Operation:
    kind: str  # the control file
    text: str  # what is written to it
    target: list[str]  # the chain once the operation is done, active first
    window: float  # kill within this many seconds after the command


OPERATIONS = {
    "stream": Operation("stream", "base=A.qcow2 speed=2M", ["E.qcow2", "A.qcow2"], 1.4),
    "commit": Operation(
        "commit", "top=D.qcow2 base=B.qcow2 speed=2M", ["E.qcow2", "B.qcow2", "A.qcow2"], 1.4
    ),
    "active-commit": Operation("commit", "base=B.qcow2 speed=2M", ["B.qcow2", "A.qcow2"], 1.6),
    "copy-full": Operation("copy", "F.qcow2 sync=full speed=4M", ["F.qcow2"], 1.4),
    "copy-top": Operation("copy", "F.qcow2 sync=top speed=1M", ["F.qcow2", *START[1:]], 1.6),
    "snapshot": Operation("snapshot", "S.qcow2", ["S.qcow2", *START], 0.08),
}


class Guest(threading.Thread):
    """Writes 4 KiB-aligned random data through the flat file and fsyncs after each write;
    ``model`` takes a write only once its fsync returned, ``inflight`` is the one that
    may or may not have landed when the server died."""

    def __init__(self, path: Path, model: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.model = model
        self.rng = random.Random(seed)
        self.inflight: tuple[int, bytes] | None = None
        self.count = 0
        self.killed = False  # set by the test just before it kills the server
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            self.error = e

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

    def wait_writes(self, n: int) -> None:
        target = self.count + n

        def done() -> bool:
            if self.error is not None:
                raise AssertionError(f"the guest failed: {self.error!r}") from self.error
            return self.count >= target

        wait_for(done, f"{n} guest writes")


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


def wait_recovered(m: Mount, pending: list[str]) -> list[dict[str, str]]:
    """Wait until every interrupted job was resumed and ended, or rolled back, and no job
    runs; return the events."""

    def settled() -> list[dict[str, str]] | None:
        events = m.events(NAME)
        for job in pending:
            resumed = [
                e
                for e in events
                if e["event"] == "JOB_RESUMED" and job in (e.get("previous"), e.get("job"))
            ]
            rolled = [e for e in events if e["event"] == "JOB_ROLLED_BACK" and e["job"] == job]
            if not resumed and not rolled:
                return None
        if m.control(NAME, "jobs").read_text():
            return None
        return events or [{}]

    return wait_for(settled, "the interrupted jobs to be resumed and to end")


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
    if guest.error is not None:
        raise AssertionError(f"the guest failed: {guest.error!r}") from guest.error

    check_images(src)
    journal = Journal.load(str(src), writable=False)
    pending = journal.pending()
    where = "+".join(p.phase or "running" for p in pending) or "no job"

    again = mounter(src)
    events = wait_recovered(again, [p.id for p in pending])
    names = sorted(os.listdir(again.mountpoint))
    assert names == ["E.img", "control"], (names, events)
    layers = again.layers(NAME)
    assert layers in (START, op.target), (layers, events)
    got = read_direct(again.img(NAME))
    assert_model(got, model, guest.inflight)
    for e in events:
        assert e.get("event") != "JOB_COMPLETED" or "error" not in e, events
    again.unmount()
    assert not (src / JOURNAL_NAME).exists(), "a job was left in the journal"
    check_images(src)
    outcome = {e["event"] for e in events} & {"JOB_RESUMED", "JOB_ROLLED_BACK"}
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
