"""Benchmarks of chainfs against QEMU, run by ``scripts/bench``.

It builds its images in ``./bench-work`` (removed at the start of every run; nothing else
is touched).  The engine part measures ``chainfs.chain.Chain`` directly (no FUSE):

- sequential read of the whole disk of the 1 GiB seed chain in 1 MiB requests, beside
  ``qemu-img bench`` reading the same active image in 1 MiB requests (best of runs);
- 10,000 random 4 KiB reads (fixed seed, 4 KiB-aligned, over the whole disk) on a depth-1
  chain and on a depth-64 chain, timed from after ``Chain.open`` (best of runs), with
  the bytes read checked against ``qemu-img convert -O raw`` of the same chain;
- the peak RSS of this process, and of a child that opens a 1 TiB sparse chain (a few
  writes spread over the base, an overlay with a few more) and does 10,000 random 4 KiB
  reads there.

The FUSE part serves the same 1 GiB five-layer seed chain with ``chainfs mount -f`` (a
subprocess) and with ``qemu-storage-daemon --export type=fuse`` (a blockdev per layer,
node names A..E), one server at a time, alternating, and measures through each:

- sequential read of the whole flat disk with fio (1 MiB blocks, buffered), the first
  read after a fresh mount with the page cache dropped, and a second read on that mount
  with ``--invalidate=0`` (what each side's page cache use gives a re-read; no target);
- 4 KiB random reads at queue depth 1 with fio (psync, ``direct=1``, fixed seed and run
  time): every read reaches the server, so this is the per-request cost of each;
- sequential write of the whole disk with fio (1 MiB blocks, ``end_fsync=1``, timed by
  the wall clock) into a fresh empty overlay: chainfs's ``snapshot`` into its copy of the
  chain, a ``qemu-img create`` overlay exported writable for QEMU;
- ``stream base=A.qcow2`` through the control file (until ``JOB_COMPLETED``) against QMP
  ``block-stream`` with ``base-node=A`` (until ``BLOCK_JOB_COMPLETED``), each on its own
  fresh copy of the chain; both results are compared with ``qemu-img compare``;
- the peak RSS (VmHWM) of the chainfs server and of qemu-storage-daemon;
- holes (measure ``holes``): a 16 GiB five-layer chain holding 1 GiB of data, each
  server exporting it read-only: ``cp --sparse=always`` of the flat file and ``qemu-img
  convert -f raw -O qcow2`` of it, timed by the wall clock (both copy only the data
  extents SEEK_DATA/SEEK_HOLE report), the copies' allocated sizes reported and the
  first ones compared with the chain (``qemu-img compare``);
- trim (measure ``trim``): ext4 on a loop device over the flat file of an empty 4 GiB
  image (qemu-storage-daemon: blockdevs with ``discard=unmap``), 1 GiB of files written,
  synced and deleted, then ``fstrim``: its wall time, and the image's allocated size
  before it and after everything was unmounted (the space given back);
- queue depth (measure ``qd``): fio ``direct=1`` random 4 KiB reads with libaio at QD 1,
  4, 16, 32 and psync in 1, 2, 4 jobs, 64 KiB reads at QD 1 and 16 (the seed chain,
  read-only), then 4 KiB writes into a fresh overlay F (a replayed log: every write
  allocates a cluster) and random overwrites of its allocated clusters at QD 1 and 16,
  each with the server's CPU time per request (utime+stime from ``/proc/PID/stat`` over
  the run, divided by fio's request count).

The views part (``--parts views``, not run by default) builds a chain of 1,000 empty
qcow2 layers (``qemu-img create -b`` in a loop) and one of 5, mounts each with ``chainfs
mount -f`` and times a listing of ``layers/CHAIN`` and a ``stat`` of every view in it
(``ls -l``: one readdir, then a lookup per name), per entry, cold (first after the mount)
and warm; target: an entry of the 1,000-layer listing costs at most twice one of the
5-layer listing (nothing per pair of layers).  It also reads, on a read-only mount of the
seed chain, the view of D (``layers/E/D.qcow2.img``, four layers deep), and the flat file
of a copy of ``A <- B <- C <- D`` (the same disk, D active) on a second read-only mount,
with O_DIRECT in 1 MiB requests (every read reaches the server), taking turns: a view
reads as fast as the flat file of the same disk (target: at least 0.8 of its
throughput).

It prints a table with the targets and the commands used.  The figures are a report, not
a test: the exit status is non-zero only when something fails to run or reads wrong bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import xxhash

from chainfs.chain import Chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench-work")
MAKE_SEED_CHAIN = os.path.join(ROOT, "scripts", "make-seed-chain")

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SEQ_PIECE = MiB
RANDOM_PIECE = 4096
RANDOM_COUNT = 10_000
RANDOM_SEED = 20240601

SEQ_TARGET = 0.8  # engine / qemu throughput, at least
DEPTH_TARGET = 1.2  # depth-64 / depth-1 time, at most
RSS_TARGET_MIB = 100  # 1 TiB chain, at most (well under)


def log(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def make_seed_chain(directory: str, size: int, depth: int | None = None) -> str:
    args = [sys.executable, MAKE_SEED_CHAIN, directory, "--size", str(size)]
    if depth is not None:
        args += ["--depth", str(depth)]
    return run(args).strip().splitlines()[-1]


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB.

    Linux's ``ru_maxrss`` survives ``execve`` and so counts the parent's RSS at the fork
    in a child; ``VmHWM`` belongs to the process's own address space, so it is used where
    it exists and ``getrusage`` (KiB on Linux) elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(runs: int, measure: Callable[[], float]) -> float:
    times = [measure() for _ in range(runs)]
    log("    runs: " + ", ".join(f"{t:.4f} s" for t in times))
    return min(times)


# --- (a) sequential read ----------------------------------------------------------------


def engine_sequential_seconds(active: str) -> float:
    with Chain.open(active) as chain:
        size = chain.size
        start = time.perf_counter()
        for offset in range(0, size, SEQ_PIECE):
            chain.read(offset, min(SEQ_PIECE, size - offset))
        return time.perf_counter() - start


def qemu_sequential_seconds(active: str, size: int) -> float:
    # Reading is qemu-img bench's default (-w would write); it keeps 64 requests in flight.
    out = run(
        ["qemu-img", "bench", "-f", "qcow2", "-c", str(size // SEQ_PIECE), "-s", "1M", active]
    )
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if m is None:
        sys.exit(f"bench: cannot read qemu-img bench output:\n{out}")
    return float(m.group(1))


# --- (b) random 4 KiB reads -------------------------------------------------------------


def random_offsets(size: int, count: int = RANDOM_COUNT) -> list[int]:
    rng = random.Random(RANDOM_SEED)
    return [rng.randrange(size // RANDOM_PIECE) * RANDOM_PIECE for _ in range(count)]


def engine_random_seconds(active: str, offsets: list[int]) -> float:
    """Time the reads, from after ``Chain.open`` to the end of the last read."""
    with Chain.open(active) as chain:
        start = time.perf_counter()
        for offset in offsets:
            chain.read(offset, RANDOM_PIECE)
        return time.perf_counter() - start


def engine_random_digest(active: str, offsets: list[int]) -> str:
    h = xxhash.xxh3_128()
    with Chain.open(active) as chain:
        for offset in offsets:
            h.update(chain.read(offset, RANDOM_PIECE))
    return h.hexdigest()


def raw_random_digest(raw: str, offsets: list[int]) -> str:
    h = xxhash.xxh3_128()
    with open(raw, "rb") as f:
        for offset in offsets:
            h.update(os.pread(f.fileno(), RANDOM_PIECE, offset))
    return h.hexdigest()


@dataclass
class RandomResult:
    seconds: float
    correct: bool


def random_bench(active: str, offsets: list[int], runs: int) -> RandomResult:
    raw = active + ".raw"
    run(["qemu-img", "convert", "-O", "raw", active, raw])
    expected = raw_random_digest(raw, offsets)
    os.unlink(raw)
    seconds = best_of(runs, lambda: engine_random_seconds(active, offsets))
    # checked in a separate, untimed pass
    return RandomResult(seconds, engine_random_digest(active, offsets) == expected)


# --- the 1 TiB sparse chain --------------------------------------------------------------

# (offset, length, pattern byte) written with qemu-io; base writes are cluster-aligned,
# overlay writes unaligned, and none overlap.
TERA_BASE_WRITES = [(k * (TiB // 16) + 3 * MiB, 64 << 10, 0x40 + k) for k in range(16)]
TERA_TOP_WRITES = [(k * (TiB // 8) + 50 * GiB + 5000, 10_000, 0xA0 + k) for k in range(8)]


def build_tera_chain(directory: str) -> str:
    os.makedirs(directory)
    base = os.path.join(directory, "base.qcow2")
    top = os.path.join(directory, "top.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(TiB)])
    io = ["qemu-io", "-f", "qcow2"]
    for offset, length, pat in TERA_BASE_WRITES:
        io += ["-c", f"write -P {pat:#x} {offset} {length}"]
    run([*io, base])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top])
    io = ["qemu-io", "-f", "qcow2"]
    for offset, length, pat in TERA_TOP_WRITES:
        io += ["-c", f"write -P {pat:#x} {offset} {length}"]
    run([*io, top])
    return top


def tera_child(active: str) -> int:
    """Run in a child process so that its peak RSS is the 1 TiB test's alone."""
    offsets = random_offsets(TiB)
    with Chain.open(active) as chain:
        if chain.size != TiB:
            sys.exit(f"bench: {active} has size {chain.size}, expected {TiB}")
        start = time.perf_counter()
        for offset in offsets:
            chain.read(offset, RANDOM_PIECE)
        seconds = time.perf_counter() - start
        correct = all(
            chain.read(offset, length) == bytes([pat]) * length
            for offset, length, pat in TERA_BASE_WRITES + TERA_TOP_WRITES
        ) and chain.read(7 * GiB, MiB) == bytes(MiB)
    print(json.dumps({"seconds": seconds, "rss_mib": peak_rss_mib(), "correct": correct}))
    return 0


# --- (c) through FUSE: chainfs against qemu-storage-daemon ------------------------------

LAYERS = ("A", "B", "C", "D", "E")
SERVER_DEADLINE = 60.0  # seconds a server may take to come up or go away
RAND_RUNTIME = 10  # seconds of random reads per measurement
FUSE_TARGET = 1.0  # chainfs / qemu-storage-daemon, at least (stream: time ratio)

FIO = ["fio", "--name=bench", "--ioengine=psync", "--iodepth=1", "--output-format=json"]


def fio_seq_read(path: str, size: int, *, invalidate: bool = True) -> list[str]:
    # fio drops the file's cached pages before it starts unless told not to: the second
    # read keeps them, to show what the page cache serves on each side
    keep = [] if invalidate else ["--invalidate=0"]
    return [*FIO, f"--filename={path}", "--rw=read", "--bs=1M", f"--size={size}", *keep]


def fio_rand_read(path: str, size: int, runtime: int) -> list[str]:
    return [
        *FIO,
        f"--filename={path}",
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        f"--randseed={RANDOM_SEED}",
    ]


def fio_seq_write(path: str, size: int) -> list[str]:
    return [*FIO, f"--filename={path}", "--rw=write", "--bs=1M", f"--size={size}", "--end_fsync=1"]


def fio(args: list[str]) -> dict[str, float]:
    """Run fio; its job's read/write figures and the wall time of the whole run."""
    start = time.perf_counter()
    out = run(args)
    wall = time.perf_counter() - start
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench: {' '.join(args)}: fio error {job['error']}")
    return {
        "read_bw": job["read"]["bw_bytes"],
        "read_iops": job["read"]["iops"],
        "write_bw": job["write"]["bw_bytes"],
        "write_iops": job["write"]["iops"],
        "wall": wall,
    }


def drop_caches() -> bool:
    """Write back and drop the page cache (root only): a cold first read for both."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_DEADLINE
    while not cond():
        if proc.poll() is not None:
            sys.exit(f"bench: the server exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            sys.exit(f"bench: timed out waiting for {what}")
        time.sleep(0.005)


def peak_rss_of(pid: int) -> float:
    """A live process's peak resident set size (VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def copy_chain(src: str, dst: str) -> str:
    """A fresh copy of the seed chain's directory (sparse, relative backing strings),
    written back before it is used, so neither server pays for the copy."""
    run(["cp", "-r", "--sparse=always", src, dst])
    os.sync()
    return dst


def shell_words(args: list[str]) -> str:
    """A command line for the report: paths under bench-work shortened, and of a run of
    --blockdev options only the first layer's pair and the last one's kept."""
    out: list[str] = []
    blockdevs = [i for i, a in enumerate(args) if a == "--blockdev"]
    elide = set(blockdevs[2:-2])
    for i, a in enumerate(args):
        if i in elide or (i - 1) in elide:
            if i == blockdevs[2]:
                out.append("... (the same for each layer up, backing = the one below) ...")
            continue
        a = a.replace(WORK + "/", "bench-work/")
        out.append(a if re.fullmatch(r"[\w@%+=:,./-]+", a) else f"'{a}'")
    return " ".join(out)


class Server:
    """One FUSE server in a subprocess: start, wait until usable, stop, remember RSS."""

    def __init__(self, name: str, args: list[str], log_path: str, mountpoint: str) -> None:
        self.name = name
        self.args = args
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.peak_rss = 0.0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log_path, "ab") as log:
            log.write(f"==> {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_for(lambda: os.path.ismount(self.mountpoint), self.mountpoint, self.proc)

    def stop(self) -> None:
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True, check=False)

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        assert proc is not None
        if proc.poll() is None:
            self.peak_rss = peak_rss_of(proc.pid)
            self.stop()
            try:
                proc.wait(timeout=SERVER_DEADLINE)
            except subprocess.TimeoutExpired:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False)
                proc.kill()
                proc.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False)


def chainfs_server(source: str, mountpoint: str, log: str, *, readonly: bool) -> Server:
    os.makedirs(mountpoint, exist_ok=True)
    args = [sys.executable, "-m", "chainfs", "mount", "-f"]
    if readonly:
        args += ["-o", "ro"]
    return Server("chainfs", [*args, source, mountpoint], log, mountpoint)


class QMP:
    """A minimal QMP client over a unix socket: commands, and the events seen meanwhile."""

    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, object]] = []
        self._recv()  # the greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, object]:
        line = self.file.readline()
        if not line:
            sys.exit("bench: qemu-storage-daemon closed its QMP socket")
        msg: dict[str, object] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                sys.exit(f"bench: QMP {command} failed: {msg['error']}")
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str) -> dict[str, object]:
        while True:
            for i, msg in enumerate(self.events):
                if msg["event"] == name:
                    return self.events.pop(i)
            self.events.append(self._recv())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuServer(Server):
    """qemu-storage-daemon with the chain as blockdevs A..E (E on top), a QMP socket and,
    when ``export`` names a node, a FUSE export of it on the regular file ``mountpoint``."""

    def __init__(
        self,
        directory: str,
        mountpoint: str,
        log: str,
        *,
        export: str | None,
        writable: bool,
        layers: tuple[str, ...] = LAYERS,
        discard: bool = False,
    ) -> None:
        self.qmp_path = os.path.join(os.path.dirname(mountpoint), "qmp.sock")
        if os.path.lexists(self.qmp_path):
            os.unlink(self.qmp_path)  # left by an earlier server: wait for the new one
        self.qmp: QMP | None = None
        self.export = export
        args = ["qemu-storage-daemon"]
        below: str | None = None
        names = [*layers, "F"] if export == "F" else list(layers)
        for name in names:
            file_node: dict[str, object] = {
                "driver": "file",
                "node-name": f"{name}-file",
                "filename": os.path.join(directory, f"{name}.qcow2"),
            }
            fmt_node: dict[str, object] = {
                "driver": "qcow2",
                "node-name": name,
                "file": f"{name}-file",
                "backing": below,
            }
            if not writable:
                file_node["read-only"] = fmt_node["read-only"] = True
            if discard:  # pass a guest's discards down and punch the image file
                file_node["discard"] = fmt_node["discard"] = "unmap"
            args += ["--blockdev", json.dumps(file_node), "--blockdev", json.dumps(fmt_node)]
            below = name
        if export is not None:
            with open(mountpoint, "w"):
                pass  # a FUSE export's mountpoint is an existing regular file
            spec = f"type=fuse,id=exp0,node-name={export},mountpoint={mountpoint}"
            args += ["--export", spec + (",writable=on" if writable else "")]
        args += [
            "--chardev",
            f"socket,path={self.qmp_path},server=on,wait=off,id=qmp",
            "--monitor",
            "chardev=qmp",
        ]
        super().__init__("qemu-storage-daemon", args, log, mountpoint)

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_for(lambda: os.path.exists(self.qmp_path), self.qmp_path, self.proc)
        if self.export is not None:
            wait_for(lambda: os.path.ismount(self.mountpoint), self.mountpoint, self.proc)
        self.qmp = QMP(self.qmp_path)

    def stop(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.execute("quit")
            except (OSError, SystemExit):
                pass
            self.qmp.close()
            self.qmp = None


def read_only_server(
    side: str, directory: str, mp: str, export: str, clog: str, qlog: str
) -> tuple[Server, str]:
    """The seed chain in ``directory`` served read-only by ``side`` ("chainfs" or
    "qemu"), and the path of its flat file."""
    if side == "chainfs":
        return chainfs_server(directory, mp, clog, readonly=True), os.path.join(mp, "E.img")
    return QemuServer(directory, export, qlog, export="E", writable=False), export


@dataclass
class Pair:
    """One measure for both servers: the best of the runs (highest, or lowest for times)."""

    chainfs: list[float]
    qemu: list[float]
    lower_is_better: bool = False

    def best(self, values: list[float]) -> float:
        return min(values) if self.lower_is_better else max(values)

    @property
    def ratio(self) -> float:
        c, q = self.best(self.chainfs), self.best(self.qemu)
        return q / c if self.lower_is_better else c / q


@dataclass
class FuseResults:
    seq_read: Pair
    reread: Pair
    rand_iops: Pair
    seq_write: Pair
    stream: Pair
    rss: Pair
    holes: HolesResults
    dropped: bool
    streams_equal: bool
    commands: list[str]


@dataclass
class HolesResults:
    cp: Pair = field(default_factory=lambda: Pair([], [], lower_is_better=True))
    convert: Pair = field(default_factory=lambda: Pair([], [], lower_is_better=True))
    fstrim: Pair = field(default_factory=lambda: Pair([], [], lower_is_better=True))
    copies: dict[str, int] = field(default_factory=dict)  # allocated bytes of each copy
    freed: dict[str, int] = field(default_factory=dict)  # bytes fstrim gave back
    equal: bool = True


HOLES_SIZE = 16 * GiB
TRIM_SIZE = 4 * GiB


def build_sparse_chain(directory: str) -> None:
    """A..E over 16 GiB, each layer 4 stretches of 52 MiB spread over the disk (1 GiB of
    data in all), written by qemu-io."""
    os.makedirs(directory)
    below: str | None = None
    for i, name in enumerate(LAYERS):
        path = os.path.join(directory, f"{name}.qcow2")
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if below is not None:
            args += ["-b", f"{below}.qcow2", "-F", "qcow2"]
        run([*args, path, str(HOLES_SIZE)])
        cmds: list[str] = []
        for k in range(4):
            cmds += ["-c", f"write -P {0x10 + i} {(k * 5 + i) * 780 * MiB} {52 * MiB}"]
        run(["qemu-io", "-f", "qcow2", *cmds, path])
        below = name


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def holes_bench(
    work: str, runs: int, measures: set[str], note: Callable[[str, list[str]], None]
) -> HolesResults:
    """The ``holes`` and ``trim`` measures (see the module's docstring)."""
    r = HolesResults()
    mp = os.path.join(work, "hmnt")
    export = os.path.join(work, "hexport.img")
    clog = os.path.join(work, "chainfs-holes.log")
    qlog = os.path.join(work, "qemu-storage-daemon-holes.log")
    out = os.path.join(work, "holes-out")
    if "holes" in measures:
        chain = os.path.join(work, "sparse")
        log("building the 16 GiB chain with 1 GiB of data")
        build_sparse_chain(chain)
    for i in range(runs):
        if "holes" in measures:
            for side in ("chainfs", "qemu"):
                log(f"(d) run {i + 1}: cp --sparse=always and qemu-img convert, {side}")
                server, flat = read_only_server(side, chain, mp, export, clog, qlog)
                with server:
                    note(f"{server.name}: export for holes", server.args)
                    os.makedirs(out, exist_ok=True)
                    cp = ["cp", "--sparse=always", flat, os.path.join(out, "copy.raw")]
                    conv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", flat]
                    conv.append(os.path.join(out, "copy.qcow2"))
                    note("both: sparse copy", cp)
                    note("both: convert", conv)
                    start = time.perf_counter()
                    run(cp)
                    getattr(r.cp, side).append(time.perf_counter() - start)
                    start = time.perf_counter()
                    run(conv)
                    getattr(r.convert, side).append(time.perf_counter() - start)
                r.copies[f"{side} cp"] = allocated(os.path.join(out, "copy.raw"))
                r.copies[f"{side} convert"] = allocated(os.path.join(out, "copy.qcow2"))
                if i == 0:
                    for name, fmt in (("copy.raw", "raw"), ("copy.qcow2", "qcow2")):
                        cmp = ["qemu-img", "compare", "-q", "-f", fmt, "-F", "qcow2"]
                        cmp += [os.path.join(out, name), os.path.join(chain, "E.qcow2")]
                        r.equal &= subprocess.run(cmp, check=False).returncode == 0
                shutil.rmtree(out)
                log(
                    f"    {side}: cp {getattr(r.cp, side)[-1]:.2f} s, "
                    f"convert {getattr(r.convert, side)[-1]:.2f} s"
                )
        if "trim" in measures:
            for side in ("chainfs", "qemu"):
                log(f"(d) run {i + 1}: fstrim of ext4 with 1 GiB deleted, {side}")
                src = os.path.join(work, f"trim-{side}-{i}")
                os.makedirs(src)
                image = os.path.join(src, "E.qcow2")
                run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(TRIM_SIZE)])
                if side == "chainfs":
                    server = chainfs_server(src, mp, clog, readonly=False)
                    flat = os.path.join(mp, "E.img")
                else:
                    server = QemuServer(
                        src, export, qlog, export="E", writable=True, layers=("E",), discard=True
                    )
                    flat = export
                fs = os.path.join(work, "ext4")
                os.makedirs(fs, exist_ok=True)
                with server:
                    note(f"{server.name}: export for fstrim", server.args)
                    dev = run(["losetup", "--find", "--show", flat]).strip()
                    try:
                        run(
                            [
                                "mkfs.ext4",
                                "-q",
                                "-E",
                                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                                dev,
                            ]
                        )
                        run(["mount", dev, fs])
                        try:
                            block = os.urandom(MiB)
                            for n in range(16):
                                with open(os.path.join(fs, f"f{n}"), "wb") as f:
                                    for _ in range(64):
                                        f.write(block)
                            os.sync()
                            for n in range(16):
                                os.unlink(os.path.join(fs, f"f{n}"))
                            os.sync()
                            before = allocated(image)
                            start = time.perf_counter()
                            run(["fstrim", fs])
                            getattr(r.fstrim, side).append(time.perf_counter() - start)
                        finally:
                            run(["umount", fs])
                    finally:
                        run(["losetup", "-d", dev])
                r.freed[side] = before - allocated(image)
                run(["qemu-img", "check", "-q", image])
                shutil.rmtree(src)
                log(
                    f"    {side}: fstrim {getattr(r.fstrim, side)[-1]:.2f} s, "
                    f"{r.freed[side] / MiB:.0f} MiB given back"
                )
    return r


def fuse_bench(
    seed_dir: str, size: int, runs: int, rand_runtime: int, measures: set[str]
) -> FuseResults:
    work = os.path.join(WORK, "fuse")
    os.makedirs(work)
    mp = os.path.join(work, "mnt")
    export = os.path.join(work, "export.img")
    clog = os.path.join(work, "chainfs.log")
    qlog = os.path.join(work, "qemu-storage-daemon.log")
    flat = os.path.join(mp, "E.img")
    seq_read = Pair([], [])
    reread = Pair([], [])
    rand = Pair([], [])
    write = Pair([], [])
    stream = Pair([], [], lower_is_better=True)
    rss = Pair([], [], lower_is_better=True)
    dropped = streams_equal = True
    commands: dict[str, str] = {}

    def note(key: str, args: list[str]) -> None:
        commands.setdefault(key, shell_words(args))

    def measure_reads(server: Server, path: str, into: str) -> None:
        nonlocal dropped
        first = fio_seq_read(path, size)
        second = fio_seq_read(path, size, invalidate=False)
        note(f"{server.name}: first sequential read", first)
        note(f"{server.name}: second sequential read", second)
        note("both: random read", fio_rand_read(path, size, rand_runtime))
        r1 = fio(first)
        r2 = fio(second)
        r3 = fio(fio_rand_read(path, size, rand_runtime))
        side = "chainfs" if into == "chainfs" else "qemu"
        getattr(seq_read, side).append(r1["read_bw"])
        getattr(reread, side).append(r2["read_bw"])
        getattr(rand, side).append(r3["read_iops"])
        log(
            f"    {server.name}: first read {r1['read_bw'] / 1e6:.0f} MB/s, "
            f"second read {r2['read_bw'] / 1e6:.0f} MB/s, {r3['read_iops']:.0f} IOPS"
        )

    for i in range(runs):
        if "read" in measures:
            # reads: the seed chain itself, read-only for both (shared image locks)
            log(f"(c) run {i + 1}: reads through chainfs")
            dropped &= drop_caches()
            with chainfs_server(seed_dir, mp, clog, readonly=True) as srv:
                note("chainfs: mount for reads", srv.args)
                measure_reads(srv, flat, "chainfs")
            rss.chainfs.append(srv.peak_rss)
            log(f"(c) run {i + 1}: reads through qemu-storage-daemon")
            dropped &= drop_caches()
            with QemuServer(seed_dir, export, qlog, export="E", writable=False) as qsrv:
                note("qemu-storage-daemon: export for reads", qsrv.args)
                measure_reads(qsrv, export, "qemu")
            rss.qemu.append(qsrv.peak_rss)

        if "write" in measures:
            # writes into a fresh empty overlay on a fresh copy of the chain
            log(f"(c) run {i + 1}: sequential write into a fresh overlay, chainfs")
            src = copy_chain(seed_dir, os.path.join(work, f"write-chainfs-{i}"))
            with chainfs_server(src, mp, clog, readonly=False) as srv:
                with open(os.path.join(mp, "control", "E", "snapshot"), "w") as f:
                    f.write("F.qcow2\n")
                args = fio_seq_write(flat, size)
                note("chainfs: sequential write (after `echo F.qcow2 > control/E/snapshot`)", args)
                r = fio(args)
                write.chainfs.append(size / r["wall"])
            rss.chainfs.append(srv.peak_rss)
            run(["qemu-img", "check", "-q", os.path.join(src, "F.qcow2")])
            shutil.rmtree(src)
            log(f"    chainfs: {size / r['wall'] / 1e6:.0f} MB/s")
            log(f"(c) run {i + 1}: sequential write into a fresh overlay, qemu-storage-daemon")
            src = copy_chain(seed_dir, os.path.join(work, f"write-qemu-{i}"))
            overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "E.qcow2", "-F", "qcow2"]
            run([*overlay, os.path.join(src, "F.qcow2")])
            with QemuServer(src, export, qlog, export="F", writable=True) as qsrv:
                note("qemu-storage-daemon: overlay for writes", [*overlay, "F.qcow2"])
                note("qemu-storage-daemon: export for writes", qsrv.args)
                args = fio_seq_write(export, size)
                note("both: sequential write", args)
                r = fio(args)
                write.qemu.append(size / r["wall"])
            shutil.rmtree(src)
            log(f"    qemu-storage-daemon: {size / r['wall'] / 1e6:.0f} MB/s")

        if "stream" in measures:
            # stream base=A, each on its own fresh copy
            log(f"(c) run {i + 1}: stream base=A, chainfs")
            csrc = copy_chain(seed_dir, os.path.join(work, f"stream-chainfs-{i}"))
            with chainfs_server(csrc, mp, clog, readonly=False) as srv:
                events = os.path.join(mp, "control", "E", "events")
                control = os.path.join(mp, "control", "E", "stream")
                commands.setdefault(
                    "chainfs: stream",
                    f"echo base=A.qcow2 > {shell_words([control])}, then read"
                    " control/E/events until its JOB_COMPLETED line",
                )
                start = time.perf_counter()
                with open(control, "w") as f:
                    f.write("base=A.qcow2\n")
                while True:
                    with open(events) as f:
                        done = [x for x in f.read().splitlines() if "event=JOB_COMPLETED" in x]
                    if done:
                        break
                    time.sleep(0.002)  # a read of events is one cheap request
                stream.chainfs.append(time.perf_counter() - start)
                if "error=" in done[0]:
                    sys.exit(f"bench: the chainfs stream failed: {done[0]}")
            rss.chainfs.append(srv.peak_rss)
            log(f"    chainfs: {stream.chainfs[-1]:.3f} s")
            log(f"(c) run {i + 1}: stream base=A, qemu-storage-daemon (QMP block-stream)")
            qsrc = copy_chain(seed_dir, os.path.join(work, f"stream-qemu-{i}"))
            with QemuServer(qsrc, export, qlog, export=None, writable=True) as qsrv:
                assert qsrv.qmp is not None
                note("qemu-storage-daemon: for the stream", qsrv.args)
                cmd = {"job-id": "stream0", "device": "E", "base-node": "A"}
                note("qemu-storage-daemon: QMP", ["block-stream", json.dumps(cmd)])
                start = time.perf_counter()
                qsrv.qmp.execute("block-stream", **cmd)
                event = qsrv.qmp.wait_event("BLOCK_JOB_COMPLETED")
                stream.qemu.append(time.perf_counter() - start)
                data = event.get("data")
                if isinstance(data, dict) and data.get("error"):
                    sys.exit(f"bench: QEMU's block-stream failed: {data['error']}")
            log(f"    qemu-storage-daemon: {stream.qemu[-1]:.3f} s")
            compare = ["qemu-img", "compare", "-q", f"{csrc}/E.qcow2", f"{qsrc}/E.qcow2"]
            streams_equal &= subprocess.run(compare, check=False).returncode == 0
            shutil.rmtree(csrc)
            shutil.rmtree(qsrc)

    holes = holes_bench(work, runs, measures, note)
    return FuseResults(
        holes=holes,
        seq_read=seq_read,
        reread=reread,
        rand_iops=rand,
        seq_write=write,
        stream=stream,
        rss=rss,
        dropped=dropped,
        streams_equal=streams_equal,
        commands=[f"{k}:\n    {v}" for k, v in commands.items()],
    )


# --- queue depth: many requests in flight, and the server's CPU per request --------------

QD_RUNTIME = 5  # seconds of each time-based queue-depth measure


def fio_qd(
    path: str,
    size: int,
    runtime: int,
    rw: str,
    bs: str,
    engine: str,
    depth: int,
    jobs: int,
) -> list[str]:
    """A time-based ``direct=1`` fio job: ``jobs`` processes, each ``depth`` in flight."""
    args = [
        "fio",
        "--name=qd",
        f"--ioengine={engine}",
        f"--iodepth={depth}",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--filename={path}",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        f"--randseed={RANDOM_SEED}",
        "--output-format=json",
    ]
    if jobs > 1:
        args += [f"--numjobs={jobs}", "--group_reporting"]
    return args


def fresh_write_log(path: str, flat: str, start: int, end: int) -> str:
    """A fio replay log (``read_iolog``) of one 4 KiB write into every 64 KiB cluster of
    ``[start, end)``, at a random 4 KiB-aligned place inside it, clusters in random
    order: every write of the replay allocates a cluster of a fresh overlay (fio's own
    random offsets repeat clusters; ``blockalign`` does not stop that)."""
    rng = random.Random(RANDOM_SEED + start)
    clusters = list(range(start // (64 << 10), end // (64 << 10)))
    rng.shuffle(clusters)
    lines = ["fio version 2 iolog", f"{flat} add", f"{flat} open"]
    lines += [f"{flat} write {c * (64 << 10) + rng.randrange(16) * 4096} 4096" for c in clusters]
    lines.append(f"{flat} close")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def fio_replay(log_path: str, depth: int) -> list[str]:
    return [
        "fio",
        "--name=qd",
        "--ioengine=libaio",
        f"--iodepth={depth}",
        "--direct=1",
        f"--read_iolog={log_path}",
        "--replay_no_stall=1",
        "--output-format=json",
    ]


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def fio_with_cpu(args: list[str], pid: int) -> tuple[float, float]:
    """Run a fio job; its IOPS (reads and writes) and the server's CPU time per request
    (µs): the server's utime+stime over the run divided by fio's request count."""
    before = cpu_ticks(pid)
    start = time.perf_counter()
    out = run(args)
    wall = time.perf_counter() - start
    ticks = cpu_ticks(pid) - before
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench: {' '.join(args)}: fio error {job['error']}")
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    if not ios:
        sys.exit(f"bench: {' '.join(args)}: fio did no I/O")
    iops = job["read"]["iops"] + job["write"]["iops"]
    if not job["read"]["runtime"] and not job["write"]["runtime"]:
        iops = ios / wall  # (a replay too short for fio's own figure)
    cpu_us = ticks / os.sysconf("SC_CLK_TCK") / ios * 1e6
    return iops, cpu_us


# (label, rw, bs, engine, depth, jobs)
QdJob = tuple[str, str, str, str, int, int]
QD_READS: list[QdJob] = [
    *[
        (f"4 KiB random read, libaio QD{d}", "randread", "4k", "libaio", d, 1)
        for d in (1, 4, 16, 32)
    ],
    *[
        (
            f"4 KiB random read, psync, {j} job{'s' if j > 1 else ''}",
            "randread",
            "4k",
            "psync",
            1,
            j,
        )
        for j in (1, 2, 4)
    ],
    *[(f"64 KiB random read, libaio QD{d}", "randread", "64k", "libaio", d, 1) for d in (1, 16)],
]
QD_OVERWRITES: list[QdJob] = [
    (
        f"4 KiB random overwrite of allocated clusters, libaio QD{d}",
        "randwrite",
        "4k",
        "libaio",
        d,
        1,
    )
    for d in (1, 16)
]
QD_FRESH_DEPTHS = (1, 16)  # the fresh-overlay writes: one replay per depth
QD_ROWS = frozenset({"reads", "writes"})  # the groups of rows (``--qd-rows``)


@dataclass
class QdResults:
    """label -> (chainfs runs, qemu runs), each run (IOPS, CPU µs per request)."""

    rows: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = field(
        default_factory=dict
    )
    commands: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, side: str, figures: tuple[float, float]) -> None:
        pair = self.rows.setdefault(label, ([], []))
        (pair[0] if side == "chainfs" else pair[1]).append(figures)
        log(f"    {side}: {label}: {figures[0]:.0f} IOPS, {figures[1]:.1f} us CPU/request")


def qd_bench(
    seed_dir: str, size: int, runs: int, runtime: int, rows: frozenset[str] = QD_ROWS
) -> QdResults:
    """The ``qd`` measure: reads on the seed chain (read-only for both), writes on a fresh
    copy with an empty overlay F (chainfs: ``snapshot``; QEMU: a ``qemu-img create``
    overlay exported writable), the servers taking turns in every run; ``rows``: which
    of the two groups (``reads``, ``writes``)."""
    work = os.path.join(WORK, "qd")
    os.makedirs(work)
    mp = os.path.join(work, "mnt")
    export = os.path.join(work, "export.img")
    clog = os.path.join(work, "chainfs.log")
    qlog = os.path.join(work, "qemu-storage-daemon.log")
    r = QdResults()

    def note(key: str, args: list[str]) -> None:
        r.commands.setdefault(key, shell_words(args))

    for i in range(runs):
        for side in ("chainfs", "qemu") if "reads" in rows else ():
            log(f"(qd) run {i + 1}: reads, {side}")
            server, path = read_only_server(side, seed_dir, mp, export, clog, qlog)
            with server:
                note(f"{server.name}: export for reads", server.args)
                assert server.proc is not None
                for label, rw, bs, engine, depth, jobs in QD_READS:
                    args = fio_qd(path, size, runtime, rw, bs, engine, depth, jobs)
                    note(label, args)
                    r.add(label, side, fio_with_cpu(args, server.proc.pid))
        for side in ("chainfs", "qemu") if "writes" in rows else ():
            log(f"(qd) run {i + 1}: writes into a fresh overlay, {side}")
            src = copy_chain(seed_dir, os.path.join(work, f"write-{side}-{i}"))
            if side == "chainfs":
                server = chainfs_server(src, mp, clog, readonly=False)
                path = os.path.join(mp, "E.img")
            else:
                overlay = [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "E.qcow2",
                    "-F",
                    "qcow2",
                ]
                run([*overlay, os.path.join(src, "F.qcow2")])
                note("qemu-storage-daemon: overlay for writes", [*overlay, "F.qcow2"])
                server = QemuServer(src, export, qlog, export="F", writable=True)
                path = export
            with server:
                assert server.proc is not None
                if side == "chainfs":
                    with open(os.path.join(mp, "control", "E", "snapshot"), "w") as f:
                        f.write("F.qcow2\n")
                then = " (then `echo F.qcow2 > control/E/snapshot`)" if side == "chainfs" else ""
                note(f"{server.name}: export for writes{then}", server.args)
                # the fresh-overlay replays: each on its own half of the disk
                half = size // len(QD_FRESH_DEPTHS)
                for k, depth in enumerate(QD_FRESH_DEPTHS):
                    label = f"4 KiB random write into a fresh overlay, libaio QD{depth}"
                    replay = fresh_write_log(
                        os.path.join(work, f"fresh-{k}.iolog"), path, k * half, (k + 1) * half
                    )
                    args = fio_replay(replay, depth)
                    note(label, args)
                    r.add(label, side, fio_with_cpu(args, server.proc.pid))
                for label, rw, bs, engine, depth, jobs in QD_OVERWRITES:  # F: all allocated
                    args = fio_qd(path, size, runtime, rw, bs, engine, depth, jobs)
                    note(label, args)
                    r.add(label, side, fio_with_cpu(args, server.proc.pid))
            run(["qemu-img", "check", "-q", os.path.join(src, "F.qcow2")])
            shutil.rmtree(src)
    return r


def qd_rows(r: QdResults) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for label, (c_runs, q_runs) in r.rows.items():
        if not c_runs or not q_runs:
            continue
        c, q = max(c_runs), max(q_runs)  # the best run's IOPS, with its CPU per request
        ratio = c[0] / q[0]
        rows.append(
            (
                label,
                f"{c[0]:.0f}",
                f"{q[0]:.0f}",
                f"{ratio:.2f}",
                f"{c[1]:.1f}",
                f"{q[1]:.1f}",
                fmt_ok(ratio >= FUSE_TARGET),
            )
        )
    return rows


QD_HEADER = (
    "fio, direct=1 (IOPS)",
    "chainfs",
    "qemu-storage-daemon",
    "ratio",
    "chainfs CPU us/req",
    "qsd CPU us/req",
    ">= 1.0",
)


# --- the report --------------------------------------------------------------------------


def fmt_ok(ok: bool) -> str:
    return "yes" if ok else "NO"


Row = tuple[str, str, str, str, str, str]


def print_table(
    title: str,
    rows: list[Row] | list[tuple[str, ...]],
    header: tuple[str, ...] = ("measure", "chainfs", "reference", "ratio", "target", "met"),
) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(title)
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@dataclass
class EngineResults:
    rows: list[Row]
    wrong: list[str]


def engine_bench(seed: str, size: int, runs: int) -> EngineResults:
    log("(a) sequential read, 1 MiB requests: chainfs engine")
    engine_seq = best_of(runs, lambda: engine_sequential_seconds(seed))
    log("(a) sequential read, 1 MiB requests: qemu-img bench")
    qemu_seq = best_of(runs, lambda: qemu_sequential_seconds(seed, size))
    engine_mibs = size / MiB / engine_seq
    qemu_mibs = size / MiB / qemu_seq
    seq_ratio = engine_mibs / qemu_mibs

    log("building the depth-1 chain (qemu-img convert -O qcow2 of the seed chain)")
    flat = os.path.join(WORK, "depth1.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", seed, flat])
    log(f"building the depth-64 chain in {WORK}/deep")
    deep = make_seed_chain(os.path.join(WORK, "deep"), size, depth=64)
    offsets = random_offsets(size)
    log(f"(b) {RANDOM_COUNT} random 4 KiB reads: depth 1")
    r1 = random_bench(flat, offsets, runs)
    log(f"(b) {RANDOM_COUNT} random 4 KiB reads: depth 64")
    r64 = random_bench(deep, offsets, runs)
    depth_ratio = r64.seconds / r1.seconds
    own_rss = peak_rss_mib()

    log("building the 1 TiB sparse chain")
    tera = build_tera_chain(os.path.join(WORK, "tera"))
    log(f"{RANDOM_COUNT} random 4 KiB reads on the 1 TiB chain (child process)")
    out = run([sys.executable, os.path.abspath(__file__), "--tera-child", tera])
    tera_result = json.loads(out.strip().splitlines()[-1])

    rows: list[Row] = [
        (
            "sequential read, 1 MiB requests (MiB/s)",
            f"{engine_mibs:.0f}",
            f"{qemu_mibs:.0f} (qemu-img bench)",
            f"{seq_ratio:.2f}",
            f">= {SEQ_TARGET}",
            fmt_ok(seq_ratio >= SEQ_TARGET),
        ),
        (
            f"{RANDOM_COUNT} random 4 KiB reads, depth 64 (s)",
            f"{r64.seconds:.3f}",
            f"{r1.seconds:.3f} (depth 1)",
            f"{depth_ratio:.2f}",
            f"<= {DEPTH_TARGET}",
            fmt_ok(depth_ratio <= DEPTH_TARGET),
        ),
        ("peak RSS of the runs above (MiB)", f"{own_rss:.0f}", "", "", "", ""),
        (
            f"1 TiB sparse chain: peak RSS, {RANDOM_COUNT} random 4 KiB reads (MiB)",
            f"{tera_result['rss_mib']:.0f}",
            f"reads took {tera_result['seconds']:.3f} s",
            "",
            f"< {RSS_TARGET_MIB}",
            fmt_ok(tera_result["rss_mib"] < RSS_TARGET_MIB),
        ),
    ]
    wrong = [
        name
        for name, ok in (
            ("depth-1 random reads", r1.correct),
            ("depth-64 random reads", r64.correct),
            ("1 TiB chain reads", tera_result["correct"]),
        )
        if not ok
    ]
    return EngineResults(rows, wrong)


def fuse_rows(r: FuseResults) -> list[Row]:
    def row(measure: str, pair: Pair, fmt: str, *, target: bool = True) -> Row:
        if not pair.chainfs or not pair.qemu:
            return (measure, "-", "-", "", "", "")
        ratio = pair.ratio
        return (
            measure,
            format(pair.best(pair.chainfs), fmt),
            format(pair.best(pair.qemu), fmt),
            f"{ratio:.2f}",
            f">= {FUSE_TARGET}" if target else "",
            fmt_ok(ratio >= FUSE_TARGET) if target else "",
        )

    mb = 1e6

    def scaled(pair: Pair) -> Pair:
        return Pair([x / mb for x in pair.chainfs], [x / mb for x in pair.qemu])

    cold = "first read after mount" + ("" if r.dropped else ", page cache NOT dropped")
    return [
        row(f"sequential read, 1 MiB, {cold} (MB/s)", scaled(r.seq_read), ".0f"),
        row(
            "second sequential read, same mount, cache kept (MB/s)",
            scaled(r.reread),
            ".0f",
            target=False,
        ),
        row("4 KiB random read, QD1, direct=1 (IOPS)", r.rand_iops, ".0f"),
        row("sequential write into a fresh overlay, 1 MiB (MB/s)", scaled(r.seq_write), ".0f"),
        row("stream base=A (s; ratio = QEMU time / chainfs time)", r.stream, ".3f"),
        row("peak RSS of the server (MiB; ratio = QEMU / chainfs)", r.rss, ".0f", target=False),
        row("16 GiB chain, 1 GiB data: cp --sparse=always (s)", r.holes.cp, ".2f"),
        row("16 GiB chain, 1 GiB data: qemu-img convert -O qcow2 (s)", r.holes.convert, ".2f"),
        row("fstrim, ext4 with 1 GiB deleted (s)", r.holes.fstrim, ".2f", target=False),
    ]


BITMAP_DISK = 256 * MiB  # the disk of the bitmap measures, metadata preallocated


def fio_rand_write(path: str, size: int, runtime: int) -> list[str]:
    return [
        *FIO,
        f"--filename={path}",
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        f"--size={size}",
        f"--runtime={runtime}",
        "--time_based",
        f"--randseed={RANDOM_SEED}",
    ]


def bitmap_image(directory: str, bitmaps: int, *, saturated: bool) -> str:
    """A fresh ``bm.qcow2`` of ``BITMAP_DISK`` bytes, every cluster allocated and written
    (so 4 KiB writes go in place: chainfs's costliest bitmap case, a flush before the
    data for each granule a write dirties first), with ``bitmaps`` enabled bitmaps of the
    default granularity (64 KiB): added after QEMU wrote the disk (empty), or, when
    ``saturated``, before (every bit set: no write sets a new one)."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    path = os.path.join(directory, "bm.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path,
         str(BITMAP_DISK)])  # fmt: skip
    for step in ("bitmaps", "write") if saturated else ("write", "bitmaps"):
        if step == "write":
            run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {BITMAP_DISK}", path])
        else:
            for i in range(bitmaps):
                run(["qemu-img", "bitmap", "--add", path, f"b{i}"])
    return path


def bitmaps_bench(runtime: int, runs: int) -> list[Row]:
    """4 KiB random write IOPS (QD1, direct=1) through the flat file of one layer with
    0, 1 and 4 enabled bitmaps, and 1 bitmap already all dirty, against
    qemu-storage-daemon's writable FUSE export of the same image (QEMU keeps the
    bitmaps in memory and writes them at close; chainfs keeps them crash-consistent on
    disk, so the difference between the fresh and the all-dirty bitmap is the cost of
    that guarantee)."""
    directory = os.path.join(WORK, "bitmaps")
    rows: list[Row] = []
    cases = [(0, False), (1, False), (4, False), (1, True), (4, True)]
    for count, saturated in cases:
        pair = Pair([], [])
        for _ in range(runs):
            for side in ("chainfs", "qemu"):
                image = bitmap_image(os.path.join(directory, "img"), count, saturated=saturated)
                log_path = os.path.join(WORK, f"bitmaps-{side}.log")
                if side == "chainfs":
                    mnt = os.path.join(directory, "mnt")
                    server: Server = chainfs_server(
                        os.path.dirname(image), mnt, log_path, readonly=False
                    )
                    flat = os.path.join(mnt, "bm.img")
                else:
                    flat = os.path.join(directory, "export.img")
                    server = QemuServer(
                        os.path.dirname(image), flat, log_path, export="bm", writable=True,
                        layers=("bm",),
                    )  # fmt: skip
                with server:
                    result = fio(fio_rand_write(flat, BITMAP_DISK, runtime))
                (pair.chainfs if side == "chainfs" else pair.qemu).append(result["write_iops"])
                check = subprocess.run(["qemu-img", "check", "-q", image], check=False)
                if check.returncode not in (0, 3):
                    sys.exit(f"bench: qemu-img check of {image} after {side} failed")
                info = json.loads(run(["qemu-img", "info", "--output=json", image]))
                got = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
                if len(got) != count or any("in-use" in b["flags"] for b in got):
                    sys.exit(f"bench: bitmaps of {image} after {side}: {got}")
        what = f"{count} enabled bitmap{'s' if count != 1 else ''}"
        what += ", all bits set already" if saturated else ""
        ratio = pair.ratio
        rows.append(
            (
                f"4 KiB random write, QD1, direct=1, {what} (IOPS)",
                format(pair.best(pair.chainfs), ".0f"),
                format(pair.best(pair.qemu), ".0f"),
                f"{ratio:.2f}",
                "",
                "",
            )
        )
    return rows


VIEWS_DEPTH = 1000
VIEWS_SHALLOW = 5
VIEWS_TARGET = 2.0  # per-entry time at 1,000 layers / at 5, at most


def build_flat_chain(directory: str, depth: int, size: int = 64 * MiB) -> str:
    """``depth`` empty qcow2 layers, each backed by the one below: L0000 ... (active last)."""
    os.makedirs(directory)
    names = [f"L{i:04d}.qcow2" for i in range(depth)]
    for i, name in enumerate(names):
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if i:
            args += ["-u", "-b", names[i - 1], "-F", "qcow2"]  # -u: not opening the chain
        subprocess.run([*args, name, str(size)], cwd=directory, check=True)
    return os.path.join(directory, names[-1])


def list_and_stat(directory: str) -> tuple[float, int]:
    """``ls -l`` of a directory: its listing, then a stat of every entry."""
    t = time.perf_counter()
    names = os.listdir(directory)
    for name in names:
        os.stat(os.path.join(directory, name))
    return time.perf_counter() - t, len(names)


VIEWS_READ_TARGET = 0.8  # view / flat file throughput, at least


def direct_read_seconds(path: str) -> float:
    """Read a whole file with O_DIRECT in 1 MiB requests."""
    import mmap

    buf = mmap.mmap(-1, MiB)  # page aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        t = time.perf_counter()
        pos = 0
        while n := os.preadv(fd, [buf], pos):
            pos += n
        return time.perf_counter() - t
    finally:
        os.close(fd)
        buf.close()


def views_read_rows(size: int, runs: int) -> list[Row]:
    log(f"views: building the seed chain ({size >> 20} MiB)")
    seed = make_seed_chain(os.path.join(WORK, "views-seed"), size)
    d = os.path.dirname(seed)
    d4 = os.path.join(WORK, "views-seed-d")
    os.makedirs(d4)
    for name in ("A", "B", "C", "D"):
        shutil.copyfile(os.path.join(d, f"{name}.qcow2"), os.path.join(d4, f"{name}.qcow2"))
    mnt, mnt4 = os.path.join(WORK, "views-seed-mnt"), os.path.join(WORK, "views-seed-d-mnt")
    times: dict[str, float] = {}
    with (
        chainfs_server(d, mnt, os.path.join(WORK, "views-seed.log"), readonly=True),
        chainfs_server(d4, mnt4, os.path.join(WORK, "views-seed-d.log"), readonly=True),
    ):
        flat, view = os.path.join(mnt4, "D.img"), os.path.join(mnt, "layers/E/D.qcow2.img")
        with open(flat, "rb") as f, open(view, "rb") as g:
            if f.read() != g.read():
                sys.exit("bench: the view of D and the flat file of D differ")
        for _ in range(runs):  # taking turns
            for name, path in (("flat", flat), ("view", view)):
                t = direct_read_seconds(path)
                times[name] = min(times.get(name, t), t)
    log(f"    flat {times['flat']:.3f} s, view {times['view']:.3f} s")
    flat_mibs, view_mibs = size / MiB / times["flat"], size / MiB / times["view"]
    ratio = view_mibs / flat_mibs
    return [
        (
            "O_DIRECT 1 MiB sequential read: view of D vs flat file of D",
            f"{view_mibs:.0f} MiB/s",
            f"{flat_mibs:.0f} MiB/s",
            f"{ratio:.2f}",
            f">= {VIEWS_READ_TARGET}",
            fmt_ok(ratio >= VIEWS_READ_TARGET),
        )
    ]


def views_bench(size: int, runs: int) -> list[Row]:
    per_entry: dict[int, tuple[float, float]] = {}
    for depth in (VIEWS_SHALLOW, VIEWS_DEPTH):
        d = os.path.join(WORK, f"views-{depth}")
        log(f"views: building a chain of {depth} layers (qemu-img create -b)")
        active = build_flat_chain(d, depth)
        chain = os.path.basename(active).removesuffix(".qcow2")
        mnt = os.path.join(WORK, f"views-{depth}-mnt")
        with chainfs_server(d, mnt, os.path.join(WORK, f"views-{depth}.log"), readonly=False):
            vdir = os.path.join(mnt, "layers", chain)
            cold, n = list_and_stat(vdir)
            if n != depth:
                sys.exit(f"bench: layers/{chain} lists {n} views, not {depth}")
            warm = best_of(runs, lambda: list_and_stat(vdir)[0])  # noqa: B023
        per_entry[depth] = (cold / depth, warm / depth)
        log(f"    {depth} layers: cold {cold * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms")
    rows: list[Row] = []
    for i, what in enumerate(("cold", "warm")):
        deep, shallow = per_entry[VIEWS_DEPTH][i], per_entry[VIEWS_SHALLOW][i]
        ratio = deep / shallow
        rows.append(
            (
                f"ls -l layers/CHAIN per entry ({what}), {VIEWS_DEPTH} vs {VIEWS_SHALLOW} layers",
                f"{deep * 1e6:.0f} us",
                f"{shallow * 1e6:.0f} us",
                f"{ratio:.2f}",
                f"<= {VIEWS_TARGET}",
                fmt_ok(ratio <= VIEWS_TARGET),
            )
        )
        rows.append(
            (
                f"ls -l of all {VIEWS_DEPTH} views ({what})",
                f"{deep * VIEWS_DEPTH * 1e3:.1f} ms",
                "-",
                "-",
                "-",
                "-",
            )
        )
    return rows + views_read_rows(size, runs)


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--size", type=int, default=GiB, help="virtual size of the seed chains in bytes (1 GiB)"
    )
    ap.add_argument("--runs", type=int, default=2, help="runs per measure, best taken (2)")
    ap.add_argument(
        "--parts",
        default="engine,fuse",
        help="comma-separated: engine (no FUSE), fuse (chainfs vs qemu-storage-daemon);"
        " jobs is scripts/bench_jobs.py's; bitmaps alone: write IOPS with dirty bitmaps;"
        " views (listing 1,000 layer views) runs alone",
    )
    ap.add_argument(
        "--rand-runtime",
        type=int,
        default=RAND_RUNTIME,
        help=f"seconds of each random-read measure through FUSE ({RAND_RUNTIME})",
    )
    ap.add_argument(
        "--measures",
        default="read,write,stream,holes,trim,qd",
        help="comma-separated FUSE measures: read (sequential and random), write, stream,"
        " holes (sparse copies of a 16 GiB chain), trim (fstrim through a loop device),"
        " qd (queue depth: libaio and psync jobs, IOPS and the servers' CPU per request)",
    )
    ap.add_argument(
        "--qd-runtime",
        type=int,
        default=QD_RUNTIME,
        help=f"seconds of each time-based queue-depth measure ({QD_RUNTIME})",
    )
    ap.add_argument(
        "--qd-rows",
        default="reads,writes",
        help="comma-separated groups of queue-depth rows: reads (the seed chain),"
        " writes (into a fresh overlay, then overwrites)",
    )
    ap.add_argument("--tera-child", metavar="IMAGE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tera_child:
        return tera_child(args.tera_child)
    size: int = args.size
    runs: int = args.runs
    parts = set(args.parts.split(","))
    if not parts or parts - {"engine", "fuse", "jobs", "bitmaps", "views"}:
        ap.error(f"--parts: unknown part in {args.parts!r}")
    if parts == {"views"}:
        shutil.rmtree(WORK, ignore_errors=True)
        os.makedirs(WORK)
        print_table(f"layer views: best of {runs} runs", views_bench(size, runs))
        print(f"\nload average: {load()} (2 cores: other work skews)")
        return 0
    if parts == {"bitmaps"}:
        shutil.rmtree(WORK, ignore_errors=True)
        os.makedirs(WORK)
        load_before = load()
        rows = bitmaps_bench(args.rand_runtime, runs)
        print_table(
            f"persistent dirty bitmaps: chainfs against qemu-storage-daemon, one qcow2 layer"
            f" of {BITMAP_DISK >> 20} MiB, clusters preallocated, best of {runs} runs",
            rows,
        )
        print(f"\nload average before: {load_before}; after: {load()} (2 cores: other work skews)")
        return 0
    if not parts & {"engine", "fuse"}:
        return 0  # jobs only: scripts/bench_jobs.py's part
    measures = set(args.measures.split(","))
    if not measures or measures - {"read", "write", "stream", "holes", "trim", "qd"}:
        ap.error(f"--measures: unknown measure in {args.measures!r}")
    qd_groups = frozenset(args.qd_rows.split(","))
    if not qd_groups or qd_groups - QD_ROWS:
        ap.error(f"--qd-rows: unknown group in {args.qd_rows!r}")
    missing = [t for t in ("fio", "qemu-storage-daemon", "fusermount3") if not shutil.which(t)]
    if "fuse" in parts and missing:
        sys.exit(f"bench: the FUSE part needs {', '.join(missing)}")

    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    load_before = load()

    log(f"building the seed chain ({size >> 20} MiB) in {WORK}/seed")
    seed = make_seed_chain(os.path.join(WORK, "seed"), size)

    engine = engine_bench(seed, size, runs) if "engine" in parts else None
    fuse = (
        fuse_bench(os.path.dirname(seed), size, runs, args.rand_runtime, measures)
        if "fuse" in parts and measures - {"qd"}
        else None
    )
    qd = (
        qd_bench(os.path.dirname(seed), size, runs, args.qd_runtime, qd_groups)
        if "fuse" in parts and "qd" in measures
        else None
    )

    status = 0
    if engine is not None:
        print_table(
            f"chainfs engine benchmark: seed chains of {size >> 20} MiB, best of {runs} runs",
            engine.rows,
        )
        if engine.wrong:
            print(f"\nWRONG BYTES (differ from qemu-img convert): {', '.join(engine.wrong)}")
            status = 1
        else:
            print("\nall bytes read matched qemu-img convert / the data written by qemu-io")
    if fuse is not None:
        print_table(
            f"through FUSE: chainfs against qemu-storage-daemon, seed chain of {size >> 20} MiB"
            f" (five layers), best of {runs} runs",
            fuse_rows(fuse),
        )
        if fuse.streams_equal:
            print("\nafter the streams, qemu-img compare found both chains' disks identical")
        else:
            print("\nSTREAM RESULTS DIFFER (qemu-img compare of the two streamed chains)")
            status = 1
        if fuse.holes.copies or fuse.holes.freed:
            sizes = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in fuse.holes.copies.items())
            freed = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in fuse.holes.freed.items())
            print(f"\nallocated size of the copies: {sizes or '-'}")
            print(f"space fstrim gave back in the image: {freed or '-'}")
            if not fuse.holes.equal:
                print("COPIES DIFFER from the chain (qemu-img compare)")
                status = 1
        print("\ncommands used:")
        for text in fuse.commands:
            print(f"  {text}")
    if qd is not None:
        print_table(
            f"queue depth: chainfs against qemu-storage-daemon, seed chain of {size >> 20} MiB"
            f" (five layers), best of {runs} runs; CPU = the server's utime+stime over the"
            " run / requests",
            qd_rows(qd),
            QD_HEADER,
        )
        print("\ncommands used (queue depth):")
        for key, text in qd.commands.items():
            print(f"  {key}:\n    {text}")
    print(f"\nload average before: {load_before}; after: {load()} (2 cores: other work skews)")
    return status


if __name__ == "__main__":
    sys.exit(main())
