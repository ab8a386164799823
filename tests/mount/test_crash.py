"""``kill -9`` of the server with writes outstanding that nobody fsync'ed, during a stream.

After the kill and a lazy unmount no image is corrupt (a crash may leak clusters, never
corrupt), and the next mount shows every byte the guest fsync'ed; each byte written after
the last fsync reads as before or as one of the writes made to it, never anything else.
The interrupted stream then finishes (resumed by the next mount, or run again) without
changing the content.  (``test_crash_jobs`` kills every operation at random instants
while a guest fsyncs after each write.)
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
    assert_flat,
    backing_chain,
    digests,
    read_direct,
    wait_for,
)

KiB = im.KiB


def assert_not_corrupt(paths: list[Path]) -> None:
    for p in paths:
        rc, report = im.check(str(p))
        assert rc in (0, 3) and not report.get("corruptions"), (p, report)


def assert_old_or_new(got: bytes, synced: bytes, later: list[tuple[int, bytes]]) -> None:
    """Outside the ranges written after the last fsync ``got`` equals ``synced``; inside,
    every byte is the synced one or the one some later write put there."""
    allowed: dict[int, set[int]] = {}
    for off, data in later:
        for i, b in enumerate(data, off):
            allowed.setdefault(i, {synced[i]}).add(b)
    touched = bytearray(len(synced))
    for i in allowed:
        touched[i] = 1
    for start in range(0, len(synced), 64 * KiB):
        end = start + 64 * KiB
        if not any(touched[start:end]):
            assert got[start:end] == synced[start:end], f"fsync'ed data lost near {start}"
            continue
        for i in range(start, end):
            if i in allowed:
                assert got[i] in allowed[i], f"byte {i} is neither old nor new"
            else:
                assert got[i] == synced[i], f"fsync'ed byte {i} lost"


def test_kill9_during_a_stream_with_unsynced_writes(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    rng = random.Random(9)
    m = mounter(images)
    with open(m.img("E"), "r+b", buffering=0) as f:
        for _ in range(100):
            n = rng.randint(1, 64 * KiB)
            off = rng.randrange(len(model) - n)
            data = rng.randbytes(n)
            assert os.pwrite(f.fileno(), data, off) == n
            model[off : off + n] = data
        os.fsync(f.fileno())
        synced = bytes(model)
        m.start_job("E", "stream", "base=A.qcow2 speed=2M")
        wait_for(lambda: (m.job_offset("E") or 0) > 0, "the stream to progress")
        later: list[tuple[int, bytes]] = []
        for _ in range(40):
            n = rng.randint(1, 8 * KiB)
            off = rng.randrange(len(model) - n)
            data = rng.randbytes(n)
            assert os.pwrite(f.fileno(), data, off) == n
            later.append((off, data))
    assert m.job_offset("E") is not None, "the stream ended before the kill"
    m.kill(signal.SIGKILL)
    assert m.wait_exit(None) == -signal.SIGKILL
    m.cleanup()  # fusermount3 -u -z
    assert not os.path.ismount(m.mountpoint)
    assert_not_corrupt(seed.layers)
    assert digests(seed.layers[:-1]) == below

    m = mounter(images)
    got = read_direct(m.img("E"))
    assert_old_or_new(got, synced, later)
    jobs = m.lines("E", "jobs")
    if jobs:  # the next mount resumed the interrupted stream
        m.wait_job("E", jobs[0]["id"])
    if m.layers("E") != ["E.qcow2", "A.qcow2"]:
        m.run_job("E", "stream", "base=A.qcow2")
    assert m.layers("E") == ["E.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), got)
    m.unmount()
    assert_not_corrupt(seed.layers)
    assert backing_chain(seed.active) == ["E.qcow2", "A.qcow2"]
    im.assert_same_as(str(seed.active), got, str(tmp_path))
    assert digests(seed.layers[:-1]) == below


@pytest.mark.parametrize("rounds", [3])
def test_kill9_then_kill9_again(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, rounds: int
) -> None:
    """Crash after crash, each after an fsync: the content is always the fsync'ed one."""
    images = tmp_path / "images"
    seed = seeds(images)
    model = bytearray(seed.content)
    rng = random.Random(rounds)
    for _ in range(rounds):
        m = mounter(images)
        assert_flat(m.img("E"), model)
        with open(m.img("E"), "r+b", buffering=0) as f:
            for _ in range(30):
                n = rng.randint(1, 200 * KiB)
                off = rng.randrange(len(model) - n)
                data = rng.randbytes(n)
                assert os.pwrite(f.fileno(), data, off) == n
                model[off : off + n] = data
            os.fsync(f.fileno())
        m.kill(signal.SIGKILL)
        m.wait_exit(None)
        m.cleanup()
        assert_not_corrupt(seed.layers)
    m = mounter(images)
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_not_corrupt(seed.layers)
    im.assert_same_as(str(seed.active), bytes(model), str(tmp_path))
