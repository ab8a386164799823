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

A few steps of a take-over (``adopt``, ``activate``) that read or write a chain's own
files are events too, checked before the step runs (``_steps``): ``journal-load`` (a
journal loaded writable, for its owner; FILE is the journal), ``state-load`` (a state
record read again, ``Source._reload``), ``recover`` (a take-over running a journal,
``recover_chain``; FILE is the journal), ``state-save`` (``Source.save`` of a chain;
FILE is its state file) and ``events-load`` (a chain's history opened writable; FILE is
``.chainfs/CHAIN.events``).  An errno there fails the step as its I/O would
(``HostIOError``).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from chainfs import cli, mount
from chainfs.eventlog import EventLog
from chainfs.hostfile import HostFile, HostIOError
from chainfs.jobs.journal import Journal
from chainfs.jobs.recovery import Bounds, Recovery
from chainfs.ownership import JOURNAL_SUFFIX, Ownership, chain_file
from chainfs.source import Source

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
    _steps(observer)
    return cli.main(sys.argv[2:])


def _steps(observer: Callable[[str, str, int, bytes], None]) -> None:
    """The take-over's steps as events (see the module's words)."""

    def observe(event: str, path: str) -> None:
        try:
            observer(event, path, 0, b"")
        except OSError as e:
            raise HostIOError(f"{event} of {path!r} failed: {e.strerror}", e.errno or 0) from None

    load_journal = Journal.load.__func__  # type: ignore[attr-defined]

    def journal_load(
        cls: type[Journal],
        directory: str,
        chain: str,
        *,
        ownership: Ownership | None = None,
        writable: bool = True,
    ) -> Journal:
        if ownership is not None:
            observe("journal-load", chain_file(directory, chain, JOURNAL_SUFFIX))
        return cast(
            Journal, load_journal(cls, directory, chain, ownership=ownership, writable=writable)
        )

    load_events = EventLog.open.__func__  # type: ignore[attr-defined]

    def events_load(cls: type[EventLog], directory: str, chain: str, *, writable: bool) -> EventLog:
        if writable:
            observe("events-load", chain_file(directory, chain, ".events"))
        return cast(EventLog, load_events(cls, directory, chain, writable=writable))

    reload, save = Source._reload, Source.save
    recover_chain = vars(mount)["recover_chain"]

    def state_load(self: Source, chain: str) -> None:
        observe("state-load", self.chain_state_path(chain))
        reload(self, chain)

    def state_save(self: Source, chains: list[str] | None = None) -> None:
        for name in chains or []:
            observe("state-save", self.chain_state_path(name))
        save(self, chains)

    def recover(state: Source, name: str, journal: Journal, rec: Recovery, b: Bounds) -> None:
        observe("recover", journal.path)
        recover_chain(state, name, journal, rec, b)

    patches: list[tuple[object, str, object]] = [
        (Journal, "load", classmethod(journal_load)),
        (EventLog, "open", classmethod(events_load)),
        (Source, "_reload", state_load),
        (Source, "save", state_save),
        (mount, "recover_chain", recover),
    ]
    for owner, name, step in patches:
        setattr(owner, name, step)


if __name__ == "__main__":
    sys.exit(main())
