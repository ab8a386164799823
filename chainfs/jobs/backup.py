"""backup: a point-in-time copy of the live disk into a new file, as QEMU's
``blockdev-backup`` with its copy-before-write filter.

    [A] <- [B] <- [E]    backup F sync=full   ->  F: the whole disk as it was (no backing)
    [A] <- [B] <- [E]    backup F sync=top    ->  F: E's clusters as they were, over B
    [A] <- [B] <- [E]    backup F sync=none   ->  F: the old content of what the guest
                                                  overwrites, over E (fleecing)
    [A] <- [B] <- [E]    backup F sync=bitmap bitmap=b1 base=P
                                              ->  F: the clusters b1 marks, as they
                                                  were, over P (an incremental backup)

DEST receives the disk as it was when the ``backup`` write(2) returned; the chain's
images are never changed, and the guest's writes go on at full speed.  The command
does, in one synchronous stretch that no guest request can interleave with, what fixes
that point in time: DEST created (qcow2 v3, or raw with ``format=raw``), the set of
clusters to copy chosen (``pending``: QEMU's copy bitmap), and the job made the chain's
write hook.  From then on:

- copy-before-write (``before_write``, under the chain's lock, before a guest write,
  zero write or discard changes anything): the units of the range still pending are
  read from the chain -- still their point-in-time content, as nothing has written
  them since -- written to DEST and no longer pending; the guest's request then goes on;
- the background pass (``sync=full`` and ``top``) copies what is still pending, at
  ``speed``, a step at a time under the chain's lock, skipping what CBW copied;
- ``sync=none`` has no pass: the job reports ``JOB_READY`` and keeps copying before
  writes until ``complete JOB`` (it ends: DEST done) or ``cancel JOB``.

Which units are pending at the start (``select``): ``full`` every unit some layer holds
(the rest reads zeros, as a DEST without backing already does: DEST stays sparse);
``top`` every unit the active layer holds (DEST's backing is the active layer's backing,
which the guest never changes); ``none`` every unit; ``bitmap`` every unit a granule of
the persistent dirty bitmap overlaps.  A unit is 64 KiB (at least DEST's cluster and the
chain's granule).

sync=bitmap (QEMU's incremental backup): at the point in time the bitmap is frozen
(``Bitmaps.freeze``: what it marked becomes the pending units, and it restarts empty, so
the guest's writes from then on mark it afresh; on disk it stays the union of both until
the end, so a crash loses no bit).  DEST is a qcow2 whose backing file is ``base=`` (the
previous backup, named as ``qemu-img create -b`` would: relative to DEST's directory),
or none.  At the end the bitmap is thawed per ``bitmap-mode`` (QEMU's
``BitmapSyncMode``): ``on-success`` (the default) keeps only the writes since the point
in time if the backup completed, and gives the frozen bits back if it failed or was
cancelled; ``always`` keeps only the new writes either way; ``never`` always gives the
frozen bits back (the bitmap goes on accumulating).  While frozen, the bitmap commands
on it are refused with EBUSY (``Bitmaps._check_idle``); snapshot, commit, stream and copy
are refused anyway while a job runs (``refuse_busy``).

Zeros: a unit that reads zeros is not written into a DEST without backing (full, raw);
into one with backing (top, none) it becomes a zero cluster, as the backing may show
data there.  ``compress=on`` (qcow2 only) writes each data unit as a compressed cluster
(``Qcow2Layer.write_compressed``; uncompressed where compression does not shrink it).

sync=none and fleecing: DEST over the live active layer shows the point-in-time disk
only while the job runs (the active layer changes, CBW keeps DEST holding the old
content of each changed cluster); that is when it is useful: an export of DEST,
read-only, is a consistent view of the disk for a backup tool that reads it at its own
pace while the guest runs (QEMU's image fleecing).  Once the job ended, DEST keeps the
old content of exactly the clusters overwritten during the job, over an active layer
that moved on: no longer a view of anything but that.

For fleecing, DEST is flushed after each copy before a write, before the guest's write
lands: another process reading DEST over the active layer from the disk sees the point
in time at every moment (the active layer's own on-disk state lags behind its cache,
never ahead of it).

The end: a completed backup flushes and closes DEST, an ordinary file.  DEST is recorded
in the state file as retired before it is even created, so no mount serves it as a
chain, not even after a crash (the directory scan would otherwise take a sync=none DEST,
whose backing file is the active layer, for the chain's new top).  Cancel, failure, or an
unmount (a backup cannot outlive the mount: the copy-before-write state is in memory)
leave DEST behind as an ordinary file, with ``BACKUP_ABANDONED`` in ``events`` naming
it.  A failure to copy before a guest write fails the job, never the guest's write
(QEMU's ``on-cbw-error=break-snapshot``).

A crash: what the guest overwrote after the point in time while its old content was on
its way to DEST is not known afterwards, and the chain has moved on, so a resumed backup
would give DEST mixed content.  The next mount rolls the backup back: DEST is removed,
with ``BACKUP_ABANDONED removed=true`` saying why, only when the journal says chainfs
created it (a checkpoint recorded right after the creation; without it DEST stays, an
ordinary file, never served).  The chain's images were never written by the backup, so
they are exactly as the guest left them.

Locking contract: everything runs on the trio thread; a pass step and a copy before a
write hold the chain's lock (the hook is called with it held).
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from ..buffers import zero_at
from ..control import BackupCmd, CommandError
from ..errors import ChainfsError
from ..formats.base import Buffer, Layer
from ..formats.qcow2 import Qcow2Layer, create_image
from ..formats.qcow2.bitmaps import Bitmap, Bitmaps
from ..formats.raw import RawLayer
from ..hostfile import HostFile, temporary_name
from ..locks import lock_image
from .backing import backing_string
from .base import READY, Job
from .journal import Pending, redo, retire
from .served import Served, check_target, refuse_busy, remove_inside, vet_new_file

log = logging.getLogger(__name__)

FULL, TOP, NONE, BITMAP = "full", "top", "none", "bitmap"
ON_SUCCESS, ALWAYS, NEVER = "on-success", "always", "never"
QCOW2, RAW = "qcow2", "raw"
UNIT = 64 << 10  # the smallest unit copied (at least DEST's cluster and the chain's granule)
STEP = 4 << 20  # bytes per step of the background pass
CREATED = 1  # the journal checkpoint of a backup whose DEST chainfs created


class UnitSet:
    """The units still to copy: one byte per unit, 1 while pending (QEMU's copy bitmap).

    Memory follows the disk's size (16 KiB per GiB at 64 KiB units).  Jobs that copy a
    chosen set of clusters fill it (``select``); copy-before-write and the pass empty it.
    """

    def __init__(self, unit: int, count: int) -> None:
        self.unit = unit
        self.bits = bytearray(count)

    def __len__(self) -> int:
        return len(self.bits)

    def pending(self) -> int:
        return self.bits.count(1)

    def next(self, i: int) -> int:
        """The first pending unit at or after ``i`` (``len`` if none)."""
        j = self.bits.find(1, i)
        return len(self.bits) if j < 0 else j

    def run(self, i: int, limit: int) -> int:
        """The end of the run of pending units from ``i`` (at most ``limit`` of them)."""
        j = self.bits.find(0, i, i + limit)
        return min(i + limit, len(self.bits)) if j < 0 else j

    def clear(self, a: int, b: int) -> None:
        self.bits[a:b] = bytes(b - a)


def select(
    served: Served, sync: str, unit: int, size: int, marked: Bitmap | None = None
) -> UnitSet:
    """The units a backup copies, fixed at the point in time (``marked``: the frozen
    bitmap of ``sync=bitmap``)."""
    chain = served.chain
    count = -(-size // unit)
    units = UnitSet(unit, count)
    if sync == BITMAP:
        assert marked is not None
        for a, b in marked.ranges(size):
            units.bits[a // unit : -(-b // unit)] = b"\x01" * (-(-b // unit) - a // unit)
        return units
    if sync == NONE:
        units.bits[:] = b"\x01" * count
        return units
    g = chain.granule
    k = unit // g
    stop = len(chain.layers) if sync == FULL else 1
    held = chain.held_map_locked(0, stop, 0, count * k)  # the caller holds the lock
    for i in range(count):  # a unit is pending if a layer answers for any of its granules
        if 1 in held[i * k : (i + 1) * k]:
            units.bits[i] = 1
    return units


def start(served: Served, cmd: BackupCmd) -> None:
    """``backup DEST [sync=full|top|none] [speed=RATE] [format=qcow2|raw]
    [compress=on]``: DEST must be new and in a directory chainfs may write to.  The point
    in time is now: DEST is created and the job hooked into the guest's writes before
    the write(2) returns."""
    if cmd.compress and cmd.format != QCOW2:
        raise CommandError(errno.EINVAL, "compress=on needs format=qcow2 (raw has no compression)")
    if cmd.format == RAW and cmd.sync != FULL:
        raise CommandError(
            errno.EINVAL, f"sync={cmd.sync} needs format=qcow2 (DEST has a backing file)"
        )
    refuse_busy(served)
    dest = check_target(served, cmd.dest)
    base: tuple[str, str] | None = None
    if cmd.sync == BITMAP:
        assert cmd.bitmap is not None
        chain = served.chain
        try:
            with chain.lock:  # exists, consistent, not frozen: refused before DEST exists
                chain.dirty_bitmaps().check_usable(cmd.bitmap)
        except ChainfsError as e:
            raise CommandError(getattr(e, "errno", errno.EINVAL) or errno.EINVAL, str(e)) from e
        if cmd.base is not None:
            base = _previous_backup(served, dest, cmd.base)
    job = BackupJob(
        served.next_id("backup"),
        served,
        dest,
        cmd.sync,
        cmd.format,
        compress=cmd.compress,
        speed=cmd.speed,
        bitmap=cmd.bitmap,
        bitmap_mode=cmd.bitmap_mode,
        base=base,
    )
    job.attach(served.journal, served.name)
    try:
        job.begin()
    except ChainfsError as e:
        job.end_unstarted()
        raise CommandError(getattr(e, "errno", errno.EIO) or errno.EIO, str(e)) from e
    served.job = job

    async def run() -> None:
        await job.execute()

    served.spawn(run)


def _previous_backup(served: Served, dest: str, base: str) -> tuple[str, str]:
    """``base=``: the path of an existing image in a directory chainfs may use (relative
    names from DEST's directory, as ``qemu-img create -b``), and its format."""
    path = os.path.normpath(os.path.join(os.path.dirname(dest), base))
    real = os.path.realpath(path)
    if not any(real == d or real.startswith(d + "/") for d in served.allowed_dirs):
        raise CommandError(
            errno.EACCES, f"{path!r} is outside the directories chainfs may write to"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CommandError(errno.ENOENT, f"base {path!r} does not exist") from None
    except OSError as e:
        raise CommandError(e.errno or errno.EIO, f"cannot read base {path!r}: {e.strerror}") from e
    return path, QCOW2 if magic == b"QFI\xfb" else RAW


def resume(served: Served, p: Pending) -> None:
    """A backup a crash interrupted cannot go on (see the module's docstring): roll it
    back, removing the DEST chainfs created."""
    dest = str(p.params.get("dest") or "")
    removed = False
    gone = not dest or not os.path.lexists(dest)
    if not gone and p.offset < CREATED:
        # a crash between the intent and the creation: DEST is not known to be ours
        redo([retire([dest])], served.source, served.name)
    elif not gone:
        try:
            remove_inside(served, dest)
            removed = gone = True
        except OSError as e:
            log.error("job=%s file=%s cannot be removed: %s", p.id, dest, e.strerror)
    if gone and dest:  # no file: nothing for the state file to keep from being served
        served.source._unretire(os.path.abspath(dest))
        served.source.save([served.name])
    journal = served.journal
    if journal is not None:
        journal.end(p.key, "rolled-back")
    reason = "interrupted by a crash: the point in time is lost, DEST would be mixed"
    served.emit("BACKUP_ABANDONED", job=p.id, file=dest, removed=removed, reason=reason)
    served.emit("JOB_ROLLED_BACK", job=p.id, type="backup", reason=reason)


class BackupJob(Job):
    """Copy the point-in-time disk into DEST; the chain's write hook (``WriteHook``)."""

    type = "backup"

    def __init__(
        self,
        job_id: str,
        served: Served,
        dest: str,
        sync: str,
        fmt: str,
        *,
        compress: bool,
        speed: int,
        bitmap: str | None = None,
        bitmap_mode: str = ON_SUCCESS,
        base: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(job_id, speed=speed, emit=served.emit)
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.base = base  # sync=bitmap: DEST's backing file and its format
        self._frozen: Bitmaps | None = None  # whose bitmap this backup froze
        self.served = served
        self.dest = dest
        self.sync = sync
        self.format = fmt
        self.compress = compress
        self.target: Layer | None = None
        self.pending: UnitSet | None = None
        self._size = served.chain.size
        self._cbw_error: Exception | None = None
        self._buf = bytearray()
        self._completing = False
        self.position = 0  # where the background pass got to (bytes)
        self.created = False  # DEST is ours

    def details(self) -> list[tuple[str, object]]:
        return [
            ("dest", self.dest),
            ("sync", self.sync),
            ("format", self.format),
            ("compress", "on" if self.compress else None),
            ("bitmap", self.bitmap),
            ("bitmap-mode", self.bitmap_mode if self.bitmap else None),
        ]

    def intent(self) -> dict[str, object]:
        return {**dict(self.details()), "speed": self.speed}

    # -- the point in time -----------------------------------------------------------------

    def begin(self) -> None:
        """Create DEST, choose what to copy and hook into the guest's writes: all before
        the command returns, with no guest request in between (trio thread)."""
        chain = self.served.chain
        size = self._size
        # retired before it exists: never a chain, not even to a mount after a crash
        # (the scan would take DEST, backed by the active layer for sync=none, as the
        # chain's new top)
        self.served.source.retire([self.dest], self.served.name)
        if self.format == RAW:
            vet = vet_new_file(self.served, self.dest)
            f = HostFile(temporary_name(self.dest), True, create=True)
            try:
                vet(f.fd)
                lock_image(f.fd, self.dest, write=True)
                f.truncate(size)
                f.flush()
                f.publish(self.dest)
                vet(f.fd)
            except BaseException:
                f.remove()
                raise
            self.created = True
            self.target = RawLayer(f)
        else:
            backing: str | None = None
            fmt: str | None = None
            active = chain.active
            if self.sync == TOP and len(chain.layers) > 1:
                below = chain.layers[1]
                fmt = below.format_name
                backing = backing_string(
                    self.dest, below.path, (active.path, active.backing_string)
                )
            elif self.sync == NONE:
                fmt = active.format_name
                backing = backing_string(self.dest, active.path)
            elif self.sync == BITMAP and self.base is not None:
                backing = backing_string(self.dest, self.base[0])
                fmt = self.base[1]
            vet = vet_new_file(self.served, self.dest)
            image = create_image(self.dest, size=size, backing=backing, backing_format=fmt, vet=vet)
            self.created = True
            self.target = chain.adopt_layer(image)
        if self.journal is not None:
            # the journal's checkpoint of a backup says only this: chainfs made DEST (a
            # backup never resumes), so that the next mount removes it after a crash
            self.journal.progress(self.journal_key, CREATED)
        unit = max(UNIT, chain.granule, self.target.cluster_size)
        with chain.lock:  # the bitmap's point in time: between two guest requests
            marked = None
            if self.sync == BITMAP:
                assert self.bitmap is not None
                bitmaps = chain.dirty_bitmaps()
                marked = bitmaps.freeze(self.bitmap)
                self._frozen = bitmaps
            self.pending = select(self.served, self.sync, unit, size, marked)
            chain.add_write_hook(self)
        self.len = 0 if self.sync == NONE else self.pending.pending() * unit
        log.info("job=%s backup of %d units into %s", self.id, self.pending.pending(), self.dest)

    def end_unstarted(self) -> None:
        """``begin`` failed: nothing to keep."""
        self._untrack()
        self._thaw(success=False)
        if self.target is not None:
            self._close_target()
        if not self.created:
            self._unretire()
        if self.journal is not None:
            self._journal_end("failed")

    def _unretire(self) -> None:
        source = self.served.source
        source._unretire(os.path.abspath(self.dest))
        try:
            source.save([self.served.name])
        except ChainfsError as e:  # a stale entry names no file: harmless
            log.warning("job=%s cannot update the state file: %s", self.id, e)

    # -- copying ---------------------------------------------------------------------------

    def _copy_units(self, a: int, b: int) -> int:
        """Copy units ``[a, b)`` (all pending) from the chain into DEST and clear them;
        the caller holds the chain's lock.  The bytes that reached DEST as data."""
        units, target = self.pending, self.target
        assert units is not None and target is not None
        u = units.unit
        start, end = a * u, min(b * u, self._size)
        n = end - start
        if len(self._buf) < n:
            self._buf = bytearray(max(n, STEP))
        view = memoryview(self._buf)[:n]
        self.served.chain.read_below_into(-1, start, view)
        written = 0
        with_backing = self.sync not in (FULL, BITMAP) or self.base is not None
        cs = target.cluster_size
        pos = 0
        while pos < n:  # runs of all-zero units and of data units, each in one go
            zero = zero_at(self._buf, pos, min(u, n - pos))
            j = pos + u
            while j < n and zero_at(self._buf, j, min(u, n - j)) == zero:
                j += u
            j = min(j, n)
            if zero:
                if with_backing:
                    target.write_zeroes(start + pos, j - pos, _zeros)
            elif self.compress and isinstance(target, Qcow2Layer):
                for p in range(pos, j, cs):
                    target.write_compressed(start + p, view[p : min(p + cs, j)], _zeros)
            else:
                target.write(start + pos, view[pos:j], _zeros)
            if not zero:
                written += j - pos
            pos = j
        units.clear(a, b)
        self.offset += n
        return written

    # -- the guest's writes (``chain.WriteHook``) ------------------------------------------

    def before_write(self, offset: int, length: int) -> None:
        """Copy-before-write: what the range still holds of the point in time goes to
        DEST first (under the chain's lock, before the guest's request changes it)."""
        units = self.pending
        if units is None or self._cbw_error is not None or length <= 0:
            return
        u = units.unit
        i, last = offset // u, min(-(-(offset + length) // u), len(units))
        copied = False
        try:
            while True:
                i = units.next(i)
                if i >= last:
                    break
                j = units.run(i, last - i)
                self._copy_units(i, j)
                i = j
                copied = True
            if copied and self.sync != NONE and not units.pending():
                self._wakeup.set()  # all copied before writes: the pass has nothing left
            if copied and self.sync == NONE:
                # fleecing: another process reads DEST over the active layer; the old
                # content is durable in DEST before the guest's write lands
                assert self.target is not None
                self.target.flush()
        except Exception as e:  # break the backup, never the guest's write
            log.warning("job=%s copy before write failed: %s", self.id, e)
            self._cbw_error = e
            self._untrack()
            self._wakeup.set()
        if self.sync == NONE:
            self.len = self.offset

    def after_write(self, offset: int, length: int) -> None:
        pass

    # -- the job -----------------------------------------------------------------------------

    def complete(self) -> None:
        """End a ``sync=none`` backup (the caller checked that it is ready)."""
        self._completing = True
        self._wakeup.set()

    def suspend(self, reason: str = "") -> None:
        """An unmount ends a backup (its point in time lives in memory): as a cancel."""
        self.cancel()

    async def checkpoint(self, copied: int) -> None:
        await super().checkpoint(copied)
        if self._cbw_error is not None:
            raise self._cbw_error

    async def run(self) -> None:
        await self.checkpoint(0)
        units = self.pending
        assert units is not None
        chain = self.served.chain
        if self.sync == NONE:
            self.status = READY
            self._emit("JOB_READY", job=self.id, type=self.type)
            while not self._completing:
                await self.checkpoint(0)
                if self._completing:
                    break
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            await self.checkpoint(0)
            return
        i = 0
        while True:
            with chain.lock:  # the look and the copy in one stretch: no write between
                i = units.next(i)
                if i >= len(units):
                    break
                # a step is at most a second's worth of ``speed``: the pass stays
                # responsive (to a speed change, to the end of the work)
                step = min(STEP, self.speed) if self.speed > 0 else STEP
                j = units.run(i, max(1, step // units.unit))
                copied = self._copy_units(i, j)
            i = j
            self.position = min(j * units.unit, self._size)
            await self.checkpoint(copied)
        await self.checkpoint(0)

    def flush_progress(self) -> None:
        if self.target is not None:
            self.target.flush()

    def prepare(self) -> None:
        self._untrack()
        if self._cbw_error is not None:
            raise self._cbw_error
        assert self.target is not None
        self.target.flush()
        self._close_target()  # an ordinary file, retired (never a chain) from the start
        # DEST is durable: the bitmap may restart from the point in time
        self._thaw(success=self.bitmap_mode != NEVER)
        log.info("job=%s backup complete: %s", self.id, self.dest)

    def abort(self) -> None:
        self._untrack()
        try:
            self._thaw(success=self.bitmap_mode == ALWAYS)
            if self.target is not None:
                self._close_target()
        finally:
            self._emit("BACKUP_ABANDONED", job=self.id, file=self.dest)

    def _thaw(self, *, success: bool) -> None:
        """sync=bitmap's end (``bitmap-mode``): the bitmap restarts from the point in
        time (``success``) or gets the frozen bits back; durable when this returns."""
        bitmaps, self._frozen = self._frozen, None
        if bitmaps is None or self.bitmap is None:
            return
        chain = self.served.chain
        with chain.lock:
            bitmaps.thaw(self.bitmap, success=success)
            bitmaps.f.flush()
        self._emit(
            "BITMAP_CHANGED",
            action="restarted" if success else "kept",
            bitmap=self.bitmap,
            job=self.id,
        )

    def _close_target(self) -> None:
        target, self.target = self.target, None
        if target is not None:
            target.close()

    def _untrack(self) -> None:
        hooks = self.served.chain.write_hooks
        if self in hooks:
            hooks.remove(self)


def _zeros(offset: int, length: int) -> Buffer:
    return bytes(length)
