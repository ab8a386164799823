"""The scale benchmark of chainfs: many chains in one mount, deep chains, huge disks.

It builds its images in ``./bench-work-scale`` (removed at the start of every run;
nothing else is touched) and serves them with ``chainfs mount -f`` (a subprocess, one
mount at a time), as ``scripts/bench.py`` does (its server, wait and report helpers are
imported, not copied).

- chains (``--chains``, default 1,100,1000,10000): a directory of N chains of two small
  layers each (a 64 MiB qcow2 base and an empty overlay; ``--chain-layers 1``: the base
  alone), made from two templates written sparsely (the overlay's backing name patched
  in place, same length), not by N ``qemu-img create``; the first chain's base holds
  16 MiB of data (qemu-io).  ``--ro`` mounts them read-only (``-o ro``: a chain then
  keeps one descriptor a layer, none for owner, state, journal and events files).  Measured:
  the mount time (start of ``chainfs mount -f`` until the mountpoint answers), the
  server's RSS after the mount, ``stat`` of flat files never looked up before (or whose
  kernel attributes expired: rounds 1.1 s apart when there are few), median and p99,
  ``ls -l`` of the root (one listing, a stat per entry; after the attributes expired),
  and a guest's 4 KiB O_DIRECT random reads of the first disk's data: their p99 idle,
  while a second process stats every other flat file in a loop (the sweep), and while a
  third one reads ``control/.status`` in a loop (its read time reported too); then the
  server's peak RSS (VmHWM).
- depth (``--depths``, default 1,64,1000): a chain of that many layers, 16 MiB of data in
  its base, the others empty; the first 4 KiB O_DIRECT read after the mount and the
  median of 2,000 random 4 KiB O_DIRECT reads of the base's data (steady).
- size (``--sizes``, default 1G,16T,1P, times ``--layers``, default 1,64): a chain of that
  virtual size and layer count (one 4 KiB write near the start and one near the end of
  the base); the server's RSS after the mount and its peak after 200 random 4 KiB reads
  over the whole disk.

Targets (issue #20's done-when), printed beside each figure: 10,000 chains mount in
<= 30 s; stat p99 <= 2 ms at 10,000 chains; ``ls -l`` of 10,000 disks <= 5 s; a disk's
read p99 during the sweep <= 3x its idle p99; RSS <= 100 MiB + 64 KiB per chain; depth
1000 steady reads within 1.2x depth 1; a 16 TiB disk on 64 layers <= 100 MiB + the cache
budget.  The figures are a report, not a test: the exit status is non-zero only when
something fails to run or reads wrong bytes.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the sibling script's server, its wait and the helpers around them
import bench
from bench import (
    GiB,
    MiB,
    Server,
    TiB,
    chainfs_server,
    load,
    log,
    run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench-work-scale")

PiB = 1 << 50
Row = tuple[str, str, str, str, str]  # measure, figure, target, met, notes
CHAIN_SIZE = 64 * MiB  # each chain's disk in the chains part
DATA = 16 * MiB  # data in the first chain's base (the guest reads it)
PIECE = 4096
STAT_SAMPLES = 2000  # flat files stat'ed at most (distinct names)
STAT_ROUNDS = 10  # rounds over few files, 1.1 s apart (kernel attributes expire at 1 s)
READ_SECONDS = 5.0  # each phase of the guest's reads
DEPTH_READS = 2000
SIZE_READS = 200

MOUNT_TARGET = 30.0  # s, 10,000 chains
STAT_P99_TARGET = 2.0  # ms, 10,000 chains
LS_TARGET = 5.0  # s, 10,000 chains
SWEEP_TARGET = 3.0  # read p99 during the sweep / idle, at most
RSS_BASE_MIB = 100.0
RSS_PER_CHAIN_MIB = 64 / 1024
DEPTH_TARGET = 1.2  # depth 1000 / depth 1 steady read, at most


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(server: Server) -> float:
    assert server.proc is not None
    return vm_kib(server.proc.pid, "VmRSS") / 1024


def hwm_mib(server: Server) -> float:
    assert server.proc is not None
    return vm_kib(server.proc.pid, "VmHWM") / 1024


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


# --- building images ---------------------------------------------------------------------


class Template:
    """An image file as its non-zero 4 KiB blocks and its size: copies are written
    sparse (a few blocks each), the backing name patched in place."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        self.size = len(data)
        self.blocks = [
            (i, data[i : i + PIECE]) for i in range(0, len(data), PIECE) if any(data[i : i + PIECE])
        ]

    def write(self, path: str, old: bytes = b"", new: bytes = b"") -> None:
        assert len(old) == len(new)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, self.size)
            for off, block in self.blocks:
                os.pwrite(fd, block.replace(old, new) if old else block, off)
        finally:
            os.close(fd)


def chain_name(i: int) -> str:
    return f"c{i:07d}"


def build_chains(directory: str, n: int, layers: int = 2) -> None:
    """``n`` chains ``cNNNNNNN`` = ``cNNNNNNN-base.qcow2 <- cNNNNNNN.qcow2`` (one layer:
    ``cNNNNNNN.qcow2`` alone)."""
    os.makedirs(directory)
    scratch = os.path.join(directory, ".templates")
    os.makedirs(scratch)
    base_t = os.path.join(scratch, "base.qcow2")
    top_t = os.path.join(scratch, "top.qcow2")
    first = chain_name(0)
    run(["qemu-img", "create", "-q", "-f", "qcow2", base_t, str(CHAIN_SIZE)])
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f"{first}-base.qcow2"]
        + ["-F", "qcow2", top_t, str(CHAIN_SIZE)]
    )
    base, top = Template(base_t), Template(top_t)
    shutil.rmtree(scratch)
    old = f"{first}-base.qcow2".encode()
    for i in range(n):
        name = chain_name(i)
        if layers == 1:
            base.write(os.path.join(directory, f"{name}.qcow2"))
            continue
        base.write(os.path.join(directory, f"{name}-base.qcow2"))
        top.write(os.path.join(directory, f"{name}.qcow2"), old, f"{name}-base.qcow2".encode())
    first_base = os.path.join(directory, f"{first}{'-base' if layers > 1 else ''}.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DATA}", first_base])
    os.sync()


def build_deep(directory: str, depth: int, size: int, *, data: int = DATA) -> str:
    """A chain of ``depth`` layers L0000 <- ... (active last), ``data`` bytes written in
    the base (0: a 4 KiB write near the start and one near the end)."""
    os.makedirs(directory)
    names = [f"L{i:04d}.qcow2" for i in range(depth)]
    run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(directory, names[0]), str(size)])
    writes = (
        [f"write -P 0x5a 0 {data}"]
        if data
        else ["write -P 0x5a 0 4k", f"write -P 0x5b {size - 8192} 4k"]
    )
    for w in writes:
        run(["qemu-io", "-f", "qcow2", "-c", w, os.path.join(directory, names[0])])

    def create(i: int) -> None:
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", names[i - 1], "-F", "qcow2"]
            + [os.path.join(directory, names[i]), str(size)]
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(create, range(1, depth)))
    os.sync()
    return names[-1]


# --- measuring ---------------------------------------------------------------------------


def mount(source: str, name: str, *, readonly: bool = False) -> tuple[Server, float]:
    mnt = os.path.join(WORK, f"mnt-{name}")
    os.makedirs(mnt, exist_ok=True)
    server = chainfs_server(source, mnt, os.path.join(WORK, f"{name}.log"), readonly=readonly)
    t = time.perf_counter()
    server.__enter__()
    os.stat(mnt)  # answered by the mount itself
    return server, time.perf_counter() - t


def unmount(server: Server) -> None:
    server.__exit__(None, None, None)


def stat_times(paths: list[str]) -> list[float]:
    """One stat of each path (distinct names: each one's first lookup reaches the server),
    in rounds 1.1 s apart when there are few."""
    rounds = 1 if len(paths) >= 1000 else STAT_ROUNDS
    out: list[float] = []
    for r in range(rounds):
        start = time.monotonic()
        for p in paths:
            t = time.perf_counter()
            os.stat(p)
            out.append(time.perf_counter() - t)
        if r + 1 < rounds:
            time.sleep(max(0.0, 1.1 - (time.monotonic() - start)))
    return out


def read_times(path: str, size: int, seconds: float, *, seed: int = 1) -> list[float]:
    """4 KiB O_DIRECT reads at random aligned offsets below ``size``, for ``seconds``
    (one at least)."""
    buf = mmap.mmap(-1, PIECE)
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out: list[float] = []
    try:
        end = time.monotonic() + seconds
        while not out or time.monotonic() < end:
            off = rng.randrange(size // PIECE) * PIECE
            t = time.perf_counter()
            n = os.preadv(fd, [buf], off)
            out.append(time.perf_counter() - t)
            if n != PIECE:
                sys.exit(f"bench_scale: short read of {path} at {off}: {n}")
    finally:
        os.close(fd)
        buf.close()
    return out


SWEEP = """
import os, sys, time
paths = sys.argv[1:]
while True:
    for p in paths:
        os.stat(p)
"""

STATUS_LOOP = """
import sys, time
path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
times = []
while time.monotonic() < end:
    t = time.perf_counter()
    with open(path, "rb") as f:
        f.read()
    times.append(time.perf_counter() - t)
times.sort()
print(len(times), times[len(times) // 2], times[-1], flush=True)
"""


def reads_beside(path: str, size: int, script: str, args: list[str]) -> tuple[list[float], str]:
    """The guest's reads while ``script`` runs in another process (stopped after)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(0.5)  # under way
        times = read_times(path, size, READ_SECONDS, seed=2)
    finally:
        if script is SWEEP:
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    return times, out.strip()


def chains_part(n: int, run_no: int, layers: int = 2, readonly: bool = False) -> list[Row]:
    directory = os.path.join(WORK, f"chains-{n}")
    if not os.path.isdir(directory):
        log(f"chains: building {n} chains of {layers} layers")
        t = time.perf_counter()
        build_chains(directory, n, layers)
        log(f"chains: built in {time.perf_counter() - t:.1f} s")
    log(f"chains: mounting {n} chains (run {run_no}{', read-only' if readonly else ''})")
    server, mount_s = mount(directory, f"chains-{n}", readonly=readonly)
    rows: list[Row] = []
    try:
        mnt = server.mountpoint
        rss = rss_mib(server)
        # the chains served (past the descriptor limit the rest are refused, EMFILE)
        with open(os.path.join(mnt, "control", ".status")) as f:
            served = {
                line.split()[0].removeprefix("chain=") for line in f if " status=served" in line
            }
        names = [x for x in (chain_name(i) for i in range(n)) if x in served]
        sample = names if n <= STAT_SAMPLES else random.Random(7).sample(names, STAT_SAMPLES)
        stats = stat_times([os.path.join(mnt, f"{x}.img") for x in sample])
        time.sleep(1.1)  # every attribute expired
        t = time.perf_counter()
        subprocess.run(["ls", "-l", mnt], stdout=subprocess.DEVNULL, check=True)
        ls_s = time.perf_counter() - t
        disk = os.path.join(mnt, f"{names[0]}.img")
        idle = read_times(disk, DATA, READ_SECONDS)
        # (one chain: the sweep stats the mountpoint)
        others = [os.path.join(mnt, f"{x}.img") for x in names[1:]] or [mnt]
        swept, _ = reads_beside(disk, DATA, SWEEP, others)
        status = os.path.join(mnt, "control", ".status")
        statused, status_out = reads_beside(
            disk, DATA, STATUS_LOOP, [status, str(READ_SECONDS + 0.5)]
        )
        peak = hwm_mib(server)
    finally:
        unmount(server)
    k = f"{n} chains" + (f" of {layers} layer" if layers == 1 else "") + (" ro" if readonly else "")
    if len(names) < n:
        k = f"{n} chains ({len(names)} served)"
    rss_target = RSS_BASE_MIB + RSS_PER_CHAIN_MIB * len(names)  # (the chains served)
    big = n >= 10_000
    idle_p99, swept_p99, st_p99 = p99(idle), p99(swept), p99(statused)
    cat = status_out.split()
    cat_s = (
        f"{len(statused)} reads; cat .status x{cat[0]}: "
        f"median {ms(float(cat[1]))}, max {ms(float(cat[2]))}"
        if len(cat) == 3
        else ""
    )
    rows += [
        (
            f"{k}: mount",
            f"{mount_s:.2f} s",
            "<= 30 s at 10,000",
            met(mount_s <= MOUNT_TARGET) if big else "-",
            "",
        ),
        (
            f"{k}: RSS after mount / peak",
            f"{rss:.0f} / {peak:.0f} MiB",
            f"<= {rss_target:.0f} MiB",
            met(peak <= rss_target),
            "",
        ),
        (
            f"{k}: stat median / p99",
            f"{ms(statistics.median(stats))} / {ms(p99(stats))}",
            "p99 <= 2 ms at 10,000",
            met(p99(stats) * 1000 <= STAT_P99_TARGET) if big else "-",
            f"{len(stats)} stats",
        ),
        (
            f"{k}: ls -l of the root",
            f"{ls_s:.2f} s",
            "<= 5 s at 10,000",
            met(ls_s <= LS_TARGET) if big else "-",
            "",
        ),
        (
            f"{k}: 4 KiB read p99 idle",
            ms(idle_p99),
            "",
            "",
            f"{len(idle)} reads, median {ms(statistics.median(idle))}",
        ),
        (
            f"{k}: 4 KiB read p99 during the stat sweep",
            f"{ms(swept_p99)} ({swept_p99 / idle_p99:.1f}x)",
            "<= 3x idle",
            met(swept_p99 <= SWEEP_TARGET * idle_p99),
            f"{len(swept)} reads, max {ms(max(swept))}",
        ),
        (
            f"{k}: 4 KiB read p99 during cat .status",
            f"{ms(st_p99)} ({st_p99 / idle_p99:.1f}x)",
            "<= 3x idle",
            met(st_p99 <= SWEEP_TARGET * idle_p99),
            cat_s,
        ),
    ]
    return rows


def depth_part(depth: int) -> tuple[list[Row], float]:
    directory = os.path.join(WORK, f"depth-{depth}")
    log(f"depth: building a chain of {depth} layers")
    build_deep(directory, depth, CHAIN_SIZE)
    server, _ = mount(directory, f"depth-{depth}")
    try:
        disk = os.path.join(server.mountpoint, f"L{depth - 1:04d}.img")
        first = read_times(disk, PIECE, 0.0)  # (0 s: exactly one read)
        buf = mmap.mmap(-1, PIECE)
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        rng = random.Random(3)
        times: list[float] = []
        try:
            for _ in range(DEPTH_READS):
                off = rng.randrange(DATA // PIECE) * PIECE
                t = time.perf_counter()
                os.preadv(fd, [buf], off)
                times.append(time.perf_counter() - t)
            if bytes(buf) != b"\x5a" * PIECE:
                sys.exit(f"bench_scale: depth {depth} read wrong bytes")
        finally:
            os.close(fd)
            buf.close()
    finally:
        unmount(server)
    steady = statistics.median(times)
    return [
        (f"depth {depth}: first read", ms(first[0]), "", "", ""),
        (f"depth {depth}: steady read (median)", ms(steady), "", "", f"p99 {ms(p99(times))}"),
    ], steady


def size_part(size: int, layers: int, label: str) -> list[Row]:
    directory = os.path.join(WORK, f"size-{label}-{layers}")
    log(f"size: building a {label} chain of {layers} layers")
    build_deep(directory, layers, size, data=0)
    server, _ = mount(directory, f"size-{label}-{layers}")
    try:
        rss = rss_mib(server)
        disk = os.path.join(server.mountpoint, f"L{layers - 1:04d}.img")
        buf = mmap.mmap(-1, PIECE)
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        rng = random.Random(4)
        try:
            for _ in range(SIZE_READS):
                os.preadv(fd, [buf], rng.randrange(size // PIECE) * PIECE)
            os.preadv(fd, [buf], size - 8192)
            if bytes(buf) != b"\x5b" * PIECE:
                sys.exit(f"bench_scale: {label} x {layers} read wrong bytes near the end")
        finally:
            os.close(fd)
            buf.close()
        peak = hwm_mib(server)
    finally:
        unmount(server)
    target = "<= 100 MiB + cache budget" if (label, layers) == ("16T", 64) else ""
    return [
        (
            f"{label} x {layers} layers: RSS after mount / peak",
            f"{rss:.0f} / {peak:.0f} MiB",
            target,
            "",
            f"after {SIZE_READS} random reads",
        )
    ]


SIZES = {"1G": GiB, "16T": 16 * TiB, "1P": PiB}


def table(title: str, rows: list[Row]) -> None:
    header = ("measure", "chainfs", "target", "met", "notes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}\n", flush=True)
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--chains", default="1,100,1000,10000", help="chain counts (1,100,1000,10000)")
    ap.add_argument("--runs", type=int, default=2, help="runs of the chains part (2)")
    ap.add_argument("--depths", default="1,64,1000", help="chain depths (1,64,1000)")
    ap.add_argument("--sizes", default="1G,16T,1P", help="disk sizes (1G,16T,1P)")
    ap.add_argument("--layers", default="1,64", help="layer counts for the sizes (1,64)")
    ap.add_argument("--parts", default="chains,depth,size", help="chains,depth,size")
    ap.add_argument(
        "--chain-layers", type=int, choices=(1, 2), default=2, help="layers a chain (2)"
    )
    ap.add_argument("--ro", action="store_true", help="mount the chains read-only (-o ro)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    # 10,000 chains take minutes to mount and 7 descriptors each (layers, events, owner,
    # state, journal): room for both, for this process's children (root may raise it)
    bench.SERVER_DEADLINE = 900.0
    want = 16 * max(int(x) for x in args.chains.split(",")) + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
        except (OSError, ValueError) as e:
            log(f"cannot raise RLIMIT_NOFILE to {want}: {e}")
    print(
        f"RLIMIT_NOFILE (soft, hard) for the servers: {resource.getrlimit(resource.RLIMIT_NOFILE)}"
    )
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    print(f"bench_scale {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"load average at start: {load()}")
    if "chains" in parts:
        for n in [int(x) for x in args.chains.split(",")]:
            for r in range(args.runs):
                rows = chains_part(n, r + 1, args.chain_layers, args.ro)
                table(f"chains: {n}, run {r + 1} (load average {load()})", rows)
            shutil.rmtree(os.path.join(WORK, f"chains-{n}"))
    if "depth" in parts:
        rows = []
        steady: dict[int, float] = {}
        for d in [int(x) for x in args.depths.split(",")]:
            got, steady[d] = depth_part(d)
            rows += got
        if 1 in steady and 1000 in steady:
            ratio = steady[1000] / steady[1]
            rows.append(
                (
                    "depth 1000 / depth 1 steady",
                    f"{ratio:.2f}x",
                    "<= 1.2x",
                    met(ratio <= DEPTH_TARGET),
                    "",
                )
            )
        table(f"depth (load average {load()})", rows)
    if "size" in parts:  # (a table each: a 1 PiB one may take long, see the README)
        for label in args.sizes.split(","):
            for layers in [int(x) for x in args.layers.split(",")]:
                rows = size_part(SIZES[label], layers, label)
                table(f"size {label} x {layers} (load average {load()})", rows)
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
