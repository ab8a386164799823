"""``chainfs`` whose jobs can be held in a state: a test fault point for mounts.

    python jobhold.py HOLD_FILE mount -f SOURCE MOUNTPOINT [-o ...]

runs ``chainfs`` with ``Job.between_states`` set to a hook that, whenever a job enters a
state the file ``HOLD_FILE`` names (``created``, ``waiting``, ``pending`` or
``aborting``), keeps it there until the file names another.  Those are states a job
otherwise passes through without letting a request in, so this is how a test sends
every verb to a job in each of them through the control files.  A test points the mount
fixtures' ``CHAINFS`` at this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from chainfs import cli
from chainfs.jobs.base import Job


def held(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def main() -> int:
    path = Path(sys.argv[1])

    async def hold(job: Job) -> None:
        # polled: the test changes the file from another process
        while True:
            if held(path) != job.status:
                return
            await trio.sleep(0.02)

    Job.between_states = hold
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
