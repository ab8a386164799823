"""Guest requests landed, deterministically, in every window a job leaves open.

A job runs in steps, each a synchronous stretch under the chain's lock; guest requests
run only at the checkpoints between them (``Job.between_steps`` is called right there,
so a hook lands a request in a chosen window: no sleep, no race).  Copy and active
commit write the target with ``write_started``: at a checkpoint the step's last run of
data may still be on its way, the target's L2 entries not yet pointing at it (the
``late`` fixture makes it land only when the driver settles it).  The windows, by
reading ``chain.py``, ``jobs/*.py`` and the qcow2 driver:

- job start (the first ``checkpoint(0)``): nothing of the job exists yet; no data window.
- mirror first pass (active commit, copy sync=full/top), after a ``copy_step``: a
  started write pending on the target.  Behind the position the request is marked dirty;
  zeros there make the drain's zero test (``_reads_zero``) ask the target about
  clusters whose write has not landed: answered "unallocated, reads zeros" it skipped
  them and the later settle landed the old data (the pivot data loss of 092c886).
  Ahead of it the pass must copy the request itself, zeros without resurrecting data.
- mirror first pass, ``next_step``'s decision and the copy: one synchronous stretch
  (the dirty horizon moves with it); no window.
- mirror drain step: the drained granule's write pending; zeros over it go to the next
  drain's zero test; a write just beside it (in sync) must be tracked again.
- mirror drain steps in READY (``wait=ready``): the same, with the job ready.
- mirror waiting in READY (blocked, no step running), the last drain's write still
  pending: a request wakes a drain; ``complete`` right after it pivots after that drain.
- mirror in write-blocking mode (``copy-mode=write-blocking``, and every mirror after
  ``complete``): a guest write behind the pass is copied into the target by the write
  hook (``after_write``) before it is answered, with ``write_started``: the hook's own
  copy may be pending when the next request comes, in the same window or the next.
- the pivot (``prepare``: last dirty granules, flush, state file, switch): synchronous,
  no window; a request just before it (the READY wait) and just after it (into the new
  active layer) are tested.
- intermediate commit step: ``copy_step`` into the base left a started write pending on
  the base; guest writes go to the active layer, whose copy-on-write reads down through
  the base: an entry pointing at data not landed, or the started write lost, shows as
  wrong bytes in the merged chain.
- intermediate commit skip (``next_step`` found nothing before the next held unit):
  requests in the passed-over range and just ahead of the next step.
- stream step (plain writes, nothing pending): behind, requests over clusters just
  streamed into the node; ahead, a request into a cluster the next step would copy must
  win (the step must skip what the node now holds: data, a copied-on-write partial
  zero, a zero cluster), never be overwritten by the older content from below.
- stream skip (``stream_next``): the decision comes from the read-only layers between
  node and base only, so a request in the skipped range or just ahead cannot make it
  wrong; ``stream_next`` and ``stream_step`` share one stretch: no window between.
- snapshot: synchronous (flush, create, ``push_overlay`` under the lock): no window; a
  request just before must stay in the old active layer, one just after goes above it.

Each window gets each kind of request: (a) data, (b) zeros written as data (4 KiB,
part of a cluster, ``Chain.write``), (c) zero clusters (a whole cluster,
``Chain.write_zeroes``), (d) a discard (a whole cluster, ``Chain.discard``: unallocated
where nothing below holds data, else a zero cluster; while a mirror tracks the disk,
always a zero cluster, or the mirror, which copies again only what a layer above its
target holds, would leave the discarded data in the target), aimed at the clusters the
step just copied (asserted to be still pending where the job writes with
``write_started``) and just ahead of the job;
data first and the request second over the same bytes in consecutive windows where
the region reads zeros otherwise (the bug pattern).  Verdicts, after the job completed
and pivoted: the disk equals the guest's model, ``qemu-img check`` passes every image,
``qemu-img compare`` finds the model in the resulting active image.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chainfs.chain import Chain
from chainfs.formats.base import Layer
from chainfs.jobs.base import READY, Job
from chainfs.jobs.commit import CommitJob
from chainfs.jobs.mirror import MirrorJob

from . import images as im
from .test_commit_copy import check_all, events, names, serve

MiB, KiB = im.MiB, im.KiB
SIZE = 8 * MiB
CS = 65536  # every layer's cluster size
DATA_MIBS = (0, 1, 4, 5)  # the other MiBs are holes in every layer
KINDS = ["data", "zeros", "write-zeroes", "discard"]

# a request: (kind, cluster, must the target's started write still hold that cluster);
# kind "K" is the test's own kind.  Data and zeros cover [cluster + 4 KiB, + 8 KiB),
# a discard the whole cluster.
Req = tuple[str, int, bool]
# the requests of a window: ("pass" | "step", job.offset) or ("drain" | "ready", n-th)
Plan = dict[tuple[str, int], list[Req]]


def H(m: int) -> int:
    """A cluster of hole MiB ``m``: nothing anywhere in the chain holds it."""
    return m * MiB + 320 * KiB


def P(m: int) -> int:
    """The last cluster of data MiB ``m``: only the active layer's 4 KiB at +4 KiB, so
    zeros over those bytes make it all zeros (and the first pass's last started write)."""
    return m * MiB + 960 * KiB


def layout() -> list[dict[str, Any]]:
    """``A <- B <- C <- D``; in each data MiB: A [0, 128K), B [256K, 512K), C [0, 64K)
    and [384K, 640K), D 4 KiB at 0, [768K, 832K) and 4 KiB in ``P``.  The active layer
    and C hold each data MiB's first cluster, so every job steps MiB by MiB."""
    a: list[im.Write] = []
    b: list[im.Write] = []
    c: list[im.Write] = []
    d: list[im.Write] = []
    for m in DATA_MIBS:
        o = m * MiB
        a.append((o, 128 * KiB, 0x11))
        b.append((o + 256 * KiB, 256 * KiB, 0x22))
        c += [(o, CS, 0x33), (o + 384 * KiB, 256 * KiB, 0x33)]
        d += [(o, 4096, 0x44), (o + 768 * KiB, CS, 0x44), (P(m) + 4096, 4096, 0x45)]
    return [
        {"name": "A.qcow2", "writes": a},
        {"name": "B.qcow2", "writes": b},
        {"name": "C.qcow2", "writes": c},
        {"name": "D.qcow2", "writes": d},
    ]


JOBS = {
    # id: (control file, command, layers after, active first)
    "active-commit": ("commit", "base=A.qcow2", ["A.qcow2"]),
    "copy-full": ("copy", "F.qcow2 sync=full", ["F.qcow2"]),
    "copy-top": ("copy", "F.qcow2 sync=top", ["F.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]),
    "intermediate-commit": ("commit", "top=C.qcow2 base=A.qcow2", ["D.qcow2", "A.qcow2"]),
    "stream": ("stream", "base=A.qcow2", ["D.qcow2", "A.qcow2"]),
}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("windows") / "images"
    d.mkdir()
    _, model = im.build_chain(str(d), layout(), size=SIZE)
    content = bytes(model)
    assert im.reference(str(d / "D.qcow2")) == content
    return d, content


@pytest.fixture
def chain_dir(tmp_path: Path, template: tuple[Path, bytes]) -> tuple[Path, bytearray]:
    d = tmp_path / "images"
    shutil.copytree(template[0], d)
    return d, bytearray(template[1])


# -- the guest and the hook ----------------------------------------------------------------


def pending(layer: Layer | None) -> list[int]:
    """The clusters of ``layer``'s started write not yet settled (by guest offset)."""
    started = getattr(layer, "_started", None)
    return [] if started is None else [c * CS for c, _ in started[1]]


def target_of(job: Job | None) -> Layer | None:
    """The image the job writes with ``write_started`` (none for a stream)."""
    if isinstance(job, MirrorJob):
        return job.target
    if isinstance(job, CommitJob):
        return job.base
    return None


class Guest:
    """Requests through ``disk.chain``, mirrored in ``model``."""

    def __init__(self, chain: Chain, model: bytearray, kind: str) -> None:
        self.chain = chain
        self.model = model
        self.kind = kind
        self.rng = random.Random(kind)
        self.last = 0  # the cluster of the last request

    def do(self, kind: str, cluster: int) -> None:
        if kind == "write-zeroes":
            self.chain.write_zeroes(cluster, CS)
            self.model[cluster : cluster + CS] = bytes(CS)
        elif kind == "discard":
            self.chain.discard(cluster, CS)
            self.model[cluster : cluster + CS] = bytes(CS)
        else:
            data = self.rng.randbytes(4096) if kind == "data" else bytes(4096)
            self.chain.write(cluster + 4096, data)
            self.model[cluster + 4096 : cluster + 8192] = data
        self.last = cluster

    def apply(self, reqs: list[Req], target: Layer | None) -> None:
        """Each request in turn, checked just before it (a write-blocking job's hook
        leaves a started write of its own pending between two requests of a window)."""
        for kind, cluster, must in reqs:
            if must:
                on_way = pending(target)
                assert cluster in on_way, f"{cluster:#x} is not pending; pending: {on_way}"
            self.do(self.kind if kind == "K" else kind, cluster)


class Script:
    """``Job.between_steps``: the requests planned for each window, in it."""

    def __init__(self, guest: Guest, plan: Plan) -> None:
        self.guest = guest
        self.left = dict(plan)
        self.counts: dict[str, int] = {}
        self.seen: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self.passed = False  # a mirror's first pass reached the end of the disk

    def __call__(self, job: Job) -> None:
        try:
            if isinstance(job, MirrorJob):
                if job.target is None or job.dirty is None:
                    window = "start"
                elif job.status == READY:
                    window = "ready"
                else:  # the pass's windows by its position (a write-blocking job's
                    # hook copies add to ``offset`` too); the pass ends at SIZE, once
                    window = "pass" if job.dirty.horizon < SIZE or not self.passed else "drain"
                    self.passed = job.dirty.horizon == SIZE
            else:
                window = "step"
            if window in ("drain", "ready"):
                n = self.counts[window] = self.counts.get(window, 0) + 1
            elif isinstance(job, MirrorJob) and job.dirty is not None:
                n = job.dirty.horizon
            else:
                n = job.offset
            self.seen.append((window, n))
            reqs = self.left.pop((window, n), None)
            if reqs:
                self.guest.apply(reqs, target_of(job))
        except BaseException as e:  # the job would only log it: the test raises it
            self.errors.append(e)
            raise


async def run_case(
    chain_dir: tuple[Path, bytearray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job_name: str,
    kind: str,
    plan: Plan,
    ready: list[Req] | None = None,
    wait: list[Req] | None = None,
    mode: str = "",
) -> Script:
    """Run the job with ``plan`` in its windows (and, with ``wait=ready``, ``ready`` once
    it is ready and blocked, ``wait`` once it drained that and waits again, then
    ``complete``), a request just after it ended, and judge the result."""
    d, model = chain_dir
    control, command, after = JOBS[job_name]
    async with serve(d) as disk:
        guest = Guest(disk.chain, model, kind)
        script = Script(guest, plan)
        monkeypatch.setattr(Job, "between_steps", script)
        waits = ready is not None
        command += f" copy-mode={mode}" if mode else ""
        disk.command(control, (command + (" wait=ready" if waits else "")).encode())
        job = disk.job
        assert job is not None
        if waits:
            await trio.testing.wait_all_tasks_blocked()
            assert job.status == READY and not script.errors, script.errors
            guest.apply(ready or [], target_of(job))
            await trio.testing.wait_all_tasks_blocked()
            assert job.status == READY
            guest.apply(wait or [], target_of(job))
            disk.command("complete", job.id.encode())
        await job.done.wait()
        if script.errors:
            raise script.errors[0]
        assert not script.left, f"windows never reached: {script.left}; seen: {script.seen}"
        end = [e for e in events(disk) if e["event"] == "JOB_COMPLETED"]
        assert end and "error" not in end[-1], end
        assert names(disk) == after
        # just after the pivot (or splice): into the new chain's active layer
        last = guest.last
        guest.do("data", last)
        guest.do(kind, last)
        guest.do(kind, P(4))
        assert disk.chain.read(0, SIZE) == model
        active = disk.chain.active.path
    check_all(d)
    im.assert_same_as(active, bytes(model), str(tmp_path))
    return script


# -- mirror: active commit, copy sync=full, copy sync=top ----------------------------------


def mirror_plan(window: str) -> tuple[Plan, list[Req] | None, list[Req] | None]:
    """(hook plan, requests once ready, requests while waiting in ready)."""
    # a drain copies its dirty granules lowest first, and any write into the target
    # settles the started write: a request over a pending write bites only if nothing
    # is written to the target before the drain's zero test reaches it
    if window == "pass":
        # after the last data MiB's step: over its last started write, P(5) (the
        # seed's 4 KiB), and ahead of it; nothing settles P(5) before the drain
        return {("pass", 6 * MiB): [("K", P(5), True), ("K", H(6), False)]}, None, None
    if window == "pass-hole":
        # data ahead into a hole; the next step copies only that (pending): the request
        # over the same bytes in the next window, and ahead
        return (
            {
                ("pass", 6 * MiB): [("data", H(6), False)],
                ("pass", 7 * MiB): [("K", H(6), True), ("K", H(7), False)],
            },
            None,
            None,
        )
    if window == "drain":
        # first the same in early pass windows, where the next steps settle the write
        # (and the drain copies those granules first); then data behind the pass, which
        # the drain copies last: pending, the request over it and beside it
        hole = 3 * MiB + 576 * KiB
        return (
            {
                ("pass", MiB): [("K", P(0), True), ("K", P(1), False)],
                ("pass", 2 * MiB): [("data", H(2), False)],
                ("pass", 3 * MiB): [("K", H(2), True), ("K", H(3), False)],
                ("pass", 4 * MiB): [("data", hole, False)],
                ("drain", 1): [("K", hole, True), ("K", hole + CS, False)],
            },
            None,
            None,
        )
    if window == "ready":
        return (
            {("ready", 1): [("K", H(6), True), ("K", H(6) + CS, False)]},
            [("data", H(6), False)],
            [],
        )
    assert window == "wait"
    return {}, [("data", H(6), False)], [("K", H(6), True), ("K", H(6) + CS, False)]


@pytest.mark.usefixtures("late")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", ["pass", "pass-hole", "drain", "ready", "wait"])
@pytest.mark.parametrize("job_name", ["active-commit", "copy-full", "copy-top"])
async def test_mirror_windows(
    chain_dir: tuple[Path, bytearray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job_name: str,
    window: str,
    kind: str,
) -> None:
    plan, ready, wait = mirror_plan(window)
    await run_case(chain_dir, tmp_path, monkeypatch, job_name, kind, plan, ready, wait)


# the hook's own started write: behind the pass, a write-blocking job copies each guest
# write into the target before answering it (``after_write``); where the target does not
# hold the cluster yet (a hole), that copy may still be on its way when the next request
# comes.  The request over the same bytes at once (one window) and in the next window
# (the step over a hole writes nothing to the target), one beside it, and the in-place
# case: the active layer's data the pass already copied (P(1), written in place)
BLOCKING: Plan = {
    ("pass", 6 * MiB): [
        ("data", H(2), False),
        ("K", H(2), True),
        ("data", P(1), False),
        ("K", P(1), False),
        ("data", H(3), False),
    ],
    ("pass", 7 * MiB): [("K", H(3), True), ("K", H(3) + CS, False)],
}


@pytest.mark.usefixtures("late")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("job_name", ["active-commit", "copy-full", "copy-top"])
async def test_write_blocking_windows(
    chain_dir: tuple[Path, bytearray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job_name: str,
    kind: str,
) -> None:
    await run_case(
        chain_dir, tmp_path, monkeypatch, job_name, kind, dict(BLOCKING), mode="write-blocking"
    )


# -- intermediate commit and stream --------------------------------------------------------


def step_plan(window: str, started: bool) -> Plan:
    """Behind: the clusters the step just copied (for a commit, the base's pending
    started write); ahead: data and the request where the next step copies; then the
    request over the data's bytes, in the next window."""
    if window == "step":  # after the step over MiB 0: behind, what it copied
        first, behind, nxt, on_way = MiB, 256 * KiB, MiB, started
    else:  # after passing over MiBs 2-3 (stream) or 3 (commit): behind, a hole
        first, behind, nxt, on_way = 4 * MiB, H(3), 4 * MiB, False
    return {
        ("step", first): [
            ("K", behind, on_way),
            ("data", nxt + 256 * KiB, False),
            ("K", nxt + 512 * KiB, False),
        ],
        ("step", first + MiB): [("K", nxt + 256 * KiB, started)],
    }


@pytest.mark.usefixtures("late")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", ["step", "skip"])
@pytest.mark.parametrize("job_name", ["intermediate-commit", "stream"])
async def test_step_windows(
    chain_dir: tuple[Path, bytearray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job_name: str,
    window: str,
    kind: str,
) -> None:
    plan = step_plan(window, started=job_name == "intermediate-commit")
    script = await run_case(chain_dir, tmp_path, monkeypatch, job_name, kind, plan)
    if window == "skip":
        # the window follows a decision to pass over a range with nothing to copy: a
        # commit's next_step from 3 MiB (after an empty step), a stream's jump from 2 MiB
        i = script.seen.index(("step", 4 * MiB))
        before = 3 * MiB if job_name == "intermediate-commit" else 2 * MiB
        assert script.seen[i - 1] == ("step", before), script.seen


# -- snapshot ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_snapshot_between_requests(
    chain_dir: tuple[Path, bytearray], tmp_path: Path, kind: str
) -> None:
    """A snapshot has no window; data just before it, the request over the same bytes
    just after (and the other way round): the old active layer keeps what was written
    before, the new one shows everything."""
    d, model = chain_dir
    async with serve(d) as disk:
        guest = Guest(disk.chain, model, kind)
        guest.do("data", H(2))
        guest.do(kind, P(1))
        before = bytes(model)
        disk.command("snapshot", b"S.qcow2")
        guest.do(kind, H(2))
        guest.do("data", P(1))
        guest.do(kind, P(4))
        assert names(disk) == ["S.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
        assert disk.chain.read(0, SIZE) == model
    check_all(d)
    im.assert_same_as(str(d / "D.qcow2"), before, str(tmp_path))
    im.assert_same_as(str(d / "S.qcow2"), bytes(model), str(tmp_path))
