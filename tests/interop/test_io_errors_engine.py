"""I/O errors and full disks in the engine, by fault injection at the ``HostFile`` door.

``Faults`` is a ``HostFile.observer`` that records every write and flush the engine
issues and fails the ones a test picks with ENOSPC or EIO, as the kernel would: a
failing write may have landed in part (its first sectors), a failing ``fdatasync`` may
have dropped every write since the file's last good flush (Linux marks such pages clean).
Each test finds how many host writes (or flushes) a workload issues, then runs it again
with the failure at sampled points of it, and asks QEMU:

- guest writes on a full disk fail with the errno; once space is back, they and the
  flush succeed, nothing is lost, and ``qemu-img check`` is clean -- no leak either, as
  the clusters a failed write had allocated are given back;
- after a failed flush every later flush fails too (nothing is claimed durable), and the
  worst the disk can hold -- every write since the last good flush dropped, everything
  after it landed -- has no corruption, reads old or new for every cluster, and opens
  and takes writes again;
- stream, commit (both kinds) and copy on a full or failing disk end in
  ``JOB_COMPLETED error="..."`` with the chain and the guest's content unchanged, and run
  to completion once space is back;
- the mount's periodic write-back retries a failed write-back every round, neither
  spinning nor flooding the log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from chainfs import mount
from chainfs.chain import Chain
from chainfs.control import parse_line
from chainfs.disk import Disk
from chainfs.hostfile import HostFile, HostIOError
from chainfs.jobs import recovery as recoveries
from chainfs.jobs.base import CONCLUDED

from . import crashsim as cs
from . import images as im

KiB, MiB = im.KiB, im.MiB
SEED = Path(__file__).resolve().parents[2] / "scripts" / "make-seed-chain"
SEED_SIZE = 8 * MiB
PAGE = 4096  # the page cache's granularity


# -- the fault injector --------------------------------------------------------------------


class Faults:
    """``HostFile.observer``: records the I/O under ``root`` and fails chosen operations.

    ``arm(kind, err, skip=n)`` lets ``n`` more operations of ``kind`` ("write" or "flush")
    through, then fails every one after it (a full disk stays full) until ``heal()``, or
    only ``times`` of them.  A failing write lands its first half when it is longer than
    a sector, as a write cut short by a full disk does.  ``lost`` collects the writes a
    failed flush may have dropped.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.events: list[cs.Event] = []
        self.lost: set[int] = set()
        self.counts = {"write": 0, "flush": 0}
        self.failures = 0
        self._unflushed: dict[str, list[int]] = {}
        self._kind: str | None = None
        self._err = 0
        self._skip = 0
        self._times: int | None = None

    def arm(self, kind: str, err: int, *, skip: int = 0, times: int | None = None) -> None:
        self._kind, self._err, self._skip, self._times = kind, err, skip, times
        self.failures = 0

    def heal(self) -> None:
        self._kind = None

    def __call__(self, event: str, path: str, offset: int, data: bytes) -> None:
        rel = os.path.relpath(os.path.realpath(path), self.root)
        if event in self.counts:
            self.counts[event] += 1
        if event == self._kind and (self._times is None or self.failures < self._times):
            if self._skip:
                self._skip -= 1
            else:
                self.failures += 1
                if event == "flush":
                    self.lost.update(self._unflushed.pop(rel, []))
                elif len(data) > cs.SECTOR:
                    half = len(data) // 2 // cs.SECTOR * cs.SECTOR
                    _land(path, data[:half], offset)
                    self._record("write", rel, offset, data[:half])
                raise OSError(self._err, os.strerror(self._err))
        self._record(event, rel, offset, data)

    def _record(self, event: str, rel: str, offset: int, data: bytes) -> None:
        self.events.append(cs.Event(event, rel, offset, bytes(data)))
        if event in ("write", "truncate"):
            self._unflushed.setdefault(rel, []).append(len(self.events) - 1)
        elif event == "flush":
            self._unflushed.pop(rel, None)


def _land(path: str, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@contextmanager
def injecting(root: Path) -> Iterator[Faults]:
    faults = Faults(root)
    saved = HostFile.observer
    HostFile.observer = faults
    try:
        yield faults
    finally:
        HostFile.observer = saved


def replay(pristine: dict[str, bytes], events: list[cs.Event], lost: set[int]) -> dict[str, bytes]:
    """What the disk holds after ``events`` when the ``lost`` writes never got there.

    As the page cache does: a lost write stays in the cached pages, so a later write to
    one of those pages carries it to the disk along with its own bytes.
    """
    cache = {p: bytearray(c) for p, c in pristine.items()}
    disk = {p: bytearray(c) for p, c in pristine.items()}
    for i, e in enumerate(events):
        if e.kind == "flush":
            continue
        c, d = cache.setdefault(e.path, bytearray()), disk.setdefault(e.path, bytearray())
        if e.kind == "truncate":
            for buf in (c, d):
                del buf[e.offset :]
                buf.extend(bytes(e.offset - len(buf)))
        elif e.kind == "write":
            end = e.offset + len(e.data)
            c.extend(bytes(max(0, end - len(c))))
            c[e.offset : end] = e.data
            if i not in lost:
                a, b = e.offset - e.offset % PAGE, min(-(-end // PAGE) * PAGE, len(c))
                d.extend(bytes(max(0, b - len(d))))
                d[a:b] = c[a:b]
    return {p: bytes(b) for p, b in disk.items()}


def lay_out(files: dict[str, bytes], dest: Path) -> None:
    for rel, content in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(content)


def samples(n: int, count: int, seed: str) -> list[int]:
    """Up to ``count`` distinct points of ``range(n)``: both ends and a random spread."""
    if n <= count:
        return list(range(n))
    rng = random.Random(seed)
    return sorted({0, n - 1, *rng.sample(range(1, n - 1), count - 2)})


@pytest.fixture(
    params=[
        pytest.param(10, id="sampled"),
        pytest.param(60, id="many", marks=pytest.mark.slow),
    ]
)
def points(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(
    params=[
        pytest.param(3, id="sampled"),
        pytest.param(16, id="many", marks=pytest.mark.slow),
    ]
)
def job_points(request: pytest.FixtureRequest) -> int:
    return int(request.param)


# -- guest writes --------------------------------------------------------------------------

Op = tuple[str, int, bytes]  # ("write", offset, data) | ("zero", offset, length) | ("flush",...)


def workload(size: int, cluster: int, seed: int, count: int = 48) -> list[Op]:
    """Guest operations over the whole disk: whole and partial clusters (copy-on-write),
    overwrites of what was written (in place), zero writes, and a flush now and then."""
    rng = random.Random(seed)
    ops: list[Op] = []
    written: list[int] = []
    for i in range(count):
        if i % 7 == 6:
            ops.append(("flush", 0, b""))
            continue
        kind = rng.random()
        if written and kind < 0.25:
            off = rng.choice(written)  # in place
        else:
            off = rng.randrange(0, size - 4 * cluster) // cluster * cluster
            if kind < 0.6:
                off += rng.randrange(cluster)  # partial: copy-on-write from below
        n = min(size - off, rng.choice([cluster // 2 + 3, cluster, 3 * cluster + 100, 20 * KiB]))
        if kind > 0.9:
            ops.append(("zero", off, n.to_bytes(8, "big")))
        else:
            ops.append(("write", off, rng.randbytes(n)))
            written.append(off)
    ops.append(("flush", 0, b""))
    return ops


def apply_op(chain: Chain, op: Op, model: bytearray) -> None:
    kind, off, data = op
    if kind == "flush":
        chain.flush()
    elif kind == "zero":
        n = int.from_bytes(data, "big")
        chain.write_zeroes(off, n)
        model[off : off + n] = bytes(n)
    else:
        chain.write(off, data)
        model[off : off + len(data)] = data


@dataclass
class Scene:
    """A base with data everywhere and an empty overlay on it, and its pristine copy."""

    root: Path
    top: Path
    content: bytes
    cluster: int

    @classmethod
    def make(cls, tmp_path: Path, cluster: int) -> Scene:
        root = tmp_path / "images"
        root.mkdir()
        size = 2 * MiB
        # 64-bit refcounts in 512-byte clusters: a refcount block covers 32 KiB and the
        # first table 2 MiB, so the writes allocate L2 tables, refcount blocks and grow
        # the refcount table too
        refcount_bits = 64 if cluster == 512 else 16
        opts = {"cluster_size": cluster, "refcount_bits": refcount_bits}
        _, model = im.build_chain(
            str(root),
            [
                {"name": "base.qcow2", "create": opts, "writes": [(0, size, 0x5A)]},
                {"name": "top.qcow2", "create": opts, "writes": [(cluster, 100, 0x33)]},
            ],
            size=size,
        )
        return cls(root, root / "top.qcow2", bytes(model), cluster)

    def fresh(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest)
        return dest / "top.qcow2"


CLUSTERS = [pytest.param(512, id="512B"), pytest.param(65536, id="64K")]


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_failed_guest_writes_then_space_again(
    tmp_path: Path, cluster: int, err: int, points: int
) -> None:
    """Host writes fail from the k-th on, for a while: the guest's writes and flushes fail
    with the errno; once writes work again, each failed operation is made again and
    everything lands; the image is clean (no leak) and holds exactly the guest's writes."""
    scene = Scene.make(tmp_path, cluster)
    ops = workload(len(scene.content), cluster, seed=cluster + err)
    dry = scene.fresh(tmp_path / "dry")
    with injecting(dry.parent) as faults, Chain.open(str(dry), writable=True) as chain:
        model = bytearray(scene.content)
        for op in ops:
            apply_op(chain, op, model)
    total = faults.counts["write"]
    assert total > 20, total
    for k in samples(total, points, f"{cluster}-{err}"):
        top = scene.fresh(tmp_path / f"k{k}")
        model = bytearray(scene.content)
        failed: list[Op] = []
        with injecting(top.parent) as faults:
            chain = Chain.open(str(top), writable=True)
            faults.arm("write", err, skip=k)
            full_until = None
            for i, op in enumerate(ops):
                if full_until is None and faults.failures:
                    full_until = i + 5  # the disk stays full for five more operations
                if i == full_until:
                    faults.heal()
                    for again in failed:
                        apply_op(chain, again, model)
                    failed.clear()
                try:
                    apply_op(chain, op, model)
                except HostIOError as e:
                    assert e.errno == err, e
                    failed.append(op)
            faults.heal()
            for again in failed:
                apply_op(chain, again, model)
            assert chain.read(0, len(model)) == model, f"k={k}: the disk in memory"
            chain.close()
        assert faults.failures, f"k={k}: no write failed"
        rc, report = im.check(str(top))
        assert rc == 0, f"k={k}: {report}"
        im.assert_same_as(str(top), bytes(model), str(top.parent))


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_failed_flush_is_never_claimed_durable(tmp_path: Path, cluster: int, points: int) -> None:
    """``fdatasync`` fails once: that flush and every later one fail with EIO, though
    writes go on; the worst state the disk can be left in (every write since the last
    good flush dropped, every later one landed) has no corruption, shows every sector
    as it was at the last good flush or after a later write (nothing durable was lost,
    no sector holds anything never written), and opens and takes writes again."""
    scene = Scene.make(tmp_path, cluster)
    ops = workload(len(scene.content), cluster, seed=cluster)
    dry = scene.fresh(tmp_path / "dry")
    with injecting(dry.parent) as faults, Chain.open(str(dry), writable=True) as chain:
        model = bytearray(scene.content)
        for op in ops:
            apply_op(chain, op, model)
    pristine = cs.snapshot(str(scene.root))
    for k in samples(faults.counts["flush"], points, str(cluster)):
        top = scene.fresh(tmp_path / f"k{k}")
        model = bytearray(scene.content)
        states = [bytes(model)]
        durable = 0  # states[durable:] are what the disk may show after the failure
        with injecting(top.parent) as faults:
            chain = Chain.open(str(top), writable=True)
            faults.arm("flush", errno.EIO, skip=k, times=1)
            for op in ops:
                try:
                    apply_op(chain, op, model)
                except HostIOError as e:
                    assert e.errno == errno.EIO and op[0] == "flush", (op[0], e)
                else:
                    if op[0] == "flush" and not faults.failures:
                        durable = len(states) - 1
                if op[0] != "flush":
                    states.append(bytes(model))
            assert faults.failures == 1, f"k={k}: the flush never failed"
            with pytest.raises(HostIOError) as exc:
                chain.flush()
            assert exc.value.errno == errno.EIO and "failed to flush earlier" in str(exc.value)
            assert chain.read(0, len(model)) == model
            with pytest.raises(HostIOError):
                chain.close()
        worst = tmp_path / f"worst{k}"
        lay_out(replay(pristine, faults.events, faults.lost), worst)
        image = worst / "top.qcow2"
        cs.assert_check_ok(str(image))
        cs.assert_old_or_new(cs.qemu_read(str(image)), states[durable:], cs.SECTOR)
        # a fresh open (a remount) writes and flushes again
        with Chain.open(str(image), writable=True) as chain:
            disk = bytearray(chain.read(0, chain.size))
            chain.write(cluster * 3 + 7, b"after" * 1000)
            disk[cluster * 3 + 7 : cluster * 3 + 5007] = b"after" * 1000
            chain.flush()
        cs.assert_check_ok(str(image))
        im.assert_same_as(str(image), bytes(disk), str(worst))


# -- jobs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("seed") / "images"
    subprocess.run(
        [sys.executable, SEED, d, "--size", str(SEED_SIZE)], check=True, capture_output=True
    )
    return d, im.reference(str(d / "E.qcow2"))


@asynccontextmanager
async def serve(directory: Path) -> AsyncIterator[Disk]:
    """The one chain of ``directory`` as a mount serves it (recovery from the journal
    first, the journal kept while it runs), without FUSE: its jobs run in this loop."""
    src, recovery = recoveries.recover(str(directory), readonly=False)
    mount.own_chains(src)
    src.save()
    try:
        async with trio.open_nursery() as nursery:
            disks = mount.open_disks(
                src, mount.MountOptions(), nursery.start_soon, recovery.journals
            )
            (disk,) = disks
            recoveries.resume_jobs(disks, recovery)
            try:
                yield disk
                await disk.stop_jobs()
            finally:
                with contextlib.suppress(HostIOError):
                    disk.close()  # raises when a flush failed: none can succeed on these files
    finally:
        recovery.close()
        for name in list(src.owned):
            src.disown(name)


def events(disk: Disk) -> list[dict[str, str]]:
    return [parse_line(line) for line in disk.events.decode().splitlines()]


def names(disk: Disk) -> list[str]:
    return [os.path.basename(x.path) for x in disk.chain.layers]


class Guest:
    """Writes through the chain between the job's steps, each followed by a flush.

    A write that fails is kept, to be made again once the disk works.  A flush that
    fails leaves its write unacknowledged: the guest stops writing (as a database does
    when fsync fails), and that write's range may read old or new after a remount
    (``unsure``: the disk before it and after it); everything before it was
    acknowledged and must be there.
    """

    def __init__(self, disk: Disk, model: bytearray, seed: int) -> None:
        self.disk, self.model = disk, model
        self.rng = random.Random(seed)
        self.failed: list[tuple[int, bytes]] = []
        self.unsure: list[bytes] = []

    def write(self, off: int, data: bytes) -> None:
        try:
            self.disk.chain.write(off, data)
        except HostIOError:
            self.failed.append((off, data))
            return
        before = bytes(self.model)
        self.model[off : off + len(data)] = data
        try:
            self.disk.chain.flush()
        except HostIOError as e:
            if e.errno != errno.ENOSPC:  # a failed fdatasync: stop, unsure of this one
                self.unsure = [before, bytes(self.model)]

    async def run(self, job_done: trio.Event) -> None:
        size = len(self.model)
        while not job_done.is_set() and not self.unsure:
            n = self.rng.randint(1, 64 * KiB)
            self.write(self.rng.randrange(size - n), self.rng.randbytes(n))
            await trio.lowlevel.checkpoint()

    def again(self) -> None:
        failed, self.failed = self.failed, []
        for off, data in failed:
            self.disk.chain.write(off, data)
            self.model[off : off + len(data)] = data
        self.disk.chain.flush()


# (command, arguments, the chain afterwards (active first))
JOBS = [
    ("stream", "base=A.qcow2", ["E.qcow2", "A.qcow2"]),
    ("stream", "node=D.qcow2 base=B.qcow2", ["E.qcow2", "D.qcow2", "B.qcow2", "A.qcow2"]),
    ("commit", "top=D.qcow2 base=B.qcow2", ["E.qcow2", "B.qcow2", "A.qcow2"]),
    ("commit", "base=B.qcow2", ["B.qcow2", "A.qcow2"]),
    ("copy", "F{n}.qcow2 sync=full", ["F{n}.qcow2"]),
]
JOB_IDS = ["stream", "stream-node", "commit", "active-commit", "copy"]
START = ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]


async def run_job(disk: Disk, kind: str, text: str, guest: Guest | None) -> dict[str, str]:
    disk.command(kind, text.encode())
    job = disk.job
    assert job is not None
    if guest is not None:
        await guest.run(job.done)
    await job.done.wait()
    (end,) = [
        e
        for e in events(disk)
        if e.get("job") == job.id and e["event"] in ("JOB_COMPLETED", "JOB_CANCELLED")
    ]
    return end


def check_all(directory: Path, leaky: set[str]) -> None:
    """``qemu-img check`` finds no corruption in any qcow2 file, nor a leak but in the
    ``leaky`` ones (files whose metadata could not all be written)."""
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.name.startswith(".") and im.image_format(str(p)) == "qcow2":
            if p.name in leaky:
                cs.assert_check_ok(str(p))
            else:
                im.assert_clean(str(p))


async def job_writes(seed: Path, tmp: Path, kind: str, text: str) -> tuple[int, int]:
    """The host writes and flushes one run of the job issues (no guest, no faults)."""
    d = tmp / "dry"
    shutil.copytree(seed, d)
    with injecting(d) as faults:
        async with serve(d) as disk:
            end = await run_job(disk, kind, text.format(n=0), None)
            assert "error" not in end, end
    return faults.counts["write"], faults.counts["flush"]


# the job fails on the injected fault, and undoing its work meets the fault too
@pytest.mark.expect_log(r"WARNING chainfs\.jobs\.base: job=\S+ (abort )?failed: ")
@pytest.mark.parametrize(("kind", "text", "after"), JOBS, ids=JOB_IDS)
@pytest.mark.parametrize(
    ("fault", "err"),
    [("write", errno.ENOSPC), ("flush", errno.EIO)],
    ids=["write-ENOSPC", "flush-EIO"],
)
async def test_job_fails_with_the_reason_then_runs_again(
    tmp_path: Path,
    seed_template: tuple[Path, bytes],
    kind: str,
    text: str,
    after: list[str],
    fault: str,
    err: int,
    job_points: int,
) -> None:
    """The job's host writes (or flushes) fail from a sampled point on: the job ends in
    ``JOB_COMPLETED`` with the system's words for the errno, the chain and the guest's
    content stay as they were, and the same job, issued again once the disk works (after
    a remount when a flush failed: no later flush of those files can succeed), completes.
    The images are clean, without leaks, and QEMU reads the guest's writes from them."""
    seed, content = seed_template
    writes, flushes = await job_writes(seed, tmp_path, kind, text)
    total = writes if fault == "write" else flushes
    for k in samples(total, job_points, f"{kind}{text}{fault}"):
        d = tmp_path / f"k{k}"
        shutil.copytree(seed, d)
        model = bytearray(content)
        n = 2  # the run that completes the job
        with injecting(d) as faults:
            async with serve(d) as disk:
                guest = Guest(disk, model, seed=k)
                faults.arm(fault, err, skip=k)
                end = await run_job(disk, kind, text.format(n=1), guest)
                assert faults.failures, f"k={k}: nothing failed"
                assert end["event"] == "JOB_COMPLETED", end
                assert os.strerror(err) in end.get("error", ""), (k, end)
                assert names(disk) == START, k
                assert disk.job is not None and disk.job.status == CONCLUDED
                faults.heal()
                if fault == "write":
                    guest.again()
                    assert disk.chain.read(0, len(model)) == model, k
                    end = await run_job(disk, kind, text.format(n=2), guest)
                    assert end["event"] == "JOB_COMPLETED" and "error" not in end, (k, end)
                    assert names(disk) == [x.format(n=2) for x in after], k
                    guest.again()
                    assert disk.chain.read(0, len(model)) == model, k
            if fault == "flush":  # remount, and run it again there
                async with serve(d) as disk:
                    # what the guest had acknowledged is there; its last write, whose
                    # flush failed, may or may not be
                    now = bytes(disk.chain.read(0, len(model)))
                    cs.assert_old_or_new(now, guest.unsure or [bytes(model)], cs.SECTOR)
                    model = bytearray(now)
                    if names(disk) == START:
                        guest = Guest(disk, model, seed=k)
                        end = await run_job(disk, kind, text.format(n=2), guest)
                        assert end["event"] == "JOB_COMPLETED" and "error" not in end, (k, end)
                        assert not guest.failed
                    else:  # the job failed in its last step: the mount finished it
                        assert [e for e in events(disk) if e["event"] == "JOB_COMPLETED"], k
                        n = 1
                    assert names(disk) == [x.format(n=n) for x in after], k
        # the copy a failure abandoned may leak what its last write-back could not
        # record; after a failed flush, so may every file that was being written
        check_all(d, {p.name for p in d.iterdir()} if fault == "flush" else {"F1.qcow2"})
        im.assert_same_as(str(d / after[0].format(n=n)), bytes(model), str(d))


# -- the mount's periodic write-back ---------------------------------------------------------


class FailingChain:
    """A chain whose flush fails ``failures`` times, then succeeds; counts the calls."""

    writable = True

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def flush(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise HostIOError("flushing 'x.qcow2' failed: No space left on device", errno.ENOSPC)

    def refresh_allocation(self) -> None:
        """st_blocks' recount, which the write-back does after a flush."""


@dataclass
class FakeDisk:
    name: str
    chain: Any
    mtime_ns: int = 1
    suspended: str | None = None  # (many hosts: a suspended chain is not written back)


@pytest.mark.expect_log(r"WARNING chainfs\.mount: chain=vm write-back failed: ")
async def test_periodic_write_back_retries_without_spinning(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing write-back is tried again every interval (not only after the next guest
    write), never in a tight loop, and warned about a few times a minute at most; once
    it succeeded, nothing is flushed again until the disk is written."""
    chain = FailingChain(failures=30)
    disk = FakeDisk("vm", chain)
    caplog.set_level(logging.WARNING, logger="chainfs.mount")
    rounds = 40
    with trio.move_on_after(mount.WRITE_BACK_INTERVAL * rounds + 1):
        await mount._write_back([disk])  # type: ignore[list-item]
    assert chain.calls == 31, chain.calls  # 30 failures, then one success, then quiet
    warnings = [r for r in caplog.records if "write-back failed" in r.getMessage()]
    minutes = rounds * mount.WRITE_BACK_INTERVAL / 60
    assert 0 < len(warnings) <= 5 * (int(minutes) + 1), warnings
    disk.mtime_ns += 1  # the guest wrote
    with trio.move_on_after(mount.WRITE_BACK_INTERVAL + 1):
        await mount._write_back([disk])  # type: ignore[list-item]
    assert chain.calls == 32
