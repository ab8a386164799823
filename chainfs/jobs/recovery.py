"""Recovery of interrupted jobs: what the journal says at mount, and what is done about it.

At mount, before anything is served, the temporary files of image creations a crash
interrupted (a snapshot's overlay or a copy's DEST, written under a dot-prefixed name
and renamed into place only once complete) are removed from the source directory and the
directories of the interrupted jobs' targets; a read-only mount only names them in the
log.  Then the journal tells which jobs a crash (or an unmount) interrupted.  A job
whose ``prepare`` had begun is finished from its recorded changes before the directory
is scanned, so the scan already sees the chain the job was heading to; a snapshot is
finished or undone the same way (``snapshot.settle``).  Every other job is started again
from its journal record once its chain is open, by its own module's ``resume``: the new
job keeps the interrupted one's id and starts from its checkpoint.  A job that cannot be
resumed is rolled back (nothing of it shows in any chain; what it copied is harmless).
What was done goes to the log and to the chain's ``events``.

Each chain has its own journal (``journal``), and only the chain's owner recovers it:
at mount, the chains whose journals hold jobs are locked first (``ownership``); one
another mount owns is left alone (its jobs are running there), though the files its
jobs write are still no chains of their own here.  ``adopt`` runs the same recovery
for one chain when it takes the chain over from a host that died (``recover_chain``).

Locking contract: ``recover`` runs before the mount serves anything; ``resume_jobs``
on the trio thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import source as sources
from ..errors import ChainfsError
from ..formats.qcow2 import remove_unfinished, unfinished
from ..ownership import (
    JOURNAL_SUFFIX,
    OWNER_SUFFIX,
    OwnedElsewhere,
    Ownership,
    chain_file,
    is_locked,
    own_dir,
)
from . import backup, commit, copy, snapshot, stream
from .journal import Journal, Pending, load_legacy, redo, remove_legacy, retire
from .served import Served

log = logging.getLogger(__name__)

# how each kind of job is started again from its record
RESUME: dict[str, Callable[[Served, Pending], None]] = {
    "stream": stream.resume,
    "commit": commit.resume,
    "copy": copy.resume,
    "backup": backup.resume,  # rolls the backup back: its point in time is lost
}


@dataclass
class Recovery:
    """What the journals said at mount, and what is left to do once the chains are open."""

    journals: dict[str, Journal] = field(default_factory=dict)  # of the owned chains
    resume: list[Pending] = field(default_factory=list)
    # on a read-only mount: the interrupted jobs, waiting for a read-write one
    interrupted: list[Pending] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)

    def report(self, p: Pending, event: str, **fields: object) -> None:
        self.events.append((p.chain, event, {"job": p.id, "type": p.type, **fields}))

    def close(self) -> None:
        for journal in self.journals.values():
            journal.close()


def _journalled(directory: str) -> list[str]:
    """The chains whose journal files hold something (a name as its file gives it)."""
    try:
        entries = os.listdir(own_dir(directory))
    except OSError:
        return []
    names = []
    for entry in sorted(entries):
        if entry.endswith(JOURNAL_SUFFIX) and not entry.startswith("."):
            try:
                if os.path.getsize(os.path.join(own_dir(directory), entry)):
                    names.append(entry[: -len(JOURNAL_SUFFIX)])
            except OSError:
                continue
    return names


def recover(
    source_path: str, *, readonly: bool, owned: dict[str, Ownership] | None = None
) -> tuple[sources.Source, Recovery]:
    """Load the source, finishing what interrupted jobs of the chains this mount can own
    had begun to change on disk (``owned``: the chains whose locks it holds already)."""
    # the changes go to the state as it is, not to one a scan added names to (the scan
    # would name a half-made target as a chain of its own)
    state = sources.load_state(source_path, owned)
    directory = state.directory
    rec = Recovery()
    legacy = load_legacy(directory)
    names = sorted(set(_journalled(directory)) | {p.chain for p in legacy})
    every: list[Pending] = []  # every chain's, owned or not: their targets are no chains
    for name in names:
        if not readonly:
            try:
                state.own(name)
            except OwnedElsewhere as e:
                log.info("chain=%s journal left to its owner: %s", name, e)
        if state.owns(name):
            journal = Journal.load(directory, name, ownership=state.owned[name])
            for p in legacy:
                if p.chain == name:
                    journal.take(p)
            rec.journals[name] = journal
        else:
            journal = Journal.load(directory, name, writable=False)
        every += journal.pending()
    if legacy and not readonly and all(state.owns(p.chain) for p in legacy):
        remove_legacy(directory)
    every += [p for p in legacy if not state.owns(p.chain) and p not in every]
    mine = [p for p in every if state.owns(p.chain)]
    _clear_unfinished(directory, mine, readonly=readonly)
    if readonly:
        src = sources.load(source_path)
        # a job of a chain another mount owns is running there, not interrupted
        running = [p for p in every if is_locked(chain_file(directory, p.chain, OWNER_SUFFIX))]
        _exclude_targets(src, running)
        every = [p for p in every if p not in running]
        for p in every:
            log.warning(
                "chain=%s job=%s type=%s was interrupted; a read-write mount resumes it",
                p.chain,
                p.id,
                p.type,
            )
        _exclude_targets(src, every)
        rec.interrupted = every
        return src, rec
    for name, journal in rec.journals.items():
        recover_chain(state, name, journal, rec)
    src = sources.load(source_path, state.owned)
    _exclude_targets(src, [p for p in every if not state.owns(p.chain)])
    for journal in rec.journals.values():
        _exclude_targets(src, journal.pending())
        journal.compact()
    return src, rec


def recover_chain(state: sources.Source, name: str, journal: Journal, rec: Recovery) -> None:
    """Finish what the owned chain ``name``'s interrupted jobs had begun to change on
    disk; what is to be started again goes to ``rec.resume``."""
    for p in journal.pending():
        try:
            if p.phase is not None:
                rec.report(p, "JOB_RESUMED", phase=p.phase)
                redo(p.actions, state, name)
                journal.end(p.key, "done")
                rec.report(p, "JOB_COMPLETED", phase=p.phase)
            elif p.type == "snapshot":
                for event, fields in snapshot.settle(p, state):
                    rec.report(p, event, **fields)
                journal.end(p.key, "done")
            else:
                rec.resume.append(p)
        except ChainfsError as e:
            # left in the journal: the next mount tries again
            log.error("chain=%s job=%s cannot be completed: %s", p.chain, p.id, e)
            rec.report(p, "JOB_COMPLETED", error=f"cannot be completed: {e}")


def _clear_unfinished(directory: str, pending: list[Pending], *, readonly: bool) -> None:
    """Remove (read-only: name) the temporary files of interrupted image creations in the
    source directory and where the interrupted jobs create their files."""
    places = {directory}
    places.update(
        os.path.dirname(str(p.params[k]))
        for p in pending
        for k in ("dest", "target")
        if p.params.get(k)
    )
    for place in sorted(places):
        if readonly:
            for path in unfinished(place):
                log.info("file=%s is an unfinished image; a read-write mount removes it", path)
            continue
        try:
            for path in remove_unfinished(place):
                log.info("file=%s removed: an image creation that was interrupted", path)
        except ChainfsError as e:
            log.error("directory=%s unfinished images cannot be removed: %s", place, e)


def _exclude_targets(src: sources.Source, pending: list[Pending]) -> None:
    """A file a pending job writes and has not made active is no chain of its own."""
    targets = {
        str(p.params[k])
        for p in pending
        for k in ("dest", "target")
        if p.params.get(k) and src.recorded.get(p.chain) != p.params[k]
    }
    for spec in [c for c in src.chains if c.active in targets]:
        log.info("chain=%s file=%s is the target of an interrupted job", spec.name, spec.active)
        src.chains.remove(spec)
        if src.recorded.get(spec.name) == spec.active:
            del src.recorded[spec.name]  # the name the scan gave it


def resume_jobs(served: Iterable[Served], rec: Recovery) -> None:
    """Report what recovery did, and start the interrupted jobs again from their records."""
    by_name = {s.name: s for s in served}
    for chain, event, fields in rec.events:
        s = by_name.get(chain)
        if s is not None:
            s.emit(event, **fields)
        else:
            log.info("chain=%s event=%s %s", chain, event, fields)
    for p in rec.resume:
        s = by_name.get(p.chain)
        if s is None:
            log.warning("chain=%s job=%s is not served; it stays in the journal", p.chain, p.id)
            continue
        journal = rec.journals[p.chain]
        start = RESUME.get(p.type)
        if start is None:
            _roll_back(s, p, journal, f"chainfs does not know jobs of type {p.type!r}")
            continue
        try:
            start(s, p)
        except ChainfsError as e:
            _roll_back(s, p, journal, str(e))
            continue
        if p.paused and s.job is not None:  # handed over paused: it stays paused here
            s.job.start_paused = True


def _roll_back(served: Served, p: Pending, journal: Journal, reason: str) -> None:
    """Give up an interrupted job: its chain never changed; its target stays a file."""
    dest = p.params.get("dest")
    try:
        if dest:
            # a partial copy must not be served as a chain of its own later on
            redo([retire([str(dest)])], served.source, served.name)
        journal.end(p.key, "rolled-back")
    except ChainfsError as e:
        log.error("chain=%s job=%s cannot be rolled back: %s", p.chain, p.id, e)
    served.emit("JOB_ROLLED_BACK", job=p.id, type=p.type, reason=reason)
