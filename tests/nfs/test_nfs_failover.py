"""Fail-over in the middle of a job (issue 21's "Done when"): an intermediate commit, an
active commit and a copy, host A's daemon killed with kill -9 or host A cut off the
server, host B adopting.

One test per kind and way A dies (the lease waited out once, not once per instant), ten
chains in it: A serves chains ``K0``..``K9`` (``K`` the kind's letter), each running its
own job of that kind at ``speed=256``.  A step of a job copies one MiB; a step that
copied nothing costs nothing of ``speed``, one that copied something makes the job wait
minutes at that rate.  So each chain holds data only from a MiB of its own on
(``make_chains``, ``spread``), and its job, started, runs to the end of that MiB and
waits there: chains 1..8 at distinct MiBs (seeded), chain 9 at the end (an intermediate
commit with everything copied, waiting to complete; a mirror with ``wait=ready``,
``ready``), chain 0's job started only just before the instant (at its first step).  A
driver on A (``DRIVER``) starts them and, once they stand there, kills A's daemon (or
cuts A off) and says where each job stood (``offset``/``len``/``status`` from
``jobs``): ten distinct instants of the job, printed and asserted distinct.  One guest
writer on A (``GUEST_WRITER``), started once the jobs stand (its writes would give the
mirrors something to copy on their way), writes 4 KiB blocks round-robin to the ten
flat files, each fsync'ed before the next, saying ``begin CHAIN I`` before and ``ok
CHAIN I`` once acknowledged.

B adopts the ten chains (``control/CHAIN/adopt``, bounded by the daemon: 2 s after
kill -9, lease + grace + 5 s after a cut; the times, from the instant and from the
command, are printed), resumes each journal's job -- an active commit or a copy copies
again from the start (the README's hand-over table: the writes they track are in
memory) -- and finishes it.  Every write A acknowledged is in the result; the one in
flight at the instant (begun, not acknowledged) may or may not be.  Every image ends
``qemu-img check`` clean (A died between a cluster's allocation and its reference, which
leaks it, as QEMU killed there does; B, adopting a chain A did not release, repairs the
leaks of the layers it writes) and each chain's content equal to its model.  After a
cut, A keeps writing a marker to every flat file; healed, it reports lost ownership of
every chain, and no byte of the marker is anywhere on the server.

The phases' times are printed.  The default suite kills the copy's owner at three points
(three chains); ``--runslow`` at ten, and runs the other five.
"""

from __future__ import annotations

import copy
import json
import random
import shlex
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from lab.lab import LEASE, Lab

from chainfs.control import parse_line

from .conftest import DEADLINE, PY, ChainfsMount, KiB, MiB, Model, Site, wait_for, writer_script
from .test_nfs_hosts import LEASED, SEED

SIZE = 10 * MiB  # ten 1 MiB steps, each copying something
CHAINS = 10  # points of the job (3 in the default suite)
BLOCK = 4 * KiB
MARKER = b"CHAINFS-MARKER-A"  # what host A writes after it was cut off
MARKER_AT = 5 * MiB
KINDS = {"commit": "i", "active-commit": "a", "copy": "y"}  # the chains' letter
LAYERS = ("-0.qcow2", "-1.qcow2", ".qcow2")

# writes MARKER blocks to each flat file until killed, going on after errors
MARKER_WRITER = (
    "import os,sys,time\n"
    "blk=sys.argv[1].encode()*(64*1024//len(sys.argv[1]))\n"
    "while True:\n"
    " for p in sys.argv[3:]:\n"
    "  try:\n"
    "   fd=os.open(p,os.O_WRONLY)\n"
    "   os.pwrite(fd,blk,int(sys.argv[2]));os.fsync(fd);os.close(fd)\n"
    "   print('written',p,flush=True)\n"
    "  except OSError as e: print(e,flush=True)\n"
    " time.sleep(0.2)\n"
)
# writes 4 KiB blocks to the flat files round-robin, each fsync'ed, saying "begin CHAIN
# I" before and "ok CHAIN I" once fsync returned; stops at the first error; leaves the
# marker's block alone
GUEST_WRITER = (
    "import os,sys,time\n"
    "n,avoid=int(sys.argv[1]),int(sys.argv[2])\n"
    "fds=[(os.path.basename(p)[:-4],os.open(p,os.O_WRONLY)) for p in sys.argv[3:]]\n"
    "i=0\n"
    "while True:\n"
    " i+=1;b=(i*389)%n\n"
    " if b==avoid: continue\n"
    " for c,fd in fds:\n"
    "  print('begin',c,i,flush=True)\n"
    "  try:\n"
    "   os.pwrite(fd,bytes([i%255+1])*4096,b*4096);os.fsync(fd)\n"
    "  except OSError as e:\n"
    "   print('error',c,i,e,flush=True);sys.exit()\n"
    "  print('ok',c,i,flush=True)\n"
    "  time.sleep(0.1)\n"
)
# on A, "start": start the jobs but the late one, and wait until each stands where its
# chain's data make it wait; "act": start the late one, note where every job stands,
# and then -- once -- kill A's daemon or cut A off; prints the jobs and the instant (the
# guest's clock)
DRIVER = r"""
import json,os,shlex,subprocess,sys,time
spec=json.loads(sys.argv[1]);mp=spec['mp'];chains=spec['chains']
def ctl(c,verb,text):
    with open(f"{mp}/control/{c}/{verb}","w") as f: f.write(text+"\n")
def job(c):
    for line in open(f"{mp}/control/{c}/jobs").read().splitlines():
        return dict(w.split("=",1) for w in shlex.split(line))
def there(c):
    j=job(c['chain'])
    return j and (j['status']=='ready' if c['ready'] else int(j['offset'])>=c['offset'])
if spec['phase']=='start':
    for c in chains:
        if not c['late']: ctl(c['chain'],c['verb'],c['args'])
    for c in chains:
        t0=time.monotonic()
        while not c['late'] and not there(c):
            assert time.monotonic()-t0<120,(c,job(c['chain']))
            time.sleep(0.05)
    print(json.dumps({}))
else:
    for c in chains:
        if c['late']: ctl(c['chain'],c['verb'],c['args'])
    jobs={c['chain']:job(c['chain']) for c in chains}
    instant=time.time()
    if spec['phase']=="kill": os.kill(spec['pid'],9)
    else: subprocess.run(["nsenter","-t","1","-n","ip","link","set","lab-a","down"],check=True)
    print(json.dumps({"instant":instant,"jobs":jobs}))
"""


def block_of(i: int) -> int:
    return (i * 389) % (SIZE // BLOCK)


@dataclass
class Writes:
    """What the guest writer on A did to one chain: its acknowledged writes, and the
    one in flight."""

    acked: list[int]
    in_flight: int | None

    @classmethod
    def parse(cls, out: str, chain: str) -> Writes:
        begun: list[int] = []
        acked: list[int] = []
        for line in out.splitlines():
            word, name, rest = (line.split(" ", 2) + ["", ""])[:3]
            if name != chain:
                continue
            if word == "begin":
                begun.append(int(rest))
            elif word == "ok":
                acked.append(int(rest))
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


def make_chains(site: Site, tmp: Path, firsts: dict[str, int]) -> dict[str, Model]:
    """``CHAIN-0.qcow2 <- CHAIN-1.qcow2 <- CHAIN.qcow2`` for each chain, every layer
    holding 64 KiB of its own in every MiB from ``firsts[CHAIN]`` on and nothing
    before: a job at ``speed=256`` runs through the empty MiBs, copies the first one
    with data and waits there.  Made by this machine's qemu-img and qemu-io (quick,
    where the guest's are not) in ``tmp``, which the guest sees at the same path, and
    copied to the store on the server; their models."""
    models = {}
    for chain, first in firsts.items():
        model = models[chain] = Model(SIZE)
        for i, suffix in enumerate(LAYERS):
            name = str(tmp / (chain + suffix))
            create = ["qemu-img", "create", "-q", "-f", "qcow2", name, str(SIZE)]
            if i:
                create[5:5] = ["-F", "qcow2", "-b", chain + LAYERS[i - 1]]
            subprocess.run(create, check=True, cwd=tmp)
            writes = []
            for m in range(first, SIZE // MiB):
                off, pattern = m * MiB + i * 128 * KiB, 0x10 + 16 * i + m
                writes += ["-c", f"write -P {pattern} {off} {64 * KiB}"]
                model.write(off, 64 * KiB, pattern)
            if writes:
                subprocess.run(
                    ["qemu-io", "-f", "qcow2", *writes, name], check=True, stdout=subprocess.DEVNULL
                )
    site.sh(None, f"cp {tmp}/*.qcow2 .")
    return models


def job_text(site: Site, kind: str, chain: str, ready: bool) -> tuple[str, str, str]:
    """The control file and command that start the job of ``kind`` on ``chain`` at
    ``speed=256``, and the layer the chain ends on."""
    wait = " wait=ready" if ready else ""
    if kind == "commit":
        return "commit", f"top={chain}-1.qcow2 base={chain}-0.qcow2 speed=256", f"{chain}.qcow2"
    if kind == "active-commit":
        args = f"top={chain}.qcow2 base={chain}-0.qcow2 speed=256{wait}"
        return "commit", args, f"{chain}-0.qcow2"
    dest = f"{chain}-copy.qcow2"
    return "copy", f"{site.dir}/{dest} speed=256{wait}", dest


def events_of(m: ChainfsMount, chains: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """The ``events`` of each chain, read in one command."""
    chains = list(chains)
    script = "; ".join(f"echo '#chain {c}'; cat {m.control(c, 'events')}" for c in chains)
    seen: dict[str, list[dict[str, str]]] = {c: [] for c in chains}
    chain = ""
    for line in m.sh(script).out.splitlines():
        if line.startswith("#chain "):
            chain = line.split()[1]
        elif line.strip():
            seen[chain].append(parse_line(line))
    return seen


def commands(m: ChainfsMount, verb: str, texts: dict[str, str]) -> float:
    """Write ``texts[CHAIN]`` to each ``control/CHAIN/VERB``, side by side in one
    command (a write waits while the daemon is busy: 1 s each, one after another, when
    B had just begun adopting); the guest's time when it started."""
    writes = "".join(
        f"printf '%s\\n' {shlex.quote(t)} > {m.control(c, verb)} & " for c, t in texts.items()
    )
    script = f"date +%s.%N; {writes}for p in $(jobs -p); do wait $p; done"
    return float(m.sh(script).out.split()[0])


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def since(events: list[dict[str, str]], instant: float, *names: str) -> dict[str, str] | None:
    """The first of ``events`` named one of ``names`` after ``instant`` (guest clock)."""
    for e in events:
        if e["event"] in names and seconds(e["time"]) >= instant:
            return e
    return None


def adopt_all(b: ChainfsMount, chains: list[str], timeout: float, instant: float) -> None:
    """B adopts the chains (the daemon bounds each wait by ``timeout``); prints how long
    each took after the instant and after its adopt command."""
    asked = commands(b, "adopt", {c: f"{c} timeout={timeout:.0f}" for c in chains})

    def taken() -> dict[str, list[dict[str, str]]] | None:
        seen = events_of(b, chains)
        for c in chains:
            failed = since(seen[c], instant, "ADOPT_FAILED")
            assert failed is None, failed
        if all(since(seen[c], instant, "OWNERSHIP_TAKEN") for c in chains):
            return seen
        return None

    seen = wait_for(taken, "B to adopt every chain", timeout + 120)
    for c in chains:
        took = seconds(since(seen[c], instant, "OWNERSHIP_TAKEN")["time"])  # type: ignore[index]
        print(
            f"{c}: adopted {took - instant:.2f} s after the instant, "
            f"{took - asked:.2f} s after the adopt commands"
        )


def finish_all(b: ChainfsMount, jobs: dict[str, str], instant: float) -> None:
    """Each chain's job resumed on B under its id: full speed there, ``complete`` for
    one that waits in ``ready``, then its end."""

    def resumed() -> bool:
        seen = events_of(b, jobs)
        for c, job in jobs.items():
            e = since(seen[c], instant, "JOB_RESUMED")
            if e is None:
                return False
            assert e["job"] == job, (c, e)
        return True

    wait_for(resumed, "the jobs to be resumed on B")
    commands(b, "speed", {c: f"{job} 0" for c, job in jobs.items()})
    completing: set[str] = set()

    def ended() -> bool:
        seen = events_of(b, jobs)
        done = True
        for c, job in jobs.items():
            end = since(seen[c], instant, "JOB_COMPLETED", "JOB_CANCELLED")
            if end is not None:
                assert end["event"] == "JOB_COMPLETED" and "error" not in end, (c, end)
                continue
            done = False
            if since(seen[c], instant, "JOB_READY") and c not in completing:
                completing.add(c)
                b.command(c, "complete", job)
        return done

    wait_for(ended, "the jobs to end on B", 300)


@dataclass
class Point:
    """Where a chain's job is to stand at the instant."""

    first: int  # the first MiB with data (the job waits after copying it)
    late: bool = False  # started just before the instant
    ready: bool = False  # a mirror waiting in ready (wait=ready): the chain has no data


def spread(kind: str, n: int) -> list[Point]:
    """Where each of ``n`` chains' job stands at the instant: chain 0's started just
    before it, chains 1..n-2 at distinct MiBs (seeded), the last at the end (an
    intermediate commit with everything copied, a mirror ready)."""
    rng = random.Random(f"{SEED}-{kind}")
    mibs = SIZE // MiB
    middle = sorted(rng.sample(range(1, mibs - 1), n - 2))
    points = [Point(0, late=True)] + [Point(m) for m in middle]
    points.append(Point(mibs - 1) if kind == "commit" else Point(mibs, ready=True))
    return points


def run_failover(lab: Lab, site: Site, tmp: Path, kind: str, how: str, n: int) -> None:
    began = time.monotonic()

    def phase(what: str) -> None:
        print(f"{time.monotonic() - began:6.1f} s: {what}")

    letter = KINDS[kind]
    chains = [f"{letter}{k}" for k in range(n)]
    points = dict(zip(chains, spread(kind, n), strict=True))
    models = make_chains(site, tmp, {c: p.first for c, p in points.items()})
    options = LEASED if how == "cut" else ()
    a = site.mount("a", *options)
    b = site.mount("b", *options)
    spec = []
    actives = {}
    for c, p in points.items():
        verb, args, actives[c] = job_text(site, kind, c, p.ready)
        offset = (p.first + 1) * MiB
        spec.append(
            {
                "chain": c,
                "verb": verb,
                "args": args,
                "late": p.late,
                "ready": p.ready,
                "offset": offset,
            }
        )
    driver = {"mp": a.mountpoint, "pid": a.pid, "chains": spec}

    def drive(phase: str) -> dict[str, Any]:
        argv = [PY, "-S", "-c", DRIVER, json.dumps({**driver, "phase": phase})]
        return json.loads(lab.run("a", argv, timeout=300).out.splitlines()[-1])  # type: ignore[no-any-return]

    phase("chains made, both hosts mounted")
    drive("start")
    phase("the jobs at their points")
    # the guest writer, once the jobs wait where they are to be (its writes would give
    # the mirrors something to copy on their way)
    writer_argv = [PY, "-S", "-u", "-c", GUEST_WRITER, str(SIZE // BLOCK), str(MARKER_AT // BLOCK)]
    writer_argv += [a.img(c) for c in chains]
    said_at = f"/run/guest-writer-{site.name}"
    writer = lab.spawn("a", ["sh", "-c", f"exec {shlex.join(writer_argv)} >{said_at} 2>&1"])

    def said() -> str:
        return lab.run("a", ["cat", said_at], check=False).out

    # (waits in the guest: each look from here is a command through the agent)
    r = lab.wait_until("a", f'(( $(grep -c "^ok " {said_at}) > {n} ))', DEADLINE)
    assert r.rc == 0, f"the guest writer on A did not write: {said()[-1000:]}"
    told = drive(how)
    phase(f"the instant ({how})")
    instant: float = told["instant"]
    stood = {c: told["jobs"][c] or {} for c in chains}
    for c in chains:
        j = stood[c]
        print(f"{c}: {j.get('id')} offset={j.get('offset')} len={j.get('len')} {j.get('status')}")
    where = [(j.get("offset"), j.get("len"), j.get("status")) for j in stood.values()]
    assert len(set(where)) == n, where
    jobs = {c: stood[c]["id"] for c in chains}
    marker = None
    try:
        if how == "kill":
            # the mount died under the writer
            writer_failed(lab, said_at)
            lab.signal(writer, "SIGKILL")
            adopt_all(b, chains, 2, instant)  # kill -9 frees the locks at once
            phase("adopted")
            finish_all(b, jobs, instant)
            phase("the jobs finished on B")
        else:
            marker = lab.spawn(
                "a",
                [PY, "-S", "-c", MARKER_WRITER, MARKER.decode(), str(MARKER_AT)]
                + [a.img(c) for c in chains],
            )
            adopt_all(b, chains, 2 * LEASE + 5, instant)  # A's lease, then the server's grace
            phase("adopted")
            finish_all(b, jobs, instant)
            phase("the jobs finished on B")
            lab.heal("a")

            def lost() -> bool:
                seen = events_of(a, chains)
                return all(since(seen[c], instant, "OWNERSHIP_LOST") for c in chains)

            wait_for(lost, "host A to report lost ownership of every chain")
            # the write in flight at the cut fails: A knows it lost the chain
            writer_failed(lab, said_at)
    finally:
        lab.heal("a")
        lab.signal(writer, "SIGKILL")
        lab.wait(writer)
        if marker is not None:
            lab.signal(marker, "SIGKILL")
            tried = lab.wait(marker).out
            assert "[Errno 5]" in tried, tried[-2000:]
    text = said()
    if how == "cut":
        assert "[Errno 5]" in text, text[-1000:]
    # B writes on each chain, then gives them up; A's mount goes
    candidates = {}
    for c in chains:
        candidates[c] = Writes.parse(text, c).apply(models[c])
        for m in candidates[c]:
            m.write(7 * MiB, 64 * KiB, 0xB7)
    b.sh(writer_script([b.img(c) for c in chains], 7 * MiB, 64 * KiB, 0xB7))
    b.unmount()
    a.cleanup()
    if how == "cut":
        no_marker(site)
    names = [c + s for c in chains for s in (*LAYERS, "-copy.qcow2")]
    phase("B wrote, unmounted")
    site.check_images(site.existing(names))
    got = site.digests(actives.values())
    phase("checked")
    for c in chains:
        digests = [m.digest() for m in candidates[c]]
        assert got[actives[c]] in digests, f"{c}: no candidate; the writer said:\n{text[-1500:]}"


def writer_failed(lab: Lab, said_at: str) -> None:
    """Until the guest writer on A says it failed (its mount died, or A lost the chain)."""
    r = lab.wait_until("a", f"grep -q ^error {said_at}", DEADLINE)
    assert r.rc == 0, "the guest writer on A did not fail"


def no_marker(site: Site) -> None:
    """No byte of the marker anywhere in the directory (images, journals, state), as
    the server's disk has it."""
    r = site.sh(None, f"grep -ralF {MARKER.decode()} . || true")
    assert r.out.strip() == "", f"host A's writes after the cut reached the server: {r.out}"
    # (the search itself finds what is there: every qcow2 image has QEMU's magic)
    assert ".qcow2" in site.sh(None, "grep -ralF QFI .").out


CASES = [
    pytest.param(kind, how, marks=pytest.mark.slow) for how in ("kill", "cut") for kind in KINDS
]


@pytest.mark.parametrize(("kind", "how"), CASES)
def test_the_owner_dies_at_ten_points_of_a_job_and_the_other_host_adopts_and_finishes(
    lab: Lab, site: Site, tmp_path: Path, kind: str, how: str
) -> None:
    run_failover(lab, site, tmp_path, kind, how, CHAINS)


def test_the_owner_of_three_copies_is_killed_and_the_other_host_adopts_and_finishes(
    lab: Lab, site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The default suite's fail-over: a copy's owner killed at three points (just
    started, mid-way, ready); ``--runslow`` runs the ten points instead."""
    if request.config.getoption("--runslow"):
        pytest.skip("--runslow kills the copy's owner at ten points")
    run_failover(lab, site, tmp_path, "copy", "kill", 3)
