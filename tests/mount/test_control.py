"""Every way a control-file command is refused, with the SPEC's errno.

Each refused write must fail with its errno, leave exactly one ``COMMAND_REJECTED`` line
(with the command and a reason) in ``events``, and change nothing: no file created or
modified in any directory involved, the chain as it was.  One mount serves the seed
chain with a raw base, next to a symlink that escapes the source directory, a dangling
symlink, an allowed directory and two look-alike siblings that are not allowed.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from chainfs.eventlog import EVENTS_DIR
from chainfs.ownership import OWNER_SUFFIX

from .conftest import (
    CHAINFS,
    DEADLINE,
    Mount,
    Mounter,
    Seed,
    Seeds,
    assert_clean,
    assert_flat,
    digests,
    expect_refusals,
    root_only,
    run,
    wait_for,
)


@dataclass
class Setup:
    root: Path
    seed: Seed
    mount: Mount

    @property
    def images(self) -> Path:
        return self.root / "images"


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks as their targets) with a digest of its bytes,
    but for the events history, where a refused command's reason goes by design, and the
    owner files, whose heartbeat is the time."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != EVENTS_DIR]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.suffix == OWNER_SUFFIX:
                continue
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = im.file_digests([str(p)])[str(p)]
    return out


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter, seeds: Seeds
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("control")
    seed = seeds(root / "images", base_format="raw")
    for d in ("outside", "allowed", "allowed2", "images2"):
        (root / d).mkdir()
    (root / "allowed" / "taken.qcow2").write_bytes(b"not an image")
    (root / "images" / "escape").symlink_to(root / "outside")
    (root / "images" / "dangling.qcow2").symlink_to(root / "outside" / "nothing.qcow2")
    m = module_mounter(root / "images", f"allow_dir={root / 'allowed'}")
    yield Setup(root, seed, m)


def refuse(s: Setup, kind: str, text: str, err: int) -> str:
    """The command is refused with ``err`` and a COMMAND_REJECTED event; nothing changed."""
    before = tree(s.root)
    layers = s.mount.layers("E")
    event = s.mount.refuse("E", kind, text, err)
    assert tree(s.root) == before
    assert s.mount.layers("E") == layers
    assert s.mount.lines("E", "jobs") == []
    return event["reason"]


EINVAL_CASES = [
    ("stream", "foo=bar"),
    ("stream", "base=A.raw foo=bar"),
    ("stream", 'base="A.raw'),
    ("stream", "base=A.raw base=A.raw"),
    ("stream", "A.raw base=A.raw"),
    ("stream", "A.raw B.qcow2"),
    ("stream", "base="),
    ("stream", "speed=fast"),
    ("stream", "speed=-1"),
    ("stream", ""),
    ("stream", "base=nope.qcow2"),
    ("stream", "node=nope.qcow2"),
    ("stream", "base=/etc/passwd"),
    ("stream", "node=B.qcow2 base=D.qcow2"),
    ("stream", "node=C.qcow2 base=C.qcow2"),
    ("stream", "base=E.qcow2"),
    ("stream", "node=A.raw"),
    ("snapshot", ""),
    ("snapshot", "one.qcow2 two.qcow2"),
    ("snapshot", "new.qcow2 speed=1M"),
    ("cancel", ""),
    ("complete", ""),
    ("commit", "foo=bar"),
    ("commit", "wait=now"),
    ("copy", ""),
    ("copy", "dest.qcow2 sync=none"),
]


@pytest.mark.parametrize(("kind", "text"), EINVAL_CASES)
@expect_refusals
def test_einval(setup: Setup, kind: str, text: str) -> None:
    refuse(setup, kind, text, errno.EINVAL)


@expect_refusals
def test_reasons_name_the_broken_constraint(setup: Setup) -> None:
    assert refuse(setup, "stream", "base=nope.qcow2", errno.EINVAL) == (
        "'nope.qcow2' is not a layer of chain 'E'"
    )
    assert refuse(setup, "stream", "node=B.qcow2 base=D.qcow2", errno.EINVAL) == (
        "'D.qcow2' is not below 'B.qcow2' in chain 'E'"
    )
    assert "raw" in refuse(setup, "stream", "node=A.raw", errno.EINVAL)
    assert "foo" in refuse(setup, "stream", "foo=bar", errno.EINVAL)


@expect_refusals
def test_layers_by_absolute_path(setup: Setup) -> None:
    b, d = setup.seed.layer("B"), setup.seed.layer("D")
    refuse(setup, "stream", f"node={b} base={d}", errno.EINVAL)


@pytest.mark.parametrize(
    ("text", "err"),
    [
        ("D.qcow2", errno.EEXIST),
        ("E.qcow2", errno.EEXIST),
        ("dangling.qcow2", errno.EEXIST),
        ("{root}/allowed/taken.qcow2", errno.EEXIST),
        ("missing/new.qcow2", errno.ENOENT),
        ("{root}/nowhere/new.qcow2", errno.ENOENT),
        ("../outside/new.qcow2", errno.EACCES),
        ("{root}/outside/new.qcow2", errno.EACCES),
        ("escape/new.qcow2", errno.EACCES),
        ("{root}/images/escape/new.qcow2", errno.EACCES),
        ("{root}/allowed/../outside/new.qcow2", errno.EACCES),
        ("{root}/allowed2/new.qcow2", errno.EACCES),
        ("{root}/images2/new.qcow2", errno.EACCES),
        ("../new.qcow2", errno.EACCES),
    ],
)
@expect_refusals
def test_snapshot_targets(setup: Setup, text: str, err: int) -> None:
    refuse(setup, "snapshot", text.format(root=setup.root), err)


@expect_refusals
def test_no_such_job(setup: Setup) -> None:
    refuse(setup, "cancel", "stream-99", errno.ENOENT)
    refuse(setup, "complete", "stream-99", errno.ENOENT)


def test_control_files_keep_their_direction(setup: Setup) -> None:
    m = setup.mount
    for name in ("stream", "snapshot", "cancel"):
        with pytest.raises(OSError) as exc:
            os.open(m.control("E", name), os.O_RDONLY)
        assert exc.value.errno == errno.EACCES
    for name in ("chain", "jobs", "events"):
        with pytest.raises(OSError) as exc:
            os.open(m.control("E", name), os.O_WRONLY)
        assert exc.value.errno == errno.EACCES
    with pytest.raises(OSError) as exc:
        m.command("nochain", "stream", "")
    assert exc.value.errno == errno.ENOENT


@expect_refusals
def test_command_line_says_why(setup: Setup) -> None:
    proc = subprocess.run(
        [*CHAINFS, "stream", str(setup.mount.mountpoint), "E", "base=nope.qcow2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == "chainfs: stream refused: 'nope.qcow2' is not a layer of chain 'E'\n"


@expect_refusals
def test_ebusy_while_a_job_runs(setup: Setup) -> None:
    m = setup.mount
    listing = sorted(os.listdir(setup.images))
    job = m.start_job("E", "stream", "base=A.raw speed=64K")
    jobs = m.lines("E", "jobs")
    assert [j["id"] for j in jobs] == [job]
    for kind, text in [
        ("stream", "base=A.raw"),
        ("stream", "node=D.qcow2 base=B.qcow2"),
        ("snapshot", "new.qcow2"),
    ]:
        reason = m.refuse("E", kind, text, errno.EBUSY)["reason"]
        assert job in reason
        assert [j["id"] for j in m.lines("E", "jobs")] == [job]
    # a bad command is still refused for what it is, not as busy
    m.refuse("E", "stream", "foo=bar", errno.EINVAL)
    m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    wait_for(lambda: m.lines("E", "jobs") == [], "the jobs file to empty")
    assert sorted(os.listdir(setup.images)) == listing
    assert m.layers("E") == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.raw"]


def test_erofs_on_a_read_only_mount(
    tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter, seeds: Seeds
) -> None:
    """The kernel refuses to open a control file for writing on a read-only mount, so
    the command never reaches chainfs (and ``events`` stays empty)."""
    root = tmp_path_factory.mktemp("erofs")  # the module's mount outlives this test
    seeds(root / "images")
    m = module_mounter(root / "images", "ro")
    before = tree(root)
    for kind, text in [("snapshot", "new.qcow2"), ("stream", "base=A.qcow2"), ("cancel", "x")]:
        with pytest.raises(OSError) as exc:
            m.command("E", kind, text)
        assert exc.value.errno == errno.EROFS
    assert m.events("E") == []
    assert tree(root) == before


@root_only
@expect_refusals
def test_enospc_leaves_nothing_behind(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """A snapshot that runs out of space is refused with ENOSPC and leaves no partial
    overlay behind, neither now nor for the next mount to clean up."""
    images, tiny = tmp_path / "images", tmp_path / "tiny"
    seed = seeds(images)
    tiny.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", tiny)
    try:
        m = mounter(images, f"allow_dir={tiny}")
        before = digests(seed.layers[:-1])
        reason = m.refuse("E", "snapshot", f"{tiny}/S.qcow2", errno.ENOSPC)["reason"]
        assert "No space left on device" in reason
        assert os.listdir(tiny) == []
        assert m.layers("E") == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
        model = bytearray(seed.content)
        with open(m.img("E"), "r+b", buffering=0) as f:
            f.write(b"\x5a" * 10000)
            os.fsync(f.fileno())
        model[:10000] = b"\x5a" * 10000
        assert_flat(m.img("E"), model)
        history = m.events("E")
        m.unmount()
        assert digests(seed.layers[:-1]) == before
        m = mounter(images, f"allow_dir={tiny}")
        assert m.events("E") == history  # the history, and nothing for recovery to do
        assert os.listdir(tiny) == []
        m.unmount()
    finally:
        run("umount", tiny, ok=(0, 32))
    assert_clean(seed.layers)


@expect_refusals
def test_tail_follows_events(setup: Setup) -> None:
    """``events`` only grows, and ``tail -f`` (and an open descriptor) see each new line."""
    m = setup.mount
    path = m.control("E", "events")
    fd = os.open(path, os.O_RDONLY)
    seen = len(os.read(fd, 1 << 20))
    wait_for(lambda: os.path.getsize(path) == seen, "events to settle")
    # from the byte after what is there now, wherever tail is when the line comes (with
    # ``-n 0`` a line written before tail looked for the end would be skipped)
    tail = subprocess.Popen(
        ["tail", "-c", f"+{seen + 1}", "-s", "0.1", "-f", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        m.refuse("E", "stream", "base=followed.qcow2", errno.EINVAL)
        new = os.read(fd, 1 << 20).decode()
        assert "COMMAND_REJECTED" in new and "followed.qcow2" in new, new
        assert os.path.getsize(path) == seen + len(new.encode())
        assert tail.stdout is not None
        ready, _, _ = select.select([tail.stdout], [], [], DEADLINE)
        assert ready, "tail -f printed nothing"
        line = tail.stdout.readline()
        assert "followed.qcow2" in line and "event=COMMAND_REJECTED" in line, line
    finally:
        tail.kill()
        tail.wait()
        os.close(fd)


@expect_refusals
def test_ebusy_for_a_layer_another_chain_reads(tmp_path: Path, mounter: Mounter) -> None:
    """Two chains of one mount share their lower layers (``[A] <- [S] <- [vm1]`` and
    ``[A] <- [S] <- [vm2]``): a job that would write into a shared layer is refused at
    once with EBUSY and a reason naming the other chain, and changes nothing; jobs that
    write only into what vm1 alone uses still run."""
    images = tmp_path / "images"
    images.mkdir()
    mib = 1 << 20
    a = im.create(str(images / "A.qcow2"), 8 * mib)
    im.write(a, [(0, 2 * mib, 0x11)])
    s = im.create(str(images / "S.qcow2"), backing="A.qcow2", cwd=str(images))
    im.write(s, [(mib, mib, 0x22)])
    for vm, pattern in (("vm1", 0x33), ("vm2", 0x44)):
        top = im.create(str(images / f"{vm}.qcow2"), backing="S.qcow2", cwd=str(images))
        im.write(top, [(3 * mib, mib, pattern)])
    paths = [images / f"{n}.qcow2" for n in ("A", "S", "vm1", "vm2")]
    before = digests(paths)
    contents = {vm: im.reference(str(images / f"{vm}.qcow2")) for vm in ("vm1", "vm2")}
    m = mounter(images)
    for kind, text, shared in [
        ("commit", "base=A.qcow2", "A.qcow2"),  # active commit into A
        ("commit", "base=S.qcow2", "S.qcow2"),  # active commit into S
        ("commit", "top=S.qcow2 base=A.qcow2", "A.qcow2"),  # intermediate commit into A
        ("stream", "node=S.qcow2", "S.qcow2"),  # stream into S
    ]:
        reason = m.refuse("vm1", kind, text, errno.EBUSY)["reason"]
        assert shared in reason and "'vm2'" in reason, (text, reason)
        assert m.lines("vm1", "jobs") == []
    assert digests(paths) == before
    assert m.layers("vm1") == ["vm1.qcow2", "S.qcow2", "A.qcow2"]
    # writing only into vm1 is fine: stream everything below into it
    m.run_job("vm1", "stream", "speed=0")
    assert m.layers("vm1") == ["vm1.qcow2"]
    for vm in ("vm1", "vm2"):
        assert_flat(m.img(vm), contents[vm])
    m.unmount()
    assert digests(paths[:2]) == {k: before[k] for k in list(before)[:2]}
    assert_clean(paths)


# -- the writes through one open file ---------------------------------------------------------


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run("bash", "-c", script, cwd=cwd, ok=(0, 1))


def rejected(m: Mount) -> list[str]:
    return [e["reason"] for e in m.events("E") if e["event"] == "COMMAND_REJECTED"]


@expect_refusals
def test_lines_written_through_one_open_file_are_one_command(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """``printf 'base=A.qcow2\\nspeed=1M\\n' > stream``: bash writes each line on its
    own.  The first write started an unlimited stream and the second was refused with
    EBUSY; now the second write's speed= applies to the job the first one started, and
    a later write that would change the command, or continue a refused one, is refused
    at that write -- never a second command of its own."""
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    ctl = m.mountpoint / "control" / "E"
    proc = shell("printf 'base=A.qcow2\\nspeed=1M\\n' > stream", ctl)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    (job,) = m.lines("E", "jobs")
    assert job["id"] == "stream-1" and job["speed"] == str(1 << 20) and job["base"] == "A.qcow2"
    assert [e["event"] for e in m.events("E")].count("JOB_STARTED") == 1
    assert rejected(m) == []

    # a first write refused: its continuation is refused too, not run as a command
    proc = shell("printf 'stream-1\\n0\\n' > speed", ctl)
    assert proc.returncode == 1 and "write error: Invalid argument" in proc.stderr, proc.stderr
    assert m.lines("E", "jobs")[0]["speed"] == str(1 << 20)
    first, second = rejected(m)
    assert first == "speed takes a job and a rate, got 1 words"
    assert second.startswith("an earlier write through this open file was refused")
    run(*CHAINFS, "cancel", m.mountpoint, "E", "stream-1", "--wait")

    # a continuation that changes more than speed= comes too late: refused at its write,
    # what the first write started stays started
    proc = shell("printf 'node=D.qcow2 speed=1M\\n\\nbase=B.qcow2\\n' > stream", ctl)
    assert proc.returncode == 1 and "write error: Invalid argument" in proc.stderr, proc.stderr
    assert rejected(m)[-1] == (
        "a later write through the same open file changes base of the stream command "
        "carried out at its first write; only speed= can still change: write a command "
        "in one write"
    )
    (job,) = m.lines("E", "jobs")
    assert job["id"] == "stream-2" and job["node"] == "D.qcow2"
    run(*CHAINFS, "cancel", m.mountpoint, "E", "stream-2", "--wait")
