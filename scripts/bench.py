"""Benchmarks of chainfs's engine against QEMU, run by ``scripts/bench``.

It builds its images in ``./bench-work`` (removed at the start of every run; nothing else
is touched) and measures, through ``chainfs.chain.Chain`` directly (no FUSE):

- sequential read of the whole disk of the 1 GiB seed chain in 1 MiB requests, beside
  ``qemu-img bench`` reading the same active image in 1 MiB requests (best of two each);
- 10,000 random 4 KiB reads (fixed seed, 4 KiB-aligned, over the whole disk) on a depth-1
  chain and on a depth-64 chain, timed from after ``Chain.open`` (best of two each), with
  the bytes read checked against ``qemu-img convert -O raw`` of the same chain;
- the peak RSS of this process, and of a child that opens a 1 TiB sparse chain (a few
  writes spread over the base, an overlay with a few more) and does 10,000 random 4 KiB
  reads there.

It prints a table with the targets.  The figures are a report, not a test: the exit status
is non-zero only when something fails to run or reads wrong bytes.
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
from dataclasses import dataclass

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


# --- the report --------------------------------------------------------------------------


def fmt_ok(ok: bool) -> str:
    return "yes" if ok else "NO"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--size", type=int, default=GiB, help="virtual size of the seed chains in bytes (1 GiB)"
    )
    ap.add_argument("--runs", type=int, default=2, help="runs per timing, best taken (2)")
    ap.add_argument("--tera-child", metavar="IMAGE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tera_child:
        return tera_child(args.tera_child)
    size: int = args.size
    runs: int = args.runs

    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)

    log(f"building the seed chain ({size >> 20} MiB) in {WORK}/seed")
    seed = make_seed_chain(os.path.join(WORK, "seed"), size)

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

    rows = [
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
    header = ("measure", "chainfs", "reference", "ratio", "target", "met")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(f"chainfs engine benchmark: seed chains of {size >> 20} MiB, best of {runs} runs")
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    wrong = [
        name
        for name, ok in (
            ("depth-1 random reads", r1.correct),
            ("depth-64 random reads", r64.correct),
            ("1 TiB chain reads", tera_result["correct"]),
        )
        if not ok
    ]
    if wrong:
        print(f"\nWRONG BYTES (differ from qemu-img convert): {', '.join(wrong)}")
        return 1
    print("\nall bytes read matched qemu-img convert / the data written by qemu-io")
    return 0


if __name__ == "__main__":
    sys.exit(main())
