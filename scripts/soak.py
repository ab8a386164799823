"""The soak, run by ``scripts/soak``: ext4 on a loop device over a chainfs flat file, with
xfstests' ``fsstress`` writing into it while live block jobs run underneath, every round
checked through a fresh loop device; on any difference everything is kept.

One mode (``buffered`` or ``direct``: the loop device's ``--direct-io``) goes like this:

- a chain ``base.qcow2 <- disk.qcow2`` (``--size``, 1 GiB virtual by default) in
  ``WORK/MODE/images``, served by ``chainfs mount -f -o debug`` (the debug log, one line
  per request, is kept per round); a loop device over ``disk.img``, ``mkfs.ext4``, mounted;
- each **round**: fsstress (``-v`` op log, a seed of its own, ``-p`` processes, bounded
  ops, the ``zero`` op left out) runs in a new directory ``rNNNN`` while one **live step**
  goes through the control files: snapshot, stream (into the active layer or an
  intermediate one), commit (intermediate; active with the automatic pivot; active with
  ``wait=ready`` then ``complete``), copy ``sync=full``/``sync=top`` (automatic pivot, or
  ``wait=ready`` then ``complete``), or a job cancelled while it runs or waits in ready.
  Steps rotate so that every kind comes round; a round counts once its step has ended
  (as the step expects: completed, or cancelled) while fsstress was still running.  A
  copy or active commit that has not reached ready, or not ended after ``complete``,
  ``cancel`` or its automatic pivot, within ``--ready-timeout`` seconds of fsstress
  writing has fsstress paused (SIGSTOP) until it does: chainfs's mirror copies dirty
  granules until none is left before it reports ready, and only then looks at
  ``complete`` or ``cancel``, so under a guest that never stops writing it may never get
  there.  The figures count these pauses (``--no-pause`` makes them findings);
- after every round: fsstress stopped, ``sync``, every file's type, mode, owner, size,
  mtime, xattrs and content digest (xxh3-128 of its non-zero 4 KiB blocks with their
  offsets, so holes and written zeros compare equal) recorded through the mounted ext4,
  and each regular file's bytes and its extents (FIEMAP) kept aside; then the ext4
  unmounted, the loop device detached, the flat file's page cache dropped, a fresh loop
  device attached (same mode), ``e2fsck -fn``, mounted, and everything compared again;
- oldest round directories are removed to keep the ext4 under half full (besides the
  zero-range op being left out: on a full ext4 a zero-range that fails with ENOSPC leaves
  the range zeroed only in the page cache, a false difference), and image files that left
  the chain are removed once a round that followed them checked clean;
- at the end: the flat file's digest (O_DIRECT), ``chainfs umount``, ``qemu-img check``
  of every image, and the digest of ``qemu-img convert -O raw`` of the chain against the
  flat file's.

On any difference or failure (a job error, an unexpected chain, ``e2fsck``, a chainfs
log line at ERROR or a traceback, ``qemu-img check``) everything goes to ``KEEP/MODE-TIME``:
the images, the ``events`` file, the chainfs debug log and the fsstress op logs since the
last clean round, the manifests before and after, the guest's and the re-read versions of
each differing file, and ``report.txt``: each differing byte range of each file, the
disk ranges it maps to, which layer of the chain holds them (``qemu-img map``), what every
image file holds there (the guest's bytes, the re-read ones, others), what the flat file
shows there, and the debug log's writes that covered them.  The script then exits 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import xxhash

from chainfs.control import parse_line

ROOT = Path(__file__).resolve().parents[1]
FSSTRESS_SRC = ROOT / "tests" / "fsstress"
FSSTRESS_FILES = ("fsstress.c", "global.h", "config.h")
CFLAGS = ["-O2", "-D_GNU_SOURCE", "-DXFS", "-DFALLOCATE", "-DHAVE_COPY_FILE_RANGE"]
CHAIN = "disk"
MiB = 1 << 20
BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
JOB_TIMEOUT = 300.0
MAX_DEPTH = 6
KEEP_ROUND_DIRS = 3
KINDS = (
    "snapshot",
    "stream",
    "stream-node",
    "commit",
    "commit-active",
    "commit-active-ready",
    "copy-full",
    "copy-full-ready",
    "copy-top",
    "copy-top-ready",
    "cancel",
)
TOOLS = ("qemu-img", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3", "cc")
FIEMAP = 0xC020660B  # FS_IOC_FIEMAP
FIEMAP_FLAG_SYNC = 1
FIEMAP_EXTENT_LAST = 1
LOG_BAD = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")
LOG_BENIGN = re.compile(r"fuse_reply_\* failed with No such file or directory")
WRITE_REQ = re.compile(r"request write\((\d+), (\d+), (<(\d+) bytes>|b['\"].*['\"])\)")


class Unavailable(Exception):
    """The soak cannot run here (a tool or fsstress missing): not a finding."""


class Finding(Exception):
    """Something the soak must report: a difference, a failed job, a bad check."""


class Timeout(Finding):
    """An awaited event did not come in time."""


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


def run(*args: str | Path, ok: tuple[int, ...] = (0,), timeout: float = 600) -> str:
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# -- fsstress ------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chainfs" / "fsstress"


def build_fsstress() -> Path:
    """Build the vendored fsstress (once per source and flags) and return its path."""
    missing = [f for f in FSSTRESS_FILES if not (FSSTRESS_SRC / f).is_file()]
    if missing:
        raise Unavailable(f"fsstress sources missing in {FSSTRESS_SRC}: {', '.join(missing)}")
    h = hashlib.sha256(" ".join(CFLAGS).encode())
    for f in FSSTRESS_FILES:
        h.update((FSSTRESS_SRC / f).read_bytes())
    out = cache_dir() / f"fsstress-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    if not os.path.exists("/usr/include/xfs/xfs.h"):
        install_debs("xfslibs-dev")
    if shutil.which("cc") is None:
        install_debs("gcc", "libc6-dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = ["cc", *CFLAGS, "-I", str(FSSTRESS_SRC), str(FSSTRESS_SRC / "fsstress.c")]
    proc = subprocess.run(
        [*cmd, "-o", str(tmp), "-lm"], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise Unavailable(f"cannot build fsstress ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    log(f"built {out}")
    return out


def install_debs(*pkgs: str) -> None:
    """Install Debian packages as root (after ``apt-get update`` if the first try fails)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"fsstress needs the Debian packages {' '.join(pkgs)}; install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {' '.join(pkgs)} with apt-get")
    install = ["apt-get", "install", "-y", "-q", *pkgs]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise Unavailable(f"apt-get install {' '.join(pkgs)} failed: {proc.stderr[-500:]}")


class Fsstress:
    """fsstress in ``root/partK`` directories, one after the other while the live step
    runs (a run that reaches its op bound is followed by the next, with the next seed,
    and the part before the last is removed so that a long step does not fill the
    ext4), until ``stop()`` sends SIGTERM, on which fsstress ends its processes cleanly.
    A run that fails stops the series."""

    def __init__(
        self, binary: Path, root: Path, logs: Path, seed: int, nproc: int, nops: int
    ) -> None:
        self.binary, self.root, self.logs = binary, root, logs
        self.seed, self.nproc, self.nops = seed, nproc, nops
        self.proc: subprocess.Popen[bytes] | None = None
        self.parts = 0
        self.failures: list[str] = []
        self.log_files: list[Path] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._may_run = threading.Event()  # cleared while paused: no new run starts
        self._may_run.set()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._may_run.wait()
            with self._lock:
                if self._stopping or self.failures:
                    return
                if not self._may_run.is_set():
                    continue
                part = self.parts
                if part >= 2:
                    shutil.rmtree(self.root / f"part{part - 2}", ignore_errors=True)
                self.parts += 1
                logf = self.logs / f"{self.root.name}-part{part}.log"
                self.log_files.append(logf)
                seed = self.seed + part
                argv = [str(self.binary), "-d", str(self.root / f"part{part}")]
                argv += ["-n", str(self.nops), "-p", str(self.nproc), "-s", str(seed)]
                argv += ["-v", "-f", "zero=0"]
                with open(logf, "wb") as out:
                    out.write(f"# {' '.join(argv)}\n".encode())
                    out.flush()
                    self.proc = subprocess.Popen(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        process_group=0,  # a group of its own from the start, for pause()
                    )
            rc = self.proc.wait()
            if rc == -signal.SIGTERM and self._stopping:
                continue  # stopped before fsstress had set up its SIGTERM handler
            if rc != 0:
                self.failures.append(f"fsstress {' '.join(argv)} exited {rc} (see {logf})")

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.failures

    def pause(self, sig: int = signal.SIGSTOP) -> None:
        """Stop (or with SIGCONT, resume) every process of the current run, and hold
        back (or let go) the next run."""
        with self._lock:
            if sig == signal.SIGSTOP:
                self._may_run.clear()
            else:
                self._may_run.set()
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._may_run.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGCONT)
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            assert self.proc is not None
            self.proc.kill()
            self._thread.join()
            self.failures.append("fsstress did not stop within 120 s of SIGTERM")

    def ops(self) -> int:
        """Operations in the op logs (lines ``P/N: op ...``)."""
        n = 0
        pat = re.compile(rb"^\d+/\d+: ", re.M)
        for f in self.log_files:
            with contextlib.suppress(FileNotFoundError):
                n += len(pat.findall(f.read_bytes()))
        return n


# -- the chainfs server --------------------------------------------------------------------


class Server:
    """``chainfs mount -f -o debug`` with its log in per-round files."""

    def __init__(self, images: Path, mnt: Path, logs: Path, debug: bool) -> None:
        self.images, self.mnt, self.logs = images, mnt, logs
        self.bad: list[str] = []
        self._lock = threading.Lock()
        self.current = logs / "chainfs-setup.log"
        self.files: list[Path] = [self.current]
        self._out: IO[str] = open(self.current, "w")  # noqa: SIM115 (rotated by the reader)
        argv = [sys.executable, "-m", "chainfs", "mount", "-f", str(images), str(mnt)]
        if debug:
            argv += ["-o", "debug"]
        mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(timeout=5)
                raise RuntimeError(f"chainfs did not mount; see {self.current}")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._out.write(line)
                if LOG_BAD.search(line) and not LOG_BENIGN.search(line):
                    self.bad.append(line.rstrip())
        with self._lock:
            self._out.close()

    def rotate(self, name: str) -> None:
        """Go on logging into ``name``; keep the last three files and those ``keep``ed."""
        with self._lock:
            if self._out.closed:
                return
            self._out.close()
            self.current = self.logs / name
            self.files.append(self.current)
            self._out = open(self.current, "w")  # noqa: SIM115

    def prune(self, keep: int) -> None:
        """Remove all but the last ``keep`` log files (after a clean round)."""
        with self._lock:
            while len(self.files) > keep:
                self.files.pop(0).unlink(missing_ok=True)

    def control(self, *parts: str) -> Path:
        return self.mnt / "control" / CHAIN / Path(*parts)

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            run(sys.executable, "-m", "chainfs", "umount", self.mnt, timeout=300)
        try:
            rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(timeout=30)
        if rc != 0:
            self.bad.append(f"chainfs exited with status {rc}")

    def kill(self) -> None:
        """Teardown after a failure: lazy unmount, terminate, kill."""
        if os.path.ismount(self.mnt) or _dead_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=30)


def _dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


# -- files: manifests, digests, extents ----------------------------------------------------


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The data ranges of an open file (SEEK_DATA/SEEK_HOLE), widened to 4 KiB blocks."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % BLOCK
        end = min(size, end + (-end % BLOCK))
        yield start, end
        pos = end


def nonzero_blocks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """Every 4 KiB block of the file that holds a non-zero byte, with its offset."""
    for start, end in data_segments(fd, size):
        pos = start
        while pos < end:
            chunk = os.pread(fd, min(MiB, end - pos), pos)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                for i in range(0, len(chunk), BLOCK):
                    block = chunk[i : i + BLOCK]
                    if block != ZERO_BLOCK[: len(block)]:
                        yield pos + i, block
            pos += len(chunk)


def fiemap(fd: int) -> list[tuple[int, int, int, int]]:
    """The file's extents: (logical, physical, length, flags)."""
    out: list[tuple[int, int, int, int]] = []
    start, count = 0, 256
    while True:
        head = struct.pack("=QQIIII", start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, count, 0)
        buf = bytearray(head + bytes(56 * count))
        fcntl.ioctl(fd, FIEMAP, buf)
        mapped = struct.unpack_from("=I", buf, 20)[0]
        last = False
        for i in range(mapped):
            lo, ph, ln, _r1, _r2, fl = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
            out.append((lo, ph, ln, fl))
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if mapped < count or last or not mapped:
            return out
        start = out[-1][0] + out[-1][2]


@dataclass
class Totals:
    files: int = 0
    bytes: int = 0  # the files' sizes
    data: int = 0  # of which data (not holes), read and compared block by block


def manifest(root: Path, keep: Path | None, totals: Totals) -> dict[str, dict[str, Any]]:
    """Every entry under ``root`` (but ``lost+found``): what must survive a remount.
    With ``keep``, each regular file's non-zero blocks go to ``keep/INODE`` (sparse) and
    its extents into the entry."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, tuple[str, list[tuple[int, int, int, int]]]] = {}  # hard links
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            e: dict[str, Any] = {
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns,
                "xattrs": _xattrs(path),
            }
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                e["ino"] = st.st_ino
                if st.st_ino not in inodes:
                    digest, extents, data = _digest_file(path, st.st_size, keep)
                    inodes[st.st_ino] = digest, extents
                    totals.files += 1
                    totals.bytes += st.st_size
                    totals.data += data
                e["digest"], e["extents"] = inodes[st.st_ino]
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            out[rel] = e
    return out


def _xattrs(path: str) -> str:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return ""
    h = xxhash.xxh3_64()
    for n in names:
        h.update(n.encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(os.getxattr(path, n, follow_symlinks=False))
        h.update(b"\0")
    return h.hexdigest()


def _digest_file(
    path: str, size: int, keep: Path | None
) -> tuple[str, list[tuple[int, int, int, int]], int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    try:
        st = os.fstat(fd)
        h = xxhash.xxh3_128()
        h.update(size.to_bytes(8, "little"))
        copy = None
        if keep is not None:
            copy = os.open(keep / str(st.st_ino), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(copy, size)
        data = sum(e - s for s, e in data_segments(fd, size))
        try:
            for off, block in nonzero_blocks(fd, size):
                h.update(off.to_bytes(8, "little"))
                h.update(block)
                if copy is not None:
                    os.pwrite(copy, block, off)
        finally:
            if copy is not None:
                os.close(copy)
        extents = fiemap(fd) if keep is not None else []
        return h.hexdigest(), extents, data
    finally:
        os.close(fd)


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """The entries that differ, each with what differs."""
    out = []
    for rel in sorted(set(before) | set(after)):
        b, a = before.get(rel), after.get(rel)
        if b is None:
            out.append(f"{rel}: appeared after the remount")
        elif a is None:
            out.append(f"{rel}: missing after the remount")
        else:
            keys = [k for k in b if k not in ("extents", "ino") and b[k] != a.get(k)]
            if keys:
                what = ", ".join(f"{k} {b[k]!r} -> {a.get(k)!r}" for k in keys)
                out.append(f"{rel}: {what}")
    return out


def differing_ranges(a: Path, b: Path) -> list[tuple[int, int]]:
    """Byte ranges [start, end) where two files differ (beyond the shorter one's end,
    the longer one's tail counts as different)."""
    ranges: list[tuple[int, int]] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if not x and not y:
                break
            if x != y:
                n = max(len(x), len(y))
                i = 0
                while i < n:
                    if x[i : i + BLOCK] != y[i : i + BLOCK]:
                        xs, ys = x[i : i + BLOCK], y[i : i + BLOCK]
                        m = max(len(xs), len(ys))
                        diff = [
                            j for j in range(m) if j >= len(xs) or j >= len(ys) or xs[j] != ys[j]
                        ]
                        s, e = pos + i + diff[0], pos + i + diff[-1] + 1
                        if ranges and ranges[-1][1] >= s - 1:
                            ranges[-1] = (ranges[-1][0], e)
                        else:
                            ranges.append((s, e))
                    i += BLOCK
            pos += max(len(x), len(y))
    return ranges


def read_direct(path: Path, offset: int, length: int) -> bytes:
    """Bytes of a file read with O_DIRECT (past the page cache)."""
    start = offset - offset % BLOCK
    end = offset + length
    end += -end % BLOCK
    buf = mmap.mmap(-1, end - start)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], start)
        data = bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()
    return data[offset - start : offset - start + length]


# -- one mode ------------------------------------------------------------------------------


@dataclass
class Figures:
    mode: str
    rounds: int = 0
    steps: collections.Counter[str] = field(default_factory=collections.Counter)
    verifications: int = 0
    files: int = 0
    bytes: int = 0
    data: int = 0
    ops: int = 0
    differences: int = 0
    paused: collections.Counter[str] = field(default_factory=collections.Counter)
    elapsed: float = 0.0
    evidence: str = ""

    def text(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.steps.items()))
        lines = [
            f"mode {self.mode}: {self.rounds} rounds with live steps "
            f"({sum(self.steps.values())} steps: {kinds})",
            f"  {self.verifications} checks through a fresh loop device: {self.files} files "
            f"of {self.bytes / (1 << 30):.2f} GiB compared ({self.bytes} bytes, of which "
            f"{self.data} bytes of data, {self.data / (1 << 30):.2f} GiB, the rest holes), "
            f"{self.differences} differences",
            f"  {self.ops} fsstress operations; {self.elapsed:.0f} s",
        ]
        if self.paused:
            n = sum(self.paused.values())
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.paused.items()))
            lines.append(
                f"  {n} times fsstress was paused for a job that had not got to ready or "
                f"ended after --ready-timeout s of writes ({kinds})"
            )
        if self.evidence:
            lines.append(f"  evidence kept in {self.evidence}")
        return "\n".join(lines)


class Soak:
    def __init__(self, mode: str, ns: argparse.Namespace, fsstress: Path) -> None:
        self.mode, self.ns, self.fsstress = mode, ns, fsstress
        self.work = Path(ns.work).resolve() / mode
        self.images = self.work / "images"
        self.mnt = self.work / "mnt"
        self.fs = self.work / "fs"
        self.logs = self.work / "logs"
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.work
        self.before_dir = base / f"chainfs-soak-{os.getpid()}-{mode}"
        self.rng = random.Random(f"{ns.seed}-{mode}")
        self.fig = Figures(mode)
        self.server: Server | None = None
        self.dev: str | None = None
        self.fsstress_run: Fsstress | None = None
        self.events_seen = 0
        self.round_dirs: list[Path] = []
        self.unchecked_logs: list[Path] = []
        self.before: dict[str, dict[str, Any]] = {}
        self.rotation: list[str] = []
        self.last_step = ""
        self.pending: list[dict[str, str]] = []  # events read but not yet waited for

    # -- set-up and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        for d in (self.images, self.logs, self.fs):
            d.mkdir(parents=True)
        size = str(self.ns.size)
        run("qemu-img", "create", "-q", "-f", "qcow2", self.images / "base.qcow2", size)
        run(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            self.images / f"{CHAIN}.qcow2",
        )  # fmt: skip
        self.server = Server(self.images, self.mnt, self.logs, debug=not self.ns.no_debug_log)
        self.attach()
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", self.dev_path)
        self.mount_fs()
        log(f"{self.mode}: ext4 on {self.dev_path} over {self.mnt / (CHAIN + '.img')}")

    @property
    def dev_path(self) -> str:
        assert self.dev is not None
        return self.dev

    @property
    def flat(self) -> Path:
        return self.mnt / f"{CHAIN}.img"

    def attach(self) -> None:
        dio = "on" if self.mode == "direct" else "off"
        self.dev = run("losetup", "-f", "--show", f"--direct-io={dio}", self.flat).strip()
        got = Path(f"/sys/block/{os.path.basename(self.dev)}/loop/dio").read_text().strip()
        if got != ("1" if dio == "on" else "0"):
            raise RuntimeError(f"{self.dev}: direct I/O is {got}, wanted {dio}")
        run("blockdev", "--flushbufs", self.dev)

    def detach(self) -> None:
        if self.dev is not None:
            run("losetup", "-d", self.dev)
            self.dev = None

    def mount_fs(self) -> None:
        run("mount", "-t", "ext4", self.dev_path, self.fs)

    def umount_fs(self) -> None:
        if os.path.ismount(self.fs):
            run("umount", self.fs)

    def umount_fs_lazy(self) -> None:
        if os.path.ismount(self.fs):
            run("umount", "-l", self.fs)

    def drop_flat_cache(self) -> None:
        fd = os.open(self.flat, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def teardown(self) -> None:
        """Whatever state things are in: stop, unmount, detach (errors only logged)."""
        steps: list[Callable[[], None]] = []
        if self.fsstress_run is not None:
            steps.append(self.fsstress_run.stop)
        steps.append(self.umount_fs_lazy)
        steps.append(self.detach)
        if self.server is not None:
            steps.append(self.server.kill)
        for step in steps:
            try:
                step()
            except Exception as e:
                log(f"teardown: {e}")
        shutil.rmtree(self.before_dir, ignore_errors=True)

    # -- the control files -----------------------------------------------------------------

    def layers(self) -> list[str]:
        assert self.server is not None
        text = self.server.control("chain").read_text()
        return [parse_line(x)["name"] for x in text.splitlines() if x.strip()]

    def new_events(self) -> list[dict[str, str]]:
        assert self.server is not None
        lines = self.server.control("events").read_text().splitlines()
        new = lines[self.events_seen :]
        self.events_seen = len(lines)
        return [parse_line(x) for x in new if x.strip()]

    def command(self, kind: str, text: str, *, fresh: bool = False) -> None:
        """One write to a control file.  ``fresh``: forget the events so far (a new job's
        JOB_STARTED is looked for after this write only)."""
        assert self.server is not None
        if fresh:
            self.new_events()
            self.pending = []
        else:
            self.pending += self.new_events()
        fd = os.open(self.server.control(kind), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, (text + "\n").encode())
        except OSError as e:
            raise Finding(f"{kind} {text!r} refused: {e.strerror}") from None
        finally:
            os.close(fd)

    def wait_event(
        self, job: str | None, names: tuple[str, ...], timeout: float = JOB_TIMEOUT
    ) -> dict[str, str]:
        """The next event named in ``names`` (of ``job``); a job that ends while another
        of its events is awaited is a finding."""
        deadline = time.monotonic() + timeout
        ends = ("JOB_COMPLETED", "JOB_CANCELLED")
        while True:
            for i, e in enumerate(self.pending):
                if job is not None and e.get("job") != job:
                    continue
                if e["event"] in names:
                    self.pending = self.pending[i + 1 :]
                    return e
                if e["event"] in ends:
                    raise Finding(f"job {job} ended while {'/'.join(names)} was awaited: {e}")
            self.pending = self.new_events()
            if not self.pending:
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"timed out after {timeout:.0f} s waiting for {'/'.join(names)} of {job}"
                    )
                time.sleep(0.02)

    def start_job(self, kind: str, text: str) -> str:
        self.command(kind, text, fresh=True)
        return self.wait_event(None, ("JOB_STARTED",))["job"]

    def finish(self, job: str) -> dict[str, str]:
        end = self.wait_event(job, ("JOB_COMPLETED", "JOB_CANCELLED"))
        if end["event"] != "JOB_COMPLETED" or "error" in end:
            raise Finding(f"job {job} ended with {end}")
        return end

    # -- live steps --------------------------------------------------------------------------

    def speed(self) -> str:
        return self.rng.choice(["0", "0", "64M", "200M"])

    def applicable(self, kind: str, depth: int) -> bool:
        need = {"stream-node": 3, "commit": 3, "snapshot": 1}.get(kind, 2)
        if kind.startswith("copy"):
            need = 1
        if kind == "snapshot":
            return depth < MAX_DEPTH
        return depth >= need

    def choose(self, depth: int) -> str:
        if not self.rotation:
            self.rotation = list(KINDS)
            self.rng.shuffle(self.rotation)
        for kind in self.rotation:
            if self.applicable(kind, depth):
                self.rotation.remove(kind)
                return kind
        return "snapshot" if depth < MAX_DEPTH else "commit-active"

    def live_step(self, r: int) -> str:
        """One live step through the control files; returns its kind.  The chain must
        look as the step promises afterwards."""
        layers = self.layers()
        depth = len(layers)
        kind = self.choose(depth)
        active, rng = layers[0], self.rng
        expect: list[str] | None = None
        if kind == "snapshot":
            name = f"s{r:04d}.qcow2"
            self.command("snapshot", name, fresh=True)
            expect = [name, *layers]
        elif kind == "stream":
            j = rng.randrange(1, depth + 1)  # depth: no base, stream everything
            base = layers[j] if j < depth else None
            text = (f"base={base} " if base else "") + f"speed={self.speed()}"
            self.finish(self.start_job("stream", text))
            expect = [active, *layers[j:]]
        elif kind == "stream-node":
            i = rng.randrange(1, depth - 1)
            j = rng.randrange(i + 1, depth + 1)
            base = layers[j] if j < depth else None
            text = f"node={layers[i]} " + (f"base={base} " if base else "")
            self.finish(self.start_job("stream", text + f"speed={self.speed()}"))
            expect = layers[: i + 1] + layers[j:]
        elif kind == "commit":
            i = rng.randrange(1, depth - 1)
            j = rng.randrange(i + 1, depth)
            text = f"top={layers[i]} base={layers[j]} speed={self.speed()}"
            self.finish(self.start_job("commit", text))
            expect = layers[:i] + layers[j:]
        elif kind in ("commit-active", "commit-active-ready"):
            j = rng.randrange(1, depth)
            text = f"base={layers[j]} speed={self.speed()}"
            ready = kind.endswith("ready")
            job = self.start_job("commit", text + (" wait=ready" if ready else ""))
            self.mirror_end(job, ready)
            expect = layers[j:]
        elif kind.startswith("copy"):
            dest = f"c{r:04d}.qcow2"
            sync = "top" if kind.startswith("copy-top") else "full"
            ready = kind.endswith("ready")
            text = f"{dest} sync={sync} speed={self.speed()}" + (" wait=ready" if ready else "")
            job = self.start_job("copy", text)
            self.mirror_end(job, ready)
            expect = [dest, *layers[1:]] if sync == "top" else [dest]
        else:
            kind, expect = self.cancel_step(r, layers)
        got = self.layers()
        if got != expect:
            raise Finding(f"after {kind}: chain {got}, expected {expect}")
        self.last_step = kind
        return kind

    def await_event(self, job: str, names: tuple[str, ...], phase: str) -> dict[str, str]:
        """Wait for an event of a copy or active commit.  One that has not come after
        ``--ready-timeout`` seconds of fsstress writing has fsstress paused (SIGSTOP)
        until it comes, and resumed then (counted by ``phase`` in the figures; with
        ``--no-pause`` a finding instead)."""
        try:
            return self.wait_event(job, names, timeout=self.ns.ready_timeout)
        except Timeout:
            if self.ns.no_pause or self.fsstress_run is None:
                raise
        log(
            f"{self.mode}: no {'/'.join(names)} of {job} ({phase}) after "
            f"{self.ns.ready_timeout:.0f} s of writes; pausing fsstress until it comes"
        )
        self.fsstress_run.pause()
        self.fig.paused[f"{job.split('-')[0]} {phase}"] += 1
        try:
            return self.wait_event(job, names)
        finally:
            self.resume()

    def resume(self) -> None:
        if self.fsstress_run is not None:
            self.fsstress_run.pause(signal.SIGCONT)

    def mirror_end(self, job: str, wait_ready: bool) -> None:
        """An active commit or a copy: to ready, then ``complete`` (after fsstress wrote
        for a while) or the automatic pivot; then its completion."""
        self.await_event(job, ("JOB_READY",), "to ready")
        if wait_ready:
            time.sleep(self.rng.uniform(0.1, 0.6))  # fsstress writes while the job mirrors
            self.command("complete", job)
        ends = ("JOB_COMPLETED", "JOB_CANCELLED")
        end = self.await_event(job, ends, "complete" if wait_ready else "pivot")
        if end["event"] != "JOB_COMPLETED" or "error" in end:
            raise Finding(f"job {job} ended with {end}")

    def cancel_step(self, r: int, layers: list[str]) -> tuple[str, list[str]]:
        """A job cancelled while it runs (rate-limited) or while it waits in ready."""
        depth, rng = len(layers), self.rng
        variants = ["copy-running", "copy-ready"]
        if depth >= 2:
            variants += ["stream-running", "commit-active-ready"]
        if depth >= 3:
            variants += ["commit-running"]
        v = rng.choice(variants)
        slow = "speed=4M"
        late = layers  # the chain if the job completes before the cancel
        if v == "copy-running":
            dest = f"x{r:04d}.qcow2"
            job = self.start_job("copy", f"{dest} sync=full {slow}")
            late = [dest]
        elif v == "copy-ready":
            job = self.start_job("copy", f"x{r:04d}.qcow2 sync=top wait=ready")
            self.await_event(job, ("JOB_READY",), "to ready")
        elif v == "stream-running":
            job = self.start_job("stream", slow)
            late = layers[:1]
        elif v == "commit-active-ready":
            job = self.start_job("commit", f"base={layers[-1]} wait=ready")
            self.await_event(job, ("JOB_READY",), "to ready")
        else:
            job = self.start_job("commit", f"top={layers[1]} base={layers[-1]} {slow}")
            late = layers[:1] + layers[-1:]
        time.sleep(rng.uniform(0.05, 0.4))
        try:
            self.command("cancel", job)
        except Finding:
            # refused: the job ended first (it had little to copy); it must have completed
            self.finish(job)
            return f"cancel-{v}-late", late
        end = self.await_event(job, ("JOB_COMPLETED", "JOB_CANCELLED"), "cancel")
        if "error" in end:
            raise Finding(f"cancelled job {job} ended with {end}")
        return f"cancel-{v}", layers

    # -- a round -----------------------------------------------------------------------------

    def round(self, r: int) -> None:
        assert self.server is not None
        self.server.rotate(f"chainfs-r{r:04d}.log")
        rdir = self.fs / f"r{r:04d}"
        self.round_dirs.append(rdir)
        fss = Fsstress(
            self.fsstress, rdir, self.logs, self.rng.randrange(1 << 30), self.ns.procs, self.ns.ops
        )
        self.fsstress_run = fss
        fss.start()
        time.sleep(self.rng.uniform(0.2, 0.8))
        try:
            kind = self.live_step(r)
            still = fss.running
            time.sleep(0.2)
        finally:
            fss.stop()
            self.fsstress_run = None
            self.unchecked_logs += fss.log_files
            self.fig.ops += fss.ops()
        if fss.failures:
            raise Finding("; ".join(fss.failures))
        if not still:
            raise Finding(f"fsstress was not running when the {kind} step ended")
        self.fig.rounds += 1
        self.fig.steps[kind] += 1
        self.check_log()
        if r % self.ns.check_every == 0 or r == self.ns.rounds:
            self.verify(r)

    def check_log(self) -> None:
        assert self.server is not None
        if self.server.bad:
            raise Finding("chainfs logged: " + " | ".join(self.server.bad[:5]))

    def verify(self, r: int) -> None:
        """Checksums through the mounted ext4, release, fresh loop device, compare."""
        run("sync")
        shutil.rmtree(self.before_dir, ignore_errors=True)
        self.before_dir.mkdir(parents=True)
        totals = Totals()
        self.before = manifest(self.fs, self.before_dir, totals)
        (self.logs / "manifest-before.json").write_text(json.dumps(self.before))
        self.umount_fs()
        self.detach()
        if r == self.ns.inject_difference:
            self.inject_difference()
        self.drop_flat_cache()
        self.attach()
        fsck = subprocess.run(
            ["e2fsck", "-fn", self.dev_path], capture_output=True, text=True, check=False
        )
        self.mount_fs()
        after = manifest(self.fs, None, Totals())
        (self.logs / "manifest-after.json").write_text(json.dumps(after))
        self.fig.verifications += 1
        self.fig.files += totals.files
        self.fig.bytes += totals.bytes
        self.fig.data += totals.data
        diffs = compare(self.before, after)
        if diffs:
            self.fig.differences += len(diffs)
            raise Finding(f"{len(diffs)} entries differ after the remount", diffs)
        if fsck.returncode:
            raise Finding(f"e2fsck -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}")
        # a clean check: what came before it is no longer evidence
        for f in self.unchecked_logs:
            f.unlink(missing_ok=True)
        self.unchecked_logs = []
        assert self.server is not None
        self.server.prune(2)
        self.prune_images()
        self.keep_fs_small()

    def inject_difference(self) -> None:
        """For trying the evidence: 4 KiB of 0xEE written through the flat file into the
        first written extent of the largest file, as if chainfs had lost a guest write."""
        files = [e for e in self.before.values() if e.get("extents")]
        big = max(files, key=lambda e: e["size"])
        lo, ph, _, _ = next(x for x in big["extents"] if not x[3] & 0x800)  # not unwritten
        buf = mmap.mmap(-1, BLOCK)
        buf.write(b"\xee" * BLOCK)
        fd = os.open(self.flat, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwritev(fd, [buf], ph)
        finally:
            os.close(fd)
            buf.close()
        log(f"injected a difference at disk offset {ph} (inode {big['ino']}, byte {lo})")

    def prune_images(self) -> None:
        chain = set(self.layers())
        for p in self.images.glob("*.qcow2"):
            if p.name not in chain:
                p.unlink()

    def keep_fs_small(self) -> None:
        def used() -> float:
            s = os.statvfs(self.fs)
            return 1 - s.f_bavail / s.f_blocks

        while self.round_dirs and (len(self.round_dirs) > KEEP_ROUND_DIRS or used() > 0.4):
            shutil.rmtree(self.round_dirs.pop(0))

    # -- the whole mode ----------------------------------------------------------------------

    def run(self) -> Figures:
        t0 = time.monotonic()
        try:
            self.setup()
            for r in range(1, self.ns.rounds + 1):
                self.round(r)
                if r % 10 == 0 or r == self.ns.rounds:
                    log(
                        f"{self.mode}: round {r}/{self.ns.rounds}, {self.fig.files} files "
                        f"compared, chain {' <- '.join(reversed(self.layers()))}"
                    )
            self.finish_mode()
        except Finding as f:
            self.fig.elapsed = time.monotonic() - t0
            self.fig.evidence = str(self.keep_evidence(f))
            self.teardown()
            return self.fig
        except BaseException:
            self.teardown()
            raise
        self.fig.elapsed = time.monotonic() - t0
        return self.fig

    def finish_mode(self) -> None:
        """Flat file against QEMU's view of the chain; qemu-img check of every image."""
        self.umount_fs()
        self.detach()
        flat = flat_digest(self.flat)
        layers = self.layers()
        assert self.server is not None
        shutil.copy(self.server.control("events"), self.logs / "events")
        self.server.umount()
        self.check_log()
        for p in sorted(self.images.glob("*.qcow2")):
            proc = subprocess.run(
                ["qemu-img", "check", p], capture_output=True, text=True, check=False
            )
            if proc.returncode:
                raise Finding(f"qemu-img check {p.name} exited {proc.returncode}: {proc.stdout}")
        raw = self.before_dir.with_name(self.before_dir.name + ".raw")
        try:
            run("qemu-img", "convert", "-O", "raw", self.images / layers[0], raw)
            qemu = flat_digest(raw, direct=False)
        finally:
            raw.unlink(missing_ok=True)
        if flat != qemu:
            raise Finding(f"the flat file ({flat}) is not what QEMU reads of the chain ({qemu})")
        shutil.rmtree(self.before_dir, ignore_errors=True)
        log(f"{self.mode}: qemu-img check clean, flat file == qemu-img convert ({flat})")

    # -- evidence ----------------------------------------------------------------------------

    def keep_evidence(self, finding: Finding) -> Path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        keep = Path(self.ns.keep).resolve() / f"{self.mode}-{stamp}"
        keep.mkdir(parents=True)
        report: list[str] = [f"chainfs soak, mode {self.mode}: {finding.args[0]}", ""]
        if len(finding.args) > 1:
            report += [f"  {d}" for d in finding.args[1]]
        report += ["", f"last live step: {self.last_step}", f"round dirs: {self.round_dirs}"]
        log(f"FINDING: {finding.args[0]}; keeping everything in {keep}")
        try:
            report += self._gather(keep, finding)
        except Exception as e:
            report.append(f"(gathering evidence failed: {e!r})")
        (keep / "report.txt").write_text("\n".join(report) + "\n")
        print("\n".join(report[:60]), flush=True)
        return keep

    def _gather(self, keep: Path, finding: Finding) -> list[str]:
        report: list[str] = []
        server = self.server
        ranges: list[dict[str, Any]] = []
        if server is not None and os.path.ismount(self.mnt):
            with contextlib.suppress(OSError):
                shutil.copy(server.control("events"), keep / "events")
                shutil.copy(server.control("chain"), keep / "chain")
        diffs = finding.args[1] if len(finding.args) > 1 else []
        if diffs and os.path.ismount(self.fs):
            ranges = self._differing_ranges(keep, diffs, report)
        if self.fsstress_run is not None:
            self.fsstress_run.stop()
            self.unchecked_logs += self.fsstress_run.log_files
            self.fsstress_run = None
        # the flat file as chainfs serves it now, at each differing disk range
        for rg in ranges:
            for d in rg["disk"]:
                with contextlib.suppress(OSError):
                    d["flat_now"] = _which(
                        read_direct(self.flat, d["offset"], d["length"]), d["guest"], d["reread"]
                    )
        with contextlib.suppress(Exception):
            self.umount_fs()
        with contextlib.suppress(Exception):
            self.detach()
        if server is not None:
            with contextlib.suppress(Exception):
                server.umount()
        for f in [*self.unchecked_logs, *self.logs.glob("manifest-*.json")]:
            with contextlib.suppress(OSError):
                shutil.copy(f, keep / f.name)
        if server is not None:
            for f in server.files:
                with contextlib.suppress(OSError):
                    shutil.copy(f, keep / f.name)
        img_keep = keep / "images"
        run("cp", "-a", "--sparse=always", self.images, img_keep)
        report += ["", "qemu-img check:"]
        for p in sorted(self.images.glob("*.qcow2")):
            proc = subprocess.run(
                ["qemu-img", "check", "-U", p], capture_output=True, text=True, check=False
            )
            report.append(f"  {p.name}: exit {proc.returncode} {proc.stdout.strip()[:200]}")
        if ranges:
            report += self._locate(keep, ranges, server)
        for rg in ranges:
            for d in rg["disk"]:
                d.pop("guest", None)
                d.pop("reread", None)
        (keep / "ranges.json").write_text(json.dumps(ranges, indent=1))
        return report

    def _differing_ranges(
        self, keep: Path, diffs: list[str], report: list[str]
    ) -> list[dict[str, Any]]:
        """The byte ranges of each differing regular file, and the disk ranges under them
        (from the extents seen before the release), with the guest's and re-read bytes."""
        out: list[dict[str, Any]] = []
        for line in diffs:
            rel = line.split(": ", 1)[0]
            b = self.before.get(rel)
            path = self.fs / rel
            if not b or "ino" not in b or not path.is_file():
                continue
            guest = self.before_dir / str(b["ino"])
            if not guest.exists():
                continue
            safe = rel.replace("/", "_")
            shutil.copy(guest, keep / f"guest.{safe}")
            shutil.copy(path, keep / f"reread.{safe}")
            report += ["", f"{rel} (inode {b['ino']}):"]
            for s, e in differing_ranges(guest, path)[:50]:
                disk = []
                for lo, ph, ln, fl in b["extents"]:
                    a0, a1 = max(s, lo), min(e, lo + ln)
                    if a0 < a1:
                        with open(guest, "rb") as g, open(path, "rb") as rr:
                            g.seek(a0)
                            rr.seek(a0)
                            gb, rb = g.read(a1 - a0), rr.read(a1 - a0)
                        disk.append(
                            {
                                "offset": ph + a0 - lo,
                                "length": a1 - a0,
                                "extent_flags": fl,
                                "guest": gb,
                                "reread": rb,
                            }
                        )
                out.append({"file": rel, "start": s, "end": e, "disk": disk})
                where = ", ".join(f"disk {d['offset']}+{d['length']}" for d in disk) or "no extent"
                report.append(f"  bytes {s}..{e} ({e - s} B) differ: {where}")
        return out

    def _locate(self, keep: Path, ranges: list[dict[str, Any]], server: Server | None) -> list[str]:
        """For each differing disk range: the layer the chain reads it from, what every
        image holds there, what the flat file showed, and the writes that covered it."""
        report = ["", "where the differing disk ranges are:"]
        chain_map: list[dict[str, Any]] = []
        active = self.images / f"{CHAIN}.qcow2"
        with contextlib.suppress(FileNotFoundError):
            chain_file = (keep / "chain").read_text().splitlines()
            active = Path(parse_line(chain_file[0])["path"])
        with contextlib.suppress(Exception):
            chain_map = json.loads(run("qemu-img", "map", "-U", "--output=json", active))
        own: dict[str, list[dict[str, Any]]] = {}
        for p in sorted(self.images.glob("*.qcow2")):
            spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file"}}
            spec["file"] = {"driver": "file", "filename": str(p)}
            with contextlib.suppress(Exception):
                own[p.name] = json.loads(
                    run("qemu-img", "map", "-U", "--output=json", "json:" + json.dumps(spec))
                )
        chain_names = [x.get("filename", "") for x in json.loads(
            run("qemu-img", "info", "-U", "--backing-chain", "--output=json", active)
        )]  # fmt: skip
        writes = _debug_writes(server.files if server else [])
        for rg in ranges:
            report.append(f"{rg['file']} bytes {rg['start']}..{rg['end']}:")
            for d in rg["disk"]:
                off, ln = d["offset"], d["length"]
                report.append(f"  disk {off}+{ln}: flat file now: {d.get('flat_now', '?')}")
                for m in chain_map:
                    if m["start"] < off + ln and off < m["start"] + m["length"]:
                        depth = m.get("depth", 0)
                        name = chain_names[depth] if depth < len(chain_names) else "?"
                        report.append(
                            f"    chain reads {m['start']}+{m['length']} from depth {depth}"
                            f" ({os.path.basename(name)}) data={m.get('data')}"
                            f" zero={m.get('zero')}"
                        )
                for name, entries in own.items():
                    held = _held(self.images / name, entries, off, ln)
                    if held is None:
                        report.append(f"    {name}: holds nothing there")
                    else:
                        report.append(f"    {name}: {_which(held, d['guest'], d['reread'])}")
                cover = [w for w in writes if w[1] < off + ln and off < w[1] + w[2]]
                report.append(
                    f"    {len(cover)} writes to the flat file in the kept debug logs cover it"
                    + (f"; last: {cover[-1][0]}" if cover else "")
                )
        return report


def _which(data: bytes, guest: bytes, reread: bytes) -> str:
    if data == guest:
        return "the guest's version"
    if data == reread:
        return "the re-read version"
    if not any(data):
        return "zeros"
    return "other bytes"


def _held(image: Path, entries: list[dict[str, Any]], off: int, length: int) -> bytes | None:
    """The bytes an image itself holds at [off, off+length) of the disk (zeros where it
    holds a zero cluster or nothing while holding something else of the range); None
    if it holds nothing there."""
    out = bytearray(length)
    found = False
    with open(image, "rb") as f:
        for m in entries:
            s, n = m["start"], m["length"]
            a0, a1 = max(s, off), min(s + n, off + length)
            if a0 >= a1 or m.get("depth", 0) != 0 or not m.get("present", m.get("data")):
                continue
            found = True
            if m.get("data") and "offset" in m:
                f.seek(m["offset"] + a0 - s)
                out[a0 - off : a1 - off] = f.read(a1 - a0)
    return bytes(out) if found else None


def _debug_writes(files: list[Path]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for f in files:
        with contextlib.suppress(OSError), open(f, errors="replace") as fh:
            for line in fh:
                m = WRITE_REQ.search(line)
                if m:
                    n = int(m.group(4)) if m.group(4) else len(eval_bytes(m.group(3)))
                    out.append((line.strip(), int(m.group(2)), n))
    return out


def eval_bytes(text: str) -> bytes:
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return b""
    return value if isinstance(value, bytes) else b""


def flat_digest(path: Path, direct: bool = True) -> str:
    """xxh3-128 of a whole file (read with O_DIRECT)."""
    h = xxhash.xxh3_128()
    buf = mmap.mmap(-1, 4 * MiB)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        pos = 0
        while True:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            h.update(buf[:n])
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return h.hexdigest()


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="soak", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--rounds", type=int, default=20, help="rounds per mode (default 20)")
    p.add_argument("--mode", choices=("buffered", "direct", "both"), default="both")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--work", default=str(ROOT / "soak-work"), help="default ./soak-work")
    p.add_argument(
        "--keep", default=str(ROOT / "soak-evidence"), help="evidence goes here on a finding"
    )
    p.add_argument("--size", default="1G", help="virtual disk size (default 1G)")
    p.add_argument("--procs", type=int, default=3, help="fsstress processes (default 3)")
    p.add_argument(
        "--ops", type=int, default=2000, help="fsstress ops per process and run (default 2000)"
    )
    p.add_argument("--check-every", type=int, default=1, help="rounds between checks (default 1)")
    p.add_argument("--no-debug-log", action="store_true", help="mount without -o debug")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds a copy or active commit may take to reach ready while fsstress "
        "writes before fsstress is paused until it does (default 30)",
    )
    p.add_argument(
        "--no-pause",
        action="store_true",
        help="a job not ready after --ready-timeout is a finding instead",
    )
    p.add_argument(
        "--inject-difference",
        type=int,
        metavar="ROUND",
        default=0,
        help="overwrite 4 KiB of a file through the flat file behind ext4's back in round "
        "ROUND, to try the evidence it keeps",
    )
    p.add_argument("--build-only", action="store_true", help="build fsstress, print its path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        binary = build_fsstress()
        if ns.build_only:
            print(binary)
            return 0
        if os.geteuid() != 0:
            raise Unavailable("the soak needs root (losetup, mount)")
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise Unavailable(f"missing tools: {', '.join(missing)}")
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise Unavailable("/dev/fuse is not usable")
    except Unavailable as e:
        print(f"soak: cannot run: {e}", file=sys.stderr)
        return 77
    if ns.seed is None:
        ns.seed = random.randrange(1 << 31)
    modes = ["buffered", "direct"] if ns.mode == "both" else [ns.mode]
    log(f"soak: seed {ns.seed}, {ns.rounds} rounds per mode, modes {', '.join(modes)}")
    figures = []
    for mode in modes:
        fig = Soak(mode, ns, binary).run()
        figures.append(fig)
        log(fig.text())
        if fig.evidence:
            break
    print(f"\nsoak figures (seed {ns.seed}):")
    for fig in figures:
        print(fig.text())
    return 1 if any(f.evidence for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
