"""The lab itself: two hosts with their own names and NFSv4.2 clients on one export,
lease 10 s, locks that reach the server, a cut that cuts; and chainfs serving a chain
from the store on one host."""

from __future__ import annotations

from lab.lab import LEASE, Lab

from .conftest import DEADLINE, MiB, Model, Site, wait_for

HOLD = (
    "import fcntl,os,struct,sys,time;fd=os.open(sys.argv[1],os.O_RDWR);"
    "fcntl.fcntl(fd,37,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,0,0));"  # F_OFD_SETLK
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


def lab_python() -> str:
    import sys

    return sys.executable
