"""``chainfs info`` and ``chainfs check`` against ``qemu-img info`` and ``qemu-img check``.

Every image is made by QEMU's tools; chainfs's answer is compared with QEMU's for the same
file: ``info`` key by key (JSON) and line by line (text), ``check`` by its counters
(corruptions, leaks, allocated/fragmented/compressed clusters, image end offset) and its
exit status.  The damaged images are QEMU-made images with one metadata entry patched:
an L2 entry dropped (a leak), a refcount lowered or raised, an entry pointing past the end
of the file, misaligned, or with reserved bits, a COPIED flag cleared, the corrupt bit set.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.inspection import check, info

from . import images as im

KiB, MiB = im.KiB, im.MiB
L2_OFFSET = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
CHAINFS = (sys.executable, "-m", "chainfs")


def chainfs(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    return im.run([*CHAINFS, *args], ok=ok)


def qemu_info(path: str, *, backing_chain: bool = False, human: bool = False) -> str:
    args = ["qemu-img", "info", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    if not human:
        args.append("--output=json")
    return im.run([*args, path]).stdout


def qemu_check(path: str) -> tuple[int, dict[str, object]]:
    proc = im.run(["qemu-img", "check", "-U", "--output=json", path], ok=(0, 1, 2, 3, 63))
    return proc.returncode, json.loads(proc.stdout)


# -- images --------------------------------------------------------------------------------------


def plain(d: str) -> str:
    p = im.create(os.path.join(d, "plain.qcow2"), 4 * MiB)
    im.write(p, [(0, MiB, 1), (2 * MiB, 64 * KiB, None), (3 * MiB + 512, 4096, 2)])
    return p


def v2(d: str) -> str:
    p = im.create(os.path.join(d, "v2.qcow2"), 4 * MiB, compat="0.10")
    im.write(p, [(64 * KiB, 200 * KiB, 3)])
    return p


def small_clusters(d: str) -> str:
    # 512-byte clusters and 1-bit refcounts: many L2 tables, sub-byte refcount entries
    p = im.create(os.path.join(d, "small.qcow2"), 2 * MiB, cluster_size=512, refcount_bits=1)
    im.write(p, [(0, 100 * KiB, 4), (MiB + 7 * 512, 3000, 5), (512 * KiB, 8 * KiB, 6)])
    return p


def wide_refcounts(d: str) -> str:
    p = im.create(os.path.join(d, "wide.qcow2"), 8 * MiB, cluster_size=2 * MiB, refcount_bits=64)
    im.write(p, [(MiB, 3 * MiB, 7)])
    return p


def fragmented(d: str) -> str:
    p = im.create(os.path.join(d, "frag.qcow2"), 4 * MiB, cluster_size=4 * KiB)
    im.write(p, [(off, 4 * KiB, 8) for off in range(3 * MiB, 0, -256 * KiB)])
    return p


def compressed(d: str) -> str:
    p = im.create(os.path.join(d, "comp.qcow2"), 4 * MiB)
    im.write_compressed(p, [(0, MiB, 9), (2 * MiB, 128 * KiB, 10)])
    im.write(p, [(3 * MiB, 64 * KiB, 11)])
    return p


def snapshots(d: str) -> str:
    p = im.create(os.path.join(d, "snap.qcow2"), 4 * MiB)
    im.write(p, [(0, MiB, 12)])
    im.run(["qemu-img", "snapshot", "-c", "one", p])
    im.write(p, [(0, 128 * KiB, 13), (2 * MiB, 64 * KiB, 14)])
    im.run(["qemu-img", "snapshot", "-c", "two", p])
    im.write(p, [(64 * KiB, 64 * KiB, 15)])
    return p


def bitmaps(d: str) -> str:
    p = plain(d)
    q = os.path.join(d, "bitmaps.qcow2")
    shutil.copyfile(p, q)
    im.run(["qemu-img", "bitmap", "--add", q, "b0"])
    im.run(["qemu-img", "bitmap", "--add", "-g", "1M", q, "b1"])
    im.write(q, [(MiB, 512 * KiB, 16)])  # marks b0 and b1 dirty: bitmap data clusters
    return q


def lazy_dirty(d: str) -> str:
    p = im.create(os.path.join(d, "dirty.qcow2"), 4 * MiB, lazy_refcounts=True)
    im.make_dirty(p, [(0, MiB, 17)])
    return p


def overlay(d: str) -> str:
    base = im.create(os.path.join(d, "base.raw"), 4 * MiB, fmt="raw")
    im.write(base, [(0, MiB, 18)], fmt="raw")
    mid = im.create(os.path.join(d, "mid.qcow2"), backing="base.raw", backing_fmt="raw", cwd=d)
    im.write(mid, [(MiB, MiB, 19)])
    top = im.create(os.path.join(d, "top.qcow2"), backing=mid, backing_fmt="qcow2")
    im.write(top, [(2 * MiB, 64 * KiB, 20)])
    return top


CLEAN: dict[str, Callable[[str], str]] = {
    "plain": plain,
    "v2": v2,
    "small-clusters": small_clusters,
    "wide-refcounts": wide_refcounts,
    "fragmented": fragmented,
    "compressed": compressed,
    "snapshots": snapshots,
    "bitmaps": bitmaps,
    "overlay": overlay,
}


# -- damage ----------------------------------------------------------------------------------


def l2_entry_pos(path: str, guest: int) -> int:
    """Where the L2 entry of guest offset ``guest`` is in the file."""
    h = im.read_header(path, 104)
    bits: int = struct.unpack_from(">I", h, 20)[0]
    l1: int = struct.unpack_from(">Q", h, 40)[0]
    cluster, l2_bits = guest >> bits, bits - 3
    with open(path, "rb") as f:
        f.seek(l1 + 8 * (cluster >> l2_bits))
        table: int = struct.unpack(">Q", f.read(8))[0] & L2_OFFSET
    return table + 8 * (cluster & ((1 << l2_bits) - 1))


def read_u64(path: str, pos: int) -> int:
    with open(path, "rb") as f:
        f.seek(pos)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def set_refcount(path: str, host: int, value: int) -> None:
    """Patch a 16-bit refcount (the default width)."""
    h = im.read_header(path, 104)
    bits = struct.unpack_from(">I", h, 20)[0]
    table = struct.unpack_from(">Q", h, 48)[0]
    assert struct.unpack_from(">I", h, 96)[0] == 4
    cluster, shift = host >> bits, bits + 3 - 4
    block = read_u64(path, table + 8 * (cluster >> shift)) & ~511
    im.patch(path, block + 2 * (cluster & ((1 << shift) - 1)), struct.pack(">H", value))


def damage(path: str, how: str) -> None:
    pos = l2_entry_pos(path, 0)
    entry = read_u64(path, pos)
    host = entry & L2_OFFSET
    if how == "leak":
        im.patch(path, pos, bytes(8))
    elif how == "refcount-zero":
        set_refcount(path, host, 0)
    elif how == "refcount-two":
        set_refcount(path, host, 2)
    elif how == "past-end":
        im.patch(path, pos, struct.pack(">Q", COPIED | 1 << 40))
    elif how == "misaligned":
        im.patch(path, pos, struct.pack(">Q", entry + 512))
    elif how == "reserved-bits":
        im.patch(path, pos, struct.pack(">Q", entry | 2))
    elif how == "copied-cleared":
        im.patch(path, pos, struct.pack(">Q", entry & ~COPIED))
    elif how == "corrupt-bit":
        im.set_incompatible_features(path, im.incompatible_features(path) | im.INCOMPAT_CORRUPT)
    else:
        raise AssertionError(how)


DAMAGE = {
    # how: the exit status qemu-img check gives
    "leak": 3,
    "refcount-zero": 2,
    "refcount-two": 2,
    "past-end": 2,
    "misaligned": 2,
    "reserved-bits": 2,
    "copied-cleared": 2,
    "corrupt-bit": 0,
}


# -- info ------------------------------------------------------------------------------------


def without_snapshots(data: dict[str, object]) -> dict[str, object]:
    """qemu-img's answer minus the internal snapshot list, which chainfs does not show."""
    return {k: v for k, v in data.items() if k != "snapshots"}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_info_json_matches_qemu(name: str, tmp_path: Path) -> None:
    path = CLEAN[name](str(tmp_path))
    want = without_snapshots(json.loads(qemu_info(path)))
    (got,) = info(path)
    assert got.to_json() == want


def test_info_backing_chain_matches_qemu(tmp_path: Path) -> None:
    top = overlay(str(tmp_path))
    want = [without_snapshots(x) for x in json.loads(qemu_info(top, backing_chain=True))]
    got = [x.to_json() for x in info(top, backing_chain=True)]
    assert [x["filename"] for x in got] == [x["filename"] for x in want]
    assert got == want
    out = chainfs("info", "--backing-chain", "--output=json", top).stdout
    assert json.loads(out) == want


@pytest.mark.parametrize("name", ["plain", "v2", "bitmaps", "overlay", "lazy-dirty"])
def test_info_text_matches_qemu(name: str, tmp_path: Path) -> None:
    path = lazy_dirty(str(tmp_path)) if name == "lazy-dirty" else CLEAN[name](str(tmp_path))
    want = qemu_info(path, human=True)
    assert chainfs("info", path).stdout == want


def test_info_relative_names_as_qemu(tmp_path: Path) -> None:
    top = overlay(str(tmp_path))
    rel = os.path.relpath(top)
    want = qemu_info(rel, backing_chain=True, human=True)
    assert chainfs("info", "--backing-chain", rel).stdout == want


def test_info_refuses_what_chainfs_refuses(tmp_path: Path) -> None:
    p = plain(str(tmp_path))
    damage(p, "corrupt-bit")
    proc = chainfs("info", p, ok=(1,))
    assert proc.stdout == ""
    assert proc.stderr.startswith("chainfs: ") and "marked corrupt" in proc.stderr
    missing = chainfs("info", str(tmp_path / "nope.qcow2"), ok=(1,))
    assert "does not exist" in missing.stderr


# -- check -----------------------------------------------------------------------------------


def assert_check_matches_qemu(path: str) -> dict[str, object]:
    rc, want = qemu_check(path)
    result = check(path, force_share=True)
    assert (result.to_json(), result.status) == (want, rc), "\n".join(result.messages)
    return want


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_check_clean_images_match_qemu(name: str, tmp_path: Path) -> None:
    path = CLEAN[name](str(tmp_path))
    report = assert_check_matches_qemu(path)
    assert "corruptions" not in report and "leaks" not in report
    proc = chainfs("check", path)
    assert "No errors were found on the image." in proc.stdout


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_check_damage_matches_qemu(how: str, tmp_path: Path) -> None:
    path = plain(str(tmp_path))
    damage(path, how)
    assert_check_matches_qemu(path)
    proc = chainfs("check", "-U", path, ok=(DAMAGE[how],))
    if DAMAGE[how] == 2:
        assert "errors were found on the image" in proc.stdout
        assert "ERROR " in proc.stdout
    if how == "leak":
        assert "Leaked cluster" in proc.stdout and "1 leaked clusters" in proc.stdout
    if how == "corrupt-bit":
        assert "marked corrupt" in proc.stdout


def test_check_dirty_lazy_refcounts_matches_qemu(tmp_path: Path) -> None:
    path = lazy_dirty(str(tmp_path))
    assert_check_matches_qemu(path)
    assert "was not closed cleanly" in chainfs("check", path, ok=(0, 2, 3)).stdout


def test_check_an_image_chainfs_wrote(tmp_path: Path) -> None:
    path = small_clusters(str(tmp_path))
    with Chain.open(path, writable=True) as chain:
        for i in range(64):
            chain.write(i * 31 * KiB + 7, bytes([i]) * 5000)
    assert_check_matches_qemu(path)
    assert check(path).status == 0


def test_check_json_and_exit_status(tmp_path: Path) -> None:
    path = plain(str(tmp_path))
    damage(path, "leak")
    proc = chainfs("check", "--output=json", path, ok=(3,))
    assert json.loads(proc.stdout) == qemu_check(path)[1]


def test_check_raw_has_nothing_to_check(tmp_path: Path) -> None:
    raw = im.create(str(tmp_path / "a.raw"), MiB, fmt="raw")
    proc = chainfs("check", raw, ok=(63,))
    assert proc.stderr.startswith("chainfs: ") and "raw" in proc.stderr
    assert im.run(["qemu-img", "check", raw], ok=(63,)).returncode == 63


def test_check_refuses_an_image_being_written(tmp_path: Path) -> None:
    path = plain(str(tmp_path))
    with Chain.open(path, writable=True):
        proc = chainfs("check", path, ok=(1,))
        assert 'Failed to get shared "write" lock' in proc.stderr and "-U" in proc.stderr
        chainfs("check", "-U", path)  # forced: checked as it is


def test_check_cannot_open(tmp_path: Path) -> None:
    proc = chainfs("check", str(tmp_path / "missing.qcow2"), ok=(1,))
    assert proc.stderr == f"chainfs: {str(tmp_path / 'missing.qcow2')!r} does not exist\n"


# -- what `chain` shows as allocated ---------------------------------------------------------


def test_allocated_is_the_host_allocation_of_each_layer(tmp_path: Path) -> None:
    """A raw base of 64 MiB with 6 MiB written showed ``allocated=67108864`` (its length)
    while ``du`` said 6 MiB: every layer's ``allocated`` is qemu-img info's "disk size"."""
    d = str(tmp_path)
    base = im.create(os.path.join(d, "A.raw"), 64 * MiB, fmt="raw")
    im.write(base, [(0, 6 * MiB, 1)], fmt="raw")
    top = im.create(os.path.join(d, "B.qcow2"), backing="A.raw", backing_fmt="raw", cwd=d)
    im.write(top, [(8 * MiB, MiB, 2)])
    with Chain.open(top) as chain:
        for layer in chain.layers:
            actual = json.loads(qemu_info(layer.path))["actual-size"]
            assert layer.allocated_bytes() == actual == os.stat(layer.path).st_blocks * 512
        raw = chain.layers[-1]
        assert 6 * MiB <= raw.allocated_bytes() < 8 * MiB


def flat(path: str, tmp: Path) -> bytes:
    raw = str(tmp / "flat.raw")
    im.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw])
    return Path(raw).read_bytes()


def leak_past_end(path: str, n: int) -> None:
    """Clusters written past the end and counted, never referenced: as a crash leaves
    the clusters of a write whose L2 entry it lost."""
    bits = struct.unpack_from(">I", im.read_header(path, 104), 20)[0]
    cs = 1 << bits
    first = -(-os.path.getsize(path) // cs)
    with open(path, "r+b") as f:
        f.seek(first * cs)
        f.write(b"\x5a" * (n * cs))
    for i in range(n):
        set_refcount(path, (first + i) * cs, 1)


def test_check_repairs_leaks_as_qemu(tmp_path: Path) -> None:
    """``chainfs check -r leaks``: the leaked clusters' refcounts lowered, the content
    unchanged, qemu-img check clean afterwards."""
    path = plain(str(tmp_path))
    damage(path, "leak")
    leak_past_end(path, 2)
    assert qemu_check(path)[0] == 3 and qemu_check(path)[1]["leaks"] == 3
    before = flat(path, tmp_path)
    proc = chainfs("check", "-r", "leaks", path)
    assert "3 leaked clusters" in proc.stdout and "No errors were found" in proc.stdout
    assert qemu_check(path) == (0, qemu_check(path)[1])
    assert "leaks" not in qemu_check(path)[1]
    assert flat(path, tmp_path) == before
    chainfs("check", "-r", "leaks", path)  # (nothing left to repair)


def test_check_repairs_nothing_on_a_corrupt_image(tmp_path: Path) -> None:
    path = plain(str(tmp_path))
    damage(path, "refcount-zero")
    leak_past_end(path, 1)
    data = Path(path).read_bytes()
    chainfs("check", "-r", "leaks", path, ok=(2,))
    assert Path(path).read_bytes() == data


def test_check_repair_takes_the_write_lock(tmp_path: Path) -> None:
    path = plain(str(tmp_path))
    damage(path, "leak")
    with Chain.open(path, writable=False):  # (a reader: QEMU's shared read lock)
        proc = chainfs("check", "-r", "leaks", path, ok=(1,))
        assert "lock" in proc.stderr
    assert "-U" in chainfs("check", "-U", "-r", "leaks", path, ok=(1,)).stderr
    assert qemu_check(path)[0] == 3
