"""Clean ends: ``fusermount3 -u``, SIGTERM, SIGINT and SIGHUP all flush what was written
(fsync'ed or not), leave every image clean (``qemu-img check`` passes, no dirty bit) and
the server exits with status 0.  An unmount in the middle of a stream stops it at a point
from which the next mount resumes it, with the chain valid in between.

(``kill -9`` at random instants of every live operation is ``test_crash_jobs``.)
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
    Mounter,
    Seeds,
    assert_clean,
    assert_content,
    assert_flat,
    backing_chain,
    digests,
    wait_for,
)

MiB = im.MiB


def write_unsynced(path: Path, model: bytearray, seed: int, count: int = 50) -> None:
    """Writes that nobody fsyncs: only a clean end can make them durable."""
    rng = random.Random(seed)
    with open(path, "r+b", buffering=0) as f:
        for _ in range(count):
            n = rng.randint(1, 128 * 1024)
            off = rng.randrange(len(model) - n)
            data = rng.randbytes(n)
            assert os.pwrite(f.fileno(), data, off) == n
            model[off : off + n] = data


@pytest.mark.parametrize("how", ["fusermount", "SIGTERM", "SIGINT", "SIGHUP"])
def test_clean_end(tmp_path: Path, mounter: Mounter, seeds: Seeds, how: str) -> None:
    seed = seeds(tmp_path / "images")
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    write_unsynced(m.img("E"), model, seed=len(how))
    if how == "fusermount":
        m.unmount()
    else:
        m.kill(getattr(signal, how))
        m.wait_exit(0)
        assert not os.path.ismount(m.mountpoint)
    assert_clean(seed.layers)
    assert_content(seed.active, model, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == below


def test_unmount_in_the_middle_of_a_stream(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    m = mounter(images)
    job = m.start_job("E", "stream", "base=A.qcow2 speed=1M")
    wait_for(lambda: (m.job_offset("E") or 0) > 0, "the stream to progress")
    write_unsynced(m.img("E"), model, seed=3)
    m.unmount()
    # stopped, not finished: the chain is the one the stream started from, and valid
    assert backing_chain(seed.active) == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_clean(seed.layers)
    assert_content(seed.active, model, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == below

    m = mounter(images)
    assert_flat(m.img("E"), model)

    def resumed() -> dict[str, str] | None:
        for e in m.events("E"):
            if e["event"] == "JOB_STARTED" and e.get("type") == "stream":
                return e
        return None

    again = wait_for(resumed, "the interrupted stream to resume by itself")
    end = m.wait_job("E", again["job"])
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, (job, end)
    assert m.layers("E") == ["E.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    assert backing_chain(seed.active) == ["E.qcow2", "A.qcow2"]
    assert_content(seed.active, model, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == below


def test_unmount_in_the_middle_of_a_copy(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """The copy is suspended, not abandoned: no ``COPY_ABANDONED`` (the partial copy is
    not given up), and the next mount resumes it to the pivot."""
    images = tmp_path / "images"
    seed = seeds(images)
    before = digests(seed.layers)
    model = bytearray(seed.content)
    m = mounter(images)
    m.start_job("E", "copy", "F.qcow2 sync=full speed=1M")
    wait_for(lambda: (m.job_offset("E") or 0) > 0, "the copy to progress")
    write_unsynced(m.img("E"), model, seed=5)
    m.unmount()
    log = m.log_text()
    assert "the next mount resumes it" in log, log
    assert "event=COPY_ABANDONED" not in log, log
    assert backing_chain(seed.active) == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_clean(seed.layers)

    m = mounter(images)
    assert [s["chain"] for s in m.status()[1:]] == ["E"]  # F is no chain of its own
    assert_flat(m.img("E"), model)

    def resumed() -> dict[str, str] | None:
        for e in m.events("E"):
            if e["event"] == "JOB_STARTED" and e.get("type") == "copy":
                return e
        return None

    again = wait_for(resumed, "the interrupted copy to resume by itself")
    end = m.wait_job("E", again["job"])
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E") == ["F.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([*seed.layers, images / "F.qcow2"])
    assert_content(images / "F.qcow2", model, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == {k: before[k] for k in list(before)[:-1]}
