"""Holes and discard through a real mount, judged by QEMU's tools and util-linux.

- ``os.lseek(SEEK_DATA/SEEK_HOLE)`` on the flat file, ``qemu-img map -f raw`` of it and
  ``cp --sparse=always`` of it against ``qemu-img map`` of the chain (granule by granule,
  as ``interop/test_holes``), on chains with a sparse raw base, zero and compressed
  clusters and a short backing file;
- ``fallocate -p`` / ``-z`` / mode 0 on the flat file: ``cmp`` against the model,
  ``qemu-img check`` clean after unmounting, the active image's ``du`` smaller, other
  modes EOPNOTSUPP; ``st_blocks`` of the flat file follows the data;
- ext4 on a loop device over the flat file: ``fstrim`` after deleting files and
  ``blkdiscard`` give the space back in the active layer (the loop device turns a
  discard into fallocate(PUNCH_HOLE) on the flat file).

- QEMU using the flat file as a raw disk with ``discard=unmap``: ``qemu-io``'s
  ``discard`` and ``write -z -u`` go through the block layer a guest's TRIM takes, and
  give the space back the same way.

All need a pyfuse3 with lseek/fallocate handlers (``holes_only``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from interop import images as im

from .conftest import (
    Mounter,
    Seeds,
    assert_clean,
    digests,
    holes_only,
    read_direct,
    root_only,
    run,
    wait_for,
)
from .test_crash import assert_old_or_new
from .test_ext4 import loop_device, mounted

pytestmark = [holes_only]

KiB, MiB = im.KiB, im.MiB


def build(d: Path) -> tuple[Path, bytes]:
    """A sparse raw base, a compressed-cluster middle shorter than the disk with zero
    clusters, and a 64 KiB-cluster top."""
    d.mkdir(parents=True, exist_ok=True)
    size = 24 * MiB
    src = d / "src.qcow2"
    im.create(str(src), 20 * MiB)
    im.write(str(src), [(6 * MiB, 2 * MiB, 0x31)])
    layers: list[dict[str, Any]] = [
        {
            "name": "A.raw",
            "fmt": "raw",
            "writes": [(MiB, 64 * KiB, 0x11), (12 * MiB, 2 * MiB, 0x12)],
        }
    ]
    im.build_chain(str(d), layers, size=size)
    im.convert_compressed(str(src), str(d / "B.qcow2"))
    src.unlink()
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "A.raw", "-F", "raw", d / "B.qcow2")
    im.write(str(d / "B.qcow2"), [(12 * MiB + 128 * KiB, 256 * KiB, None)])
    top = im.create(str(d / "E.qcow2"), size, backing="B.qcow2", backing_fmt="qcow2", cwd=str(d))
    im.write(top, [(3 * MiB, 100 * KiB, 0x41), (16 * MiB, 4 * MiB, 0x42)])
    return Path(top), im.reference(top)


def qemu_map(path: Path, fmt: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(
        run("qemu-img", "map", "--output=json", "-f", fmt, path).stdout
    )
    return out


def lseek_table(path: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append((a, b))
            pos = b
        with pytest.raises(OSError) as info:
            os.lseek(fd, size, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    return out


def data_granules(extents: list[tuple[int, int]], g: int, size: int) -> bytearray:
    out = bytearray(-(-size // g))
    for a, b in extents:
        out[a // g : -(-b // g)] = b"\x01" * (-(-b // g) - a // g)
    return out


def map_extents(m: list[dict[str, Any]], *, sure: bool) -> list[tuple[int, int]]:
    return [
        (e["start"], e["start"] + e["length"])
        for e in m
        if e["data"] and (not sure or not e["zero"])
    ]


@root_only
def test_seek_and_sparse_copies_like_qemu_map(tmp_path: Path, mounter: Mounter) -> None:
    top, content = build(tmp_path / "images")
    size, g = len(content), 64 * KiB
    chain_map = qemu_map(top, "qcow2")
    m = mounter(top.parent)
    flat = m.img("E")
    ours = data_granules(lseek_table(flat), g, size)
    sure = data_granules(map_extents(chain_map, sure=True), g, size)
    maybe = data_granules(map_extents(chain_map, sure=False), g, size)
    for i in range(len(ours)):
        assert ours[i] or not sure[i], f"granule {i}: data for QEMU, a hole on the mount"
        assert maybe[i] or not ours[i], f"granule {i}: a hole for QEMU, data on the mount"
    assert 0 < sum(ours) < len(ours)
    # qemu-img map of the flat file as raw sees the same extents
    flat_map = data_granules(map_extents(qemu_map(flat, "raw"), sure=True), g, size)
    assert flat_map == ours
    # cp --sparse=always: same content, and sparse where the chain is
    copy = tmp_path / "copy.raw"
    run("cp", "--sparse=always", flat, copy)
    assert copy.read_bytes() == content
    assert os.stat(copy).st_blocks * 512 <= sum(ours) * g + MiB
    # st_blocks of the flat file: the data found
    assert os.stat(flat).st_blocks * 512 == sum(b - a for a, b in lseek_table(flat))
    # qemu-img convert of the flat file: a sparse qcow2 with the same content
    out = tmp_path / "conv.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", flat, out)
    assert im.reference(str(out)) == content
    conv = data_granules(map_extents(qemu_map(out, "qcow2"), sure=True), g, size)
    # (convert also leaves out data that reads as zeros: the raw base's first 4 KiB)
    assert all(ours[i] or not conv[i] for i in range(len(ours)))
    assert sum(conv) >= sum(ours) - 1


def assert_unmapped(top: Path, model: bytearray, before_du: int, freed: int) -> None:
    """After the unmount: ``top`` (over ``B.qcow2``) is clean and shows ``model``, took
    at least ``freed`` bytes fewer than ``before_du`` blocks of 512, and maps no data of
    its own in 16..18 MiB (what the tests discarded)."""
    assert_clean([top, top.parent / "B.qcow2"])
    assert im.reference(str(top)) == bytes(model)
    assert os.stat(top).st_blocks * 512 <= before_du * 512 - freed
    e_map = [e for e in qemu_map(top, "qcow2") if e["depth"] == 0 and e["data"]]
    assert not any(e["start"] < 18 * MiB and e["start"] + e["length"] > 16 * MiB for e in e_map)


@root_only
def test_fallocate_punch_zero_preallocate(tmp_path: Path, mounter: Mounter) -> None:
    top, content = build(tmp_path / "images")
    model = bytearray(content)
    m = mounter(top.parent)
    flat = m.img("E")
    before_du = os.stat(top).st_blocks
    before_blocks = os.stat(flat).st_blocks
    run("fallocate", "-p", "-o", str(16 * MiB), "-l", str(2 * MiB), flat)
    model[16 * MiB : 18 * MiB] = bytes(2 * MiB)
    run("fallocate", "-z", "-o", str(18 * MiB + 1000), "-l", str(MiB), flat)
    model[18 * MiB + 1000 : 19 * MiB + 1000] = bytes(MiB)
    run("fallocate", "-p", "-o", str(6 * MiB), "-l", str(MiB), flat)  # over B's data
    model[6 * MiB : 7 * MiB] = bytes(MiB)
    run("fallocate", "-o", "0", "-l", str(MiB), flat)  # mode 0: nothing changes
    run("fallocate", "-n", "-o", str(23 * MiB), "-l", str(4 * MiB), flat)  # keep size, past
    proc = run("fallocate", "-c", "-o", "0", "-l", str(MiB), flat, ok=(1,))
    assert "not supported" in proc.stderr
    proc = run("fallocate", "-o", str(23 * MiB), "-l", str(4 * MiB), flat, ok=(1,))
    assert "No space" in proc.stderr
    with open(flat, "r+b") as f:
        assert f.read() == model
        os.fsync(f.fileno())  # st_blocks: recounted now (else within a second or two)
    assert os.stat(flat).st_blocks < before_blocks
    # through the page cache: read it all, punch, read again
    with open(flat, "rb") as f:
        f.read()
    run("fallocate", "-p", "-o", str(3 * MiB), "-l", str(128 * KiB), flat)
    model[3 * MiB : 3 * MiB + 128 * KiB] = bytes(128 * KiB)
    with open(flat, "rb") as f:
        assert f.read() == model
    m.unmount()
    assert_unmapped(top, model, before_du, 3 * MiB)


@root_only
def test_qemu_discard_unmap_through_the_flat_file(tmp_path: Path, mounter: Mounter) -> None:
    """What a guest's discard does when QEMU uses the flat file as a raw disk with
    ``discard=unmap``: QEMU's file driver turns a discard into fallocate(PUNCH_HOLE |
    KEEP_SIZE) on the file, and a zero write that may unmap (``write -z -u``) into a
    punch or a zero range.  ``qemu-io`` drives the same block layer a guest's TRIM goes
    through, without booting one."""
    top, content = build(tmp_path / "images")
    model = bytearray(content)
    m = mounter(top.parent)
    flat = m.img("E")
    before_du = os.stat(top).st_blocks
    opts = f"driver=raw,file.driver=file,file.filename={flat},discard=unmap"
    run(
        "qemu-io",
        "--image-opts",
        opts,
        "-c",
        f"discard {16 * MiB} {2 * MiB}",
        "-c",
        f"write -z -u {6 * MiB} {MiB}",
    )
    model[16 * MiB : 18 * MiB] = bytes(2 * MiB)
    model[6 * MiB : 7 * MiB] = bytes(MiB)
    with open(flat, "rb") as f:
        assert f.read() == model
    m.unmount()
    assert_unmapped(top, model, before_du, 2 * MiB)


@root_only
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "fstrim", "blkdiscard")),
    reason="needs losetup, mkfs.ext4, fstrim and blkdiscard",
)
def test_fstrim_and_blkdiscard_through_a_loop_device(tmp_path: Path, mounter: Mounter) -> None:
    d = tmp_path / "images"
    d.mkdir()
    top = Path(im.create(str(d / "E.qcow2"), 256 * MiB))
    m = mounter(d)
    flat = m.img("E")
    with loop_device(flat) as dev:
        run("mkfs.ext4", "-q", "-E", "nodiscard", dev)
        with mounted(dev, tmp_path / "fs") as fs:
            data = os.urandom(MiB)
            for i in range(64):
                (fs / f"f{i}").write_bytes(data)
            run("sync")
            full = os.stat(top).st_blocks * 512
            for i in range(64):
                (fs / f"f{i}").unlink()
            run("sync")
            out = run("fstrim", "-v", fs).stdout
            assert "trimmed" in out
            run("sync")
        trimmed = os.stat(top).st_blocks * 512
        assert trimmed <= full - 48 * MiB, (full, trimmed)
        run("fsck.ext4", "-fn", dev)
        run("blkdiscard", dev)
        with open(dev, "rb") as f:
            assert f.read(MiB) == bytes(MiB)
    m.unmount()
    assert_clean([top])
    assert os.stat(top).st_blocks * 512 < trimmed
    assert im.reference(str(top)) == bytes(256 * MiB)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


PUNCH_HOLE, KEEP_SIZE = 0x02, 0x01


@pytest.mark.slow
@root_only
@pytest.mark.parametrize("trial", range(4))
def test_kill9_during_discards(tmp_path: Path, mounter: Mounter, seeds: Seeds, trial: int) -> None:
    """Writes and punches, an fsync, then punches and writes racing a ``kill -9``: no
    image corrupt (leaks allowed), the fsync'ed content kept, each byte punched or
    written after it reads as before or as one of those requests, never anything else;
    the next mount's discards work on what is left."""
    images = tmp_path / "images"
    seed = seeds(images)
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    size = len(model)
    rng = random.Random(trial)
    m = mounter(images)
    later: list[tuple[int, bytes]] = []
    fd = os.open(m.img("E"), os.O_RDWR)
    try:
        for _ in range(30):
            n = rng.randint(1, 512 * KiB)
            off = rng.randrange(size - n)
            if rng.random() < 0.5:
                punch(fd, off, n)
                model[off : off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off : off + n] = data
        os.fsync(fd)
        synced = bytes(model)
        stop = threading.Event()

        def racing() -> None:
            while not stop.is_set():
                n = rng.randint(1, 1024 * KiB)
                off = rng.randrange(size - n)
                data = bytes(n) if rng.random() < 0.7 else rng.randbytes(n)
                later.append((off, data))
                try:
                    if any(data):
                        os.pwrite(fd, data, off)
                    else:
                        punch(fd, off, n)
                except OSError:
                    return  # the server is gone

        worker = threading.Thread(target=racing)
        worker.start()
        wait_for(lambda: len(later) > 5 + trial * 7, "discards to be under way")
        m.kill(signal.SIGKILL)
        stop.set()
        worker.join(timeout=60)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once the server is gone
            os.close(fd)
    assert m.wait_exit(None) == -signal.SIGKILL
    m.cleanup()
    for p in seed.layers:
        rc, report = im.check(str(p))
        assert rc in (0, 3) and not report.get("corruptions"), (p, report)
    assert digests(seed.layers[:-1]) == below
    m = mounter(images)
    got = read_direct(m.img("E"))
    assert_old_or_new(got, synced, later)
    fd = os.open(m.img("E"), os.O_RDWR)
    try:
        punch(fd, 0, MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = bytearray(got)
    after[:MiB] = bytes(MiB)
    assert read_direct(m.img("E")) == after
    m.unmount()
    assert_clean(seed.layers[1:])
    rc, report = im.check(str(seed.active))
    assert rc in (0, 3) and not report.get("corruptions"), report
    im.assert_same_as(str(seed.active), bytes(after), str(tmp_path))
