"""Fixtures shared by the interop tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chainfs.hostfile import HostFile


@pytest.fixture(
    params=[
        pytest.param(False, id="sampled"),
        pytest.param(True, id="every-prefix", marks=pytest.mark.slow),
    ]
)
def exhaustive(request: pytest.FixtureRequest) -> bool:
    """Crash states: a sample of them, or (slow) every prefix of the writes."""
    return bool(request.param)


Waiting = dict[HostFile, tuple[memoryview, int]]


@pytest.fixture
def late(monkeypatch: pytest.MonkeyPatch) -> Iterator[Waiting]:
    """Started writes wait, untouched, until ``wait_written``; then what their buffer
    holds by then is written (so a buffer changed too early writes wrong bytes)."""
    waiting: Waiting = {}

    def started(
        self: HostFile, data: bytes | bytearray | memoryview, offset: int, writeback: int = 0
    ) -> None:
        self.wait_written()
        self._unflushed = True
        waiting[self] = (memoryview(data), offset)

    def wait(self: HostFile) -> None:
        job = waiting.pop(self, None)
        if job is not None:
            HostFile.pwrite(self, bytes(job[0]), job[1])

    monkeypatch.setattr(HostFile, "pwrite_started", started)
    monkeypatch.setattr(HostFile, "wait_written", wait)
    yield waiting
