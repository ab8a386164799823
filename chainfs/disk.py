"""A served chain: its flat disk, its control files' contents, its jobs and events.

This is what the filesystem layer talks to for one chain.  It knows nothing of FUSE:
commands arrive as bytes written to a control file and either start something or raise
``CommandError`` with the SPEC's errno; the reason is also logged and appended to
``events`` as ``COMMAND_REJECTED``.  Each command belongs to its job module
(``jobs/snapshot``, ``stream``, ``commit``, ``copy``), which sees a ``Disk`` only as the
``jobs.served.Served`` protocol: this module dispatches, and serves what the control
files show.

Locking contract: used only from the trio thread.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from .chain import Chain
from .control import (
    HOST_VERBS,
    BackupCmd,
    BitmapCmd,
    CancelCmd,
    ChangeCmd,
    CommandError,
    CommitCmd,
    CompleteCmd,
    CopyCmd,
    HostCmd,
    PauseCmd,
    ResumeCmd,
    SnapshotCmd,
    SpeedCmd,
    StreamCmd,
    format_line,
    parse_command,
)
from .errors import ChainfsError, ReadOnlyError
from .eventlog import EventLog
from .hostfile import HostIOError, read_meta
from .jobs import backup, commit, copy, snapshot, stream
from .jobs.base import CONCLUDED, Job
from .jobs.journal import Journal, Pending, decode, map_paths
from .jobs.served import Readers, Spawn, Watched
from .locks import lock_image, unlock_image
from .ownership import (
    STATE_SUFFIX,
    chain_file,
    judge_owner,
)
from .source import SLOT, Source, read_slots
from .views import Views

log = logging.getLogger(__name__)

CLOCK_REALTIME_COARSE = 5  # <linux/time.h>; Python's time module does not name it


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return time.time_ns()


Waiting = Coroutine[Any, Any, None]


def _interrupted_line(p: Pending) -> list[tuple[str, object]]:
    """A job an unmount or a crash interrupted, as a read-only mount shows it: it
    waits for a read-write mount, which resumes it from ``offset``."""
    speed = p.params.get("speed")
    return [
        ("id", p.id),
        ("type", p.type),
        ("status", "interrupted"),
        ("offset", p.offset),
        ("speed", speed if isinstance(speed, int) else 0),
        ("waits-for", "a read-write mount"),
        *([("paused", "true")] if p.paused else []),
    ]


def _elsewhere_line(p: Pending, holder: str | None) -> list[tuple[str, object]]:
    """The owner's job on a chain another host owns, as its journal says: running there
    (``holder``: who owns the chain), or, the chain released with the job unfinished (a
    hand-over not yet taken, or its owner unmounted), waiting for the next owner, who
    resumes it.  ``offset`` is its last durable checkpoint."""
    speed = p.params.get("speed")
    where = [("owner", holder)] if holder else [("waits-for", "activate or adopt")]
    return [
        ("id", p.id),
        ("type", p.type),
        ("status", "running-elsewhere" if holder else "interrupted"),
        ("offset", p.offset),
        ("speed", speed if isinstance(speed, int) else 0),
        *where,
        *([("paused", "true")] if p.paused else []),
    ]


@dataclass
class Writer:
    """What the writes through one open control file said: together, one command."""

    text: bytes = b""  # the writes carried out so far, joined as one line
    job: str | None = None  # the job the command started
    refused: bool = False  # a write was refused: the command is over


# what ``control/.status`` shows of a chain besides its name: whoever sets one of these
# (after ``__init__``) calls ``shown_changed`` (the mount keeps each chain's line until
# then); ``tests/unit/test_lookups.py`` checks that this module and ``mount.py`` do
SHOWN_IN_STATUS = frozenset({"chain", "owned", "fenced", "suspended", "warning"})


def _unwatched(disk: Disk) -> None:
    return None


class Disk(Watched):
    """One chain as the mount serves it."""

    def __init__(
        self,
        name: str,
        chain: Chain,
        source: Source,
        *,
        allowed_dirs: list[str],
        readonly: bool,
        spawn: Spawn,
        next_id: Callable[[str], str] | None = None,
        readers: Readers | None = None,
        events: EventLog | None = None,
    ) -> None:
        # told when the chain's line of ``.status`` changes (a field of
        # ``SHOWN_IN_STATUS`` set: ``shown_changed``; the chain's layers changed:
        # ``status_changed``); the mount's ``Operations`` sets it
        self.on_status: Callable[[Disk], None] = _unwatched
        self.name = name
        self.chain = chain
        self.source = source
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]
        self.readonly = readonly
        # why the chain is served other than asked (a chain deeper than the cap: read-only)
        self.warning: str | None = None
        self.job: Job | None = None
        self.journal: Journal | None = None  # set by the mount when it may write
        # a read-only mount's interrupted jobs: shown in jobs, resumed by a read-write mount
        self.interrupted: list[Pending] = []
        # the chain's events (with their history on disk, as the mount opens them) and
        # job ids; jobs write events through the log itself
        self.events = events if events is not None else EventLog(chain=name)
        self.emit = self.events.emit
        self.spawn = spawn
        self.next_id = next_id if next_id is not None else self.events.next_id
        # the mount's chains by the layers they read (``refuse_shared``), this one among them
        self.readers = readers if readers is not None else Readers()
        self.readers.add(self)
        # many hosts (``ownership``): whether this mount owns the chain (serves it
        # read-write); who does when another mount does; why it was lost (fenced)
        self.owned = not readonly
        self.holder: str | None = None
        self.fenced: str | None = None
        # why ownership cannot be told now (the owner file's heartbeat is blocked or
        # failing, not refused): nothing is acknowledged until it is written again
        self.suspended: str | None = None
        self.fencing = False  # shared storage: an EIO may be a lost lock (``check_owner``)
        # adopt, inactivate, activate: carried out by the mount (``hosts``); what it
        # returns is the rest of the command, for the write to wait for (a hand-over
        # stopping the running job at its checkpoint)
        self.hosts: Callable[[Disk, HostCmd], Waiting | None] | None = None
        self.views = Views(name, chain)  # layers/NAME/: every layer as a read-only disk
        # a chain served read-only for another host's writes (``revalidate``): what was
        # last seen of it, the flat-file handles reading it here (while any is open the
        # backing layers hold QEMU's reader locks), and the owner's unfinished job
        self.seen: Seen | None = None
        self.handles = 0
        # a take-over of the chain is under way (``mount.Hosts.take``): its reader locks
        # are the take-over's to change, and the chain is not revalidated meanwhile
        self.taking = False
        self.unstable: str | None = None
        self.elsewhere: Pending | None = None  # that job, as the owner's journal says
        # the flat file's times start as those of the newest image file: they stay the
        # same from one mount to the next as long as nothing is written
        self.mtime_ns = self.ctime_ns = max(_mtime_ns(x.path) for x in chain.layers)

    # -- what the control files show ------------------------------------------------------

    @property
    def writable_here(self) -> bool:
        return self.owned and self.fenced is None and not self.readonly

    def owner_pairs(self) -> list[tuple[str, object]]:
        """Who owns the chain, as ``chain`` and ``.status`` show it."""
        if self.fenced is not None:
            return [("owner", "lost"), ("reason", self.fenced)]
        if self.owned and self.suspended is not None:
            return [("owner", "suspended"), ("reason", self.suspended)]
        if self.owned:
            return [("owner", "self")]
        # judged by the owner file's content: a lock test would make an NFS server
        # expire a cut-off owner's locks (``judge_owner``)
        self.holder = judge_owner(self.source.directory, self.name)
        if self.holder is not None:
            unstable = [("unstable", self.unstable)] if self.unstable else []
            return [("owner", "elsewhere"), ("holder", self.holder), *unstable]
        return [("owner", "none")]

    def check_writable(self) -> None:
        """Raise what a write to the flat file gets when this mount may not write."""
        if self.fenced is not None:
            raise HostIOError(f"lost ownership of {self.name}: {self.fenced}", errno.EIO)
        if self.suspended is not None:
            self.recheck()
        if self.fenced is not None:
            raise HostIOError(f"lost ownership of {self.name}: {self.fenced}", errno.EIO)
        if self.suspended is not None:
            raise HostIOError(f"ownership of {self.name} suspended: {self.suspended}", errno.EIO)
        if not self.owned and not self.readonly:
            holder = self.holder or "nobody (activate or adopt it)"
            raise ReadOnlyError(f"chain {self.name!r} is served read-only: owned by {holder}")

    def check_owner(self, e: ChainfsError) -> None:
        """After an error writing a locked file: an EIO may mean the lock is lost (the
        storage took it away); if the owner file is refused too (EIO), fence; if it
        fails otherwise, suspend (whether the lock is held cannot be told)."""
        if e.errno != errno.EIO or not self.fencing or not self.owned or self.fenced:
            return
        ownership = self.source.owned.get(self.name)
        if ownership is None:
            return
        try:
            ownership.heartbeat()
        except OSError as err:
            reason = f"{e}; the owner file cannot be written either: {err.strerror}"
            if err.errno == errno.EIO:
                self.fence(reason)
            else:
                self.suspend(reason)

    def recheck(self) -> None:
        """While suspended, before a guest request: write the heartbeat now (waiting for
        the storage, as the request's own write would): written under the lock, resume;
        refused (EIO), fence; failing otherwise, stay suspended."""
        ownership = self.source.owned.get(self.name)
        if ownership is None or self.fenced is not None:
            return
        try:
            ownership.heartbeat()
        except OSError as err:
            reason = f"the owner file cannot be written: {err.strerror or err}"
            if err.errno == errno.EIO:
                self.fence(reason)
            return
        self.resume()

    def suspend(self, reason: str) -> None:
        """Ownership cannot be told (the owner file's heartbeat is blocked or failing,
        but not refused): until a heartbeat is written again under the lock, no guest
        write or fsync is acknowledged (``recheck`` first) and the job waits at its next
        checkpoint."""
        if self.suspended is not None or self.fenced is not None or not self.owned:
            return
        # every guest write through chainfs from the very next one (``check_writable``),
        # also while the map's release waits for the chain's lock (a job step holds it)
        self.chain.revoke_writes()
        self.suspended = reason
        self.chain.release_read_map()  # until resumed, every read through chainfs
        self.shown_changed()
        log.warning("ownership of %s suspended: %s", self.name, reason)
        self.emit("OWNERSHIP_SUSPENDED", reason=reason)
        job = self.job
        if job is not None and job.status != CONCLUDED:
            job.hold = trio.Event()

    def resume(self) -> None:
        """A heartbeat was written under the lock again: the storage kept this mount's
        locks (nobody took them), so serving goes on with nothing lost."""
        if self.suspended is None or self.fenced is not None:
            return
        self.suspended = None
        self.shown_changed()
        self._release_job()
        log.info("ownership of %s resumed: the owner file is written again", self.name)
        self.emit("OWNERSHIP_RESUMED")

    def _release_job(self) -> None:
        hold = self.job.hold if self.job is not None else None
        if hold is not None:
            hold.set()

    def fence(self, reason: str) -> None:
        """Ownership is lost: from now on nothing is written (the guest gets EIO, the
        job stops, no file is touched); chainfs never takes the chain again by itself."""
        if self.fenced is not None:
            return
        self.chain.revoke_writes()  # (as in ``suspend``)
        self.fenced = reason
        self.suspended = None
        self.chain.release_read_map()  # another host may write the layers from now on
        self.shown_changed()
        self._release_job()  # a job held by a suspension goes on to stop
        ownership = self.source.owned.get(self.name)
        if ownership is not None:
            ownership.fence(reason)
        self.chain.writable = False  # no periodic write-back either
        self.events.writable = False  # the history on disk belongs to the next owner
        log.error("lost ownership of %s: %s", self.name, reason)
        self.emit("OWNERSHIP_LOST", reason=reason)
        job = self.job
        if job is not None and job.status != CONCLUDED:
            job.journal = None  # it stops where it is: the next owner's journal says where
            job.suspend()

    def chain_text(self) -> bytes:
        lines = []
        layers = self.chain.layers
        for i, layer in enumerate(layers):
            if i == 0:
                role = "active"
            elif i == len(layers) - 1:
                role = "base"
            else:
                role = "backing"
            lines.append(
                format_line(
                    [
                        ("name", os.path.basename(layer.path)),
                        ("path", layer.path),
                        ("format", layer.format_name),
                        ("virtual-size", layer.virtual_size),
                        ("allocated", layer.allocated_bytes()),
                        ("role", role),
                        *self.owner_pairs(),
                    ]
                )
            )
        return ("\n".join(lines) + "\n").encode()

    def jobs_text(self) -> bytes:
        job = self.job
        if job is None or job.status == CONCLUDED:
            lines = [_interrupted_line(p) for p in self.interrupted]
            if self.elsewhere is not None and not self.owned and self.fenced is None:
                self.holder = judge_owner(self.source.directory, self.name)
                lines.append(_elsewhere_line(self.elsewhere, self.holder))
            return b"".join((format_line(line) + "\n").encode() for line in lines)
        return (format_line(job.line()) + "\n").encode()

    # -- a chain another host writes ---------------------------------------------------------

    def open_reader(self) -> None:
        """A flat-file handle opened while another host owns the chain: the first one
        takes QEMU's reader locks on the backing layers (``lock_readers``)."""
        self.handles += 1
        if self.handles == 1 and not self.owned and not self.chain.locked and not self.taking:
            lock_readers(self.name, self.chain)

    def close_reader(self) -> None:
        self.handles -= 1
        if self.handles == 0 and not self.owned and not self.chain.locked and not self.taking:
            unlock_readers(self.chain)

    def probe(self) -> Seen:
        """What the chain looks like now on the storage (blocking: call from a thread)."""
        return Seen.of(self.source.directory, self.name, self.chain.active.path)

    def replace_chain(self, chain: Chain) -> Chain:
        """Serve ``chain`` instead of the chain served (the same disk, its layers opened
        again: a take-over, a hand-over, a revalidation), which is returned for the
        caller to close: pyfuse3 answers nothing from it any more.  The layer views read
        through ``chain`` from now on, and follow what its layers are."""
        old = self.chain
        old.release_read_map()
        self.chain = chain
        self.views.chain = chain
        self.views.refresh()
        self.shown_changed()
        return old

    def revalidate(self, seen: Seen, fresh: Chain | None) -> bool:
        """After ``probe`` (and, when it changed, ``fresh``: the chain reopened from the
        owner's record): serve the fresh chain, dropping every cached byte of the old
        one; True if the chain was replaced.  A chain taken over meanwhile is left
        alone."""
        self.unstable, self.elsewhere = seen.unstable, seen.job
        if self.owned or self.chain.locked or self.taking or fresh is None:
            if fresh is not None:
                fresh.close()
            return False
        if self.handles:
            lock_readers(self.name, fresh)
        fresh.confine = self.chain.confine
        old = self.replace_chain(fresh)
        self.seen = seen
        self.mtime_ns = self.ctime_ns = max(self.mtime_ns, seen.mtime_ns)
        old.close()  # (read-only: nothing to write)
        log.debug("chain=%s revalidated: generation=%d", self.name, seen.generation)
        return True

    # -- the flat disk ----------------------------------------------------------------------

    @property
    def mtime_ns(self) -> int:
        """The flat file's mtime: the last write through chainfs (``touch``), or the
        last pyfuse3 answered itself (``fastread``), whichever is later."""
        return max(self._mtime_ns, self.chain.written_ns())

    @mtime_ns.setter
    def mtime_ns(self, value: int) -> None:
        self._mtime_ns = value

    @property
    def ctime_ns(self) -> int:
        return max(self._ctime_ns, self.chain.written_ns())

    @ctime_ns.setter
    def ctime_ns(self, value: int) -> None:
        self._ctime_ns = value

    def touch(self) -> None:
        # The kernel stamps the image files from the coarse clock, which lags time_ns() by
        # up to a tick; the flat file's times come from the images' after a remount, so
        # they are taken from the same clock to never go backwards.
        self.mtime_ns = self.ctime_ns = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)

    # -- commands ---------------------------------------------------------------------------

    def command(self, kind: str, data: bytes, writer: Writer | None = None) -> Waiting | None:
        """Carry out one control-file write; raise CommandError if it is refused.
        What it returns (an ``inactivate`` of a chain with a running job) is the rest of
        the command, which the write awaits: it may be refused too.

        ``writer`` holds what earlier writes through the same open file said: this
        write continues their command (``_continue``) instead of being one of its own.
        """
        w = writer if writer is not None else Writer()
        try:
            if self.readonly:
                raise CommandError(
                    errno.EROFS,
                    f"chain {self.name!r} is {self.warning}"
                    if self.warning
                    else "the mount is read-only",
                )
            if kind in HOST_VERBS:
                cmd = parse_command(kind, data)
                assert isinstance(cmd, HostCmd)
                if cmd.chain != self.name:
                    raise CommandError(
                        errno.EINVAL,
                        f"{kind} names chain {cmd.chain!r}; write this chain's name "
                        f"({self.name}) to {kind} it",
                    )
                if self.hosts is None:
                    raise CommandError(errno.EOPNOTSUPP, f"{kind} is not available here")
                rest = self.hosts(self, cmd)
                w.text = data
                return None if rest is None else self._rest(kind, rest)
            if self.fenced is not None:
                raise CommandError(errno.EIO, f"lost ownership of {self.name}: {self.fenced}")
            if self.suspended is not None:
                raise CommandError(
                    errno.EIO, f"ownership of {self.name} suspended: {self.suspended}"
                )
            if not self.owned:
                holder = self.holder or "nobody (activate or adopt it)"
                raise CommandError(
                    errno.EROFS, f"chain {self.name!r} is served read-only: owned by {holder}"
                )
            if w.refused:
                raise CommandError(
                    errno.EINVAL,
                    "an earlier write through this open file was refused, and this one "
                    "would continue its command; open the file again to write a new one",
                )
            if w.text:
                self._continue(kind, w, data)
                return None
            cmd = parse_command(kind, data)
            if isinstance(cmd, SnapshotCmd):
                snapshot.take(self, cmd)
            elif isinstance(cmd, StreamCmd):
                stream.start(self, cmd)
            elif isinstance(cmd, CommitCmd):
                commit.start(self, cmd)
            elif isinstance(cmd, CopyCmd):
                copy.start(self, cmd)
            elif isinstance(cmd, BackupCmd):
                backup.start(self, cmd)
            elif isinstance(cmd, CancelCmd):
                self._find_job(cmd.job).user_cancel()
            elif isinstance(cmd, CompleteCmd):
                self._find_job(cmd.job).user_complete()
            elif isinstance(cmd, SpeedCmd):
                self._find_job(cmd.job).set_speed(cmd.speed)
            elif isinstance(cmd, PauseCmd):
                self._find_job(cmd.job).user_pause()
            elif isinstance(cmd, ResumeCmd):
                self._find_job(cmd.job).user_resume()
            elif isinstance(cmd, ChangeCmd):
                self._find_job(cmd.job).user_change(cmd.copy_mode)
            elif isinstance(cmd, BitmapCmd):
                self._bitmap(cmd)
            if (
                isinstance(cmd, StreamCmd | CommitCmd | CopyCmd | BackupCmd)
                and self.job is not None
            ):
                w.job = self.job.id
            w.text = data
            return None
        except CommandError as e:
            w.refused = True
            self.emit("COMMAND_REJECTED", command=kind, reason=str(e))
            raise
        except ChainfsError as e:
            w.refused = True
            self.emit("COMMAND_REJECTED", command=kind, reason=str(e))
            raise CommandError(e.errno, str(e)) from e

    async def _rest(self, kind: str, rest: Waiting) -> None:
        """The rest of a command that waits, refused as the command itself is."""
        try:
            await rest
        except ChainfsError as e:
            self.emit("COMMAND_REJECTED", command=kind, reason=str(e))
            if isinstance(e, CommandError):
                raise
            raise CommandError(e.errno, str(e)) from e

    def _bitmap(self, cmd: BitmapCmd) -> None:
        """A ``bitmap`` command on the active layer's persistent dirty bitmaps, durable
        when this returns (QEMU's ``block-dirty-bitmap-*``)."""
        chain = self.chain
        with chain.lock:
            b = chain.dirty_bitmaps()
            name = cmd.names[0]
            if cmd.action == "add":
                b.add(name, cmd.granularity or b.default_granularity, disabled=cmd.disabled)
            elif cmd.action == "remove":
                b.remove(name)
            elif cmd.action == "clear":
                b.clear(name)
            elif cmd.action == "enable":
                b.enable(name)
            elif cmd.action == "disable":
                b.disable(name)
            else:
                b.merge(name, list(cmd.names[1:]))
            chain.active.flush()
        self.emit("BITMAP_CHANGED", action=cmd.action, bitmap=name)

    def bitmaps_text(self) -> bytes:
        """One line per persistent dirty bitmap of the active layer."""
        with self.chain.lock:
            found = getattr(self.chain.active, "bitmaps", None)
            size = self.chain.size
            lines = [
                format_line(
                    [
                        ("name", bm.name),
                        ("granularity", bm.granularity),
                        ("count", bm.count(size)),
                        ("enabled", "yes" if bm.enabled else "no"),
                        ("persistent", "yes"),
                        ("in-use", "yes" if bm.inconsistent else "no"),
                        ("inconsistent", "yes" if bm.inconsistent else "no"),
                    ]
                )
                for bm in (found.list if found is not None else [])
            ]
        return "".join(line + "\n" for line in lines).encode()

    def dirty_text(self) -> bytes:
        """One line per dirty extent of every bitmap: ``bitmap=NAME start=N length=N``."""
        with self.chain.lock:
            found = getattr(self.chain.active, "bitmaps", None)
            size = self.chain.size
            lines = [
                format_line([("bitmap", bm.name), ("start", a), ("length", b - a)])
                for bm in (found.list if found is not None else [])
                for a, b in bm.ranges(size)
            ]
        return "".join(line + "\n" for line in lines).encode()

    def _continue(self, kind: str, w: Writer, data: bytes) -> None:
        """A later write through the open file whose first write was carried out
        (``printf 'base=A.qcow2\\nspeed=1M\\n' > stream``: the shell writes each line on
        its own): the lines are one command.  Nothing new is fine; a new ``speed=``
        applies to the job the command started, as a speed change would; anything else
        would have made a different command, too late to take back: refused."""
        text = w.text.rstrip(b"\r\n") + b" " + data
        first, whole = parse_command(kind, w.text), parse_command(kind, text)
        changed = [
            f.name
            for f in dataclasses.fields(first)
            if getattr(first, f.name) != getattr(whole, f.name)
        ]
        job = w.job
        if (
            changed == ["speed"]
            and job
            and isinstance(whole, StreamCmd | CommitCmd | CopyCmd | BackupCmd)
        ):
            self._find_job(job).set_speed(whole.speed)
            changed = []
        if not changed:
            w.text = text
            return
        raise CommandError(
            errno.EINVAL,
            f"a later write through the same open file changes {', '.join(changed)} of the "
            f"{kind} command carried out at its first write; only speed= can still "
            "change: write a command in one write",
        )

    def _find_job(self, job_id: str) -> Job:
        job = self.job
        if job is None or job.id != job_id or job.status == CONCLUDED:
            raise CommandError(errno.ENOENT, f"no job {job_id!r} on chain {self.name!r}")
        return job

    async def stop_jobs(self) -> None:
        """Stop a running job, for the next mount to resume, and wait for it (unmount)."""
        job = self.job
        if job is not None and job.status != CONCLUDED:
            job.suspend()
            await job.done.wait()

    def close(self) -> None:
        self.views.close()
        self.events.close()
        self.chain.close()


@dataclass(frozen=True)
class Seen:
    """A chain another host writes, as this host last saw it: the owner's state
    record's generation and active layer, that layer's identity, size and times (a
    fresh ``open`` revalidates them on NFS: close-to-open), and the owner's unfinished
    job (``unstable``: what this host serves may change under it)."""

    generation: int
    active: str
    stamp: tuple[int, int, int, int]  # inode, size, mtime, ctime of the active layer
    unstable: str | None = dataclasses.field(compare=False, default=None)
    job: Pending | None = dataclasses.field(compare=False, default=None)

    @property
    def mtime_ns(self) -> int:
        return self.stamp[2]

    @classmethod
    def of(cls, directory: str, chain: str, active: str) -> Seen:
        generation, record = 0, None
        try:
            data = read_meta(chain_file(directory, chain, STATE_SUFFIX), 2 * SLOT)
            generation, record = read_slots(data)
        except OSError:
            pass
        if record is not None and isinstance(record.get("active"), str):
            active = os.path.normpath(os.path.join(directory, str(record["active"])))
        stamp = (0, 0, 0, 0)
        try:
            # O_NONBLOCK: a FIFO planted as the active layer must not block this look
            fd = os.open(active, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            pass
        job = _unfinished(directory, chain)
        unstable = None if job is None else f"the owner's {job.type} job {job.id!r} is not finished"
        return cls(generation, active, stamp, unstable, job)


def _unfinished(directory: str, chain: str) -> Pending | None:
    """The owner's job begun and not ended, as its journal says (whole lines only: the
    owner may be appending one)."""
    journal = Journal(directory, chain, writable=False)
    try:
        data = journal._read()
    except ChainfsError:
        return None
    records, _ = decode(data[: data.rfind(b"\n") + 1])
    for record in records:
        journal._replay(map_paths(record, journal._abs))
    pending = journal.pending()
    return pending[-1] if pending else None


def lock_readers(name: str, chain: Chain) -> None:
    """QEMU's reader locks (as a read-only ``qemu-img`` takes them) on the backing layers
    of a chain another host writes: while they are held, the owner cannot commit into
    a layer this host reads.  A layer the owner writes already (its job commits into
    it) is read unlocked, and the chain is unstable until the job ends.  The active
    layer is never locked (the owner writes it: QEMU's ``-U``)."""
    for layer in chain.layers[1:]:
        try:
            lock_image(layer.file.fd, layer.path, write=False)
        except ChainfsError as e:
            log.info("chain=%s %s read without a reader lock: %s", name, layer.path, e)


def unlock_readers(chain: Chain) -> None:
    for layer in chain.layers[1:]:
        try:
            unlock_image(layer.file.fd)
        except ChainfsError as e:
            log.info("%s: %s", layer.path, e)
