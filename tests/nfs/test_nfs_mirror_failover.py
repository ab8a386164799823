"""Fail-over in the middle of an active commit and of a copy (QEMU's mirror), the two job
kinds ``test_nfs_hosts.py``'s intermediate commit does not cover, while a guest writes.

Host A serves chain x and runs the job at a low ``speed=`` while a writer on A writes
4 KiB blocks to the flat file, each fsync'ed before the next; at an instant in the
job, A's daemon is killed with kill -9, or A is cut off the server.  Host B adopts the
chain: its journal's job is resumed there -- an active commit or a copy copies again
from the start (the README's hand-over table: the writes they track are in memory) --
and pivots.  Every write A acknowledged (fsync returned) is in the result; the one write
in flight at the kill or the cut (begun, not acknowledged) may or may not be: a 4 KiB
block, either old or new.  Every image ends ``qemu-img check`` clean (A died between a
cluster's allocation and its reference, which leaks it, as QEMU killed there does; B,
adopting a chain A did not release, repairs the leaks of the layers it writes), the
content equal to the model; after a cut, none of A's late writes reaches the server.

By default one kill -9 instant of a copy (the suite's time); ``--runslow`` adds the active
commit's and two more instants of each kind, and three cut-off instants for each kind.
"""

from __future__ import annotations

import copy
import shlex
import time
from dataclasses import dataclass

import pytest
from lab.lab import LEASE, Lab

from .conftest import PY, ChainfsMount, KiB, MiB, Model, Site, wait_for
from .test_nfs_hosts import (
    LEASED,
    MARKER,
    MARKER_AT,
    MARKER_WRITER,
    adopt,
    completed,
    event_after,
    no_marker,
    status_of,
)

SIZE = 8 * MiB
SLOW = "speed=256K"  # on A: 4 s after each 1 MiB step, the job is mid-way at every instant
BLOCK = 4 * KiB
# writes 4 KiB blocks of a pattern of their own to the flat file, each fsync'ed,
# saying "begin I" before and "ok I" once fsync returned; stops at the first error
GUEST_WRITER = (
    "import os,sys,time\n"
    "path,n,avoid=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\n"
    "fd=os.open(path,os.O_WRONLY)\n"
    "i=0\n"
    "while True:\n"
    " i+=1;b=(i*389)%n\n"
    " if b==avoid: continue\n"
    " print('begin',i,flush=True)\n"
    " try:\n"
    "  os.pwrite(fd,bytes([i%255+1])*4096,b*4096);os.fsync(fd)\n"
    " except OSError as e:\n"
    "  print('error',i,e,flush=True);break\n"
    " print('ok',i,flush=True)\n"
    " time.sleep(0.05)\n"
)
KINDS = ("active-commit", "copy")
KILLS = [("copy", 1.0)] + [
    pytest.param(kind, t, marks=pytest.mark.slow)
    for kind in KINDS
    for t in (0.3, 1.0, 3.0)
    if (kind, t) != ("copy", 1.0)
]
CUT_INSTANTS = [pytest.param(t, marks=pytest.mark.slow) for t in (0.5, 1.5, 3.0)]


def block_of(i: int) -> int:
    return (i * 389) % (SIZE // BLOCK)


@dataclass
class Writes:
    """What the guest writer on A did: its acknowledged writes, and the one in flight."""

    acked: list[int]
    in_flight: int | None

    @classmethod
    def parse(cls, out: str) -> Writes:
        begun: list[int] = []
        acked: list[int] = []
        for line in out.splitlines():
            word, _, rest = line.partition(" ")
            if word == "begin":
                begun.append(int(rest))
            elif word == "ok":
                acked.append(int(rest.split()[0]))
        assert acked == begun[: len(acked)], out[-2000:]
        in_flight = begun[-1] if len(begun) > len(acked) else None
        return cls(acked, in_flight)

    def apply(self, model: Model) -> list[Model]:
        """``model`` with every acknowledged write; the candidates for the content: it,
        and it with the write in flight too."""
        for i in self.acked:
            model.write(block_of(i) * BLOCK, BLOCK, i % 255 + 1)
        if self.in_flight is None:
            return [model]
        other = copy.deepcopy(model)
        other.write(block_of(self.in_flight) * BLOCK, BLOCK, self.in_flight % 255 + 1)
        return [model, other]


def start(
    site: Site, kind: str, *options: str
) -> tuple[Model, ChainfsMount, ChainfsMount, str, str]:
    """Chain x (x-0 <- x-1 <- x), A serving it with the job of ``kind`` running slowly,
    B serving the directory (x read-only there); the model, the job's id and the image
    the chain ends on."""
    model = Model(SIZE)
    site.make_chain("x", 3, SIZE, model)
    a = site.mount("a", *options)
    a.write("x", model, 6 * MiB, 64 * KiB, 0xA6)
    b = site.mount("b", *options)
    if kind == "active-commit":
        job = a.start_job("x", "commit", f"top=x.qcow2 base=x-0.qcow2 {SLOW}")
        return model, a, b, job, "x-0.qcow2"
    job = a.start_job("x", "copy", f"{site.dir}/x-copy.qcow2 {SLOW}")
    return model, a, b, job, "x-copy.qcow2"


def writer_log(a: ChainfsMount) -> str:
    return f"/run/guest-writer-{a.mountpoint.rsplit('/', 1)[-1]}"


def writer_said(lab: Lab, a: ChainfsMount) -> str:
    return lab.run("a", ["cat", writer_log(a)], check=False).out


def spawn_writer(lab: Lab, a: ChainfsMount) -> int:
    """The guest writer on A (its output in ``writer_log``), once it has written and
    fsync'ed its first block; it leaves the marker's block alone."""
    argv = [PY, "-S", "-u", "-c", GUEST_WRITER, a.img("x"), str(SIZE // BLOCK)]
    argv.append(str(MARKER_AT // BLOCK))
    pid = lab.spawn("a", ["sh", "-c", f"exec {shlex.join(argv)} >{writer_log(a)} 2>&1"])
    wait_for(lambda: "ok " in writer_said(lab, a), "the guest writer on A")
    return pid


def finish_on_b(b: ChainfsMount, job: str, before: int) -> None:
    """The job resumed on B under its id (it had not ended on A): full speed there,
    then its end."""
    resumed = wait_for(
        lambda: event_after(b, "x", before, "JOB_RESUMED"), f"{job} to be resumed on B"
    )
    assert resumed["job"] == job, resumed
    b.command("x", "speed", f"{job} 0")
    completed(b, "x", before)


def judge(site: Site, b: ChainfsMount, candidates: list[Model], active: str, said: str) -> None:
    """B's flat content is one of the candidates; B writes on; the images end clean and
    equal to the model, ``active`` the chain's active layer."""
    got = b.digest("x")
    digests = [m.digest() for m in candidates]
    assert got in digests, f"B's content is no candidate; the writer on A said:\n{said[-1500:]}"
    model = candidates[digests.index(got)]
    b.write("x", model, 7 * MiB, 64 * KiB, 0xB7)
    assert b.digest("x") == model.digest()
    b.unmount()
    names = ("x-0.qcow2", "x-1.qcow2", "x.qcow2", "x-copy.qcow2")
    # A died (or was cut off) in the middle of the guest's writes and of the job's: a
    # cluster it had allocated and not yet referenced leaked, as after QEMU's kill -9;
    # B repaired the leaks of the layers it wrote when it adopted the chain
    there = [n for n in names if site.sh(None, f"test -e {n}", check=False).rc == 0]
    site.check_images(there)
    assert site.digest(active) == model.digest()


@pytest.mark.parametrize(("kind", "instant"), KILLS)
def test_kill_9_mid_mirror_then_the_other_host_adopts_and_finishes(
    lab: Lab, site: Site, kind: str, instant: float
) -> None:
    model, a, b, job, active = start(site, kind)
    writer = spawn_writer(lab, a)
    time.sleep(instant)
    a.kill("SIGKILL")
    try:
        # the mount died under the writer
        wait_for(lambda: "error" in writer_said(lab, a), "the guest writer on A to fail")
    finally:
        lab.signal(writer, "SIGKILL")
        lab.wait(writer)
    said = writer_said(lab, a)
    candidates = Writes.parse(said).apply(model)
    before = len(b.events("x"))
    adopt(b, "x", 2)  # kill -9 frees the locks at once
    finish_on_b(b, job, before)
    judge(site, b, candidates, active, said)


@pytest.mark.parametrize("instant", CUT_INSTANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_owner_cut_off_mid_mirror_then_adopted_and_none_of_its_late_writes_land(
    lab: Lab, site: Site, kind: str, instant: float
) -> None:
    model, a, b, job, active = start(site, kind, *LEASED)
    writer = spawn_writer(lab, a)
    time.sleep(instant)
    lab.cut("a")
    marker = lab.spawn(
        "a", [PY, "-S", "-c", MARKER_WRITER, a.img("x"), MARKER.decode(), str(MARKER_AT)]
    )
    try:
        before = len(b.events("x"))
        adopt(b, "x", 2 * LEASE + 5)  # A's lease, then the server's grace
        finish_on_b(b, job, before)
        lab.heal("a")
        lost = wait_for(
            lambda: event_after(a, "x", 0, "OWNERSHIP_LOST"), "host A to report lost ownership"
        )
        assert lost.get("reason"), lost
        # the write in flight at the cut fails: A knows it lost the chain
        wait_for(lambda: "error" in writer_said(lab, a), "the guest writer on A to fail")
        assert status_of(a, "x").get("owner") in ("lost", "elsewhere"), status_of(a, "x")
    finally:
        lab.heal("a")
        lab.signal(marker, "SIGKILL")
        lab.signal(writer, "SIGKILL")
        tried = lab.wait(marker).out
        lab.wait(writer)
    assert "[Errno 5]" in tried, tried[-2000:]
    said = writer_said(lab, a)
    assert "[Errno 5]" in said, said[-1000:]
    candidates = Writes.parse(said).apply(model)
    a.cleanup()
    judge(site, b, candidates, active, said)
    no_marker(site)
