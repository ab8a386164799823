"""The preconditions of a read-write mount on a shared file system (``sharedfs``), from
fake ``/proc/self/mountinfo`` lines: NFSv3, ``nolock``, ``local_lock`` other than
none, ``soft`` and ``recover_lost_locks=Y`` refused with the option and what to set
instead; a well-mounted NFSv4.2, a local file system and a read-only mount let through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfs import sharedfs
from chainfs.errors import ChainfsError
from chainfs.sharedfs import MountEntry, mount_of, problems

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"
TMP = "25 22 0:30 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=1024k"
# what a Linux 6.1 client shows for a default NFSv4.2 mount (the lab's)
NFS4 = (
    "312 22 0:52 / /shared rw,relatime shared:160 - nfs4 10.0.1.1:/ rw,vers=4.2,"
    "rsize=262144,wsize=262144,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,"
    "clientaddr=10.0.1.2,local_lock=none,addr=10.0.1.1"
)
NFS3 = (
    "313 22 0:53 / /v3 rw,relatime shared:161 - nfs 10.0.1.1:/srv rw,vers=3,rsize=1048576,"
    "wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,"
    "mountaddr=10.0.1.1,mountvers=3,mountport=20048,mountproto=udp,local_lock=none,"
    "addr=10.0.1.1"
)


def nfs4(**change: str | None) -> str:
    """The NFSv4.2 line with options changed (value None: removed, "": a flag)."""
    head, _, sup = NFS4.rpartition(" ")
    opts = dict(o.partition("=")[::2] for o in sup.split(","))
    flags = {o for o in sup.split(",") if "=" not in o}
    for key, value in change.items():
        opts.pop(key, None)
        flags.discard(key)
        if key == "soft":
            flags.discard("hard")
        if value is not None:
            opts[key] = value
    text = ",".join(k if k in flags or v == "" else f"{k}={v}" for k, v in opts.items())
    return f"{head} {text}"


def test_parse_nfs4_line() -> None:
    e = MountEntry.parse(NFS4)
    assert (e.mountpoint, e.fstype, e.source) == ("/shared", "nfs4", "10.0.1.1:/")
    assert e.options["vers"] == "4.2" and "hard" in e.options
    assert e.options["local_lock"] == "none" and "relatime" in e.options


def test_mount_point_with_a_space_is_unescaped() -> None:
    line = "40 22 0:60 / /mnt/my\\040disks rw - nfs4 srv:/ rw,vers=4.2,hard,local_lock=none"
    e = MountEntry.parse(line)
    assert e.mountpoint == "/mnt/my disks"
    assert mount_of("/mnt/my disks/vm", line) == e


def test_the_deepest_and_latest_mount_holds_the_path() -> None:
    info = "\n".join([ROOT, TMP, NFS4, NFS3])
    assert mount_of("/shared/images", info) == MountEntry.parse(NFS4)
    assert mount_of("/shared", info) == MountEntry.parse(NFS4)
    assert mount_of("/sharedx/images", info) == MountEntry.parse(ROOT)
    assert mount_of("/v3/a/b", info) == MountEntry.parse(NFS3)
    over = NFS4.replace("312 22 0:52", "400 312 0:70").replace(" - nfs4 ", " - nfs ")
    assert mount_of("/shared/x", "\n".join([NFS4, over])).fstype == "nfs"  # type: ignore[union-attr]


def test_local_and_well_mounted_nfs4_pass() -> None:
    assert problems(MountEntry.parse(ROOT), "Y") == []
    assert problems(MountEntry.parse(TMP), None) == []
    assert problems(MountEntry.parse(NFS4), "N") == []
    assert problems(MountEntry.parse(nfs4(vers="4.1")), "N") == []


@pytest.mark.parametrize(
    ("line", "lost", "words"),
    [
        (NFS3, "N", ["NFSv3 (vers=3)", "mount with vers=4.2"]),
        (nfs4(nolock=""), "N", ["'nolock'", "remove nolock"]),
        (nfs4(local_lock="all"), "N", ["'local_lock=all'", "set local_lock=none"]),
        (nfs4(local_lock="posix"), "N", ["'local_lock=posix'", "set local_lock=none"]),
        (nfs4(local_lock="flock"), "N", ["'local_lock=flock'", "set local_lock=none"]),
        (nfs4(soft=""), "N", ["'soft'", "mount with 'hard'"]),
        (nfs4(softerr=""), "N", ["'softerr'", "mount with 'hard'"]),
        (NFS4, "Y", ["recover_lost_locks=Y", "set it to N", "recover_lost_locks=0"]),
    ],
    ids=[
        "nfs3",
        "nolock",
        "local_lock=all",
        "local_lock=posix",
        "local_lock=flock",
        "soft",
        "softerr",
        "recover_lost_locks",
    ],
)
def test_each_unsafe_option_is_named_with_its_fix(line: str, lost: str, words: list[str]) -> None:
    found = problems(MountEntry.parse(line), lost + "\n")
    assert len(found) == 1, found
    for w in words:
        assert w in found[0], found


def test_every_problem_is_named_at_once() -> None:
    line = NFS3.replace("hard,", "soft,nolock,").replace("local_lock=none", "local_lock=all")
    found = problems(MountEntry.parse(line), "Y")
    assert len(found) == 5, found


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``check_source`` reading a fake mountinfo and recover_lost_locks."""
    monkeypatch.setattr(sharedfs, "MOUNTINFO", str(tmp_path / "mountinfo"))
    monkeypatch.setattr(sharedfs, "RECOVER_LOST_LOCKS", str(tmp_path / "recover_lost_locks"))
    (tmp_path / "recover_lost_locks").write_text("N\n")
    return tmp_path


def test_check_source_refuses_read_write_only(fake_proc: Path) -> None:
    source = fake_proc / "images"
    source.mkdir()
    mp = str(fake_proc)
    bad = NFS4.replace(" /shared ", f" {mp} ").replace("hard", "soft")
    (fake_proc / "mountinfo").write_text("\n".join([ROOT, bad]) + "\n")
    with pytest.raises(ChainfsError) as exc:
        sharedfs.check_source(str(source), readonly=False)
    msg = str(exc.value)
    assert f"'{source}' is on nfs4 (10.0.1.1:/ at {mp})" in msg
    assert "mount with 'hard'" in msg and "-o ro" in msg
    sharedfs.check_source(str(source), readonly=True)  # read-only: anything goes
    # a chain's active layer names its directory
    with pytest.raises(ChainfsError):
        sharedfs.check_source(str(source / "vm.qcow2"), readonly=False)


def test_check_source_reads_recover_lost_locks_for_nfs_only(fake_proc: Path) -> None:
    source = fake_proc / "images"
    source.mkdir()
    good = NFS4.replace(" /shared ", f" {fake_proc} ")
    (fake_proc / "mountinfo").write_text("\n".join([ROOT, good]) + "\n")
    sharedfs.check_source(str(source), readonly=False)
    (fake_proc / "recover_lost_locks").write_text("Y\n")
    with pytest.raises(ChainfsError, match="recover_lost_locks=Y"):
        sharedfs.check_source(str(source), readonly=False)
    # a local file system does not care about the nfs module
    (fake_proc / "mountinfo").write_text(ROOT + "\n")
    sharedfs.check_source(str(source), readonly=False)


def test_check_source_without_mountinfo_lets_through(fake_proc: Path) -> None:
    sharedfs.check_source(str(fake_proc), readonly=False)  # no mountinfo file at all
