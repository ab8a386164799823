"""``chainfs`` with host I/O faults injected on demand: a fault-injecting layer for mounts.

    python faultinject.py RULES_FILE mount -f SOURCE MOUNTPOINT [-o ...]

runs ``chainfs`` with a ``HostFile.observer`` that, before every write and every flush
of an image, reads ``RULES_FILE``: while it holds ``flush EIO`` every flush fails with
EIO as a failing ``fdatasync`` would, ``write ENOSPC`` every write fails with ENOSPC,
and so on (one ``EVENT ERRNO-NAME [FILE-SUFFIX]`` per line: with a suffix, only for
files whose path ends with it); ``STALL`` for the errno name blocks the call for as
long as the line stays (as a write to a cut-off NFS server blocks), then lets it go
on (``RULES_FILE.stalled`` appears when a call is blocked there, for a test to know
it is); without the file nothing fails.  The
failure is raised where the system call would fail, so chainfs handles it as it would a
real one.  A test points the mount fixtures' ``CHAINFS`` at this script.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

from chainfs import cli
from chainfs.hostfile import HostFile

STALL = -1  # not an errno: block while the rule stays


def rules(path: Path) -> list[tuple[str, int, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out: list[tuple[str, int, str]] = []
    for line in text.splitlines():
        event, name, *suffix = line.split()
        err = STALL if name == "STALL" else getattr(errno, name)
        out.append((event, err, suffix[0] if suffix else ""))
    return out


def main() -> int:
    path = Path(sys.argv[1])

    def observer(event: str, file: str, offset: int, data: bytes) -> None:
        for kind, err, suffix in rules(path):
            if kind == event and file.endswith(suffix):
                if err == STALL:
                    path.with_name(path.name + ".stalled").touch()
                    while (kind, err, suffix) in rules(path):
                        time.sleep(0.05)
                    return
                raise OSError(err, os.strerror(err))

    HostFile.observer = observer
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
