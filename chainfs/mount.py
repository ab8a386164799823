"""Bring-up and clean shutdown of a mount.

``serve`` recovers what interrupted jobs left (``jobs.recovery``), opens the source's
chains (a broken chain is left out, with its reason in ``control/.status`` and the
log), mounts with pyfuse3, reports readiness, and runs the trio loop: the FUSE workers,
the jobs, a signal watcher (SIGTERM/SIGINT/SIGHUP end the mount cleanly) and a periodic
metadata write-back.  Each resource pushes its own cleanup on an ``AsyncExitStack``, as
s3ql's mount does; when the loop ends, for whatever reason, running jobs are stopped
(their chains unchanged, for the next mount to resume), every image is flushed and
closed clean, the journals are closed, the chains' locks released and the mountpoint
released, in that order.

Many hosts may mount one source directory (``ownership``): at bring-up this mount takes
the owner lock of every chain nobody else owns and serves those read-write; a chain
another mount owns is served read-only (its layers unlocked, as ``qemu-img -U`` reads,
the flat file 0400, writes EROFS) and shown as owned elsewhere.  ``--adopt CHAIN`` waits
for a dead owner's lock before that.  While serving, the owner file of each owned chain
is rewritten every few seconds (its heartbeat); a heartbeat refused with EIO (the lock
is gone) fences the chain (``Disk.fence``), one that fails otherwise or takes more than
half the storage's lease suspends it until a heartbeat is written again
(``Disk.suspend``, ``Disk.resume``).  ``adopt``,
``inactivate`` and ``activate`` move a chain between mounts while serving (``Hosts``).
A chain served read-only for another host's writes is revalidated as often
(``follow_owner``): reopened, every cached byte dropped, when the owner's state record or
active layer changed (NFS is close-to-open: another host's writes show only to a fresh
open or a lock), and marked unstable while the owner's journal has a job unfinished.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from . import descriptors, fastread, features, leaks, sharedfs
from . import source as sources
from .chain import MAX_DEPTH, Chain
from .confine import Confinement
from .control import CommandError, HostCmd
from .disk import Disk, Waiting, lock_readers, unlock_readers
from .errors import ChainfsError
from .eventlog import EventLog
from .formats.base import Layer
from .formats.qcow2.cache import CACHE, DEFAULT_CACHE_SIZE, parse_size
from .fs import Operations
from .hostfile import HostIOError
from .jobs.base import CONCLUDED, Job
from .jobs.journal import Journal
from .jobs.recovery import Bounds, Recovery, recover, recover_chain, resume_jobs, serve_refused
from .jobs.served import Readers, Spawn
from .logs import Throttle
from .ownership import (
    MOUNT_ID,
    OWNER_SUFFIX,
    OwnedElsewhere,
    Ownership,
    chain_file,
    describe_holder,
    is_locked,
    is_shared,
)
from .source import Refused

log = logging.getLogger(__name__)
_throttle = Throttle(log)

WRITE_BACK_INTERVAL = 5.0
# the periodic sweeps over every chain (write-back, heartbeat) let the guests' requests
# in after this many chains: with thousands of chains a sweep is no stall of its own
SWEEP_STEP = 64
HEARTBEAT_INTERVAL = 5.0  # seconds between two writes of an owned chain's owner file
# after a reply, with no request queued and nothing else to run, the server keeps asking
# the kernel for the next request up to this long (seconds; pyfuse3 adapts the window
# below it, to 0 for a client that pauses longer) before it sleeps (pyfuse3's busy_poll;
# the README's "Queue depth", Busy polling): a client with one request in flight sends
# its next one within microseconds, and waking a sleeping server costs more
BUSY_POLL = 50e-6
LEASE = 90.0  # the storage's lease (NFSv4 servers' default), unless -o lease= says
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
    adopt: list[str] = field(default_factory=list)  # chains to take over at mount
    lease: float = LEASE
    # fence a chain whose lock is lost: on shared storage (NFS, CephFS: found out at
    # mount when not given), where an EIO may mean that; never on a local disk
    shared: bool | None = None
    # the mount's cache of clean qcow2 metadata, every chain's together (bytes)
    cache_size: int = DEFAULT_CACHE_SIZE

    @property
    def adopt_timeout(self) -> float:
        """How long ``adopt`` waits for a dead owner's locks: its lease, the server's
        grace period after a restart (as long, by default) and a little more."""
        return 2 * self.lease + 5


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
            elif opt == "shared":
                opts.shared = True
            elif key == "lease":
                try:
                    opts.lease = float(arg)
                except ValueError:
                    opts.lease = 0.0
                if not 0 < opts.lease <= 3600:
                    raise ChainfsError(f"lease={arg}: not a number of seconds (1 to 3600)")
            elif key == "cache_size":
                try:
                    opts.cache_size = parse_size(arg)
                except ValueError:
                    raise ChainfsError(
                        f"cache_size={arg}: not a size (bytes, or a number with K, M or G)"
                    ) from None
            elif key == "adopt":
                if not arg:
                    raise ChainfsError("adopt= needs a chain name")
                opts.adopt.append(arg)
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
    journals: dict[str, Journal] | None = None,
) -> list[Disk]:
    """Open every chain of the source: read-write those this process owns (``journals``
    gets their journals), read-only (unlocked) those owned elsewhere."""
    journals = journals if journals is not None else {}
    disks: list[Disk] = []
    # descriptors: each chain takes what it needs while a reserve is left for the rest
    budget = descriptors.Budget.now()
    if opts.readonly:  # a chain's layers only: no events log or owner files open
        budget.per_chain = 0
    readers = Readers()  # who reads which layer (``refuse_shared``), shared by the disks

    def refuse(spec: sources.ChainSpec, reason: str) -> None:
        log.warning("chain=%s refused: %s", spec.name, reason)
        src.refused.append(Refused(spec.name, spec.active, reason))

    # the chains of a directory share their directories: each list is resolved once
    # (realpath) rather than once a chain
    confinements: dict[tuple[str, ...], Confinement] = {}

    def confinement(paths: list[str]) -> Confinement:
        key = tuple(paths)
        found = confinements.get(key)
        if found is None:
            found = confinements[key] = Confinement.of(paths)
        return found

    for spec in src.chains:
        if not budget.fits(1):  # no chain fits any more: say what each one would need
            # (before it is owned and opened: each of 7,000 chains past a limit was
            # owned, opened, closed and given up again, a third of a mount's time)
            refuse(spec, budget.refusal(descriptors.count_layers(spec.active)))
            continue
        # the chain's layers must lie in the directories the source gives for it or the
        # options allow, so that no flat file shows an arbitrary host file
        confine = confinement([*spec.homes, *opts.allow_dirs, *opts.allow_backing])
        if not opts.readonly and not src.owns(spec.name):
            try:
                own_chain(src, spec.name)
            except HostIOError as e:  # EMFILE, say: the chain cannot be served here
                refuse(spec, str(e))
                continue
        owned = not opts.readonly and src.owns(spec.name)
        elsewhere = not owned and is_locked(chain_file(src.directory, spec.name, OWNER_SUFFIX))
        try:
            chain = Chain.open(
                spec.active,
                writable=owned,
                # another host writes the chain: its layers are read as qemu-img -U does
                lock=not elsewhere,
                confine=confine,
                deep_read_only=True,
            )
        except ChainfsError as e:
            if owned:
                src.disown(spec.name)
            emfile = getattr(e, "errno", None) == errno.EMFILE
            refuse(
                spec, budget.refusal(descriptors.count_layers(spec.active)) if emfile else str(e)
            )
            continue
        if not budget.take(len(chain.layers)):
            _close_unserved(chain, spec.name)
            if owned:
                src.disown(spec.name)
            refuse(spec, budget.refusal(len(chain.layers)))
            continue
        # by default files are created beside the chain's images: the source directory,
        # and the active layer's own (a TOML source's chains live anywhere)
        own = [os.path.dirname(spec.active)]
        if os.path.isdir(src.path):
            own.append(src.directory)
        # what snapshot and copy create there joins the chain
        chain.confine = confinement([*confine.roots, *own])
        # the chain's events history and job-id counter, kept beside the state file
        events = EventLog.open(src.directory, spec.name, writable=owned)
        disk = Disk(
            spec.name,
            chain,
            src,
            allowed_dirs=[*own, *opts.allow_dirs],
            readonly=opts.readonly,
            spawn=spawn,
            readers=readers,
            events=events,
        )
        disk.owned = owned
        if owned and src.owned[spec.name].unclean:
            _repair_leaks(disk, src.owned[spec.name])
        disk.shown_changed()
        disk.fencing = bool(opts.shared)
        disk.holder = src.elsewhere.get(spec.name)
        disks.append(disk)
        if owned:
            journal = journals.get(spec.name)
            if journal is None:
                journal = Journal.load(src.directory, spec.name, ownership=src.owned[spec.name])
                journals[spec.name] = journal
            disk.journal = journal
        if chain.too_deep:  # served, read-only, never dropped
            disks[-1].readonly = True
            disks[-1].warning = (
                f"served read-only: {len(chain.layers)} layers, deeper than the cap of "
                f"{MAX_DEPTH}; stream or commit it with qemu-img to serve it read-write"
            )
            disks[-1].shown_changed()
            log.warning("chain=%s %s", spec.name, disks[-1].warning)
    budget.report()
    return disks


def _repair_leaks(disk: Disk, ownership: Ownership) -> None:
    """The chain's previous owner stopped uncleanly: repair the leaked clusters of every
    layer open writable now, and of each one a resumed job reopens writable (once)."""
    name = disk.name
    log.info("chain=%s its previous owner did not release it: checking for leaks", name)
    done = leaks.repair_writable(name, disk.chain.layers, disk.emit)
    ownership.unclean = False  # (a chain given up unchecked leaves it to the next owner)
    _repair_reopened(disk, done)


def _repair_reopened(disk: Disk, done: set[str]) -> None:
    """Repair the leaks of each layer of ``disk`` a resumed job reopens writable (once;
    ``done``: the layers checked already)."""

    def reopened(layer: Layer) -> None:
        if layer.path not in done:
            done.add(layer.path)
            leaks.repair_layer(disk.name, layer, disk.emit)

    disk.chain.on_writable = reopened


def _close_unserved(chain: Chain, name: str) -> None:
    """Close a chain that will not be served after all (it wrote nothing), or that is
    served no longer (a take-over's read-only one)."""
    try:
        chain.close()
    except ChainfsError as e:
        log.error("chain=%s did not close cleanly: %s", name, e)


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
    descriptors.raise_limit()  # a deep chain holds one per layer, every chain a few
    if is_dead_mount(mountpoint):
        raise ChainfsError(dead_mount_message(mountpoint))
    if not os.path.isdir(mountpoint):
        raise ChainfsError(f"mountpoint {mountpoint!r} is not a directory")
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
    CACHE.resize(opts.cache_size)
    owned: dict[str, Ownership] = {}
    if opts.shared is None:
        opts.shared = is_shared(_directory_of(source_path))
    Ownership.shared_storage = bool(opts.shared)  # (before any lock is taken)
    try:
        if opts.adopt and not opts.readonly:
            directory = _directory_of(source_path)
            await wait_for_owners(directory, opts.adopt, opts.adopt_timeout, owned)
        src, recovery = recover(
            source_path,
            readonly=opts.readonly,
            owned=owned,
            allow_dirs=opts.allow_dirs,
            allow_backing=opts.allow_backing,
        )
    except BaseException:
        _release(owned)
        raise
    disks: list[Disk] = []
    fuse = _Fuse(mountpoint)
    failed: list[ChainfsError] = []  # the mount never answered (``_announce``)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(fuse.close)
        stack.callback(_release, src.owned)
        stack.callback(recovery.close)
        stack.callback(_close_disks, disks)
        counter = Counter()  # st_blocks of big disks, in a worker thread
        Chain.background = counter.want
        stack.callback(setattr, Chain, "background", None)
        disks += open_disks(src, opts, journals=recovery.journals)  # (owning them)
        serve_refused(disks, recovery)
        if not opts.readonly:
            src.save()
            src.finish_migration()
        for disk in disks:  # (read-only: what waits for a read-write mount)
            disk.interrupted = [p for p in recovery.interrupted if p.chain == disk.name]
        ops = Operations(disks, src, readonly=opts.readonly, mountpoint=mountpoint)
        fuse.init(ops, opts)
        # from here on jobs run in the nursery; what failed before it opened is raised
        # as it is, not inside an exception group
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.push_async_callback(_stop, disks, nursery)
        hosts = Hosts(src, opts, disks, recovery, nursery, ops.forget_cache)
        for disk in disks:
            disk.spawn = nursery.start_soon
            disk.hosts = hosts
        log.info(
            "mounted source=%s mountpoint=%s chains=%d refused=%d pyfuse3=%s holes=%s",
            src.path,
            mountpoint,
            len(disks),
            len(src.refused),
            features.pyfuse3_version(),
            "on" if features.holes() else "off",
        )
        nursery.start_soon(_announce, mountpoint, ready, failed)
        resume_jobs(disks, recovery)
        nursery.start_soon(_watch_signals)
        nursery.start_soon(_write_back, disks)
        nursery.start_soon(counter.run)
        nursery.start_soon(_follow_owners, disks, ops.forget_cache, hosts.adopting)
        if not opts.readonly:
            nursery.start_soon(_heartbeat, disks, src, opts.lease)
        # one worker task: every handler runs to its end without waiting (the engine is
        # synchronous under the chain's lock), so more workers would only add a lock
        # hand-off and a task switch to every request (a handler that comes to await
        # something slow must raise this again)
        poll = {"busy_poll": BUSY_POLL} if features.busy_poll() else {}
        await pyfuse3.main(min_tasks=1, max_tasks=1, **poll)
    if failed:
        raise failed[0]


async def _announce(mountpoint: str, ready: Callable[[], None], failed: list[ChainfsError]) -> None:
    """Report readiness (to ``chainfs mount`` and systemd) once the mount answers: a
    ``stat`` of the mountpoint, from a thread, that this process's own FUSE loop must
    serve.  Said before the loop ran, a daemon that died then left ``chainfs mount``
    exiting 0 with nothing mounted; now that failure reaches it as the daemon's error."""
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError as e:
        failed.append(ChainfsError(f"the mount on {mountpoint!r} does not answer: {e.strerror}"))
        pyfuse3.terminate()
        return
    ready()
    notify("READY=1")


class Counter:
    """Counts the data (``st_blocks``) of the disks too big to count on the event loop
    (``Chain.background``), one at a time in a worker thread: the first ``stat`` of a
    1 PiB disk held every request of the mount for about 15 minutes.  Until its count
    ends, a disk's ``st_blocks`` is what its layers take on the host (or its last
    count).  The chain's lock is taken a region of its map at a time; the thread is
    abandoned at unmount, and stops at its next region once the chain is closed."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Chain](math.inf)
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()

    def want(self, chain: Chain) -> None:
        """Count ``chain``'s data soon (from any thread)."""
        if threading.get_ident() == self._thread:
            self._send.send_nowait(chain)
        else:
            self._token.run_sync_soon(self._send.send_nowait, chain)

    async def run(self) -> None:
        async for chain in self._receive:
            await trio.to_thread.run_sync(chain.count_in_background, abandon_on_cancel=True)


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
            served, passed = fastread.stats()
            written, sent = fastread.write_stats()
            pyfuse3.close(unmount=True)
            log.info("unmounted mountpoint=%s", self.mountpoint)
            if fastread.AVAILABLE:
                log.info("read map: %d reads answered by pyfuse3, %d passed on", served, passed)
            if fastread.WRITES:
                log.info("write map: %d writes answered by pyfuse3, %d passed on", written, sent)


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


def _directory_of(source_path: str) -> str:
    path = os.path.abspath(source_path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def _release(owned: dict[str, Ownership]) -> None:
    for ownership in owned.values():
        ownership.release()


def own_chains(src: sources.Source) -> None:
    """Take the owner lock of every chain found that nobody else holds."""
    for spec in src.chains:
        own_chain(src, spec.name)


def own_chain(src: sources.Source, name: str) -> None:
    """Take the owner lock of chain ``name`` unless another mount holds it."""
    if src.owns(name):
        return
    try:
        src.own(name)
    except OwnedElsewhere as e:
        src.elsewhere[name] = e.holder
        log.info("chain=%s served read-only: owned by %s", name, e.holder)


POLL = 0.2  # seconds between two tries of a lock held by another owner


async def wait_for_owners(
    directory: str, chains: list[str], seconds: float, owned: dict[str, Ownership]
) -> None:
    """Take the locks of every chain of ``chains`` into ``owned``, their waits side by
    side (the tenth chain does not wait for the nine before it); the first chain (in
    the order given) whose wait fails raises its error, the others waited to their end
    (the caller releases what ``owned`` holds)."""
    failed: dict[str, ChainfsError] = {}

    async def one(name: str) -> None:
        try:
            owned[name] = await wait_for_owner(directory, name, seconds)
        except ChainfsError as e:
            failed[name] = e

    names = list(dict.fromkeys(chains))
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    for name in names:
        if name in failed:
            raise failed[name]


async def wait_for_owner(
    directory: str,
    chain: str,
    seconds: float,
    progress: Callable[[str], None] | None = None,
) -> Ownership:
    """Take ``chain``'s locks, waiting up to ``timeout`` seconds for their holder to die
    (``kill -9`` frees them at once, a cut-off host's go with its lease); the wait is
    said every few seconds.  Each try runs in a worker thread: on NFS it is a few round
    trips to the server (open, lock, close: a server busy with other chains' take-overs
    answers slowly), and the one that gets the locks writes and syncs the owner file (a
    slow or stalled server holds it up) -- the guest's requests to the other chains,
    their events and control files, do not wait behind it.  Who holds the lock is read
    only when it is said."""
    deadline = time.monotonic() + seconds
    said = 0.0
    try_once = functools.partial(Ownership.acquire, directory, chain, describe=False)
    while True:
        try:
            return await trio.to_thread.run_sync(try_once)
        except OwnedElsewhere:
            left = deadline - time.monotonic()
            say = time.monotonic() - said >= 5
            holder = ""
            if left <= 0 or say:
                holder = await trio.to_thread.run_sync(describe_holder, directory, chain)
            if left <= 0:
                raise ChainfsError(
                    f"cannot adopt chain {chain!r}: still owned by {holder} after {seconds:.0f} s"
                ) from None
            if say:
                said = time.monotonic()
                message = f"waiting for the owner's lock, {left:.0f} s left ({holder})"
                log.info("chain=%s %s", chain, message)
                if progress is not None:
                    progress(message)
        # every waiter tries again at the same instants: the locks a dead owner held
        # all go at once, and the chains it held are then taken over side by side
        await trio.sleep_until(math.floor(trio.current_time() / POLL + 1) * POLL)


class SharedScan:
    """The source as take-overs (``Hosts.take``) must see it, scanned once for all
    the take-overs that wait together.  A scan begun after a chain's locks were taken
    finds the chain as its take-over must (nobody else writes its files since), so a
    take-over waits for a scan begun at or after its ``since``: the one running, or
    the next one, which begins when the running one ends and serves every take-over
    that came meanwhile.  A scan reads every chain's images and state record: ten
    chains adopted side by side scanned the source ten times (seconds each on NFS under
    TCG); now two or three times."""

    def __init__(self, scan: Callable[[], sources.Source], nursery: trio.Nursery) -> None:
        self.scan, self.nursery = scan, nursery
        self.latest: _Scan | None = None

    async def since(self, when: float) -> sources.Source:
        while True:
            scan = self.latest
            if scan is None or (scan.done.is_set() and scan.began < when):
                scan = self.latest = _Scan(trio.current_time())
                self.nursery.start_soon(self._run, scan)
            await scan.done.wait()
            if scan.began < when:
                continue  # begun before this chain was taken: the next one
            if scan.error is not None:
                raise scan.error  # (each take-over that waited for it fails with it)
            assert scan.result is not None
            return scan.result

    async def _run(self, scan: _Scan) -> None:
        try:
            scan.result = await trio.to_thread.run_sync(self.scan)
        except Exception as e:
            scan.error = e
        finally:
            scan.done.set()


@dataclass
class _Scan:
    began: float
    done: trio.Event = field(default_factory=trio.Event)
    result: sources.Source | None = None
    error: Exception | None = None


class Hosts:
    """``adopt``, ``inactivate`` and ``activate`` of the chains a mount serves.

    Adopt waits (in the background: the write returns at once) for the owner's locks,
    then runs the chain's journal as a mount's recovery does and serves the chain
    read-write: what its dead owner's jobs left is finished or resumed here.  Activate
    is adopt without waiting (the chain was inactivated: nobody holds it).  Inactivate
    refuses while a job runs ("chain has active block job"); otherwise it flushes,
    reopens the chain read-only without locks and releases the chain's locks, the flat
    file staying open (for reading) through it all.
    """

    def __init__(
        self,
        src: sources.Source,
        opts: MountOptions,
        disks: list[Disk],
        recovery: Recovery,
        nursery: trio.Nursery,
        forget_cache: Callable[[Disk], None] = lambda disk: None,
    ) -> None:
        self.src, self.opts, self.disks = src, opts, disks
        self.recovery, self.nursery = recovery, nursery
        self.forget_cache = forget_cache  # the kernel's pages of a flat file
        self.scans = SharedScan(functools.partial(sources.load, src.path), nursery)
        self.adopting: set[str] = set()
        self.handing_over: set[str] = set()  # inactivated, waiting for the job to stop

    def __call__(self, disk: Disk, cmd: HostCmd) -> Waiting | None:
        if cmd.kind == "inactivate":
            return self.inactivate(disk)
        if disk.fenced is not None:
            raise CommandError(
                errno.EIO,
                f"lost ownership of {disk.name} ({disk.fenced}): unmount and mount again "
                "to take it back",
            )
        if disk.owned:
            raise CommandError(errno.EEXIST, f"chain {disk.name!r} is already served read-write")
        if disk.name in self.adopting:
            raise CommandError(errno.EBUSY, f"chain {disk.name!r} is being taken over already")
        self.adopting.add(disk.name)  # (until the take-over ends: ``_activate``, ``_adopt``)
        if cmd.kind == "activate":
            return self._activate(disk)
        timeout = cmd.timeout if cmd.timeout is not None else self.opts.adopt_timeout
        shown = len(disk.events)  # (what the chain's events show from here on is kept)
        disk.emit("ADOPT_STARTED", timeout=int(timeout))
        self.nursery.start_soon(self._adopt, disk, timeout, shown)
        return None

    async def _activate(self, disk: Disk) -> None:
        """The rest of ``activate``, which its control-file write awaits: the chain's
        locks taken at once (``EBUSY`` if another mount holds them), then taken over."""
        try:
            acquire = functools.partial(Ownership.acquire, self.src.directory, disk.name)
            try:
                ownership = await trio.to_thread.run_sync(acquire)
            except OwnedElsewhere as e:
                disk.holder = e.holder
                raise CommandError(
                    errno.EBUSY, f"chain {disk.name!r} is owned by {e.holder}"
                ) from None
            await self.take(disk, ownership, "activate")
        finally:
            self.adopting.discard(disk.name)

    async def _adopt(self, disk: Disk, seconds: float, shown: int) -> None:
        try:
            ownership = await wait_for_owner(self.src.directory, disk.name, seconds)
            await self.take(disk, ownership, "adopt", shown)
        except ChainfsError as e:
            log.warning("chain=%s adopt failed: %s", disk.name, e)
            disk.emit("ADOPT_FAILED", reason=str(e))
        finally:
            self.adopting.discard(disk.name)

    async def take(
        self, disk: Disk, ownership: Ownership, how: str, shown: int | None = None
    ) -> None:
        """Serve ``disk`` read-write under ``ownership`` (just taken): recover its
        journal, reopen every layer (no stale cache), repair their leaks after an
        unclean stop, resume its jobs (``adopt``, ``activate``).  What reads or writes
        the storage -- the chain's state record and journal, the journal's recovery,
        the scan of the source for its bounds, its layers, their leak repair, its
        history -- runs in worker threads (``_Taking``): on NFS each of these is a
        round trip to the server or more, and the guest's requests to the other chains,
        and other take-overs, go on meanwhile.  The chain stays served read-only, as it
        was, until it is served read-write: nothing writes its layers before its journal
        ran and its repair ended.  A failure leaves it so, its locks released.
        ``shown``: where the events the chain showed read-only since an adopt began
        (kept in memory only) start: they are written to its history, which the events
        file shows from now on (``chainfs adopt`` follows that file from where it was)."""
        since = trio.current_time()  # (its locks are taken)
        taking = _Taking(self, disk, ownership, how, shown)
        try:
            await trio.to_thread.run_sync(taking.load)
            scanned = await self.scans.since(since) if taking.pending else None
            await trio.to_thread.run_sync(taking.recover, scanned)
            await trio.to_thread.run_sync(taking.open)
        except BaseException:
            with trio.CancelScope(shield=True):  # (an unmount waits for the undo)
                await trio.to_thread.run_sync(taking.release)
            taking.restore()
            log.info("chain=%s take-over undone: served read-only as before", disk.name)
            raise
        old = taking.serve()
        await trio.to_thread.run_sync(_close_unserved, old, disk.name)

    def inactivate(self, disk: Disk) -> Waiting | None:
        """Give the chain up for another mount to ``activate``.  A running stream,
        commit or copy travels with it (``TRAVELS``): it is stopped at its next
        checkpoint as an unmount stops it, its journal left to the next owner, who
        resumes it from there; what waits for the job to stop is returned for the
        control-file write to await (it returns once the chain is released)."""
        if not disk.owned or disk.fenced is not None:
            raise CommandError(errno.EINVAL, f"chain {disk.name!r} is not served read-write here")
        if disk.suspended is not None:
            raise CommandError(errno.EIO, f"ownership of {disk.name} suspended: {disk.suspended}")
        if disk.name in self.handing_over:
            raise CommandError(errno.EBUSY, f"chain {disk.name!r} is being handed over already")
        job = disk.job
        if job is None or job.status == CONCLUDED:
            self._give_up(disk)
            return None
        refusal = _stays(job)
        if refusal is not None:
            raise CommandError(errno.EBUSY, f"chain has active block job {job.id!r}: {refusal}")
        self.handing_over.add(disk.name)
        return self._hand_over(disk, job)

    async def _hand_over(self, disk: Disk, job: Job) -> None:
        try:
            paused = job.paused  # (the stop unpauses it)
            job.suspend("handed over; the next owner resumes it")
            await job.done.wait()
            if disk.fenced is not None:
                raise CommandError(errno.EIO, f"lost ownership of {disk.name}: {disk.fenced}")
            if disk.suspended is not None:
                # the job stopped, its journal kept: it resumes here when the storage answers
                raise CommandError(
                    errno.EIO, f"ownership of {disk.name} suspended: {disk.suspended}"
                )
            self._give_up(disk, job, paused)
        finally:
            self.handing_over.discard(disk.name)

    def _give_up(self, disk: Disk, job: Job | None = None, paused: bool = False) -> None:
        """Flush the chain, reopen it read-only without locks, release its locks (the
        flat file stays open for reading through it all); ``job`` stopped to travel
        (``paused`` by a user: it travels paused, as its journal says): the journal says
        so first, durably."""
        name = disk.name
        travelling = job is not None and job.error is None and job.suspended
        if travelling and disk.journal is not None:
            assert job is not None
            # (a user's pause is in the journal already: the next owner resumes it paused)
            disk.journal.handover(socket.gethostname(), MOUNT_ID, [job.id])
        disk.chain.flush()
        chain = Chain.open(disk.chain.active.path, writable=False, lock=False)
        chain.confine = disk.chain.confine
        # the times of pyfuse3's overwrites (``Disk.mtime_ns``) outlive the old chain
        disk.mtime_ns, disk.ctime_ns = disk.mtime_ns, disk.ctime_ns
        old = disk.replace_chain(chain)
        if travelling:
            assert job is not None
            more = {"paused": True} if paused else {}
            disk.emit("INACTIVATED", job=job.id, offset=job.offset, **more)
        else:
            disk.emit("INACTIVATED")
        old.close()  # flushed and closed clean; its image locks go
        disk.events.close()
        disk.events.writable = False
        disk.owned, disk.journal, disk.holder, disk.seen = False, None, None, None
        disk.shown_changed()
        self.recovery.journals.pop(name, None)
        self.src.disown(name)
        log.info("chain=%s inactivated: served read-only, its locks released", name)


class _Taking:
    """One chain's take-over (``Hosts.take``), step by step.  Every step that reads or
    writes only this chain's own files runs in a worker thread, the chain still served
    read-only as it was (as for another host's writes: nothing serves its layers
    read-write before ``serve``): ``load`` its state record and journal,
    ``recover`` (run the journal, save the record), ``open`` its layers writable,
    ``repair`` their leaks and open its history.  These work on a copy of the source's
    state (``staged``: the event loop goes on changing the source for the other
    chains); on the event loop, ``serve`` merges what they changed into the source and
    swaps the chain's fields -- or, after a failure, ``release`` (in a thread) and
    ``restore`` (on the loop) undo it all."""

    def __init__(
        self, hosts: Hosts, disk: Disk, ownership: Ownership, how: str, shown: int | None = None
    ) -> None:
        self.hosts, self.disk, self.ownership, self.how = hosts, disk, ownership, how
        self.shown = shown
        self.src, self.name = hosts.src, disk.name
        self.fresh: Chain | None = None  # its layers opened writable
        self.history: EventLog | None = None  # its events' history, opened writable
        self.repaired: list[tuple[str, int]] = []  # (layer, clusters): emitted at serve
        self.checked: set[str] = set()
        self.relocked = False  # its reader locks taken again (``release``)
        log.info("chain=%s taking over (%s)", self.name, how)
        # the source's state as the take-over's copy begins from it (``merge``)
        self.recorded, self.retired = dict(self.src.recorded), set(self.src.retired)
        self.staged = self.src.staged(self.name, ownership)
        # (its reader locks would refuse a commit's base: taken off by ``load``, and
        # meanwhile no flat-file open or close, nor a revalidation, changes them)
        self.readers = not disk.chain.locked
        disk.taking = True

    def load(self) -> None:
        """In a thread: the chain's record as its last owner left it, and its journal."""
        if self.readers:
            unlock_readers(self.disk.chain)
        self.staged._reload(self.name)
        self.journal = Journal.load(self.src.directory, self.name, ownership=self.ownership)
        self.rec = Recovery(journals={self.name: self.journal})
        self.pending = bool(self.journal.pending())

    def recover(self, scanned: sources.Source | None) -> None:
        """In a thread: run the journal (``scanned``: the source as it is now, what its
        records may name), and record the chain as it then is."""
        state, name, opts = self.staged, self.name, self.hosts.opts
        if scanned is not None:
            recorded = state.recorded.get(name)
            bounds = Bounds.of(scanned, name, recorded, opts.allow_dirs, opts.allow_backing)
            recover_chain(state, name, self.journal, self.rec, bounds)
        spec = state.spec(name)
        if spec is None:  # no record to go by: the source as a mount finds it
            fresh = sources.load(state.path, state.owned)
            spec = next((c for c in fresh.chains if c.name == name), None)
        if spec is None:
            raise ChainfsError(f"chain {name!r} is no longer found in {state.path!r}")
        state.recorded[name] = spec.active
        state.save([name])
        self.spec = spec
        self.confine = Confinement.of([*spec.homes, *opts.allow_dirs, *opts.allow_backing])

    def open(self) -> None:
        """In a thread: open the chain's layers writable, repair their leaks, open its
        history (everything ``serve`` needs from the storage)."""
        self.fresh = Chain.open(self.spec.active, writable=True, lock=True, confine=self.confine)
        self.repair()
        self.fresh.confine = self.confine.widened(
            [os.path.dirname(self.spec.active)]
            + ([self.src.directory] if os.path.isdir(self.src.path) else [])
        )
        self.layers = [os.path.realpath(layer.path) for layer in self.fresh.layers]
        self.history = EventLog.open(self.src.directory, self.name, writable=True)

    def repair(self) -> None:
        """The previous owner stopped uncleanly: repair the leaks of every layer open
        writable (``leaks``), before anything is served or resumed on them."""
        assert self.fresh is not None
        if not self.ownership.unclean:
            return
        log.info("chain=%s its previous owner did not release it: checking for leaks", self.name)

        def emit(event: str, *, layer: str, clusters: int) -> None:
            self.repaired.append((layer, clusters))

        self.checked = leaks.repair_writable(self.name, self.fresh.layers, emit)

    def release(self) -> None:
        """In a thread, after a failure: close what was opened, release the chain's
        locks, and take its reader locks again if its flat file is open."""
        if self.fresh is not None:
            _close_unserved(self.fresh, self.name)
        if self.history is not None:
            self.history.close()
        self.ownership.release()
        if self.readers and self.disk.handles:
            lock_readers(self.name, self.disk.chain)
            self.relocked = True

    def restore(self) -> None:
        """On the event loop, after ``release``: the chain served read-only as before,
        its reader locks as its flat-file handles want them now."""
        disk = self.disk
        disk.taking = False
        if self.readers and not disk.owned and not disk.chain.locked:
            if disk.handles and not self.relocked:
                lock_readers(self.name, disk.chain)
            elif self.relocked and not disk.handles:
                unlock_readers(disk.chain)

    def serve(self) -> Chain:
        """On the event loop: serve the chain read-write; return the chain it was
        served read-only through, for the caller to close (in a thread)."""
        hosts, src, disk, name = self.hosts, self.src, self.disk, self.name
        chain, history = self.fresh, self.history
        assert chain is not None and history is not None
        src.merge(self.staged, name, self.recorded, self.retired)
        src.owned[name] = self.ownership
        old = disk.replace_chain(chain)  # (closed by the caller, in a thread)
        disk.readers.add(disk, self.layers)  # (its layers as this host finds them now)
        disk.taking = False
        disk.events.close()
        # what the chain showed since the take-over began goes on in its history, and so
        # does an ``events`` file open across the change
        disk.events.carry_into(history, len(disk.events) if self.shown is None else self.shown)
        disk.events, disk.emit, disk.next_id = history, history.emit, history.next_id
        disk.owned, disk.holder, disk.journal = True, None, self.journal
        if self.ownership.unclean:
            for layer, clusters in self.repaired:
                disk.emit("LEAKS_REPAIRED", layer=layer, clusters=clusters)
            _repair_reopened(disk, self.checked)
            self.ownership.unclean = False  # (a chain given up unchecked leaves it to the next)
        disk.suspended = disk.seen = disk.unstable = disk.elsewhere = None
        disk.shown_changed()
        disk.fencing = bool(hosts.opts.shared)
        hosts.recovery.journals[name] = self.journal
        disk.touch()
        # what another host wrote meanwhile; in a thread: the kernel may call back
        hosts.nursery.start_soon(trio.to_thread.run_sync, hosts.forget_cache, disk)
        log.info("chain=%s served read-write (%s)", name, self.how)
        disk.emit("OWNERSHIP_TAKEN", how=self.how)
        serve_refused([disk], self.rec)
        resume_jobs([disk], self.rec)
        return old


# the jobs that travel with a hand-over, resumed by the next owner from the journal: a
# stream and an intermediate commit from their last checkpoint, an active commit and a
# copy from the start (the guest's writes they track are in memory; a copy's partial
# DEST is copied over again); one a user paused is resumed paused
TRAVELS = ("stream", "commit", "copy")


def _stays(job: Job) -> str | None:
    """Why ``job`` cannot travel with a hand-over (None: it can)."""
    if job.type not in TRAVELS:
        return (
            f"a {job.type} cannot be handed over (its point in time would be lost on "
            "the other host): let it finish or cancel it first"
        )
    if job.journal is None:
        return "it has no journal record to be resumed from: let it finish or cancel it"
    return None


async def _heartbeat(disks: list[Disk], src: sources.Source, lease: float) -> None:
    """Rewrite each owned chain's owner file every few seconds.  On shared storage a
    heartbeat that is refused with EIO (the server revoked the lock: someone adopted the
    chain, or the lock state was lost) fences the chain for good; one that fails
    otherwise, or does not return within half the lease, only suspends it -- it cannot
    be told whether the lock is still held -- until a heartbeat is written again under
    the lock (the server kept it: nobody took the chain), which resumes it."""
    beating: set[str] = set()  # chains whose heartbeat is still on its way
    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL)
            for i, disk in enumerate(list(disks)):
                if i % SWEEP_STEP == SWEEP_STEP - 1:
                    await trio.lowlevel.checkpoint()  # guest requests between two steps
                ownership = src.owned.get(disk.name)
                if not disk.owned or disk.fenced is not None or ownership is None:
                    continue
                if disk.name in beating:
                    continue  # still blocked: its end says whether the lock is held
                beating.add(disk.name)
                nursery.start_soon(_beat, disk, ownership, lease, beating)


async def _beat(disk: Disk, ownership: Ownership, lease: float, beating: set[str]) -> None:
    """One heartbeat of ``disk``'s owner file (``_heartbeat``)."""
    stalled = f"the owner file could not be written for {lease / 2:.0f} s"
    error: OSError | None = None

    async def watch() -> None:
        await trio.sleep(lease / 2)
        if disk.fencing:
            disk.suspend(stalled)
        else:
            _throttle.warning(("heartbeat", disk.name), "chain=%s %s", disk.name, stalled)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                await trio.to_thread.run_sync(ownership.heartbeat, abandon_on_cancel=True)
            except OSError as e:
                error = e
            nursery.cancel_scope.cancel()
    finally:
        beating.discard(disk.name)
    if disk.fenced is not None or ownership.lost is not None:
        return
    if error is None:
        disk.resume()  # written under the lock: the server kept it
        return
    reason = f"the owner file cannot be written: {error.strerror or error}"
    if not disk.fencing:  # a local disk failing: its writes say so already
        _throttle.warning(("heartbeat", disk.name), "chain=%s %s", disk.name, reason)
    elif error.errno == errno.EIO:
        disk.fence(reason)  # refused: the lock is gone
    else:
        disk.suspend(reason)


async def _follow_owners(
    disks: list[Disk], forget_cache: Callable[[Disk], None], adopting: set[str]
) -> None:
    """Every few seconds, revalidate each chain served read-only, unlocked, for another
    host's writes (``follow_owner``); not one being taken over (``adopting``)."""
    while True:
        await trio.sleep(HEARTBEAT_INTERVAL)
        for disk in list(disks):
            if not disk.owned and not disk.chain.locked and disk.name not in adopting:
                await follow_owner(disk, forget_cache)


async def follow_owner(disk: Disk, forget_cache: Callable[[Disk], None]) -> None:
    """Look at the chain as the storage has it now (a fresh open: NFS close-to-open);
    when the owner's state record (a snapshot, a stream's or commit's end) or its
    active layer changed, reopen the chain from the record and serve that, the kernel's
    cached pages dropped.  A chain the owner is changing right now (a layer not there
    yet) is tried again at the next round.  The storage is read in threads: a
    cut-off NFS client blocks there, not the mount."""
    old = disk.chain
    seen = await trio.to_thread.run_sync(disk.probe, abandon_on_cancel=True)
    fresh: Chain | None = None
    if seen != disk.seen:
        reopen = functools.partial(
            Chain.open,
            seen.active,
            writable=False,
            lock=False,
            confine=old.confine,
            deep_read_only=True,
        )
        try:
            fresh = await trio.to_thread.run_sync(reopen, abandon_on_cancel=True)
        except ChainfsError as e:
            log.info("chain=%s not revalidated yet: %s", disk.name, e)
    if disk.chain is not old:  # taken over (or reopened) meanwhile
        if fresh is not None:
            fresh.close()
        return
    if disk.revalidate(seen, fresh):
        await trio.to_thread.run_sync(forget_cache, disk)


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
        for i, disk in enumerate(list(disks)):
            if i % SWEEP_STEP == SWEEP_STEP - 1:
                await trio.lowlevel.checkpoint()  # guest requests between two steps
            mtime = disk.mtime_ns
            if disk.chain.writable and disk.suspended is None and flushed.get(disk.name) != mtime:
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
