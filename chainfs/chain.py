"""A chain of layers: the disk QEMU would show for its active image.

``[A] <- [B] <- [C] <- [D] <- [E]``: reads resolve down the chain to the first layer
that answers for a range (data, zeros, or a layer's end, which masks everything below);
writes go to the active layer ``E`` with copy-on-write of partial clusters read through
the whole chain.

So that a read costs the same at depth 64 as at depth 1, the chain keeps a "who holds
it" map: for a region of 8192 granules (a granule is the smallest cluster size in the
chain) one 16-bit number per granule naming the first layer that answers for it, built
at once from every layer's allocation answer with big-integer arithmetic, kept in a
bounded LRU of regions, and updated in place when a write claims granules for the active
layer.  A layer's answer can only be wrong in the safe direction (the layer says it
answers but some part is unallocated); such parts are resolved by walking down from it.

Copying between layers (stream, commit, copy) is the copy engine's (``engine.py``); the
chain owns one and tells it when its shape changes.

Locking contract: one lock per chain (``lock``) serialises every metadata access
(lookups, allocation, write-back), the copy engine's steps included; host reads of
planned extents run outside it.  Methods documented "the caller holds the lock" are for
the engine, which takes it around a whole step.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .buffers import zero_fill
from .confine import Confinement
from .engine import CopyEngine
from .errors import ChainError, ChainfsError, ReadOnlyError, UnsupportedFeature
from .formats import open_file, open_layer
from .formats.base import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Buffer,
    Extent,
    Layer,
)
from .formats.qcow2 import bitmaps, read_backing
from .hostfile import HostFile
from .locks import lock_image, unlock_image

if TYPE_CHECKING:
    from .formats.qcow2.bitmaps import Bitmaps

MAX_DEPTH = 1000  # layers: a snapshot that would pass it is refused (jobs/snapshot.py)
# how deep a chain found deeper than MAX_DEPTH may be and still be served read-only: the
# map of who holds what names a layer by 1 + its index in 16 bits
MAX_READ_ONLY_DEPTH = 0xFFFF - 1
REGION_BITS = 13  # granules per region: 8192
# a count of the data (st_blocks) over more than this many regions of the map is not
# done on the caller's thread where a background counter is set (``Chain.background``):
# 256 is a disk of 128 GiB in 64 KiB clusters, about a tenth of a second on one layer;
# a 1 PiB one took about 15 minutes, every request of the mount waiting behind it
INLINE_COUNT = 256
# a count in the background that took t seconds is not begun again until BACKGROUND_PAUSE
# times t after the last one began: a big disk written all the time costs its counting
# thread a tenth of a core at most, not a whole one
BACKGROUND_PAUSE = 10
REGION_CACHE = 256  # regions kept (16 KiB each)

Plan = list[tuple[Layer, Extent]]


def resolve_backing(overlay_path: str, backing: str) -> str:
    """Where a backing string points: relative strings are relative to the overlay's
    own directory (never the working directory), joined textually as QEMU does."""
    if backing.startswith("json:"):
        raise UnsupportedFeature(f"{overlay_path!r} has a json: backing string; not supported")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(overlay_path), backing)


def _open(
    path: str,
    fmt: str | None,
    *,
    writable: bool,
    lock: bool,
    confine: Confinement | None = None,
    what: str = "",
    shown: str = "",
) -> Layer:
    """Open one layer; with ``confine``, only a file inside it (``what`` and ``shown``
    name the file in the refusal, as ``Confinement.check_path`` says)."""
    vet: Callable[[int], None] | None = None
    if confine is not None:
        what, shown = what or f"image {path!r}", shown or path
        confine.check_path(path, what, shown)
        vet = functools.partial(confine.check_open, path=path, what=what, shown=shown)
    layer = open_layer(path, fmt, writable=writable, vet=vet)
    if lock:
        try:
            lock_image(layer.file.fd, layer.path, write=writable)
        except BaseException:
            layer.close()
            raise
    return layer


def _adopt(file: HostFile, *, lock: bool) -> Layer:
    """A qcow2 layer on an image ``create_image`` made and handed over open, holding
    the image locks of a written layer (given up when the chain takes none)."""
    try:
        if not lock:
            unlock_image(file.fd)
        return open_file(file, "qcow2")
    except BaseException:
        file.close()
        raise


def count_layers(active: str, limit: int) -> int:
    """How many layers the chain of ``active`` has, up to ``limit``, from the backing
    strings in the headers alone (nothing locked or kept open); a file that cannot be
    read as qcow2 (a raw base, a missing one) ends the count."""
    n, path, seen = 0, os.path.abspath(active), set()
    while n < limit and path not in seen:
        seen.add(path)
        n += 1
        try:
            # only regular files: opening a FIFO would block the mount forever (the
            # layer's own open refuses it with a reason)
            if not stat.S_ISREG(os.stat(path).st_mode):
                break
            string = read_backing(path)
        except (ChainfsError, OSError):
            break
        if not string:
            break
        path = os.path.normpath(resolve_backing(path, string))
    return n


class WriteHook(Protocol):
    """What a job that mirrors the disk elsewhere (commit, copy) sees of guest writes.

    Both are called under the chain's lock (not reentrant: a hook calls only the
    ``..._locked`` methods and the engine's ``copy_step_locked``), on the trio thread.
    """

    def before_write(self, offset: int, length: int) -> None:
        """The range is about to change (a failed write may have changed part of it)."""

    def after_write(self, offset: int, length: int) -> None:
        """The range changed: the active layer holds it and the map says so; the guest
        has not been answered yet."""


class ReadMap(Protocol):
    """Where pyfuse3 answers the flat file's reads itself (``fastread.ReadMap``): per
    granule, unmapped, zeros (fd None) or a range of a host file descriptor.  Filled by
    ``read``; cleared (under the lock, on the thread that serves requests) wherever a
    granule may stop showing what the map says, and before a descriptor it names is
    closed."""

    def take(self, chain: Chain) -> None: ...
    def reset(self, size: int, granule: int) -> None: ...
    def set(self, offset: int, fd: int | None, host: int = 0) -> None: ...
    def clear(self, offset: int = 0, length: int | None = None) -> None: ...
    def release(self) -> None: ...

    # overwrites pyfuse3 answers itself (``fastread.WRITES``): a granule marked with
    # ``set_writable`` until it is set or cleared again, or ``revoke_writes``
    def set_writable(self, offset: int, fd: int, host: int) -> None: ...
    def revoke_writes(self) -> None: ...
    def writes(self) -> int: ...
    def written_ns(self) -> int: ...


class Chain:
    """An open chain, active layer first."""

    # where a count of the data too big for the caller's thread (``INLINE_COUNT``) is
    # sent: a mount's counter, which runs ``count_in_background`` in a worker thread;
    # None (tools, tests): counted on the spot
    background: ClassVar[Callable[[Chain], None] | None] = None

    def __init__(self, layers: list[Layer], *, writable: bool) -> None:
        self.layers = layers
        self.writable = writable
        self.locked = False
        # where the layers this chain opens may lie (None: anywhere; a mount sets it)
        self.confine: Confinement | None = None
        self.lock = threading.Lock()  # metadata access; the copy engine takes it too
        self._regions: OrderedDict[int, array[int]] = OrderedDict()
        # the same map from a backing layer down (a layer view's, ``level`` > 0), keyed
        # by (level, region): guest writes never change it; a change of shape drops it
        self._level_regions: OrderedDict[tuple[int, int], array[int]] = OrderedDict()
        # around every guest write, under the lock (``WriteHook``): the dirty tracking
        # and the write-blocking copies of jobs that mirror the disk elsewhere
        self.write_hooks: list[WriteHook] = []
        self.engine = CopyEngine(self)  # stream, commit and copy steps
        # st_blocks of the flat file: the data bytes as last counted, and whether a
        # write, discard or change of shape may have changed them since
        self._allocated: int | None = None
        self.allocation_stale = False
        self._counted_at = 0.0  # time.monotonic() of the last count
        self._count_queued = False  # sent to ``background``, not begun yet
        self._count_took = 0.0  # seconds the last count in the background took
        self._shape = 0  # changes of shape (``_reset_granule``): a count across one is void
        self._closed = False  # (a count in a worker thread stops at its next region)
        # set when a chain deeper than MAX_DEPTH was opened read-only instead (``open``)
        self.too_deep = False
        # called with each layer ``reopen`` opens writable (a mount taking a chain after
        # an unclean stop repairs the leaks of what a resumed job writes: ``leaks``)
        self.on_writable: Callable[[Layer], None] | None = None
        # the flat file's reads pyfuse3 answers without chainfs (``attach_read_map``)
        self.read_map: ReadMap | None = None
        # and its overwrites (``_mark_writable``), when the map can take them: set by a
        # mount that has pyfuse3's write maps
        self.write_map = False
        self._written_ns = 0  # ``written_ns`` of the read map this chain last released
        self._reset_granule()

    @classmethod
    def open(
        cls,
        active_path: str,
        *,
        writable: bool = False,
        active_format: str | None = None,
        lock: bool = True,
        confine: Confinement | None = None,
        deep_read_only: bool = False,
    ) -> Chain:
        """Open the chain whose active image is ``active_path``.

        A chain deeper than ``MAX_DEPTH`` layers is refused, or with ``deep_read_only``
        opened read-only (``too_deep`` set), whatever ``writable`` asked: its depth is
        counted from the backing strings first, as opening the active layer for writing
        may already write to it (stale bitmaps, a dirty image's refcounts).

        With ``lock`` every layer gets QEMU's image locks (write locks on the active layer
        when ``writable``), so QEMU refuses to write what chainfs serves and vice versa.
        With ``confine`` (a mount's) every layer, the active one included, must lie
        inside it (``OutsideError`` names the first that does not); the chain keeps it
        for the layers it opens later.
        """
        layers: list[Layer] = []
        seen: set[str] = set()
        path, fmt = os.path.abspath(active_path), active_format
        max_depth, too_deep = MAX_DEPTH, False
        if deep_read_only:
            max_depth = MAX_READ_ONLY_DEPTH
            too_deep = count_layers(path, MAX_DEPTH + 1) > MAX_DEPTH
            writable = writable and not too_deep
        try:
            while True:
                if len(layers) >= max_depth:
                    raise ChainError(
                        f"the chain of {active_path!r} is deeper than {max_depth} layers"
                    )
                if layers:
                    string = str(layers[-1].backing_string)
                    what = f"backing file {string!r} of {layers[-1].path!r}"
                else:
                    string, what = path, f"active layer {path!r}"
                if confine is not None:
                    # first: whether a file outside exists is none of the mount's business
                    confine.check_path(path, what, string)
                if not os.path.exists(path):
                    if not layers:
                        raise ChainError(f"{path!r} does not exist")
                    raise ChainError(f"backing file {path!r} of {layers[-1].path!r} does not exist")
                real = os.path.realpath(path)
                if real in seen:
                    raise ChainError(f"backing loop: {path!r} appears twice in the chain")
                seen.add(real)
                layer = _open(
                    path,
                    fmt,
                    writable=writable and not layers,
                    lock=lock,
                    confine=confine,
                    what=what,
                    shown=string,
                )
                layers.append(layer)
                if not layer.backing_string:
                    break
                path = resolve_backing(layer.path, layer.backing_string)
                fmt = layer.backing_format
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        chain = cls(layers, writable=writable)
        chain.locked = lock
        chain.confine = confine
        chain.too_deep = len(layers) > MAX_DEPTH
        if chain.too_deep and not too_deep:  # it grew between the count and the open
            chain.close()
            raise ChainError(f"the chain of {active_path!r} changed while it was opened")
        return chain

    def __enter__(self) -> Chain:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def active(self) -> Layer:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self.layers[0].virtual_size

    def _reset_granule(self) -> None:
        sizes = [layer.cluster_size for layer in self.layers if layer.format_name != "raw"]
        self.granule = max(512, min(sizes, default=65536))
        self._regions.clear()
        self._level_regions.clear()
        self.engine.forget()
        self.allocation_stale = True
        self._shape += 1
        if self.read_map is not None:
            self.read_map.reset(self.size, self.granule)

    def attach_read_map(self, read_map: ReadMap, *, writes: bool = False) -> None:
        """Let pyfuse3 answer the flat file's reads of data clusters from ``read_map``,
        which this chain fills (``read``) and clears (``unmap``) from now on; with
        ``writes`` (pyfuse3 has write maps), overwrites in place too (``write``)."""
        with self.lock:
            if self._closed:
                return
            read_map.take(self)
            self.read_map = read_map
            self.write_map = writes
            read_map.reset(self.size, self.granule)

    def release_read_map(self) -> None:
        """Every read of the flat file through chainfs again (a suspended or lost
        ownership, a close)."""
        with self.lock:
            self._release_read_map()

    def _release_read_map(self) -> None:
        if self.read_map is not None:
            self._written_ns = max(self._written_ns, self.read_map.written_ns())
            self.read_map.release()
        self.read_map = None

    def written_ns(self) -> int:
        """When pyfuse3 last overwrote the flat file by itself (``_mark_writable``), in
        ``Disk.touch``'s clock; 0 if never."""
        rm = self.read_map
        return max(self._written_ns, rm.written_ns()) if rm is not None else self._written_ns

    def revoke_writes(self) -> None:
        """From now on every overwrite through ``write`` again, until it marks granules
        anew (a write hook, a change of the bitmaps: what the guest's writes must go
        through from the next one on).  Holding the GIL is enough: pyfuse3 holds it
        throughout a write it answers."""
        if self.read_map is not None:
            self.read_map.revoke_writes()

    def add_write_hook(self, hook: WriteHook) -> None:
        """``hook`` sees every guest write from the next one on (the caller holds the
        lock): none is pyfuse3's any more."""
        self.revoke_writes()
        self.write_hooks.append(hook)

    def unmap(self, offset: int, length: int) -> None:
        """The granules of ``[offset, offset+length)`` may stop showing the host bytes
        the read map names (the caller holds the lock): pyfuse3 no longer answers them."""
        if self.read_map is not None and length > 0:
            self.read_map.clear(offset, length)

    def _unmap_clusters(self, offset: int, length: int) -> None:
        """``unmap`` of the active layer's whole clusters around a range."""
        if self.read_map is not None:
            cs = self.active.cluster_size
            a = offset - offset % cs
            self.read_map.clear(a, -(-(offset + length) // cs) * cs - a)

    # -- the "who holds it" map ----------------------------------------------------------

    def size_at(self, level: int) -> int:
        """The size of the disk ``layers[level]`` shows (a layer view's)."""
        return self.layers[level].virtual_size

    def _holders(self, region: int, level: int = 0) -> array[int]:
        """For each granule of ``region``: 0 if no layer from ``layers[level]`` down holds
        it, else 1 + the index of the first that does."""
        cache: OrderedDict[Any, array[int]] = self._level_regions if level else self._regions
        key: object = (level, region) if level else region
        hm = cache.get(key)
        if hm is not None:
            cache.move_to_end(key)
            return hm
        g = self.granule
        start = (region << REGION_BITS) * g
        count = min(1 << REGION_BITS, -(-(self.size_at(level) - start) // g))
        # one lane per granule holding 1 + the index of the first layer answering for it;
        # 8-bit lanes while the chain is short enough, 16-bit beyond
        wide = len(self.layers) >= 255
        unresolved = int.from_bytes(b"\x01\x00" * count if wide else b"\x01" * count, "little")
        acc = 0
        spread = bytearray(2 * count) if wide else None
        for i, layer in enumerate(self.layers[level:], level):
            m = layer.allocation_map(start, count, g)
            if spread is not None:
                spread[0::2] = m.to_bytes(count, "little")
                m = int.from_bytes(spread, "little")
            take = m & unresolved
            if take:
                acc += take * (i + 1)
                unresolved ^= take
                if not unresolved:
                    break
        if wide:
            hm = array("H")
            hm.frombytes(acc.to_bytes(2 * count, "little"))
            if sys.byteorder == "big":
                hm.byteswap()
        else:
            hm = array("B", acc.to_bytes(count, "little"))
        cache[key] = hm
        if len(cache) > REGION_CACHE:
            cache.popitem(last=False)
        return hm

    def claim(self, offset: int, length: int) -> None:
        """The active layer now answers for the clusters this write touched (the caller
        holds the lock)."""
        cs, g = self.active.cluster_size, self.granule
        a = offset // cs * cs
        b = min(-(-(offset + length) // cs) * cs, self.size)
        self.unmap(a, b - a)
        ga, gb = a // g, -(-b // g)
        while ga < gb:
            r = ga >> REGION_BITS
            stop = min(gb, (r + 1) << REGION_BITS)
            hm = self._regions.get(r)
            if hm is not None:
                i0 = ga - (r << REGION_BITS)
                i1 = min(stop - (r << REGION_BITS), len(hm))
                if i1 - i0 == 1:  # one granule (a cluster of a write): no array to build
                    hm[i0] = 1
                elif i1 > i0:
                    hm[i0:i1] = array(hm.typecode, [1]) * (i1 - i0)
            ga = stop

    def invalidate(self) -> None:
        """Forget the map (after the chain's shape changed)."""
        with self.lock:
            self._reset_granule()

    # -- planning and reading --------------------------------------------------------------

    def _plan(self, start: int, end: int, level: int = 0, *, below: bool = False) -> Plan:
        """Where the bytes of ``[start, end)`` of the disk ``layers[level]`` shows are;
        ``below``: of the disk below the active layer (a granule the active layer holds
        is planned from the layer under it)."""
        plan: Plan = []
        g = self.granule
        mask = (1 << REGION_BITS) - 1
        pos = start
        last = (end - 1) // g
        while pos < end:
            gi = pos // g
            region = gi >> REGION_BITS
            hm = self._holders(region, level)
            i = gi & mask
            h = hm[i]
            stop = min(last, (region << REGION_BITS) + mask) - (region << REGION_BITS)
            j = i + 1
            while j <= stop and hm[j] == h:
                j += 1
            run_end = min(end, ((region << REGION_BITS) + j) * g)
            if h == 1 and below:
                self._plan_from(1, pos, run_end, plan)
            elif h:
                self._plan_from(h - 1, pos, run_end, plan)
            pos = run_end
        return plan

    def _plan_from(self, level: int, start: int, end: int, plan: Plan) -> None:
        """Plan ``[start, end)`` from ``layers[level]`` down, ignoring the map."""
        plan.extend(self._shown(level, start, end, data_only=False))

    def _shown(
        self, level: int, start: int, end: int, *, data_only: bool
    ) -> Iterator[tuple[Layer, Extent]]:
        """The extents of ``[start, end)`` that show something other than zeros from
        ``layers[level]`` down, each with its layer, in no particular order: where a
        layer does not answer, the one below does.  ``data_only``: a raw file's holes
        count as zeros too (``Layer.data_extents``)."""
        work = [(level, start, end)]
        layers = self.layers
        while work:
            level, a, b = work.pop()
            layer = layers[level]
            found = layer.data_extents(a, b - a) if data_only else layer.extents(a, b - a)
            for ext in found:
                if ext.kind == UNALLOCATED:
                    if level + 1 < len(layers):
                        work.append((level + 1, ext.offset, ext.offset + ext.length))
                elif ext.kind != ZERO:
                    yield layer, ext

    @staticmethod
    def _execute(plan: Plan, base: int, buf: memoryview) -> None:
        for layer, ext in plan:
            a = ext.offset - base
            if ext.kind == DATA:
                layer.file.preadinto(buf[a : a + ext.length], ext.host)
            elif ext.kind == COMPRESSED:
                data = layer.read_compressed(ext.host, ext.clen)
                buf[a : a + ext.length] = data[ext.skip : ext.skip + ext.length]

    def read(self, offset: int, length: int, level: int = 0) -> bytes | bytearray:
        """The disk's bytes at ``[offset, offset+length)``, clipped at its end; with
        ``level``, the disk ``layers[level]`` shows (it and the layers below: a layer
        view), by the same map and plan."""
        end = min(offset + length, self.size_at(level))
        if offset < 0 or length < 0:
            raise ChainfsError(f"invalid read of {length} bytes at {offset}")
        if offset >= end:
            return b""
        n = end - offset
        g = self.granule
        with self.lock:
            if offset // g == (end - 1) // g:
                # within one granule (a page the kernel asks for): one holder answers
                gi = offset // g
                h = self._holders(gi >> REGION_BITS, level)[gi & ((1 << REGION_BITS) - 1)]
                plan: Plan = []
                if not level and self.read_map is not None:
                    if not h:
                        self.read_map.set(gi * g, None)  # a hole of the whole chain
                    else:
                        mapped = self._map_granule(h - 1, gi * g, offset, n)
                        if mapped is not None:
                            return mapped
                if h:
                    self._plan_from(h - 1, offset, end, plan)
            else:
                plan = self._plan(offset, end, level)
                if not level and self.read_map is not None:
                    self._map_granules(offset, end)
        if not plan:
            return bytes(n)  # calloc'ed: the kernel hands out zero pages, nothing to fill
        if len(plan) == 1 and plan[0][1].kind == DATA and plan[0][1].length == n:
            layer, ext = plan[0]
            data = layer.file.pread(n, ext.host)
            return data if len(data) == n else data + bytes(n - len(data))
        buf = bytearray(n)
        self._execute(plan, offset, memoryview(buf))
        return buf

    def _map_granule(self, level: int, start: int, offset: int, n: int) -> bytes | None:
        """A read of ``n`` bytes at ``offset`` within the granule at ``start``, which
        ``layers[level]`` answers for (the caller holds the lock): where that granule
        shows one data extent of a layer, it goes into the read map (later reads of it
        are pyfuse3's) and its bytes are read here; else None (read it as usual)."""
        found = self._map_one(level, start)
        if found is None:
            return None
        layer, host = found
        data = layer.file.pread(n, host + offset - start)
        return data if len(data) == n else data + bytes(n - len(data))

    def _map_granules(self, offset: int, end: int) -> None:
        """Put the granules of ``[offset, end)`` that show one data extent of a layer
        into the read map (a read over more than one granule; the caller holds the
        lock), up to the 64 a read pyfuse3 answers may span."""
        assert self.read_map is not None
        g, mask = self.granule, (1 << REGION_BITS) - 1
        first, last = offset // g, (end - 1) // g
        if last - first >= 64:
            return
        for gi in range(first, last + 1):
            h = self._holders(gi >> REGION_BITS)[gi & mask]
            if h:
                self._map_one(h - 1, gi * g)
            else:
                self.read_map.set(gi * g, None)

    def _map_one(self, level: int, start: int) -> tuple[Layer, int] | None:
        """The layer and host offset of the granule at ``start`` if ``layers[level]``
        (its holder) shows it as one data extent, now in the read map; else None (if it
        shows zeros alone, it is in the map as zeros)."""
        assert self.read_map is not None
        end = min(start + self.granule, self.size)
        whole: Plan = []
        self._plan_from(level, start, end, whole)
        if not whole:  # zero clusters, a layer's end: zeros
            self.read_map.set(start, None)
            return None
        if len(whole) != 1:
            return None
        layer, ext = whole[0]
        if ext.kind != DATA or ext.offset != start or ext.length != end - start:
            return None
        self.read_map.set(start, layer.file.fd, ext.host)
        return layer, ext.host

    def _fill(self, offset: int, length: int) -> Buffer:
        """The content below the active layer (called under the lock, for COW), planned
        from the map of who holds what, as reads are: where the active layer does not
        answer (all a COW asks for), the disk shows what is below it, and the map names
        the one layer that holds it instead of a walk down every layer's tables.  A range
        no layer below shows data in gives b"" (``Fill``: zeros), with nothing allocated."""
        plan = self._plan(offset, offset + length, below=True) if len(self.layers) > 1 else []
        if not plan:
            return b""
        buf = bytearray(length)
        self._execute(plan, offset, memoryview(buf))
        return buf

    # -- writing ---------------------------------------------------------------------------

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"the chain of {self.active.path!r} is open read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ChainfsError(
                f"write of {length} bytes at {offset} is outside the disk ({self.size} bytes)"
            )

    def write(self, offset: int, data: Buffer) -> None:
        """Write into the active layer (copy-on-write through the chain)."""
        n = len(data)
        self._check_write(offset, n)
        if not n:
            return
        # where the active layer holds the range already, one host write and done: the
        # map of who holds what stays as it is (``write_guest`` returns False)
        self._guest_write(
            offset,
            n,
            functools.partial(self.layers[0].write_guest, offset, data, self._fill),
            mark=self.write_map,
        )

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros, as zero clusters where the format allows."""
        self._check_write(offset, length)
        if length:
            self._guest_write(
                offset, length, lambda: self.active.write_zeroes(offset, length, self._fill)
            )

    def _guest_write(
        self,
        offset: int,
        length: int,
        apply: Callable[[], bool | None],
        *,
        claim: bool = True,
        mark: bool = False,
    ) -> None:
        """One guest request that changes ``[offset, offset+length)`` (``apply`` makes the
        change in the active layer), between the write hooks, all under the lock: every
        request that changes the disk (writes, zeroes, discards) goes through here.  With
        ``claim`` the active layer now answers for the range in the map of who holds
        what (a discard updates the map itself), unless ``apply`` returned False (it
        answered for all of it already); with ``mark`` (a write) and False, the granules
        overwritten may then be pyfuse3's (``_mark_writable``)."""
        with self.lock:
            for hook in self.write_hooks:
                hook.before_write(offset, length)
            self.active.mark_dirty(offset, length)
            try:
                changed = apply()
            except BaseException:
                self._unmap_clusters(offset, length)  # part of it may have changed
                raise
            if changed is not False and claim:
                self.claim(offset, length)
            elif mark and not self.write_hooks:
                self._mark_writable(offset, length)
            self.allocation_stale = True
            for hook in self.write_hooks:
                hook.after_write(offset, length)

    def _mark_writable(self, offset: int, length: int) -> None:
        """After an overwrite in place of ``[offset, offset+length)`` with no write hook
        (the caller holds the lock): pyfuse3 answers the next overwrites of its granules
        itself (``fastread``), where such an overwrite would be what this one was — one
        host write, nothing else.  So only granules the active layer holds unshared
        (``in_place_host``) whose bits in every enabled bitmap are set already (this
        write's ``mark_dirty`` set them, durably; a bitmap finer than the granule keeps
        its granules chainfs's until all its bits are set); not while the crash tests
        watch every host write (``HostFile.observer``).  What such a write
        leaves undone: the file's times (``Disk.mtime_ns``) and its flush
        (``HostFile.elsewhere``), both from the map's count."""
        rm = self.read_map
        if rm is None or HostFile.observer is not None:
            return
        active, g = self.active, self.granule
        for gi in range(offset // g, (offset + length - 1) // g + 1):
            start = gi * g
            host = active.in_place_host(start)
            if host is None:
                continue
            if not active.dirty_covered(start, min(g, self.size - start)):
                continue  # (a bitmap finer than the granule: bits are set as QEMU does)
            rm.set_writable(start, active.file.fd, host)
            if active.file.elsewhere is None:
                active.file.elsewhere = rm.writes

    def discard(self, offset: int, length: int) -> None:
        """Make a range read as zeros and give back the space the active layer held
        there (fallocate PUNCH_HOLE and ZERO_RANGE, a TRIM through a loop device).

        A whole cluster of the active layer becomes unallocated where no layer below
        holds data, else a zero cluster (``Layer.discard``).  While a job mirrors the
        disk (a write hook is set), always a zero cluster: the mirror copies again only
        what a layer above its target holds, so an unallocated cluster would leave the
        target with the data the discard removed.  A stream or intermediate commit copies
        only between layers below the active one, never over what it holds."""
        self._check_write(offset, length)
        if not length:
            return

        def apply() -> None:
            active = self.active
            cs = active.cluster_size
            first = offset - offset % cs
            count = -(-(offset + length - first) // cs)
            below = b"\x01" * count if self.write_hooks else self._data_below(first, count, cs)
            active.discard(offset, length, self._fill, below)
            self._unmap_clusters(offset, length)
            self._forget_regions(offset, length)

        self._guest_write(offset, length, apply, claim=False)

    def _data_below(self, first: int, count: int, cs: int) -> bytes:
        """One byte per ``cs`` unit of ``count`` from ``first``: 1 where a layer below the
        active one holds data (zero clusters and layers' ends masking what lies below)."""
        out = bytearray(count)
        if len(self.layers) > 1:
            for a, b in self._data_spans(1, first, min(first + count * cs, self.size)):
                out[(a - first) // cs : -(-(b - first) // cs)] = b"\x01" * (
                    -(-(b - first) // cs) - (a - first) // cs
                )
        return bytes(out)

    def _data_spans(self, level: int, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of ``[start, end)`` where ``layers[level]`` and those below it show
        data (not zeros by metadata, nor holes of a raw file), in no particular order."""
        return [
            (ext.offset, ext.offset + ext.length)
            for _, ext in self._shown(level, start, end, data_only=True)
        ]

    def _forget_regions(self, offset: int, length: int) -> None:
        """Drop the map's regions over a range where the active layer may have stopped
        answering (a discard): they are rebuilt from the layers when next needed."""
        g = self.granule
        for r in range(offset // g >> REGION_BITS, ((offset + length - 1) // g >> REGION_BITS) + 1):
            self._regions.pop(r, None)

    # -- holes: SEEK_DATA, SEEK_HOLE, st_blocks ------------------------------------------

    def seek_data(self, offset: int, level: int = 0) -> int | None:
        """The first offset at or after ``offset`` whose granule holds data, or None
        (ENXIO) if none does: at or past the end, or only holes follow.  ``level``: in
        the disk ``layers[level]`` shows, as ``read``."""
        return self._seek(offset, data=True, level=level)

    def seek_hole(self, offset: int, level: int = 0) -> int | None:
        """The first offset at or after ``offset`` whose granule is a hole (the disk's
        end counts as one), or None (ENXIO) when ``offset`` is at or past the end."""
        return self._seek(offset, data=False, level=level)

    def _seek(self, offset: int, *, data: bool, level: int = 0) -> int | None:
        """SEEK_DATA/SEEK_HOLE at the granularity of the chain's granule: a granule is
        data when some layer shows data in it (below every zero cluster and layer end
        that masks it, raw files' holes counting as holes), else a hole.

        Runs of one holder come from the map of who holds what (one regex match per
        run, at C speed): nobody holds a granule -> a hole; else the holder's data
        extents (and those below it where it defers) decide."""
        size = self.size_at(level)
        if offset < 0 or offset >= size:
            return None
        g = self.granule
        gi, last = offset // g, -(-size // g)
        with self.lock:
            while gi < last:
                region = gi >> REGION_BITS
                base = region << REGION_BITS
                hm = self._holders(region, level)
                for i, j, h in _runs(hm, gi - base):
                    a = (base + i) * g  # whole granules: ``offset``'s answers for it
                    b = min(size, (base + j) * g)
                    if not h:
                        if not data:
                            return max(offset, a)
                        continue
                    found = self._seek_in(h - 1, a, b, data)
                    if found is not None:
                        return max(offset, found)
                gi = base + len(hm)
        return None if data else size

    def _seek_in(self, level: int, a: int, b: int, data: bool) -> int | None:
        """``_seek`` within the granules ``[a, b)``, all answered for by ``layers[level]``
        and below: the start of the first granule that is data (``data``) or a hole."""
        g = self.granule
        spans = sorted((s - s % g, -(-e // g) * g) for s, e in self._data_spans(level, a, b))
        if data:
            return spans[0][0] if spans else None
        pos = a
        for s, e in spans:
            if s > pos:
                return pos
            pos = max(pos, e)
        return pos if pos < b else None

    def host_estimate(self, level: int = 0) -> int:
        """What ``layers[level:]`` take on the host, at most the size of the disk that
        layer shows: ``st_blocks`` where the data cannot be counted (yet)."""
        return min(
            self.size_at(level), sum(layer.allocated_bytes() for layer in self.layers[level:])
        )

    def count_data(self, level: int = 0) -> int:
        """The bytes SEEK_DATA finds in the disk ``layers[level]`` shows, counted now (a
        walk of the map: a layer view's ``st_blocks``, counted once per view)."""
        while True:
            found = self._count(level)
            if found is not None:
                return found
            if self._closed:
                raise ChainError("the chain was closed while its data was counted")

    def _count(self, level: int) -> int | None:
        """``count_data``, the lock taken a region of the map at a time, so that a count
        in a worker thread holds the chain's other users up for one region at most;
        None if the chain changed shape or closed meanwhile."""
        total, region, shape = 0, 0, self._shape
        ahead: list[int | None] = []  # per layer, as ``_next_mapped`` last found it
        while True:
            with self.lock:
                if self._closed or self._shape != shape:
                    return None
                size, g = self.size_at(level), self.granule
                base = region << REGION_BITS
                if base * g >= size:
                    return total
                # what no layer maps holds no data: skipped without building its map
                found = self._next_mapped(level, base * g, ahead)
                if found is None or found >= size:
                    return total
                region = max(region, found // g >> REGION_BITS)
                base = region << REGION_BITS
                hm = self._holders(region, level)
                for i, j, h in _runs(hm, 0):
                    if h:
                        total += self._data_in(h - 1, (base + i) * g, min(size, (base + j) * g))
            region += 1

    def _next_mapped(self, level: int, offset: int, ahead: list[int | None]) -> int | None:
        """The least ``Layer.next_mapped`` of ``layers[level:]`` from ``offset``: before
        it no layer answers for anything of its own, so the disk shows no data there
        (a layer's end masks what lies below with zeros, which are no data either).
        ``ahead`` keeps each layer's last answer, still good while at or past
        ``offset`` (None: nothing more), so each layer's L1 table is searched once per
        count (the caller holds the lock; writes meanwhile make the count stale)."""
        layers = self.layers[level:]
        if not ahead:
            ahead.extend([-1] * len(layers))
        best: int | None = None
        for k, layer in enumerate(layers):
            found = ahead[k]
            if found is not None and found < offset:
                found = ahead[k] = layer.next_mapped(offset)
            if found is not None and (best is None or found < best):
                best = found
                if best == offset:
                    break
        return best

    def _data_in(self, level: int, a: int, b: int) -> int:
        """The bytes of the granules in ``[a, b)`` (all answered for by ``layers[level]``
        and below) that hold data: what ``_seek`` finds there, summed."""
        g = self.granule
        spans = sorted((s - s % g, -(-e // g) * g) for s, e in self._data_spans(level, a, b))
        total, pos = 0, a
        for s, e in spans:
            s, e = max(s, pos), min(e, b)
            if e > s:
                total += e - s
                pos = e
        return total

    def count_is_cheap(self, level: int = 0) -> bool:
        """Whether counting the data of the disk ``layers[level]`` shows may be done on
        the caller's thread (``INLINE_COUNT``)."""
        granules = -(-self.size_at(level) // self.granule)
        return -(-granules >> REGION_BITS) <= INLINE_COUNT

    def allocated(self) -> int:
        """The bytes of the disk that hold data (what SEEK_DATA finds), as last counted:
        ``st_blocks`` of the flat file.  Counted on the first call and again by
        ``refresh_allocation``; a stat never walks the chain (a big disk's count runs in
        the background: until it ends, what its layers take on the host)."""
        if self._allocated is None:
            self.refresh_allocation(force=True)
        assert self._allocated is not None
        return self._allocated

    def refresh_allocation(self, *, force: bool = False, min_interval: float = 0.0) -> None:
        """Count the data again if writes, discards or a change of shape may have changed
        it (``allocation_stale``), a region of the map at a time under the lock; with
        ``min_interval``, only if the last count is at least that many seconds old (a
        ``fstrim`` sends a discard per free extent: one count each would cost more than
        the discards).  A count too big for the caller's thread is sent to
        ``background`` (once, however often asked before it begins); the figure stays
        the last count (before the first, what the layers take on the host) until it
        ends."""
        if not (force or self.allocation_stale):
            return
        now = time.monotonic()
        if not force and now - self._counted_at < min_interval:
            return
        background = Chain.background
        if background is not None and not self.count_is_cheap():
            if self._allocated is None:
                self._allocated = self.host_estimate()
            rested = now - self._counted_at >= BACKGROUND_PAUSE * self._count_took
            if not self._count_queued and rested:  # (else asked again by the write-back)
                self._count_queued = True
                background(self)
            return
        self._counted_at = now
        self.allocation_stale = False
        try:
            self._allocated = self.count_data()
        except ChainfsError:
            # damaged metadata (its reads and writes report it) or a failing disk: a
            # stat must still answer, with what the layers take on the host
            self._allocated = self.host_estimate()

    def count_in_background(self) -> None:
        """``refresh_allocation``'s count, in a worker thread (``background``): the lock
        is held a region at a time (``count_data``); a chain closed meanwhile is left
        alone, one that changed shape is counted again when next asked."""
        with self.lock:
            self._count_queued = False
            if self._closed:
                return
            self.allocation_stale = False
            self._counted_at = began = time.monotonic()
        try:
            total = self._count(0)
        except ChainfsError:  # damaged metadata or a failing disk, as above
            with self.lock:
                if self._closed:
                    return
                total = self.host_estimate()
        self._count_took = time.monotonic() - began
        if total is None:  # changed meanwhile: counted again when next asked
            self.allocation_stale = True
            return
        self._allocated = total

    # -- changing the chain's shape ------------------------------------------------------

    def index_of(self, layer: Layer) -> int:
        return next(i for i, x in enumerate(self.layers) if x is layer)

    def reopen(self, index: int, *, writable: bool) -> Layer:
        """Reopen ``layers[index]`` read-write or read-only, its image locks following.

        The old descriptor is closed (flushing, dropping its locks) before the new one is
        locked: two descriptors of one file are two lockers, even in one process.
        """
        with self.lock:
            old = self.layers[index]
            if old.writable == writable:
                return old
            if old.writable:
                old.flush()  # a failure leaves the layer as it was, open and usable
            self.unmap(0, self.size)  # before its descriptor is closed (numbers get reused)
            old.close()
            new = self._open(old.path, old.format_name, writable=writable)
            self.layers[index] = new
            self._reset_granule()
            if writable and self.on_writable is not None:
                self.on_writable(new)
            return new

    def push_overlay(self, path: str, file: HostFile | None = None) -> None:
        """Make the new, empty overlay at ``path`` (backed by the active layer) active;
        ``file``: that image as ``create_image`` returned it (the chain takes it over,
        closing it on failure), so that its lock is never let go.

        Atomic with respect to writes: they hold the same lock; the flat content does not
        change, so nothing cached anywhere needs to be invalidated.
        """
        with self.lock:
            if file is not None:
                new = _adopt(file, lock=self.locked)  # created by chainfs in an allowed dir
            else:
                new = self._open(path, "qcow2", writable=True)
            old = self.layers[0]
            try:
                # the overlay takes over the enabled bitmaps (README, "Dirty bitmaps")
                bitmaps.carry_to_overlay(old, new)
                old.flush()  # a failure leaves the old layer as it was, open and active
                self.unmap(0, self.size)  # before its descriptor is closed
                old.close()
                ro = self._open(old.path, old.format_name, writable=False)
            except BaseException:
                new.close()
                raise
            self.layers = [new, ro, *self.layers[1:]]
            self._reset_granule()

    def splice(self, top: int, base: int | None) -> list[Layer]:
        """Drop the layers strictly between ``top`` and ``base`` (None: all below ``top``).

        The caller has already rewritten ``top``'s backing pointer on disk.  Returns the
        dropped layers, closed.
        """
        with self.lock:
            stop = len(self.layers) if base is None else base
            removed = self.layers[top + 1 : stop]
            self.layers = self.layers[: top + 1] + self.layers[stop:]
            self._reset_granule()
        for layer in removed:
            layer.close()
        return removed

    # -- reads for the copy engine (the caller holds the lock) ---------------------------

    def read_below(self, level: int, offset: int, length: int) -> bytearray:
        """The content the layers below ``layers[level]`` show for a range."""
        buf = bytearray(length)
        if level + 1 < len(self.layers):
            plan: Plan = []
            self._plan_from(level + 1, offset, offset + length, plan)
            self._execute(plan, offset, memoryview(buf))
        return buf

    def read_below_into(self, level: int, offset: int, buf: memoryview) -> None:
        """``read_below`` into a buffer that may hold anything (a reused one: fresh
        memory costs a page fault per 4 KiB, as much as the read itself).  ``level``
        -1 reads the whole chain, from the map of who holds what (as reads do)."""
        plan: Plan = []
        if level < 0:
            plan = self._plan(offset, offset + len(buf))
        elif level + 1 < len(self.layers):
            self._plan_from(level + 1, offset, offset + len(buf), plan)
        plan.sort(key=lambda p: p[1].offset)
        pos = 0
        for _, ext in plan:
            zero_fill(buf[pos : ext.offset - offset])
            pos = max(pos, ext.offset - offset + ext.length)
        zero_fill(buf[pos:])
        self._execute(plan, offset, buf)

    def held_map(self, top: int, stop: int, start: int, count: int) -> bytes:
        """One byte per granule of the ``count`` granules from ``start`` (a multiple of
        the granule): 1 where a layer of ``layers[top:stop]`` answers for it (past a
        layer's end counts, as it reads zeros there), else 0."""
        with self.lock:
            return self.held_map_locked(top, stop, start, count)

    def held_map_locked(self, top: int, stop: int, start: int, count: int) -> bytes:
        """``held_map``, for a caller that holds the lock."""
        g = self.granule
        if top == 0 and len(self.layers) < 255:
            # from the active layer down, the first layer that answers lies above
            # ``stop`` exactly when one of them answers: the map of who holds what
            # (which reads keep and guest writes update) says so, one byte per granule
            table = _holders_up_to(stop)
            out = bytearray()
            gi, end = start // g, start // g + count
            while gi < end:
                region = gi >> REGION_BITS
                i = gi - (region << REGION_BITS)
                piece = self._holders(region)[i : i + end - gi]
                if not piece:
                    break
                out += piece.tobytes().translate(table)
                gi += len(piece)
            out += b"\x01" * (end - gi)  # past the disk's end: the active layer answers
            return bytes(out)
        held = 0
        for layer in self.layers[top:stop]:
            held |= layer.allocation_map(start, count, g)
        return held.to_bytes(count, "little")

    def grow_layer(self, index: int, size: int) -> None:
        """Grow the backing layer ``layers[index]`` (open read-write) to ``size`` bytes.

        The new area reads as zeros, as the range past its old end did, so the content
        the chain shows does not change.
        """
        with self.lock:
            below = self.layers[index + 1].virtual_size if index + 1 < len(self.layers) else 0

            def fill(o: int, n: int) -> Buffer:
                return self.read_below(index, o, n)

            self.layers[index].grow(size, fill, backing_size=below)
            self._reset_granule()

    def open_layer(self, path: str, fmt: str | None, *, writable: bool) -> Layer:
        """Open an image that is to join the chain, with the image locks its layers get."""
        layer = self._open(path, fmt, writable=writable)
        if writable and self.on_writable is not None:
            self.on_writable(layer)
        return layer

    def _open(self, path: str, fmt: str | None, *, writable: bool) -> Layer:
        """Open one of this chain's layers (again), locked and confined as the others."""
        return _open(path, fmt, writable=writable, lock=self.locked, confine=self.confine)

    def adopt_layer(self, file: HostFile) -> Layer:
        """A written layer on the new qcow2 image ``create_image`` returned (closed on
        failure), with the image locks the chain's layers get."""
        return _adopt(file, lock=self.locked)

    def replace_top(self, count: int, new: Layer | None) -> list[Layer]:
        """The pivot: drop ``layers[:count]`` and make ``new`` (None: ``layers[count]``)
        the active layer, which must be open read-write.

        The caller has made the new active layer show what the chain showed and recorded
        the change on disk.  Atomic with respect to guest requests (they take the same
        lock).  Returns the dropped layers, closed; a failure to close one is raised after
        all were closed.
        """
        with self.lock:
            removed = self.layers[:count]
            layers = ([new] if new is not None else []) + self.layers[count:]
            if not layers[0].writable:
                raise ChainfsError(f"{layers[0].path!r} is not open for writing")
            self.layers = layers
            self._reset_granule()
        _close_all(removed)
        return removed

    def dirty_bitmaps(self) -> Bitmaps:
        """The persistent dirty bitmaps of the active layer (the caller holds the lock
        for as long as it uses them)."""
        self.revoke_writes()  # (the caller may change them: a new bitmap needs its bits)
        bitmaps: Bitmaps | None = getattr(self.active, "bitmaps", None)
        if bitmaps is None:
            layer = self.active
            if not self.writable:
                raise ReadOnlyError(f"the chain of {layer.path!r} is open read-only")
            raise UnsupportedFeature(
                f"{layer.path!r} ({layer.format_name}) cannot hold persistent dirty bitmaps"
            )
        return bitmaps

    def flush(self) -> None:
        """Make every acknowledged write durable."""
        if self.writable:
            with self.lock:
                self.active.flush()

    def close(self) -> None:
        """Flush, mark clean and close every layer."""
        with self.lock:
            self._closed = True
            self._release_read_map()
            _close_all(self.layers)


_RUN = re.compile(rb"(.)\1*", re.DOTALL)


def _runs(hm: array[int], start: int) -> Iterator[tuple[int, int, int]]:
    """The runs of equal values of ``hm`` from index ``start``, as (start, end, value)."""
    if hm.typecode == "B":
        raw = hm.tobytes()
        for m in _RUN.finditer(raw, start):
            yield m.start(), m.end(), raw[m.start()]
        return
    i = start
    while i < len(hm):
        j = i + 1
        while j < len(hm) and hm[j] == hm[i]:
            j += 1
        yield i, j, hm[i]
        i = j


@functools.cache
def _holders_up_to(stop: int) -> bytes:
    """A ``bytes.translate`` table from the map of who holds what (0: nobody, else 1 +
    the index of the first layer that answers) to 1 where that layer is above ``stop``."""
    return bytes(1 if 1 <= v <= stop else 0 for v in range(256))


def _close_all(layers: list[Layer]) -> None:
    """Close every layer, even when one fails; then raise the first failure."""
    first_error: BaseException | None = None
    for layer in layers:
        try:
            layer.close()
        except BaseException as e:  # close the rest regardless
            first_error = first_error or e
    if first_error is not None:
        raise first_error
