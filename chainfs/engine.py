"""The copy engine of stream, commit and copy: moving a chain's clusters into one of its
layers or into a new image, a step at a time.

``[A] <- [B] <- [C] <- [D] <- [E]``: a stream step copies into a node (``D``) what the
layers between it and its base (``C``, ``B``) hold and it lacks; a copy step (commit,
copy, mirror) copies into a target (the commit base ``A``, or a new image) what the
chain shows from a layer down, for every cluster a layer above the target holds.  Which
clusters to copy comes from the layers' allocation maps and the chain's map of who holds
what, a few big-integer operations per step; each run is read in one plan and written in
one go, all-zero stretches as zero writes.

Locking contract: each step holds the chain's lock (``Chain.lock``) from its look at the
maps to its last write, so a guest write lands either before the step (and is copied)
or after it (and is marked dirty by a write hook, or was never below the node).  The
chain owns its engine (``Chain.engine``) and tells it when its shape changed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from .buffers import scratch, zero_at
from .formats.base import DATA, UNALLOCATED, ZERO, Buffer, Fill, Layer, lane_ones


class Chain(Protocol):
    """What the engine uses of the chain that owns it (``chain.Chain``); the engine
    sees it through this, so that neither module imports the other both ways."""

    layers: list[Layer]
    granule: int
    lock: threading.Lock

    def claim(self, offset: int, length: int) -> None: ...
    def unmap(self, offset: int, length: int) -> None: ...
    def read_below(self, level: int, offset: int, length: int) -> bytearray: ...
    def read_below_into(self, level: int, offset: int, buf: memoryview) -> None: ...
    def held_map_locked(self, top: int, stop: int, start: int, count: int) -> bytes: ...


HELD_GRANULES = 1 << 15  # granules per window of a stream's "held between" lanes
HELD_CACHE = 8  # windows kept
COPY_PIECE = 4 << 20  # bytes copy_step reads and writes at once (each of its two buffers)


class CopyEngine:
    """The stream and copy steps over one chain, with what they keep between steps."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        # stream: which of a node's clusters the layers between it and a base hold,
        # by window of about HELD_GRANULES granules, keyed (node, stop, window); those layers
        # are read-only, so only a change of the chain's shape makes an entry stale
        self._held: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        # copy_step's two buffers: it reads a piece into one while the last piece may
        # still be on its way to the target from the other (``write_started``)
        self._copy_bufs: list[bytearray] = [bytearray(), bytearray()]
        self._copy_last = 0  # the buffer of the last piece given to ``write_started``

    def forget(self) -> None:
        """The chain's shape changed (the caller holds its lock): the held windows are stale."""
        self._held.clear()

    def stream_step(self, node: int, stop: int, offset: int, length: int) -> int:
        """Copy into ``layers[node]`` every cluster of the range that it lacks and that a
        layer strictly between it and ``layers[stop]`` holds; return the bytes copied.

        The check and the copy happen under the chain's lock, so a guest write can never
        be overwritten by the older content from below (QEMU's copy-on-read rule).
        Zero ranges become zero clusters where the format allows.  Which clusters to
        copy comes from the layers' allocation maps, a few big-integer operations for
        the whole range; each run of them is read in one plan and written in one go.
        """
        with self.chain.lock:
            target = self.chain.layers[node]
            cs = target.cluster_size
            end = min(offset + length, target.virtual_size)
            first = offset - offset % cs
            if first >= end:
                return 0
            # what a step writes may move clusters the flat file's read map names
            self.chain.unmap(first, end - first)

            def fill(o: int, n: int) -> Buffer:
                return self.chain.read_below(node, o, n)

            copied = 0
            buf = scratch(max(0, end - first) + cs, "copy")
            for a, b in self._stream_runs(node, stop, first, end):
                data = memoryview(buf)[: b - a]
                self.chain.read_below_into(node, a, data)
                for pos, j, zero in _stretches(buf, b - a, cs):
                    if zero:
                        target.write_zeroes(a + pos, j - pos, fill)
                    else:
                        target.write(a + pos, data[pos:j], fill)
                if node == 0:
                    self.chain.claim(a, b - a)
                copied += b - a
            return copied

    def stream_next(self, node: int, stop: int, offset: int, end: int) -> int:
        """Where, from ``offset`` on, a layer of ``layers[node+1:stop]`` first holds
        something of ``layers[node]``'s clusters: the start of that cluster (not before
        ``offset``), or ``end`` if nothing does before it.  The stream skips the rest.

        Those layers are read-only, so the answer stays true until the chain's shape
        changes; after a change the stream asks again.
        """
        with self.chain.lock:
            cs = self.chain.layers[node].cluster_size
            wc = self._held_window_clusters(node)
            c = offset // cs
            last = -(-min(end, self.chain.layers[node].virtual_size) // cs)
            while c < last:
                w = c // wc
                lanes = self._held_lanes(node, stop, c, min(wc * (w + 1), last) - c)
                i = lanes.find(1)
                if i >= 0:
                    return max(offset, (c + i) * cs)
                c = wc * (w + 1)
            return end

    def _stream_runs(self, node: int, stop: int, first: int, end: int) -> list[tuple[int, int]]:
        """The runs of ``layers[node]``'s clusters in ``[first, end)`` that it lacks and
        that a layer of ``layers[node+1:stop]`` answers for, as (start, end) offsets."""
        target = self.chain.layers[node]
        cs, g = target.cluster_size, self.chain.granule
        k = cs // g  # granules per target cluster (the granule divides every cluster size)
        count = -(-(end - first) // cs)
        held_lanes = self._held_lanes(node, stop, first // cs, count)
        if 1 not in held_lanes:
            return []
        held = int.from_bytes(held_lanes, "little")
        ones = lane_ones(count)
        has = target.allocation_map(first, count * k, g)
        if k > 1:
            has = int.from_bytes(has.to_bytes(count * k, "little")[::k], "little")
        # a map answers 1 for a granule reaching past the layer's end: look at the
        # target's last cluster itself, as missing it would lose data
        tail = first + (count - 1) * cs
        if tail + cs > target.virtual_size and any(
            e.kind == UNALLOCATED for e in target.extents(tail, target.virtual_size - tail)
        ):
            has &= ~(0xFF << (8 * (count - 1)))
        want = (held & ~has & ones).to_bytes(count, "little")
        runs: list[tuple[int, int]] = []
        i = want.find(1)
        while i >= 0:
            j = want.find(0, i)
            if j < 0:
                j = count
            runs.append((first + i * cs, min(first + j * cs, end, target.virtual_size)))
            i = want.find(1, j)
        return runs

    def _held_lanes(self, node: int, stop: int, c0: int, count: int) -> bytes:
        """One byte per cluster of ``layers[node]`` from cluster ``c0``: 1 where a layer of
        ``layers[node+1:stop]`` answers for some of it, else 0 (cached by window)."""
        wc = self._held_window_clusters(node)
        out = bytearray()
        c = c0
        while c < c0 + count:
            w = c // wc
            lanes = self._held.get((node, stop, w))
            if lanes is None:
                lanes = self._held_window(node, stop, w)
                self._held[(node, stop, w)] = lanes
                if len(self._held) > HELD_CACHE:
                    self._held.popitem(last=False)
            i = c - w * wc
            piece = lanes[i : i + c0 + count - c]
            if not piece:
                break  # past the node's end
            out += piece
            c += len(piece)
        return bytes(out)

    def _held_window_clusters(self, node: int) -> int:
        return max(1, HELD_GRANULES * self.chain.granule // self.chain.layers[node].cluster_size)

    def _held_window(self, node: int, stop: int, w: int) -> bytes:
        cs, g = self.chain.layers[node].cluster_size, self.chain.granule
        k = cs // g
        wc = self._held_window_clusters(node)
        first = w * wc * cs
        count = min(wc, -(-(self.chain.layers[node].virtual_size - first) // cs))
        if count <= 0:
            return b""
        ones = lane_ones(count)
        held = 0
        for level in range(node + 1, min(stop, len(self.chain.layers))):
            m = self.chain.layers[level].allocation_map(first, count * k, g)
            if k > 1:  # a cluster is held if any of its granules is
                for j in range(1, k):
                    m |= m >> (8 * j)
                m = int.from_bytes(m.to_bytes(count * k, "little")[::k], "little")
            held |= m
            if held == ones:
                break
        return held.to_bytes(count, "little")

    # -- commit and copy (mirror) --------------------------------------------------------

    def copy_step(
        self, target: Layer, top: int, stop: int, below: int, offset: int, length: int
    ) -> int:
        """Copy into ``target`` what the chain shows from ``layers[top]`` down, for every
        cluster of ``target`` in the range that a layer of ``layers[top:stop]`` holds;
        return the bytes copied.

        The engine of commit and copy: ``target`` is the commit base (``layers[stop]``) or
        a new image, and its own backing shows what ``read_below(below)`` does.  Whole
        target clusters are written (outside the held ranges they get what they showed
        already), so no copy-on-write read is needed.  Clusters reading as zeros become
        zero writes (zero clusters where the format allows), or are left alone where the
        target already reads zeros, so a sparse target stays sparse.  Under the lock, so
        a guest write lands either before the copy (and is copied) or after it (and is
        marked dirty by a write hook).

        The data goes to ``target.write_started``: the last piece may still be on its
        way to the disk when this returns (readers see the target's old content there
        until it landed), while the next piece is read; ``target.flush`` settles it.
        """
        with self.chain.lock:
            return self.copy_step_locked(target, top, stop, below, offset, length)

    def copy_step_locked(
        self, target: Layer, top: int, stop: int, below: int, offset: int, length: int
    ) -> int:
        """``copy_step``, for a caller that holds the chain's lock (a write hook copying
        a guest write into the target before the guest is answered)."""
        tcs = target.cluster_size
        end = min(offset + length, target.virtual_size)
        if offset >= end:
            return 0
        first = offset - offset % tcs
        last = min(-(-end // tcs) * tcs, target.virtual_size)
        self.chain.unmap(first, last - first)  # (as stream_step)
        runs = self._held_runs(top, stop, first, last, tcs)

        def fill(o: int, n: int) -> Buffer:
            return self.chain.read_below(below, o, n)

        copied = 0
        piece = max(COPY_PIECE, tcs)  # a multiple of the cluster size
        for a, b in runs:
            copied += b - a
            while a < b:
                n = min(piece, b - a)
                i = 1 - self._copy_last  # not the buffer a write may be using
                if len(self._copy_bufs[i]) < n:
                    self._copy_bufs[i] = bytearray(piece)
                buf = self._copy_bufs[i]
                data = memoryview(buf)[:n]
                self.chain.read_below_into(top - 1, a, data)
                if _put(target, a, buf, data, fill):
                    self._copy_last = i
                a += n
        return copied

    def drop_buffers(self) -> None:
        """Give back ``copy_step``'s two buffers (up to ``2 * COPY_PIECE``) when a job is
        over.  A write still on its way from one keeps that memory until it lands (the
        started write holds the buffer), and the next ``copy_step`` takes fresh ones."""
        with self.chain.lock:
            self._copy_bufs = [bytearray(), bytearray()]
            self._copy_last = 0

    def _held_runs(self, top: int, stop: int, first: int, last: int, tcs: int) -> list[list[int]]:
        """The runs of ``[first, last)`` (aligned to ``tcs``) that a layer of
        ``layers[top:stop]`` holds something of, widened to whole units of ``tcs`` and a
        granule, from ``_held_map`` (C-speed byte searches)."""
        g = self.chain.granule
        unit = max(g, tcs)  # both powers of two: aligned for both
        start = first - first % unit
        count = -(-(last - start) // g)
        runs: list[list[int]] = []
        lanes = self.chain.held_map_locked(top, stop, start, count)
        i = lanes.find(1)
        while i >= 0:
            j = lanes.find(0, i)
            if j < 0:
                j = count
            a = max(first, (start + i * g) // unit * unit)
            b = min(last, -(-(start + j * g) // unit) * unit)
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
            i = lanes.find(1, j)
        return runs


def _stretches(data: bytearray, n: int, cs: int) -> Iterator[tuple[int, int, bool]]:
    """The first ``n`` bytes of ``data`` cut into stretches of ``cs``-byte pieces that
    are all zeros or all not, as (start, end, zero); a memcmp per piece."""
    pos = 0
    while pos < n:
        zero = zero_at(data, pos, min(cs, n - pos))
        j = pos + cs
        while j < n and zero_at(data, j, min(cs, n - j)) == zero:
            j += cs
        j = min(j, n)
        yield pos, j, zero
        pos = j


def _put(target: Layer, offset: int, buf: bytearray, data: memoryview, fill: Fill) -> bool:
    """Write ``data`` (the start of ``buf``) into ``target`` at ``offset``
    (cluster-aligned), runs of all-zero clusters as zero writes unless the target
    already reads zeros there; the runs of data with ``write_started``.  Whether one
    was (``buf`` may then be in use until the target settles)."""
    started = False
    for pos, j, zero in _stretches(buf, len(data), target.cluster_size):
        if not zero:
            target.write_started(offset + pos, data[pos:j], fill)
            started = True
        elif not _reads_zero(target, offset + pos, j - pos, fill):
            target.write_zeroes(offset + pos, j - pos, fill)
    return started


def _reads_zero(layer: Layer, offset: int, length: int, fill: Fill) -> bool:
    """Whether ``layer`` (with ``fill`` as its backing) reads as zeros over the range."""
    for e in layer.extents(offset, length):
        if e.kind == ZERO:
            continue
        if e.kind == UNALLOCATED:
            data: Buffer = fill(e.offset, e.length)
        elif e.kind == DATA:
            data = layer.file.pread(e.length, e.host)
        else:
            data = layer.read_compressed(e.host, e.clen)[e.skip : e.skip + e.length]
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        if not zero_at(data, 0, len(data)):
            return False
    return True
