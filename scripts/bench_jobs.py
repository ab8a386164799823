"""Benchmarks of chainfs's live jobs against QEMU's, run by ``scripts/bench`` after bench.py.

It builds the 1 GiB five-layer seed chain ``[A] <- [B] <- [C] <- [D] <- [E]`` (with
``scripts/make-seed-chain``) in ``./bench-work-jobs`` (removed at the start of every run;
nothing else is touched) and measures, each side on its own fresh copy of the chain
(copied and written back before the clock starts), the two sides taking turns to go
first, after one warm-up round that does not count:

- intermediate commit ``top=D.qcow2 base=B.qcow2``: through a ``chainfs mount -f``
  subprocess (written to ``control/E/commit``, timed until ``JOB_COMPLETED`` shows in
  ``control/E/events``) against QMP ``block-commit`` (``top-node=D``, ``base-node=B``) in
  qemu-storage-daemon with a blockdev per layer, timed until ``BLOCK_JOB_COMPLETED``;
- active commit ``base=A.qcow2``: chainfs pivots by itself after ``JOB_READY``; QEMU's
  job is completed with ``block-job-complete`` at ``BLOCK_JOB_READY``;
- ``copy F.qcow2 sync=full`` against ``qemu-img convert -O qcow2`` of the chain;
- the guest's 4 KiB random read IOPS on the flat file (fio, QD1, psync, ``direct=1``,
  fixed seed and run time) while a rate-limited ``copy sync=full`` runs, against the
  mean of the same fio run with no job, before the job and after its cancel;
- ``mirror``: copy ``sync=full`` and active commit ``base=A`` in
  ``copy-mode=write-blocking`` on a seed chain of at most 128 MiB, with a guest (a
  thread here: 4 KiB O_DIRECT random writes, QD1) writing at twice the job's ``speed=``
  (which is set to a quarter of what the guest writes with no job and no cap, so the
  guest can keep its pace): the time from the command to the pivot (``JOB_COMPLETED``,
  no ``wait=ready``), and the guest's write IOPS during the job against the same capped
  guest with no job (target: the job pivots every time, ratio at least 0.5);
- ``backup``: ``backup F.qcow2 sync=full`` against QMP ``blockdev-backup`` (``sync=full``,
  into a target made by ``qemu-img create`` and ``blockdev-add`` before the clock starts)
  in qemu-storage-daemon, timed until ``BLOCK_JOB_COMPLETED``; and the guest's 4 KiB
  O_DIRECT random write IOPS (QD1, uncapped, the ``mirror`` part's guest) during a
  rate-limited ``backup sync=full`` (nearly every write lands on a cluster not yet
  copied: a copy-before-write each) against the same guest with no job, before the
  backup and after its cancel (target: at least 0.5).

Each side is timed twice: to the job's end as it reports it (QEMU's event, or
qemu-img's exit), and to a durable result, which adds an ``fdatasync`` of every file in
the chain's directory right after (QEMU leaves the copied data in the page cache;
chainfs has flushed it before it changed a backing pointer).  The results of both
sides are compared with ``qemu-img compare`` (with each other and with the seed chain's
disk) and checked with ``qemu-img check``.  Ratios are QEMU time / chainfs time (target
at least 1.0) and IOPS during the job / IOPS without (at least 0.7).

A third figure per job is the machine's own floor, taken right after chainfs's side on
its files: a bare loop that reads the job's data (every data extent ``qemu-img map``
finds in the layers the job copies) and makes it durable in a scratch file through
chainfs's I/O path, with no image format work at all (``floor_seconds``).  Its ratio,
QEMU's time to the job's end / the loop's, says how far below QEMU's time a job that
must leave its result durable can get here: at or below 1.0, not at all.  A fourth
figure is the same loop's writes alone, from memory: the disk's part of it.

The figures are a report, not a test: the exit status is non-zero only when something
fails to run or a result differs.

    python scripts/bench_jobs.py [--size BYTES] [--runs N] [--rand-runtime S]
                                 [--jobs commit,active,copy,iops,mirror,backup]

It accepts (and ignores) bench.py's other options, since ``scripts/bench`` passes its
arguments to both; ``--parts`` without ``jobs`` in it skips this benchmark.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the sibling script's QMP client, fio line, chain copy and wait
from bench import QMP, copy_chain, fio_rand_read, wait_for

from chainfs.hostfile import HostFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench-work-jobs")
MAKE_SEED_CHAIN = os.path.join(ROOT, "scripts", "make-seed-chain")

GiB = 1 << 30
LAYERS = ("A", "B", "C", "D", "E")
SERVER_DEADLINE = 60.0  # seconds a server may take to come up or go away
JOB_DEADLINE = 1800.0  # seconds a job may take
RAND_RUNTIME = 5  # seconds of each random-read run
TIME_TARGET = 1.0  # QEMU time / chainfs time, at least
IOPS_TARGET = 0.7  # IOPS during a job / without, at least
IOPS_JOB_FACTOR = 4  # the rate-limited job would take this many fio run times at least
PARTS = ("commit", "active", "copy", "iops", "mirror", "backup")
MIRROR_SIZE = 128 << 20  # the mirror part's seed chain, at most
MIRROR_GUEST_SECONDS = 3.0  # each no-job run of the guest
MIRROR_IOPS_TARGET = 0.5  # the guest's write IOPS during a write-blocking job / without
BACKUP_GUEST_SECONDS = 5.0  # each run of the guest, with and without a backup
BACKUP_IOPS_TARGET = 0.5  # the guest's write IOPS during a backup / without


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(args: list[str], cwd: str | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench_jobs: {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def short(text: str) -> str:
    return text.replace(WORK + "/", "bench-work-jobs/")


def flush_seconds(directory: str) -> float:
    """Seconds to make durable what the job left in the page cache: an ``fdatasync`` of
    every file in the chain's directory, taken right after the job's end.

    QEMU reports a job complete with the copied data still in the page cache (it
    flushes when the guest asks, or at exit); chainfs flushes before it changes a
    backing pointer, since it must survive a power loss there.  Adding this to both
    sides compares the time to the same durable result.
    """
    start = time.perf_counter()
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def floor_extents(seed: str, image: str, depths: range) -> list[tuple[str, int, int]]:
    """The reads a job must do: (layer file, host offset, length) of every data extent
    that ``qemu-img map`` of ``image`` finds at one of ``depths`` (0: ``image`` itself)."""
    names = LAYERS[: LAYERS.index(image) + 1][::-1]  # image first, then its backing chain
    extents = json.loads(
        run(["qemu-img", "map", "--output=json", os.path.join(seed, f"{image}.qcow2")])
    )
    return [
        (f"{names[e['depth']]}.qcow2", int(e["offset"]), int(e["length"]))
        for e in extents
        if e["data"] and e["depth"] in depths
    ]


def floor_seconds(directory: str, extents: list[tuple[str, int, int]], *, read: bool) -> float:
    """Seconds a bare loop takes to read a job's data from the chain's files (in the page
    cache) and make it durable in a scratch file of ``directory``, with no image format
    work: 1 MiB reads alternating two buffers, each written by chainfs's own I/O path
    (``HostFile.pwrite_started``, write-back started every 8 MiB, ``flush`` at the end).
    Without ``read``, the same writes from memory: the disk's part alone.

    What is left of a job's time above this is the job's own work; a reference time
    below it cannot be reached by any job that must leave its result durable.
    """
    piece, writeback = 1 << 20, 8 << 20
    bufs = [bytearray(piece), bytearray(piece)]
    scratch = os.path.join(directory, "floor.scratch")
    fds = {name: os.open(os.path.join(directory, name), os.O_RDONLY) for name, _, _ in extents}
    out, k = 0, 0
    try:
        start = time.perf_counter()
        f = HostFile(scratch, True, create=True)
        try:
            for name, host, length in extents:
                for pos in range(0, length, piece):
                    n = min(piece, length - pos)
                    buf = memoryview(bufs[k])[:n]
                    k ^= 1
                    if read:
                        os.preadv(fds[name], [buf], host + pos)
                    due = (out + n) // writeback > out // writeback
                    f.pwrite_started(buf, out, writeback if due else 0)
                    out += n
            f.flush()
        finally:
            f.close()
        return time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
        os.unlink(scratch)


def same_disk(a: str, b: str) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", a, b], check=False).returncode == 0


def check_clean(path: str) -> bool:
    return subprocess.run(["qemu-img", "check", "-q", path], check=False).returncode == 0


# --- the two servers -----------------------------------------------------------------------


class Chainfs:
    """``chainfs mount -f SRC MP`` in a subprocess, and its control files for chain E."""

    def __init__(self, source: str, mountpoint: str, log_path: str) -> None:
        os.makedirs(mountpoint, exist_ok=True)
        self.args = [sys.executable, "-m", "chainfs", "mount", "-f", source, mountpoint]
        self.mountpoint = mountpoint
        self.control = os.path.join(mountpoint, "control", "E")
        self.flat = os.path.join(mountpoint, "E.img")
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log_path, "ab") as f:
            f.write(f"==> {' '.join(self.args)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
            )
        wait_for(lambda: os.path.ismount(self.mountpoint), self.mountpoint, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        assert proc is not None
        subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True, check=False)
        try:
            proc.wait(timeout=SERVER_DEADLINE)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False)

    def events(self) -> list[str]:
        with open(os.path.join(self.control, "events")) as f:
            return f.read().splitlines()

    def command(self, kind: str, text: str) -> int:
        """Write one command; returns the number of event lines before it, for wait_event."""
        seen = len(self.events())
        with open(os.path.join(self.control, kind), "w") as f:
            f.write(text + "\n")
        return seen

    def wait_event(self, names: tuple[str, ...], after: int) -> str:
        """The first event line past ``after`` whose event is one of ``names``."""
        assert self.proc is not None
        deadline = time.monotonic() + JOB_DEADLINE
        path = os.path.join(self.control, "events")
        size = -1
        while True:
            # the file's size (one FUSE request) tells when to read it (a few more): the
            # server's time goes to the job, not to answering the poll
            now = os.stat(path).st_size
            if now != size:
                size = now
                for line in self.events()[after:]:
                    if any(f"event={n} " in line + " " for n in names):
                        return line
            if self.proc.poll() is not None:
                sys.exit(f"bench_jobs: chainfs exited ({self.proc.returncode}) during a job")
            if time.monotonic() > deadline:
                sys.exit(f"bench_jobs: timed out waiting for {'/'.join(names)}")
            time.sleep(0.001)

    def run_job(self, kind: str, text: str) -> float:
        """Seconds from the command's write to its JOB_COMPLETED."""
        start = time.perf_counter()
        seen = self.command(kind, text)
        line = self.wait_event(("JOB_COMPLETED",), seen)
        elapsed = time.perf_counter() - start
        if "error=" in line:
            sys.exit(f"bench_jobs: chainfs {kind} {text} failed: {line}")
        return elapsed


class QemuDaemon:
    """qemu-storage-daemon with the chain as blockdevs A..E (E on top) and a QMP socket."""

    def __init__(self, directory: str, log_path: str) -> None:
        self.qmp_path = os.path.join(directory, "qmp.sock")
        self.log_path = log_path
        self.qmp: QMP | None = None
        args = ["qemu-storage-daemon"]
        below: str | None = None
        for name in LAYERS:
            file_node = {
                "driver": "file",
                "node-name": f"{name}-file",
                "filename": os.path.join(directory, f"{name}.qcow2"),
            }
            fmt_node: dict[str, object] = {
                "driver": "qcow2",
                "node-name": name,
                "file": f"{name}-file",
                "backing": below,  # null for A: no backing file
            }
            args += ["--blockdev", json.dumps(file_node), "--blockdev", json.dumps(fmt_node)]
            below = name
        args += [
            "--chardev",
            f"socket,path={self.qmp_path},server=on,wait=off,id=qmp",
            "--monitor",
            "chardev=qmp",
        ]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log_path, "ab") as f:
            f.write(f"==> {' '.join(self.args)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
            )
        wait_for(lambda: os.path.exists(self.qmp_path), self.qmp_path, self.proc)
        self.qmp = QMP(self.qmp_path)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        assert proc is not None
        if self.qmp is not None:
            try:
                self.qmp.execute("quit")
            except (OSError, SystemExit):
                pass
            self.qmp.close()
        try:
            proc.wait(timeout=SERVER_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def backup(self, target: str, size: int) -> float:
        """Seconds from ``blockdev-backup`` (E -> a new qcow2 ``target``, created and
        added before the clock starts) to ``BLOCK_JOB_COMPLETED``."""
        qmp = self.qmp
        assert qmp is not None
        run(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)])
        file_node = {"driver": "file", "node-name": "F-file", "filename": target}
        qmp.execute("blockdev-add", **file_node)
        qmp.execute("blockdev-add", driver="qcow2", **{"node-name": "F", "file": "F-file"})
        start = time.perf_counter()
        qmp.execute(
            "blockdev-backup", **{"job-id": "backup0", "device": "E", "target": "F"}, sync="full"
        )
        event = qmp.wait_event("BLOCK_JOB_COMPLETED")
        elapsed = time.perf_counter() - start
        data = event.get("data")
        if isinstance(data, dict) and data.get("error"):
            sys.exit(f"bench_jobs: QEMU's blockdev-backup failed: {data['error']}")
        qmp.execute("blockdev-del", **{"node-name": "F"})
        qmp.execute("blockdev-del", **{"node-name": "F-file"})
        return elapsed

    def commit(self, **cmd: object) -> float:
        """Seconds from ``block-commit`` to ``BLOCK_JOB_COMPLETED``; an active commit
        (no ``top-node``) is completed at ``BLOCK_JOB_READY``."""
        qmp = self.qmp
        assert qmp is not None
        start = time.perf_counter()
        qmp.execute("block-commit", **cmd)
        if "top-node" not in cmd:
            qmp.wait_event("BLOCK_JOB_READY")
            qmp.execute("block-job-complete", device=cmd["job-id"])
        event = qmp.wait_event("BLOCK_JOB_COMPLETED")
        elapsed = time.perf_counter() - start
        data = event.get("data")
        if isinstance(data, dict) and data.get("error"):
            sys.exit(f"bench_jobs: QEMU's block-commit failed: {data['error']}")
        return elapsed


# --- the measures --------------------------------------------------------------------------


@dataclass
class Timed:
    """One measure's runs on both sides (seconds; the best run of each counts): to the
    job's end as each side reports it, and to a durable result (``flush_seconds``)."""

    chainfs: list[float] = field(default_factory=list)
    qemu: list[float] = field(default_factory=list)
    chainfs_durable: list[float] = field(default_factory=list)
    qemu_durable: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # floor_seconds on chainfs's side
    disk: list[float] = field(default_factory=list)  # the same, writes only

    @property
    def ratio(self) -> float:
        return min(self.qemu) / min(self.chainfs)

    @property
    def durable_ratio(self) -> float:
        return min(self.qemu_durable) / min(self.chainfs_durable)

    @property
    def floor_ratio(self) -> float:
        return min(self.qemu) / min(self.floor)

    def add(self, side: str, seconds: float, directory: str) -> None:
        flushed = seconds + flush_seconds(directory)
        getattr(self, side).append(seconds)
        getattr(self, f"{side}_durable").append(flushed)
        log(f"    {side}: {seconds:.3f} s; durable after {flushed:.3f} s")


@dataclass
class Iops:
    idle: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    job_lasted: bool = True

    @property
    def baseline(self) -> float:
        return sum(self.idle) / len(self.idle)

    @property
    def ratio(self) -> float:
        return (sum(self.busy) / len(self.busy)) / self.baseline


@dataclass
class Results:
    timed: dict[str, Timed] = field(default_factory=dict)
    iops: Iops | None = None
    mirrored: dict[str, Mirrored] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    backup_iops: list[tuple[float, float, bool]] = field(default_factory=list)

    def note(self, key: str, text: str) -> None:
        self.commands.setdefault(key, short(text))

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            log(f"    WRONG: {what}")
            self.wrong.append(what)


def qemu_args_text(daemon: QemuDaemon) -> str:
    """The daemon's command line with only the first and the last layer's blockdevs."""
    a = daemon.args
    keep = [*a[1:5], "... (B, C, D alike, each backed by the one below) ...", *a[-8:]]
    return " ".join([a[0], *(f"'{x}'" if x.startswith("{") else x for x in keep)])


def run_name(i: int) -> str:
    return "warm-up" if i < 0 else f"run {i + 1}"


def in_turn(i: int, sides: list[Callable[[], None]]) -> None:
    """Run both sides of a measure, the first one first in even runs, last in odd ones.

    Whichever side runs first after the last run's files were removed was often the
    faster on the reference machine (a virtual machine): the kernel spends up to ten
    times as long copying into page-cache pages it has not touched for a while
    (``perf`` shows the time in ``copy_folio_from_iter_atomic``), and that memory goes
    first to whoever asks first.  Taking turns gives both sides the same chances.
    """
    for side in sides if i % 2 == 0 else sides[::-1]:
        side()


def chainfs_job(
    seed: str,
    src: str,
    work: str,
    title: str,
    res: Results,
    timed: Timed,
    key: str,
    kind: str,
    text: str,
    floor: list[tuple[str, int, int]],
) -> None:
    """chainfs's side of a measure: a fresh copy of the seed at ``src``, mounted, the
    command ``text`` written to ``control/E/<kind>``, timed until ``JOB_COMPLETED``; then,
    unmounted, the bare loop's time for the job's reads (``floor_seconds``)."""
    log(f"{title}, chainfs")
    copy_chain(seed, src)
    with Chainfs(src, os.path.join(work, "mnt"), os.path.join(work, "chainfs.log")) as fs:
        res.note("chainfs: mount", " ".join(fs.args))
        res.note(
            f"chainfs: {key}",
            f"echo '{text}' > {fs.control}/{kind}, then read {fs.control}/events"
            " until a JOB_COMPLETED line",
        )
        timed.add("chainfs", fs.run_job(kind, text), src)
    timed.floor.append(floor_seconds(src, floor, read=True))
    timed.disk.append(floor_seconds(src, floor, read=False))
    log(
        f"    bare loop, the job's data read and made durable: {timed.floor[-1]:.3f} s;"
        f" written from memory and made durable: {timed.disk[-1]:.3f} s"
    )


def bench_commit(seed: str, work: str, i: int, res: Results, *, active: bool) -> None:
    key = "active commit base=A" if active else "intermediate commit top=D base=B"
    timed = res.timed.setdefault(key, Timed())
    text = "base=A.qcow2" if active else "top=D.qcow2 base=B.qcow2"
    tag = "active" if active else "commit"
    seed_disk = os.path.join(seed, "E.qcow2")
    # the disk the chain shows afterwards: A alone after an active commit, E's otherwise
    result = "A.qcow2" if active else "E.qcow2"
    # what the job reads: D's and C's data (intermediate), or all but A's as E shows it
    floor = floor_extents(seed, "E", range(4)) if active else floor_extents(seed, "D", range(2))
    csrc = os.path.join(work, f"{tag}-chainfs-{i}")
    qsrc = os.path.join(work, f"{tag}-qemu-{i}")

    def chainfs_side() -> None:
        title = f"{run_name(i)}: {key}"
        chainfs_job(seed, csrc, work, title, res, timed, key, "commit", text, floor)

    def qemu_side() -> None:
        log(f"{run_name(i)}: {key}, qemu-storage-daemon (QMP block-commit)")
        copy_chain(seed, qsrc)
        cmd: dict[str, object] = {"job-id": "commit0", "device": "E", "base-node": "A"}
        if not active:
            cmd = {"job-id": "commit0", "device": "E", "top-node": "D", "base-node": "B"}
        with QemuDaemon(qsrc, os.path.join(work, "qemu-storage-daemon.log")) as qsd:
            res.note("qemu-storage-daemon", qemu_args_text(qsd))
            steps = " (at BLOCK_JOB_READY: block-job-complete)" if active else ""
            res.note(f"QMP: {key}", f"block-commit {json.dumps(cmd)}{steps}")
            timed.add("qemu", qsd.commit(**cmd), qsrc)

    in_turn(i, [chainfs_side, qemu_side])
    for side in (csrc, qsrc):
        disk = os.path.join(side, result)
        res.expect(same_disk(seed_disk, disk), f"{key}: {short(disk)} differs from the seed")
        for name in ("A.qcow2", "B.qcow2", "E.qcow2"):
            path = os.path.join(side, name)
            res.expect(check_clean(path), f"{key}: qemu-img check {short(path)}")
    shutil.rmtree(csrc)
    shutil.rmtree(qsrc)


def check_copies(key: str, seed_disk: str, csrc: str, qsrc: str, res: Results) -> None:
    """Both sides' ``F.qcow2`` show the seed's disk and are clean; both sides are removed."""
    for side in (csrc, qsrc):
        path = os.path.join(side, "F.qcow2")
        res.expect(same_disk(seed_disk, path), f"{key}: {short(path)} differs from the seed")
        res.expect(check_clean(path), f"{key}: qemu-img check {short(path)}")
    shutil.rmtree(csrc)
    shutil.rmtree(qsrc)


def bench_copy(seed: str, work: str, i: int, res: Results) -> None:
    key = "copy sync=full"
    timed = res.timed.setdefault(key, Timed())
    seed_disk = os.path.join(seed, "E.qcow2")
    floor = floor_extents(seed, "E", range(len(LAYERS)))  # the whole disk's data
    csrc = os.path.join(work, f"copy-chainfs-{i}")
    qsrc = os.path.join(work, f"copy-qemu-{i}")

    def chainfs_side() -> None:
        text = "F.qcow2 sync=full"
        title = f"{run_name(i)}: {key}"
        chainfs_job(seed, csrc, work, title, res, timed, key, "copy", text, floor)

    def qemu_side() -> None:
        log(f"{run_name(i)}: {key}, qemu-img convert -O qcow2")
        copy_chain(seed, qsrc)
        convert = ["qemu-img", "convert", "-O", "qcow2", "E.qcow2", "F.qcow2"]
        res.note(f"qemu: {key}", f"(in the chain's directory) {' '.join(convert)}")
        start = time.perf_counter()
        run(convert, cwd=qsrc)
        timed.add("qemu", time.perf_counter() - start, qsrc)

    in_turn(i, [chainfs_side, qemu_side])
    check_copies(key, seed_disk, csrc, qsrc, res)


def bench_backup(seed: str, work: str, i: int, res: Results) -> None:
    key = "backup sync=full"
    timed = res.timed.setdefault(key, Timed())
    seed_disk = os.path.join(seed, "E.qcow2")
    floor = floor_extents(seed, "E", range(len(LAYERS)))  # the whole disk's data
    csrc = os.path.join(work, f"backup-chainfs-{i}")
    qsrc = os.path.join(work, f"backup-qemu-{i}")

    def chainfs_side() -> None:
        title = f"{run_name(i)}: {key}"
        chainfs_job(seed, csrc, work, title, res, timed, key, "backup", "F.qcow2", floor)

    def qemu_side() -> None:
        log(f"{run_name(i)}: {key}, qemu-storage-daemon (QMP blockdev-backup)")
        copy_chain(seed, qsrc)
        size = int(
            json.loads(run(["qemu-img", "info", "--output=json", seed_disk]))["virtual-size"]
        )
        with QemuDaemon(qsrc, os.path.join(work, "qemu-storage-daemon.log")) as qsd:
            res.note("qemu-storage-daemon", qemu_args_text(qsd))
            res.note(
                f"QMP: {key}",
                "(qemu-img create -f qcow2 F.qcow2 SIZE; blockdev-add F) blockdev-backup"
                ' {"job-id": "backup0", "device": "E", "target": "F", "sync": "full"}',
            )
            timed.add("qemu", qsd.backup(os.path.join(qsrc, "F.qcow2"), size), qsrc)

    in_turn(i, [chainfs_side, qemu_side])
    check_copies(key, seed_disk, csrc, qsrc, res)
    if i < 0:
        return
    # the guest's writes during a backup: nearly each one a copy-before-write
    src = copy_chain(seed, os.path.join(work, f"backup-iops-{i}"))
    with Chainfs(src, os.path.join(work, "mnt"), os.path.join(work, "chainfs.log")) as fs:
        size = os.stat(fs.flat).st_size
        log(f"{run_name(i)}: guest 4 KiB random writes, no job, then during a backup")
        before = Guest.measure(fs.flat, size, 0, BACKUP_GUEST_SECONDS)
        speed = 1 << 20  # the pass: slow, so that the backup outlasts the guest's run
        text = f"F.qcow2 sync=full speed={speed}"
        res.note(f"chainfs: {key} under a guest", f"echo '{text}' > {fs.control}/backup")
        seen = fs.command("backup", text)
        fs.wait_event(("JOB_STARTED",), seen)
        busy = Guest.measure(fs.flat, size, 0, BACKUP_GUEST_SECONDS)
        lasted = not any("event=JOB_COMPLETED" in x for x in fs.events()[seen:])
        job = next(x for x in fs.events()[seen:] if "event=JOB_STARTED" in x)
        job_id = job.split("job=")[1].split()[0]
        if lasted:
            fs.command("cancel", job_id)
            fs.wait_event(("JOB_CANCELLED", "JOB_COMPLETED"), seen)
        after = Guest.measure(fs.flat, size, 0, BACKUP_GUEST_SECONDS)
        idle = (before + after) / 2  # no job: the mean of before and after
        res.backup_iops.append((busy, idle, lasted))
        log(
            f"    guest write IOPS {busy:.0f} during the backup, {before:.0f} before and"
            f" {after:.0f} after it"
        )
    res.expect(check_clean(os.path.join(src, "E.qcow2")), "backup: qemu-img check E.qcow2")
    shutil.rmtree(src)


def fio_iops(args: list[str]) -> float:
    out = run(args)
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench_jobs: fio error {job['error']}")
    return float(job["read"]["iops"])


def data_bytes(image: str) -> int:
    """The bytes some layer of the chain holds data for (``qemu-img map``)."""
    extents = json.loads(run(["qemu-img", "map", "--output=json", image]))
    return sum(int(e["length"]) for e in extents if e["data"])


def bench_iops(seed: str, work: str, i: int, size: int, runtime: int, res: Results) -> None:
    iops = res.iops = res.iops or Iops()
    # the rate limit counts the bytes the copy writes, at least the data the chain holds:
    # slow enough that the copy outlasts the fio run several times over
    data = data_bytes(os.path.join(seed, "E.qcow2"))
    speed = max(64 << 10, data // (IOPS_JOB_FACTOR * runtime))
    job = f"F.qcow2 sync=full speed={speed}"
    src = copy_chain(seed, os.path.join(work, f"iops-{i}"))
    with Chainfs(src, os.path.join(work, "mnt"), os.path.join(work, "chainfs.log")) as fs:
        fio = fio_rand_read(fs.flat, size, runtime)
        res.note("fio: random read", " ".join(fio))
        res.note(
            "chainfs: the job during the second fio run",
            f"echo '{job}' > {fs.control}/copy; after fio, echo JOB > {fs.control}/cancel",
        )
        log(f"{run_name(i)}: random 4 KiB reads, no job")
        iops.idle.append(fio_iops(fio))
        log(f"    {iops.idle[-1]:.0f} IOPS")

        log(f"{run_name(i)}: random 4 KiB reads during copy sync=full speed={speed}")
        seen = fs.command("copy", job)
        started = fs.wait_event(("JOB_STARTED",), seen)
        job_id = next(w[4:] for w in started.split() if w.startswith("job="))
        iops.busy.append(fio_iops(fio))
        log(f"    {iops.busy[-1]:.0f} IOPS")
        with open(os.path.join(fs.control, "jobs")) as f:
            running = any(f"id={job_id} " in line for line in f)
        iops.job_lasted &= running
        if running:
            after = fs.command("cancel", job_id)
            fs.wait_event(("JOB_CANCELLED", "JOB_COMPLETED"), after)
        else:
            log("    the job ended before fio did: raise IOPS_JOB_FACTOR")

        log(f"{run_name(i)}: random 4 KiB reads, no job (after the cancel)")
        iops.idle.append(fio_iops(fio))
        log(f"    {iops.idle[-1]:.0f} IOPS")
    res.expect(check_clean(os.path.join(src, "E.qcow2")), "iops: qemu-img check E.qcow2")
    shutil.rmtree(src)


# --- write-blocking mirrors under a writing guest ---------------------------------------


class Guest(threading.Thread):
    """4 KiB O_DIRECT random writes at QD1 over a flat file, at most ``rate`` bytes a
    second (0: as fast as it can), until ``stop()``; ``iops`` is what it achieved."""

    def __init__(self, path: str, size: int, rate: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.size, self.rate = path, size, rate
        self.rng = random.Random(seed)
        self.count = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            buf = mmap.mmap(-1, 4096)
            fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            blocks = self.size // 4096
            start = time.perf_counter()
            try:
                while not self._stop_event.is_set():
                    buf[:8] = self.count.to_bytes(8, "little")
                    os.pwritev(fd, [buf], self.rng.randrange(blocks) * 4096)
                    self.count += 1
                    if self.rate:
                        ahead = start + self.count * 4096 / self.rate - time.perf_counter()
                        if ahead > 0:
                            time.sleep(ahead)
            finally:
                self.seconds = time.perf_counter() - start
                os.close(fd)
                buf.close()
        except BaseException as e:
            self.error = e

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        if self.error is not None:
            sys.exit(f"bench_jobs: the guest failed: {self.error!r}")
        return self.count / self.seconds

    @classmethod
    def measure(cls, path: str, size: int, rate: int, seconds: float) -> float:
        guest = cls(path, size, rate, seed=1)
        guest.start()
        time.sleep(seconds)
        return guest.stop()


@dataclass
class Mirrored:
    """One write-blocking job under a guest at twice its speed, per run."""

    pivot: list[float] = field(default_factory=list)  # seconds from the command
    idle: list[float] = field(default_factory=list)  # the capped guest's IOPS, no job
    busy: list[float] = field(default_factory=list)  # the same guest during the job
    uncapped: list[float] = field(default_factory=list)  # the guest alone, no cap
    speed: list[int] = field(default_factory=list)
    pivoted: int = 0

    @property
    def ratio(self) -> float:
        return (sum(self.busy) / len(self.busy)) / (sum(self.idle) / len(self.idle))


def bench_mirror(seed: str, work: str, i: int, res: Results) -> None:
    for key, kind, text, result in (
        ("copy sync=full", "copy", "F.qcow2 sync=full", "F.qcow2"),
        ("active commit base=A", "commit", "base=A.qcow2", "A.qcow2"),
    ):
        m = res.mirrored.setdefault(key, Mirrored())
        src = copy_chain(seed, os.path.join(work, f"mirror-{i}"))
        with Chainfs(src, os.path.join(work, "mnt"), os.path.join(work, "chainfs.log")) as fs:
            size = os.stat(fs.flat).st_size
            log(f"{run_name(i)}: {key} copy-mode=write-blocking under a guest at 2x speed")
            uncapped = Guest.measure(fs.flat, size, 0, MIRROR_GUEST_SECONDS)
            speed = max(64 << 10, int(uncapped * 4096 / 4) >> 10 << 10)
            idle = Guest.measure(fs.flat, size, 2 * speed, MIRROR_GUEST_SECONDS)
            job = f"{text} speed={speed} copy-mode=write-blocking"
            res.note(
                f"chainfs: {key} under a guest",
                f"echo '{job}' > {fs.control}/{kind} (speed: a quarter of the guest's"
                " uncapped rate), the guest capped at 2x speed",
            )
            guest = Guest(fs.flat, size, 2 * speed, seed=2)
            guest.start()
            start = time.perf_counter()
            seen = fs.command(kind, job)
            line = fs.wait_event(("JOB_COMPLETED", "JOB_CANCELLED"), seen)
            pivot = time.perf_counter() - start
            busy = guest.stop()
            ok = "event=JOB_COMPLETED" in line and "error=" not in line
            m.pivoted += ok
            res.expect(ok, f"{key} under a guest: {line}")
            m.pivot.append(pivot)
            m.idle.append(idle)
            m.busy.append(busy)
            m.uncapped.append(uncapped)
            m.speed.append(speed)
            log(
                f"    pivot after {pivot:.2f} s at speed={speed >> 10}K; guest write IOPS"
                f" {busy:.0f} during the job, {idle:.0f} without (cap 2x speed),"
                f" {uncapped:.0f} uncapped"
            )
        res.expect(check_clean(os.path.join(src, result)), f"{key}: qemu-img check {result}")
        shutil.rmtree(src)


def mirror_rows(res: Results) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    runs = 0
    for key, m in res.mirrored.items():
        runs = len(m.pivot)
        speeds = f"speed={min(m.speed) >> 10}K..{max(m.speed) >> 10}K"
        rows.append(
            (
                f"{key} copy-mode=write-blocking, guest at 2x {speeds}: time to pivot (s), pivoted",
                f"{min(m.pivot):.2f}..{max(m.pivot):.2f}",
                f"{m.pivoted} of {runs}",
                "-",
                f"{runs} of {runs}",
                "yes" if m.pivoted == runs else "NO",
            )
        )
        rows.append(
            (
                f"{key}: guest 4 KiB write IOPS during the job (ratio = during / no job,"
                f" guest capped at 2x speed; uncapped no job: {max(m.uncapped):.0f})",
                f"{sum(m.busy) / len(m.busy):.0f}",
                f"{sum(m.idle) / len(m.idle):.0f} (no job)",
                f"{m.ratio:.2f}",
                f">= {MIRROR_IOPS_TARGET}",
                "yes" if m.ratio >= MIRROR_IOPS_TARGET else "NO",
            )
        )
    return rows


# --- the report ----------------------------------------------------------------------------


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("measure", "chainfs", "QEMU / reference", "ratio", "target", "met")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def rows_of(res: Results) -> list[tuple[str, ...]]:
    reference = {
        "intermediate commit top=D base=B": "QMP block-commit",
        "active commit base=A": "QMP block-commit + block-job-complete",
        "copy sync=full": "qemu-img convert -O qcow2",
        "backup sync=full": "QMP blockdev-backup",
    }
    rows: list[tuple[str, ...]] = []
    for key, t in res.timed.items():
        for how, ours, theirs, ratio in (
            ("to the job's end", t.chainfs, t.qemu, t.ratio),
            ("to a durable result", t.chainfs_durable, t.qemu_durable, t.durable_ratio),
        ):
            rows.append(
                (
                    f"{key}, {how} (s; ratio = QEMU time / chainfs time)",
                    f"{min(ours):.3f}",
                    f"{min(theirs):.3f} ({reference[key]})",
                    f"{ratio:.2f}",
                    f">= {TIME_TARGET}",
                    "yes" if ratio >= TIME_TARGET else "NO",
                )
            )
        rows.append(
            (
                f"{key}: bare loop, the job's data read and made durable (s; ratio = QEMU"
                " time to the job's end / loop time)",
                f"{min(t.floor):.3f}",
                f"{min(t.qemu):.3f} ({reference[key]})",
                f"{t.floor_ratio:.2f}",
                "(reference)",
                "-",
            )
        )
        rows.append(
            (
                f"{key}: the same writes alone, from memory (s; ratio = QEMU time to the"
                " job's end / their time)",
                f"{min(t.disk):.3f}",
                f"{min(t.qemu):.3f} ({reference[key]})",
                f"{min(t.qemu) / min(t.disk):.2f}",
                "(reference)",
                "-",
            )
        )
    if res.iops is not None:
        r = res.iops
        ratio = r.ratio
        lasted = "" if r.job_lasted else ", JOB ENDED EARLY"
        rows.append(
            (
                f"4 KiB random read IOPS, QD1, during copy{lasted} (ratio = during / no job)",
                f"{sum(r.busy) / len(r.busy):.0f}",
                f"{r.baseline:.0f} (no job: mean of before and after)",
                f"{ratio:.2f}",
                f">= {IOPS_TARGET}",
                "yes" if ratio >= IOPS_TARGET else "NO",
            )
        )
    if res.backup_iops:
        busy = sum(b for b, _, _ in res.backup_iops) / len(res.backup_iops)
        idle = sum(x for _, x, _ in res.backup_iops) / len(res.backup_iops)
        lasted = "" if all(x for _, _, x in res.backup_iops) else ", JOB ENDED EARLY"
        rows.append(
            (
                f"guest 4 KiB random write IOPS, QD1, during backup sync=full{lasted}"
                " (ratio = during / no job)",
                f"{busy:.0f}",
                f"{idle:.0f} (no job: mean of before and after)",
                f"{busy / idle:.2f}",
                f">= {BACKUP_IOPS_TARGET}",
                "yes" if busy / idle >= BACKUP_IOPS_TARGET else "NO",
            )
        )
    return rows + mirror_rows(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_jobs", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=GiB, help="virtual size of the seed chain (1 GiB)")
    ap.add_argument(
        "--runs", type=int, default=6, help="runs per measure after a warm-up, best taken (6)"
    )
    ap.add_argument(
        "--rand-runtime",
        type=int,
        default=RAND_RUNTIME,
        help=f"seconds of each random-read run ({RAND_RUNTIME})",
    )
    ap.add_argument("--jobs", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    ap.add_argument("--parts", default=None, help="bench.py's parts: this runs when 'jobs' is one")
    args, ignored = ap.parse_known_args(argv)
    if args.parts is not None and "jobs" not in args.parts.split(","):
        return 0
    if ignored:
        log(f"ignoring bench.py's options {' '.join(ignored)}")
    parts = args.jobs.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--jobs: unknown part in {args.jobs!r}")
    size: int = args.size
    missing = [t for t in ("fio", "qemu-storage-daemon", "fusermount3") if not shutil.which(t)]
    if missing:
        sys.exit(f"bench_jobs: needs {', '.join(missing)}")

    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    load_before = load()
    seed = os.path.join(WORK, "seed")
    if set(parts) - {"mirror"}:
        log(f"building the seed chain ({size >> 20} MiB) in {seed}")
        run([sys.executable, MAKE_SEED_CHAIN, seed, "--size", str(size)])
    mirror_seed = seed
    if "mirror" in parts and (size > MIRROR_SIZE or parts == ["mirror"]):
        mirror_seed = os.path.join(WORK, "seed-mirror")
        mirror_size = min(size, MIRROR_SIZE)
        log(f"building the mirror part's seed chain ({mirror_size >> 20} MiB)")
        run([sys.executable, MAKE_SEED_CHAIN, mirror_seed, "--size", str(mirror_size)])

    res = Results()
    warmup = Results()  # the first round only warms up; its figures are dropped
    for i in range(-1, args.runs):
        into = warmup if i < 0 else res
        if "commit" in parts:
            bench_commit(seed, WORK, i, into, active=False)
        if "active" in parts:
            bench_commit(seed, WORK, i, into, active=True)
        if "copy" in parts:
            bench_copy(seed, WORK, i, into)
        if "iops" in parts and i >= 0:
            bench_iops(seed, WORK, i, size, args.rand_runtime, res)
        if "mirror" in parts and i >= 0:
            bench_mirror(mirror_seed, WORK, i, res)
        if "backup" in parts:
            bench_backup(seed, WORK, i, into)
    res.wrong += warmup.wrong

    print()
    mirror = f"mirror part on {min(size, MIRROR_SIZE) >> 20} MiB" if "mirror" in parts else ""
    if parts == ["mirror"]:
        print(f"live jobs under a writing guest: {mirror} (five layers), {args.runs} run(s)")
    else:
        print(
            f"live jobs: chainfs against QEMU, seed chain of {size >> 20} MiB (five layers),"
            f" best of {args.runs} run(s)" + (f"; {mirror}" if mirror else "")
        )
    print()
    print_table(rows_of(res))
    print()
    if res.wrong:
        print(f"WRONG RESULTS: {'; '.join(res.wrong)}")
    else:
        print(
            "every result equals the seed chain's disk (qemu-img compare) and checks clean"
            " (the mirror part's, written by its guest: checked clean)"
        )
    print("\ncommands used:")
    for key, text in res.commands.items():
        print(f"  {key}:\n    {text}")
    print(f"\nload average before: {load_before}; after: {load()} (2 cores: other work skews)")
    return 1 if res.wrong else 0


if __name__ == "__main__":
    sys.exit(main())
