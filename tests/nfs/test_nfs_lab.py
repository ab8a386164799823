"""The lab itself: two hosts with their own names and NFSv4.2 clients on one export,
lease 10 s, locks that reach the server, a cut that cuts; and chainfs serving a chain
from the store on one host."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lab import lab as lab_module
from lab.lab import ACCEL_ENV, LEASE, Lab, LabError, accelerator, kvm_unusable

from .conftest import DEADLINE, MiB, Model, Site, wait_for

HOLD = (
    "import fcntl,os,struct,sys,time;fd=os.open(sys.argv[1],os.O_RDWR);"
    # F_OFD_SETLKW: waits out a lock of B's probe (with F_OFD_SETLK, a probe holding
    # the lock at that moment made the holder fail and B's probes lock until timeout)
    "fcntl.fcntl(fd,38,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,0,0));"
    "print('locked',flush=True);time.sleep(600)"
)
TRY = (
    "import fcntl,os,struct,sys;fd=os.open(sys.argv[1],os.O_RDWR)\n"
    "try: fcntl.fcntl(fd,37,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,0,0))\n"
    "except OSError as e: print('refused',e.errno)\n"
    "else: print('locked')"
)


def test_two_hosts_share_one_nfs4_export(lab: Lab) -> None:
    names = {h: lab.run(h, ["hostname"]).out.strip() for h in "ab"}
    assert names == {"a": "host-a", "b": "host-b"}
    for h in "ab":
        mounts = lab.run(h, ["cat", "/proc/self/mounts"]).out
        (line,) = [x for x in mounts.splitlines() if " /shared " in x]
        assert " nfs4 " in line and "vers=4.2" in line and ",hard," in line, line
    assert lab.run(None, ["cat", "/proc/fs/nfsd/nfsv4leasetime"]).out.strip() == str(LEASE)
    lab.sh("a", "echo from-a > /shared/hello")
    assert lab.run("b", ["cat", "/shared/hello"]).out == "from-a\n"
    # two clients, two client ids: the server knows both
    clients = lab.sh(None, "cat /proc/fs/nfsd/clients/*/info").out
    assert "host-a" in clients and "host-b" in clients, clients


def test_ofd_locks_reach_the_server(lab: Lab) -> None:
    lab.sh("a", "truncate -s 1M /shared/lockme")
    holder = lab.spawn("a", [lab_python(), "-S", "-c", HOLD, "/shared/lockme"])
    try:
        wait_for(
            lambda: lab.run("b", [lab_python(), "-S", "-c", TRY, "/shared/lockme"]).out.startswith(
                "refused"
            ),
            "host b to be refused host a's lock",
        )
    finally:
        lab.signal(holder, "SIGKILL")
        lab.wait(holder)
    # the holder's death frees the lock at once
    assert lab.run("b", [lab_python(), "-S", "-c", TRY, "/shared/lockme"]).out == "locked\n"


def test_a_cut_host_cannot_reach_the_server(lab: Lab) -> None:
    lab.cut("a")
    try:
        r = lab.run("a", ["stat", "-f", "/shared"], timeout=5, check=False)
        assert r.rc != 0  # hangs (hard mount) until killed
        assert lab.run("b", ["ls", "/shared"]).rc == 0
    finally:
        lab.heal("a")
    wait_for(
        lambda: lab.run("a", ["ls", "/shared"], timeout=DEADLINE, check=False).rc == 0,
        "host a to reach the server again",
    )


def test_chainfs_serves_a_chain_from_the_store(site: Site) -> None:
    model = Model(8 * MiB)
    names = site.make_chain("vm", 2, 8 * MiB, model)
    m = site.mount("a")
    assert m.digest("vm") == model.digest()
    m.write("vm", model, 3 * MiB, 64 * 1024, 0xEE)
    assert m.digest("vm") == model.digest()
    m.unmount()
    site.check_images(names)
    assert site.digest("vm.qcow2") == model.digest()


def test_the_lab_says_which_accelerator_it_runs_under(lab: Lab) -> None:
    assert (lab.accel, lab.accel_why) == accelerator()
    assert lab.describe() in lab.console()
    # the guest's kernel sees KVM's CPUID signature under KVM only
    booted = lab.run(None, ["dmesg"]).out
    assert ("Hypervisor detected: KVM" in booted) == (lab.accel == "kvm"), booted[:3000]


def test_the_lab_loaded_its_modules_from_the_initramfs_and_its_server_runs_no_lockd(
    lab: Lab,
) -> None:
    """Every module the lab needs is in (loaded by the initramfs and guest-init, none
    failed), and its server speaks NFSv4 only: no lockd, whose grace period would make
    every first lock wait (3 s at least)."""
    loaded = {line.split()[0] for line in lab.run(None, ["cat", "/proc/modules"]).out.splitlines()}
    wanted = {"nfsd", "nfsv4", "nfs", "ext4", "loop", "fuse", "veth"}
    assert wanted <= loaded, wanted - loaded
    assert re.search(r"insmod \S+ failed", lab.console()) is None, lab.console()
    assert lab.run(None, ["cat", "/proc/fs/nfsd/versions"]).out.split() == [
        "-3",
        "+4",
        "+4.1",
        "+4.2",
    ]
    threads = lab.sh(None, "cat /proc/[0-9]*/comm").out.split()
    assert "nfsd" in threads
    # (lockd's one thread serves every namespace: the NFSv3 server's, once it started)
    if lab.run(None, ["test", "-e", "/run/lab/v3-up"], check=False).rc != 0:
        assert "lockd" not in threads


def test_the_nfsv3_server_has_a_lockd_of_its_own(lab: Lab) -> None:
    """The NFSv3 server (``v3-server``), in a network namespace of its own: host b
    mounts it as NFSv3; its lockd's grace period does not reach the lab's server,
    which grants a lock at once."""
    server = lab.nfs3()
    assert server == lab.nfs3()  # (started once)
    lab.sh("b", f"mkdir -p /run/v3 && mount -t nfs -o vers=3,nolock {server}:/srv /run/v3")
    try:
        assert "vers=3" in lab.sh("b", "grep ' /run/v3 ' /proc/mounts").out
        assert "lockd" in lab.sh(None, "cat /proc/[0-9]*/comm").out.split()
        # (the lab's server is not in grace: a lock within a second, without retries)
        lab.sh("a", "flock -w 1 /shared/.v3-grace true")
    finally:
        lab.run("b", ["umount", "-l", "/run/v3"], check=False)


def _modules(tmp: Path, *names: str) -> Path:
    for n in names:
        (tmp / n).mkdir(parents=True)
    return tmp


def test_the_accelerator_is_kvm_only_where_a_hardware_kvm_creates_a_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lab booted: the choice alone. TCG, the baseline, wherever KVM is not usable;
    ``CHAINFS_LAB_ACCEL`` forces one, and a forced KVM that is unusable is an error,
    never TCG in its place."""
    none = kvm_unusable(str(tmp_path / "no-kvm"), _modules(tmp_path / "m1", "kvm_intel"))
    assert none is not None and "cannot open" in none
    pvm = kvm_unusable("/dev/null", _modules(tmp_path / "m2", "kvm", "kvm_pvm"))
    assert pvm is not None and "kvm_pvm" in pvm
    plain = kvm_unusable("/dev/null", _modules(tmp_path / "m3", "kvm"))
    assert plain is not None and "no hardware KVM" in plain
    # /dev/null with a hardware module: the ioctl is refused
    ioctl = kvm_unusable("/dev/null", _modules(tmp_path / "m4", "kvm_amd"))
    assert ioctl is not None and "/dev/null" in ioctl

    monkeypatch.setattr(lab_module, "kvm_unusable", lambda: "no KVM here")
    monkeypatch.delenv(ACCEL_ENV, raising=False)
    assert accelerator() == ("tcg", "no KVM here")
    monkeypatch.setenv(ACCEL_ENV, "tcg")
    assert accelerator()[0] == "tcg"
    monkeypatch.setenv(ACCEL_ENV, "kvm")
    with pytest.raises(LabError, match="CHAINFS_LAB_ACCEL=kvm, but KVM is unusable: no KVM"):
        accelerator()
    monkeypatch.setenv(ACCEL_ENV, "hvf")
    with pytest.raises(LabError, match="kvm or tcg"):
        accelerator()

    monkeypatch.setattr(lab_module, "kvm_unusable", lambda: None)
    monkeypatch.delenv(ACCEL_ENV)
    assert accelerator()[0] == "kvm"
    monkeypatch.setenv(ACCEL_ENV, "kvm")
    assert accelerator()[0] == "kvm"
    monkeypatch.setenv(ACCEL_ENV, "TCG")
    assert accelerator()[0] == "tcg"


def lab_python() -> str:
    import sys

    return sys.executable
