"""Overwrites pyfuse3 answers from the flat file's map (``chainfs/fastread.py``,
``third_party/pyfuse3/write-map.patch``).

Pages of data clusters are written three times with O_DIRECT: the first may allocate
(chainfs), the second overwrites in place (chainfs, which then marks the granule
writable), the third is pyfuse3's alone.  Then something happens after which a write
must go through chainfs again — a snapshot, a discard, a bitmap added or cleared, a
backup or a commit started, the chain given up — and the next overwrite must show it:
it lands in the new top, reallocates, sets the bitmap's bit, is copied before it
lands, is mirrored into the commit's base, or is refused.  The server's log at unmount
says how many writes pyfuse3 answered; it must be many.  qemu-img judges the images.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    Mount,
    Mounter,
    Seeds,
    assert_clean,
    assert_content,
    first_difference,
    read_direct,
    wait_for,
)
from .test_fastread import _write_pages

KiB = 1024
PAGE = 4 * KiB
CLUSTER = 64 * KiB


def _offsets(size: int, count: int = 16) -> list[int]:
    """A page in each of ``count`` clusters spread over the disk's second half (a job's
    pass, front to back, reaches them last)."""
    step = size // 2 // count // CLUSTER * CLUSTER
    return [size // 2 + i * step + (i % 4) * PAGE for i in range(count)]


def _check(img: Path, offsets: list[int], model: bytes | bytearray) -> None:
    for off in offsets:
        a = off - off % CLUSTER
        got = read_direct(img, a, CLUSTER)
        want = bytes(model[a : a + CLUSTER])
        assert got == want, f"at {a}: {first_difference(got, want)}"


def _counts(m: Mount) -> tuple[int, int]:
    """(writes pyfuse3 answered, writes of the mapped flat file passed to chainfs), as
    the server logs them at unmount."""
    pattern = r"write map: (\d+) writes answered by pyfuse3, (\d+) passed on"
    found = re.findall(pattern, m.log_text())
    assert found, m.log_text()[-2000:]
    return int(found[-1][0]), int(found[-1][1])


def _warm(m: Mount, offsets: list[int], model: bytearray) -> None:
    """Three rounds: the last is pyfuse3's."""
    for fill in (11, 22, 33):
        _write_pages(m.img("E"), offsets, model, fill)


def test_overwrites_answered_by_pyfuse3(mounter: Mounter, seeds: Seeds, tmp_path: Path) -> None:
    """The third round of overwrites is pyfuse3's alone: the content exact, the flat
    file's mtime moved by it, O_DSYNC writes through chainfs."""
    seed = seeds(tmp_path / "src")
    model = bytearray(seed.content)
    offsets = _offsets(len(model))
    m = mounter(tmp_path / "src")
    for fill in (11, 22):
        _write_pages(m.img("E"), offsets, model, fill)
    before = os.stat(m.img("E")).st_mtime_ns
    time.sleep(1.2)  # (the kernel keeps the flat file's attributes for a second)
    _write_pages(m.img("E"), offsets, model, 33)
    _check(m.img("E"), offsets, model)
    time.sleep(1.2)
    assert os.stat(m.img("E")).st_mtime_ns > before  # the map's time of its last write
    m.unmount()
    answered, passed = _counts(m)
    # the third round; and the second where E held the cluster already (the first
    # round overwrote it in place)
    assert len(offsets) <= answered <= 2 * len(offsets)
    assert answered + passed == 3 * len(offsets) - 1  # (the first write attaches the map)
    # O_DSYNC: chainfs's, though the granules are marked
    m = mounter(tmp_path / "src")
    _write_pages(m.img("E"), offsets, model, 44)  # (all in place: marks)
    _write_pages(m.img("E"), offsets, model, 55, os.O_DSYNC)
    m.unmount()
    assert _counts(m) == (0, 2 * len(offsets) - 1)
    assert_clean(seed.layers)
    assert_content(seed.active, model, tmp_path / "cmp")


def test_a_guest_write_of_zeros_answered_by_pyfuse3(
    mounter: Mounter, seeds: Seeds, tmp_path: Path
) -> None:
    """Zeros over data the top holds in place (``dd if=/dev/zero``, a guest zeroing a
    page): pyfuse3 writes them as any data; the flat file and the image read them."""
    seed = seeds(tmp_path / "src")
    model = bytearray(seed.content)
    offsets = _offsets(len(model))
    m = mounter(tmp_path / "src")
    _warm(m, offsets, model)
    zeros = mmap.mmap(-1, PAGE)  # (anonymous memory: zeros, aligned for O_DIRECT)
    fd = os.open(m.img("E"), os.O_WRONLY | os.O_DIRECT)
    try:
        for off in offsets:
            assert os.pwritev(fd, [zeros], off) == PAGE
            model[off : off + PAGE] = bytes(PAGE)
    finally:
        os.close(fd)
        zeros.close()
    _check(m.img("E"), offsets, model)
    m.unmount()
    answered, _ = _counts(m)
    assert answered >= 2 * len(offsets)  # (the third round and the zeros)
    assert_clean(seed.layers)
    assert_content(seed.active, model, tmp_path / "cmp")


def _snapshot(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    before = bytes(model)
    m.command("E", "snapshot", "F.qcow2")
    _write_pages(m.img("E"), offsets, model, 50)
    _check(m.img("E"), offsets, model)
    m.unmount()
    src = tmp / "src"
    assert_content(src / "E.qcow2", before, tmp / "cmp-e")  # the old top unchanged
    assert_content(src / "F.qcow2", model, tmp / "cmp-f")


def _discard(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    for off in offsets:
        a = off - off % CLUSTER
        subprocess.run(
            ["fallocate", "-p", "-o", str(a), "-l", str(CLUSTER), str(m.img("E"))], check=True
        )
        model[a : a + CLUSTER] = bytes(CLUSTER)
    _write_pages(m.img("E"), offsets, model, 50)
    _check(m.img("E"), offsets, model)
    m.unmount()
    assert_content(tmp / "src" / "E.qcow2", model, tmp / "cmp")


def _dirty(m: Mount) -> set[int]:
    """The clusters the bitmap b0 says are dirty."""
    out: set[int] = set()
    for x in m.lines("E", "dirty"):
        if x["bitmap"] == "b0":
            start, length = int(x["start"]), int(x["length"])
            out.update(range(start // CLUSTER, (start + length - 1) // CLUSTER + 1))
    return out


def _bitmap_add(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    m.command("E", "bitmap", "add b0")
    assert _dirty(m) == set()
    _write_pages(m.img("E"), offsets, model, 50)
    assert _dirty(m) == {off // CLUSTER for off in offsets}
    m.unmount()
    assert_content(tmp / "src" / "E.qcow2", model, tmp / "cmp")


def _bitmap_clear(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    # (b0 was added before the three rounds: its bits are set, the granules marked)
    assert _dirty(m) == {off // CLUSTER for off in offsets}
    m.command("E", "bitmap", "clear b0")
    assert _dirty(m) == set()
    _write_pages(m.img("E"), offsets, model, 50)
    assert _dirty(m) == {off // CLUSTER for off in offsets}
    m.unmount()


def _backup(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    # a point-in-time backup copies each cluster before a guest write changes it: an
    # overwrite that skipped chainfs would reach the backup instead of the old content
    point = bytes(model)
    dest = tmp / "src" / "backup.qcow2"
    job = m.start_job("E", "backup", f"{dest} sync=full speed=64K")
    wait_for(lambda: int(m.lines("E", "jobs")[0].get("len", 0)) > 0, "the backup's pass")
    _write_pages(m.img("E"), offsets, model, 50)
    m.command("E", "speed", f"{job} 0")
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    _check(m.img("E"), offsets, model)
    m.unmount()
    assert_content(dest, point, tmp / "cmp-backup")
    assert_content(tmp / "src" / "E.qcow2", model, tmp / "cmp")


def _commit(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    # an active commit in sync: an overwrite that skipped chainfs would not be mirrored
    job = m.start_job("E", "commit", "base=D.qcow2 wait=ready")
    wait_for(
        lambda: any(e.get("job") == job and e["event"] == "JOB_READY" for e in m.events("E")),
        "the commit ready",
    )
    _write_pages(m.img("E"), offsets, model, 50)
    m.command("E", "complete", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E")[0] == "D.qcow2"
    _check(m.img("E"), offsets, model)
    m.unmount()
    assert_content(tmp / "src" / "D.qcow2", model, tmp / "cmp")


def _inactivate(m: Mount, offsets: list[int], model: bytearray, tmp: Path) -> None:
    # the file stays open across the hand-over: its next write must be refused
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(m.img("E"), os.O_WRONLY | os.O_DIRECT)
    try:
        buf[:] = b"\x01" * PAGE
        assert os.pwritev(fd, [buf], offsets[0]) == PAGE  # (pyfuse3's)
        model[offsets[0] : offsets[0] + PAGE] = b"\x01" * PAGE
        m.command("E", "inactivate", "E")
        buf[:] = b"\x02" * PAGE
        with pytest.raises(OSError) as exc:
            os.pwritev(fd, [buf], offsets[0])
        assert exc.value.errno == errno.EROFS, exc.value
    finally:
        os.close(fd)
        buf.close()
    _check(m.img("E"), offsets, model)
    m.unmount()
    assert_content(tmp / "src" / "E.qcow2", model, tmp / "cmp")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_snapshot, id="snapshot"),
        pytest.param(_discard, id="discard"),
        pytest.param(_bitmap_add, id="bitmap-add"),
        pytest.param(_bitmap_clear, id="bitmap-clear"),
        pytest.param(_backup, id="backup"),
        pytest.param(_commit, id="commit"),
        pytest.param(
            _inactivate,
            id="inactivate",
            marks=pytest.mark.expect_log(r"write failed: chain 'E' is served read-only"),
        ),
    ],
)
def test_overwrite_after_change(
    mounter: Mounter,
    seeds: Seeds,
    tmp_path: Path,
    change: Callable[[Mount, list[int], bytearray, Path], None],
) -> None:
    seed = seeds(tmp_path / "src")
    model = bytearray(seed.content)
    offsets = _offsets(len(model))
    m = mounter(tmp_path / "src")
    if change is _bitmap_clear:
        m.command("E", "bitmap", "add b0")
    _warm(m, offsets, model)
    change(m, offsets, model, tmp_path)
    answered, _ = _counts(m)
    assert answered >= len(offsets)  # the third round was pyfuse3's
    assert_clean([p for p in (tmp_path / "src").iterdir() if p.suffix == ".qcow2"])
