"""Bring-up and clean shutdown of a mount.

``serve`` recovers what interrupted jobs left (``jobs.recovery``), opens the source's
chains (a broken chain is left out, with its reason in ``control/.status`` and the
log), mounts with pyfuse3, reports readiness, and runs the trio loop: the FUSE workers,
the jobs, a signal watcher (SIGTERM/SIGINT/SIGHUP end the mount cleanly) and a periodic
metadata write-back.  Each resource pushes its own cleanup on an ``AsyncExitStack``, as
s3ql's mount does; when the loop ends, for whatever reason, running jobs are stopped
(their chains unchanged, for the next mount to resume), every image is flushed and
closed clean, the journal is closed and the mountpoint released, in that order.
"""

from __future__ import annotations

import contextlib
import errno
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

from . import features, sharedfs
from . import source as sources
from .chain import Chain
from .confine import Confinement
from .disk import Disk
from .errors import ChainfsError
from .eventlog import EventLog
from .fs import Operations
from .jobs.journal import Journal
from .jobs.recovery import recover, resume_jobs
from .jobs.served import Spawn
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
    allow_backing: list[str] = field(default_factory=list)
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
            elif key == "allow_backing":
                if not arg or not os.path.exists(arg):
                    raise ChainfsError(f"allow_backing={arg}: no such file or directory")
                opts.allow_backing.append(os.path.abspath(arg))
            elif opt in IGNORED_OPTIONS or key.startswith("x-") or key == "comment":
                continue
            elif opt in PASSED_OPTIONS:
                opts.fuse.add(opt)
            else:
                raise ChainfsError(f"unknown mount option {opt!r}")
    return opts


def _no_nursery(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    raise ChainfsError("no job can start before the mount serves")


def open_disks(
    src: sources.Source,
    opts: MountOptions,
    spawn: Spawn = _no_nursery,
    journal: Journal | None = None,
) -> list[Disk]:
    disks: list[Disk] = []
    for spec in src.chains:
        # the chain's layers must lie in the directories the source gives for it or the
        # options allow, so that no flat file shows an arbitrary host file
        confine = Confinement.of([*spec.homes, *opts.allow_dirs, *opts.allow_backing])
        try:
            chain = Chain.open(spec.active, writable=not opts.readonly, confine=confine)
        except ChainfsError as e:
            log.warning("chain=%s refused: %s", spec.name, e)
            src.refused.append(Refused(spec.name, spec.active, str(e)))
            continue
        # by default files are created beside the chain's images: the source directory,
        # and the active layer's own (a TOML source's chains live anywhere)
        own = [os.path.dirname(spec.active)]
        if os.path.isdir(src.path):
            own.append(src.directory)
        # what snapshot and copy create there joins the chain
        chain.confine = confine.widened(own)
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
                others=lambda: disks,
                events=events,
            )
        )
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
    sharedfs.check_source(source_path, readonly=opts.readonly)
    if is_dead_mount(mountpoint):
        raise ChainfsError(dead_mount_message(mountpoint))
    if not os.path.isdir(mountpoint):
        raise ChainfsError(f"mountpoint {mountpoint!r} is not a directory")
    _lock_source(source_path, exclusive=not opts.readonly)
    trio.run(_serve, source_path, mountpoint, opts, ready)


def is_dead_mount(path: str) -> bool:
    """A FUSE mount whose daemon is gone (``kill -9``): the kernel answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_message(mountpoint: str) -> str:
    return (
        f"{mountpoint!r} is a dead mount (its daemon is gone: transport endpoint is not "
        f"connected); release it with 'chainfs umount --lazy {mountpoint}' (or "
        f"'fusermount3 -u -z {mountpoint}') and mount again"
    )


async def _serve(
    source_path: str, mountpoint: str, opts: MountOptions, ready: Callable[[], None]
) -> None:
    """Bring-up, each resource pushing its own cleanup; shutdown runs them in reverse:
    jobs stopped (for the next mount to resume), the nursery's tasks ended, the chains
    flushed and closed clean, the journal closed, the mountpoint released."""
    src, recovery = recover(source_path, readonly=opts.readonly)
    if not opts.readonly:
        src.save()
    disks: list[Disk] = []
    fuse = _Fuse(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(fuse.close)
        stack.callback(recovery.journal.close)
        stack.callback(_close_disks, disks)
        disks += open_disks(src, opts, journal=recovery.journal)
        for disk in disks:  # (read-only: what waits for a read-write mount)
            disk.interrupted = [p for p in recovery.interrupted if p.chain == disk.name]
        fuse.init(Operations(disks, src, readonly=opts.readonly, mountpoint=mountpoint), opts)
        # from here on jobs run in the nursery; what failed before it opened is raised
        # as it is, not inside an exception group
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.push_async_callback(_stop, disks, nursery)
        for disk in disks:
            disk.spawn = nursery.start_soon
        log.info(
            "mounted source=%s mountpoint=%s chains=%d refused=%d pyfuse3=%s holes=%s",
            src.path,
            mountpoint,
            len(disks),
            len(src.refused),
            features.pyfuse3_version(),
            "on" if features.holes() else "off",
        )
        ready()
        notify("READY=1")
        resume_jobs(disks, recovery)
        nursery.start_soon(_watch_signals)
        nursery.start_soon(_write_back, disks)
        # one worker task: every handler runs to its end without waiting (the engine is
        # synchronous under the chain's lock), so more workers would only add a lock
        # hand-off and a task switch to every request (a handler that comes to await
        # something slow must raise this again)
        await pyfuse3.main(min_tasks=1, max_tasks=1)


class _Fuse:
    """The kernel's side: mounted by ``init``, released by ``close`` (if it was)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self.mounted = False

    def init(self, ops: Operations, opts: MountOptions) -> None:
        fuse_opts = set(pyfuse3.default_options) | {"fsname=chainfs", "subtype=chainfs"}
        fuse_opts |= opts.fuse
        if opts.readonly:
            fuse_opts.add("ro")
        if opts.allow_other:
            fuse_opts.add("allow_other")
        try:
            pyfuse3.init(ops, self.mountpoint, fuse_opts)
        except RuntimeError as e:
            raise ChainfsError(f"cannot mount on {self.mountpoint!r}: {e}") from None
        self.mounted = True

    def close(self) -> None:
        if self.mounted:
            notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            log.info("unmounted mountpoint=%s", self.mountpoint)


async def _stop(disks: list[Disk], nursery: trio.Nursery) -> None:
    """Stop the running jobs, for the next mount to resume, then the nursery's tasks."""
    with trio.move_on_after(30, shield=True):
        for disk in disks:
            await disk.stop_jobs()
    nursery.cancel_scope.cancel()


def _close_disks(disks: list[Disk]) -> None:
    for disk in disks:
        try:
            disk.close()
        except ChainfsError as e:  # the disk under the images failed, say
            log.error("chain=%s did not close cleanly: %s", disk.name, e)
        except Exception:
            log.exception("chain=%s did not close cleanly", disk.name)


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
            try:
                disk.chain.refresh_allocation()  # st_blocks, if anything changed
            except ChainfsError as e:
                _throttle.warning(
                    ("allocation", disk.name), "chain=%s counting data failed: %s", disk.name, e
                )
