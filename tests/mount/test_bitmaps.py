"""Persistent dirty bitmaps on a real mount, judged by QEMU after ``umount``.

Bitmaps ``qemu-img bitmap --add`` made before mounting stay valid and mark exactly the
clusters written through the flat file (QEMU reads them over NBD from
``qemu-storage-daemon``); the ``bitmap`` control file and ``chainfs bitmap`` change
them, ``bitmaps`` and ``dirty`` show them; and snapshot, commit (intermediate and
active), stream and copy carry them as README's table says:

    [A] <- [B] <- [C] <- [D] <- [E]
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from interop import images as im
from interop.test_bitmaps import granules, our_dirty, qemu_bitmaps, qemu_dirty

from .conftest import Mount, Mounter, Seeds, expect_refusals, run

MiB = im.MiB
G = 65536


def write(m: Mount, chain: str, writes: list[tuple[int, int]], fill: int = 0x5A) -> None:
    """Write through the flat file, then fsync."""
    fd = os.open(m.img(chain), os.O_WRONLY)
    try:
        for offset, length in writes:
            os.pwrite(fd, bytes([fill]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def qemu_img(*args: str | Path) -> None:
    run("qemu-img", *args)


def marked_by_qemu(image: Path, name: str, writes: list[tuple[int, int]]) -> None:
    """Have QEMU mark bitmap ``name`` of ``image`` (enabled) by writing through it."""
    cmds: list[str] = []
    for offset, length in writes:
        cmds += ["-c", f"write -P 0x33 {offset} {length}"]
    run("qemu-io", "-f", "qcow2", *cmds, image)


X = [(0, 4096), (5 * MiB + 100, 70000), (31 * MiB, 512)]
Y = [(2 * MiB, 4096), (20 * MiB, 128 * 1024)]
Z = [(8 * MiB, 65536)]


def b1_marked_at_z(image: Path, *others: str) -> None:
    """Add bitmap ``b1`` (and ``others``) to ``image``, have QEMU mark ``Z`` in them, then
    disable ``b1``."""
    qemu_img("bitmap", "--add", image, "b1")
    for name in others:
        qemu_img("bitmap", "--add", image, name)
    marked_by_qemu(image, "b1", Z)
    qemu_img("bitmap", "--disable", image, "b1")


@expect_refusals
def test_bitmaps_kept_marked_and_commanded(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    e = seed.layer("E")
    qemu_img("bitmap", "--add", e, "b64k")
    qemu_img("bitmap", "--add", "-g", "4096", e, "b4k")
    qemu_img("bitmap", "--add", "--disable", e, "off")
    m = mounter(tmp_path / "images")
    write(m, "E", X)
    lines = {x["name"]: x for x in m.lines("E", "bitmaps")}
    assert lines["b64k"] == {
        "name": "b64k",
        "granularity": "65536",
        "count": str(sum(b - a for a, b in granules(X, G))),
        "enabled": "yes",
        "persistent": "yes",
        "in-use": "no",
        "inconsistent": "no",
    }
    assert lines["off"]["count"] == "0" and lines["off"]["enabled"] == "no"
    dirty = [(x["bitmap"], int(x["start"]), int(x["length"])) for x in m.lines("E", "dirty")]
    assert [(a, a + n) for b, a, n in dirty if b == "b4k"] == granules(X, 4096)
    # the commands, through the control file and the CLI
    m.command("E", "bitmap", "add new granularity=128k")
    run(sys.executable, "-m", "chainfs", "bitmap", m.mountpoint, "E", "add", "cold", "disabled")
    m.refuse("E", "bitmap", "add new", errno.EEXIST)
    m.refuse("E", "bitmap", "clear nosuch", errno.ENOENT)
    m.refuse("E", "bitmap", "add odd granularity=3000", errno.EINVAL)
    write(m, "E", Y)
    m.command("E", "bitmap", "merge off b4k")
    m.command("E", "bitmap", "clear b4k")
    write(m, "E", Z)
    m.command("E", "bitmap", "disable new")
    m.command("E", "bitmap", "remove b64k")
    assert [x["event"] for x in m.events("E")].count("BITMAP_CHANGED") == 6
    run(sys.executable, "-m", "chainfs", "umount", m.mountpoint)
    m.wait_exit(0)
    run("qemu-img", "check", e)
    assert qemu_bitmaps(str(e)) == {
        "b4k": (4096, ("auto",)),
        "off": (65536, ()),
        "new": (131072, ()),
        "cold": (65536, ()),
    }
    assert qemu_dirty(str(e), "b4k") == granules(Z, 4096)
    assert qemu_dirty(str(e), "off") == granules(X + Y, 65536)
    assert qemu_dirty(str(e), "new") == granules(Y + Z, 131072)
    assert qemu_dirty(str(e), "cold") == []


def test_snapshot_moves_enabled_bitmaps_up(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """The new overlay gets the enabled bitmaps (empty, enabled); the old layer's are
    disabled and keep what they marked."""
    seed = seeds(tmp_path / "images")
    e = seed.layer("E")
    qemu_img("bitmap", "--add", e, "b1")
    qemu_img("bitmap", "--add", "--disable", e, "off")
    m = mounter(tmp_path / "images")
    write(m, "E", X)
    m.command("E", "snapshot", "F.qcow2")
    write(m, "E", Y)
    m.unmount()
    f = tmp_path / "images" / "F.qcow2"
    assert qemu_bitmaps(str(e)) == {"b1": (G, ()), "off": (G, ())}
    assert qemu_bitmaps(str(f)) == {"b1": (G, ("auto",))}
    assert qemu_dirty(str(e), "b1") == granules(X, G)
    assert qemu_dirty(str(f), "b1") == granules(Y, G)


def test_active_commit_merges_into_the_base(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """base=D: D takes E's bitmap (created, enabled as in E) with E's marks, and marks
    the writes after the pivot."""
    seed = seeds(tmp_path / "images")
    d, e = seed.layer("D"), seed.layer("E")
    qemu_img("bitmap", "--add", e, "b1")
    m = mounter(tmp_path / "images")
    write(m, "E", X)
    m.run_job("E", "commit", "base=D.qcow2")
    assert m.layers("E")[0] == "D.qcow2"
    write(m, "E", Y)
    m.unmount()
    assert qemu_bitmaps(str(d)) == {"b1": (G, ("auto",))}
    assert qemu_dirty(str(d), "b1") == granules(X + Y, G)


def test_intermediate_commit_merges_into_the_base(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """top=D base=C: C's bitmap of the name D's has becomes the OR of both."""
    seed = seeds(tmp_path / "images")
    c, d = seed.layer("C"), seed.layer("D")
    b1_marked_at_z(d)
    qemu_img("bitmap", "--add", "--disable", c, "b1")
    m = mounter(tmp_path / "images")
    m.run_job("E", "commit", "top=D.qcow2 base=C.qcow2")
    m.unmount()
    assert qemu_bitmaps(str(c)) == {"b1": (G, ())}
    assert qemu_dirty(str(c), "b1") == granules(Z, G)


def test_stream_keeps_the_node_bitmaps(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """stream base=C into E: E keeps b1, with the b1 of D (which leaves) merged in; a
    bitmap only D had leaves with it."""
    seed = seeds(tmp_path / "images")
    d, e = seed.layer("D"), seed.layer("E")
    b1_marked_at_z(d, "donly")
    qemu_img("bitmap", "--add", e, "b1")
    m = mounter(tmp_path / "images")
    write(m, "E", X)
    m.run_job("E", "stream", "base=C.qcow2")
    m.unmount()
    assert qemu_bitmaps(str(e)) == {"b1": (G, ("auto",))}
    assert qemu_dirty(str(e), "b1") == granules(X + Z, G)


def test_copy_carries_bitmaps_to_dest(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """copy sync=full: DEST gets b1 (the OR of the chain's b1s, enabled as in E) and
    marks the writes after the pivot."""
    seed = seeds(tmp_path / "images")
    d, e = seed.layer("D"), seed.layer("E")
    b1_marked_at_z(d)
    qemu_img("bitmap", "--add", e, "b1")
    m = mounter(tmp_path / "images")
    write(m, "E", X)
    m.run_job("E", "copy", "N.qcow2")
    write(m, "E", Y)
    m.unmount()
    n = tmp_path / "images" / "N.qcow2"
    assert qemu_bitmaps(str(n)) == {"b1": (G, ("auto",))}
    assert qemu_dirty(str(n), "b1") == granules(X + Y + Z, G)


# -- kill -9 at random instants -------------------------------------------------------------


class _Writer(threading.Thread):
    """Writes random ranges through the flat file (an fsync now and then) until the
    mount dies under it."""

    def __init__(self, path: Path, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.size, self.rng = path, size, random.Random(seed)
        self.writes = 0

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError:
            return
        try:
            while True:
                n = self.rng.choice([512, 4096, 4096, 65536, 200_000])
                off = self.rng.randrange(0, self.size - n) // 512 * 512
                os.pwrite(fd, self.rng.randbytes(n), off)
                self.writes += 1
                if self.rng.random() < 0.1:
                    os.fsync(fd)
        except OSError:
            pass  # the mount died
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def _kill9_trials(tmp_path: Path, mounter: Mounter, seeds: Seeds, trials: int) -> None:
    seed = seeds(tmp_path / "images")
    e = seed.layer("E")
    qemu_img("bitmap", "--add", e, "b64k")
    qemu_img("bitmap", "--add", "-g", "4096", e, "b4k")
    before = bytes(seed.content)
    b4k_since = before  # the content when b4k was last cleared
    rng = random.Random(trials)
    for trial in range(trials):
        m = mounter(tmp_path / "images")
        if trial % 2:
            # a bitmap cleared at the mount: it covers the changes since then
            m.command("E", "bitmap", "clear b4k")
            b4k_since = before
        writer = _Writer(m.img("E"), len(before), trial)
        writer.start()
        time.sleep(rng.uniform(0.0, 0.3))
        m.kill(signal.SIGKILL)
        m.wait_exit(None)
        m.cleanup()
        writer.join(timeout=30)
        rc, report = im.check(str(e))
        assert rc in (0, 3) and not report.get("corruptions"), (trial, report)
        flags = {n: f for n, (_, f) in qemu_bitmaps(str(e)).items()}
        assert flags == {"b64k": ("auto",), "b4k": ("auto",)}, (trial, flags)
        after = im.reference(str(e))
        found = our_dirty(str(e))
        for name, since in (("b64k", seed.content), ("b4k", b4k_since)):
            ranges = found[name]
            assert ranges is not None
            for c in range(0, len(after), 4096):
                if after[c : c + 4096] != since[c : c + 4096]:
                    assert any(a <= c < b for a, b in ranges), (
                        f"trial {trial} ({writer.writes} writes): {name} does not mark the"
                        f" changed cluster at {c:#x}"
                    )
        before = after
    # chainfs's reader agrees with QEMU on the last state
    found = our_dirty(str(e))
    assert qemu_dirty(str(e), "b4k") == found["b4k"]
    assert qemu_dirty(str(e), "b64k") == found["b64k"]


def test_kill9_never_under_reports(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """kill -9 at random instants of a writer: no bitmap ever misses a changed cluster
    (b64k since it was made, b4k since its clear at a mount), and none is in use."""
    _kill9_trials(tmp_path, mounter, seeds, 4)


@pytest.mark.slow
def test_kill9_never_under_reports_100(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """As above, 100 trials."""
    _kill9_trials(tmp_path, mounter, seeds, 100)
