"""Layer views: every layer of a served chain as a read-only disk of its own.

    MOUNTPOINT/layers/CHAIN/LAYER.img    the disk as LAYER shows it (it and every layer below)

A view of a layer still in the chain reads through the served chain from that layer's
level down (``Chain.read(..., level)``: the flat file's map and plan, the same speed); a
layer that left the chain still valid (stream, copy) keeps its view, served by a
read-only chain of its own opened on first use, without image locks (nothing writes a
layer that left, and a second lock on a file the chain holds would refuse the chain's
own jobs).  The active layer's view is the flat file's content, changing with it.

The rule, one for every job (``Views.refuse``, ``Views.refresh``): a job names the
layers it writes into (stream its node, commit its base; copy and snapshot none).  While
a view other than the active layer's is open and reads one of them (the layer itself or
one below it), the job is refused with EBUSY naming the view; while the job runs such a
view cannot be opened (EBUSY); once the job has ended (done, cancelled or failed) or the
chain changed, every view that reads a written layer is over: its open descriptors get
EIO, never stale or mixed bytes, and its name shows the layer's new view if the layer is
still in the chain, or nothing (ENOENT) if it left.  A layer that left the chain without
reading a written layer (stream's removed layers, copy's old ones) keeps its view, open
descriptors included.  So the active layer's view, which never refuses a job, ends with
any job that writes into a layer it reads (a stream into it, an active commit: its layer
left for a base the commit wrote); after a snapshot it stays open, now a backing layer's.

Inode slots: each view name gets a slot, fixed for the mount's life, kept by the views
that follow it under the same name (``by_slot``, ``by_name``: dicts, so a lookup or a
stat costs the same for 1,000 layers as for 1).

Locking contract: used only from the trio thread; reads take the chain's lock as the
flat file's do.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from .chain import Chain
from .control import CommandError
from .errors import ChainfsError

log = logging.getLogger(__name__)

SUFFIX = ".img"


class ViewError(ChainfsError):
    """A view cannot be opened or read; ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def view_name(path: str) -> str:
    """The file name of a layer's view: the layer's file name as in ``chain``, + .img."""
    return os.path.basename(path) + SUFFIX


@dataclass(eq=False)
class View:
    """One layer's view, for one generation: a later view of the same layer (same name,
    same slot) is another ``View``; this one, once over, answers EIO."""

    name: str
    path: str
    slot: int
    alive: bool = True
    opened: int = 0  # open descriptors
    counted: int | None = None  # data bytes (st_blocks), counted at the first open
    size: int = 0  # the layer's virtual size
    # a layer that left the chain: the layer paths it reads (``paths[level:]``) as the
    # chain stood when it left, and its own chain once opened
    paths: list[str] | None = None
    level: int = 0
    own: Chain | None = field(default=None, repr=False)

    @property
    def retired(self) -> bool:
        return self.paths is not None


class Views:
    """The views of one served chain."""

    def __init__(self, chain_name: str, chain: Chain) -> None:
        self.chain_name = chain_name
        self.chain = chain
        self.by_name: dict[str, View] = {}
        self.by_slot: dict[int, View] = {}
        self._slots: dict[str, int] = {}  # name -> slot, for the mount's life
        self.listing: list[View] = []  # the chain's layers, active first, then retired
        self._paths: list[str] = []  # the chain's layer paths as views know them
        self._level: dict[str, int] = {}  # path -> index in ``_paths``
        self.writing: set[str] = set()  # the layers the running job writes into
        self.writer = ""  # that job's id
        self._below: list[int] | None = None  # host bytes of layers[i:], for st_blocks
        self.refresh()

    # -- which view is which -----------------------------------------------------------

    def shown(self, view: View) -> str:
        return f"layers/{self.chain_name}/{view.name}"

    def level(self, view: View) -> int:
        """The chain level a view of a layer in the chain reads from."""
        return self._level[view.path]

    def is_active(self, view: View) -> bool:
        return not view.retired and self._level.get(view.path) == 0

    def _reads(self, view: View, paths: set[str], reach: int) -> bool:
        """Whether ``view`` reads one of ``paths``, the deepest of which sits at level
        ``reach`` of the chain (-1: none in the chain)."""
        if not paths:
            return False
        if view.paths is not None:
            return any(p in paths for p in view.paths[view.level :])
        return self._level[view.path] <= reach

    def _reach(self, paths: set[str]) -> int:
        return max((self._level[p] for p in paths if p in self._level), default=-1)

    # -- jobs ----------------------------------------------------------------------------

    def refuse(self, job_id: str, writes: list[str]) -> None:
        """Before a job that writes into ``writes`` starts: EBUSY if an open view other
        than the active layer's reads one of them; else they are being written."""
        paths = set(writes)
        reach = self._reach(paths)
        for view in self.listing:
            if view.opened and not self.is_active(view) and self._reads(view, paths, reach):
                raise CommandError(
                    errno.EBUSY,
                    f"{self.shown(view)} is open and the job would change what it shows",
                )
        self.writing, self.writer = paths, job_id

    def job_ended(self) -> None:
        """A job is over (done, cancelled, failed): the views reading what it wrote end."""
        if self.writing:
            self.refresh()

    # -- following the chain -----------------------------------------------------------

    def refresh(self) -> None:
        """After the chain changed (or a job that wrote into it ended): end the views
        that read a written layer, keep the others, and give every layer of the chain a
        view."""
        written, self.writing, self.writer = self.writing, set(), ""
        old_paths, old_level = self._paths, self._level
        reach = self._reach(written)
        paths = [x.path for x in self.chain.layers]
        level = {p: i for i, p in enumerate(paths)}
        kept: list[View] = []
        for view in self.listing:
            if self._reads(view, written, reach) or not self._same_below(view, paths, level):
                self._end(view)
                continue
            if view.paths is None and view.path not in level:
                # left the chain without reading a written layer: still a valid disk
                view.paths, view.level = old_paths, old_level[view.path]
            kept.append(view)
        self._paths, self._level, self._below = paths, level, None
        fresh: list[View] = []
        names: set[str] = set()
        for p, layer in zip(paths, self.chain.layers, strict=True):
            name = view_name(p)
            if name in names:
                continue  # a file name an upper layer has too (another directory): no view
            names.add(name)
            current = self.by_name.get(name)
            if current is None or current.path != p or current.retired:
                if current is not None:  # a retired layer of the same name: the chain's wins
                    self._end(current)
                slot = self._slots.setdefault(name, len(self._slots))
                current = View(name, p, slot)
                self.by_name[name] = self.by_slot[slot] = current
            current.size = layer.virtual_size  # kept for when the layer leaves
            fresh.append(current)
        shown = set(fresh)
        for view in kept:
            if not view.retired and view not in shown:
                self._end(view)  # now under a name an upper layer has
        self.listing = fresh + [v for v in kept if v.retired and v.alive]

    def _same_below(self, view: View, paths: list[str], level: dict[str, int]) -> bool:
        """A view of a layer that stays in the chain reads the same layers as before
        (every change of what lies below comes with a write, but a view never guesses)."""
        if view.retired or view.path not in level:
            return True
        old = self._level[view.path]
        new = level[view.path]
        return len(self._paths) - old == len(paths) - new and (
            old + 1 == len(self._paths) or self._paths[old + 1] == paths[new + 1]
        )

    def _end(self, view: View) -> None:
        view.alive = False
        if self.by_name.get(view.name) is view:
            del self.by_name[view.name]
            del self.by_slot[view.slot]
        if view.own is not None:
            own, view.own = view.own, None
            try:
                own.close()
            except ChainfsError as e:
                log.warning("chain=%s %s did not close cleanly: %s", self.chain_name, view.name, e)

    def close(self) -> None:
        for view in self.listing:
            if view.own is not None:
                self._end(view)

    # -- serving a view ------------------------------------------------------------------

    def _own(self, view: View) -> Chain:
        """A retired layer's own read-only chain, opened on first use, unlocked."""
        if view.own is None:
            view.own = Chain.open(view.path, writable=False, lock=False, confine=self.chain.confine)
        return view.own

    def _where(self, view: View) -> tuple[Chain, int]:
        if not view.alive:
            raise ViewError(
                errno.EIO,
                f"{self.shown(view)} is gone: a job changed a layer it reads",
            )
        if view.retired:
            return self._own(view), 0
        return self.chain, self._level[view.path]

    def open(self, view: View) -> None:
        """A descriptor opens: EBUSY while a job writes into a layer the view reads
        (but for the active layer's view, which is the flat file's content)."""
        busy = self.writing and not self.is_active(view)
        if busy and self._reads(view, self.writing, self._reach(self.writing)):
            raise ViewError(
                errno.EBUSY, f"{self.shown(view)} is changing: job {self.writer!r} writes into it"
            )
        chain, level = self._where(view)
        # (a big disk's view is not counted: its st_blocks stays what its layers take
        # on the host, as the flat file's until its count in the background ends)
        if view.counted is None and not self.is_active(view) and chain.count_is_cheap(level):
            try:
                view.counted = chain.count_data(level)
            except ChainfsError:  # damaged metadata: its reads say so; a count must not
                view.counted = chain.host_estimate(level)
        view.opened += 1

    def release(self, view: View) -> None:
        view.opened -= 1

    def read(self, view: View, offset: int, length: int) -> bytes | bytearray:
        chain, level = self._where(view)
        return chain.read(offset, length, level)

    def seek(self, view: View, offset: int, *, data: bool) -> int | None:
        chain, level = self._where(view)
        return chain.seek_data(offset, level) if data else chain.seek_hole(offset, level)

    def size(self, view: View) -> int:
        return view.size  # a layer's size changes only by a job that writes into it

    def allocated(self, view: View) -> int:
        """``st_blocks`` in bytes, cheaply: the active layer's view has the flat file's;
        another, the data counted at its first open, or before that what the layers it
        reads take on the host (capped at its size)."""
        if self.is_active(view):
            return self.chain.allocated()
        if view.counted is not None:
            return view.counted
        if view.retired:
            return min(view.size, self._host_bytes(view.path))
        if self._below is None:
            below, total = [0] * len(self._paths), 0
            for i in range(len(self._paths) - 1, -1, -1):
                total += self._host_bytes(self._paths[i])
                below[i] = total
            self._below = below
        return min(self.size(view), self._below[self._level[view.path]])

    @staticmethod
    def _host_bytes(path: str) -> int:
        try:
            return os.stat(path).st_blocks * 512
        except OSError:
            return 0
