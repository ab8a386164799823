"""copy (live block copy) on a real mount while a guest writes through the flat file.

    [A] <- [B] <- [C] <- [D] <- [E]
      copy F sync=full            ->  [F]
      copy F sync=top             ->  [A] <- [B] <- [C] <- [D] <- [F]
      snapshot /other/disk.qcow2, then stream   (the seed's recipe)   ->  [disk]

A writer thread writes through one open descriptor of the flat file before, during and
after the copy, across the pivot.  Afterwards: the flat file equals the writer's model;
after unmounting, ``qemu-img check`` passes every image, ``qemu-img compare`` finds the
model in the new active layer, the layers it replaced are byte-for-byte what they were
(nothing but the guest wrote them), and the next mount serves the chain under its old
name on the copy, also when the copy lives in another directory (``-o allow_dir``).
Also: cancel before the pivot leaves the chain and DEST as an ordinary file, ``speed``,
and the refusals of a bad DEST.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
    Mount,
    Mounter,
    Seeds,
    Writer,
    assert_clean,
    assert_content,
    assert_flat,
    backing_chain,
    backing_string,
    digests,
    expect_refusals,
    wait_for,
)

MiB = im.MiB
START = ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]


def served(m: Mount) -> list[tuple[str, str]]:
    return [(s["chain"], s["active"]) for s in m.status() if s.get("status") == "served"]


@pytest.mark.parametrize("where", ["beside", "elsewhere"])
@pytest.mark.parametrize("sync", ["full", "top"])
def test_copy_while_writing(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, sync: str, where: str
) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    other = tmp_path / "other"
    other.mkdir()
    dest = (images if where == "beside" else other) / "F.qcow2"
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    m = mounter(images, f"allow_dir={other}")
    writer = Writer(m.img("E"), model, seed=31)
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.start_job("E", "copy", f"{dest} sync={sync} wait=ready")
        wait_for(lambda: any(e["event"] == "JOB_READY" for e in m.events("E")), "JOB_READY")
        writer.wait_writes(100)  # mirrored into DEST while ready
        assert m.layers("E") == START
        m.command("E", "complete", job)  # the pivot races the writer
        end = m.wait_job("E", job)
        writer.wait_writes(30)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    after = ["F.qcow2"] if sync == "full" else ["F.qcow2", *START[1:]]
    assert m.layers("E") == after
    assert served(m) == [("E", str(dest))]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([*seed.layers, dest])
    assert backing_chain(dest) == after
    if sync == "top":
        assert backing_string(dest) == ("D.qcow2" if where == "beside" else str(seed.layer("D")))
    assert_content(dest, model, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == below
    # the old active layer stays a valid image of the disk as of the pivot
    im.assert_clean(str(seed.active))
    m2 = mounter(images, f"allow_dir={other}")
    assert served(m2) == [("E", str(dest))]
    assert m2.layers("E") == after
    assert_flat(m2.img("E"), model)


def test_copy_auto_pivot(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=32)
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.start_job("E", "copy", "F.qcow2")  # sync=full by default
        end = m.wait_job("E", job)
        writer.wait_writes(30)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    kinds = [e["event"] for e in m.events("E")]
    assert kinds.index("JOB_READY") < kinds.index("CHAIN_CHANGED") < kinds.index("JOB_COMPLETED")
    assert m.layers("E") == ["F.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    dest = tmp_path / "images" / "F.qcow2"
    assert_clean([*seed.layers, dest])
    assert backing_string(dest) is None
    assert_content(dest, model, tmp_path / "cmp")


@pytest.mark.parametrize("when", ["running", "ready"])
def test_cancel_copy(tmp_path: Path, mounter: Mounter, seeds: Seeds, when: str) -> None:
    seed = seeds(tmp_path / "images")
    before = digests(seed.layers)
    m = mounter(tmp_path / "images")
    text = "F.qcow2 sync=full speed=2M" if when == "running" else "F.qcow2 wait=ready"
    job = m.start_job("E", "copy", text)
    if when == "running":
        offsets: list[int] = []

        def progressed() -> bool:
            line = m.lines("E", "jobs")[0]
            assert line["status"] == "running" and line["speed"] == str(2 * MiB)
            offsets.append(int(line["offset"]))
            return offsets[-1] >= 2 * MiB

        wait_for(progressed, "the copy to make progress")
        assert offsets == sorted(offsets), offsets
    else:
        wait_for(lambda: any(e["event"] == "JOB_READY" for e in m.events("E")), "JOB_READY")
    m.command("E", "cancel", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_CANCELLED", end
    assert [e["file"] for e in m.events("E") if e["event"] == "COPY_ABANDONED"] == [
        str(tmp_path / "images" / "F.qcow2")
    ]
    assert not [e for e in m.events("E") if e["event"] == "CHAIN_CHANGED"]
    assert m.layers("E") == START
    assert_flat(m.img("E"), seed.content)
    m.unmount()
    assert digests(seed.layers) == before
    dest = tmp_path / "images" / "F.qcow2"
    # an ordinary, consistent file; the next mount does not serve it as a chain
    im.assert_clean(str(dest))
    assert backing_chain(dest) == ["F.qcow2"]
    m2 = mounter(tmp_path / "images")
    assert served(m2) == [("E", str(seed.active))]


@expect_refusals
def test_copy_refusals(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "images" / "link").symlink_to(elsewhere)
    m = mounter(tmp_path / "images")
    m.refuse("E", "copy", "D.qcow2", errno.EEXIST)
    m.refuse("E", "copy", f"{elsewhere}/F.qcow2", errno.EACCES)
    m.refuse("E", "copy", "link/F.qcow2", errno.EACCES)
    m.refuse("E", "copy", "../F.qcow2", errno.EACCES)
    m.refuse("E", "copy", "missing/F.qcow2", errno.ENOENT)
    m.refuse("E", "copy", "F.qcow2 sync=none", errno.EINVAL)
    m.refuse("E", "copy", "sync=top", errno.EINVAL)
    m.refuse("E", "complete", "copy-1", errno.ENOENT)
    job = m.start_job("E", "copy", "F.qcow2 speed=1M")
    m.refuse("E", "copy", "G.qcow2", errno.EBUSY)
    m.refuse("E", "complete", job, errno.EINVAL)  # running, not ready
    m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    m.unmount()
    assert not list(elsewhere.iterdir())
    assert not (tmp_path / "images" / "G.qcow2").exists()
    assert_clean(seed.layers)


def test_snapshot_elsewhere_then_stream(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """The seed's live block copy: a snapshot into another (allowed) directory, then a
    stream that makes it stand alone."""
    images = tmp_path / "images"
    seed = seeds(images)
    other = tmp_path / "other" / "dir"
    other.mkdir(parents=True)
    dest = other / "disk.qcow2"
    model = bytearray(seed.content)
    m = mounter(images, f"allow_dir={other}")
    writer = Writer(m.img("E"), model, seed=33, aim=lambda: m.job_offset("E"))
    writer.start()
    try:
        writer.wait_writes(20)
        m.command("E", "snapshot", str(dest))
        writer.wait_writes(20)
        job = m.start_job("E", "stream", "speed=8M")
        writer.wait_writes(30)
        end = m.wait_job("E", job)
        writer.wait_writes(20)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E") == ["disk.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([*seed.layers, dest])
    assert backing_string(dest) is None
    assert_content(dest, model, tmp_path / "cmp")
    m2 = mounter(images, f"allow_dir={other}")
    assert served(m2) == [("E", str(dest))]
    assert_flat(m2.img("E"), model)
