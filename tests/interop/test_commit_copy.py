"""commit and copy on the engine (``Disk`` and ``Chain``, no FUSE), judged by QEMU's tools.

    [A] <- [B] <- [C] <- [D] <- [E]
      commit top=D base=B   ->  [A] <- [B] <- [E]
      commit base=A         ->  [A]                      (active commit, pivot)
      copy F sync=full      ->  [F]
      copy F sync=top       ->  [A] <- [B] <- [C] <- [D] <- [F]

The jobs run in the test's own trio loop with a guest task writing through
``Chain.write`` between their steps, some writes aimed behind the copy's position so
that they must be tracked as dirty and copied again.  Verdicts: the disk equals the
guest's model, ``qemu-img check`` passes every image, ``qemu-img compare`` finds the
model in the new chain, ``qemu-img info`` shows its shape and backing strings, layers
the job must not write keep their bytes, and the next ``source.load`` serves the chain
under its name.  Also: cancel at every stage, the refusals of qemu-iotests 040, EBUSY,
``complete``, relative backing strings, a raw base, zero blocks staying sparse in the
base, and a base shorter than the top.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from chainfs import source as sources
from chainfs.chain import Chain
from chainfs.control import CommandError, parse_line
from chainfs.disk import Disk
from chainfs.jobs.base import CONCLUDED, READY

from . import images as im

MiB = im.MiB
SIZE = 8 * MiB
SEED = Path(__file__).resolve().parents[2] / "scripts" / "make-seed-chain"
NAMES = ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]  # active first


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("seed") / "images"
    subprocess.run([sys.executable, SEED, d, "--size", str(SIZE)], check=True, capture_output=True)
    return d, im.reference(str(d / "E.qcow2"))


@pytest.fixture
def seed(tmp_path: Path, seed_template: tuple[Path, bytes]) -> tuple[Path, bytes]:
    """A fresh copy of the seed chain in ``tmp_path/images``, and its content."""
    d = tmp_path / "images"
    shutil.copytree(seed_template[0], d)
    return d, seed_template[1]


@asynccontextmanager
async def serve(directory: Path, *allow: Path) -> AsyncIterator[Disk]:
    """The one chain of ``directory``, served as the mount would, jobs in this loop."""
    src = sources.load(str(directory))
    (spec,) = src.chains
    chain = Chain.open(spec.active, writable=True)
    ids = itertools.count(1)
    try:
        async with trio.open_nursery() as nursery:
            disk = Disk(
                spec.name,
                chain,
                src,
                allowed_dirs=[str(directory), *map(str, allow)],
                readonly=False,
                spawn=nursery.start_soon,
                next_id=lambda kind: f"{kind}-{next(ids)}",
            )
            yield disk
            await disk.stop_jobs()
    finally:
        chain.close()
        for name in list(src.owned):  # as the mount does at its end: the locks go
            src.disown(name)


def events(disk: Disk) -> list[dict[str, str]]:
    return [parse_line(line) for line in disk.events.decode().splitlines()]


def names(disk: Disk) -> list[str]:
    return [os.path.basename(x.path) for x in disk.chain.layers]


async def run_job(disk: Disk, kind: str, text: str) -> dict[str, str]:
    """Start a job, wait for its end; return its last event."""
    disk.command(kind, text.encode())
    job = disk.job
    assert job is not None
    await job.done.wait()
    (end,) = [
        e
        for e in events(disk)
        if e.get("job") == job.id and e["event"] in ("JOB_COMPLETED", "JOB_CANCELLED")
    ]
    return end


class Guest:
    """Random writes through ``Chain.write``/``write_zeroes`` between the job's steps,
    mirrored in ``model``; every other write lands behind the job's position (already
    copied, so it must be tracked as dirty) when ``aim`` gives one."""

    def __init__(self, disk: Disk, model: bytearray, seed: int) -> None:
        self.disk = disk
        self.model = model
        self.rng = random.Random(seed)
        self.count = 0

    def write_one(self) -> None:
        rng, size = self.rng, len(self.model)
        n = rng.randint(1, 80 * 1024)
        off = rng.randrange(0, size - n)
        job = self.disk.job
        if job is not None and job.offset and self.count % 2:
            off = max(0, min(size - n, job.offset - rng.randrange(1, 2 * MiB)))
        if rng.random() < 0.15:
            self.disk.chain.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            self.disk.chain.write(off, data)
            self.model[off : off + n] = data
        self.count += 1

    async def run(self, until: Callable[[], bool], burst: int = 3) -> None:
        while not until():
            for _ in range(burst):
                self.write_one()
            await trio.lowlevel.checkpoint()


def check_all(directory: Path) -> None:
    for p in sorted(directory.iterdir()):
        qcow2 = p.is_file() and not p.name.startswith(".")
        if qcow2 and im.image_format(str(p)) == "qcow2":
            im.assert_clean(str(p))


def backing_names(path: Path) -> list[str]:
    info = json.loads(
        im.run(["qemu-img", "info", "--backing-chain", "--output=json", str(path)]).stdout
    )
    return [os.path.basename(x["filename"]) for x in info]


def backing_string(path: Path) -> str | None:
    info = json.loads(im.run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    value = info.get("backing-filename")
    return str(value) if value is not None else None


def served(directory: Path) -> list[tuple[str, str]]:
    """What the next mount would serve: (name, active layer's file name)."""
    src = sources.load(str(directory))
    assert not src.refused, src.refused
    return [(c.name, os.path.basename(c.active)) for c in src.chains]


# -- intermediate commit -------------------------------------------------------------------


async def test_intermediate_commit_seed(seed: tuple[Path, bytes], tmp_path: Path) -> None:
    d, content = seed
    p = {n[0]: d / n for n in NAMES}
    d_view = im.reference(str(p["D"]))  # D still shows this afterwards: it stays valid
    kept = im.file_digests(str(p[x]) for x in "ACD")
    model = bytearray(content)
    async with serve(d) as disk:
        guest = Guest(disk, model, seed=1)
        disk.command("commit", b"top=D.qcow2 base=B.qcow2")
        job = disk.job
        assert job is not None
        await guest.run(lambda: job.status == CONCLUDED)
        await job.done.wait()
        ev = events(disk)
        assert names(disk) == ["E.qcow2", "B.qcow2", "A.qcow2"]
        assert disk.chain.read(0, SIZE) == model
    (end,) = [e for e in ev if e["event"] == "JOB_COMPLETED"]
    assert "error" not in end and int(end["offset"]) == SIZE
    retired = {e["file"]: e["valid"] for e in ev if e["event"] == "LAYER_RETIRED"}
    assert retired == {"D.qcow2": "true", "C.qcow2": "false"}
    assert ev[-2]["event"] == "CHAIN_CHANGED"
    assert ev[-2]["layers"] == "A.qcow2 <- B.qcow2 <- E.qcow2"
    check_all(d)
    assert backing_names(p["E"]) == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert backing_string(p["E"]) == "B.qcow2"  # relative stays relative
    im.assert_same_as(str(p["E"]), bytes(model), str(tmp_path))
    assert im.file_digests(str(p[x]) for x in "ACD") == kept
    assert im.reference(str(p["D"])) == d_view
    assert served(d) == [("E", "E.qcow2")]


async def test_intermediate_commit_into_raw_base(tmp_path: Path) -> None:
    """040's shape: raw backing <- mid <- test; commit mid into backing; data lands."""
    d = tmp_path / "images"
    d.mkdir()
    _, model = im.build_chain(
        str(d),
        [
            {"name": "backing.img", "fmt": "raw", "writes": [(0, 2 * MiB, 0x11)]},
            {"name": "mid.qcow2", "writes": [(512 * 1024, 512 * 1024, 0x22), (MiB, 65536, None)]},
            {"name": "test.qcow2", "writes": [(0, 4096, 0x33)]},
        ],
        size=2 * MiB,
    )
    async with serve(d) as disk:
        end = await run_job(disk, "commit", "top=mid.qcow2 base=backing.img")
        assert "error" not in end
        assert names(disk) == ["test.qcow2", "backing.img"]
        assert disk.chain.read(0, 2 * MiB) == bytes(model)
    check_all(d)
    raw = d / "backing.img"
    out = im.qemu_io(
        str(raw),
        ["read -P 0x11 0 524288", "read -P 0x22 524288 524288", "read -P 0 1048576 65536"],
        fmt="raw",
    )
    assert "verification failed" not in out, out
    assert backing_names(d / "test.qcow2") == ["test.qcow2", "backing.img"]
    info = json.loads(im.run(["qemu-img", "info", "--output=json", str(d / "test.qcow2")]).stdout)
    assert info["backing-filename-format"] == "raw"


async def test_relative_backing_strings_stay_relative(tmp_path: Path) -> None:
    """040's TestRelativePaths: layers in sibling directories with ``../dir`` strings."""
    root = tmp_path / "images"
    for sub in ("dir1", "dir2", "dir3"):
        (root / sub).mkdir(parents=True)
    size = 2 * MiB
    im.create(str(root / "dir1" / "backing.img"), size, fmt="raw")
    im.write(str(root / "dir1" / "backing.img"), [(0, size, 0x11)], fmt="raw")
    im.create(
        str(root / "dir2" / "mid.qcow2"),
        size,
        backing="../dir1/backing.img",
        backing_fmt="raw",
        cwd=str(root / "dir2"),
    )
    im.write(str(root / "dir2" / "mid.qcow2"), [(0, 524288, 0xAB)])
    top = root / "dir3" / "test.qcow2"
    im.create(
        str(top), size, backing="../dir2/mid.qcow2", backing_fmt="qcow2", cwd=str(root / "dir3")
    )
    im.write(str(top), [(MiB, 4096, 0xCD)])
    want = im.reference(str(top))
    async with serve(root / "dir3", root / "dir1", root / "dir2") as disk:
        end = await run_job(disk, "commit", "top=mid.qcow2 base=backing.img")
        assert "error" not in end
    assert backing_string(top) == "../dir1/backing.img"
    check_all(root / "dir3")
    im.assert_same_as(str(top), want, str(tmp_path))
    out = im.qemu_io(str(root / "dir1" / "backing.img"), ["read -P 0xab 0 524288"], fmt="raw")
    assert "verification failed" not in out, out


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_zero_blocks_stay_sparse_in_base(tmp_path: Path, compat: str) -> None:
    """QEMU's ``commit-zero-blocks``: zeros written above data reach the base as zero
    clusters (v3), or as unallocated clusters of a base without backing (v2), not as
    allocated zero data."""
    d = tmp_path / "images"
    d.mkdir()
    cs = 65536
    _, model = im.build_chain(
        str(d),
        [
            {"name": "base.qcow2", "create": {"compat": compat}, "writes": [(0, 8 * cs, 0x11)]},
            {"name": "mid.qcow2", "writes": [(0, 4 * cs, None), (6 * cs, 4 * cs, None)]},
            {"name": "top.qcow2", "writes": [(12 * cs, cs, 0x33)]},
        ],
        size=MiB,
    )
    async with serve(d) as disk:
        end = await run_job(disk, "commit", "top=mid.qcow2 base=base.qcow2")
        assert "error" not in end
    check_all(d)
    im.assert_same_as(str(d / "top.qcow2"), bytes(model), str(tmp_path))
    extents = json.loads(im.run(["qemu-img", "map", "--output=json", str(d / "base.qcow2")]).stdout)
    for e in extents:
        a, b = e["start"], e["start"] + e["length"]
        if a < 4 * cs or (a < 10 * cs and b > 6 * cs):
            assert e["zero"] and not e["data"], e  # zero clusters, nothing allocated
    _, report = im.check(str(d / "base.qcow2"))
    # only the two data clusters of 0x11 that nothing zeroed hold data
    assert report["allocated-clusters"] == 2, report


async def test_commit_grows_a_shorter_base(tmp_path: Path) -> None:
    """030/040: a 1 MiB base under 2 MiB layers must grow, not hang or clip; where the
    base is longer than before, its own backing must not show through."""
    d = tmp_path / "images"
    d.mkdir()
    _, model = im.build_chain(
        str(d),
        [
            {"name": "A.qcow2", "size": 2 * MiB, "writes": [(0, 2 * MiB, 0x77)]},
            {"name": "B.qcow2", "size": MiB, "writes": [(0, 4096, 0x11)]},
            {"name": "C.qcow2", "size": 2 * MiB, "writes": [(MiB + 8192, 4096, 0x22)]},
            {"name": "D.qcow2", "size": 2 * MiB, "writes": [(100, 50, 0x44)]},
        ],
        size=2 * MiB,
    )
    async with serve(d) as disk:
        end = await run_job(disk, "commit", "top=C.qcow2 base=B.qcow2")
        assert "error" not in end
        assert names(disk) == ["D.qcow2", "B.qcow2", "A.qcow2"]
        assert disk.chain.read(0, 2 * MiB) == bytes(model)
    check_all(d)
    info = json.loads(im.run(["qemu-img", "info", "--output=json", str(d / "B.qcow2")]).stdout)
    assert info["virtual-size"] == 2 * MiB
    im.assert_same_as(str(d / "D.qcow2"), bytes(model), str(tmp_path))


@pytest.mark.parametrize("command", ["top=mid.qcow2 base=base.qcow2", "base=base.qcow2"])
async def test_zero_length_base(tmp_path: Path, command: str) -> None:
    """040's zero-length image: a base of 0 bytes grows to take the data."""
    d = tmp_path / "images"
    d.mkdir()
    _, model = im.build_chain(
        str(d),
        [
            {"name": "base.qcow2", "size": 0},
            {"name": "mid.qcow2", "writes": [(100000, 300000, 0x55)]},
            {"name": "top.qcow2", "writes": [(MiB, 4096, 0x66)]},
        ],
        size=2 * MiB,
    )
    async with serve(d) as disk:
        end = await run_job(disk, "commit", command)
        assert "error" not in end, end
        assert disk.chain.read(0, 2 * MiB) == bytes(model)
        active = Path(disk.chain.active.path)
    check_all(d)
    im.assert_same_as(str(active), bytes(model), str(tmp_path))
    info = json.loads(im.run(["qemu-img", "info", "--output=json", str(d / "base.qcow2")]).stdout)
    assert info["virtual-size"] == 2 * MiB


# -- active commit and copy ----------------------------------------------------------------


ACTIVE = {
    # id: (control file, command, layers after (active first), files it must not write)
    "commit-base=A": ("commit", "base=A.qcow2", ["A.qcow2"], "BCD"),
    "commit-base=B": ("commit", "base=B.qcow2", ["B.qcow2", "A.qcow2"], "ACD"),
    "copy-full": ("copy", "F.qcow2 sync=full", ["F.qcow2"], "ABCD"),
    "copy-top": ("copy", "F.qcow2 sync=top", ["F.qcow2", *NAMES[1:]], "ABCD"),
}


@pytest.mark.parametrize("case", list(ACTIVE))
async def test_live_pivot_with_guest_writes(
    seed: tuple[Path, bytes], tmp_path: Path, case: str
) -> None:
    kind, command, after, untouched = ACTIVE[case]
    d, content = seed
    # (the old active layer takes guest writes until the pivot)
    kept = im.file_digests(str(d / f"{x}.qcow2") for x in untouched)
    model = bytearray(content)
    async with serve(d) as disk:
        guest = Guest(disk, model, seed=7)
        disk.command(kind, command.encode())
        job = disk.job
        assert job is not None
        await guest.run(lambda: job.status == READY or job.status == CONCLUDED)
        await job.done.wait()
        writes_during = guest.count
        # and after the pivot, into the new active layer
        for _ in range(40):
            guest.write_one()
        ev = events(disk)
        assert names(disk) == after
        assert disk.chain.read(0, SIZE) == model
    assert writes_during > 20
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "JOB_STARTED" and kinds[-1] == "JOB_COMPLETED", kinds
    assert kinds.index("JOB_READY") < kinds.index("CHAIN_CHANGED"), kinds
    assert "error" not in ev[-1]
    check_all(d)
    active = d / after[0]
    assert backing_names(active) == after
    im.assert_same_as(str(active), bytes(model), str(tmp_path))
    assert im.file_digests(kept) == kept
    assert served(d) == [("E", after[0])]
    if case == "copy-top":
        assert backing_string(active) == "D.qcow2"


async def test_copy_into_another_directory_survives_remount(
    seed: tuple[Path, bytes], tmp_path: Path
) -> None:
    d, content = seed
    other = tmp_path / "other"
    other.mkdir()
    dest = other / "disk.qcow2"
    model = bytearray(content)
    async with serve(d, other) as disk:
        guest = Guest(disk, model, seed=3)
        disk.command("copy", f"{dest} sync=top".encode())
        job = disk.job
        assert job is not None
        await guest.run(lambda: job.status == CONCLUDED)
        await job.done.wait()
        assert disk.chain.active.path == str(dest)
    assert backing_string(dest) == str(d / "D.qcow2")
    im.assert_clean(str(dest))
    im.assert_same_as(str(dest), bytes(model), str(tmp_path))
    assert served(d) == [("E", "disk.qcow2")]
    # and the chain keeps working from there on the next mount
    async with serve(d) as disk:
        assert disk.chain.active.path == str(dest)
        assert disk.chain.read(0, SIZE) == model


async def test_snapshot_elsewhere_then_stream(seed: tuple[Path, bytes], tmp_path: Path) -> None:
    """The seed's live block copy recipe: snapshot into an allowed directory, stream."""
    d, content = seed
    other = tmp_path / "other"
    other.mkdir()
    dest = other / "disk.qcow2"
    model = bytearray(content)
    async with serve(d, other) as disk:
        disk.command("snapshot", str(dest).encode())
        guest = Guest(disk, model, seed=4)
        disk.command("stream", b"speed=0")
        job = disk.job
        assert job is not None
        await guest.run(lambda: job.status == CONCLUDED)
        await job.done.wait()
        assert names(disk) == ["disk.qcow2"]
    im.assert_clean(str(dest))
    assert backing_string(dest) is None
    im.assert_same_as(str(dest), bytes(model), str(tmp_path))
    assert served(d) == [("E", "disk.qcow2")]


async def test_wait_ready_then_complete(seed: tuple[Path, bytes], tmp_path: Path) -> None:
    d, content = seed
    model = bytearray(content)
    async with serve(d) as disk:
        guest = Guest(disk, model, seed=5)
        disk.command("commit", b"base=B.qcow2 wait=ready")
        job = disk.job
        assert job is not None
        with pytest.raises(CommandError) as exc:
            disk.command("complete", job.id.encode())
        assert exc.value.errno == errno.EINVAL and "not ready" in exc.value.reason
        await guest.run(lambda: job.status == READY)
        assert disk.jobs_text().decode().split()[2] == "status=ready"
        # ready: the job keeps copying what the guest writes, and waits
        for _ in range(30):
            guest.write_one()
            await trio.sleep(0.001)
        assert job.status == READY and names(disk) == NAMES
        disk.command("complete", job.id.encode())
        await job.done.wait()
        assert names(disk) == ["B.qcow2", "A.qcow2"]
        assert disk.chain.read(0, SIZE) == model
    check_all(d)
    im.assert_same_as(str(d / "B.qcow2"), bytes(model), str(tmp_path))


# -- cancel --------------------------------------------------------------------------------

JOBS = {
    "intermediate-commit": ("commit", "top=D.qcow2 base=B.qcow2"),
    "active-commit": ("commit", "base=A.qcow2"),
    "copy-full": ("copy", "F.qcow2 sync=full"),
    "copy-top": ("copy", "F.qcow2 sync=top"),
}
STAGES = ["created", "running", "ready"]


@pytest.mark.parametrize("cancel", [False, True])
@pytest.mark.parametrize("case", list(JOBS))
async def test_copy_buffers_given_back(seed: tuple[Path, bytes], case: str, cancel: bool) -> None:
    """A commit or copy reads through two buffers of up to 4 MiB each; the chain gives
    them back when the job is over, done or cancelled, and the next job works."""
    kind, command = JOBS[case]
    d, content = seed
    model = bytearray(content)
    async with serve(d) as disk:
        disk.command(kind, (command + (" speed=1M" if cancel else "")).encode())
        job = disk.job
        assert job is not None
        if cancel:
            await Guest(disk, model, seed=5).run(lambda: job.offset > 0)
            disk.command("cancel", job.id.encode())
        await job.done.wait()
        assert [len(b) for b in disk.chain.engine._copy_bufs] == [0, 0]
        assert events(disk)[-1]["event"] == ("JOB_CANCELLED" if cancel else "JOB_COMPLETED")
        assert bytes(disk.chain.read(0, len(model))) == model


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(JOBS))
async def test_cancel(seed: tuple[Path, bytes], tmp_path: Path, case: str, stage: str) -> None:
    kind, command = JOBS[case]
    if stage == "ready" and case == "intermediate-commit":
        pytest.skip("an intermediate commit has no ready state")
    d, content = seed
    below = im.file_digests(str(d / x) for x in NAMES[1:] if case.startswith("copy"))
    model = bytearray(content)
    async with serve(d) as disk:
        guest = Guest(disk, model, seed=11)
        extra = {"created": "", "running": " speed=1M", "ready": " wait=ready"}[stage]
        disk.command(kind, (command + extra).encode())
        job = disk.job
        assert job is not None and job.status == "created"
        if stage == "running":
            await guest.run(lambda: job.offset > 0)
            assert job.status == "running"
        elif stage == "ready":
            await guest.run(lambda: job.status == READY)
        disk.command("cancel", job.id.encode())
        for _ in range(10):
            guest.write_one()
        await job.done.wait()
        ev = events(disk)
        assert ev[-1]["event"] == "JOB_CANCELLED", ev[-1]
        assert not [e for e in ev if e["event"] in ("CHAIN_CHANGED", "LAYER_RETIRED")]
        assert names(disk) == NAMES
        assert [x.writable for x in disk.chain.layers] == [True, False, False, False, False]
        assert disk.chain.read(0, SIZE) == model
        assert disk.jobs_text() == b""
    check_all(d)
    im.assert_same_as(str(d / "E.qcow2"), bytes(model), str(tmp_path))
    assert served(d) == [("E", "E.qcow2")]
    assert im.file_digests(below) == below
    dest = d / "F.qcow2"
    if case.startswith("copy"):
        # left behind as an ordinary file, consistent (none when cancelled before it began)
        assert dest.exists() == (stage != "created")
    else:
        assert not dest.exists()
    # the chain is as valid as before: the job can run again
    if case.startswith("copy"):
        command = command.replace("F.qcow2", "G.qcow2")
    async with serve(d) as disk:
        end = await run_job(disk, kind, command)
        assert "error" not in end, end
        assert disk.chain.read(0, SIZE) == model


# -- refusals ------------------------------------------------------------------------------

REFUSALS = {
    # 040: top == base, top not in the chain, base not below top, top and base swapped
    "top-is-base": ("top=C.qcow2 base=C.qcow2", "cannot commit into itself"),
    "bad-top": ("top=X.qcow2 base=B.qcow2", "'X.qcow2' is not a layer"),
    "bad-base": ("top=D.qcow2 base=X.qcow2", "'X.qcow2' is not a layer"),
    "swapped": ("top=B.qcow2 base=D.qcow2", "'D.qcow2' is not below 'B.qcow2'"),
    "base-above-active": ("base=E.qcow2", "cannot commit into itself"),
    "bad-key": ("top=D.qcow2 bogus=1", "unknown key"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_commit_refusals(seed: tuple[Path, bytes], case: str) -> None:
    text, reason = REFUSALS[case]
    d, _ = seed
    before = im.file_digests(str(d / x) for x in NAMES)
    async with serve(d) as disk:
        with pytest.raises(CommandError) as exc:
            disk.command("commit", text.encode())
        assert exc.value.errno == errno.EINVAL
        assert reason in exc.value.reason, exc.value.reason
        (e,) = events(disk)
        assert e["event"] == "COMMAND_REJECTED" and reason in e["reason"]
        assert disk.job is None
    assert im.file_digests(str(d / x) for x in NAMES) == before


async def test_single_layer_commit_refused(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    im.create(str(d / "solo.qcow2"), MiB)
    async with serve(d) as disk:
        with pytest.raises(CommandError) as exc:
            disk.command("commit", b"speed=1M")
        assert exc.value.errno == errno.EINVAL and "into itself" in exc.value.reason


async def test_busy_and_complete_refusals(seed: tuple[Path, bytes]) -> None:
    d, _ = seed
    async with serve(d) as disk:
        with pytest.raises(CommandError) as exc:
            disk.command("complete", b"commit-9")
        assert exc.value.errno == errno.ENOENT
        disk.command("stream", b"base=B.qcow2 speed=1M")
        job = disk.job
        assert job is not None
        with pytest.raises(CommandError) as exc:
            disk.command("complete", job.id.encode())
        assert exc.value.errno == errno.EINVAL  # a stream has nothing to complete
        for kind, text in [
            ("commit", "base=A.qcow2"),
            ("copy", "F.qcow2"),
            ("snapshot", "S.qcow2"),
            ("stream", "speed=0"),
        ]:
            with pytest.raises(CommandError) as exc:
                disk.command(kind, text.encode())
            assert exc.value.errno == errno.EBUSY, kind
        disk.command("cancel", job.id.encode())
        await job.done.wait()
        disk.command("copy", b"F.qcow2 speed=1M")  # free again
        assert disk.job is not job
        with pytest.raises(CommandError) as exc:
            disk.command("copy", b"G.qcow2")
        assert exc.value.errno == errno.EBUSY
    assert not (d / "G.qcow2").exists()


async def test_copy_target_refusals(seed: tuple[Path, bytes], tmp_path: Path) -> None:
    d, _ = seed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with serve(d) as disk:
        for text, err in [
            ("D.qcow2", errno.EEXIST),
            (f"{elsewhere}/F.qcow2", errno.EACCES),
            (f"{tmp_path}/missing/F.qcow2", errno.ENOENT),
            ("F.qcow2 sync=none", errno.EINVAL),
        ]:
            with pytest.raises(CommandError) as exc:
                disk.command("copy", text.encode())
            assert exc.value.errno == err, text
    assert not list(elsewhere.iterdir())


async def test_jobs_line_and_speed(seed: tuple[Path, bytes], autojump_clock: object) -> None:
    """The ``jobs`` line, and ``speed`` holding the copy to its rate (in trio's virtual
    time, so load cannot make this flaky)."""
    d, _ = seed
    extents = json.loads(im.run(["qemu-img", "map", "--output=json", str(d / "D.qcow2")]).stdout)
    held = sum(e["length"] for e in extents if e["depth"] < 2)  # what D and C hold
    speed = 2 * MiB
    async with serve(d) as disk:
        disk.command("commit", b"top=D.qcow2 base=B.qcow2 speed=2M")
        job = disk.job
        assert job is not None
        started = trio.current_time()
        await trio.sleep(0.25)
        line = parse_line(disk.jobs_text().decode())
        assert line["type"] == "commit" and line["status"] == "running"
        assert 0 < int(line["offset"]) < SIZE
        assert line["speed"] == str(2 * MiB) and line["len"] == str(SIZE)
        assert (line["top"], line["base"]) == ("D.qcow2", "B.qcow2")
        await job.done.wait()
        elapsed = trio.current_time() - started
        assert 0.8 * held / speed <= elapsed <= held / speed + 1, (elapsed, held)

        disk.command("copy", b"F.qcow2 sync=top speed=1M wait=ready")
        job = disk.job
        assert job is not None
        await trio.sleep(0.25)
        line = parse_line(disk.jobs_text().decode())
        assert line["type"] == "copy" and line["sync"] == "top" and line["status"] == "running"
        assert line["dest"] == str(d / "F.qcow2") and line["speed"] == str(MiB)
        disk.command("cancel", job.id.encode())
        await job.done.wait()

        started = trio.current_time()
        end = await run_job(disk, "copy", "G.qcow2 sync=full")  # no speed: no waiting
        assert "error" not in end and trio.current_time() == started
