"""Many hosts on one NFSv4.2 store, in the lab (``tests/lab``): one guest booted per
session, its export mounted at ``/shared`` on hosts ``a`` and ``b``; each test works in
a directory of its own there.

The tests skip, saying why, when the lab cannot start (no qemu-system-x86_64, no
kernel package to fetch), except in CI (``CI=true``), where that is a failure: CI's
``scripts/test`` installs what the lab needs.

A chainfs mount on a host is ``python -m chainfs mount -f`` run in that host's
namespaces with this checkout first on the module path, logging to a file in the
guest; a failing test gets the logs of its mounts and the guest's console attached.
Contents are judged against a ``Model`` of every byte written, by digest, and every
image by ``qemu-img check``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from jobwait import JobWaits, poll
from lab.lab import LEASE, Lab, LabError, LabUnavailable, Result, code_tree, python_env

from chainfs.control import parse_line

T = TypeVar("T")
KiB, MiB = 1024, 1024 * 1024
DEADLINE = 120.0  # anything may take this long in the lab (TCG on a loaded machine)
POLL = 0.2  # seconds between two looks (each one a command run in the guest)
PY = sys.executable
REPO_CHAINFS = code_tree() / "chainfs"
LOGS = "/run/chainfs-logs"  # the mounts' logs, in the guest
_counter = itertools.count(1)
_MOUNTS: list[ChainfsMount] = []
_LAB: list[Lab] = []


def wait_for(cond: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``cond`` until it returns something true; fail after ``timeout`` seconds."""
    return poll(cond, what, timeout, POLL)


class _Boot(threading.Thread):
    """The lab coming up (booted, the export mounted on both hosts, each holding a lock
    there: 6-8 s under TCG on a quiet machine) while the layers before this one run;
    the ``lab`` fixture takes what it made."""

    def __init__(self) -> None:
        super().__init__(name="nfs-lab-boot", daemon=True)
        self.lab: Lab | None = None
        self.error: BaseException | None = None
        self.taken = False
        self.ready = threading.Event()
        self.over = threading.Event()

        self.seconds = 0.0  # booted to both hosts holding a lock on the export

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.lab = _bring_up()
            self.seconds = time.monotonic() - t0
        except BaseException as e:  # the fixture raises it, in the test that asks
            self.error = e
        self.ready.set()
        # the guest dies with the thread that started it (PR_SET_PDEATHSIG): this one
        # lives until the session is over
        self.over.wait()


def _bring_up() -> Lab:
    """The lab booted: its init has mounted the export on both hosts, each of which
    took a first lock there."""
    lab = Lab.start()
    try:
        lab.run(None, ["mkdir", "-p", LOGS])
    except BaseException:
        lab.close()
        raise
    return lab


_BOOTS: list[_Boot] = []


def _boot() -> _Boot:
    if not _BOOTS:
        _BOOTS.append(_Boot())
        _BOOTS[0].start()
    return _BOOTS[0]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the lab now when a test of this layer is to run (the layers run in order,
    this one last: it boots while the others run)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for item in session.items:
        if (
            str(item.path).startswith(here + os.sep)
            and "lab" in getattr(item, "fixturenames", ())
            and not item.get_closest_marker("skip")
        ):
            _boot()
            return


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Which accelerator the lab ran under, and its boot to first test."""
    for boot in _BOOTS:
        if boot.lab is not None:
            terminalreporter.write_line(
                f"the NFS lab ran under {boot.lab.describe()}: booted in "
                f"{boot.lab.boot_seconds:.1f} s, first test ready after {boot.seconds:.1f} s"
            )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Power off a lab that booted but no test took (a run stopped early)."""
    for boot in _BOOTS:
        boot.ready.wait()
        if boot.lab is not None and not boot.taken:
            boot.lab.close()
        boot.over.set()


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The lab, booted once; both hosts have the export mounted at ``/shared``."""
    boot = _boot()
    boot.ready.wait()
    if isinstance(boot.error, LabUnavailable):
        if os.environ.get("CI") == "true":
            pytest.fail(f"the NFS lab cannot start in CI: {boot.error}")
        pytest.skip(f"the NFS lab cannot start: {boot.error}")
    if boot.error is not None:
        raise boot.error
    assert boot.lab is not None
    lab, boot.taken = boot.lab, True
    _LAB.append(lab)
    try:
        yield lab
    finally:
        _LAB.remove(lab)
        lab.close()


class Model:
    """What a disk must hold: every byte written, in order."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.data[offset : offset + length] = bytes([pattern]) * length

    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class ChainfsMount(JobWaits):
    """One chainfs daemon on a lab host, and the ways a test talks to its mount."""

    deadline, interval = DEADLINE, POLL

    def __init__(self, lab: Lab, host: str, source: str, mountpoint: str, args: Sequence[str]):
        self.lab, self.host, self.source, self.mountpoint = lab, host, source, mountpoint
        self.args = list(args)
        self.log = f"{LOGS}/{host}-{next(_counter)}.log"
        self.pid: int | None = None
        _MOUNTS.append(self)

    def start(self, wait: bool = True) -> ChainfsMount:
        self.lab.run(self.host, ["mkdir", "-p", self.mountpoint])
        args = ["mount", "-f", self.source, self.mountpoint, *self.args]
        self.pid = self.lab.spawn_chainfs(self.host, args, self.log)
        if wait:
            self.wait_mounted()
        return self

    def wait_mounted(self) -> None:
        """Until the mount serves, in one command looking every 0.1 s in the guest (a
        look from here is a command through the agent: 0.2-0.7 s under TCG, each one
        taking the guest's CPU from the daemon starting); fails when the daemon exits."""
        dead = "exit 3"  # (a zombie: the agent reaps it only when asked)
        cond = (
            f"test -e {self.mountpoint}/control/.status || {{ st=Z; "
            f"read -r _ _ st _ </proc/{self.pid}/stat 2>/dev/null || true; "
            f'[ "$st" != Z ] || {dead}; false; }}'
        )
        r = self.lab.wait_until(self.host, cond, DEADLINE)
        if r.rc == 3:
            raise AssertionError(f"chainfs on {self.host} exited:\n{self.log_text()}")
        assert r.rc == 0, f"timed out waiting for chainfs to mount on {self.host}: {r}"

    def alive(self) -> bool:
        return self.pid is not None and self.lab.wait(self.pid, timeout=0).rc is None

    def exit_status(self, timeout: float = DEADLINE) -> int | None:
        assert self.pid is not None
        return self.lab.wait(self.pid, timeout=timeout).rc

    def kill(self, sig: str = "SIGKILL") -> None:
        assert self.pid is not None
        self.lab.signal(self.pid, sig)

    def sh(self, script: str, **kw: Any) -> Result:
        return self.lab.sh(self.host, script, env=python_env(), **kw)

    def chainfs(self, *args: str, check: bool = True, timeout: float = DEADLINE) -> Result:
        return self.lab.chainfs(self.host, args, check=check, timeout=timeout)

    def log_text(self) -> str:
        return self.lab.run(None, ["cat", self.log], check=False).out

    def img(self, chain: str) -> str:
        return f"{self.mountpoint}/{chain}.img"

    def control(self, chain: str, name: str) -> str:
        return f"{self.mountpoint}/control/{chain}/{name}"

    def lines(self, chain: str, name: str) -> list[dict[str, str]]:
        text = self.sh(f"cat {self.control(chain, name)}").out
        return [parse_line(line) for line in text.splitlines()]

    def events(self, chain: str) -> list[dict[str, str]]:
        return self.lines(chain, "events")

    def command(self, chain: str, kind: str, text: str, check: bool = True) -> Result:
        return self.sh(
            f"printf '%s\\n' {shlex.quote(text)} > {self.control(chain, kind)}", check=check
        )

    def write(self, chain: str, model: Model, offset: int, length: int, pattern: int) -> None:
        """Write ``pattern`` bytes to the flat file (O_DIRECT, fsync'ed) and the model."""
        self.sh(writer_script(self.img(chain), offset, length, pattern))
        model.write(offset, length, pattern)

    def digest(self, chain: str) -> str:
        return self.sh(f"sha256sum < {self.img(chain)}").out.split()[0]

    def unmount(self) -> None:
        self.sh(f"fusermount3 -u {self.mountpoint}")
        rc = self.exit_status()
        assert rc == 0, f"chainfs on {self.host} exited {rc}:\n{self.log_text()}"

    def cleanup(self) -> None:
        self.lab.run(self.host, ["fusermount3", "-u", "-z", self.mountpoint], check=False)
        if self.pid is not None and self.alive():
            self.kill("SIGTERM")
            if self.lab.wait(self.pid, timeout=10).rc is None:
                self.kill("SIGKILL")
                self.lab.wait(self.pid, timeout=10)


def writer_script(paths: str | Sequence[str], offset: int, length: int, pattern: int) -> str:
    """A shell line writing ``length`` bytes of ``pattern`` at ``offset`` of each of
    ``paths`` (one python for them all: each start costs most of a second under TCG)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return (
        f"{PY} -S -c 'import os,sys\nfor p in sys.argv[1:]:\n fd=os.open(p,os.O_WRONLY);"
        f"os.pwrite(fd,bytes([{pattern}])*{length},{offset});os.fsync(fd);os.close(fd)' "
        f"{shlex.join(paths)}"
    )


# what runs a shell line for each of the words before it (as $1), three at a time (the
# guest has two CPUs; qemu-img's start, under TCG, is most of a check's time)
PARALLEL = "| xargs -n 1 -P 3 sh -c"


class Site:
    """A test's directory on the store, seen from both hosts at ``/shared/NAME`` (and
    from the server at ``/srv/NAME``), and the chainfs mounts the test started."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.dir = f"/shared/{name}"
        self.server_dir = f"/srv/{name}"
        self.mounts: list[ChainfsMount] = []
        lab.run("a", ["mkdir", "-p", self.dir])

    def mount(self, host: str, *args: str, wait: bool = True) -> ChainfsMount:
        mp = f"/run/mnt/{self.name}-{host}{len(self.mounts)}"
        m = ChainfsMount(self.lab, host, self.dir, mp, args)
        self.mounts.append(m)
        return m.start(wait=wait)

    def sh(self, host: str | None, script: str, **kw: Any) -> Result:
        return self.lab.sh(host, f"cd {self.dir if host else self.server_dir} && {script}", **kw)

    def make_chain(self, chain: str, depth: int, size: int, model: Model) -> list[str]:
        """A chain ``CHAIN-0.qcow2 <- ... <- CHAIN.qcow2`` of ``depth`` layers, made on
        host a by qemu-img/qemu-io, each layer with writes of its own (in the model)."""
        names = [f"{chain}-{i}.qcow2" for i in range(depth - 1)] + [f"{chain}.qcow2"]
        script = []
        for i, name in enumerate(names):
            if i == 0:
                script.append(f"qemu-img create -q -f qcow2 {name} {size}")
            else:
                script.append(
                    f"qemu-img create -q -f qcow2 -F qcow2 -b {names[i - 1]} {name} {size}"
                )
            writes = []
            for k in range(4):
                off = ((i * 7 + k * 13) % (size // (256 * KiB))) * 256 * KiB
                pattern = 0x10 + i * 16 + k
                writes.append(f"-c 'write -P {pattern} {off} {192 * KiB}'")
                model.write(off, 192 * KiB, pattern)
            script.append(f"qemu-io -f qcow2 {' '.join(writes)} {name} >/dev/null")
        self.sh("a", " && ".join(script))
        return names

    def check_images(self, names: Iterable[str], leaks: bool = False) -> None:
        """``qemu-img check`` clean for each image (on the server: no NFS cache), in one
        command; ``leaks``: leaked clusters allowed (exit status 3, "no harm to data":
        what a daemon killed in the middle of a cluster's allocation leaves), no
        corruption."""
        names = list(names)
        one = (
            'r=0; qemu-img check -U "$1" >/tmp/check.$$ 2>&1 || r=$?; '
            'echo "rc=$r $1"; [ $r = 0 ] || cat /tmp/check.$$; rm -f /tmp/check.$$'
        )
        out = self.sh(
            None, f"printf '%s\\n' {shlex.join(names)} {PARALLEL} {shlex.quote(one)} _"
        ).out
        rcs = {line.split()[1]: line.split()[0] for line in out.splitlines() if line[:3] == "rc="}
        assert set(rcs) == set(names), out
        bad = [n for n, rc in rcs.items() if not (rc == "rc=0" or (leaks and rc == "rc=3"))]
        assert not bad, f"qemu-img check {bad}:\n{out}"

    def existing(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are files in the directory (as the server has it)."""
        there = set(self.sh(None, "ls -1").out.split())
        return [n for n in names if n in there]

    def digest(self, active: str) -> str:
        """The chain's content from QEMU's reading (on the server)."""
        return self.digests([active])[active]

    def digests(self, actives: Iterable[str]) -> dict[str, str]:
        """The content of each chain (named by its active layer) from QEMU's reading
        (on the server), in one command."""
        actives = list(actives)
        one = (
            'raw=/tmp/digest.$$; qemu-img convert -U -O raw "$1" $raw; '
            'echo "$1 $(sha256sum < $raw)"; rm -f $raw'
        )
        out = self.sh(
            None, f"printf '%s\\n' {shlex.join(actives)} {PARALLEL} {shlex.quote(one)} _"
        ).out
        digests = {w[0]: w[1] for w in map(str.split, out.splitlines()) if len(w) > 1}
        assert set(digests) == set(actives), out
        return digests

    def close(self) -> None:
        for m in reversed(self.mounts):
            m.cleanup()
        for h in ("a", "b"):
            self.lab.heal(h)
        self.lab.run(None, ["rm", "-rf", self.server_dir], check=False)


@pytest.fixture
def site(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Site]:
    name = "t" + str(next(_counter))
    s = Site(lab, name)
    try:
        yield s
    finally:
        s.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _LAB:
        for m in _MOUNTS:
            try:
                tail = "\n".join(m.log_text().splitlines()[-150:])
            except LabError:
                break
            report.sections.append((f"chainfs on {m.host} {m.log}", tail))
        _MOUNTS.clear()
        report.sections.append(("lab console", _LAB[0].console(8000)))
    return report


__all__ = ["DEADLINE", "LEASE", "ChainfsMount", "KiB", "MiB", "Model", "Site", "wait_for"]
