"""The kernel-facing skin: pyfuse3 operations over the served disks.

    MOUNTPOINT/NAME.img                  flat disk (read-write)
    MOUNTPOINT/control/.status           the daemon and every chain, served or refused
    MOUNTPOINT/control/NAME/{chain,jobs,events,bitmaps,dirty} read
    MOUNTPOINT/control/NAME/{snapshot,stream,commit,copy,backup}            write
    MOUNTPOINT/control/NAME/{cancel,complete,speed,pause,resume,change}     write (job verbs)
    MOUNTPOINT/control/NAME/bitmap                                          write
    MOUNTPOINT/layers/NAME/LAYER.img     each layer as a read-only disk (``views``)
    MOUNTPOINT/control/NAME/{adopt,inactivate,activate}     write (ownership, many hosts)

This class only translates: requests become calls on ``Disk``/``Chain``, and chainfs
errors become ``FUSEError`` here and nowhere else.  Any other exception is logged and
answered with EIO, because an exception escaping a handler would end the mount.

Inode numbers are fixed at start: 1 root, 2 ``control``, 3 ``control/.status``, 4
``layers``, and a block of 32 per chain.  Layer views live in a range of their own, from
2**32 up, a block of 2**24 per chain (``view_inode``): the block's first inode is
``layers/NAME``, then one per view slot (``Views``: a name keeps its slot for the
mount's life).  A name or an inode is found by dicts (``_index``), never by a walk of
the disks: a lookup costs the same for 10,000 chains as for one.  The flat files are
opened with ``keep_cache``: live operations never change what the disk shows, so the
kernel's page cache stays coherent.  A view of a backing layer is fixed while open (jobs
that would change it are refused), so it uses the page cache too, dropped at each open;
the active layer's view changes with the flat file, under another inode, so it is read
with ``direct_io``.

Locking contract: every handler runs on the trio thread.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3

from . import fastread, features
from .chain import Chain
from .control import COMMANDS, CommandError, format_line
from .disk import Disk, Writer
from .errors import ChainfsError
from .eventlog import EventLog
from .logs import Throttle, describe_call
from .source import Source
from .views import View

log = logging.getLogger(__name__)
_throttle = Throttle(log)

ROOT = pyfuse3.ROOT_INODE
CONTROL = 2
STATUS = 3
LAYERS = 4
# a read of a control file's text is answered with at most this much (a short read: the
# files are ``direct_io``, so the reader asks again from there, as with /proc): the
# kernel asks up to 1 MiB a request, and the one request worker copying that much of a
# 1.7 MB ``.status`` (10,000 chains) held every disk's read behind it
TEXT_PIECE = 64 * 1024
# chains' lines of ``.status`` rendered for one read at most (kept lines are only
# copied): the first read after the mount, or a mount that owns none of 10,000 chains
# (each not-owned line rendered afresh, an owner file read), would otherwise render
# every line in one request
STATUS_RENDERS = 4
FIRST_CHAIN = 16
PER_CHAIN = 32
IMG, DIR = 0, 1
READ_FILES = ("chain", "jobs", "events", "bitmaps", "dirty")
WRITE_FILES = COMMANDS  # snapshot stream commit copy backup, then the job verbs
CONTROL_FILES = READ_FILES + WRITE_FILES  # offsets 2.. within a chain's block
_CONTROL_PART = {n.encode(): 2 + i for i, n in enumerate(CONTROL_FILES)}
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
FIRST_VIEW = 1 << 32  # layers/NAME and its views: above any chain block
PER_CHAIN_VIEWS = 1 << 24  # layers/NAME, then up to 2**24 - 1 view slots


def view_inode(index: int, slot: int | None) -> int:
    """The inode of ``layers/NAME`` (``slot`` None) or of a view, for the chain at
    ``index`` in the mount's list."""
    k = 0 if slot is None else 1 + slot
    if not 0 <= k < PER_CHAIN_VIEWS:
        raise ChainfsError(f"view slot {slot} is past the {PER_CHAIN_VIEWS - 1} of a chain")
    return FIRST_VIEW + index * PER_CHAIN_VIEWS + k


def split_view_inode(inode: int) -> tuple[int, int | None] | None:
    """``view_inode`` backwards: (chain index, slot or None), or None for other inodes."""
    if inode < FIRST_VIEW:
        return None
    index, k = divmod(inode - FIRST_VIEW, PER_CHAIN_VIEWS)
    return index, (None if k == 0 else k - 1)


P = ParamSpec("P")
R = TypeVar("R")


def translate_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """ChainfsError -> FUSEError(errno); anything else is logged and becomes EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if log.isEnabledFor(logging.DEBUG):  # -o debug: one line per request
            log.debug("request %s", describe_call(fn.__name__, args[1:]))
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ChainfsError as e:
            # a damaged cluster fails every read of it: keep the log readable
            _throttle.warning((fn.__name__, type(e)), "%s failed: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:
            _throttle.log(
                logging.ERROR,
                (fn.__name__, type(e)),
                "%s failed unexpectedly",
                fn.__name__,
                exc_info=True,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class Handle:
    inode: int
    disk: Disk | None
    data: bytes | None = None  # content snapshot of a read-only control file
    flat: Chain | None = None  # a flat file's chain (the short way for its reads)
    writer: Writer | None = None  # a command file's writes so far: one command
    direct: bool = False  # a flat file opened with O_DIRECT (see ``write``)
    view: View | None = None  # a layer view (``disk.views`` serves it)
    reader: bool = False  # a flat file of a chain another host owns (``Disk.open_reader``)
    status: StatusReader | None = None  # ``.status``: its text, rendered as reads reach it
    events: EventLog | None = None  # ``events``: the log it was opened on (``EventLog.read``)


class StatusReader:
    """One open of ``control/.status``: the text, rendered as the reads reach it, a few
    chains' lines per read at most (``Operations.status_piece``): each line is as of
    when a read reached it.  Reads at any offset (the text is rendered up to there).
    Once whole and unchanged since (``Operations._status_done``) it is shared by the
    next opens, never appended to again."""

    def __init__(self, head: bytes, changes: int) -> None:
        self.text = bytearray(head)
        self.next = 0  # the next disk, by place, whose line is to be added
        # the refused chains' lines, once every disk's line is in ``text`` (served from
        # there: not copied in, 1.6 MB at 7,000 refusals)
        self.tail: bytes | None = None
        self.changes = changes  # ``Operations._status_changes`` at the open


def _unshared(disk: Disk) -> bool:
    """Whether nobody but this mount may change the chain's layers now, so that pyfuse3
    may answer reads of its flat file from the host clusters it last saw (``fastread``):
    owned here and neither suspended nor fenced, or served read-only under QEMU's
    locks."""
    if disk.fenced is not None or disk.suspended is not None:
        return False
    return disk.owned or disk.chain.locked


class Operations(pyfuse3.Operations):
    """pyfuse3 operations for one mount."""

    supports_dot_lookup = False

    def __init__(
        self, disks: list[Disk], source: Source, *, readonly: bool, mountpoint: str
    ) -> None:
        super().__init__()
        self.disks = disks
        self.source = source
        self.readonly = readonly
        self.mountpoint = mountpoint
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self.handles: dict[int, Handle] = {}
        self._read_maps: dict[int, fastread.ReadMap] = {}  # by a flat file's inode
        self._next_fh = 1
        # lookups: a disk's place in ``disks`` (its inode blocks) and each fixed
        # directory's entries, listed and by name, so that no request walks the disks.
        # The disks are fixed for the mount's life and so are their names (jobs change
        # a chain's layers, hence its views, never the chain's name); ``_indexed``
        # still rebuilds them should the list ever grow.
        self._place: dict[Disk, int] = {}
        self._entries: dict[int, list[tuple[bytes, int]]] = {}
        self._by_name: dict[int, dict[bytes, int]] = {}
        self._indexed = -1
        self._size = 0  # the disks' sizes summed (``statfs``: fixed, as each disk's is)
        # ``.status``: the daemon's line, a line per disk (kept, by place), the refused
        # chains' lines; the disks whose line must be rendered again, and those rendered
        # at every read (not owned here: a lock probe); the text as last joined
        self._status_head = (
            format_line(
                [
                    ("pid", os.getpid()),
                    ("source", source.path),
                    ("mountpoint", mountpoint),
                    ("readonly", readonly),
                    ("pyfuse3", features.pyfuse3_version()),
                    ("holes", features.holes()),
                ]
            ).encode()
            + b"\n"
        )
        self._status_parts: list[bytes] = []
        self._status_stale: set[Disk] = set()
        self._status_live: set[Disk] = set()
        self._status_refused = -1
        self._status_refusals = b""
        self._status: bytes | None = None
        # the text as last read whole, while no line changed since (and no line is of a
        # chain not owned here): the next opens read it as it is
        self._status_done: StatusReader | None = None
        self._status_changes = 0  # lines changed (``_status_changed``, refusals)
        # the text's size as last read to its end (``getattr``: no rendering there; the
        # file is ``direct_io``, its reads go on past an outdated size to the end)
        self._status_size = 0
        self._index()

    # -- inode arithmetic --------------------------------------------------------------

    def _index(self) -> None:
        """Build the lookup dicts if the list of disks changed (once, at start):
        O(disks) then, O(1) per request after."""
        if self._indexed == len(self.disks):
            return
        place: dict[Disk, int] = {}
        for i, d in enumerate(self.disks):
            place.setdefault(d, i)
        self._place = place
        self._indexed = len(self.disks)  # (before the entries: they use ``_place``)
        self._entries = {
            ROOT: [(b"control", CONTROL), (b"layers", LAYERS)]
            + [(f"{d.name}.img".encode(), self._inode(d, IMG)) for d in self.disks],
            LAYERS: [(d.name.encode(), self._view_inode(d, None)) for d in self.disks],
            CONTROL: [(b".status", STATUS)]
            + [(d.name.encode(), self._inode(d, DIR)) for d in self.disks],
        }
        by_name: dict[int, dict[bytes, int]] = {}
        for parent, entries in self._entries.items():
            names: dict[bytes, int] = {}
            for name, inode in entries:
                names.setdefault(name, inode)  # (a name twice: the first, as a walk found)
            by_name[parent] = names
        self._by_name = by_name
        self._size = sum(d.chain.size for d in self.disks)
        self._status_parts = [b""] * len(self.disks)
        self._status_stale = set(self.disks)
        self._status_live = set()
        self._status = self._status_done = None
        self._status_changes += 1
        for d in self.disks:
            d.on_status = self._status_changed

    def _disk_of(self, inode: int) -> tuple[Disk, int] | None:
        if inode < FIRST_CHAIN:
            return None
        i, part = divmod(inode - FIRST_CHAIN, PER_CHAIN)
        if i >= len(self.disks) or part >= 2 + len(CONTROL_FILES):
            return None
        return self.disks[i], part

    def _inode(self, disk: Disk, part: int) -> int:
        self._index()
        return FIRST_CHAIN + self._place[disk] * PER_CHAIN + part

    def _view_of(self, inode: int) -> tuple[Disk, View | None] | None:
        """``layers/NAME`` (view None) or one of its views, by inode; None if none."""
        found = split_view_inode(inode)
        if found is None or found[0] >= len(self.disks):
            return None
        disk, slot = self.disks[found[0]], found[1]
        if slot is None:
            return disk, None
        view = disk.views.by_slot.get(slot)
        return None if view is None else (disk, view)

    def _view_inode(self, disk: Disk, view: View | None) -> int:
        self._index()
        return view_inode(self._place[disk], None if view is None else view.slot)

    # -- attributes ------------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(inode)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        a.entry_timeout = 1.0
        a.attr_timeout = 0.0
        t = self.started_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        if inode in (ROOT, CONTROL, LAYERS):
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            a.st_nlink = 2
            return a
        if inode >= FIRST_VIEW:
            return self._view_attr(inode, a)
        if inode == STATUS:
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            a.st_nlink = 1
            a.st_size = self._status_size
            return a
        found = self._disk_of(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        disk, part = found
        a.st_nlink = 1
        if part == IMG:
            writable = not self.readonly and disk.writable_here
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | (0o600 if writable else 0o400))
            a.st_size = disk.chain.size
            # the data SEEK_DATA finds, as last counted (never a walk per stat)
            a.st_blocks = -(-disk.chain.allocated() // 512)
            a.st_mtime_ns, a.st_ctime_ns = disk.mtime_ns, disk.ctime_ns
            a.attr_timeout = 1.0
        elif part == DIR:
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            a.st_nlink = 2
        else:
            name = CONTROL_FILES[part - 2]
            if name in READ_FILES:
                a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
                a.st_size = len(self._read_file(disk, name))
            else:
                a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o200)
        return a

    def _view_attr(self, inode: int, a: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        found = self._view_of(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        disk, view = found
        if view is None:
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
            a.st_nlink = 2
            return a
        views = disk.views
        # the disks' mode without write: other users never read a disk
        a.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o400)
        a.st_nlink = 1
        a.st_size = views.size(view)
        a.st_blocks = -(-views.allocated(view) // 512)
        a.entry_timeout = 0.0  # a view a job ended is gone at once
        if views.is_active(view):  # changing: the flat file's times
            a.st_mtime_ns, a.st_ctime_ns = disk.mtime_ns, disk.ctime_ns
        return a

    def _read_file(self, disk: Disk, name: str) -> bytes:
        if name == "chain":
            return disk.chain_text()
        if name == "jobs":
            return disk.jobs_text()
        if name == "bitmaps":
            return disk.bitmaps_text()
        if name == "dirty":
            return disk.dirty_text()
        return bytes(disk.events)  # the history at mount and every line since

    def status_text(self) -> bytes:
        """``control/.status`` whole, at once: the daemon's line, one per served chain,
        one per refused chain.  Each served chain's line is kept and rendered again only
        after it changed (``Disk.on_status``: its active layer, ownership, warning) or,
        for a chain this mount does not own, at every read (who holds it: its owner
        file, read at that moment); the text is joined again only then.  The reads of the
        file do not use this: they render a few lines each (``status_piece``), so that
        none holds the other disks' requests for long."""
        self._index()
        refusals = self._status_refusals_text()
        if self._status is not None and not self._status_stale and not self._status_live:
            return self._status
        parts = [self._status_part(i)[0] for i in range(len(self.disks))]
        text = b"".join((self._status_head, *parts, refusals))
        self._status_size = len(text)
        if not self._status_live:
            self._status = text
        return text

    def _status_reader(self) -> StatusReader:
        """An open of ``.status``: the text last read whole if no line changed since,
        else one to render (nothing rendered yet)."""
        self._index()
        self._status_refusals_text()  # (their number changed: a change)
        done = self._status_done
        if done is not None and done.changes == self._status_changes:
            return done
        return StatusReader(self._status_head, self._status_changes)

    def status_piece(self, reader: StatusReader, off: int, size: int) -> bytes:
        """What a read of ``.status`` at ``off`` gets: at most ``TEXT_PIECE`` bytes (a
        short read), the text rendered on to there, at most ``STATUS_RENDERS`` lines
        rendered (kept ones are copied) unless that leaves nothing to give."""
        self._index()
        want = off + min(size, TEXT_PIECE)
        text, renders = reader.text, 0
        lines: list[bytes] = []  # (joined once: an append a line cost more)
        end = len(text)
        while reader.tail is None and end < want:
            if renders >= STATUS_RENDERS and end > off:
                break
            if reader.next < len(self.disks):
                line, rendered = self._status_part(reader.next)
                lines.append(line)
                end += len(line)
                reader.next += 1
                renders += rendered
            else:
                text += b"".join(lines)
                lines = []
                reader.tail = self._status_refusals_text()
                self._status_size = len(text) + len(reader.tail)
                if reader.changes == self._status_changes and not self._status_live:
                    self._status_done = reader  # whole, every line as it is now: kept
        if lines:
            text += b"".join(lines)
        n, tail = len(text), reader.tail
        if tail is None or want <= n:
            return bytes(memoryview(text)[off:want])
        if off >= n:
            return tail[off - n : want - n]
        return bytes(memoryview(text)[off:]) + tail[: want - n]

    def _status_part(self, i: int) -> tuple[bytes, bool]:
        """The line of the disk at place ``i``: kept, or rendered (True) when it
        changed or is not owned here."""
        disk = self.disks[i]
        if disk not in self._status_stale and disk not in self._status_live:
            return self._status_parts[i], False
        line = self._status_line(disk)
        self._status_parts[i] = line
        self._status_stale.discard(disk)
        if disk.owned or disk.fenced is not None:
            self._status_live.discard(disk)
        else:
            self._status_live.add(disk)
            self._status = None  # (rendered at every read: never kept whole)
        return line, True

    def _status_refusals_text(self) -> bytes:
        """The refused chains' lines (joined again only when their number changed)."""
        refused = len(self.source.refused)
        if refused != self._status_refused:
            self._status_refused = refused
            self._status = self._status_done = None
            self._status_changes += 1
            self._status_refusals = b"".join(
                format_line(
                    [
                        ("chain", r.name),
                        ("status", "refused"),
                        ("path", r.path),
                        ("reason", r.reason),
                    ]
                ).encode()
                + b"\n"
                for r in self.source.refused
            )
        return self._status_refusals

    def _status_line(self, disk: Disk) -> bytes:
        line: list[tuple[str, object]] = [
            ("chain", disk.name),
            ("status", "served"),
            ("active", disk.chain.active.path),
            *disk.owner_pairs(),
        ]
        if disk.warning:
            line.append(("warning", disk.warning))
        return format_line(line).encode() + b"\n"

    def _status_changed(self, disk: Disk) -> None:
        """``disk``'s line of ``.status`` is out of date (``Disk.on_status``)."""
        self._status_stale.add(disk)
        self._status = self._status_done = None
        self._status_changes += 1

    def forget_cache(self, disk: Disk) -> None:
        """Drop the kernel's cached pages and attributes of ``disk``'s flat file (another
        host may have written the chain: close-to-open)."""
        try:
            pyfuse3.invalidate_inode(pyfuse3.InodeT(self._inode(disk, IMG)), attr_only=False)
        except (OSError, LookupError, ValueError) as e:  # not cached, not mounted yet, gone
            log.debug("chain=%s cache not invalidated: %s", disk.name, e)

    # -- lookups ---------------------------------------------------------------------------

    def _children(self, inode: int) -> list[tuple[bytes, int]]:
        self._index()
        fixed = self._entries.get(inode)
        if fixed is not None:  # the root, ``control``, ``layers``: built once
            return fixed
        if inode >= FIRST_VIEW:
            view_dir = self._view_of(inode)
            if view_dir is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            disk, view = view_dir
            if view is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return [(os.fsencode(v.name), self._view_inode(disk, v)) for v in disk.views.listing]
        found = self._disk_of(inode)
        if found is not None and found[1] == DIR:
            disk = found[0]
            return [(n.encode(), self._inode(disk, 2 + i)) for i, n in enumerate(CONTROL_FILES)]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    @translate_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        view_dir = self._view_of(parent_inode) if parent_inode >= FIRST_VIEW else None
        if view_dir is not None and view_dir[1] is None:  # layers/NAME: by name, any depth
            disk = view_dir[0]
            view = disk.views.by_name.get(os.fsdecode(name))
            if view is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self._view_inode(disk, view))
        self._index()
        names = self._by_name.get(parent_inode)
        if names is not None:  # the root, ``control``, ``layers``: a dict, never a walk
            inode = names.get(name)
        else:
            found = self._disk_of(parent_inode)
            if found is None or found[1] != DIR:
                self._children(parent_inode)  # ENOENT or ENOTDIR, as a listing says
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            part = _CONTROL_PART.get(name)
            inode = None if part is None else self._inode(found[0], part)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    @translate_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @translate_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if inode >= FIRST_VIEW or inode == LAYERS:
            raise pyfuse3.FUSEError(errno.EROFS)  # the layer views are read-only
        found = self._disk_of(inode)
        # ``echo cmd > control/x/stream`` truncates first: harmless on a control file
        if fields.update_size and (
            found is None or found[1] < 2 or CONTROL_FILES[found[1] - 2] in READ_FILES
        ):
            raise pyfuse3.FUSEError(errno.EPERM if found else errno.EISDIR)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if found is not None and found[1] == IMG and fields.update_mtime:
            found[0].mtime_ns = attr.st_mtime_ns
        return self._attr(inode)

    @translate_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self._children(inode)
        return inode

    @translate_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._children(fh)
        for i in range(start_id, len(entries)):  # (no copy of the rest: O(n) a listing)
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------------

    @translate_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        fh = self._next_fh
        self._next_fh += 1
        if inode == STATUS:
            if writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            self.handles[fh] = Handle(inode, None, status=self._status_reader())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if inode >= FIRST_VIEW:
            return self._open_view(fh, inode, writing)
        found = self._disk_of(inode)
        if found is None or found[1] == DIR:
            raise pyfuse3.FUSEError(errno.EISDIR if found else errno.ENOENT)
        disk, part = found
        if part == IMG:
            if writing and (self.readonly or disk.readonly):  # (or a chain too deep)
                raise pyfuse3.FUSEError(errno.EROFS)
            if writing:
                disk.check_writable()
            direct = bool(flags & os.O_DIRECT)
            reader = not disk.owned
            self.handles[fh] = Handle(inode, disk, flat=disk.chain, direct=direct, reader=reader)
            if reader:
                disk.open_reader()
            # a chain served for another host's writes: its page cache cannot be kept
            return pyfuse3.FileInfo(fh=fh, keep_cache=disk.owned, direct_io=not disk.owned)
        name = CONTROL_FILES[part - 2]
        if name in READ_FILES:
            if writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            if name == "events":
                self.handles[fh] = Handle(inode, disk, events=disk.events)
            else:
                self.handles[fh] = Handle(inode, disk, self._read_file(disk, name))
        else:
            if not writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            self.handles[fh] = Handle(inode, disk, writer=Writer())
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _open_view(self, fh: int, inode: int, writing: bool) -> pyfuse3.FileInfo:
        found = self._view_of(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        disk, view = found
        if view is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        disk.views.open(view)
        self.handles[fh] = Handle(inode, disk, view=view)
        # the active layer's view changes as the flat file is written: no page cache;
        # another is fixed while open, and its cache dropped at each open
        return pyfuse3.FileInfo(fh=fh, direct_io=disk.views.is_active(view))

    @translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        if h.view is not None:
            assert h.disk is not None
            return cast(bytes, h.disk.views.read(h.view, off, size))
        if h.flat is not None:
            disk = h.disk
            if disk is not None:
                if h.flat is not disk.chain:
                    h.flat = disk.chain  # reopened by a hand-over
                if h.flat.read_map is None and fastread.AVAILABLE and _unshared(disk):
                    h.flat.attach_read_map(self._read_map(h.inode), writes=fastread.WRITES)
            # pyfuse3 takes any contiguous buffer; a bytearray saves a copy
            return cast(bytes, h.flat.read(off, size))
        if h.status is not None:
            return self.status_piece(h.status, off, size)
        if h.data is not None:  # (a short read past TEXT_PIECE: see there)
            return h.data[off : off + min(size, TEXT_PIECE)]
        # events: live, append-only, so ``tail -f`` follows it (also across a take-over,
        # which puts the chain's history in its place: ``EventLog.carry_into``)
        assert h.events is not None
        return h.events.read(off, size)

    def _read_map(self, inode: int) -> fastread.ReadMap:
        """The read map of a flat file's inode (``fastread``), one per inode."""
        found = self._read_maps.get(inode)
        if found is None:
            found = self._read_maps[inode] = fastread.ReadMap(inode)
        return found

    @translate_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        found = self._disk_of(h.inode)
        if found is None or h.disk is None or h.view is not None:
            raise pyfuse3.FUSEError(errno.EBADF)
        disk, part = found
        if part == IMG:
            size = disk.chain.size
            if off >= size or (h.direct and off + len(buf) > size):
                # past the end, as a block device: ENOSPC.  A direct write that crosses
                # the end is refused whole, before any byte is written: the kernel's
                # asynchronous direct I/O would turn a short write into EIO
                raise pyfuse3.FUSEError(errno.ENOSPC)
            # a buffered one is cut short at the end: the kernel hands the count back
            n = min(len(buf), size - off)
            disk.check_writable()
            disk.touch()  # before the host write, so the images' mtimes are never older
            chain = disk.chain
            if chain.read_map is None and fastread.WRITES and _unshared(disk):
                # (the overwrites it marks are pyfuse3's from then on: ``fastread``)
                chain.attach_read_map(self._read_map(h.inode), writes=True)
            try:
                chain.write(off, memoryview(buf)[:n])
            except ChainfsError as e:
                disk.check_owner(e)  # an EIO from a locked file may be a lost lock
                raise
            return n
        try:
            rest = disk.command(CONTROL_FILES[part - 2], bytes(buf), h.writer)
            if rest is not None:  # a hand-over waiting for its job to stop
                await rest
        except CommandError as e:
            log.warning("chain=%s command refused: %s", disk.name, e)
            raise pyfuse3.FUSEError(e.errno) from None
        return len(buf)

    @translate_errors
    async def lseek(self, fh: int, off: int, whence: int, ctx: Any = None) -> int:
        """SEEK_DATA/SEEK_HOLE (the only ones the kernel sends): the flat file's holes
        through the whole chain; a control file is all data up to its size."""
        h = self.handles[fh]
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if h.view is not None:
            assert h.disk is not None
            found = h.disk.views.seek(h.view, off, data=whence == SEEK_DATA)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return found
        if h.flat is not None:
            flat = h.disk.chain if h.disk is not None else h.flat
            found = flat.seek_data(off) if whence == SEEK_DATA else flat.seek_hole(off)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return found
        if h.data is not None:
            size = len(h.data)
        elif h.events is not None:
            size = len(h.events)
        else:
            size = 0  # a command file reads nothing
        if off < 0 or off >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return off if whence == SEEK_DATA else size

    @translate_errors
    async def fallocate(self, fh: int, mode: int, off: int, length: int, ctx: Any = None) -> None:
        """On a flat file: PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE make the range read as
        zeros, giving back what the active layer held (``Chain.discard``); mode 0 and
        KEEP_SIZE (preallocate) change nothing within the disk; past its end, as a write
        (ENOSPC), but for KEEP_SIZE, which stops at the end.  Anything else: EOPNOTSUPP."""
        h = self.handles[fh]
        if h.flat is None or h.disk is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if self.readonly or h.disk.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        h.disk.check_writable()
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        chain, size = h.disk.chain, h.disk.chain.size
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        op = mode & ~FALLOC_FL_KEEP_SIZE
        if op not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) or (
            op == FALLOC_FL_PUNCH_HOLE and not keep
        ):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        end = off + length
        if end > size and not keep:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # the disk cannot grow, as a write
        end = min(end, size)
        if op == 0 or off >= end:
            return  # preallocate: every byte of the disk is there already
        h.disk.touch()
        chain.discard(off, end - off)
        chain.refresh_allocation(min_interval=1.0)  # st_blocks; fsync recounts at once

    @translate_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles.get(fh)
        if h is not None and h.disk is not None and h.view is None:
            if h.disk.fenced is not None or h.disk.suspended is not None:
                h.disk.check_writable()
            try:
                h.disk.chain.flush()
            except ChainfsError as e:
                h.disk.check_owner(e)
                raise
            h.disk.chain.refresh_allocation()  # st_blocks, if writes changed the data

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None and h.view is not None and h.disk is not None:
            h.disk.views.release(h.view)
        if h is not None and h.reader and h.disk is not None:
            h.disk.close_reader()

    @translate_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        self._index()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self._size // 4096  # summed once: a disk's size never changes
        s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
