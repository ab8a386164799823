"""The job journal: what each job means to do and how far it got, so a crash loses nothing.

A small append-only file beside the images and the state file, ``.chainfs.journal``,
one record per line::

    <xxh64 of the JSON text, 16 hex digits> <JSON object>\\n

    {"r": "intent", "key": K, "id": "stream-1", "type": "stream", "chain": "vm1",
     "params": {"node": "/abs/E.qcow2", "base": "/abs/A.qcow2", "speed": 0}, "offset": 0}
    {"r": "progress", "key": K, "offset": N}   everything up to N is durable in the target
    {"r": "phase", "key": K, "phase": "prepare", "actions": [...]}   changes about to be made
    {"r": "end", "key": K, "how": "done"}       (or cancelled, failed, resumed, rolled-back)

``key`` names one run of one job, unique across mounts (a resumed job keeps its id, so
one id may have several runs).

Ordering is what makes it work.  An intent is durable before the job writes anything
(or creates any file), a phase before any backing pointer or state-file change, an end
before the journal forgets the job.  A progress record is appended only after the data
up to its offset was flushed into the receiving image, and at most about once a second
(the job base rate-limits it); it is not fsync'ed, since losing one only means resuming
from an earlier one.

A phase's ``actions`` are a redo list, each action idempotent, so that recovery can
simply apply them again after a crash in the middle::

    {"do": "set-backing", "path": P, "backing": S or null, "format": F or null}
    {"do": "retire", "paths": [P, ...]}
    {"do": "record-active", "chain": NAME, "path": P}

Reading tolerates damage: a line whose checksum does not match, that is not a JSON
object, or that lacks its newline (a torn tail) is ignored, and the records around it
still count.  Before the first append the file is rewritten without such lines, so a
torn tail can never swallow a new record; rewriting also drops every finished job
(compaction), and with no job left the file is removed.

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
from ..hostfile import HostIOError, sync_dir
from ..locks import lock_image
from ..source import Source

log = logging.getLogger(__name__)

JOURNAL_NAME = ".chainfs.journal"
# compact a journal with running jobs once it holds this many records it no longer needs
COMPACT_AFTER = 4096

Record = dict[str, Any]
Action = dict[str, Any]


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
    if record.get("r") not in ("intent", "progress", "phase", "end"):
        return None
    return record


# -- actions -------------------------------------------------------------------------------


def set_backing(path: str, backing: str | None, fmt: str | None) -> Action:
    return {"do": "set-backing", "path": path, "backing": backing, "format": fmt}


def retire(paths: list[str]) -> Action:
    return {"do": "retire", "paths": list(paths)}


def record_active(chain: str, path: str) -> Action:
    return {"do": "record-active", "chain": chain, "path": path}


def redo(actions: list[Action], src: Source) -> None:
    """Apply a phase's actions again (each is idempotent), e.g. after a crash.

    Consecutive state-file actions are saved together, in one atomic replace (as a
    pivot makes them), and before the next image is changed.
    """
    unsaved = False
    for action in actions:
        kind = action.get("do")
        if kind == "set-backing":
            if unsaved:
                src.save()
                unsaved = False
            _redo_set_backing(str(action["path"]), action.get("backing"), action.get("format"))
        elif kind == "retire":
            paths = {os.path.abspath(str(p)) for p in action.get("paths", [])}
            if not paths <= src.retired:
                src.retired |= paths
                unsaved = True
        elif kind == "record-active":
            chain, path = str(action["chain"]), os.path.abspath(str(action["path"]))
            others = [n for n, p in src.recorded.items() if p == path and n != chain]
            if src.recorded.get(chain) != path or others or path in src.retired:
                for name in others:  # a scan may have named the new active layer itself
                    del src.recorded[name]
                src.recorded[chain] = path
                src.retired.discard(path)
                unsaved = True
        else:
            raise ChainfsError(f"the journal asks for an unknown action {kind!r}")
    if unsaved:
        src.save()


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
        out = [intent]
        if self.phase is not None:
            out.append(
                {"r": "phase", "key": self.key, "phase": self.phase, "actions": self.actions}
            )
        return out


# -- the journal ---------------------------------------------------------------------------


class Journal:
    """The journal of one source directory."""

    def __init__(self, directory: str, *, writable: bool = True) -> None:
        self.directory = directory
        self.path = os.path.join(directory, JOURNAL_NAME)
        self.writable = writable
        self.live: dict[str, Pending] = {}
        self.ignored = 0  # damaged lines found when the journal was read
        self._fd = -1
        self._records = 0  # records in the file now
        self._clean = True  # the file holds nothing but valid records

    @classmethod
    def load(cls, directory: str, *, writable: bool = True) -> Journal:
        """Read the journal of ``directory`` (an absent file is an empty journal)."""
        journal = cls(directory, writable=writable)
        try:
            with open(journal.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return journal
        except OSError as e:
            raise ChainfsError(f"cannot read the journal {journal.path!r}: {e.strerror}") from None
        records, journal.ignored = decode(data)
        if journal.ignored:
            log.warning(
                "journal=%s ignored=%d damaged or torn records", journal.path, journal.ignored
            )
        journal._records = len(records)
        journal._clean = not journal.ignored
        for record in records:
            key = record["key"]
            if record["r"] == "intent":
                pending = Pending.from_intent(record)
                if pending is not None:
                    journal.live[key] = pending
                    if pending.resumes is not None:
                        # its end may not have made it to the disk: this job replaces it
                        journal.live.pop(pending.resumes, None)
            elif record["r"] == "end":
                journal.live.pop(key, None)
            elif key in journal.live:
                journal.live[key].apply(record)
        return journal

    def pending(self) -> list[Pending]:
        """Jobs begun and not ended, in the order they began."""
        return list(self.live.values())

    # -- writing ---------------------------------------------------------------------------

    def _append(self, record: Record, *, sync: bool) -> None:
        if not self.writable:
            raise ChainfsError(f"the journal {self.path!r} is read-only")
        if not self._clean or self._records > len(self.live) + COMPACT_AFTER:
            self.compact()
        line = encode(record)
        try:
            created = False
            if self._fd < 0:
                self._fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
                created = os.fstat(self._fd).st_size == 0
            n = os.write(self._fd, line)
            if n != len(line):
                # a short append (the disk filled up): what was written is a torn tail
                raise OSError(errno.ENOSPC, "short write to the journal")
            if sync or created:
                os.fdatasync(self._fd)
            if created:
                sync_dir(self.directory)  # the file itself must survive a power loss
        except OSError as e:
            self._clean = False
            raise HostIOError(
                f"writing the journal {self.path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
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
        from its checkpoint and takes its place.
        """
        pending = Pending(secrets.token_hex(8), job_id, job_type, chain, params)
        if resumes is not None:
            pending.offset = resumes.offset
            pending.previous, pending.resumes = resumes.id, resumes.key
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

    def end(self, key: str, how: str) -> None:
        """The job ``key`` is over; with no job left the journal is compacted away."""
        self._append({"r": "end", "key": key, "how": how}, sync=True)
        self.live.pop(key, None)
        if not self.live:
            try:
                self.compact()
            except HostIOError as e:  # the end is recorded; the next end compacts
                log.warning("journal=%s cannot be compacted: %s", self.path, e)

    def compact(self) -> None:
        """Rewrite the file with only what the running jobs need (none: remove it)."""
        if not self.writable:
            return
        self.close()
        try:
            if not self.live:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                tmp = self.path + ".tmp"
                data = b"".join(encode(r) for p in self.live.values() for r in p.records())
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            sync_dir(self.directory)
        except OSError as e:
            raise HostIOError(
                f"compacting the journal {self.path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
        self._records = sum(len(p.records()) for p in self.live.values())
        self._clean = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
