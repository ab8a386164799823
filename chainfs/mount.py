"""Bring-up and clean shutdown of a mount.

``serve`` opens the source's chains (a broken chain is left out, with its reason in
``control/.status`` and the log), mounts with pyfuse3, reports readiness, and runs the
trio loop: the FUSE workers, the jobs, a signal watcher (SIGTERM/SIGINT/SIGHUP end the
mount cleanly) and a periodic metadata write-back.  When the loop ends, for whatever
reason, running jobs are stopped (their chains unchanged), every image is flushed and
closed clean, and the mountpoint is released.
"""

from __future__ import annotations

import itertools
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
from .chain import Chain
from .disk import Disk
from .errors import ChainfsError
from .fs import Operations
from .source import Refused

log = logging.getLogger(__name__)

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
) -> list[Disk]:
    counter = itertools.count(1)

    def next_id(kind: str) -> str:
        return f"{kind}-{next(counter)}"

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
        disks.append(
            Disk(
                spec.name,
                chain,
                src,
                allowed_dirs=[*own, *opts.allow_dirs],
                readonly=opts.readonly,
                spawn=spawn,
                next_id=next_id,
            )
        )
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
    src = sources.load(source_path)
    if not opts.readonly:
        src.save()
    nursery_box: list[trio.Nursery] = []

    def spawn(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        nursery_box[0].start_soon(fn)

    disks = open_disks(src, opts, spawn)
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
        trio.run(_main, disks, nursery_box)
    finally:
        notify("STOPPING=1")
        for disk in disks:
            try:
                disk.close()
            except Exception:
                log.exception("chain=%s did not close cleanly", disk.name)
        pyfuse3.close(unmount=True)
        log.info("unmounted mountpoint=%s", mountpoint)


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


async def _main(disks: list[Disk], nursery_box: list[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        nursery_box.append(nursery)
        nursery.start_soon(_watch_signals)
        nursery.start_soon(_write_back, disks)
        try:
            await pyfuse3.main()
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
    """Bound what a crash can lose even when nobody calls fsync."""
    flushed: dict[str, int] = {}
    while True:
        await trio.sleep(WRITE_BACK_INTERVAL)
        for disk in disks:
            if disk.chain.writable and flushed.get(disk.name) != disk.mtime_ns:
                flushed[disk.name] = disk.mtime_ns
                try:
                    disk.chain.flush()
                except ChainfsError as e:
                    log.warning("chain=%s write-back failed: %s", disk.name, e)
