"""Persistent dirty bitmaps (QCOW2.md §1.10), judged by QEMU.

Bitmaps ``qemu-img bitmap`` made stay valid through a writable open, and mark exactly
the clusters written (QEMU reads them through an NBD export of
``qemu:dirty-bitmap:NAME`` served by ``qemu-storage-daemon``); chainfs's reader of the
bitmap data agrees with QEMU on the same images; the commands (add, remove, clear,
enable, disable, merge) leave what ``qemu-img info`` and ``qemu-img check`` accept; and
every state a power cut could leave during writes has bitmaps QEMU opens that cover
every cluster whose content changed (crash-consistent: never under-reporting).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.errors import UnsupportedFeature
from chainfs.formats.qcow2 import bitmaps as bm
from chainfs.formats.qcow2.driver import Qcow2Layer
from chainfs.hostfile import HostFile

from . import crashsim as cs
from .crashsim import Guest
from .test_crash import Scene
from .test_info_check import chainfs, qemu_info

KiB = 1024
MiB = 1024 * KiB


def qemu_img(*args: str) -> str:
    return cs.run(["qemu-img", *args]).stdout


def qemu_io(path: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    cs.run([*args, path])


def qemu_bitmaps(path: str) -> dict[str, tuple[int, tuple[str, ...]]]:
    """name -> (granularity, flags) as ``qemu-img info`` lists them."""
    data = cs.info(path).get("format-specific", {}).get("data", {})
    return {b["name"]: (b["granularity"], tuple(b["flags"])) for b in data.get("bitmaps", [])}


def qemu_dirty(path: str, name: str) -> list[tuple[int, int]]:
    """The dirty ranges (start, end) of bitmap ``name`` as QEMU serves them over NBD
    (``qemu:dirty-bitmap:NAME`` read by ``qemu-img map``: dirty = "data": false).  Runs
    on a copy: QEMU writes the bitmaps back when it closes the image."""
    copy = path + ".nbd.qcow2"
    cs.run(["cp", "--sparse=always", path, copy])
    sock = os.path.join(tempfile.mkdtemp(prefix="nbd", dir="/tmp"), "s")  # short: sun_path
    daemon = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={copy},node-name=f",
            "--blockdev", "driver=qcow2,file=f,node-name=d",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=e,node-name=d,name=d,writable=on,bitmaps.0={name}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while not os.path.exists(sock):
            if daemon.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon: {daemon.communicate()}")
            time.sleep(0.02)
        out = qemu_img(
            "map", "--output=json", "--image-opts",
            f"driver=nbd,export=d,server.type=unix,server.path={sock},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        )  # fmt: skip
    finally:
        daemon.terminate()
        daemon.wait()
        os.unlink(copy)
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
    ranges: list[tuple[int, int]] = []
    for e in json.loads(out):
        if not e["data"]:
            a, b = e["start"], e["start"] + e["length"]
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
    return ranges


def our_dirty(path: str) -> dict[str, list[tuple[int, int]] | None]:
    """The bitmaps as chainfs's reader sees them (None: in use, inconsistent)."""
    f = HostFile(path, False)
    try:
        layer = Qcow2Layer(f)
        found = bm.read_only(f, layer.h, layer.virtual_size)
        return {b.name: None if b.bits is None else b.ranges(layer.virtual_size) for b in found}
    finally:
        f.close()


def granules(writes: list[tuple[int, int]], g: int) -> list[tuple[int, int]]:
    """The ranges (start, end) of ``g``-granules the writes (offset, length) touch."""
    marked = sorted({c for o, n in writes for c in range(o // g, (o + n - 1) // g + 1)})
    out: list[tuple[int, int]] = []
    for c in marked:
        if out and out[-1][1] == c * g:
            out[-1] = (out[-1][0], (c + 1) * g)
        else:
            out.append((c * g, (c + 1) * g))
    return out


@pytest.fixture
def image(tmp_path: Path) -> str:
    """A 64 MiB overlay holding its first MiB, over a base holding 8 MiB, with three
    bitmaps: enabled at 64 KiB and 4 KiB granularity, and a disabled one."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 1 0 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 2 0 1M")
    qemu_img("bitmap", "--add", top, "b64k")
    qemu_img("bitmap", "--add", "-g", "4096", top, "b4k")
    qemu_img("bitmap", "--add", "--disable", top, "off")
    return top


WRITES = [(4096, 100), (10 * MiB, 70000), (3 * MiB + 512, 512), (63 * MiB, MiB)]


def test_writes_mark_exactly_the_written_clusters(image: str) -> None:
    """Writes in place, into new clusters, zero writes and discards: after close the
    bitmaps are valid for QEMU and mark exactly the granules written."""
    with Chain.open(image, writable=True) as chain:
        chain.write(4096, b"x" * 100)  # in place
        chain.write(10 * MiB, b"y" * 70000)  # new clusters
        chain.write_zeroes(3 * MiB + 512, 512)
        chain.discard(63 * MiB, MiB)
    assert cs.check(image)[0] == 0
    assert qemu_bitmaps(image) == {
        "b64k": (65536, ("auto",)),
        "b4k": (4096, ("auto",)),
        "off": (65536, ()),
    }
    assert qemu_dirty(image, "b64k") == granules(WRITES, 65536)
    assert qemu_dirty(image, "b4k") == granules(WRITES, 4096)
    assert qemu_dirty(image, "off") == []
    # chainfs's reader agrees with QEMU
    assert our_dirty(image) == {
        "b64k": granules(WRITES, 65536),
        "b4k": granules(WRITES, 4096),
        "off": [],
    }


def test_commands_leave_bitmaps_qemu_accepts(image: str) -> None:
    """add (enabled and disabled), remove, clear, enable, disable and merge."""
    with Chain.open(image, writable=True) as chain:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        b = layer.bitmaps
        chain.write(0, b"a" * 4096)
        b.add("new", 128 * KiB)
        b.add("cold", 65536, disabled=True)
        with pytest.raises(bm.BitmapExists, match="Bitmap already exists: new"):
            b.add("new", 65536)
        with pytest.raises(bm.BitmapError, match="Granularity must be power of 2"):
            b.add("odd", 3000)
        chain.write(5 * MiB, b"b" * 4096)
        b.clear("b4k")
        chain.write(6 * MiB, b"c" * 4096)
        b.disable("b64k")
        chain.write(7 * MiB, b"d" * 4096)
        b.enable("cold")
        chain.write(8 * MiB, b"e" * 4096)
        b.merge("off", ["b4k", "new"])
        b.remove("b64k")
        with pytest.raises(bm.BitmapNotFound, match="Dirty bitmap 'b64k' not found"):
            b.remove("b64k")
    assert cs.check(image)[0] == 0
    assert qemu_bitmaps(image) == {
        "b4k": (4096, ("auto",)),
        "off": (65536, ()),
        "new": (131072, ("auto",)),
        "cold": (65536, ("auto",)),
    }
    # chainfs info lists them as qemu-img info does, and chainfs check passes them
    assert chainfs("info", image).stdout == qemu_info(image, human=True)
    assert chainfs("check", image).returncode == 0
    mib = [(m * MiB, 4096) for m in (5, 6, 7, 8)]
    assert qemu_dirty(image, "b4k") == granules(mib[1:], 4096)
    assert qemu_dirty(image, "new") == granules(mib, 128 * KiB)
    assert qemu_dirty(image, "cold") == granules(mib[3:], 65536)
    assert qemu_dirty(image, "off") == granules(mib, 128 * KiB)


def test_first_bitmap_of_an_image_without_any(tmp_path: Path) -> None:
    """The extension is added to the header (with a backing file name to move)."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    with Chain.open(top, writable=True) as chain:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        layer.bitmaps.add("first", 65536)
        chain.write(MiB, b"z" * 10)
    assert cs.check(top)[0] == 0
    assert cs.info(top)["backing-filename"] == base
    assert qemu_bitmaps(top) == {"first": (65536, ("auto",))}
    assert qemu_dirty(top, "first") == [(MiB, MiB + 65536)]


def test_in_use_bitmap_is_kept_untouched(image: str) -> None:
    """A bitmap QEMU left in use (crashed) is inconsistent: not updated, kept, and
    removable, as in QEMU."""
    qemu_bitmaps(image)
    _set_flags(image, "b4k", bm.IN_USE | bm.AUTO)
    with Chain.open(image, writable=True) as chain:
        chain.write(0, b"q" * 512)
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        with pytest.raises(bm.BitmapError, match="inconsistent"):
            layer.bitmaps.clear("b4k")
    assert qemu_bitmaps(image)["b4k"] == (4096, ("in-use", "auto"))
    assert qemu_dirty(image, "b64k") == [(0, 65536)]
    with Chain.open(image, writable=True) as chain:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        layer.bitmaps.remove("b4k")
    assert "b4k" not in qemu_bitmaps(image)
    assert cs.check(image)[0] == 0


def test_unknown_flags_refused_as_qemu_does(image: str) -> None:
    _set_flags(image, "b4k", bm.AUTO | 1 << 7)
    with pytest.raises(UnsupportedFeature, match="doesn't satisfy the constraints"):
        Chain.open(image, writable=True)
    # as QEMU
    proc = cs.run(["qemu-img", "info", image], ok=range(256))
    assert "doesn't satisfy the constraints" in proc.stderr


def _set_flags(path: str, name: str, flags: int) -> None:
    """Poke the flags of one directory entry (for images QEMU cannot make)."""
    with open(path, "r+b") as fh:
        head = fh.read(65536)
        pos = int.from_bytes(head[100:104], "big")
        while True:
            kind, length = (
                int.from_bytes(head[pos : pos + 4], "big"),
                int.from_bytes(head[pos + 4 : pos + 8], "big"),
            )
            if kind == 0x23852875:
                break
            pos += 8 + length + (-length % 8)
        count = int.from_bytes(head[pos + 8 : pos + 12], "big")
        dsize = int.from_bytes(head[pos + 16 : pos + 24], "big")
        doff = int.from_bytes(head[pos + 24 : pos + 32], "big")
        fh.seek(doff)
        d = fh.read(dsize)
        p = 0
        for _ in range(count):
            extra = int.from_bytes(d[p + 20 : p + 24], "big")
            nlen = int.from_bytes(d[p + 18 : p + 20], "big")
            n = d[p + 24 + extra : p + 24 + extra + nlen].decode()
            if n == name:
                fh.seek(doff + p + 12)
                fh.write(flags.to_bytes(4, "big"))
                return
            p += 24 + extra + nlen
            p += -p % 8
    raise AssertionError(f"no bitmap {name!r}")


# -- crash consistency ---------------------------------------------------------------------


def _crash_writes(tmp_path: Path, exhaustive: bool, seed: int) -> None:
    scene = Scene(tmp_path)
    top = scene.path("top.qcow2")
    base = scene.path("base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "4M")
    qemu_io(base, "write -P 1 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F",
             "qcow2", top)  # fmt: skip
    qemu_io(top, "write -P 2 0 512k")
    qemu_img("bitmap", "--add", "-g", "4096", top, "fine")
    qemu_img("bitmap", "--add", "-g", "65536", top, "coarse")
    initial = cs.qemu_read(top)
    before = scene.freeze()
    rng = random.Random(seed)
    with cs.recording(str(scene.root)) as rec:
        chain = Chain.open(top, writable=True)
        guest = Guest(rec, initial)
        try:
            for i in range(12):
                off = rng.randrange(0, 4 * MiB - 8192) // 512 * 512
                n = rng.choice([512, 4096, 6000 // 512 * 512, 16384])
                kind = rng.random()
                if kind < 0.7:
                    guest.write(chain, off, bytes([0x30 + i]) * n)
                elif kind < 0.85:
                    guest.write_zeroes(chain, off, n)
                else:
                    guest.discard(chain, off, n)
                if i % 4 == 3:
                    guest.flush(chain)
        finally:
            guest.close(chain)

    def judge(dest: str, crash: cs.Crash) -> None:
        image = os.path.join(dest, "top.qcow2")
        cs.assert_check_ok(image)
        disk = cs.qemu_read(image)
        flags = {n: f for n, (_, f) in qemu_bitmaps(image).items()}
        assert flags == {"fine": ("auto",), "coarse": ("auto",)}, flags
        found = our_dirty(image)
        for name in ("fine", "coarse"):
            ranges = found[name]
            assert ranges is not None
            for c in range(0, len(disk), 4096):
                if disk[c : c + 4096] != initial[c : c + 4096]:
                    assert any(a <= c < b for a, b in ranges), (
                        f"{name}: cluster {c:#x} changed but is not marked"
                    )

    crashes = cs.crash_states(before, rec.events, exhaustive=exhaustive, seed=str(seed))
    print(f"{len(rec.events)} events, {len(crashes)} crashed states")
    cs.run_states(crashes, str(scene.pristine), str(scene.work), judge)


def test_crash_never_under_reports(tmp_path: Path, exhaustive: bool) -> None:
    """Every prefix of a run of writes, zero writes, discards and flushes, with the
    unflushed writes lost, torn or scattered: QEMU opens valid (not in-use) bitmaps
    that mark every cluster whose content changed."""
    _crash_writes(tmp_path, exhaustive, 1)


def test_refcount_rebuild_counts_bitmap_clusters(tmp_path: Path) -> None:
    """An image left dirty (lazy refcounts) has its refcounts rebuilt at a writable
    open: the bitmaps' directory, tables and data stay counted, so nothing allocated
    later lands on them."""
    path = str(tmp_path / "lazy.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M")
    qemu_img("bitmap", "--add", path, "b1")
    qemu_img("bitmap", "--add", "-g", "4096", path, "b2")
    qemu_io(path, "write 0 1M")
    with open(path, "r+b") as fh:  # the dirty bit, as a crash with lazy refcounts leaves
        fh.seek(72)
        incompatible = int.from_bytes(fh.read(8), "big")
        fh.seek(72)
        fh.write((incompatible | 1).to_bytes(8, "big"))
    with Chain.open(path, writable=True) as chain:
        for i in range(8):
            chain.write((5 + i) * MiB, b"x" * 100)
    assert cs.check(path)[0] == 0
    writes = [(0, MiB)] + [((5 + i) * MiB, 100) for i in range(8)]
    assert qemu_dirty(path, "b2") == granules(writes, 4096)


@pytest.mark.parametrize("end", ["success", "failure", "crash"])
def test_freeze_and_thaw_for_a_backup(image: str, end: str) -> None:
    """``freeze`` hands a backup the bitmap as it is and restarts it; until ``thaw`` the
    disk holds the union (a crash over-reports), on success only the later writes."""
    before, later = [(0, 4096), (9 * MiB, 4096)], [(2 * MiB, 4096)]
    chain = Chain.open(image, writable=True)
    try:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        b = layer.bitmaps
        for offset, length in before:
            chain.write(offset, b"p" * length)
        frozen = b.freeze("b4k")
        assert frozen.ranges(chain.size) == granules(before, 4096)
        with pytest.raises(bm.BitmapBusy, match="in use by another operation"):
            b.clear("b4k")
        for offset, length in later:
            chain.write(offset, b"q" * length)
        assert b.get("b4k").ranges(chain.size) == granules(later, 4096)
        if end != "crash":
            b.thaw("b4k", success=end == "success")
    finally:
        chain.close()
    want = later if end == "success" else before + later
    assert qemu_dirty(image, "b4k") == granules(want, 4096)


def test_no_bitmaps_in_v2_images(tmp_path: Path) -> None:
    """As QEMU: "Cannot store dirty bitmaps in qcow2 v2 files"; the header is untouched."""
    path = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "16M")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    with Chain.open(path, writable=True) as chain:
        layer = chain.active
        assert isinstance(layer, Qcow2Layer) and layer.bitmaps is not None
        with pytest.raises(bm.BitmapUnsupported, match="Cannot store dirty bitmaps in qcow2 v2"):
            layer.bitmaps.add("b", 65536)
    with open(path, "rb") as fh:
        assert fh.read(4096) == head
    assert cs.check(path)[0] == 0
