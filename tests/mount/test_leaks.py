"""Leaked clusters after an unclean stop are repaired when the chain is taken again.

A daemon killed between a cluster's allocation and the L2 entry referencing it leaks
that cluster (``qemu-img check`` exits 3); the next mount of the chain, finding that its
previous owner did not release it, repairs the leaks of the layers it writes, as
``qemu-img check -r leaks`` does.  A clean unmount and mount again checks nothing.
"""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

from interop import images as im

from chainfs.jobs.journal import Journal

from .conftest import (
    CHAINFS,
    Mounter,
    Seeds,
    assert_clean,
    assert_flat,
    read_direct,
    run,
    wait_for,
)

KiB, MiB = im.KiB, im.MiB


def leak_past_end(path: Path, n: int) -> None:
    """``n`` clusters written past the end of ``path`` and counted, never referenced:
    what a crash leaves of a write whose L2 entry it lost (16-bit refcounts)."""
    h = im.read_header(str(path), 104)
    bits = struct.unpack_from(">I", h, 20)[0]
    table = struct.unpack_from(">Q", h, 48)[0]
    assert struct.unpack_from(">I", h, 96)[0] == 4
    cs, shift = 1 << bits, bits + 3 - 4
    first = -(-os.path.getsize(path) // cs)
    with open(path, "r+b") as f:
        f.seek(first * cs)
        f.write(b"\x5a" * (n * cs))
        for c in range(first, first + n):
            f.seek(table + 8 * (c >> shift))
            block = struct.unpack(">Q", f.read(8))[0] & ~511
            assert block
            f.seek(block + 2 * (c & ((1 << shift) - 1)))
            f.write(struct.pack(">H", 1))


def test_leaks_repaired_after_kill9_and_not_after_a_clean_stop(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    model = bytearray(seed.content)
    m = mounter(images)
    with open(m.img("E"), "r+b", buffering=0) as f:
        for i in range(20):
            data = bytes([i + 1]) * (96 * KiB)
            off = i * 200 * KiB
            assert os.pwrite(f.fileno(), data, off) == len(data)
            model[off : off + len(data)] = data
        os.fsync(f.fileno())
    m.kill(signal.SIGKILL)
    m.wait_exit(None)
    m.cleanup()
    leak_past_end(seed.active, 3)
    rc, report = im.check(str(seed.active))
    assert rc == 3 and report["leaks"] >= 3, report

    m = mounter(images)
    text = m.log_text()
    assert "previous owner did not release it" in text
    assert f"repaired {report['leaks']} leaked clusters in {seed.active}" in text
    wait_for(lambda: any(e["event"] == "LEAKS_REPAIRED" for e in m.events("E")), "the event")
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean(seed.layers)
    im.assert_same_as(str(seed.active), bytes(model), str(tmp_path))

    m = mounter(images)  # after a clean unmount: nothing to check
    assert_flat(m.img("E"), model)
    m.unmount()
    assert "previous owner did not release it" not in m.log_text()
    assert "leaked clusters" not in m.log_text()
    assert_clean(seed.layers)


def test_adopt_repairs_the_leaks_of_the_layers_it_writes(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """The owner dies in a commit; the mount that adopts the chain repairs the leaks of
    the active layer and of the commit's base, which the resumed commit writes."""
    images = tmp_path / "images"
    seed = seeds(images, size=16 * MiB)
    a = mounter(images)
    model = bytearray(seed.content)
    job = a.start_job("E", "commit", "top=D.qcow2 base=B.qcow2 speed=256K")

    def checkpoint() -> int | None:
        pending = Journal.load(str(images), "E", writable=False).pending()
        return pending[0].offset if pending and pending[0].offset else None

    wait_for(checkpoint, "the commit to record a checkpoint")
    b = mounter(images)
    a.kill()
    a.wait_exit(None)
    run("fusermount3", "-u", "-z", a.mountpoint)
    leak_past_end(images / "E.qcow2", 2)
    leak_past_end(images / "B.qcow2", 1)
    leaks = {n: im.check(str(images / n))[1].get("leaks", 0) for n in ("E.qcow2", "B.qcow2")}
    assert leaks["E.qcow2"] >= 2 and leaks["B.qcow2"] >= 1, leaks
    run(*CHAINFS, "adopt", b.mountpoint, "E", "timeout=30")

    def ended() -> bool:
        return any(
            e.get("job") == job and e["event"] in ("JOB_COMPLETED", "JOB_ROLLED_BACK")
            for e in b.events("E")
        )

    wait_for(ended, "the adopted commit to end")
    text = b.log_text()
    for name, n in leaks.items():
        assert f"repaired {n} leaked clusters in {images / name}" in text, name
    assert read_direct(b.img("E")) == model
    b.unmount()
    assert_clean([images / n for n in ("A.qcow2", "B.qcow2", "E.qcow2")])
