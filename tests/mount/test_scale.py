"""Scale (issue #20) through a mount: a huge disk's count of its data (``st_blocks``)
stalls no other request of the mount.  (Speed is the benchmark's: ``scripts/bench_scale.py``.)"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

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
