"""Bring-up and clean shutdown of a mount.

``serve`` opens the source's chains (a broken chain is left out, with its reason in
``control/.status`` and the log), mounts with pyfuse3, reports readiness, and runs the
trio loop: the FUSE workers, the jobs, a signal watcher (SIGTERM/SIGINT/SIGHUP end the
mount cleanly) and a periodic metadata write-back.  When the loop ends, for whatever
reason, running jobs are stopped (their chains unchanged), every image is flushed and
closed clean, and the mountpoint is released.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from . import source as sources
from .chain import Chain, resolve_backing
from .control import format_line, quote
from .disk import Disk
from .errors import ChainfsError
from .eventlog import EventLog
from .formats import open_layer
from .formats.qcow2.header import MAGIC
from .fs import Operations
from .jobs.journal import Journal, Pending, record_active, redo, retire, unfinished_overlay
from .logs import Throttle
from .source import Refused

log = logging.getLogger(__name__)
_throttle = Throttle(log)

WRITE_BACK_INTERVAL = 5.0
# fstab/mount(8) options that mean nothing to chainfs itself
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "users", "nofail", "_netdev", "rw"}
PASSED_OPTIONS = {"nodev", "nosuid", "noexec", "exec", "dev", "suid", "noatime", "atime"}


@dataclass
class MountOptions:
    readonly: bool = False
    allow_other: bool = False
    debug: bool = False
    allow_dirs: list[str] = field(default_factory=list)
    fuse: set[str] = field(default_factory=set)


def parse_options(values: list[str]) -> MountOptions:
    """``-o`` values (each a comma-separated list) into options; unknown ones are errors."""
    opts = MountOptions()
    for value in values:
        for opt in filter(None, value.split(",")):
            key, _, arg = opt.partition("=")
            if opt == "ro":
                opts.readonly = True
            elif opt == "allow_other":
                opts.allow_other = True
            elif opt == "debug":
                opts.debug = True
            elif key == "allow_dir":
                if not arg or not os.path.isdir(arg):
                    raise ChainfsError(f"allow_dir={arg}: not a directory")
                opts.allow_dirs.append(os.path.abspath(arg))
            elif opt in IGNORED_OPTIONS or key.startswith("x-") or key == "comment":
                continue
            elif opt in PASSED_OPTIONS:
                opts.fuse.add(opt)
            else:
                raise ChainfsError(f"unknown mount option {opt!r}")
    return opts


def open_disks(
    src: sources.Source,
    opts: MountOptions,
    spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None],
    journal: Journal | None = None,
) -> list[Disk]:
    disks: list[Disk] = []
    for spec in src.chains:
        try:
            chain = Chain.open(spec.active, writable=not opts.readonly)
        except ChainfsError as e:
            log.warning("chain=%s refused: %s", spec.name, e)
            src.refused.append(Refused(spec.name, spec.active, str(e)))
            continue
        # by default files are created beside the chain's images: the source directory,
        # and the active layer's own (a TOML source's chains live anywhere)
        own = [os.path.dirname(spec.active)]
        if os.path.isdir(src.path):
            own.append(src.directory)
        # the chain's events history and job-id counter, kept beside the state file
        events = EventLog.open(src.directory, spec.name, writable=not opts.readonly)
        disks.append(
            Disk(
                spec.name,
                chain,
                src,
                allowed_dirs=[*own, *opts.allow_dirs],
                readonly=opts.readonly,
                spawn=spawn,
                next_id=events.next_id,
                others=lambda: disks,
            )
        )
        disks[-1].events = events
        if not opts.readonly:
            disks[-1].journal = journal
    return disks


def serve(
    source_path: str,
    mountpoint: str,
    opts: MountOptions,
    *,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Mount and serve until unmounted or signalled; raise ChainfsError if that fails."""
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise ChainfsError(f"mountpoint {mountpoint!r} is not a directory")
    _lock_source(source_path, exclusive=not opts.readonly)
    src, recovery = recover(source_path, readonly=opts.readonly)
    if not opts.readonly:
        src.save()
    nursery_box: list[trio.Nursery] = []

    def spawn(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        nursery_box[0].start_soon(fn)

    disks = open_disks(src, opts, spawn, recovery.journal)
    ops = Operations(disks, src, readonly=opts.readonly, mountpoint=mountpoint)
    fuse_opts = set(pyfuse3.default_options) | {"fsname=chainfs", "subtype=chainfs"}
    fuse_opts |= opts.fuse
    if opts.readonly:
        fuse_opts.add("ro")
    if opts.allow_other:
        fuse_opts.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, fuse_opts)
    except RuntimeError as e:
        for disk in disks:
            disk.close()
        raise ChainfsError(f"cannot mount on {mountpoint!r}: {e}") from None
    log.info(
        "mounted source=%s mountpoint=%s chains=%d refused=%d",
        src.path,
        mountpoint,
        len(disks),
        len(src.refused),
    )
    try:
        ready()
        notify("READY=1")
        trio.run(_main, disks, nursery_box, recovery)
    finally:
        notify("STOPPING=1")
        for disk in disks:
            try:
                disk.close()
            except ChainfsError as e:  # the disk under the images failed, say
                log.error("chain=%s did not close cleanly: %s", disk.name, e)
            except Exception:
                log.exception("chain=%s did not close cleanly", disk.name)
        recovery.journal.close()
        pyfuse3.close(unmount=True)
        log.info("unmounted mountpoint=%s", mountpoint)


def _lock_source(source_path: str, *, exclusive: bool) -> None:
    """Hold the source's directory for as long as this process lives.

    Its state file and journal belong to one read-write mount at a time: a second one
    would take the first one's running jobs for interrupted ones and rewrite the files
    under it.  Read-only mounts share the directory with each other only.  (Image locks
    alone would merely refuse the second mount every chain.)
    """
    path = os.path.abspath(source_path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # no such source: loading it says so
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ChainfsError(
            f"the images in {directory!r} are already served by another chainfs mount"
        ) from None
    # the descriptor stays open, and the lock held, until the process ends


def notify(message: str) -> None:
    """Tell systemd (``Type=notify``) about the daemon's state, when it asked to know."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)


async def _main(disks: list[Disk], nursery_box: list[trio.Nursery], recovery: Recovery) -> None:
    async with trio.open_nursery() as nursery:
        nursery_box.append(nursery)
        resume_jobs(disks, recovery)
        nursery.start_soon(_watch_signals)
        nursery.start_soon(_write_back, disks)
        try:
            # one worker task: every handler runs to its end without waiting (the engine
            # is synchronous under the chain's lock), so more workers would only add a
            # lock hand-off and a task switch to every request (a handler that comes to
            # await something slow must raise this again)
            await pyfuse3.main(min_tasks=1, max_tasks=1)
        finally:
            with trio.move_on_after(30, shield=True):
                for disk in disks:
                    await disk.stop_jobs()
            nursery.cancel_scope.cancel()


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal=%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _write_back(disks: list[Disk]) -> None:
    """Bound what a crash can lose even when nobody calls fsync.

    A write-back that failed (a full disk) is tried again every round until it succeeds,
    and said in the log a few times a minute at most.
    """
    flushed: dict[str, int] = {}
    while True:
        await trio.sleep(WRITE_BACK_INTERVAL)
        for disk in disks:
            mtime = disk.mtime_ns
            if disk.chain.writable and flushed.get(disk.name) != mtime:
                try:
                    disk.chain.flush()
                except ChainfsError as e:
                    _throttle.warning(
                        ("write-back", disk.name), "chain=%s write-back failed: %s", disk.name, e
                    )
                else:
                    flushed[disk.name] = mtime


# -- recovery of interrupted jobs ----------------------------------------------------------
#
# At mount, before anything is served, the journal tells which jobs a crash (or an
# unmount) interrupted.  A job whose ``prepare`` had begun is finished from its recorded
# changes before the directory is scanned, so the scan already sees the chain the job was
# heading to; a snapshot is finished or undone the same way.  Every other job is resumed
# once its chain is open, by issuing its command again: the journal hands the new job
# the interrupted one's checkpoint.  A job that cannot be resumed is rolled back (nothing
# of it shows in any chain; what it copied is harmless).  What was done goes to the log
# and to the chain's ``events``.

# the command parameter given as the command's bare word rather than as key=value
_MAIN_PARAM = {"copy": "dest"}


@dataclass
class Recovery:
    """What the journal said at mount, and what is left to do once the chains are open."""

    journal: Journal
    resume: list[Pending] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)

    def report(self, p: Pending, event: str, **fields: object) -> None:
        self.events.append((p.chain, event, {"job": p.id, "type": p.type, **fields}))


def recover(source_path: str, *, readonly: bool) -> tuple[sources.Source, Recovery]:
    """Load the source, finishing what interrupted jobs had begun to change on disk."""
    # the changes go to the state file as it is, not to one a scan added names to (the
    # scan would name a half-made target as a chain of its own)
    state = sources.load_state(source_path)
    journal = Journal.load(state.directory, writable=not readonly)
    rec = Recovery(journal)
    pending = journal.pending()
    if readonly:
        src = sources.load(source_path)
        for p in pending:
            log.warning(
                "chain=%s job=%s type=%s was interrupted; a read-write mount resumes it",
                p.chain,
                p.id,
                p.type,
            )
        _exclude_targets(src, pending)
        return src, rec
    for p in pending:
        try:
            if p.phase is not None:
                rec.report(p, "JOB_RESUMED", phase=p.phase)
                redo(p.actions, state)
                journal.end(p.key, "done")
                rec.report(p, "JOB_COMPLETED", phase=p.phase)
            elif p.type == "snapshot":
                _settle_snapshot(p, state, rec)
                journal.end(p.key, "done")
            else:
                rec.resume.append(p)
        except ChainfsError as e:
            # left in the journal: the next mount tries again
            log.error("chain=%s job=%s cannot be completed: %s", p.chain, p.id, e)
            rec.report(p, "JOB_COMPLETED", error=f"cannot be completed: {e}")
    src = sources.load(source_path)
    _exclude_targets(src, journal.pending())
    journal.compact()
    return src, rec


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


def _settle_snapshot(p: Pending, src: sources.Source, rec: Recovery) -> None:
    """Finish a snapshot whose overlay is complete; remove the torn start of one."""
    target, below = str(p.params.get("target")), str(p.params.get("below"))
    try:
        with open(target, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        rec.report(p, "JOB_ROLLED_BACK", file=target, reason="the overlay was never created")
        return
    except OSError as e:
        raise ChainfsError(f"cannot read {target!r}: {e.strerror}") from None
    if magic == MAGIC:
        layer = open_layer(target, "qcow2", writable=False)
        try:
            string = layer.backing_string
        finally:
            layer.close()
        backing = os.path.normpath(resolve_backing(target, string)) if string else None
        if backing != os.path.normpath(below):
            rec.report(
                p,
                "JOB_ROLLED_BACK",
                file=target,
                reason=f"{target!r} is not an overlay of {below!r}; left alone",
            )
            return
        # the overlay is complete (its header is written last): the snapshot stands
        rec.report(p, "JOB_RESUMED", file=target)
        redo([record_active(p.chain, target)], src)
        rec.report(p, "SNAPSHOT_TAKEN", file=target)
        return
    if unfinished_overlay(target):
        # created by the snapshot (O_EXCL) and interrupted before its header was written
        os.unlink(target)
        reason = "the overlay was interrupted before its header was written; removed"
    else:
        reason = f"{target!r} is not an image chainfs made; left alone"
    rec.report(p, "JOB_ROLLED_BACK", file=target, reason=reason)


def resume_jobs(disks: list[Disk], rec: Recovery) -> None:
    """Report what recovery did, and issue the interrupted jobs' commands again."""
    by_name = {disk.name: disk for disk in disks}
    for chain, event, fields in rec.events:
        disk = by_name.get(chain)
        if disk is not None:
            disk.emit(event, **fields)
        else:
            log.info("chain=%s event=%s %s", chain, event, fields)
    for p in rec.resume:
        disk = by_name.get(p.chain)
        if disk is None:
            log.warning("chain=%s job=%s is not served; it stays in the journal", p.chain, p.id)
            continue
        kind, text = _command_for(p)
        try:
            with rec.journal.resuming(p):
                disk.command(kind, text)
        except ChainfsError as e:
            reason = str(e)
        else:
            if p.key not in rec.journal.live:
                continue  # a new job took its place
            reason = "its command no longer starts the same job"
        _roll_back(disk, p, rec.journal, reason)


def _command_for(p: Pending) -> tuple[str, bytes]:
    """The control-file write that starts ``p`` again."""
    params = dict(p.params)
    main = _MAIN_PARAM.get(p.type)
    words = [quote(params.pop(main))] if main and params.get(main) else []
    pairs = [(k, v) for k, v in params.items() if v is not None]
    if pairs:
        words.append(format_line(pairs))
    return p.type, " ".join(words).encode()


def _roll_back(disk: Disk, p: Pending, journal: Journal, reason: str) -> None:
    """Give up an interrupted job: its chain never changed; its target stays a file."""
    dest = p.params.get("dest")
    try:
        if dest:
            # a partial copy must not be served as a chain of its own later on
            redo([retire([str(dest)])], disk.source)
        journal.end(p.key, "rolled-back")
    except ChainfsError as e:
        log.error("chain=%s job=%s cannot be rolled back: %s", p.chain, p.id, e)
    disk.emit("JOB_ROLLED_BACK", job=p.id, type=p.type, reason=reason)
