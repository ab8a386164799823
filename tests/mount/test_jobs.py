"""Live operations on the seed chain while a guest keeps writing through the flat file.

    [A] <- [B] <- [C] <- [D] <- [E]
      snapshot S.qcow2       ->  [A] <- [B] <- [C] <- [D] <- [E] <- [S]
      stream base=A          ->  [A] <- [E]
      stream node=D base=B   ->  [A] <- [B] <- [D] <- [E]
      stream (no base)       ->  [E]

A writer thread writes random data through an open descriptor of the flat file for the
whole operation (every other write aimed just past the stream's progress, to race its
copy on the clusters it is about to copy) and reads ranges back past the page cache.
Afterwards: the flat file equals the writer's model, and after unmounting ``qemu-img
check`` passes every layer, ``qemu-img info --backing-chain`` shows the expected shape,
``qemu-img compare`` finds the model, and every layer the operation must not write is
byte-for-byte what it was.  Also: the ``jobs`` line and its growing offset under
``speed``, and cancelling a running stream.
"""

from __future__ import annotations

import json
import os
import random
import time
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
    digests,
    mixed_chain,
    run,
    wait_for,
)

MiB = im.MiB


def header(path: Path) -> tuple[str | None, str | None, str]:
    """(backing string, backing format, compat) as ``qemu-img info`` reads them."""
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    compat = info["format-specific"]["data"]["compat"]
    return info.get("backing-filename"), info.get("backing-filename-format"), compat


def copied_bytes(node: Path, first: int, stop: int) -> int:
    """What ``qemu-img map`` says the layers first..stop-1 below ``node`` hold and it
    lacks: what a stream into ``node`` copies."""
    extents = json.loads(run("qemu-img", "map", "--output=json", node).stdout)
    return sum(e["length"] for e in extents if first <= e["depth"] < stop)


def lasting(node: Path, between: int, seconds: float = 1.5) -> int:
    """A speed at which a stream into ``node`` from the ``between`` layers below it
    copies for about ``seconds``."""
    return max(256 * 1024, int(copied_bytes(node, 1, between + 1) / seconds))


def test_snapshot_while_writing(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=1)
    writer.start()
    try:
        writer.wait_writes(30)
        mark = len(m.events("E"))
        m.command("E", "snapshot", "S.qcow2")
        # from here on E takes no write: its bytes are final
        e_after = digests([seed.active])
        writer.wait_writes(60)
    finally:
        writer.stop()
    assert [e["event"] for e in m.events("E")[mark:]] == ["SNAPSHOT_TAKEN", "CHAIN_CHANGED"]
    assert m.layers("E") == ["S.qcow2", "E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    snap = tmp_path / "images" / "S.qcow2"
    layers = [*seed.layers, snap]
    assert_clean(layers)
    assert backing_chain(snap) == ["S.qcow2", "E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert header(snap) == ("E.qcow2", "qcow2", "1.1")
    assert_content(snap, model, tmp_path / "cmp")
    assert digests([seed.active]) == e_after
    assert digests(seed.layers[:-1]) == below


STREAMS: dict[str, tuple[str, str, str, dict[str, str | None]]] = {
    # id: (command, layers after (active first), layers it must not write, backing after)
    "base=A": ("base=A.qcow2", "EA", "ABCD", {"E": "A"}),
    "bare-word": ("A.qcow2", "EA", "ABCD", {"E": "A"}),
    "node=D,base=B": ("node=D.qcow2 base=B.qcow2", "EDBA", "ABC", {"D": "B", "E": "D"}),
    "full": ("node=E.qcow2", "E", "ABCD", {"E": None}),
    "node=D": ("node=D.qcow2", "ED", "ABC", {"D": None, "E": "D"}),
}


# the bare word and a partial stream onto a raw base add little: run with --runslow
CASES = [
    *((case, "qcow2") for case in STREAMS if case != "bare-word"),
    pytest.param("bare-word", "qcow2", marks=pytest.mark.slow),
    pytest.param("base=A", "raw", marks=pytest.mark.slow),
    ("full", "raw"),
]


@pytest.mark.parametrize(("case", "base_format"), CASES)
def test_stream_while_writing(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, case: str, base_format: str
) -> None:
    command, after, untouched, backing = STREAMS[case]
    command = command.replace("A.qcow2", f"A.{base_format}")
    seed = seeds(tmp_path / "images", base_format=base_format)
    names = {p.name[0]: p.name for p in seed.layers}
    kept = [seed.layer(x) for x in untouched]
    before = digests(kept)
    model = bytearray(seed.content)
    # the layers that leave lie right below the node: the stream copies what they hold
    leaving = [x for x in "EDCBA" if x not in after]
    node = "EDCBA"["EDCBA".index(leaving[0]) - 1]
    speed = lasting(seed.layer(node), len(leaving))
    m = mounter(tmp_path / "images")
    writer = Writer(m.img("E"), model, seed=2, aim=lambda: m.job_offset("E"))
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.race_job("E", "stream", command, speed, writer)
        end = m.wait_job("E", job)
        writer.wait_writes(20)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert int(end["offset"]) == len(seed.content)
    assert m.lines("E", "jobs") == []
    changed = [e for e in m.events("E") if e["event"] == "CHAIN_CHANGED"]
    assert changed[-1]["layers"] == " <- ".join(names[x] for x in reversed(after))
    assert m.layers("E") == [names[x] for x in after]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    assert backing_chain(seed.active) == [names[x] for x in after]
    for x, b in backing.items():
        fmt = None if b is None else im.image_format(str(seed.layer(b)))
        assert header(seed.layer(x))[:2] == (b and names[b], fmt)
    assert_content(seed.active, model, tmp_path / "cmp")
    assert digests(kept) == before


def test_jobs_line_and_speed(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    copied = copied_bytes(seed.active, 1, 4)  # what B, C and D hold and E lacks
    speed = 2 * MiB
    m = mounter(tmp_path / "images")
    started = time.monotonic()
    job = m.start_job("E", "stream", "base=A.qcow2 speed=2M")
    offsets: list[int] = []
    copies: list[int] = []  # the bytes copied, as jobs shows them

    def progressed() -> bool:
        jobs = m.lines("E", "jobs")
        if not jobs:
            return True
        (line,) = jobs
        fields = ["id", "type", "status", "offset", "len", "speed", "copied", "node", "base"]
        assert list(line) == fields
        want = {"id": job, "type": "stream", "status": "running", "len": str(len(seed.content))}
        want |= {"speed": str(speed), "node": "E.qcow2", "base": "A.qcow2"}
        assert {k: v for k, v in line.items() if k not in ("offset", "copied")} == want
        offsets.append(int(line["offset"]))
        copies.append(int(line["copied"]))
        return False

    wait_for(progressed, "the stream to end")
    end = m.wait_job("E", job)
    elapsed = time.monotonic() - started
    assert end["event"] == "JOB_COMPLETED" and int(end["offset"]) == len(seed.content)
    assert offsets == sorted(offsets) and len(set(offsets)) >= 3, offsets
    assert copies == sorted(copies) and copies[-1] <= copied, (copies, copied)
    # a lower bound only, which load cannot break: the copy was held to about ``speed``
    assert elapsed >= 0.5 * copied / speed, (elapsed, copied)
    m.unmount()
    assert_clean(seed.layers)
    assert backing_chain(seed.active) == ["E.qcow2", "A.qcow2"]
    assert_content(seed.active, seed.content, tmp_path / "cmp")


def test_cancel_running_stream(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    below = digests(seed.layers[:-1])
    m = mounter(tmp_path / "images")
    job = m.start_job("E", "stream", "base=A.qcow2 speed=1M")
    wait_for(lambda: (m.job_offset("E") or 0) > 0, "the stream to make progress")
    m.command("E", "cancel", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_CANCELLED", end
    assert 0 < int(end["offset"]) < len(seed.content)
    assert m.lines("E", "jobs") == []
    assert not [e for e in m.events("E") if e["event"] == "CHAIN_CHANGED"]
    assert m.layers("E") == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), seed.content)
    # the chain is as valid as before: the stream can simply run again
    m.run_job("E", "stream", "base=A.qcow2")
    assert m.layers("E") == ["E.qcow2", "A.qcow2"]
    m.unmount()
    assert_clean(seed.layers)
    assert_content(seed.active, seed.content, tmp_path / "cmp")
    assert digests(seed.layers[:-1]) == below
    assert os.path.exists(seed.layer("B"))


def test_two_chains_at_once(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """Streams on two chains of one mount at the same time, each under its own writer."""
    images = tmp_path / "images"
    p, q = seeds(images, "p-"), seeds(images, "q-")
    models = {p.name: bytearray(p.content), q.name: bytearray(q.content)}
    speeds = lasting(p.active, 3), lasting(q.layer("D"), 1)
    m = mounter(images)
    writers = [
        Writer(m.img(c), models[c], seed=i, aim=lambda c=c: m.job_offset(c))  # type: ignore[misc]
        for i, c in enumerate(models)
    ]
    for w in writers:
        w.start()
    try:
        jobs = {
            p.name: m.start_job(p.name, "stream", f"base=p-A.qcow2 speed={speeds[0]}"),
            q.name: m.start_job(
                q.name, "stream", f"node=q-D.qcow2 base=q-B.qcow2 speed={speeds[1]}"
            ),
        }
        # ids count per chain: each chain's first job
        assert jobs == {p.name: "stream-1", q.name: "stream-1"}
        for w in writers:
            w.wait_writes(20)
        for chain, job in jobs.items():
            end = m.wait_job(chain, job)
            assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    finally:
        for w in writers:
            w.stop()
    for chain, model in models.items():
        assert_flat(m.img(chain), model)
    m.unmount()
    assert_clean([*p.layers, *q.layers])
    assert backing_chain(p.active) == ["p-E.qcow2", "p-A.qcow2"]
    assert backing_chain(q.active) == ["q-E.qcow2", "q-D.qcow2", "q-B.qcow2", "q-A.qcow2"]
    assert_content(p.active, models[p.name], tmp_path / "p")
    assert_content(q.active, models[q.name], tmp_path / "q")


def random_operations(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, rng_seed: int, count: int
) -> None:
    """``count`` random snapshots and streams (any node, any base below it, or none) on
    the seed chain under a writer; every layer that leaves the chain keeps its bytes."""
    rng = random.Random(rng_seed)
    images = tmp_path / "images"
    seed = seeds(images)
    model = bytearray(seed.content)
    chain = [p.name for p in reversed(seed.layers)]  # active first
    left: dict[str, str] = {}  # layer -> digest when it left the chain
    m = mounter(images)
    writer = Writer(m.img("E"), model, seed=rng_seed, aim=lambda: m.job_offset("E"))
    writer.start()
    try:
        for i in range(count):
            writer.wait_writes(5)
            if rng.random() < 0.35 or len(chain) < 2:
                name = f"S{i}.qcow2"
                m.command("E", "snapshot", name)
                chain.insert(0, name)
            else:
                qcow2 = [x for x in chain if x.endswith(".qcow2")]
                n = rng.randrange(len(qcow2) - (0 if qcow2[-1] != chain[-1] else 1))
                node = chain[n]
                b = rng.choice([None, *range(n + 1, len(chain))])
                words = [f"node={node}"] + ([f"base={chain[b]}"] if b is not None else [])
                words += rng.choice([[], ["speed=8M"]])
                m.run_job("E", "stream", " ".join(words))
                leaving = chain[n + 1 : b] if b is not None else chain[n + 1 :]
                chain = chain[: n + 1] + (chain[b:] if b is not None else [])
                left |= digests([images / x for x in leaving])
            assert m.layers("E") == chain, (i, chain)
    finally:
        writer.stop()
    assert_flat(m.img("E"), model)
    m.unmount()
    files = sorted(images.glob("*.qcow2")) + sorted(images.glob("*.raw"))
    assert_clean(files)
    assert backing_chain(images / chain[0]) == chain
    assert_content(images / chain[0], model, tmp_path / "cmp")
    assert digests([images / Path(x).name for x in left]) == {
        str(images / Path(x).name): d for x, d in left.items()
    }


def test_random_operations(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    random_operations(tmp_path, mounter, seeds, rng_seed=1, count=6)


@pytest.mark.slow
@pytest.mark.parametrize("rng_seed", range(2, 10))
def test_random_operations_long(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, rng_seed: int
) -> None:
    random_operations(tmp_path, mounter, seeds, rng_seed=rng_seed, count=16)


MIXED: dict[str, tuple[str, list[str], dict[str, str | None]]] = {
    # the top has 64 KiB clusters, m2 4 KiB, m1 2 MiB, m0 512 B
    "into-64K": ("base=m0.qcow2", ["m3", "m0"], {"m3": "m0"}),
    "into-4K": ("node=m2.qcow2 base=m0.qcow2", ["m3", "m2", "m0"], {"m2": "m0"}),
    "into-2M": ("node=m1.qcow2", ["m3", "m2", "m1"], {"m1": None}),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "into-4K" else c for c in MIXED]
)
def test_stream_across_cluster_sizes(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, case: str
) -> None:
    command, after, backing = MIXED[case]
    images = tmp_path / "images"
    chain = mixed_chain(images)
    model = bytearray(chain.content)
    m = mounter(images)
    writer = Writer(m.img("m3"), model, seed=4, aim=lambda: m.job_offset("m3"))
    writer.start()
    try:
        writer.wait_writes(10)
        end = m.run_job("m3", "stream", f"{command} speed=2M")
        writer.wait_writes(10)
    finally:
        writer.stop()
    assert int(end["offset"]) == len(model)
    assert m.layers("m3") == [f"{x}.qcow2" for x in after]
    assert_flat(m.img("m3"), model)
    m.unmount()
    assert_clean(chain.layers)
    assert backing_chain(chain.active) == [f"{x}.qcow2" for x in after]
    for x, b in backing.items():
        want = (f"{b}.qcow2", "qcow2") if b else (None, None)
        assert header(images / f"{x}.qcow2")[:2] == want
    assert_content(chain.active, model, tmp_path / "cmp")
