"""Crash simulation for the image engine: record an operation's I/O, replay crashed states.

``recording`` installs ``HostFile.observer`` and collects every write, flush, truncate,
create, rename, unlink and directory sync an operation issues.  ``crash_states`` turns
that log into the states a power cut could leave on disk, applied to pristine copies of
the files:

- ``all``: the first ``k`` events all reached the disk;
- ``lost``: of those, every write issued after the file's last flush was lost, and every
  rename or unlink issued after its directory's last sync;
- ``torn``: the last write was torn at a sector boundary (only its first part landed);
- ``scatter``: every write after the file's last flush kept a random subset of its
  512-byte sectors, and every rename or unlink after its directory's last sync happened
  or not, at random (the most general outcome a disk that only orders across flushes
  allows; the other modes are special cases).

``run_states`` materialises each distinct state in a directory of its own (files the
log never touched are hard links to the pristine copies) and hands it to a judge,
several at a time.  ``Guest`` keeps what the disk must read as after each guest
operation, so a judge can ask "is every cluster either old or new?".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from chainfs.chain import Chain
from chainfs.hostfile import HostFile

SECTOR = 512
QCOW2_MAGIC = b"QFI\xfb"
# default number of prefix lengths tried per operation (every one when the log is short)
DEFAULT_PREFIXES = 48


class Event(NamedTuple):
    kind: str  # "write", "flush", "truncate", "create", "rename", "unlink" or "syncdir"
    path: str  # relative to the recorded directory (for "syncdir": the directory)
    offset: int  # the new size for "truncate"
    data: bytes  # for "rename": the new path, relative and encoded

    def describe(self) -> str:
        if self.kind == "write":
            return f"write {self.path} [{self.offset:#x}, +{len(self.data):#x})"
        if self.kind == "truncate":
            return f"truncate {self.path} to {self.offset:#x}"
        if self.kind == "rename":
            return f"rename {self.path} to {self.data.decode()}"
        return f"{self.kind} {self.path}"

    @property
    def directory(self) -> str:
        """The directory whose sync makes this rename or unlink durable."""
        return os.path.dirname(self.path) or "."


class Recorder:
    """The observer: appends every event under ``root`` to ``events``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.events: list[Event] = []

    def __call__(self, event: str, path: str, offset: int, data: bytes) -> None:
        rel = self._rel(path)
        if event == "rename":
            data = self._rel(os.fsdecode(data)).encode()
        self.events.append(Event(event, rel, offset, bytes(data)))

    def _rel(self, path: str) -> str:
        full = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        rel = os.path.relpath(full, self.root)
        if rel.startswith(".."):
            raise AssertionError(f"the operation touched {path!r}, outside {self.root!r}")
        return rel

    def mark(self) -> int:
        return len(self.events)


@contextmanager
def recording(root: str) -> Iterator[Recorder]:
    """Record the engine's I/O under ``root`` for the duration of the block."""
    rec = Recorder(root)
    saved = HostFile.observer
    HostFile.observer = rec
    try:
        yield rec
    finally:
        HostFile.observer = saved


def snapshot(root: str) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative path -> content)."""
    out: dict[str, bytes] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


# -- crashed states ----------------------------------------------------------------------


@dataclass
class Crash:
    """One state a crash could leave: the touched files' contents (None = absent)."""

    k: int
    mode: str
    files: dict[str, bytes | None]
    events: Sequence[Event] = field(repr=False)

    def describe(self) -> str:
        last = self.events[self.k - 1].describe() if self.k else "(nothing)"
        return f"prefix {self.k}/{len(self.events)} ({self.mode}), last event: {last}"


def _sector_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """``[start, end)`` pieces of a write, split at sector boundaries."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        stop = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append((pos, stop))
        pos = stop
    return out


Landing = dict[int, list[tuple[int, int]] | bool]


def _apply(
    pristine: dict[str, bytes], events: Sequence[Event], landing: Landing
) -> dict[str, bytes | None]:
    """Apply events; ``landing`` says, for some writes and truncates, whether (or which
    byte ranges of) them reached the disk; the others all did."""
    files: dict[str, bytearray | None] = {}

    def load(path: str) -> None:
        if path not in files:
            old = pristine.get(path)
            files[path] = None if old is None else bytearray(old)

    for i, e in enumerate(events):
        # a heartbeat rewrites the owner file, whose content is diagnostics only (its
        # lock is the truth): nothing a crash could leave there matters to the images
        if e.kind in ("flush", "syncdir", "heartbeat"):
            continue
        load(e.path)
        buf = files[e.path]
        if e.kind in ("rename", "unlink"):
            if landing.get(i, True) is False:
                continue
            if buf is None:
                raise AssertionError(f"{e.describe()} of a file that does not exist")
            if e.kind == "rename":
                new = e.data.decode()
                load(new)
                if files[new] is not None:
                    raise AssertionError(f"{e.describe()} replaces a file")
                files[new] = buf
            files[e.path] = None
            continue
        if e.kind == "create":
            files[e.path] = bytearray() if buf is None else buf
            continue
        if buf is None:
            raise AssertionError(f"{e.describe()} on a file that does not exist")
        verdict = landing.get(i, True)
        if verdict is False:
            continue
        if e.kind == "truncate":
            if e.offset < len(buf):
                del buf[e.offset :]
            else:
                buf.extend(bytes(e.offset - len(buf)))
            continue
        ranges = [(e.offset, e.offset + len(e.data))] if verdict is True else verdict
        for a, b in ranges:
            if len(buf) < b:
                buf.extend(bytes(max(0, a - len(buf))))
            buf[a:b] = e.data[a - e.offset : b - e.offset]
    return {p: None if b is None else bytes(b) for p, b in files.items()}


def _unflushed(events: Sequence[Event]) -> set[int]:
    """Indices of writes/truncates not followed by a flush of their file, and of renames
    and unlinks not followed by a sync of their directory."""
    out: set[int] = set()
    for i, e in enumerate(events):
        if e.kind == "flush":
            out = {
                j for j in out if events[j].kind in ("rename", "unlink") or events[j].path != e.path
            }
        elif e.kind == "syncdir":
            out = {
                j
                for j in out
                if events[j].kind not in ("rename", "unlink") or events[j].directory != e.path
            }
        elif e.kind in ("write", "truncate", "rename", "unlink"):
            out.add(i)
    return out


def prefix_lengths(events: Sequence[Event], budget: int | None, rng: random.Random) -> list[int]:
    """Which prefix lengths to try: all of them when ``budget`` is None or the log is
    short; else both sides of every flush (sampled down if there are too many), the
    ends, and a random sample of the rest."""
    n = len(events)
    if budget is None or n + 1 <= budget:
        return list(range(n + 1))
    flushes = sorted(
        {j for i, e in enumerate(events) if e.kind == "flush" for j in (i, i + 1)} - {0, n}
    )
    limit = budget * 3 // 4
    if len(flushes) > limit:
        flushes = rng.sample(flushes, limit)
    chosen = {0, n, *flushes}
    rest = [k for k in range(n + 1) if k not in chosen]
    chosen.update(rng.sample(rest, min(len(rest), budget - len(chosen))))
    return sorted(chosen)


def crash_states(
    pristine: dict[str, bytes],
    events: Sequence[Event],
    *,
    exhaustive: bool = False,
    seed: int | str = 0,
) -> list[Crash]:
    """The distinct crashed states for the chosen prefixes, in every mode.

    By default at most ``DEFAULT_PREFIXES`` prefixes, a torn write is cut after its
    first sector and at one random boundary, and a few random scatters are drawn per
    prefix.  ``exhaustive``: every prefix, every cut, eight scatters per prefix.
    """
    rng = random.Random(seed)
    seen: set[tuple[tuple[str, str | None], ...]] = set()
    out: list[Crash] = []

    def add(k: int, mode: str, files: dict[str, bytes | None]) -> None:
        key = tuple(
            sorted(
                (p, None if c is None else hashlib.blake2b(c, digest_size=16).hexdigest())
                for p, c in files.items()
            )
        )
        if key not in seen:
            seen.add(key)
            out.append(Crash(k, mode, files, events))

    ks = prefix_lengths(events, None if exhaustive else DEFAULT_PREFIXES, rng)
    # short logs leave room in the budget: spend it on more random outcomes per prefix
    scatters = 8 if exhaustive else max(1, min(4, DEFAULT_PREFIXES // len(ks)))
    for k in ks:
        prefix = events[:k]
        add(k, "all", _apply(pristine, prefix, {}))
        lost = sorted(_unflushed(prefix))
        if lost:
            add(k, "lost", _apply(pristine, prefix, dict.fromkeys(lost, False)))
        last = prefix[-1] if prefix else None
        if last is not None and last.kind == "write":
            pieces = _sector_pieces(last.offset, len(last.data))
            if len(pieces) < 2:
                cuts = []
            elif exhaustive:
                cuts = list(range(1, len(pieces)))
            else:
                cuts = sorted({1, rng.randrange(1, len(pieces))})
            for cut in cuts:
                torn: Landing = {k - 1: [(pieces[0][0], pieces[cut - 1][1])]}
                add(k, f"torn after {cut} sector(s)", _apply(pristine, prefix, torn))
        for _ in range(scatters if lost else 0):
            scatter: Landing = {}
            for i in lost:
                e = prefix[i]
                if e.kind == "write":
                    pieces = _sector_pieces(e.offset, len(e.data))
                    scatter[i] = [p for p in pieces if rng.random() < 0.5]
                else:
                    scatter[i] = rng.random() < 0.5
            add(k, "scatter", _apply(pristine, prefix, scatter))
    return out


def materialise(crash: Crash, pristine_dir: str, dest: str) -> None:
    """Lay the crashed state out in ``dest``, mirroring the recorded directory."""
    for dirpath, _, names in os.walk(pristine_dir):
        rel_dir = os.path.relpath(dirpath, pristine_dir)
        os.makedirs(os.path.join(dest, rel_dir), exist_ok=True)
        for name in names:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel not in crash.files:
                os.link(os.path.join(dirpath, name), os.path.join(dest, rel))
    for rel, content in crash.files.items():
        if content is None:
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)


Judge = Callable[[str, Crash], None]


def run_states(crashes: Sequence[Crash], pristine_dir: str, work_dir: str, judge: Judge) -> None:
    """Judge every crashed state; fail listing the first few states the judge rejected."""
    os.makedirs(work_dir, exist_ok=True)

    def one(n: int) -> str | None:
        crash = crashes[n]
        dest = os.path.join(work_dir, f"state{n}")
        try:
            materialise(crash, pristine_dir, dest)
            judge(dest, crash)
        except AssertionError as e:
            return f"{crash.describe()}:\n  {e}"
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return None

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failures = [f for f in pool.map(one, range(len(crashes))) if f is not None]
    if failures:
        shown = "\n".join(failures[:5])
        raise AssertionError(
            f"{len(failures)} of {len(crashes)} crashed states are bad; first ones:\n{shown}"
        )


# -- QEMU's verdicts ---------------------------------------------------------------------


def run(
    args: Sequence[str], *, ok: Sequence[int] = (0,), cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode not in ok:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}".strip()
        )
    return proc


def check(path: str, fmt: str = "qcow2") -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit status, report or the error text)."""
    proc = run(["qemu-img", "check", "--output=json", "-f", fmt, path], ok=range(256))
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"error": (proc.stdout + proc.stderr).strip()}
    return proc.returncode, report


def assert_check_ok(path: str) -> dict[str, Any]:
    """No corruption and no check errors (leaks allowed): exit status 0 or 3."""
    rc, report = check(path)
    if rc not in (0, 3) or report.get("corruptions", 0) != 0 or report.get("check-errors", 0) != 0:
        human = run(["qemu-img", "check", "-f", "qcow2", path], ok=range(256))
        raise AssertionError(
            f"qemu-img check exited {rc}: {report}\n{human.stdout}{human.stderr}".strip()
        )
    return report


def info(path: str) -> dict[str, Any]:
    proc = run(["qemu-img", "info", "--output=json", path])
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def qemu_read(path: str, fmt: str = "qcow2") -> bytes:
    """The disk as QEMU reads it (``qemu-img convert -O raw``)."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        out = os.path.join(tmp, "disk.raw")
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out])
        with open(out, "rb") as f:
            return f.read()


def chainfs_read(path: str) -> bytes:
    """The disk as chainfs reads it (read-only open)."""
    with Chain.open(path) as chain:
        return bytes(chain.read(0, chain.size))


def has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == QCOW2_MAGIC
    except FileNotFoundError:
        return False


def header_field(path: str, offset: int, size: int = 8) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(size), "big")


# -- what the guest may see --------------------------------------------------------------


class Guest:
    """The guest operations a test makes through a chain, and the disk after each.

    ``states[i]`` is the disk after operation ``i`` (``states[0]`` before any).  After a
    crash at prefix ``k`` every region must read as some ``states[i]`` with ``lo <= i <=
    hi``: ``lo`` counts the operations a completed flush made durable, ``hi`` those
    that had started.
    """

    def __init__(self, rec: Recorder, initial: bytes) -> None:
        self.rec = rec
        self.states = [initial]
        self.starts = [0]
        self.durable: list[tuple[int, int]] = [(0, 0)]  # (event index, operations)

    def _op(self, chain: Chain, run_op: Callable[[bytearray], None]) -> None:
        self.starts.append(self.rec.mark())
        disk = bytearray(self.states[-1])
        run_op(disk)
        self.states.append(bytes(disk))

    def write(self, chain: Chain, offset: int, data: bytes) -> None:
        def op(disk: bytearray) -> None:
            chain.write(offset, data)
            disk[offset : offset + len(data)] = data

        self._op(chain, op)

    def write_zeroes(self, chain: Chain, offset: int, length: int) -> None:
        def op(disk: bytearray) -> None:
            chain.write_zeroes(offset, length)
            disk[offset : offset + length] = bytes(length)

        self._op(chain, op)

    def discard(self, chain: Chain, offset: int, length: int) -> None:
        def op(disk: bytearray) -> None:
            chain.discard(offset, length)
            disk[offset : offset + length] = bytes(length)

        self._op(chain, op)

    def flush(self, chain: Chain) -> None:
        chain.flush()
        self.durable.append((self.rec.mark(), len(self.states) - 1))

    def close(self, chain: Chain) -> None:
        chain.close()
        self.durable.append((self.rec.mark(), len(self.states) - 1))

    def bounds(self, k: int) -> tuple[int, int]:
        lo = max(ops for end, ops in self.durable if end <= k)
        hi = max(i for i, start in enumerate(self.starts) if i == 0 or start < k)
        return lo, hi


def assert_old_or_new(disk: bytes, states: Sequence[bytes], grain: int) -> None:
    """Every ``grain``-aligned chunk of ``disk`` equals that chunk in one of ``states``."""
    if any(disk == s for s in states):
        return
    sizes = {len(s) for s in states}
    if sizes != {len(disk)}:
        raise AssertionError(f"the disk is {len(disk)} bytes, expected {sorted(sizes)}")
    view = memoryview(disk)
    last = memoryview(states[-1])
    others = [memoryview(s) for s in states[:-1]]
    for a in range(0, len(disk), grain):
        chunk = view[a : a + grain]
        if chunk == last[a : a + grain] or any(chunk == s[a : a + grain] for s in others):
            continue
        raise AssertionError(
            f"bytes [{a:#x}, +{grain:#x}) read as neither of the {len(states)} allowed "
            f"contents (first bytes {bytes(chunk[:16]).hex()}, allowed "
            f"{[bytes(s[a : a + 16]).hex() for s in (*others, last)]})"
        )
