"""fio with four jobs writing and verifying the flat file at once, each in its own quarter
of the disk: with O_DIRECT (every request reaches chainfs) and through the page cache
with fsyncs.  After unmounting, ``qemu-img check`` passes every layer; after mounting
again, fio's ``--verify_only`` finds every block it wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import Mounter, Seeds, assert_clean, run

pytestmark = pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")

JOBS = 4


def fio(flat: Path, size: int, *extra: str) -> dict[str, object]:
    share = size // JOBS
    args = [
        "fio",
        "--name=chainfs",
        f"--filename={flat}",
        f"--numjobs={JOBS}",
        f"--size={share}",
        f"--offset_increment={share}",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--ioengine=psync",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--verify_state_save=0",
        "--output-format=json",
        *extra,
    ]
    proc = run(*args, cwd=flat.parent.parent)
    report: dict[str, object] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return report


def errors(report: dict[str, object]) -> list[int]:
    jobs = report["jobs"]
    assert isinstance(jobs, list) and len(jobs) == JOBS
    return [int(j["error"]) for j in jobs]


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_fio_verified_writes(tmp_path: Path, mounter: Mounter, seeds: Seeds, mode: str) -> None:
    seed = seeds(tmp_path / "images")
    size = len(seed.content)
    extra = ["--direct=1"] if mode == "direct" else ["--direct=0", "--fsync=16"]
    m = mounter(tmp_path / "images")
    assert errors(fio(m.img("E"), size, *extra)) == [0] * JOBS
    m.unmount()
    assert_clean(seed.layers)
    m = mounter(tmp_path / "images")
    assert errors(fio(m.img("E"), size, "--direct=1", "--verify_only")) == [0] * JOBS
    m.unmount()
