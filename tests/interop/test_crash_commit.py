"""Crash ordering of commit and copy, proved by fault injection (``crashsim``).

Each test runs one job to its end on a small chain QEMU made, recording every write and
flush the engine issues, then rebuilds the states a power cut could leave after every
prefix of that log (everything landed, unflushed writes lost, the last write torn, a
random subset of unflushed sectors landed; a copy's DEST renamed into place or not) and
asks QEMU about each:

- ``qemu-img check`` finds no corruption in any image (leaks are allowed);
- the chain of the active layer, as its backing pointers say, reads exactly the disk
  the job started from (no guest writes here): the base only ever receives data that
  layers above it mask until the overlay's pointer moves, and the pointer moves only
  once that data is durable (``QCOW2.md`` §5.11), and a grown base shows zeros, never
  its own backing file, wherever it reads anything new.

The state file is outside the log (it is replaced atomically by rename), so the pivot
of an active commit or a copy is judged up to the flush that precedes it: the old chain
stays exact throughout, and the new active layer holds the disk once that flush landed.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
import trio

from chainfs import source as sources
from chainfs.chain import Chain
from chainfs.disk import Disk
from chainfs.formats.qcow2 import remove_unfinished
from chainfs.hostfile import is_temporary

from . import crashsim as cs
from . import images as im
from .crashsim import Crash

MiB = im.MiB


def build(root: Path) -> bytes:
    """[A] <- [B] <- [C] <- [D] (2 MiB; B only 1 MiB, so a commit into it must grow it
    while A, 2 MiB long, must not show through); returns the disk's content."""
    _, model = im.build_chain(
        str(root),
        [
            {"name": "A.qcow2", "writes": [(0, 2 * MiB, 0x77)]},
            {"name": "B.qcow2", "size": MiB, "writes": [(0, 100000, 0x11)]},
            {
                "name": "C.qcow2",
                "writes": [
                    (65536, 200000, 0x22),
                    (MiB - 4096, 70000, 0x23),
                    (1536 * 1024, 4096, None),
                ],
            },
            {"name": "D.qcow2", "writes": [(300000, 5000, 0x44), (MiB + 65536, 65536, 0x45)]},
        ],
        size=2 * MiB,
    )
    return bytes(model)


def run_job(root: Path, kind: str, command: str) -> list[str]:
    """Serve the chain of ``root`` in a trio loop, run one job to its end; return the
    layers afterwards (file names, active first)."""
    src = sources.load(str(root))
    (spec,) = src.chains
    chain = Chain.open(spec.active, writable=True)
    ids = itertools.count(1)

    async def main() -> list[str]:
        async with trio.open_nursery() as nursery:
            disk = Disk(
                spec.name,
                chain,
                src,
                allowed_dirs=[str(root)],
                readonly=False,
                spawn=nursery.start_soon,
                next_id=lambda k: f"{k}-{next(ids)}",
            )
            disk.command(kind, command.encode())
            if kind != "snapshot":  # done when the command returns
                assert disk.job is not None
                await disk.job.done.wait()
                assert disk.job.error is None, disk.job.error
            return [os.path.basename(x.path) for x in chain.layers]

    try:
        return trio.run(main)
    finally:
        chain.close()


JOBS = {
    # id: (control file, command, new active layer)
    "intermediate-commit": ("commit", "top=C.qcow2 base=B.qcow2", "D.qcow2"),
    "active-commit": ("commit", "base=B.qcow2", "B.qcow2"),
    "copy-top": ("copy", "F.qcow2 sync=top", "F.qcow2"),
    "copy-full": ("copy", "F.qcow2 sync=full", "F.qcow2"),
}


@pytest.mark.parametrize("case", list(JOBS))
def test_crash_during_job(tmp_path: Path, case: str, exhaustive: bool) -> None:
    kind, command, new_active = JOBS[case]
    root, pristine, work = tmp_path / "img", tmp_path / "pristine", tmp_path / "crashed"
    root.mkdir()
    content = build(root)
    shutil.copytree(root, pristine)
    before = cs.snapshot(str(pristine))
    with cs.recording(str(root)) as rec:
        run_job(root, kind, command)
    assert rec.events
    # finished: everything clean, the new active layer's chain is the disk
    for name in sorted(os.listdir(root)):
        if name.endswith(".qcow2"):
            im.assert_clean(str(root / name))
    assert cs.qemu_read(str(root / new_active)) == content
    # the last flush of the new active layer's data before the pivot
    target = new_active
    synced = max(i for i, e in enumerate(rec.events) if e.kind == "flush" and e.path == target)

    def judge(dest: str, crash: Crash) -> None:
        for name in sorted(os.listdir(dest)):
            path = os.path.join(dest, name)
            if is_temporary(name):
                continue  # a copy's DEST being made: no image yet, never served
            if name.endswith(".qcow2") and cs.has_magic(path):
                cs.assert_check_ok(path)
        disk = cs.qemu_read(os.path.join(dest, "D.qcow2"))
        assert disk == content, "the chain of D no longer reads the disk"
        # what the next mount removes: a copy's DEST that never got its name, only that
        kept = sorted(n for n in os.listdir(dest) if not is_temporary(n))
        remove_unfinished(dest)
        assert sorted(os.listdir(dest)) == kept
        assert cs.chainfs_read(os.path.join(dest, "D.qcow2")) == disk
        if crash.k > synced and crash.mode == "all" and case != "intermediate-commit":
            assert cs.qemu_read(os.path.join(dest, new_active)) == content

    crashes = cs.crash_states(before, rec.events, exhaustive=exhaustive, seed=case)
    print(f"{len(rec.events)} events, {len(crashes)} distinct crashed states judged")
    cs.run_states(crashes, str(pristine), str(work), judge)


def test_crash_during_snapshot(tmp_path: Path, exhaustive: bool) -> None:
    """``snapshot F.qcow2`` (created under a temporary name, renamed into place, made
    active on the descriptor that holds its lock): F, wherever it exists, is a complete
    overlay of D; no crash leaves anything a scan would serve but D's chain or F's, and
    the next mount's clean-up removes only the temporary file."""
    root, pristine, work = tmp_path / "img", tmp_path / "pristine", tmp_path / "crashed"
    root.mkdir()
    content = build(root)
    shutil.copytree(root, pristine)
    before = cs.snapshot(str(pristine))
    with cs.recording(str(root)) as rec:
        layers = run_job(root, "snapshot", "F.qcow2")
    assert layers == ["F.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert [e.kind for e in rec.events].count("rename") == 1

    def judge(dest: str, crash: Crash) -> None:
        assert cs.qemu_read(os.path.join(dest, "D.qcow2")) == content
        f = os.path.join(dest, "F.qcow2")
        if os.path.exists(f):
            cs.assert_check_ok(f)
            assert cs.info(f).get("backing-filename") == "D.qcow2"
            assert cs.qemu_read(f) == content
            assert cs.chainfs_read(f) == content
        served = {os.path.basename(c.active) for c in sources.load(dest).chains}
        assert served <= {"D.qcow2", "F.qcow2"}, served
        kept = sorted(n for n in os.listdir(dest) if not is_temporary(n))
        remove_unfinished(dest)
        assert sorted(os.listdir(dest)) == kept

    crashes = cs.crash_states(before, rec.events, exhaustive=exhaustive, seed="snapshot")
    print(f"{len(rec.events)} events, {len(crashes)} distinct crashed states judged")
    assert any(c.files.get("F.qcow2") is None for c in crashes)
    assert any(c.files.get("F.qcow2") is not None for c in crashes)
    cs.run_states(crashes, str(pristine), str(work), judge)
