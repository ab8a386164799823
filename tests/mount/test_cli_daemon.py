"""The daemon as an administrator runs it: under systemd (``Type=notify``), from fstab
(``mount -t fuse.chainfs``), as a background daemon, with its log in the journal, with
``-o debug``, and with the permissions the mount gives other users.

systemd itself is not needed: ``NOTIFY_SOCKET`` is a datagram socket the test binds,
``JOURNAL_STREAM`` names the server's log file as systemd would name its stderr pipe, and
other users are played by ``nobody`` through ``subprocess.run(user=...)``.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.control import parse_line

from .conftest import CHAINFS, DEADLINE, Mounter, Seeds, assert_clean, run, wait_for


def chainfs(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    return run(*CHAINFS, *args, ok=ok)


def daemon_pid(mountpoint: Path) -> int:
    first = (mountpoint / "control" / ".status").read_text().splitlines()[0]
    return int(parse_line(first)["pid"])


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def detach(mountpoint: Path) -> None:
    """Teardown for mounts no fixture owns: lazy unmount (the daemon then exits)."""
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


# -- systemd: Type=notify -------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_when_usable_and_stopping_at_umount(
    abstract: bool,
    tmp_path: Path,
    mounter: Mounter,
    seeds: Seeds,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = seeds(tmp_path / "src")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"\0chainfs-test-{os.getpid()}-{id(sock)}" if abstract else str(tmp_path / "notify")
    sock.bind(address)
    sock.settimeout(DEADLINE)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + address[1:] if abstract else address)
    try:
        m = mounter(tmp_path / "src", start=False)
        m.start()  # returns once the mountpoint is a mount; READY=1 may come a bit later
        assert sock.recv(4096) == b"READY=1"
        # usable the moment READY=1 is read: the tree answers and the disk reads right
        assert m.status()[0]["pid"] == str(m.pid)
        with open(m.img("E"), "rb") as f:
            assert f.read(1 << 20) == seed.content[: 1 << 20]
        chainfs("umount", m.mountpoint)
        assert sock.recv(4096) == b"STOPPING=1"
        m.wait_exit(0)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)  # nothing else was sent
    finally:
        sock.close()


def test_no_notify_socket_no_message(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    m.unmount()
    assert "cannot notify" not in m.log_text()


# -- logging -----------------------------------------------------------------------------------


def test_journal_priorities_and_debug_trace(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src", "debug", start=False)
    m.log.touch()  # the server's stderr: the "journal stream" systemd would hand it
    st = os.stat(m.log)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    m.start()
    with open(m.img("E"), "rb") as f:
        f.read(4096)
    with pytest.raises(OSError) as exc:
        m.command("E", "stream", "base=Z.qcow2")
    assert exc.value.errno == errno.EINVAL
    m.unmount()
    lines = m.log_text().splitlines()[1:]  # after the fixture's "==> command" line
    assert lines and all(x[:1] == "<" and x[2] == ">" for x in lines), lines[:5]
    assert any(x.startswith("<6>mounted source=") for x in lines)
    assert any(x.startswith("<7>request lookup(1, b'E.img'") for x in lines)
    assert any(x.startswith("<7>request read(") for x in lines)
    assert any(x.startswith("<4>") and "command refused" in x for x in lines)


def test_without_debug_no_request_trace(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    with open(m.img("E"), "rb") as f:
        f.read(4096)
    m.unmount()
    text = m.log_text()
    assert "mounted source=" in text and "request " not in text
    assert " INFO " in text  # stderr, not the journal: timestamps and level names


# -- daemon and fstab -----------------------------------------------------------------------


def test_daemon_mount_returns_when_ready(tmp_path: Path, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "src")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        chainfs("mount", tmp_path / "src", mnt)
        pid = daemon_pid(mnt)  # no wait: mount returned, so the tree answers now
        assert (mnt / "E.img").read_bytes()[:4096] == seed.content[:4096]
        chainfs("umount", mnt)  # returns once the daemon has exited
        assert gone(pid) and not os.path.ismount(mnt)
    finally:
        detach(mnt)
    assert_clean(seed.layers)


def test_daemon_mount_reports_why_it_failed(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = chainfs("mount", tmp_path / "nothing", tmp_path / "mnt", ok=(1,))
    assert proc.stderr.startswith("chainfs: source ") and "neither a directory" in proc.stderr
    proc = chainfs("mount", tmp_path, tmp_path / "mnt", "-o", "bogus", ok=(1,))
    assert proc.stderr == "chainfs: unknown mount option 'bogus'\n"


def test_a_dead_mount_is_named_and_umount_lazy_releases_it(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """After ``kill -9`` the kernel keeps the mount, answering ENOTCONN: ``mount`` said
    "mountpoint ... is not a directory"; now ``mount`` and ``status`` say it is a dead
    mount and how to release it, and ``umount --lazy`` does."""
    seed = seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    m.kill()
    m.wait_exit(None)
    mnt = str(m.mountpoint)
    says = (
        f"chainfs: {mnt!r} is a dead mount (its daemon is gone: transport endpoint is not "
        f"connected); release it with 'chainfs umount --lazy {mnt}' (or "
        f"'fusermount3 -u -z {mnt}') and mount again\n"
    )
    assert chainfs("mount", tmp_path / "src", mnt, ok=(1,)).stderr == says
    assert chainfs("status", mnt, ok=(1,)).stderr == says
    assert chainfs("umount", mnt, ok=(1,)).stderr == says
    chainfs("umount", "--lazy", mnt)
    assert not os.path.ismount(mnt) and os.path.isdir(mnt)
    try:
        chainfs("mount", tmp_path / "src", mnt)
        assert (m.mountpoint / "E.img").read_bytes()[:4096] == seed.content[:4096]
        chainfs("umount", mnt)
    finally:
        detach(m.mountpoint)
    assert_clean(seed.layers)


def test_fstab_form(tmp_path: Path, seeds: Seeds) -> None:
    """What an fstab line runs: mount(8) hands type fuse.chainfs to mount.fuse3, which runs
    ``chainfs SOURCE MOUNTPOINT -o OPTS`` (with mount(8)'s own options among OPTS).

    mount(8) itself runs helpers with a fixed PATH that finds /usr/local/bin/chainfs but
    not this test's virtualenv, so the test calls mount.fuse3 as mount(8) would.
    """
    helper = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"
    if not os.path.exists(helper):
        pytest.skip("mount.fuse3 is not installed (fuse3)")
    seed = seeds(tmp_path / "src")
    mnt, copies = tmp_path / "mnt", tmp_path / "copies"
    mnt.mkdir()
    copies.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    opts = f"rw,nofail,_netdev,x-systemd.requires-mounts-for={tmp_path},allow_dir={copies}"
    try:
        run(helper, tmp_path / "src", mnt, "-t", "chainfs", "-o", opts, env=env)
        pid = daemon_pid(mnt)  # mount.fuse3 returned: the daemon serves
        chainfs("snapshot", mnt, "E", copies / "S.qcow2")  # allow_dir reached chainfs
        run("umount", mnt)
        wait_for(lambda: gone(pid), "the daemon to exit after umount")
    finally:
        detach(mnt)
    assert_clean([*seed.layers, copies / "S.qcow2"])


# -- permissions ------------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="chainfs-perm-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        detach(d / "mnt")
        shutil.rmtree(d, ignore_errors=True)


PROBE = """
import errno, os, sys
def try_(what, fn):
    try:
        fn()
        print(what, "ok")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
mnt = sys.argv[1]
def read(p):
    with open(os.path.join(mnt, p), "rb") as f:
        f.read(1)
def write(p):
    fd = os.open(os.path.join(mnt, p), os.O_WRONLY)
    os.close(fd)
try_("list", lambda: os.listdir(mnt))
try_("read-img", lambda: read("E.img"))
try_("write-img", lambda: write("E.img"))
try_("read-chain", lambda: read("control/E/chain"))
try_("write-stream", lambda: write("control/E/stream"))
try_("write-cancel", lambda: write("control/E/cancel"))
"""


def probe_as_nobody(mnt: Path) -> dict[str, str]:
    nobody = pwd.getpwnam("nobody")
    python = "/usr/bin/python3"  # nobody cannot run the virtualenv's python under /root
    if not os.access(python, os.X_OK):
        pytest.skip("the permission probe needs /usr/bin/python3")
    proc = subprocess.run(
        [python, "-I", "-c", PROBE, str(mnt)],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
        cwd="/",
    )
    return dict(line.split() for line in proc.stdout.splitlines())


def test_only_the_mounting_user_by_default(
    shared_dir: Path, mounter: Mounter, seeds: Seeds
) -> None:
    seeds(shared_dir / "src")
    m = mounter(shared_dir / "src", mountpoint=shared_dir / "mnt")
    seen = probe_as_nobody(m.mountpoint)
    assert set(seen.values()) == {"EACCES"}, seen  # the kernel refuses other users outright


def test_allow_other_keeps_control_files_to_the_owner(
    shared_dir: Path, mounter: Mounter, seeds: Seeds
) -> None:
    seeds(shared_dir / "src")
    m = mounter(shared_dir / "src", "allow_other", mountpoint=shared_dir / "mnt")
    seen = probe_as_nobody(m.mountpoint)
    assert seen == {
        "list": "ok",
        "read-img": "EACCES",  # the flat disk is 0600, the mounting user's
        "write-img": "EACCES",
        "read-chain": "ok",  # what the chain looks like is not a secret
        "write-stream": "EACCES",  # commands: the mounting user only
        "write-cancel": "EACCES",
    }
    for name in ("snapshot", "stream", "commit", "copy", "cancel", "complete"):
        st = os.stat(m.control("E", name))
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0, name
    assert stat.S_IMODE(os.stat(m.img("E")).st_mode) == 0o600


def test_read_only_mount(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src", "ro")
    assert stat.S_IMODE(os.stat(m.img("E")).st_mode) == 0o400
    with pytest.raises(OSError) as exc:
        os.open(m.img("E"), os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    proc = chainfs("stream", m.mountpoint, "E", ok=(1,))
    assert proc.stderr.startswith("chainfs: stream refused: ") and "read-only" in proc.stderr
    assert "read-only" in chainfs("status", m.mountpoint).stdout.splitlines()[0]


@pytest.mark.expect_log(
    r"WARNING chainfs\.jobs\.recovery: chain=E job=stream-1 type=stream was interrupted; "
    r"a read-write mount resumes it"
)
def test_read_only_mount_shows_the_job_that_waits_for_a_writable_one(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """A stream stopped by an unmount, then ``-o ro``: ``jobs`` and ``status`` said
    nothing ("no job running"); now they show the job waiting for a read-write mount."""
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    m.command("E", "stream", "base=A.qcow2 speed=1M")
    wait_for(lambda: (m.job_offset("E") or 0) > 0, "the stream to make progress")
    m.unmount()
    ro = mounter(tmp_path / "src", "ro")
    (job,) = ro.lines("E", "jobs")
    assert job["id"] == "stream-1" and job["type"] == "stream"
    assert job["status"] == "interrupted" and int(job["offset"]) >= 0
    assert job["speed"] == str(1 << 20) and job["waits-for"] == "a read-write mount"
    out = chainfs("status", ro.mountpoint).stdout
    (row,) = [x for x in out.splitlines() if x.strip().startswith("job stream-1:")]
    assert "stream interrupted at " in row and row.endswith(", waits for a read-write mount")
    assert "no job running" not in out
    info = json.loads(chainfs("status", "--json", ro.mountpoint).stdout)
    assert info["chains"][0]["jobs"][0]["status"] == "interrupted"
    ro.unmount()
    rw = mounter(tmp_path / "src")
    wait_for(
        lambda: any(e["event"] == "JOB_RESUMED" for e in rw.events("E")), "the stream to resume"
    )
    chainfs("cancel", rw.mountpoint, "E", "stream-1", "--wait")
