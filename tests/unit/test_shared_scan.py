"""``mount.SharedScan``: the take-overs that wait together share a scan of the source,
each one seeing a scan begun after its chain's locks were taken."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from chainfs.errors import ChainfsError
from chainfs.mount import SharedScan


class Scanner:
    """A scan that counts itself and waits for the test to let it end."""

    def __init__(self) -> None:
        self.began: list[float] = []
        self.go = threading.Event()
        self.fail = False

    def __call__(self) -> Any:  # (a name stands for the source it found)
        self.began.append(len(self.began))
        n = len(self.began)
        assert self.go.wait(10)
        if self.fail:
            raise ChainfsError("the source is gone")
        return f"scan {n}"


async def test_take_overs_waiting_together_share_the_next_scan() -> None:
    scanner = Scanner()
    got: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        scans = SharedScan(scanner, nursery)

        async def take(name: str) -> None:
            got[name] = await scans.since(trio.current_time())

        nursery.start_soon(take, "first")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.01)  # (the others' locks taken after the first scan began)
        for name in ("second", "third", "fourth"):
            nursery.start_soon(take, name)
        await trio.testing.wait_all_tasks_blocked()
        assert len(scanner.began) == 1  # the others wait for the first to end
        scanner.go.set()
    # ten take-overs scanned ten times before: here four took two scans
    assert len(scanner.began) == 2
    assert got == {"first": "scan 1", "second": "scan 2", "third": "scan 2", "fourth": "scan 2"}


async def test_a_take_over_after_a_scan_ended_scans_again() -> None:
    scanner = Scanner()
    scanner.go.set()
    async with trio.open_nursery() as nursery:
        scans = SharedScan(scanner, nursery)
        first: object = await scans.since(trio.current_time())
        await trio.sleep(0.01)
        second: object = await scans.since(trio.current_time())
        assert (first, second) == ("scan 1", "scan 2")
        assert len(scanner.began) == 2


async def test_a_failed_scan_fails_every_take_over_that_waited_for_it() -> None:
    scanner = Scanner()
    scanner.fail = True
    failed: list[str] = []
    async with trio.open_nursery() as nursery:
        scans = SharedScan(scanner, nursery)

        async def take() -> None:
            with pytest.raises(ChainfsError, match="the source is gone"):
                await scans.since(trio.current_time())
            failed.append("x")

        for _ in range(3):
            nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        scanner.go.set()
    assert failed == ["x"] * 3 and len(scanner.began) == 2  # (the others: the next one)
