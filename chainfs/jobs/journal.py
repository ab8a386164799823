"""The job journal: what each job means to do and how far it got, so a crash loses nothing.

One small file per chain, ``.chainfs/CHAIN.journal`` in the source directory, written
only by the chain's owner under an OFD lock on the file (``ownership``), one record per
line::

    <xxh64 of the JSON text, 16 hex digits> <JSON object>\\n

    {"r": "intent", "key": K, "id": "stream-1", "type": "stream", "chain": "vm1",
     "params": {"node": "E.qcow2", "base": "A.qcow2", "speed": 0}, "offset": 0}
    {"r": "progress", "key": K, "offset": N}   everything up to N is durable in the target
    {"r": "phase", "key": K, "phase": "prepare", "actions": [...]}   changes about to be made
    {"r": "pause", "key": K}                    a user paused the job (``pause``)
    {"r": "resume", "key": K}                   and resumed it (``resume``)
    {"r": "end", "key": K, "how": "done"}       (or cancelled, failed, resumed, rolled-back)
    {"r": "checkpoint", "key": "-", "jobs": [records]}   all that is known: forget the rest
    {"r": "handover", "key": "-", "host": H, "mount": M, "ids": [ids]}

``key`` names one run of one job, unique across mounts (a resumed job keeps its id, so
one id may have several runs).  Paths (a job's layers, targets and an action's files) are
stored relative to the source directory when they lie inside it, so another host that
mounts the directory elsewhere reads the same files.

Ordering is what makes it work.  An intent is durable before the job writes anything
(or creates any file), a phase before any backing pointer or state-file change, an end
before the journal forgets the job.  A progress record is appended only after the data
up to its offset was flushed into the receiving image, and at most about once a second
(the job base rate-limits it); it is not fsync'ed, since losing one only means resuming
from an earlier one.  A pause or resume record is synced before the verb returns, and
written before the job changes state: a crash leaves the job in the state the last
synced record names, the one before the verb or the one after it.  A job resumed from
its record (at mount, ``adopt``, ``activate``) comes back paused if it was paused, and
its new intent says so (``"paused": true``), as a compaction's does.

A phase's ``actions`` are a redo list, each action idempotent, so that recovery can
simply apply them again after a crash in the middle::

    {"do": "set-backing", "path": P, "backing": S or null, "format": F or null}
    {"do": "retire", "paths": [P, ...]}
    {"do": "record-active", "chain": NAME, "path": P}

Reading tolerates damage: a line whose checksum does not match, that is not a JSON
object, or that lacks its newline (a torn tail) is ignored, and the records around it
still count.  Records are written at the end of the last whole line (``pwrite``, not
``O_APPEND``, which NFS only emulates), so a torn tail is overwritten, never glued to.

Compaction works in place, never renaming the shared file: a ``checkpoint`` record
holding the records of every running job is appended and synced (a reader starts over
from the last valid checkpoint), then written again at the start of the file, synced,
and the file cut after it.  A crash at any point leaves a valid checkpoint that is the
last one in the file: the one at the end until the cut, the one at the start after it.
With no job left the file is cut to nothing (it stays, locked, while owned).

A hand-over (``inactivate`` of a chain whose job travels) stops the job at its next
checkpoint as an unmount does, appends its progress, then a ``handover`` record naming
the host and mount that gave the chain up and the jobs it left running, synced before
the chain's locks are released; the next owner resumes those jobs from their records as
recovery resumes interrupted ones (a paused one paused: its pause record says so).  The
record is for diagnostics; journals of earlier versions name the paused jobs in it
(``"paused": [ids]``), which replay still marks paused.

The journal of earlier versions, one file for all chains (``.chainfs.journal``, absolute
paths), is read at mount: its jobs move into their chains' journals (``take``), and the
file is removed once none is left in it.

Locking contract: used only from the trio thread (or before it starts).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import ChainfsError
from ..formats import open_layer
from ..hostfile import HostFile, HostIOError, read_meta, sync_dir
from ..locks import lock_image
from ..ownership import JOURNAL_SUFFIX, Ownership, chain_file, own_dir
from ..source import Source, usable_name

log = logging.getLogger(__name__)

LEGACY_JOURNAL_NAME = ".chainfs.journal"  # earlier versions: one for all chains
JOURNAL_NAME = ".chainfs/CHAIN.journal"  # (as the documentation names it)
# the keys of a job's parameters and of an action that hold paths of files
PATH_PARAMS = ("node", "base", "top", "dest", "target", "below")
# compact a journal with running jobs once it holds this many records it no longer needs
COMPACT_AFTER = 4096

Record = dict[str, Any]
Action = dict[str, Any]
RECORD_KINDS = ("intent", "progress", "phase", "pause", "resume", "end", "checkpoint", "handover")


# -- the record format ---------------------------------------------------------------------


def encode(record: Record) -> bytes:
    """One record as its journal line."""
    text = json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    body = text.encode()
    return b"%016x %s\n" % (xxhash.xxh64_intdigest(body), body)


def decode(data: bytes) -> tuple[list[Record], int]:
    """The valid records of a journal's content, and how many lines were ignored."""
    records: list[Record] = []
    bad = 0
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a torn record
    if tail:
        bad += 1
    for line in lines:
        record = _decode_line(line)
        if record is None:
            bad += 1
        else:
            records.append(record)
    return records, bad


def _decode_line(line: bytes) -> Record | None:
    if len(line) < 18 or line[16:17] != b" ":
        return None
    try:
        digest = int(line[:16], 16)
    except ValueError:
        return None
    body = line[17:]
    if xxhash.xxh64_intdigest(body) != digest:
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    if record.get("r") not in RECORD_KINDS:
        return None
    return record


def journal_path(directory: str, chain: str) -> str:
    return chain_file(directory, chain, JOURNAL_SUFFIX)


def map_paths(record: Record, f: Any) -> Record:
    """A copy of ``record`` with ``f`` applied to every path it holds."""
    out = dict(record)
    params = record.get("params")
    if isinstance(params, dict):
        out["params"] = {
            k: (f(v) if k in PATH_PARAMS and isinstance(v, str) else v) for k, v in params.items()
        }
    actions = record.get("actions")
    if isinstance(actions, list):
        mapped = []
        for a in actions:
            if isinstance(a, dict):
                a = dict(a)
                if isinstance(a.get("path"), str):
                    a["path"] = f(a["path"])
                if isinstance(a.get("paths"), list):
                    a["paths"] = [f(x) if isinstance(x, str) else x for x in a["paths"]]
            mapped.append(a)
        out["actions"] = mapped
    jobs = record.get("jobs")
    if isinstance(jobs, list):
        out["jobs"] = [map_paths(j, f) if isinstance(j, dict) else j for j in jobs]
    return out


# -- actions -------------------------------------------------------------------------------


def set_backing(path: str, backing: str | None, fmt: str | None) -> Action:
    return {"do": "set-backing", "path": path, "backing": backing, "format": fmt}


def retire(paths: list[str]) -> Action:
    return {"do": "retire", "paths": list(paths)}


def record_active(chain: str, path: str) -> Action:
    return {"do": "record-active", "chain": chain, "path": path}


def redo(actions: list[Action], src: Source, chain: str) -> None:
    """Apply a phase's actions again (each is idempotent), e.g. after a crash.

    Consecutive state-file actions are saved together, in one atomic replace (as a
    pivot makes them), and before the next image is changed.
    """
    unsaved = False
    for action in actions:
        kind = action.get("do")
        if kind == "set-backing":
            if unsaved:
                src.save([chain])
                unsaved = False
            _redo_set_backing(str(action["path"]), action.get("backing"), action.get("format"))
        elif kind == "retire":
            paths = {os.path.abspath(str(p)) for p in action.get("paths", [])}
            if not paths <= src.retired_by.get(chain, set()):
                src._retire(chain, paths)
                unsaved = True
        elif kind == "record-active":
            name, path = str(action["chain"]), os.path.abspath(str(action["path"]))
            others = [n for n, p in src.recorded.items() if p == path and n != name]
            if src.recorded.get(name) != path or others or path in src.retired:
                for other in others:  # a scan may have named the new active layer itself
                    del src.recorded[other]
                src.recorded[name] = path
                src._unretire(path)
                unsaved = True
        else:
            raise ChainfsError(f"the journal asks for an unknown action {kind!r}")
    if unsaved:
        src.save([chain])


def _redo_set_backing(path: str, backing: object, fmt: object) -> None:
    if backing is not None and not isinstance(backing, str):
        raise ChainfsError(f"the journal names a malformed backing for {path!r}")
    if fmt is not None and not isinstance(fmt, str):
        raise ChainfsError(f"the journal names a malformed backing format for {path!r}")
    layer = open_layer(path, "qcow2", writable=True)
    try:
        lock_image(layer.file.fd, path, write=True)
        if (layer.backing_string, layer.backing_format) != (backing, fmt):
            layer.set_backing(backing, fmt)
            log.info("image=%s backing=%s: pointer rewritten again", path, backing)
    finally:
        layer.close()


# -- what a journal remembers of one job --------------------------------------------------


@dataclass
class Pending:
    """A job the journal has an intent for and no end: running, or interrupted."""

    key: str
    id: str
    type: str
    chain: str
    params: dict[str, Any]
    offset: int = 0  # the last durable checkpoint
    phase: str | None = None
    actions: list[Action] = field(default_factory=list)
    previous: str | None = None  # the id of the interrupted job this one resumes
    resumes: str | None = None  # and its key
    paused: bool = False  # paused by a user: resumed (at mount, by the next owner) paused

    @classmethod
    def from_intent(cls, record: Record) -> Pending | None:
        params = record.get("params")
        fields = (record.get("id"), record.get("type"), record.get("chain"))
        if not isinstance(params, dict) or not all(isinstance(x, str) for x in fields):
            return None
        offset = record.get("offset", 0)
        previous, resumes = record.get("previous"), record.get("resumes")
        return cls(
            key=record["key"],
            id=str(fields[0]),
            type=str(fields[1]),
            chain=str(fields[2]),
            params=params,
            offset=offset if isinstance(offset, int) and offset >= 0 else 0,
            previous=previous if isinstance(previous, str) else None,
            resumes=resumes if isinstance(resumes, str) else None,
            paused=record.get("paused") is True,
        )

    def apply(self, record: Record) -> None:
        """Take a later record of this job into account."""
        if record["r"] == "progress":
            offset = record.get("offset")
            if isinstance(offset, int) and offset >= 0:
                self.offset = offset
        elif record["r"] == "phase":
            phase, actions = record.get("phase"), record.get("actions", [])
            if isinstance(phase, str) and isinstance(actions, list):
                self.phase = phase
                self.actions = [a for a in actions if isinstance(a, dict)]
        elif record["r"] in ("pause", "resume"):
            self.paused = record["r"] == "pause"

    def records(self) -> list[Record]:
        """The fewest records that say everything known about the job."""
        intent: Record = {
            "r": "intent",
            "key": self.key,
            "id": self.id,
            "type": self.type,
            "chain": self.chain,
            "params": self.params,
            "offset": self.offset,
        }
        if self.resumes is not None:
            intent["previous"], intent["resumes"] = self.previous, self.resumes
        if self.paused:
            intent["paused"] = True
        out = [intent]
        if self.phase is not None:
            out.append(
                {"r": "phase", "key": self.key, "phase": self.phase, "actions": self.actions}
            )
        return out


# -- the journal ---------------------------------------------------------------------------


class Journal:
    """The journal of one chain."""

    def __init__(
        self,
        directory: str,
        chain: str,
        *,
        ownership: Ownership | None = None,
        writable: bool = True,
    ) -> None:
        self.directory = directory
        self.chain = chain
        self.path = journal_path(directory, chain)
        self.writable = writable
        self.ownership = ownership
        self._own_lock = False  # this journal took the chain's locks itself
        self.live: dict[str, Pending] = {}
        self.ignored = 0  # damaged lines found when the journal was read
        self._end = 0  # where the next record goes: after the last whole line
        self._records = 0  # records in the file now
        self._clean = True  # the file holds nothing but valid records

    @classmethod
    def load(
        cls,
        directory: str,
        chain: str,
        *,
        ownership: Ownership | None = None,
        writable: bool = True,
    ) -> Journal:
        """Read the journal of ``chain`` (an absent file is an empty journal)."""
        journal = cls(directory, chain, ownership=ownership, writable=writable)
        data = journal._read()
        records, journal.ignored = decode(data)
        if journal.ignored:
            log.warning(
                "journal=%s ignored=%d damaged or torn records", journal.path, journal.ignored
            )
        journal._end = data.rfind(b"\n") + 1
        journal._records = len(records)
        journal._clean = not journal.ignored
        for record in records:
            journal._replay(map_paths(record, journal._abs))
        return journal

    def _read(self) -> bytes:
        try:
            if self.ownership is not None and self.ownership.journal_fd >= 0:
                fd = self.ownership.journal_fd
                size = os.fstat(fd).st_size
                return os.pread(fd, size, 0) if size else b""
            return read_meta(self.path)
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise ChainfsError(f"cannot read the journal {self.path!r}: {e.strerror}") from None

    def _replay(self, record: Record) -> None:
        key = record["key"]
        if record["r"] == "checkpoint":
            self.live = {}
            for inner in record.get("jobs", []):
                if (
                    isinstance(inner, dict)
                    and isinstance(inner.get("key"), str)
                    and inner.get("r") in ("intent", "phase")
                ):
                    self._replay(inner)
        elif record["r"] == "intent":
            pending = Pending.from_intent(record)
            if pending is not None:
                self.live[key] = pending
                if pending.resumes is not None:
                    # its end may not have made it to the disk: this job replaces it
                    self.live.pop(pending.resumes, None)
        elif record["r"] == "end":
            self.live.pop(key, None)
        elif record["r"] == "handover":
            paused = record.get("paused")
            for pending in self.live.values():
                if isinstance(paused, list) and pending.id in paused:
                    pending.paused = True
        elif key in self.live:
            self.live[key].apply(record)
        # (any other record of a job the journal has no intent of -- a pause of a job
        # that does not exist, say -- is ignored)

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.directory) if os.path.isabs(path) else path
        return path if rel.startswith("..") else rel

    def _abs(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.directory, path))

    def pending(self) -> list[Pending]:
        """Jobs begun and not ended, in the order they began."""
        return list(self.live.values())

    # -- writing ---------------------------------------------------------------------------

    def _fd(self) -> int:
        """The journal's descriptor, under the chain's locks (taken now if this journal
        has no owner, as tools and tests use it)."""
        if self.ownership is None:
            self.ownership = Ownership.acquire(self.directory, self.chain)
            self._own_lock = True
        if self.ownership.lost is not None:
            raise OSError(errno.EIO, f"ownership of the chain was lost ({self.ownership.lost})")
        return self.ownership.journal_fd

    def locks(self) -> Ownership:
        """The chain's locks this journal writes under (taken now if need be)."""
        self._fd()
        assert self.ownership is not None
        return self.ownership

    def _pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if HostFile.observer is not None:
            HostFile.observer("journal", self.path, offset, data)
        n = os.pwrite(fd, data, offset)
        if n != len(data):
            # a short write (the disk filled up): what was written is a torn tail
            raise OSError(errno.ENOSPC, "short write to the journal")

    def _append(self, record: Record, *, sync: bool) -> None:
        if not self.writable:
            raise ChainfsError(f"the journal {self.path!r} is read-only")
        if not self._clean or self._records > len(self.live) + COMPACT_AFTER:
            self.compact()
        line = encode(map_paths(record, self._rel))
        try:
            fd = self._fd()
            created = self._end == 0
            self._pwrite(fd, line, self._end)
            if sync or created:
                os.fdatasync(fd)
            if created:
                sync_dir(own_dir(self.directory))  # the file must survive a power loss
        except OSError as e:
            self._clean = False
            raise HostIOError(
                f"writing the journal {self.path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
        self._end += len(line)
        self._records += 1

    def begin(
        self,
        job_type: str,
        job_id: str,
        chain: str,
        params: dict[str, Any],
        resumes: Pending | None = None,
    ) -> Pending:
        """Record a job's intent, durably, and return what the journal knows of it.

        A job that ``resumes`` an interrupted one (started again from its record) starts
        from its checkpoint, paused if it was, and takes its place.
        """
        pending = Pending(secrets.token_hex(8), job_id, job_type, chain, params)
        if resumes is not None:
            pending.offset = resumes.offset
            pending.previous, pending.resumes = resumes.id, resumes.key
            pending.paused = resumes.paused  # a paused job stays paused
        self._append(pending.records()[0], sync=True)
        self.live[pending.key] = pending
        if resumes is not None:
            self.end(resumes.key, "resumed")
        return pending

    def progress(self, key: str, offset: int) -> None:
        """Everything the job ``key`` does below ``offset`` is durable (not synced)."""
        self._append({"r": "progress", "key": key, "offset": offset}, sync=False)
        self.live[key].offset = offset

    def phase(self, key: str, phase: str, actions: list[Action]) -> None:
        """Record, durably, the changes the job is about to make."""
        self._append({"r": "phase", "key": key, "phase": phase, "actions": actions}, sync=True)
        pending = self.live[key]
        pending.phase, pending.actions = phase, actions

    def pause(self, key: str, paused: bool) -> None:
        """Record, durably, that a user paused (``paused``) or resumed the job ``key``."""
        self._append({"r": "pause" if paused else "resume", "key": key}, sync=True)
        pending = self.live.get(key)
        if pending is not None:
            pending.paused = paused

    def end(self, key: str, how: str) -> None:
        """The job ``key`` is over; with no job left the journal is compacted away."""
        self._append({"r": "end", "key": key, "how": how}, sync=True)
        self.live.pop(key, None)
        if not self.live:
            try:
                self.compact()
            except HostIOError as e:  # the end is recorded; the next end compacts
                log.warning("journal=%s cannot be compacted: %s", self.path, e)

    def handover(self, host: str, mount: str, jobs: list[str]) -> None:
        """Record, durably, that this owner gives the chain up with ``jobs`` left for
        the next owner to resume (their progress, and a pause, are recorded already)."""
        record: Record = {"r": "handover", "key": "-", "host": host, "mount": mount, "ids": jobs}
        self._append(record, sync=True)

    def take(self, pending: Pending) -> None:
        """Make an interrupted job of the journal of earlier versions one of this
        journal's, durably (a job it already holds is left as it is)."""
        if pending.key in self.live:
            return
        for record in pending.records():
            self._append(record, sync=False)
        self._sync()
        self.live[pending.key] = pending

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd())
        except OSError as e:
            raise HostIOError(
                f"writing the journal {self.path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None

    def compact(self) -> None:
        """Rewrite the file, in place, with only what the running jobs need (none: cut
        it to nothing)."""
        if not self.writable:
            return
        try:
            fd = self._fd()
            if not self.live:
                os.ftruncate(fd, 0)
                os.fdatasync(fd)
                self._end = 0
            else:
                jobs = [r for p in self.live.values() for r in p.records()]
                line = encode(map_paths({"r": "checkpoint", "key": "-", "jobs": jobs}, self._rel))
                self._pwrite(fd, line, self._end)
                os.fdatasync(fd)
                if len(line) <= self._end:
                    self._pwrite(fd, line, 0)
                    os.fdatasync(fd)
                    os.ftruncate(fd, len(line))
                    os.fdatasync(fd)
                    self._end = len(line)
                else:
                    self._end += len(line)
                    os.ftruncate(fd, self._end)
        except OSError as e:
            self._clean = False
            raise HostIOError(
                f"compacting the journal {self.path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
        self._records = 1 if self.live else 0
        self._clean = True

    def close(self) -> None:
        """Let go of the chain's locks if this journal took them itself."""
        if self._own_lock and self.ownership is not None:
            self.ownership.release()
            self.ownership = None
            self._own_lock = False


def load_legacy(directory: str) -> list[Pending]:
    """The jobs the journal of earlier versions (one for all chains) holds."""
    path = os.path.join(directory, LEGACY_JOURNAL_NAME)
    try:
        # the source directory may be named through a symlink (the user's); the
        # journal in it never is
        data = read_meta(os.path.join(os.path.realpath(directory), LEGACY_JOURNAL_NAME))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ChainfsError(f"cannot read the journal {path!r}: {e.strerror}") from None
    legacy = Journal(directory, "", writable=False)
    records, legacy.ignored = decode(data)
    for record in records:
        legacy._replay(record)
    jobs = legacy.pending()
    for p in [p for p in jobs if not usable_name(p.chain)]:
        log.warning("journal=%s job=%s names no chain (%r); ignored", path, p.id, p.chain)
        jobs.remove(p)
    return jobs


def remove_legacy(directory: str) -> None:
    path = os.path.join(directory, LEGACY_JOURNAL_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("journal=%s cannot be removed after migration: %s", path, e.strerror)
        return
    sync_dir(directory)
    log.info("journal=%s migrated to the chains' journals", path)
