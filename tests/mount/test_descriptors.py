"""Many chains under a small ``RLIMIT_NOFILE`` (``prlimit`` on the command): chainfs
raises its soft limit to the hard one and serves every chain when that is enough; when it
is not (hard == soft), it serves what fits, keeps a reserve for requests, control files
and jobs, and refuses the rest one by one with EMFILE, the descriptors each one needs and
how to raise the limit.  ``chainfs mount`` never exits 0 without a mount: readiness is
reported only once the mount answers, so a daemon that fails after the kernel mounted
(simulated: a FUSE loop that cannot start) makes it exit 1 with the daemon's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from interop import images as im

from chainfs.control import parse_line

from . import conftest
from .conftest import CHAINFS, Mounter, run

CHAINS = 200
SMALL_LIMIT = 150  # fits some of the chains, after the reserve, not all

EMFILE_REFUSAL = (
    r"WARNING chainfs\.mount: chain=c\d+ refused: too many open files \(EMFILE\): "
    r"needs 6 descriptors, limit \d+ reached; raise LimitNOFILE= or ulimit -n and mount again"
)
EMFILE_SUMMARY = r"WARNING chainfs\.descriptors: descriptors: \d+ chains refused"


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``CHAINS`` tiny one-layer chains c000..c199 (one image made by qemu-img, copied)."""
    src = tmp_path_factory.mktemp("many")
    one = src / ".one.qcow2"
    im.create(str(one), im.MiB)
    for i in range(CHAINS):
        shutil.copyfile(one, src / f"c{i:03d}.qcow2")
    one.unlink()
    return src


def daemon_mount(
    source: Path, mnt: Path, nofile: str
) -> tuple[subprocess.CompletedProcess[str], bool]:
    mnt.mkdir(exist_ok=True)
    proc = run("prlimit", f"--nofile={nofile}", *CHAINFS, "mount", source, mnt, ok=(0, 1))
    return proc, os.path.ismount(mnt)


def served_and_refused(mnt: Path) -> tuple[list[str], dict[str, str]]:
    text = (mnt / "control" / ".status").read_text()
    lines = [parse_line(x) for x in text.splitlines()[1:]]
    served = [x["chain"] for x in lines if x["status"] == "served"]
    refused = {x["chain"]: x["reason"] for x in lines if x["status"] == "refused"}
    return served, refused


def test_the_soft_limit_is_raised_to_the_hard_one(many: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    try:
        proc, mounted = daemon_mount(many, mnt, "64:4096")
        assert proc.returncode == 0 and mounted, proc.stderr
        served, refused = served_and_refused(mnt)
        assert len(served) == CHAINS and not refused
        assert (mnt / "c199.img").stat().st_size == im.MiB
        run(*CHAINFS, "umount", mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


@pytest.mark.expect_log(EMFILE_REFUSAL, EMFILE_SUMMARY)
def test_chains_past_the_limit_are_refused_by_name(
    many: Path, tmp_path: Path, mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hard == soft: the first chains are served, every later one refused with EMFILE and
    the figures; the reserve keeps control files and commands working."""
    monkeypatch.setattr(
        conftest, "CHAINFS", ("prlimit", f"--nofile={SMALL_LIMIT}:{SMALL_LIMIT}", *CHAINFS)
    )
    m = mounter(many)
    served, refused = served_and_refused(m.mountpoint)
    assert served and refused and len(served) + len(refused) == CHAINS
    assert served == sorted(served) and max(served) < min(refused)  # in order: the first fit
    for reason in refused.values():
        # short (one per refused chain in .status: 10,000 made 3.4 MB of it), all there
        assert reason == (
            f"too many open files (EMFILE): needs 6 descriptors, limit {SMALL_LIMIT} reached;"
            " raise LimitNOFILE= or ulimit -n and mount again"
        )
    # the log says once why, in full, and what serving them all would take
    log = m.log_text()
    assert f"descriptors: limit={SMALL_LIMIT}" in log
    [summary] = [line for line in log.splitlines() if "chains refused" in line]
    assert f"descriptors: {len(refused)} chains refused for want of descriptors" in summary
    assert f"of this mount's limit of {SMALL_LIMIT} (RLIMIT_NOFILE)" in summary
    assert "owner, state and journal files" in summary and "kept for requests" in summary
    assert "LimitNOFILE= in the systemd unit, or ulimit -n" in summary
    # the reserve: a served chain's events, a snapshot, the journal still get descriptors
    first = served[0]
    m.command(first, "snapshot", f"{first}-s1.qcow2")
    assert m.layers(first) == [f"{first}-s1.qcow2", f"{first}.qcow2"]
    assert any(e["event"] == "SNAPSHOT_TAKEN" for e in m.events(first))
    with open(m.img(served[-1]), "r+b") as f:
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    m.unmount()
    (many / f"{first}-s1.qcow2").unlink()  # the module's source as it was
    shutil.rmtree(many / ".chainfs")  # the chains' state records and owner files


@pytest.mark.parametrize("limit", [16, 40, 64, 100, SMALL_LIMIT, 300])
def test_mount_never_exits_0_without_a_mount(many: Path, tmp_path: Path, limit: int) -> None:
    mnt = tmp_path / "mnt"
    try:
        proc, mounted = daemon_mount(many, mnt, f"{limit}:{limit}")
        assert (proc.returncode == 0) == mounted, (proc.returncode, mounted, proc.stderr)
        if proc.returncode:
            assert proc.stderr.startswith("chainfs: ") and "Traceback" not in proc.stderr
        else:
            served, refused = served_and_refused(mnt)
            assert len(served) + len(refused) == CHAINS
            assert all("(EMFILE)" in r for r in refused.values())
            run(*CHAINFS, "umount", mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


FAILING_LOOP = """
import sys
import pyfuse3
from chainfs import cli

async def main(*args, **kwargs):
    raise RuntimeError("simulated: the FUSE loop cannot start")

pyfuse3.main = main
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_daemon_that_fails_after_the_kernel_mounted_is_reported(
    many: Path, tmp_path: Path
) -> None:
    """The kernel mounted, but the FUSE loop never ran: ``chainfs mount`` said "ready"
    before the loop started and exited 0, with nothing mounted once the daemon died."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = run(sys.executable, "-c", FAILING_LOOP, "mount", many, mnt, ok=(0, 1))
        assert proc.returncode == 1, "mount exited 0"
        assert "simulated: the FUSE loop cannot start" in proc.stderr
        assert not os.path.ismount(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
