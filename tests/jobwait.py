"""Waiting on a chainfs mount from a test, whichever way it is reached: a local mount
(``mount/conftest.py``'s ``Mount``: files read and written here) or one on a lab host
(``nfs/conftest.py``'s ``ChainfsMount``: commands run in the guest).  Only the logic is
here: polling a condition, and a job's start and end as the chain's ``events`` tell
them; each mount class brings its own transport (``events``, ``command``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(cond: Callable[[], T | None], what: str, timeout: float, interval: float) -> T:
    """Call ``cond`` every ``interval`` seconds until it returns something true; fail
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class JobWaits:
    """``start_job`` and ``wait_job`` over a mount's ``events`` and ``command``."""

    deadline: float  # how long anything may take where the mount runs
    interval: float  # seconds between two looks at ``events``

    def events(self, chain: str) -> list[dict[str, str]]:
        """The chain's ``events`` lines, parsed."""
        raise NotImplementedError

    def command(self, chain: str, kind: str, text: str) -> object:
        """One write of ``text`` to ``control/CHAIN/KIND``."""
        raise NotImplementedError

    def start_job(self, chain: str, kind: str, text: str) -> str:
        """Start a job; return its id once ``events`` says it started."""
        before = len(self.events(chain))
        self.command(chain, kind, text)

        def started() -> str | None:
            for e in self.events(chain)[before:]:
                if e["event"] == "JOB_STARTED":
                    return e["job"]
            return None

        return poll(started, f"{kind} {text!r} to start on {chain}", self.deadline, self.interval)

    def wait_job(self, chain: str, job: str, timeout: float | None = None) -> dict[str, str]:
        """The JOB_COMPLETED or JOB_CANCELLED event of ``job``, once it is there (a job
        stopped by an unmount or a hand-over is not over: the history it left says
        JOB_CANCELLED with reason="unmounted; ..." or "handed over; ...", and the job,
        under the same id, goes on)."""

        def ended() -> dict[str, str] | None:
            for e in self.events(chain):
                if e.get("job") != job or e["event"] not in ("JOB_COMPLETED", "JOB_CANCELLED"):
                    continue
                if not e.get("reason", "").startswith(("unmounted", "handed over")):
                    return e
            return None

        wait = self.deadline if timeout is None else timeout
        return poll(ended, f"job {job} on {chain} to end", wait, self.interval)
