"""Real mounts for the tests in this directory, each served by a separate process.

A mount is ``python -m chainfs mount -f SOURCE MOUNTPOINT`` in a subprocess — never the
test's own trio loop, which would deadlock on its own requests.  The habits are
pyfuse3's (``test/util.py``): ``wait_for_mount`` polls ``os.path.ismount`` and fails at
once if the server died; teardown is always a lazy ``fusermount3 -u -z``, then
terminate, then kill.  The server logs to a file in the test's tmp directory; a failing
test gets the logs of its mounts attached to its report, and a clean unmount fails if
the server logged a traceback (an unexpected exception, which reaches the kernel as EIO).
The ``checklogs`` plugin reads what every server logged during each test phase: a
WARNING or ERROR line the test did not declare (``@pytest.mark.expect_log``) fails it.

Images are made and judged by QEMU's tools through ``interop.images``; the seed chain
``[A] <- [B] <- [C] <- [D] <- [E]`` comes from ``scripts/make-seed-chain``, built once per
session and copied (renamed, if asked) into each test's source directory.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from checklogs import watch
from interop import images as im
from jobwait import JobWaits, poll

from chainfs import features
from chainfs.control import parse_line

KiB, MiB = im.KiB, im.MiB
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
CHAINFS = (sys.executable, "-m", "chainfs")
DEADLINE = 60.0  # seconds anything may take on a loaded 2-core machine
POLL = 0.02  # seconds between two looks at what a test waits for
SEED_SIZE = 32 * MiB
LOG_TAIL = 150  # lines of a server log attached to a failure report

T = TypeVar("T")

# a refused command logs "chain=NAME command refused: REASON" (fs.py): what a test that
# refuses commands on purpose (``Mount.refuse``) declares
expect_refusals = pytest.mark.expect_log(r"WARNING chainfs\.fs: chain=\S+ command refused: ")

# tests that mount tmpfs or ext4, attach loop devices or enter a mount namespace
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup, unshare)")
# lseek(SEEK_DATA/SEEK_HOLE) and fallocate reach chainfs only through a pyfuse3 with
# those handlers (the patched one, see README): without, the kernel answers alone
holes_only = pytest.mark.skipif(
    not features.holes(),
    reason="this pyfuse3 has no lseek/fallocate handlers (install the patched one: README)",
)


def wait_for(cond: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``cond`` until it returns something true; fail after ``timeout`` seconds."""
    return poll(cond, what, timeout, POLL)


def run(*args: str | Path, ok: Sequence[int] = (0,), **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output unless its exit status is in ``ok``."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300, **kw)
    if proc.returncode not in ok:
        raise AssertionError(f"{argv} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


# -- the server ----------------------------------------------------------------------------

_MOUNTS: list[Mount] = []  # every mount of the session, for failure reports
_CURRENT_TEST = [""]


class Mount(JobWaits):
    """One ``chainfs mount -f`` server and the ways a test talks to its mount."""

    deadline, interval = DEADLINE, POLL

    def __init__(self, source: Path, mountpoint: Path, log: Path, options: Sequence[str]) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.log = log
        self.options = list(options)
        self.test = _CURRENT_TEST[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_read = 0  # how far checklogs has read the log
        self.log_done = False  # read to its end after the server exited
        _MOUNTS.append(self)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> Mount:
        args = [*CHAINFS, "mount", "-f", str(self.source), str(self.mountpoint)]
        for opt in self.options:
            args += ["-o", opt]
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_done = False
        with open(self.log, "ab") as log:
            log.write(f"==> {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_for_mount()
        return self

    def wait_for_mount(self) -> None:
        def mounted() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the server exited with status {self.proc.returncode} before mounting:\n"
                    + self.log_text()
                )
            return os.path.ismount(self.mountpoint)

        wait_for(mounted, f"the mount at {self.mountpoint}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def unmount(self) -> None:
        """Unmount cleanly (``fusermount3 -u``) and wait for the server to exit with 0.
        EBUSY is tried again for a while: on this shared machine another process (a
        ``find`` or ``du`` over /tmp) may stand in the mount for a moment."""
        for _ in range(50):
            proc = run("fusermount3", "-u", self.mountpoint, ok=(0, 1))
            if proc.returncode == 0 or "busy" not in proc.stderr:
                break
            time.sleep(0.1)
        assert proc.returncode == 0, f"fusermount3 -u {self.mountpoint}: {proc.stderr}"
        self.wait_exit(0)

    def wait_exit(self, status: int | None = 0) -> int:
        """Wait for the server to exit; check its status (unless None) and its log."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit:\n{self.log_text()}") from None
        if status is not None:
            assert rc == status, f"the server exited with {rc}:\n{self.log_text()}"
            self.assert_log_clean()
        return rc

    def assert_log_clean(self) -> None:
        """No traceback and no error in the server's log, but for pyfuse3 failing to
        answer a request the kernel dropped at unmount (a release racing the unmount)."""
        text = self.log_text()
        errors = [
            line
            for line in text.splitlines()
            if " ERROR " in line and not _DROPPED_AT_UNMOUNT.search(line)
        ]
        assert "Traceback" not in text and not errors, text

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def cleanup(self) -> None:
        """Whatever state it is in: lazy unmount, then terminate, then kill."""
        if os.path.ismount(self.mountpoint) or _is_dead_mount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def new_log_lines(self) -> list[str]:
        """The whole lines logged since the last call (a line still being written waits)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_read)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.log_read += end
        return data[:end].decode(errors="replace").splitlines()

    # -- the tree ----------------------------------------------------------------------------

    def img(self, chain: str) -> Path:
        return self.mountpoint / f"{chain}.img"

    def control(self, chain: str, name: str) -> Path:
        return self.mountpoint / "control" / chain / name

    def lines(self, chain: str, name: str) -> list[dict[str, str]]:
        """The ``key=value`` lines of a control file, parsed."""
        text = self.control(chain, name).read_text()
        return [parse_line(line) for line in text.splitlines()]

    def layers(self, chain: str) -> list[str]:
        """The chain's layer names, active first, as ``control/NAME/chain`` lists them."""
        return [x["name"] for x in self.lines(chain, "chain")]

    def events(self, chain: str) -> list[dict[str, str]]:
        return self.lines(chain, "events")

    def job_offset(self, chain: str) -> int | None:
        """The running job's ``offset`` (None: no job runs)."""
        jobs = self.lines(chain, "jobs")
        return int(jobs[0]["offset"]) if jobs else None

    def race_job(
        self, chain: str, kind: str, text: str, speed: int | str, guest: GuestThread
    ) -> str:
        """Start a job that ``guest``'s writes race, however loaded the machine: at a
        crawl (64 KiB/s) until the guest has made 20 writes with the job running, then
        at ``speed`` (``speed JOB RATE``)."""
        job = self.start_job(chain, kind, f"{text} speed=64K")
        guest.wait_writes(20)
        assert self.job_offset(chain) is not None, f"{job} ended before the guest wrote"
        self.command(chain, "speed", f"{job} {speed}")
        return job

    def status(self) -> list[dict[str, str]]:
        text = (self.mountpoint / "control" / ".status").read_text()
        return [parse_line(line) for line in text.splitlines()]

    def command(self, chain: str, kind: str, text: str) -> None:
        """One write to ``control/CHAIN/KIND``, as ``echo TEXT > ...`` does."""
        fd = os.open(self.control(chain, kind), os.O_WRONLY | os.O_TRUNC)
        try:
            data = (text + "\n").encode()
            assert os.write(fd, data) == len(data)
        finally:
            os.close(fd)

    def refuse(self, chain: str, kind: str, text: str, err: int) -> dict[str, str]:
        """Write a command that must fail with ``err``; return its COMMAND_REJECTED event."""
        before = len(self.events(chain))
        with pytest.raises(OSError) as exc:
            self.command(chain, kind, text)
        assert exc.value.errno == err, (
            f"{kind} {text!r}: {errno.errorcode.get(exc.value.errno or 0)} "
            f"instead of {errno.errorcode[err]}"
        )
        new = self.events(chain)[before:]
        assert [e["event"] for e in new] == ["COMMAND_REJECTED"], new
        assert new[0]["command"] == kind and new[0]["reason"], new
        return new[0]

    def run_job(self, chain: str, kind: str, text: str) -> dict[str, str]:
        """Start a job and wait for it to complete without error; return its last event."""
        job = self.start_job(chain, kind, text)
        end = self.wait_job(chain, job)
        assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
        return end


_DROPPED_AT_UNMOUNT = re.compile(
    r"ERROR pyfuse3: fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$"
)


_UNREAD: list[str] = []  # read ahead of ``checklogs`` (``Mounter.close``)


def _server_lines() -> list[str]:
    """What the servers logged since the last call, for ``checklogs``; a server that
    exited has its log read one last time, until it is started again."""
    lines, _UNREAD[:] = _UNREAD[:], []
    for m in _MOUNTS:
        if m.proc is None or m.log_done:
            continue
        m.log_done = m.proc.poll() is not None  # before the read: its last lines are in
        lines += (x for x in m.new_log_lines() if not _DROPPED_AT_UNMOUNT.search(x))
    return lines


watch(_server_lines)


def _is_dead_mount(path: Path) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


class Mounter:
    """Starts mounts (``mounter(source, *options)``) and tears every one of them down."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Mount] = []

    def __call__(
        self, source: Path, *options: str, mountpoint: Path | None = None, start: bool = True
    ) -> Mount:
        n = len(self.mounts)
        mp = mountpoint or self.root / f"mnt{n}"
        m = Mount(source, mp, self.root / f"server{n}.log", options)
        self.mounts.append(m)
        return m.start() if start else m

    def close(self) -> None:
        """Tear every mount down, and read what their servers logged last (``checklogs``
        reads it later, in the test's teardown: after a passed test's ``tmp_path``, where
        the logs are, was removed)."""
        for m in reversed(self.mounts):
            m.cleanup()
        _UNREAD.extend(_server_lines())


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def module_mounter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounter]:
    m = Mounter(tmp_path_factory.mktemp("mounts"))
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(autouse=True, scope="session")
def _prerequisites() -> None:
    missing = [t for t in ("fusermount3", "qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"mount tests need {', '.join(missing)} (install fuse3 and qemu-utils)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("mount tests need a usable /dev/fuse")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _CURRENT_TEST[0] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for m in _MOUNTS:
            if m.alive or m.test == item.nodeid:
                tail = "\n".join(m.log_text().splitlines()[-LOG_TAIL:])
                report.sections.append((f"chainfs server log {m.log}", tail))
    return report


# -- images ----------------------------------------------------------------------------------


@dataclass
class Seed:
    """A seed chain in a source directory: layers bottom first, and its flat content."""

    layers: list[Path]
    content: bytes

    @property
    def active(self) -> Path:
        return self.layers[-1]

    @property
    def name(self) -> str:
        """The chain's name: the active layer's file name without ``.qcow2``."""
        return self.active.name.removesuffix(".qcow2")

    def layer(self, letter: str) -> Path:
        """The layer whose name ends in ``letter`` (A..E) before its extension."""
        (found,) = [p for p in self.layers if p.name.split(".")[0].endswith(letter)]
        return found


class Seeds:
    """Seed chains from ``scripts/make-seed-chain``, built once per shape and copied."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.templates: dict[tuple[int, str], Seed] = {}

    def template(self, size: int, base_format: str) -> Seed:
        key = (size, base_format)
        if key not in self.templates:
            d = self.root / f"seed-{size}-{base_format}"
            script = SCRIPTS / "make-seed-chain"
            run(sys.executable, script, d, "--size", str(size), "--base-format", base_format)
            layers = [d / f"{x}.qcow2" for x in "BCDE"]
            layers.insert(0, d / f"A.{base_format}")
            self.templates[key] = Seed(layers, im.reference(str(layers[-1])))
        return self.templates[key]

    def __call__(
        self,
        directory: Path,
        prefix: str = "",
        *,
        size: int = SEED_SIZE,
        base_format: str = "qcow2",
    ) -> Seed:
        """Copy the seed chain into ``directory`` as PREFIX + A.qcow2 ... PREFIX + E.qcow2."""
        t = self.template(size, base_format)
        directory.mkdir(parents=True, exist_ok=True)
        layers: list[Path] = []
        for src in t.layers:
            dest = directory / (prefix + src.name)
            shutil.copyfile(src, dest)
            if layers and prefix:
                below = layers[-1]
                fmt = im.image_format(str(below))
                run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", below.name, "-F", fmt, dest)
            layers.append(dest)
        return Seed(layers, t.content)


def mixed_chain(directory: Path) -> Seed:
    """Four layers with cluster sizes 512 B, 2 MiB, 4 KiB and 64 KiB over 6 MiB + 1536 B
    (a disk that ends inside a page and inside a cluster)."""
    size = 6 * MiB + 1536
    sizes = [512, 2 * MiB, 4 * KiB, 64 * KiB]
    layers = [
        {
            "name": f"m{i}.qcow2",
            "create": {"cluster_size": cs},
            "writes": im.varied_writes(size, cs, 0x40 + i, salt=i),
        }
        for i, cs in enumerate(sizes)
    ]
    directory.mkdir(parents=True)
    paths, model = im.build_chain(str(directory), layers, size=size)
    return Seed([Path(p) for p in paths], bytes(model))


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("seeds"))


def digests(paths: Sequence[Path]) -> dict[str, str]:
    return im.file_digests(str(p) for p in paths)


def backing_chain(path: Path, *, force_share: bool = False) -> list[str]:
    """The file names of a chain as ``qemu-img info --backing-chain`` sees it, top first."""
    args = ["qemu-img", "info", "--backing-chain", "--output=json"]
    if force_share:
        args.append("-U")
    info = json.loads(run(*args, path).stdout)
    return [os.path.basename(x["filename"]) for x in info]


def backing_string(path: Path) -> str | None:
    """The backing file name as written in the image's header (None: no backing file)."""
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    value = info.get("backing-filename")
    return None if value is None else str(value)


def assert_clean(paths: Sequence[Path]) -> None:
    """``qemu-img check`` passes every qcow2 layer and no dirty bit is left set."""
    for p in paths:
        if im.image_format(str(p)) == "qcow2":
            im.assert_clean(str(p))
            assert not im.incompatible_features(str(p)) & im.INCOMPAT_DIRTY, p


def assert_content(active: Path, content: bytes | bytearray, tmp: Path) -> None:
    """``qemu-img compare``: the chain of ``active`` shows exactly ``content``."""
    tmp.mkdir(parents=True, exist_ok=True)
    im.assert_same_as(str(active), bytes(content), str(tmp))


def read_direct(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    """Read a flat file with O_DIRECT, past the page cache, so the server answers."""
    size = os.stat(path).st_size
    end = size if length is None else min(size, offset + length)
    piece = 1 << 20
    out = bytearray()
    buf = mmap.mmap(-1, piece)  # page aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        start = offset - offset % 4096
        pos = start
        while pos < end:
            n = os.preadv(fd, [buf], pos)
            assert n > 0, f"short read at {pos}"
            out += buf[:n]
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out[offset - start : end - start])


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    """Where two disk images first differ, for assertion messages."""
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            j = next(k for k in range(i, i + 4096) if a[k] != b[k])
            return f"first difference at byte {j} ({a[j]:#x} != {b[j]:#x})"
    return "identical"


def assert_flat(path: Path, content: bytes | bytearray) -> None:
    """The flat file, read past the page cache, is ``content``."""
    got = read_direct(path)
    assert got == content, first_difference(got, content)


@dataclass
class PivotChain:
    """``NAME-base.qcow2 <- NAME.qcow2`` in ``directory``, for the tests of a job that
    pivots (``commit``, ``copy-full``, ``copy-top``): how to start it, what it leaves."""

    directory: Path
    name: str

    @property
    def base(self) -> Path:
        return self.directory / f"{self.name}-base.qcow2"

    @property
    def dest(self) -> Path:
        """Where a copy goes."""
        return self.directory / f"{self.name}-dest.qcow2"

    def command(self, job: str, extra: str) -> tuple[str, str]:
        """The control file and the text that start ``job`` on this chain."""
        if job == "commit":
            return "commit", f"base={self.base.name} {extra}"
        sync = job.removeprefix("copy-")
        return "copy", f"{self.dest.name} sync={sync} {extra}"

    def after(self, job: str) -> tuple[Path, list[str]]:
        """The new active layer after the pivot, and the chain's layers then."""
        if job == "commit":
            return self.base, [self.base.name]
        if job == "copy-full":
            return self.dest, [self.dest.name]
        return self.dest, [self.dest.name, self.base.name]


# -- a guest --------------------------------------------------------------------------------


class GuestThread(threading.Thread):
    """The base of the tests' guests: a daemon thread running ``_loop``, which counts its
    writes in ``count``; what it raises is kept in ``error`` and re-raised by ``check()``
    (and so by ``wait_writes``)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            self.error = e

    def _loop(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the guest failed: {self.error!r}") from self.error

    def wait_writes(self, n: int) -> None:
        target = self.count + n

        def done() -> bool:
            self.check()
            return self.count >= target

        wait_for(done, f"{n} more guest writes")


class Writer(GuestThread):
    """A guest: random writes through one open descriptor of a flat file, mirrored in
    ``model``, with an fsync every ``fsync_every`` writes and, every few writes, an
    O_DIRECT read of a written range checked against the model.  With ``aim`` (say, a
    running job's offset) every other write lands within 1 MiB past what it returns,
    to race a job's copy on the very clusters it is about to copy.

    ``wait_writes(n)`` waits until ``n`` more writes were made; ``stop()`` ends the loop,
    fsyncs, closes and re-raises any error the thread met.
    """

    def __init__(
        self,
        path: Path,
        model: bytearray,
        *,
        seed: int,
        max_len: int = 96 * 1024,
        fsync_every: int = 32,
        aim: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.model = model
        self.rng = random.Random(seed)
        self.max_len = max_len
        self.fsync_every = fsync_every
        self.aim = aim
        self.synced = bytes(model)  # the model as of the last fsync
        self._stop_event = threading.Event()

    def _loop(self) -> None:
        rng, size = self.rng, len(self.model)
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self._stop_event.is_set():
                n = rng.randint(1, self.max_len)
                off = rng.randrange(0, size - n)
                target = self.aim() if self.aim is not None and self.count % 2 else None
                if target is not None:
                    off = min(size - n, target + rng.randrange(MiB))
                data = bytes(n) if rng.random() < 0.1 else rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                self.model[off : off + n] = data
                self.count += 1
                if self.count % self.fsync_every == 0:
                    os.fsync(fd)
                    self.synced = bytes(self.model)
                if self.count % 8 == 0:
                    a = off - off % 4096
                    got = read_direct(self.path, a, n + off - a)
                    want = self.model[a : off + n]
                    assert got == want, f"read back at {a}: " + first_difference(got, want)
            os.fsync(fd)
            self.synced = bytes(self.model)
        finally:
            os.close(fd)

    def wait_writes(self, n: int) -> None:
        target = self.count + n

        def done() -> bool:
            if self.error is not None:
                raise AssertionError(f"the writer failed: {self.error!r}") from self.error
            if not self.is_alive():
                raise AssertionError("the writer stopped")
            return self.count >= target

        wait_for(done, f"{n} more writes through {self.path}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=DEADLINE)
        assert not self.is_alive(), "the writer did not stop"
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error
