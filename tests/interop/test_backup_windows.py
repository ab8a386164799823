"""backup: guest requests landed, deterministically, in every window the job leaves open.

As ``test_windows.py`` does for the other jobs: ``Job.between_steps`` is called at each
checkpoint of the job, right where guest requests may run, and lands requests there.
The windows of a backup, by reading ``jobs/backup.py``:

- the command: DEST created, the units to copy chosen and the hook set in one
  synchronous stretch; the first window is the job's first ``checkpoint(0)``, with
  nothing copied yet: every request there must be copied before it (copy-before-write);
- after a pass step: the pass looked for the next pending units, read them from the
  chain and wrote them into DEST in one stretch under the chain's lock (plain writes:
  nothing on its way).  A request just behind the pass (already copied: no copy before
  it), over the very next unit the pass is about to read and write (it must be copied
  before the request lands, and the pass must then skip it: a pass that read before the
  request and wrote after it would write the guest's new data into DEST), and ahead of
  it (pending), in a hole of the chain (not pending: DEST reads zeros there as the disk
  did);
- ``sync=none``: no pass; the job waits in ready, requests come while it waits.

Each window gets each kind of request: data (4 KiB in a cluster), zeros written as
data, a whole zero cluster (``write_zeroes``), a discard.  Verdicts: DEST (for
``sync=top``, over the chain's layers below the active one; for ``sync=none``, over
the active layer as it was -- checked while the job runs) equals the disk at the
command, byte for byte, by ``qemu-img compare``; the chain shows the guest's model;
``qemu-img check`` passes every image, DEST included (compressed too).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from chainfs.chain import Chain
from chainfs.jobs.backup import BackupJob
from chainfs.jobs.base import READY, Job

from . import images as im
from .test_commit_copy import check_all, events, serve
from .test_windows import H, layout

MiB, KiB = im.MiB, im.KiB
SIZE = 8 * MiB
CS = 65536
KINDS = ["data", "zeros", "write-zeroes", "discard"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("backup-windows") / "images"
    d.mkdir()
    _, model = im.build_chain(str(d), layout(), size=SIZE)
    return d, bytes(model)


class Guest:
    def __init__(self, disk_chain: Chain, model: bytearray, seed: str) -> None:
        self.chain = disk_chain
        self.model = model
        self.rng = random.Random(seed)

    def do(self, kind: str, at: int) -> None:
        chain = self.chain
        cluster = at - at % CS
        if kind == "write-zeroes":
            chain.write_zeroes(cluster, CS)
            self.model[cluster : cluster + CS] = bytes(CS)
        elif kind == "discard":
            chain.discard(cluster, CS)
            self.model[cluster : cluster + CS] = bytes(CS)
        else:
            data = self.rng.randbytes(4096) if kind == "data" else bytes(4096)
            chain.write(cluster + 4096, data)
            self.model[cluster + 4096 : cluster + 8192] = data


def reference_of(dest: Path, tmp: Path, point: bytes) -> None:
    im.assert_same_as(str(dest), point, str(tmp))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options", ["sync=full", "sync=top", "sync=full compress=on", "sync=full format=raw"]
)
async def test_backup_windows(
    template: tuple[Path, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: str,
    kind: str,
) -> None:
    d = tmp_path / "images"
    shutil.copytree(template[0], d)
    point = template[1]
    model = bytearray(point)
    raw = "format=raw" in options
    dest = d / ("F.raw" if raw else "F.qcow2")
    seen: list[int] = []
    errors: list[BaseException] = []
    async with serve(d) as disk:
        guest = Guest(disk.chain, model, kind)

        def between(job: Job) -> None:
            try:
                assert isinstance(job, BackupJob)
                pos = job.position
                seen.append(pos)
                if pos >= SIZE:
                    return
                for at in (pos - CS, pos, pos + CS, pos + MiB, H(2 + len(seen) % 2)):
                    if 0 <= at < SIZE:
                        guest.do(kind, at)
                        # over the pass's next unit: copied before the request landed
                        units = job.pending
                        assert units is not None and not units.bits[at // units.unit]
            except BaseException as e:
                errors.append(e)
                raise

        monkeypatch.setattr(Job, "between_steps", between)
        disk.command("backup", f"{dest.name} speed=0 {options}".encode())
        job = disk.job
        assert isinstance(job, BackupJob)
        await job.done.wait()
        assert not errors, errors
        end = [e for e in events(disk) if e["event"] == "JOB_COMPLETED"]
        assert end and "error" not in end[-1], end
        assert len(seen) > 4  # stepped MiB by MiB through the data
        assert disk.chain.read(0, SIZE) == model
        assert not disk.chain.write_hooks
        active = disk.chain.active.path
    check_all(d)
    if raw:
        assert dest.read_bytes() == point
    else:
        reference_of(dest, tmp_path, point)
    im.assert_same_as(active, bytes(model), str(tmp_path))


@pytest.mark.parametrize("kind", KINDS)
async def test_backup_none_windows(template: tuple[Path, bytes], tmp_path: Path, kind: str) -> None:
    """sync=none: requests while the job waits in ready; DEST over the active layer is
    the point in time while the job runs; ``complete`` ends it."""
    d = tmp_path / "images"
    shutil.copytree(template[0], d)
    point = template[1]
    model = bytearray(point)
    dest = d / "F.qcow2"
    async with serve(d) as disk:
        guest = Guest(disk.chain, model, kind)
        disk.command("backup", f"{dest.name} sync=none".encode())
        job = disk.job
        assert isinstance(job, BackupJob)
        await trio.testing.wait_all_tasks_blocked()
        assert job.status == READY
        for at in (0, CS, MiB + 4 * KiB, H(2), 5 * MiB + 960 * KiB):
            guest.do(kind, at)
            guest.do("data", at + CS)
        disk.chain.flush()
        raw = tmp_path / "point.raw"
        raw.write_bytes(point)
        proc = im.run(
            ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(dest), str(raw)],
            ok=(0, 1),
        )
        assert proc.returncode == 0, proc.stdout
        disk.command("complete", job.id.encode())
        await job.done.wait()
        assert disk.chain.read(0, SIZE) == model
    check_all(d)
    im.assert_same_as(str(dest), point, str(tmp_path))  # nothing written since


@pytest.mark.parametrize("options", ["sync=full compress=on", "sync=full format=raw", "sync=top"])
async def test_backup_mixed_cluster_sizes(tmp_path: Path, options: str) -> None:
    """Layers of 512 B, 2 MiB, 4 KiB and 64 KiB clusters over 6 MiB + 1536 B (the disk
    ends inside a page and inside a cluster), a guest writing at every checkpoint."""
    size = 6 * MiB + 1536
    layers = [
        {
            "name": f"m{i}.qcow2",
            "create": {"cluster_size": cs},
            "writes": im.varied_writes(size, cs, 0x40 + i, salt=i),
        }
        for i, cs in enumerate([512, 2 * MiB, 4 * KiB, 64 * KiB])
    ]
    d = tmp_path / "images"
    d.mkdir()
    _, built = im.build_chain(str(d), layers, size=size)
    point = bytes(built)
    model = bytearray(point)
    raw = "format=raw" in options
    dest = d / ("F.raw" if raw else "F.qcow2")
    rng = random.Random(options)
    async with serve(d) as disk:

        def between(job: Job) -> None:
            for _ in range(3):
                n = rng.randint(1, 9000)
                at = rng.randrange(size - n)
                data = rng.randbytes(n)
                disk.chain.write(at, data)
                model[at : at + n] = data
            disk.chain.write(size - 700, b"\x77" * 700)  # the short last cluster
            model[size - 700 :] = b"\x77" * 700

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Job, "between_steps", between)
            disk.command("backup", f"{dest.name} speed=0 {options}".encode())
            job = disk.job
            assert isinstance(job, BackupJob)
            await job.done.wait()
        end = [e for e in events(disk) if e["event"] == "JOB_COMPLETED"]
        assert end and "error" not in end[-1], end
        assert disk.chain.read(0, size) == model
    check_all(d)
    if raw:
        assert dest.read_bytes() == point
    else:
        im.assert_same_as(str(dest), point, str(tmp_path))
