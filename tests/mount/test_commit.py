"""commit on a real mount while a guest writes through the flat file.

    [A] <- [B] <- [C] <- [D] <- [E]
      commit top=D base=B   ->  [A] <- [B] <- [E]
      commit base=A         ->  [A]                  (active commit: JOB_READY, pivot)
      commit base=B         ->  [A] <- [B]

A writer thread writes random data through one open descriptor of the flat file for
the whole operation, across the pivot, and reads ranges back past the page cache.
Afterwards: the flat file equals the writer's model; after unmounting, ``qemu-img
check`` passes every image, ``qemu-img info --backing-chain`` shows the new shape with
relative backing strings, ``qemu-img compare`` finds the model, the layers the commit
must not write keep their bytes, and the next mount serves the chain under its name.
Also: ``wait=ready`` and ``complete``, cancel while running and while ready, the
refusals of qemu-iotests 040 and EBUSY, each with its errno and nothing changed on disk.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
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


def test_intermediate_commit_while_writing(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    d_view = im.reference(str(seed.layer("D")))
    kept = digests([seed.layer(x) for x in "ACD"])
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=21, aim=lambda: m.job_offset("E"))
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.race_job("E", "commit", "top=D.qcow2 base=B.qcow2", "3M", writer)
        writer.wait_writes(20)
        end = m.wait_job("E", job)
        writer.wait_writes(20)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    retired = {e["file"]: e["valid"] for e in m.events("E") if e["event"] == "LAYER_RETIRED"}
    assert retired == {"D.qcow2": "true", "C.qcow2": "false"}
    assert m.layers("E") == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    assert backing_chain(seed.active) == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert backing_string(seed.active) == "B.qcow2"
    assert_content(seed.active, model, tmp_path / "cmp")
    assert digests([seed.layer(x) for x in "ACD"]) == kept
    assert im.reference(str(seed.layer("D"))) == d_view  # the top stays a valid image
    m2 = mounter(tmp_path / "images")
    assert m2.layers("E") == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert [s["chain"] for s in m2.status() if "chain" in s] == ["E"]


@pytest.mark.parametrize("base", ["A", "B"])
def test_active_commit_while_writing(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, base: str
) -> None:
    seed = seeds(tmp_path / "images")
    after = START[START.index(f"{base}.qcow2") :]
    kept = digests([seed.layer(x) for x in "ABCD" if x != base])
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=22)
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.start_job("E", "commit", f"base={base}.qcow2")
        end = m.wait_job("E", job)
        # the same descriptor keeps writing, now into the new active layer
        writer.wait_writes(40)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    kinds = [e["event"] for e in m.events("E")]
    assert kinds.index("JOB_READY") < kinds.index("CHAIN_CHANGED") < kinds.index("JOB_COMPLETED")
    assert m.layers("E") == after
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    new_active = seed.layer(base)
    assert backing_chain(new_active) == after
    assert_content(new_active, model, tmp_path / "cmp")
    assert digests([seed.layer(x) for x in "ABCD" if x != base]) == kept
    # the next mount serves the same chain, under the same name, on its new active layer
    m2 = mounter(tmp_path / "images")
    assert [s["chain"] for s in m2.status() if "chain" in s] == ["E"]
    assert m2.layers("E") == after
    assert_flat(m2.img("E"), model)


@expect_refusals
def test_wait_ready_then_complete(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=23)
    writer.start()
    try:
        writer.wait_writes(10)
        job = m.start_job("E", "commit", "base=B.qcow2 wait=ready")

        def ready() -> bool:
            return any(e["event"] == "JOB_READY" for e in m.events("E"))

        wait_for(ready, "JOB_READY")
        assert m.lines("E", "jobs")[0]["status"] == "ready"
        # ready: it keeps mirroring what the guest writes, and waits
        writer.wait_writes(150)
        assert m.lines("E", "jobs")[0]["status"] == "ready"
        assert m.layers("E") == START
        # the pivot races the writer
        m.command("E", "complete", job)
        end = m.wait_job("E", job)
        writer.wait_writes(30)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E") == ["B.qcow2", "A.qcow2"]
    assert m.lines("E", "jobs") == []
    assert_flat(m.img("E"), model)
    m.refuse("E", "complete", job, errno.ENOENT)
    m.unmount()
    assert_clean(seed.layers)
    assert_content(seed.layer("B"), model, tmp_path / "cmp")


@pytest.mark.parametrize("when", ["running", "ready"])
@expect_refusals
def test_cancel_active_commit(tmp_path: Path, mounter: Mounter, seeds: Seeds, when: str) -> None:
    seed = seeds(tmp_path / "images")
    above = digests([seed.layer(x) for x in "BCD"])
    m = mounter(tmp_path / "images")
    text = "base=A.qcow2 speed=1M" if when == "running" else "base=A.qcow2 wait=ready"
    job = m.start_job("E", "commit", text)
    if when == "running":
        wait_for(lambda: (m.job_offset("E") or 0) > 0, "the commit to make progress")
    else:
        wait_for(lambda: any(e["event"] == "JOB_READY" for e in m.events("E")), "JOB_READY")
        m.refuse("E", "commit", "top=D.qcow2 base=B.qcow2", errno.EBUSY)
    assert m.lines("E", "jobs")[0]["status"] == when
    m.command("E", "cancel", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_CANCELLED", end
    assert not [e for e in m.events("E") if e["event"] in ("CHAIN_CHANGED", "LAYER_RETIRED")]
    assert m.layers("E") == START
    assert_flat(m.img("E"), seed.content)
    # as valid as before: it runs again
    m.run_job("E", "commit", "base=A.qcow2")
    assert m.layers("E") == ["A.qcow2"]
    assert_flat(m.img("E"), seed.content)
    m.unmount()
    assert_clean(seed.layers)
    assert_content(seed.layer("A"), seed.content, tmp_path / "cmp")
    assert digests([seed.layer(x) for x in "BCD"]) == above


REFUSALS = [
    # qemu-iotests 040: top == base, top not in the chain, base not below top, swapped
    ("top=C.qcow2 base=C.qcow2", "into itself"),
    ("top=Z.qcow2 base=B.qcow2", "not a layer"),
    ("top=D.qcow2 base=Z.qcow2", "not a layer"),
    ("top=B.qcow2 base=D.qcow2", "not below"),
    ("top=/elsewhere/D.qcow2", "not a layer"),
    ("base=E.qcow2", "into itself"),
    ("top=D.qcow2 wait=soon", "wait"),
    ("top=D.qcow2 speed=-1", "speed"),
]


@expect_refusals
def test_commit_refusals(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    before = digests(seed.layers)
    m = mounter(tmp_path / "images")
    for text, reason in REFUSALS:
        event = m.refuse("E", "commit", text, errno.EINVAL)
        assert reason in event["reason"], (text, event)
    m.refuse("E", "complete", "commit-1", errno.ENOENT)
    job = m.start_job("E", "stream", "base=A.qcow2 speed=1M")
    m.refuse("E", "commit", "base=A.qcow2", errno.EBUSY)
    m.refuse("E", "complete", job, errno.EINVAL)  # a stream has no ready state
    m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    assert m.layers("E") == START
    m.unmount()
    assert digests(seed.layers[:-1]) == {k: before[k] for k in list(before)[:-1]}
    assert_clean(seed.layers)
    assert_content(seed.active, seed.content, tmp_path / "cmp")


def test_commit_into_raw_base(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images", base_format="raw")
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=24)
    writer.start()
    try:
        writer.wait_writes(10)
        m.run_job("E", "commit", "top=C.qcow2 base=A.raw")
        job = m.start_job("E", "commit", "base=A.raw")
        end = m.wait_job("E", job)
        writer.wait_writes(20)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E") == ["A.raw"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    assert (tmp_path / "images" / "A.raw").read_bytes() == bytes(model)
    # a raw active layer is no image the directory scan finds; the state file names it
    m2 = mounter(tmp_path / "images")
    assert m2.layers("E") == ["A.raw"]
    assert_flat(m2.img("E"), model)
