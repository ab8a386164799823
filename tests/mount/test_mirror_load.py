"""Copy and active commit finish while the guest keeps writing faster than their ``speed=``.

    [A] <- [E]      copy F sync=full      ->  [F]
                    copy F sync=top       ->  [A] <- [F]
                    commit base=A         ->  [A]          (active commit)

A guest (a thread) writes random 4 KiB..64 KiB blocks with O_DIRECT all over the disk at
``RATE``, several times the job's ``speed=``; each write dirties at least one 64 KiB
granule, so the dirty data grows far faster than the job copies it.  Before the fix the
job never became ready: it drained until nothing was dirty, which never happened.  For
each job (one chain each, one mount for the module):

- ``write-blocking``: ``copy-mode=write-blocking wait=ready``; ready with nothing left to
  copy (``remaining=0``: every guest write behind the pass was copied before it was
  acknowledged), then ``complete`` pivots;
- ``complete``: ``background`` with ``wait=ready``; ready, then ``complete`` pivots
  (the remaining dirty data copied at ``speed`` while new writes are copied at once);
- ``change``: ``background`` with ``wait=ready``, switched with ``change JOB
  copy-mode=write-blocking`` during the first pass; once ready the remaining dirty data
  drops to 0 and stays there while the guest writes; ``complete`` pivots;
- ``auto``: ``background`` without ``wait=ready``: ready, then the automatic pivot.

Verdicts, with the guest stopped: the flat file is the model of acknowledged writes; the
new active layer, read by ``qemu-img compare -U`` (the guest's fsync flushed it), shows
the model and ``qemu-img check -U`` is clean; after the module's unmount, ``qemu-img
check`` is clean on every image and every chain's active layer shows its model.
Nothing here is timed: the waits are generous.

Besides: the refusals (``copy-mode`` on an intermediate commit, a bad mode, ``change`` of
a job that is no mirror, write-blocking -> background) with their reasons, a no-op
``change`` through the CLI, and a job resumed after an unmount keeping its mode.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
    CHAINFS,
    GuestThread,
    Mount,
    Mounter,
    PivotChain,
    assert_clean,
    expect_refusals,
    first_difference,
    read_direct,
    run,
    wait_for,
)

KiB, MiB = im.KiB, im.MiB
SIZE = 16 * MiB
SPEED = 4 * MiB
RATE = 4 * SPEED  # what the guest tries to write, in bytes a second
TIMEOUT = 240.0  # a job under load on a loaded 2-core machine, with room to spare

JOBS = ["copy-full", "copy-top", "commit"]
WAYS = ["write-blocking", "complete", "change", "auto"]


@dataclass
class Chain(PivotChain):
    """``NAME-base.qcow2 <- NAME.qcow2``, 16 MiB, with data in both layers."""

    model: bytearray = field(repr=False)  # what the disk shows: as built, then the guest's


def build(directory: Path, name: str) -> Chain:
    base, top = str(directory / f"{name}-base.qcow2"), str(directory / f"{name}.qcow2")
    im.create(base, SIZE)
    im.create(top, backing=os.path.basename(base), cwd=str(directory))
    im.write(base, [(0, 4 * MiB, 0x11), (10 * MiB, MiB, 0x12)])
    im.write(top, [(2 * MiB, 4 * MiB, 0x21), (13 * MiB + 4 * KiB, 64 * KiB, 0x22)])
    return Chain(directory, name, bytearray(im.reference(top)))


@dataclass
class Served:
    mount: Mount
    chains: dict[str, Chain]
    done: list[tuple[str, Path]] = field(default_factory=list)  # (chain, new active layer)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter) -> Served:
    d = tmp_path_factory.mktemp("mirror-load") / "images"
    d.mkdir()
    chains = {f"{job}-{way}": build(d, f"{job}-{way}") for job in JOBS for way in WAYS}
    # the refusals: [R-base] <- [R-mid] <- [R]
    im.create(str(d / "R-base.qcow2"), SIZE)
    im.create(str(d / "R-mid.qcow2"), backing="R-base.qcow2", cwd=str(d))
    im.create(str(d / "R.qcow2"), backing="R-mid.qcow2", cwd=str(d))
    im.write(str(d / "R-mid.qcow2"), [(0, 8 * MiB, 0x31)])
    return Served(module_mounter(d), chains)


class Guest(GuestThread):
    """Random O_DIRECT writes of 4 KiB..64 KiB (4 KiB aligned, a tenth of them zeros)
    over the whole disk at ``rate`` bytes a second, each recorded in ``model`` once
    acknowledged; ``stop()`` fsyncs, closes and re-raises what the thread met."""

    def __init__(self, path: Path, model: bytearray, *, rate: int, seed: int) -> None:
        super().__init__()
        self.path, self.model, self.rate = path, model, rate
        self.rng = random.Random(seed)
        self._stop_event = threading.Event()

    def _loop(self) -> None:
        rng, size = self.rng, len(self.model)
        buf = mmap.mmap(-1, 64 * KiB)  # page aligned, as O_DIRECT wants
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        start, written = time.monotonic(), 0
        try:
            while not self._stop_event.is_set():
                n = rng.randint(1, 16) * 4 * KiB
                off = rng.randrange(0, (size - n) // (4 * KiB) + 1) * 4 * KiB
                data = bytes(n) if rng.random() < 0.1 else rng.randbytes(n)
                buf[:n] = data
                assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
                self.model[off : off + n] = data
                self.count += 1
                written += n
                ahead = start + written / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the guest did not stop"
        self.check()


def job_line(m: Mount, chain: str) -> dict[str, str]:
    lines = m.lines(chain, "jobs")
    assert len(lines) == 1, f"{chain}: one job should run, not {lines}"
    return lines[0]


def wait_event(m: Mount, chain: str, job: str, event: str) -> None:
    def seen() -> bool:
        for e in m.events(chain):
            if e.get("job") == job and e["event"] in (event, "JOB_COMPLETED", "JOB_CANCELLED"):
                assert e["event"] == event, f"{job} ended before {event}: {e}"
                return True
        return False

    wait_for(seen, f"{event} of {job} on {chain}", TIMEOUT)


def check_pivoted(served: Served, chain: Chain, job: str, jid: str, tmp: Path) -> None:
    m = served.mount
    end = m.wait_job(chain.name, jid, TIMEOUT)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    active, layers = chain.after(job)
    assert m.layers(chain.name) == layers
    got = read_direct(m.img(chain.name))
    if got != chain.model:
        raise AssertionError(
            f"{chain.name}: the flat file is not the model of acknowledged writes: "
            + first_difference(got, chain.model)
        )
    del got
    raw = tmp / "model.raw"
    raw.write_bytes(chain.model)
    cmp = run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", active, raw, ok=(0, 1))
    assert cmp.returncode == 0, f"qemu-img compare {active} vs the model: {cmp.stdout}"
    run("qemu-img", "check", "-U", "-f", "qcow2", active)
    served.done.append((chain.name, active))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("job", JOBS)
def test_the_job_pivots_under_a_guest_writing_faster_than_its_speed(
    served: Served, tmp_path: Path, job: str, way: str
) -> None:
    m = served.mount
    chain = served.chains[f"{job}-{way}"]
    guest = Guest(m.img(chain.name), chain.model, rate=RATE, seed=len(served.done))
    guest.start()
    try:
        guest.wait_writes(20)
        mode = "write-blocking" if way == "write-blocking" else "background"
        extra = f"speed={SPEED} copy-mode={mode}" + ("" if way == "auto" else " wait=ready")
        jid = m.start_job(chain.name, *chain.command(job, extra))
        line = job_line(m, chain.name)
        assert line["copy-mode"] == mode and int(line["remaining"]) > 0, line
        if way == "change":
            m.command(chain.name, "change", f"{jid} copy-mode=write-blocking")
            line = job_line(m, chain.name)
            assert line["copy-mode"] == "write-blocking", line
            assert line["status"] == "running", line  # switched during the first pass
        if way != "auto":
            wait_event(m, chain.name, jid, "JOB_READY")
            guest.wait_writes(20)  # the guest goes on writing while the job waits
            if way != "complete":
                # every guest write is copied before it is acknowledged: nothing left
                wait_for(
                    lambda: job_line(m, chain.name)["remaining"] == "0",
                    f"{jid} to have nothing left to copy",
                    TIMEOUT,
                )
                guest.wait_writes(20)
                assert job_line(m, chain.name)["remaining"] == "0"
            m.command(chain.name, "complete", jid)
        else:
            wait_event(m, chain.name, jid, "JOB_READY")
        m.wait_job(chain.name, jid, TIMEOUT)
    finally:
        guest.stop()
    check_pivoted(served, chain, job, jid, tmp_path)


@expect_refusals
def test_copy_mode_refusals(served: Served) -> None:
    m = served.mount
    # an intermediate commit has no mirror, so no copy mode (QEMU's block-commit has none)
    e = m.refuse("R", "commit", "top=R-mid.qcow2 copy-mode=write-blocking", errno.EINVAL)
    assert "copy-mode applies to an active commit only" in e["reason"], e
    e = m.refuse("R", "copy", "R-dest.qcow2 copy-mode=sync", errno.EINVAL)
    assert "copy-mode must be 'background' or 'write-blocking'" in e["reason"], e
    assert not (served.mount.source / "R-dest.qcow2").exists()
    e = m.refuse("R", "change", "stream-1 copy-mode=write-blocking", errno.ENOENT)
    assert e["reason"] == "no job 'stream-1' on chain 'R'", e
    # a job that is no mirror: QEMU's "Job type does not support change"
    jid = m.start_job("R", "stream", "node=R.qcow2 speed=64K")
    e = m.refuse("R", "change", f"{jid} copy-mode=write-blocking", errno.EINVAL)
    assert e["reason"] == (
        f"job {jid!r} is a stream job: its type does not support change (only copy and "
        "active commit have a copy mode)"
    ), e
    m.command("R", "cancel", jid)
    m.wait_job("R", jid)
    # write-blocking -> background is not implemented (nor in QEMU); the same mode is a no-op
    jid = m.start_job("R", "commit", "speed=64K copy-mode=write-blocking wait=ready")
    e = m.refuse("R", "change", f"{jid} copy-mode=background", errno.EINVAL)
    assert "change to copy mode 'background' is not implemented" in e["reason"], e
    run(*CHAINFS, "change", m.mountpoint, "R", jid, "copy-mode=write-blocking")  # the CLI
    line = job_line(m, "R")
    assert line["copy-mode"] == "write-blocking" and line["status"] == "running", line
    m.command("R", "cancel", jid)
    assert m.wait_job("R", jid)["event"] == "JOB_CANCELLED"
    assert m.layers("R") == ["R.qcow2", "R-mid.qcow2", "R-base.qcow2"]


@pytest.mark.parametrize("job", ["copy-full", "commit"])
def test_a_resumed_job_keeps_its_copy_mode(tmp_path: Path, mounter: Mounter, job: str) -> None:
    # the journal's intent holds the mode: the job the next mount resumes mirrors the same way
    d = tmp_path / "images"
    d.mkdir()
    chain = build(d, "V")
    m = mounter(d)
    jid = m.start_job("V", *chain.command(job, "speed=64K copy-mode=write-blocking wait=ready"))
    m.unmount()
    m = mounter(d)
    resumed = wait_for(
        lambda: next((e for e in m.events("V") if e["event"] == "JOB_RESUMED"), None),
        f"{jid} to be resumed",
    )
    assert resumed["job"] == jid, resumed
    line = job_line(m, "V")
    assert line["id"] == jid and line["copy-mode"] == "write-blocking", line
    m.command("V", "cancel", jid)
    assert m.wait_job("V", jid)["event"] == "JOB_CANCELLED"


def test_every_image_is_clean_after_the_unmount(served: Served, tmp_path: Path) -> None:
    m = served.mount
    m.unmount()
    assert_clean(sorted(served.mount.source.glob("*.qcow2")))
    for name, active in served.done:
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(served.chains[name].model)
        cmp = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", active, raw, ok=(0, 1))
        assert cmp.returncode == 0, f"{name}: qemu-img compare {active}: {cmp.stdout}"
    assert len(served.done) == len(served.chains)
