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

Locking contract: ``recover`` runs before the mount serves anything; ``recover_chain``
there, or in a take-over's worker thread on the take-over's own copy of the source's
state (``Source.staged``); ``resume_jobs`` on the trio thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .. import source as sources
from ..chain import MAX_DEPTH, resolve_backing
from ..confine import Confinement
from ..errors import ChainfsError
from ..formats.qcow2 import read_backing, remove_unfinished, unfinished
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
from .journal import Action, Journal, Pending, load_legacy, redo, remove_legacy, retire
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
    # the chains a journal record was refused for (``vet``): served read-only, why
    refused: dict[str, str] = field(default_factory=dict)
    refused_keys: set[str] = field(default_factory=set)  # (those records' keys)

    def report(self, p: Pending, event: str, **fields: object) -> None:
        self.events.append((p.chain, event, {"job": p.id, "type": p.type, **fields}))

    def close(self) -> None:
        for journal in self.journals.values():
            journal.close()


@dataclass(frozen=True)
class Bounds:
    """What the journal of one chain may have recovery change (``vet``).

    A journal is a file in the image directory: whoever can write the images can write
    it too, and a record names paths.  So recovery changes a file only where the mount
    could have made the change itself: ``files``, where it may create or remove a file,
    are the directories a job's new file may go to (the source's, ``allow_dir``);
    ``layers``, where an image whose backing pointer it rewrites may lie, add
    ``allow_backing`` (a commit's base may lie there); ``chain`` holds the real paths of
    the chain's layers as the state file and the images say now (a pointer is rewritten
    only in one of them, and only to name one of them).
    """

    files: Confinement
    layers: Confinement
    chain: frozenset[str]

    @classmethod
    def of(
        cls,
        scanned: sources.Source,
        name: str,
        recorded: str | None,
        allow_dirs: Sequence[str] = (),
        allow_backing: Sequence[str] = (),
    ) -> Bounds:
        """The bounds of chain ``name`` of the source as ``sources.load`` found it (its
        layers: those below the active layer the scan found, and below the one the
        state file records, ``recorded``: a crash half-way through a pivot may leave
        them apart)."""
        spec = next((c for c in scanned.chains if c.name == name), None)
        homes = spec.homes if spec is not None else (scanned.directory,)
        files = Confinement.of([*homes, *allow_dirs])
        layers = files.widened(allow_backing)
        tops = {spec.active} if spec is not None else set()
        if recorded is not None:
            tops.add(recorded)
        chain = frozenset().union(*(_layers(top, layers) for top in tops))
        return cls(files, layers, chain)


def _layers(active: str, confine: Confinement) -> frozenset[str]:
    """The real paths of the chain of ``active``, from its images' backing strings; a
    layer outside ``confine`` ends it (it is no layer a mount would open)."""
    found: list[str] = []
    path: str | None = os.path.abspath(active)
    while path is not None and len(found) <= MAX_DEPTH:
        real = os.path.realpath(path)
        if real in found or not confine.admits(real) or not os.path.isfile(real):
            break
        found.append(real)
        try:
            string = read_backing(path)
        except ChainfsError:
            break  # raw (the base), or not an image
        path = resolve_backing(path, string) if string else None
    return frozenset(found)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _new_file_place(path: object, confine: Confinement) -> str | None:
    """Why a job's new file ``path`` (a snapshot's overlay, a copy's or backup's DEST)
    may not be made or removed by recovery (None: it may)."""
    if not isinstance(path, str) or not os.path.basename(path):
        return f"names no file ({path!r})"
    path = os.path.abspath(path)
    for real in (os.path.realpath(os.path.dirname(path)), _real(path)):
        if not confine.admits(real):
            shown = "" if real in (path, os.path.dirname(path)) else f" (resolves to {real!r})"
            return f"names {path!r}{shown}, outside the directories this mount may write to"
    return None


def _vet_action(
    action: Action, p: Pending, name: str, b: Bounds, src: sources.Source
) -> str | None:
    kind = action.get("do")
    own = {_real(str(p.params[k])) for k in ("dest", "target") if isinstance(p.params.get(k), str)}

    def layer(path: object, *, also: set[str] = own) -> str | None:
        if not isinstance(path, str):
            return f"names no file ({path!r})"
        real = _real(path)
        if not b.layers.admits(real):
            shown = "" if real == os.path.abspath(path) else f" (resolves to {real!r})"
            return f"names {path!r}{shown}, outside the directories this mount serves"
        if real not in b.chain and real not in also:
            return f"names {path!r}, which is not a layer of chain {name!r}"
        return None

    if kind == "set-backing":
        path, backing = action.get("path"), action.get("backing")
        why = layer(path, also=set())
        if why is None and backing is not None:
            if not isinstance(backing, str):
                return f"names a malformed backing file ({backing!r})"
            why = layer(resolve_backing(os.path.abspath(str(path)), backing), also=set())
        return why
    if kind == "retire":
        paths = action.get("paths")
        if not isinstance(paths, list):
            return "names no files to retire"
        done = src.retired_by.get(name, set())
        for path in paths:
            if not (isinstance(path, str) and os.path.abspath(path) in done):
                why = layer(path)
                if why is not None:
                    return why
        return None
    if kind == "record-active":
        if action.get("chain") != name:
            return f"makes a layer active in chain {action.get('chain')!r}, not {name!r}"
        return layer(action.get("path"))
    return f"asks for an unknown action {kind!r}"


def vet(p: Pending, name: str, b: Bounds, src: sources.Source) -> str | None:
    """Why recovery must not act on the journal record ``p`` of chain ``name`` (None: it
    may): every path it would write, create, remove or make a layer lies within the
    bounds ``b``, and belongs to the chain or is the job's own new file."""
    if p.chain != name:
        return f"names chain {p.chain!r}, not {name!r}"
    if p.phase is not None:
        for action in p.actions:
            why = _vet_action(action, p, name, b, src)
            if why is not None:
                return why
        return None
    if p.type == "snapshot":
        # (settling reads the overlay, makes it active only if it is one of ``below``)
        why = _new_file_place(p.params.get("target"), b.files)
        below = p.params.get("below")
        if why is None and not (isinstance(below, str) and b.layers.admits(_real(below))):
            why = f"names {below!r} as the layer below, outside the directories served"
        return why
    if p.type in ("copy", "backup"):
        dest = p.params.get("dest")
        why = _new_file_place(dest, b.files)
        if why is not None:
            return why
        # resuming writes into that file, a backup's rollback removes it: never a layer
        # of the chain, nor another chain's active layer
        path = os.path.abspath(str(dest))
        real = _real(path)
        actives = {_real(a): n for n, a in src.recorded.items() if n != name}
        if real in b.chain:
            return f"names {path!r} as its DEST, which is a layer of chain {name!r}"
        if real in actives:
            return f"names {path!r} as its DEST, which is the active layer of {actives[real]!r}"
        # what recovery removes must be the file the backup made (retired before then)
        made = path in src.retired_by.get(name, set())
        if p.type == "backup" and p.offset >= backup.CREATED and os.path.lexists(path) and not made:
            return f"names {path!r} as its DEST, which is not a file a backup made"
        return None
    return None  # (a stream or commit only names layers of the chain, ``layer_of``)


def refuse(rec: Recovery, p: Pending, name: str, journal: str, reason: str) -> None:
    """Leave the record ``p`` alone (kept in the journal), and have chain ``name``
    served read-only, saying why."""
    log.warning(
        "chain=%s job=%s type=%s journal record refused: it %s; the chain is served read-only",
        name,
        p.id,
        p.type,
        reason,
    )
    # (the event goes to the journal's chain, whatever chain the record names)
    fields: dict[str, object] = {
        "job": p.id,
        "type": p.type,
        "reason": f"the journal record {reason}",
    }
    rec.events.append((name, "JOB_REFUSED", fields))
    rec.refused_keys.add(p.key)
    rec.refused[name] = (
        f"served read-only: the journal's record of job {p.id!r} ({p.type}) {reason}; "
        f"the record is kept: if it is genuine, a mount allowed the directory it names "
        f"(-o allow_dir=) finishes the job; if not, remove {journal!r}"
    )


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
    source_path: str,
    *,
    readonly: bool,
    owned: dict[str, Ownership] | None = None,
    allow_dirs: Sequence[str] = (),
    allow_backing: Sequence[str] = (),
) -> tuple[sources.Source, Recovery]:
    """Load the source, finishing what interrupted jobs of the chains this mount can own
    had begun to change on disk (``owned``: the chains whose locks it holds already;
    ``allow_dirs`` and ``allow_backing``: the mount's options, which widen ``Bounds``)."""
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
            except ChainfsError as e:  # (its chain is refused when opened, for this)
                log.warning("chain=%s journal cannot be recovered: %s", name, e)
                continue
        try:
            if state.owns(name):
                journal = Journal.load(directory, name, ownership=state.owned[name])
                for p in legacy:
                    if p.chain == name:
                        journal.take(p)
                rec.journals[name] = journal
            else:
                journal = Journal.load(directory, name, writable=False)
        except ChainfsError as e:
            log.warning("chain=%s journal cannot be read: %s", name, e)
            continue
        every += journal.pending()
    if legacy and not readonly and all(state.owns(p.chain) for p in legacy):
        remove_legacy(directory)
    every += [p for p in legacy if not state.owns(p.chain) and p not in every]
    # (by the journal that holds them: a record may name another chain, ``vet``)
    mine = [p for journal in rec.journals.values() for p in journal.pending()]
    bounds: dict[str, Bounds] = {}
    if mine:  # (the chains as they are now: what a record may name)
        scanned = sources.load(source_path, state=state)
        for name, journal in rec.journals.items():
            if journal.pending():
                recorded = state.recorded.get(name)
                bounds[name] = Bounds.of(scanned, name, recorded, allow_dirs, allow_backing)
    _clear_unfinished(directory, mine, bounds, readonly=readonly)
    if readonly:
        src = sources.load(source_path, state=state)
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
        if name in bounds:
            recover_chain(state, name, journal, rec, bounds[name])
    # the records as read above, unless a recovery changed some (one that failed half-way
    # may have changed the state in memory only): each read once, not twice
    src = sources.load(source_path, state.owned, state=None if bounds else state)
    _exclude_targets(src, [p for p in every if p not in mine])
    for journal in rec.journals.values():
        # (a refused record's target stays a chain: a forged one may name any chain)
        _exclude_targets(src, [p for p in journal.pending() if p.key not in rec.refused_keys])
        journal.compact()
    return src, rec


def recover_chain(
    state: sources.Source, name: str, journal: Journal, rec: Recovery, bounds: Bounds
) -> None:
    """Finish what the owned chain ``name``'s interrupted jobs had begun to change on
    disk; what is to be started again goes to ``rec.resume``.  A record naming a file
    outside ``bounds`` is refused (``refuse``)."""
    for p in journal.pending():
        reason = vet(p, name, bounds, state)
        if reason is not None:
            refuse(rec, p, name, journal.path, reason)
            continue
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


def _clear_unfinished(
    directory: str, pending: list[Pending], bounds: dict[str, Bounds], *, readonly: bool
) -> None:
    """Remove (read-only: name) the temporary files of interrupted image creations in the
    source directory and where the interrupted jobs create their files (inside their
    chains' bounds: a record naming a place outside is refused later)."""
    places = {directory}
    for p in pending:
        for k in ("dest", "target"):
            path = p.params.get(k)
            if not isinstance(path, str) or not path:
                continue
            place = os.path.realpath(os.path.dirname(os.path.abspath(path)))
            b = bounds.get(p.chain)
            if b is not None and b.files.admits(place):
                places.add(place)
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


def serve_refused(served: Iterable[Served], rec: Recovery) -> None:
    """Serve read-only, saying why, the chains a journal record was refused for."""
    for s in served:
        reason = rec.refused.get(s.name)
        if reason is not None and not s.readonly:
            s.readonly, s.warning = True, reason
            s.status_changed()
            log.warning("chain=%s %s", s.name, reason)


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
        # (one a user paused resumes paused: ``Job.attach``)


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
