"""Scale (issue #20) through a mount: a huge disk's count of its data (``st_blocks``)
stalls no other request of the mount.  (Speed is the benchmark's: ``scripts/bench_scale.py``.)"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs.formats.qcow2 import create_overlay
from chainfs.fs import TEXT_PIECE

from . import conftest
from .conftest import DEADLINE, Mounter, read_direct, run, wait_for

COUNTHOLD = Path(__file__).with_name("counthold.py")
MiB = 1 << 20


def finishes(fn: Callable[[], object], what: str) -> object:
    """``fn()`` in a thread; fail if it has not returned within the deadline (a hang
    guard: it returns at once unless it waits for something that never comes)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(DEADLINE)
    assert not t.is_alive(), f"{what} did not return: it waits for the big disk's count"
    return out[0]


def test_counting_a_huge_disks_data_stalls_no_request(
    tmp_path: Path, mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``stat`` of a 1 TiB disk starts the count of its data (st_blocks,
    ``Chain.count_data``), held here in its first region (``counthold.py``) as a 1 PiB
    disk's takes minutes: while it is held the stat has answered (with what the layers
    take on the host), another disk reads, and the same disk stats again; once it is let
    go, st_blocks becomes the data the disk holds.  On the count's thread of old (the
    event loop's), the first stat waited for it, and every request behind it."""
    images = tmp_path / "images"
    images.mkdir()
    big, small = images / "big.qcow2", images / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", big, "1T")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", big)
    run("qemu-img", "create", "-q", "-f", "qcow2", small, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", small)
    hold = tmp_path / "hold"
    entered = tmp_path / "hold.entered"
    hold.write_text("big.qcow2\n")
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(COUNTHOLD), str(hold)))
    m = mounter(images)
    try:
        first = finishes(lambda: os.stat(m.img("big")), "the big disk's first stat")
        assert isinstance(first, os.stat_result) and first.st_size == 1 << 40
        wait_for(entered.exists, "the count to begin (and be held)")
        # the count is held now, and stays held until the hold file goes
        data = finishes(lambda: read_direct(m.img("small"), 0, 65536), "a read of another disk")
        assert data == b"\x33" * 65536
        again = finishes(lambda: os.stat(m.img("big")), "a second stat of the big disk")
        assert isinstance(again, os.stat_result) and again.st_blocks == first.st_blocks
        assert hold.exists()
    finally:
        hold.unlink(missing_ok=True)
    wait_for(lambda: os.stat(m.img("big")).st_blocks == MiB // 512, "the count to end")
    m.unmount()


def test_status_is_read_in_pieces_and_whole(tmp_path: Path, mounter: Mounter) -> None:
    """``control/.status`` of 600 chains (about 100 KB) answers a 1 MiB read with 64 KiB
    at most (a short read: no request of it holds the mount's other disks for long), and
    a reader that goes on to the end (``cat``, Python's ``read``) gets the whole text,
    every chain in it; its size is known once it was read whole.  Before, the first read
    got the whole text."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"vm{i:03d}" for i in range(600)]
    for name in names:
        create_overlay(str(images / f"{name}.qcow2"), size=MiB, backing=None, backing_format=None)
    m = mounter(images)
    path = m.mountpoint / "control" / ".status"
    fd = os.open(path, os.O_RDONLY)
    try:
        first = os.read(fd, MiB)
    finally:
        os.close(fd)
    assert 0 < len(first) <= TEXT_PIECE
    text = path.read_bytes()
    assert len(text) > len(first) and text.startswith(first)
    served = [line.split()[0] for line in text.decode().splitlines() if "status=served" in line]
    assert served == [f"chain={x}" for x in names]
    assert run("cat", path).stdout.encode() == text
    assert os.stat(path).st_size == len(text)
    m.unmount()
