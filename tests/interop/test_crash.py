"""Crash safety of the image engine, proved by fault injection (QCOW2.md §1.7).

Each test runs one operation on images QEMU made, recording every write, flush, rename
and directory sync the engine issues (``crashsim.recording``).  Then it rebuilds, from
pristine copies, the states a power cut could leave after every prefix of that log --
with everything applied, with the writes after the last flush lost, with the last write
torn at a sector boundary, and with a random subset of the unflushed sectors landed --
and asks QEMU about each: ``qemu-img check`` must find no corruption (leaks are
allowed), and the disk (read by ``qemu-img convert`` and by chainfs) must read, for
every cluster (every sector when a write was torn), either its content before or after a
guest operation that had started and not yet been made durable by a flush.

By default long logs are sampled (both sides of every flush, plus random points); the
``slow`` variants try every prefix.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs import hostfile
from chainfs import source as sources
from chainfs.chain import Chain
from chainfs.formats.qcow2 import create_overlay, remove_unfinished, set_backing

from . import crashsim as cs
from .crashsim import Crash, Guest

KiB = 1024
MiB = 1024 * KiB
DIRTY = 1

# -- building images with QEMU -------------------------------------------------------------


def qemu_img(*args: str, cwd: str | None = None) -> None:
    cs.run(["qemu-img", *args], cwd=cwd)


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = cs.run([*args, path])
    if "failed" in proc.stdout + proc.stderr:
        raise AssertionError(f"qemu-io {commands}: {proc.stdout}{proc.stderr}")


def pattern_data(size: int, seed: int) -> bytes:
    """Content that differs everywhere (so misplaced copies show) yet compresses well."""
    rng = random.Random(seed)
    return bytes(b & 0x0F | 0x40 for b in rng.randbytes(size))


def raw_to_qcow2(dst: str, data: bytes, *opts: str, compress: bool = False) -> None:
    raw = dst + ".raw"
    with open(raw, "wb") as f:
        f.write(data)
    args = ["convert", "-f", "raw", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, raw, dst)
    os.unlink(raw)


def overlay(
    path: str, backing: str | None, fmt: str = "qcow2", *opts: str, size: int | None = None
) -> None:
    """``qemu-img create`` with a backing string stored verbatim (relative to ``path``)."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(os.path.basename(path))
    if size is not None:
        args.append(str(size))
    qemu_img(*args, cwd=os.path.dirname(path))


def long_dir(root: Path, length: int) -> str:
    """A relative directory path of about ``length`` bytes (created under ``root``)."""
    parts: list[str] = []
    n = 0
    while n < length:
        part = f"{len(parts)}-" + "x" * min(60, max(1, length - n - 3))
        parts.append(part)
        n += len(part) + 1
    rel = os.path.join(*parts)
    (root / rel).mkdir(parents=True)
    return rel


# -- the proof harness -----------------------------------------------------------------------


class Scene:
    """An image directory, a pristine copy of it and a place for crashed states."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "img"
        self.pristine = tmp_path / "pristine"
        self.work = tmp_path / "crashed"
        self.root.mkdir()
        self.seed = str(tmp_path.name)

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def freeze(self) -> dict[str, bytes]:
        """Keep a pristine copy of everything before the operation runs."""
        shutil.copytree(self.root, self.pristine, symlinks=True)
        return cs.snapshot(str(self.pristine))

    def prove(
        self, before: dict[str, bytes], rec: cs.Recorder, judge: cs.Judge, exhaustive: bool
    ) -> list[Crash]:
        assert rec.events, "the operation issued no I/O at all"
        crashes = cs.crash_states(
            before,
            rec.events,
            exhaustive=exhaustive,
            seed=self.seed,
        )
        print(f"{len(rec.events)} events, {len(crashes)} distinct crashed states judged")
        cs.run_states(crashes, str(self.pristine), str(self.work), judge)
        return crashes


def cluster_size(path: str) -> int:
    return 1 << cs.header_field(path, 20, 4)


def prove_chain_op(
    scene: Scene,
    active: str,
    operation: Callable[[Chain, Guest], None],
    exhaustive: bool,
) -> tuple[cs.Recorder, Guest]:
    """Run ``operation`` on the chain of ``active`` and judge every crashed state."""
    path = scene.path(active)
    initial = cs.qemu_read(path)
    assert cs.chainfs_read(path) == initial
    grain = cluster_size(path)
    before = scene.freeze()
    with cs.recording(str(scene.root)) as rec:
        chain = Chain.open(path, writable=True)
        guest = Guest(rec, initial)
        try:
            operation(chain, guest)
        finally:
            chain.close()
    # the finished operation: clean, and the disk QEMU reads is the model's
    rc, report = cs.check(path)
    assert rc == 0, f"after the operation: {report}"
    assert cs.qemu_read(path) == guest.states[-1]

    def judge(dest: str, crash: Crash) -> None:
        image = os.path.join(dest, active)
        cs.assert_check_ok(image)
        lo, hi = guest.bounds(crash.k)
        g = grain if crash.mode in ("all", "lost") else cs.SECTOR
        disk = cs.qemu_read(image)
        cs.assert_old_or_new(disk, guest.states[lo : hi + 1], g)
        assert cs.chainfs_read(image) == disk, "chainfs and QEMU read the disk differently"

    scene.prove(before, rec, judge, exhaustive)
    return rec, guest


# -- 1. allocating and copy-on-write writes into an empty overlay ---------------------------


@pytest.mark.parametrize("cluster", [64 * KiB, 4 * KiB])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_allocating_writes(tmp_path: Path, cluster: int, compat: str, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 2 * MiB
    raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 1))
    overlay(
        scene.path("top.qcow2"),
        "base.qcow2",
        "qcow2",
        f"cluster_size={cluster}",
        f"compat={compat}",
    )
    rng = random.Random(2)

    def operation(chain: Chain, guest: Guest) -> None:
        c = cluster
        guest.write(chain, 4 * c, rng.randbytes(c))  # one whole cluster
        guest.write(chain, 9 * c + 100, rng.randbytes(1000))  # COW inside one cluster
        guest.flush(chain)
        # unaligned head and tail (COW) around whole clusters
        guest.write(chain, 20 * c + 7, rng.randbytes(3 * c + 50))
        guest.write(chain, 4 * c + 512, rng.randbytes(4096))  # in place, allocated above
        guest.write(chain, 9 * c + 3000, rng.randbytes(700))  # in place, partial
        guest.flush(chain)
        guest.write(chain, size - 1000, rng.randbytes(1000))  # the disk's last bytes
        guest.write(chain, 31 * c - 10, rng.randbytes(20))  # straddles two clusters
        guest.close(chain)

    prove_chain_op(scene, "top.qcow2", operation, exhaustive)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_partial_writes_over_zeros(tmp_path: Path, compat: str, exhaustive: bool) -> None:
    """A write into part of a cluster that reads as zeros, past the file's end, writes
    only its data (the COW's zeros are the file's hole and its end): every crash still
    leaves old or new content, and the cluster partly past the end passes QEMU's check."""
    scene = Scene(tmp_path)
    c = 64 * KiB
    size = 2 * MiB + 1536  # a short last cluster
    raw_to_qcow2(scene.path("base.qcow2"), pattern_data(MiB, 1) + bytes(size - MiB))
    overlay(scene.path("top.qcow2"), "base.qcow2", "qcow2", f"compat={compat}")
    if compat == "1.1":  # a zero cluster over data, then written in part
        qemu_io(scene.path("top.qcow2"), f"write -z {3 * c} {c}")
    rng = random.Random(3)

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write(chain, 20 * c + 8 * KiB, rng.randbytes(4096))  # data in the middle
        guest.write(chain, 22 * c, rng.randbytes(4096))  # at the cluster's start
        guest.flush(chain)
        guest.write(chain, 25 * c + c - 4096, rng.randbytes(4096))  # at its end
        guest.write(chain, 20 * c + 40 * KiB, rng.randbytes(1000))  # in place, in the hole
        guest.write(chain, 2 * c + 100, rng.randbytes(3000))  # over data: a whole COW
        guest.write(chain, 3 * c + 512, rng.randbytes(512))  # a zero cluster (v3)
        guest.flush(chain)
        guest.write(chain, size - 1000, rng.randbytes(500))  # the disk's short last cluster
        guest.write(chain, 27 * c + 4096, rng.randbytes(4096))  # last: partly past the end
        guest.close(chain)

    rec, _ = prove_chain_op(scene, "top.qcow2", operation, exhaustive)
    # the data alone was written for the clusters over zeros (not whole clusters)
    alone = [e for e in rec.events if e.kind == "write" and e.offset % c and len(e.data) < c]
    assert len(alone) >= 5, [e.describe() for e in rec.events]


# -- 2. new L2 tables, new refcount blocks, a growing refcount table -----------------------


def refcount_table(path: str) -> tuple[int, list[int]]:
    """(table offset, non-zero entries) of an image's refcount table."""
    with open(path, "rb") as f:
        head = f.read(60)
        off, clusters = struct.unpack_from(">QI", head, 48)
        f.seek(off)
        raw = f.read(clusters * cluster_size(path))
    entries = [e for (e,) in struct.iter_unpack(">Q", raw) if e]
    return off, entries


def l1_entries(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(48)
        n, off = struct.unpack_from(">IQ", head, 36)
        f.seek(off)
        raw = f.read(n * 8)
    return sum(1 for (e,) in struct.iter_unpack(">Q", raw) if e)


def test_new_l2_tables_and_refcount_blocks(tmp_path: Path, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 4 * MiB
    # 512-byte clusters: an L2 table maps 32 KiB, a refcount block counts 128 KiB of file
    raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 3))
    overlay(scene.path("top.qcow2"), "base.qcow2", "qcow2", "cluster_size=512")
    top = scene.path("top.qcow2")
    blocks0, l1_0 = len(refcount_table(top)[1]), l1_entries(top)
    rng = random.Random(4)

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write(chain, 100 * KiB + 3, rng.randbytes(70 * KiB))
        guest.flush(chain)
        guest.write(chain, 1 * MiB - 200, rng.randbytes(120 * KiB))
        guest.write(chain, 3 * MiB + 512, rng.randbytes(100 * KiB))
        guest.close(chain)

    rec, _ = prove_chain_op(scene, "top.qcow2", operation, exhaustive)
    # the test covered what it claims to cover
    assert len(refcount_table(top)[1]) >= blocks0 + 2
    assert l1_entries(top) >= l1_0 + 8
    # and the order that the every-prefix run (--runslow) proves, checked on the log
    assert hooks_in_order(top, rec.events, "top.qcow2") >= 1


def hooks_in_order(path: str, events: list[cs.Event], name: str) -> int:
    """Check that no refcount-table entry was written between the same two flushes as
    the entry of the block that counts its block's cluster (a crash could keep the
    first and lose the second: a block referenced with refcount 0); return how many
    such dependent entries the log has."""
    table_off, _ = refcount_table(path)
    csize = cluster_size(path)
    per_block = csize * 8 // (1 << cs.header_field(path, 96, 4))  # clusters a block counts
    epoch, dependent = 0, 0
    hooked: dict[int, int] = {}  # table index -> the flush interval its entry was written in
    for e in events:
        if e.path != name:
            continue
        if e.kind == "flush":
            epoch += 1
        elif e.kind == "write" and len(e.data) == 8 and table_off <= e.offset < table_off + csize:
            idx = (e.offset - table_off) // 8
            counting = int.from_bytes(e.data, "big") // csize // per_block
            if counting != idx and counting in hooked:
                assert hooked[counting] < epoch, f"entry {idx} hooked in with entry {counting}"
                dependent += 1
            hooked[idx] = epoch
    return dependent


def test_refcount_table_growth(tmp_path: Path, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 3 * MiB
    img = scene.path("disk.qcow2")
    # 512-byte clusters, 64-bit refcounts: the one-cluster table covers 2 MiB of file;
    # QEMU fills it nearly, chainfs pushes the file past it
    data = pattern_data(size, 5)
    raw_to_qcow2(
        img, data[: 1900 * KiB] + bytes(size - 1900 * KiB), "cluster_size=512", "refcount_bits=64"
    )
    off0, _ = refcount_table(img)
    assert os.path.getsize(img) < 2 * MiB
    rng = random.Random(6)

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write(chain, 1000 * KiB + 100, rng.randbytes(1000))  # in place
        guest.write(chain, 2 * MiB - 300, rng.randbytes(100 * KiB))
        guest.flush(chain)
        guest.write(chain, 2500 * KiB, rng.randbytes(60 * KiB))
        guest.close(chain)

    prove_chain_op(scene, "disk.qcow2", operation, exhaustive)
    off1, _ = refcount_table(img)
    assert off1 != off0, "the refcount table did not move: the test did not cover growth"


# -- 3. compressed clusters, zero clusters, write_zeroes -----------------------------------


def test_overwrite_compressed_clusters(tmp_path: Path, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 2 * MiB
    img = scene.path("packed.qcow2")
    raw_to_qcow2(img, pattern_data(size, 7), compress=True)
    rc, report = cs.check(img)
    assert rc == 0 and report.get("compressed-clusters", 0) >= 16, report
    c = cluster_size(img)
    rng = random.Random(8)

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write(chain, 3 * c + 1234, rng.randbytes(2000))  # COW from a compressed one
        guest.write(chain, 5 * c, rng.randbytes(c))  # replaces a compressed cluster whole
        guest.flush(chain)
        guest.write(chain, 6 * c - 100, rng.randbytes(c + 200))  # three neighbours
        guest.write(chain, 3 * c + 5000, rng.randbytes(100))  # in place, now allocated
        guest.close(chain)

    prove_chain_op(scene, "packed.qcow2", operation, exhaustive)


def test_overwrite_zero_clusters(tmp_path: Path, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 2 * MiB
    raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 9))
    top = scene.path("top.qcow2")
    overlay(top, "base.qcow2")
    c = cluster_size(top)
    qemu_io(
        top, f"write -z {2 * c} {4 * c}", f"write -P 0x33 {8 * c} {2 * c}", f"write -z {8 * c} {c}"
    )
    rng = random.Random(10)

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write(chain, 2 * c + 777, rng.randbytes(3000))  # COW of a zero cluster
        guest.write(chain, 3 * c, rng.randbytes(c))  # a zero cluster replaced whole
        guest.flush(chain)
        guest.write(chain, 8 * c + 10, rng.randbytes(c))  # zero cluster + data cluster
        guest.close(chain)

    prove_chain_op(scene, "top.qcow2", operation, exhaustive)


@pytest.mark.parametrize("kind", ["v3-backed", "v3-standalone", "v2-backed", "v2-standalone"])
def test_write_zeroes(tmp_path: Path, kind: str, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 2 * MiB
    compat = "1.1" if kind.startswith("v3") else "0.10"
    top = scene.path("top.qcow2")
    if kind.endswith("backed"):
        raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 11))
        overlay(top, "base.qcow2", "qcow2", f"compat={compat}")
    else:
        overlay(top, None, "qcow2", f"compat={compat}", size=size)
    c = cluster_size(top)
    qemu_io(top, f"write -P 0x5a {2 * c} {6 * c}")

    def operation(chain: Chain, guest: Guest) -> None:
        guest.write_zeroes(chain, 2 * c, 2 * c)  # data clusters, whole
        guest.write_zeroes(chain, 5 * c + 100, 600)  # part of a data cluster
        guest.flush(chain)
        guest.write_zeroes(chain, 7 * c - 512, 3 * c + 1024)  # data, unallocated, partial
        guest.write(chain, 2 * c + 64, b"\xee" * 64)  # into a cluster just zeroed
        guest.close(chain)

    prove_chain_op(scene, "top.qcow2", operation, exhaustive)


@pytest.mark.parametrize(
    "kind", ["v3-backed", "v3-standalone", "v2-backed", "v2-standalone", "v3-compressed"]
)
def test_discard(tmp_path: Path, kind: str, exhaustive: bool) -> None:
    """A discard's L2 entries, then its refcount decrements, then the punched holes (a
    punch is recorded as a write of zeros): every crashed state is clean but for leaks,
    every cluster reads before or after; the host clusters are freed once at most."""
    scene = Scene(tmp_path)
    size = 2 * MiB
    compat = "0.10" if kind.startswith("v2") else "1.1"
    top = scene.path("top.qcow2")
    if kind == "v3-compressed":
        raw_to_qcow2(top, pattern_data(size, 12), f"compat={compat}", compress=True)
    elif kind.endswith("backed"):
        raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 13))
        overlay(top, "base.qcow2", "qcow2", f"compat={compat}")
    else:
        overlay(top, None, "qcow2", f"compat={compat}", size=size)
    c = cluster_size(top)
    if kind != "v3-compressed":
        qemu_io(top, f"write -P 0x5a {2 * c} {8 * c}")

    def operation(chain: Chain, guest: Guest) -> None:
        guest.discard(chain, 2 * c, 2 * c)  # data clusters, whole
        guest.discard(chain, 5 * c + 100, 600)  # part of a data cluster
        guest.flush(chain)
        guest.discard(chain, 7 * c - 512, 5 * c + 1024)  # data, unallocated, partial
        guest.write(chain, 2 * c + 64, b"\xee" * 64)  # into a cluster just discarded
        guest.close(chain)

    rec, _ = prove_chain_op(scene, "top.qcow2", operation, exhaustive)
    # the holes are punched after the decrements' refcount blocks were written
    kinds = [e.kind for e in rec.events]
    assert "flush" in kinds


# -- 4. creating an overlay -------------------------------------------------------------------


def unfinished_names(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if hostfile.is_temporary(n))


@pytest.mark.parametrize(
    ("backing_kind", "cluster"),
    [
        ("short", 64 * KiB),
        ("raw", 64 * KiB),
        ("long-300", 64 * KiB),
        ("long-700", 64 * KiB),
        ("long-1000", 4 * KiB),
        ("short", 512),
        ("none", 512),
    ],
)
def test_create_overlay(tmp_path: Path, backing_kind: str, cluster: int, exhaustive: bool) -> None:
    """A crash anywhere in a creation leaves, under the image's name, nothing or the
    complete image; a temporary file at most, which no scan serves and the next mount
    removes (and nothing else)."""
    scene = Scene(tmp_path)
    size = 3 * MiB
    data = pattern_data(size, 12)
    backing: str | None
    fmt: str | None = "qcow2"
    if backing_kind == "none":
        backing = fmt = None
    elif backing_kind == "raw":
        backing, fmt = "base.img", "raw"
        with open(scene.path(backing), "wb") as f:
            f.write(data)
    else:
        where = (
            ""
            if backing_kind == "short"
            else long_dir(scene.root, int(backing_kind.split("-")[1]) - 12)
        )
        backing = os.path.join(where, "base.qcow2")
        raw_to_qcow2(scene.path(backing), data)
    expected = bytes(size) if backing is None else data
    new = scene.path("new.qcow2")
    before = scene.freeze()
    with cs.recording(str(scene.root)) as rec:
        create_overlay(new, size=size, backing=backing, backing_format=fmt, cluster_size=cluster)
    assert cs.check(new)[0] == 0
    assert unfinished_names(str(scene.root)) == []
    kinds = [e.kind for e in rec.events]
    assert kinds[0] == "create" and kinds[-2:] == ["rename", "syncdir"], kinds
    assert rec.events[-2].data == b"new.qcow2"

    def judge(dest: str, crash: Crash) -> None:
        image = os.path.join(dest, "new.qcow2")
        temporary = unfinished_names(dest)
        assert len(temporary) <= 1, temporary
        if os.path.exists(image):
            # never a torn image under its name: complete, or not there at all
            cs.assert_check_ok(image)
            meta = cs.info(image)
            got = (
                meta["virtual-size"],
                meta.get("backing-filename"),
                meta.get("backing-filename-format"),
            )
            assert got == (size, backing, fmt), f"a half-made image: {got}"
            disk = cs.qemu_read(image)
            assert disk == expected, "a fresh overlay does not read as its backing file"
            assert cs.chainfs_read(image) == disk
        # the scan never serves the temporary file; the next mount removes it, only it
        served = {os.path.basename(c.active) for c in sources.load(dest).chains}
        assert not served & set(temporary), served
        others = sorted(set(os.listdir(dest)) - set(temporary))
        removed = remove_unfinished(dest)
        assert [os.path.basename(p) for p in removed] == temporary
        assert sorted(os.listdir(dest)) == others

    crashes = scene.prove(before, rec, judge, exhaustive)
    # the crashes covered both sides of the rename
    assert {os.path.exists(os.path.join(str(scene.root), "new.qcow2"))} == {True}
    assert any(c.files.get("new.qcow2") is not None for c in crashes)
    assert any(c.files.get("new.qcow2") is None for c in crashes)


# -- 5. rewriting the backing file ---------------------------------------------------------------


BACKING_CASES = [
    # (compat, old, new, bitmaps, header writes the re-point takes at offset 0)
    ("1.1", "short", "short2", False, 1),
    ("1.1", "short", "long-300", False, 1),
    ("1.1", "long-300", "short2", False, 1),
    ("1.1", "long-300", "long-600", False, 1),
    ("1.1", "long-600", "long-900", False, 1),
    ("1.1", "short", "none", False, 1),
    ("1.1", "none", "short", False, 1),
    ("1.1", "none", "long-700", False, 1),
    ("1.1", "short", "raw", False, 1),
    # an image whose backing string has no format (older QEMU, or chainfs itself):
    # adding the format extension moves the extensions across the sector boundary
    ("1.1", "nofmt", "short2", False, 2),
    ("1.1", "nofmt", "long-600", False, 2),
    # the bitmaps extension (qemu-img bitmap --add) takes the extension area past the
    # first sector: adding or dropping the format extension goes through an
    # intermediate header without the feature-name table
    ("1.1", "short", "short2", True, 1),
    ("1.1", "short", "long-600", True, 1),
    ("1.1", "short", "none", True, 2),
    ("1.1", "none", "short", True, 2),
    ("1.1", "nofmt", "short2", True, 2),
    ("1.1", "nofmt", "long-700", True, 2),
    ("1.1", "long-300", "raw", True, 1),
    ("0.10", "short", "long-300", False, 1),
    ("0.10", "long-300", "none", False, 1),
    ("0.10", "none", "short", False, 1),
    ("0.10", "long-600", "long-900", False, 1),
    ("0.10", "nofmt", "long-700", False, 1),
]


# (backing file, backing format, bitmaps as (name, granularity, flags))
Identity = tuple[str | None, str | None, tuple[tuple[str, int, tuple[str, ...]], ...]]


class BackingScene:
    """A top image over one of several backing files that all hold the same ``data``."""

    def __init__(self, tmp_path: Path, compat: str, bitmaps: bool, *opts: str) -> None:
        self.scene = Scene(tmp_path)
        self.size = 2 * MiB
        self.data = pattern_data(self.size, 13)
        self.compat, self.bitmaps, self.opts = compat, bitmaps, opts
        self.top = self.scene.path("top.qcow2")
        self.made: dict[str, tuple[str | None, str | None]] = {}

    def backing(self, kind: str) -> tuple[str | None, str | None]:
        """A backing file holding ``data`` (each its own copy); its string and format."""
        if kind not in self.made:
            self.made[kind] = self._make(kind)
        return self.made[kind]

    def _make(self, kind: str) -> tuple[str | None, str | None]:
        if kind == "none":
            return None, None
        if kind == "raw":
            with open(self.scene.path("base.img"), "wb") as f:
                f.write(self.data)
            return "base.img", "raw"
        if kind == "nofmt":
            rel = "a-backing-file-with-a-long-name.qcow2"
            raw_to_qcow2(self.scene.path(rel), self.data)
            return rel, None
        name = "base2.qcow2" if kind == "short2" else "base.qcow2"
        length = 0 if kind.startswith("short") else int(kind.split("-")[1])
        where = "" if not length else long_dir(self.scene.root, length - 12)
        rel = os.path.join(where, name)
        raw_to_qcow2(self.scene.path(rel), self.data)
        return rel, "qcow2"

    def make_top(self, kind: str) -> tuple[str | None, str | None]:
        backing, fmt = self.backing(kind)
        opts = (f"compat={self.compat}", *self.opts)
        if backing is None or fmt is None:
            overlay(self.top, None, "qcow2", *opts, size=self.size)
            if backing is not None:
                set_backing(self.top, backing, None)  # QEMU no longer makes such images
        else:
            overlay(self.top, backing, fmt, *opts)
        qemu_io(self.top, "write -P 0x77 64k 100k", "write -z 1M 64k")
        if self.bitmaps:
            qemu_img("bitmap", "--add", self.top, "b1")
            qemu_img("bitmap", "--add", "-g", "128k", self.top, "second-bitmap")
        return backing, fmt

    def identity(self, path: str) -> Identity:
        """What must be exactly old or new: the backing file and format, and the
        bitmaps (names, granularity, flags) QEMU sees."""
        meta = cs.info(path)
        bitmaps = (meta.get("format-specific", {}).get("data", {})).get("bitmaps", [])
        return (
            meta.get("backing-filename"),
            meta.get("backing-filename-format"),
            tuple(sorted((b["name"], b["granularity"], tuple(b["flags"])) for b in bitmaps)),
        )

    def prove(
        self,
        rec: cs.Recorder,
        frozen: dict[str, bytes],
        allowed: list[Identity],
        disks: dict[Identity, bytes],
        exhaustive: bool,
    ) -> list[Crash]:
        def judge(dest: str, crash: Crash) -> None:
            image = os.path.join(dest, "top.qcow2")
            cs.assert_check_ok(image)
            got = self.identity(image)
            assert got in allowed, f"{got}: none of {allowed}"
            disk = cs.qemu_read(image)
            assert disk == disks[got]
            assert cs.chainfs_read(image) == disk

        return self.scene.prove(frozen, rec, judge, exhaustive)


def header_writes(rec: cs.Recorder) -> int:
    """How many times the re-point switched the header (writes at offset 0)."""
    return sum(1 for e in rec.events if e.kind == "write" and e.offset == 0)


@pytest.mark.parametrize(("compat", "old", "new", "bitmaps", "steps"), BACKING_CASES)
def test_set_backing(
    tmp_path: Path, compat: str, old: str, new: str, bitmaps: bool, steps: int, exhaustive: bool
) -> None:
    """Every prefix of a re-point, every sector tear of its writes and every subset of
    its unflushed sectors leave an image ``qemu-img check`` passes, with the old or the
    new backing file (and its bitmaps, valid, either way)."""
    b = BackingScene(tmp_path, compat, bitmaps)
    b.make_top(old)
    new_backing, new_fmt = b.backing(new)
    before_id, before_disk = b.identity(b.top), cs.qemu_read(b.top)
    frozen = b.scene.freeze()
    with cs.recording(str(b.scene.root)) as rec:
        set_backing(b.top, new_backing, new_fmt)
    after_id, after_disk = b.identity(b.top), cs.qemu_read(b.top)
    assert after_id[:2] == (new_backing, new_fmt)
    assert after_id[2] == before_id[2] and len(after_id[2]) == (2 if bitmaps else 0)
    assert cs.check(b.top)[0] == 0
    assert cs.chainfs_read(b.top) == after_disk
    assert header_writes(rec) == steps, [e.describe() for e in rec.events]
    if steps == 1:
        # one sector switches the header: every longer write is made durable before it
        (switch,) = [i for i, e in enumerate(rec.events) if e.kind == "write" and e.offset == 0]
        assert len(rec.events[switch].data) == min(cs.SECTOR, cluster_size(b.top))
    b.prove(
        rec,
        frozen,
        [before_id, after_id],
        {before_id: before_disk, after_id: after_disk},
        exhaustive,
    )


@pytest.mark.parametrize(
    ("compat", "cluster", "bitmaps"),
    [("1.1", 4096, True), ("1.1", 1024, False), ("0.10", 2048, False), ("1.1", 512, False)],
)
def test_set_backing_again_and_again(
    tmp_path: Path, compat: str, cluster: int, bitmaps: bool, exhaustive: bool
) -> None:
    """Re-points one after the other, long names and short, with and without a format,
    in small header clusters: the names take turns between low and high offsets, never
    run out of room, and every crash leaves one of the identities along the way."""
    b = BackingScene(tmp_path, compat, bitmaps, f"cluster_size={cluster}")
    longest = 300 if cluster == 512 else 700 if cluster >= 2048 else 400
    b.make_top("short")
    before = ["long-150", "nofmt", f"long-{longest - 50}", "short2", "none"]
    for kind in before * 4:  # the names walk through the cluster and back
        backing, fmt = b.backing(kind)
        set_backing(b.top, backing, fmt)
        assert b.identity(b.top)[:2] == (backing, fmt)
        assert cs.check(b.top)[0] == 0
    recorded = ["long-100", "nofmt", f"long-{longest}", "raw", f"long-{longest - 100}", "short",
                "none", "long-200"]  # fmt: skip
    targets = [b.backing(k) for k in recorded]
    allowed = [b.identity(b.top)]
    disks = {allowed[0]: cs.qemu_read(b.top)}
    frozen = b.scene.freeze()
    with cs.recording(str(b.scene.root)) as rec:
        for backing, fmt in targets:
            set_backing(b.top, backing, fmt)
            allowed.append(b.identity(b.top))
            assert allowed[-1][2] == allowed[0][2]
            disks[allowed[-1]] = cs.qemu_read(b.top)
    if cluster > cs.SECTOR:  # names went past the first sector, written before the switch
        assert any(e.kind == "write" and e.offset >= cs.SECTOR for e in rec.events)
    b.prove(rec, frozen, allowed, disks, exhaustive)


@pytest.mark.parametrize("change", ["add", "remove"])
@pytest.mark.parametrize(
    ("compat", "backing", "opts"),
    [
        ("1.1", "none", ()),
        ("1.1", "short", ()),
        ("1.1", "long-600", ()),
        ("1.1", "nofmt", ()),
        ("1.1", "raw", ()),
        ("1.1", "long-300", ("cluster_size=1024",)),
    ],
)
def test_bitmaps_extension_added_or_dropped(
    tmp_path: Path,
    compat: str,
    backing: str,
    opts: tuple[str, ...],
    change: str,
    exhaustive: bool,
) -> None:
    """The first bitmap of an image adds the bitmaps extension to its header, removing
    the last one drops it (QEMU refuses an extension with no bitmaps): every prefix,
    sector tear and subset of unflushed sectors leaves an image ``qemu-img check``
    passes and QEMU opens, with the old or the new bitmaps (and the same backing file
    and disk)."""
    b = BackingScene(tmp_path, compat, change == "remove", *opts)
    b.make_top(backing)
    allowed = [b.identity(b.top)]
    disk = cs.qemu_read(b.top)
    frozen = b.scene.freeze()
    with cs.recording(str(b.scene.root)) as rec, Chain.open(b.top, writable=True) as chain:
        bitmaps = chain.dirty_bitmaps()
        if change == "add":
            bitmaps.add("first", 65536)
        else:
            bitmaps.remove("second-bitmap")  # a 24-byte switch
            bitmaps.remove("b1")  # the last: the extension goes
    if change == "remove":  # the identity between the two removals
        first = allowed[0]
        allowed.append((*first[:2], tuple(x for x in first[2] if x[0] != "second-bitmap")))
    allowed.append(b.identity(b.top))
    after = allowed[-1]
    assert after[:2] == allowed[0][:2]
    assert len(after[2]) == (1 if change == "add" else 0), after
    assert cs.check(b.top)[0] == 0
    assert cs.qemu_read(b.top) == disk
    b.prove(rec, frozen, allowed, dict.fromkeys(allowed, disk), exhaustive)


# -- 6. opening a dirty lazy-refcounts image writable ------------------------------------------


@pytest.mark.parametrize("then_write", [False, True], ids=["open-close", "open-write-close"])
def test_dirty_lazy_refcounts_rebuild(tmp_path: Path, then_write: bool, exhaustive: bool) -> None:
    scene = Scene(tmp_path)
    size = 2 * MiB
    raw_to_qcow2(scene.path("base.qcow2"), pattern_data(size, 14))
    top = scene.path("top.qcow2")
    overlay(top, "base.qcow2", "qcow2", "lazy_refcounts=on", "cluster_size=4096")
    # QEMU writes with lazy refcounts and dies: the dirty bit stays, refcounts are stale
    proc = cs.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 0 300k",
            "-c",
            "write -P 0x22 1M 8k",
            "-c",
            "write -c -P 0x23 1536k 4k",
            "-c",
            "sigraise 9",
            top,
        ],
        ok=(-9,),
    )
    assert "failed" not in proc.stdout + proc.stderr
    assert cs.header_field(top, 72) & DIRTY
    # what qemu-img check says about a dirty image: the refcounts it has not rebuilt yet
    # are lower than the references, which it reports as corruptions (exit 2); only a
    # writer (or check -r) rebuilds them.  That is the baseline no crash may worsen.
    rc0, base_report = cs.check(top)
    assert rc0 == 2 and base_report["corruptions"] > 0, base_report
    assert base_report["check-errors"] == 0
    rng = random.Random(15)

    def operation(chain: Chain, guest: Guest) -> None:
        if then_write:
            guest.write(chain, 1 * MiB + 2048, rng.randbytes(10 * KiB))
            guest.write(chain, 100, rng.randbytes(100))
        guest.close(chain)

    path = top
    initial = cs.qemu_read(path)
    before = scene.freeze()
    with cs.recording(str(scene.root)) as rec:
        chain = Chain.open(path, writable=True)
        guest = Guest(rec, initial)
        try:
            operation(chain, guest)
        finally:
            chain.close()
    assert not cs.header_field(top, 72) & DIRTY
    assert cs.check(top)[0] == 0
    assert cs.qemu_read(top) == guest.states[-1]

    def judge(dest: str, crash: Crash) -> None:
        image = os.path.join(dest, "top.qcow2")
        lo, hi = guest.bounds(crash.k)
        allowed = guest.states[lo : hi + 1]
        if cs.header_field(image, 72) & DIRTY:
            # still dirty: no worse than before, and QEMU's repair still works
            _, report = cs.check(image)
            assert report.get("check-errors") == 0, report
            assert report.get("corruptions", 0) <= base_report["corruptions"], report
            repaired = os.path.join(dest, "repaired.qcow2")
            shutil.copyfile(image, repaired)
            cs.run(["qemu-img", "check", "-q", "-r", "all", repaired], ok=(0, 3))
            assert cs.check(repaired)[0] == 0, "qemu-img check -r all could not repair"
            cs.assert_old_or_new(cs.qemu_read(repaired), allowed, cs.SECTOR)
        else:
            cs.assert_check_ok(image)
        disk = cs.qemu_read(image)
        g = 4096 if crash.mode in ("all", "lost") else cs.SECTOR
        cs.assert_old_or_new(disk, allowed, g)
        assert cs.chainfs_read(image) == disk

    scene.prove(before, rec, judge, exhaustive)
