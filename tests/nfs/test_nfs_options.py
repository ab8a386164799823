"""A read-write mount on NFS mounted without what keeps hosts apart is refused, naming
the option and what to set instead (issue 21, item 1); read-only it is let through, and
a well-mounted NFSv4.2 (the lab's ``/shared``) serves read-write."""

from __future__ import annotations

import pytest
from lab.lab import SERVER_IP, Lab

from .conftest import Site

RLL = "/sys/module/nfs/parameters/recover_lost_locks"

# (how the export is mounted, what chainfs must say) — the first two in the default
# suite: NFSv3 with nolock (three problems at once) and soft
CASES = [
    pytest.param(
        "nfs",
        "vers=3,nolock",
        ["NFSv3 (vers=3)", "remove nolock", "local_lock=none"],
        id="nfs3-nolock",
    ),
    pytest.param("nfs4", "vers=4.2,soft", ["'soft'", "mount with 'hard'"], id="soft"),
    # (an NFSv4 mount ignores local_lock: its locks go to the server whatever it says)
    pytest.param(
        "nfs",
        "vers=3,local_lock=all",
        ["NFSv3 (vers=3)", "'local_lock=all'", "set local_lock=none"],
        id="nfs3-local_lock",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "nfs4",
        "vers=4.2,softerr",
        ["'softerr'", "mount with 'hard'"],
        id="softerr",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("fstype", "options", "words"), CASES)
def test_unsafe_nfs_mount_option_is_refused(
    lab: Lab, site: Site, fstype: str, options: str, words: list[str]
) -> None:
    site.sh("a", "qemu-img create -q -f qcow2 vm.qcow2 4M")
    where = f"/run/nfs-{site.name}"
    # (NFSv3 from a server of its own: the lab's speaks NFSv4 only)
    server, export = (lab.nfs3(), "/srv") if fstype == "nfs" else (SERVER_IP["b"], "/")
    lab.sh("b", f"mkdir -p {where} && mount -t {fstype} -o {options} {server}:{export} {where}")
    try:
        source = f"{where}/{site.name}"
        r = refused_mount(lab, source, f"/run/mnt/{site.name}-opt")
        for w in words:
            assert w in r, r
        assert "-o ro" in r, r
        # read-only, anything goes
        lab.run("b", ["mkdir", "-p", f"/run/mnt/{site.name}-ro"])
        ok = lab.chainfs(
            "b", ["mount", "-o", "ro", source, f"/run/mnt/{site.name}-ro"], check=False
        )
        assert ok.rc == 0, ok.err
        lab.run("b", ["fusermount3", "-u", f"/run/mnt/{site.name}-ro"])
    finally:
        lab.run("b", ["umount", "-l", where], check=False)


@pytest.mark.slow
def test_recover_lost_locks_is_refused(lab: Lab, site: Site) -> None:
    site.sh("a", "qemu-img create -q -f qcow2 vm.qcow2 4M")
    lab.sh(None, f"echo Y > {RLL}")
    try:
        r = refused_mount(lab, site.dir, f"/run/mnt/{site.name}-rll")
        assert "recover_lost_locks=Y" in r and "set it to N" in r, r
    finally:
        lab.sh(None, f"echo N > {RLL}")


def refused_mount(lab: Lab, source: str, mountpoint: str) -> str:
    """``chainfs mount`` of ``source`` on host b: it must fail; its message."""
    lab.run("b", ["mkdir", "-p", mountpoint])
    r = lab.chainfs("b", ["mount", source, mountpoint], check=False)
    if r.rc == 0:  # (the code before the check: the mount is up)
        lab.run("b", ["fusermount3", "-u", "-z", mountpoint], check=False)
    assert r.rc != 0, f"chainfs mounted {source} read-write"
    assert "cannot be served read-write safely" in r.err, r.err
    return str(r.err)
