"""A served chain: its flat disk, its control files' contents, its jobs and events.

This is what the filesystem layer talks to for one chain.  It knows nothing of FUSE:
commands arrive as bytes written to a control file and either start something or raise
``CommandError`` with the SPEC's errno; the reason is also logged and appended to
``events`` as ``COMMAND_REJECTED``.

Locking contract: used only from the trio thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

from .chain import Chain
from .control import (
    CancelCmd,
    CommandError,
    CommitCmd,
    CompleteCmd,
    CopyCmd,
    PauseCmd,
    ResumeCmd,
    SnapshotCmd,
    SpeedCmd,
    StreamCmd,
    format_line,
    parse_command,
)
from .errors import ChainfsError
from .eventlog import EventLog
from .formats.base import Layer
from .formats.qcow2 import create_overlay
from .jobs.base import CONCLUDED, Job
from .jobs.commit import ActiveCommitJob, CommitJob
from .jobs.copy import CopyJob
from .jobs.journal import Journal
from .jobs.stream import StreamJob
from .source import Source

log = logging.getLogger(__name__)

CLOCK_REALTIME_COARSE = 5  # <linux/time.h>; Python's time module does not name it

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return time.time_ns()


class Disk:
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
        next_id: Callable[[str], str],
        others: Callable[[], Iterable[Disk]] = tuple,
    ) -> None:
        self.name = name
        self.chain = chain
        self.source = source
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]
        self.readonly = readonly
        self.job: Job | None = None
        self.journal: Journal | None = None  # set by the mount when it may write
        self.events = EventLog()  # in memory; the mount gives it its history on disk
        self._spawn = spawn
        self._next_id = next_id
        self._others = others  # the mount's disks (this one among them, or not)
        # the flat file's times start as those of the newest image file: they stay the
        # same from one mount to the next as long as nothing is written
        self.mtime_ns = self.ctime_ns = max(_mtime_ns(x.path) for x in chain.layers)

    # -- what the control files show ------------------------------------------------------

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
                    ]
                )
            )
        return ("\n".join(lines) + "\n").encode()

    def jobs_text(self) -> bytes:
        job = self.job
        if job is None or job.status == CONCLUDED:
            return b""
        return (format_line(job.line()) + "\n").encode()

    def emit(self, event: str, **fields: object) -> None:
        """Append one line to ``events`` (and the log)."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = format_line(
            [("time", stamp), ("event", event), ("chain", self.name), *fields.items()]
        )
        self.events.append(line)
        log.info("%s", line)

    def chain_changed(self) -> None:
        self.emit(
            "CHAIN_CHANGED",
            layers=" <- ".join(os.path.basename(x.path) for x in reversed(self.chain.layers)),
        )

    # -- the flat disk ----------------------------------------------------------------------

    def touch(self) -> None:
        # The kernel stamps the image files from the coarse clock, which lags time_ns() by
        # up to a tick; the flat file's times come from the images' after a remount, so
        # they are taken from the same clock to never go backwards.
        self.mtime_ns = self.ctime_ns = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)

    # -- commands ---------------------------------------------------------------------------

    def command(self, kind: str, data: bytes) -> None:
        """Carry out one control-file write; raise CommandError if it is refused."""
        try:
            if self.readonly:
                raise CommandError(errno.EROFS, "the mount is read-only")
            cmd = parse_command(kind, data)
            if isinstance(cmd, SnapshotCmd):
                self._snapshot(cmd)
            elif isinstance(cmd, StreamCmd):
                self._stream(cmd)
            elif isinstance(cmd, CancelCmd):
                self._cancel(cmd.job)
            elif isinstance(cmd, CompleteCmd):
                self._find_job(cmd.job).user_complete()
            elif isinstance(cmd, SpeedCmd):
                self._find_job(cmd.job).set_speed(cmd.speed)
            elif isinstance(cmd, PauseCmd):
                self._find_job(cmd.job).user_pause()
            elif isinstance(cmd, ResumeCmd):
                self._find_job(cmd.job).user_resume()
            elif isinstance(cmd, CommitCmd):
                self._commit(cmd)
            elif isinstance(cmd, CopyCmd):
                self._copy(cmd)
        except CommandError as e:
            self.emit("COMMAND_REJECTED", command=kind, reason=str(e))
            raise
        except ChainfsError as e:
            self.emit("COMMAND_REJECTED", command=kind, reason=str(e))
            raise CommandError(e.errno, str(e)) from e

    def _busy(self) -> None:
        if self.job is not None and self.job.status != CONCLUDED:
            raise CommandError(
                errno.EBUSY, f"chain {self.name!r} is busy: job {self.job.id!r} is running"
            )

    def _unshared(self, *layers: Layer) -> None:
        """Refuse a job that would write into a layer another chain of the mount reads
        (a shared base): its image lock would refuse the job anyway, as QEMU's does,
        but in words that blame another process."""
        for layer in layers:
            path = os.path.realpath(layer.path)
            for other in self._others():
                if other is not self and any(
                    os.path.realpath(x.path) == path for x in other.chain.layers
                ):
                    raise CommandError(
                        errno.EBUSY,
                        f"{os.path.basename(layer.path)!r} is also a layer of chain "
                        f"{other.name!r}: no job may write into it while another chain "
                        "reads it",
                    )

    def _layer(self, ref: str) -> Layer:
        """A layer named by its file name (as in ``chain``) or its absolute path."""
        layers = self.chain.layers
        if os.path.isabs(ref):
            found = [x for x in layers if x.path == os.path.normpath(ref)]
        else:
            found = [x for x in layers if os.path.basename(x.path) == ref]
        if not found:
            raise CommandError(errno.EINVAL, f"{ref!r} is not a layer of chain {self.name!r}")
        if len(found) > 1:
            raise CommandError(errno.EINVAL, f"{ref!r} names several layers; give a full path")
        return found[0]

    def _find_job(self, job_id: str) -> Job:
        job = self.job
        if job is None or job.id != job_id or job.status == CONCLUDED:
            raise CommandError(errno.ENOENT, f"no job {job_id!r} on chain {self.name!r}")
        return job

    def _cancel(self, job_id: str) -> None:
        self._find_job(job_id).user_cancel()

    def check_target(self, target: str) -> str:
        """Where a new file may go: an allowed directory, not existing yet."""
        if not os.path.isabs(target):
            target = os.path.join(os.path.dirname(self.chain.active.path), target)
        target = os.path.normpath(target)
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise CommandError(errno.ENOENT, f"directory {parent!r} does not exist")
        real_parent = os.path.realpath(parent)
        if not any(real_parent == d or real_parent.startswith(d + "/") for d in self.allowed_dirs):
            raise CommandError(
                errno.EACCES, f"{target!r} is outside the directories chainfs may write to"
            )
        if os.path.lexists(target):
            raise CommandError(errno.EEXIST, f"{target!r} already exists")
        return target

    def _snapshot(self, cmd: SnapshotCmd) -> None:
        self._busy()
        target = self.check_target(cmd.target)
        active = self.chain.active
        if os.path.dirname(target) == os.path.dirname(active.path):
            backing = os.path.basename(active.path)
        else:
            backing = active.path
        # journalled so that the next mount can finish or undo it should chainfs die
        # half-way; a snapshot that fails while chainfs lives is undone here and now
        journal = self.journal
        params = {"target": target, "below": active.path}
        key = journal.begin("snapshot", "snapshot", self.name, params).key if journal else ""
        try:
            self.chain.flush()
            if os.path.lexists(target):  # appeared since check_target: not ours to remove
                raise CommandError(errno.EEXIST, f"{target!r} already exists")
            try:
                create_overlay(
                    target,
                    size=self.chain.size,
                    backing=backing,
                    backing_format=active.format_name,
                )
                self.chain.push_overlay(target)
            except BaseException:
                # a refused command changes nothing: the partial (or unused) overlay
                # create_overlay made (O_EXCL: it is ours) goes
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
                raise
        except BaseException:
            if journal is not None:
                journal.end(key, "rolled-back")
            raise
        self.source.record_active(self.name, target)
        if journal is not None:
            journal.end(key, "done")
        self.emit("SNAPSHOT_TAKEN", file=target)
        self.chain_changed()

    def _stream(self, cmd: StreamCmd) -> None:
        self._busy()
        node = self._layer(cmd.node) if cmd.node else self.chain.active
        if node.format_name != "qcow2":
            raise CommandError(errno.EINVAL, f"cannot stream into {node.path!r}: it is raw")
        base = self._layer(cmd.base) if cmd.base else None
        n = self.chain.index_of(node)
        if base is not None and self.chain.index_of(base) <= n:
            raise CommandError(
                errno.EINVAL,
                f"{os.path.basename(base.path)!r} is not below "
                f"{os.path.basename(node.path)!r} in chain {self.name!r}",
            )
        self._unshared(node)
        job = StreamJob(self._next_id("stream"), self, node, base, speed=cmd.speed, emit=self.emit)
        self.start_job(job)

    def _commit(self, cmd: CommitCmd) -> None:
        """The refusals of qemu-iotests 040, then an intermediate or an active commit."""
        self._busy()
        layers = self.chain.layers
        top = self._layer(cmd.top) if cmd.top else layers[0]
        base = self._layer(cmd.base) if cmd.base else layers[-1]
        t, b = self.chain.index_of(top), self.chain.index_of(base)
        top_name, base_name = os.path.basename(top.path), os.path.basename(base.path)
        if t == b:
            raise CommandError(
                errno.EINVAL,
                f"top and base are both {top_name!r}: a layer cannot commit into itself",
            )
        if b < t:
            raise CommandError(
                errno.EINVAL,
                f"{base_name!r} is not below {top_name!r} in chain {self.name!r} "
                "(top and base swapped?)",
            )
        # the base gets the data; an intermediate commit also rewrites the overlay above top
        self._unshared(base, *([layers[t - 1]] if t > 0 else []))
        job: Job
        if t == 0:
            job = ActiveCommitJob(
                self._next_id("commit"),
                self,
                base,
                speed=cmd.speed,
                wait_ready=cmd.wait_ready,
                emit=self.emit,
            )
        else:
            job = CommitJob(
                self._next_id("commit"), self, top, base, speed=cmd.speed, emit=self.emit
            )
        self.start_job(job)

    def _copy(self, cmd: CopyCmd) -> None:
        self._busy()
        resumed = self.journal.reissuing if self.journal is not None else None
        if (
            resumed is not None
            and resumed.type == "copy"
            and resumed.params.get("dest") == cmd.dest
        ):
            target = cmd.dest  # an interrupted copy's own partial DEST: copied over again
        else:
            target = self.check_target(cmd.dest)
        job = CopyJob(
            self._next_id("copy"),
            self,
            target,
            cmd.sync,
            speed=cmd.speed,
            wait_ready=cmd.wait_ready,
            emit=self.emit,
        )
        self.start_job(job)

    def start_job(self, job: Job) -> None:
        """Journal a new job's intent, then run it in the background."""
        job.attach(self.journal, self.name)
        self.job = job

        async def run() -> None:
            try:
                await job.execute()
            finally:  # before any task waiting for the job runs again
                self.chain.drop_copy_buffers()

        self._spawn(run)

    async def stop_jobs(self) -> None:
        """Stop a running job, for the next mount to resume, and wait for it (unmount)."""
        job = self.job
        if job is not None and job.status != CONCLUDED:
            job.suspend()
            await job.done.wait()

    def close(self) -> None:
        self.events.close()
        self.chain.close()
