"""The mount's periodic sweeps over every chain (write-back, heartbeat) let the guests'
requests in as they go: with thousands of chains, one sweep is no stall of every disk
(the FUSE requests are served by a task of the same trio loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio

from chainfs import mount
from chainfs.disk import Disk


@dataclass
class CountingChain:
    flushed: list[str]
    writable: bool = True

    def flush(self) -> None:
        self.flushed.append("flush")

    def refresh_allocation(self) -> None:
        pass


@dataclass
class SweptDisk:
    name: str
    chain: Any
    mtime_ns: int = 1
    suspended: str | None = None
    views: list[str] = field(default_factory=list)


async def test_the_write_back_sweep_lets_other_tasks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount, "WRITE_BACK_INTERVAL", 0.01)
    n = 1000
    flushed: list[str] = []
    disks = [SweptDisk(f"vm{i}", CountingChain(flushed)) for i in range(n)]
    seen: list[int] = []  # how far the sweep was each time a request got its turn
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount._write_back, cast(list[Disk], disks))
        while len(flushed) < n:
            await trio.lowlevel.checkpoint()  # a guest's request, served between steps
            seen.append(len(flushed))
        nursery.cancel_scope.cancel()
    mid = [k for k in seen if 0 < k < n]
    assert mid, "the sweep ran over every chain without letting anything else run"
    # (trio runs a batch's tasks in either order: two steps between two turns at most)
    gaps = [b - a for a, b in zip([0, *mid], [*mid, n], strict=True)]
    assert max(gaps) <= 2 * mount.SWEEP_STEP, gaps
