"""Re-pointing a header against every crash, on header layouts QEMU never makes (no QEMU).

Hypothesis draws a header cluster (v2 or v3, cluster sizes 512 B to 64 KiB, a backing
name of any length anywhere after the extensions or none, the backing-format extension
or not, a feature-name table of any size, a bitmaps extension, unknown extensions) and a
new backing file; ``repoint`` runs on it with every write and flush recorded.  Every
state a power loss could leave is then read the way QEMU's ``qcow2_do_open`` reads a
header (``qemu_reads``), and by chainfs's parser: for each flush interval, everything
before it landed and any subset of the sectors written in it did.  Each state must show
the old or the new backing file and format, every other extension unchanged (the
feature-name table may be missing only in the new one, between the two steps), and the
last state exactly the new header.  A re-point that finds no crash-safe order must be
refused before it writes anything, which on clusters of 8 KiB and more never happens.
The same holds for ``change_extensions`` adding or dropping the bitmaps extension (with
its autoclear bit), the backing file kept.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from chainfs.errors import ImageError
from chainfs.formats.qcow2 import create_overlay
from chainfs.formats.qcow2 import header as hdr
from chainfs.formats.qcow2.repoint import change_extensions, repoint
from chainfs.hostfile import HostFile

SECTOR = 512
FT = hdr.EXT_FEATURE_TABLE
BF = hdr.EXT_BACKING_FORMAT
BM = hdr.EXT_BITMAPS

Extensions = list[tuple[int, bytes]]
Identity = tuple[str | None, str | None]


def qemu_reads(c: bytes) -> tuple[Identity, Extensions]:
    """The backing file, its format and the extensions QEMU reads from the header
    cluster ``c`` (``qcow2_do_open`` and ``qcow2_read_extensions``); ``ValueError``
    where QEMU refuses the image."""
    cs = len(c)
    version, bfo, bfs = struct.unpack_from(">IQI", c, 4)
    length = 72 if version == 2 else struct.unpack_from(">I", c, 100)[0]
    if bfo > cs:
        raise ValueError("Invalid backing file offset")
    end = bfo if bfo else cs
    pos, exts = length, []
    while pos < end:
        kind, n = struct.unpack_from(">II", c, pos)
        pos += 8
        if pos > end or n > end - pos:
            raise ValueError("Header extension too large")
        if kind == hdr.EXT_END:
            break
        exts.append((kind, bytes(c[pos : pos + n])))
        pos += (n + 7) & ~7
    name = None
    if bfo:
        if bfs > min(1023, cs - bfo):
            raise ValueError("Backing file name too long")
        name = c[bfo : bfo + bfs].decode()
    fmt = next((d.decode() for k, d in exts if k == BF), None)
    return (name, fmt), exts


def pack(exts: Extensions) -> bytes:
    out = b"".join(struct.pack(">II", k, len(d)) + d + bytes(-len(d) % 8) for k, d in exts)
    return out + bytes(8)


@dataclass
class Scene:
    bits: int  # cluster bits
    version: int
    exts: Extensions  # in file order, the backing format's included
    old: tuple[int, str | None]  # length of the backing name (0: none), format
    gap: int  # bytes between the end marker and the name
    new: tuple[int, str | None]
    seed: int


@st.composite
def scenes(draw: st.DrawFn) -> Scene:
    bits = draw(st.sampled_from([9, 10, 11, 12, 13, 16]))
    version = draw(st.sampled_from([2, 3]))
    exts: Extensions = []
    if version == 3 and draw(st.booleans()):
        exts.append((FT, bytes(range(48)) * draw(st.integers(1, 10))))
    if version == 3 and draw(st.booleans()):
        exts.append((BM, struct.pack(">IIQQ", 1, 0, 512, 1 << bits)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([0x12345678, 0x0BADCAFE, 0x77777777]))
        exts.append((kind, draw(st.binary(max_size=100))))
    exts = draw(st.permutations(exts))
    old_name = draw(st.integers(0, 1023))
    old_fmt = draw(st.sampled_from([None, "qcow2", "raw"]))
    if old_name and old_fmt is not None:
        exts.insert(draw(st.integers(0, len(exts))), (BF, old_fmt.encode()))
    gap = draw(st.sampled_from([0, 0, 8, 100, 600, 3000]))
    new_name = draw(st.integers(0, 1023))
    new_fmt = draw(st.sampled_from([None, "qcow2", "raw"]))
    seed = draw(st.integers(0, 1 << 30))
    return Scene(
        bits,
        version,
        exts,
        (old_name, old_fmt if old_name else None),
        gap,
        (new_name, new_fmt if new_name else None),
        seed,
    )


def qemu_like(old: tuple[int, str | None], new: tuple[int, str | None]) -> Scene:
    """QEMU 7.2's v3 layout: the format extension first (if any), the feature-name table
    (8 entries), the bitmaps extension, the name right after the end marker."""
    exts: Extensions = [(FT, bytes(range(48)) * 8), (BM, struct.pack(">IIQQ", 1, 0, 512, 65536))]
    if old[0] and old[1]:
        exts.insert(0, (BF, old[1].encode()))
    return Scene(16, 3, exts, old, 0, new, 0)


def name_of(length: int, tag: str) -> str | None:
    return None if not length else (tag * length)[:length]


def build(path: Path, scene: Scene) -> bytes | None:
    """An image whose header cluster is the drawn one (None: it does not fit)."""
    version = scene.version
    cs = 1 << scene.bits
    create_overlay(str(path), size=1 << 20, backing=None, backing_format=None, cluster_size=cs)
    data = bytearray(path.read_bytes())
    length = 72 if version == 2 else 112
    packed = pack(scene.exts)
    name = (name_of(scene.old[0], "o") or "").encode()
    at = length + len(packed) + scene.gap
    if at + len(name) > cs:
        return None
    cluster = bytearray(cs)
    cluster[:length] = data[:length]
    struct.pack_into(">I", cluster, 4, version)
    struct.pack_into(">QI", cluster, 8, at if name else 0, len(name))
    cluster[length : length + len(packed)] = packed
    cluster[at : at + len(name)] = name
    data[:cs] = cluster
    path.write_bytes(data)
    return bytes(cluster)


@contextmanager
def recorded() -> Iterator[list[tuple[str, int, bytes]]]:
    events: list[tuple[str, int, bytes]] = []

    def observe(kind: str, path: str, offset: int, data: bytes) -> None:
        events.append((kind, offset, bytes(data)))

    saved = HostFile.observer
    HostFile.observer = observe
    try:
        yield events
    finally:
        HostFile.observer = saved


def written_or_refused(
    path: Path, cs: int, change: Callable[[HostFile, hdr.Header], None]
) -> list[tuple[str, int, bytes]] | None:
    """Run ``change`` on the image at ``path`` (header cluster ``cs`` bytes) and return
    the writes and flushes it made, or None if it refused: then it wrote nothing, and
    only in a cluster with no room to spare."""
    f = HostFile(str(path), True)
    try:
        with recorded() as events:
            try:
                change(f, hdr.read_header(f))
            except ImageError:
                assert not events, "refused after writing"
                assert cs < 8192, "refused in a cluster with room to spare"
                event("refused")
                return None
    finally:
        f.close()
    return events


def crashed(start: bytes, events: list[tuple[str, int, bytes]], seed: int) -> Iterator[bytes]:
    """Every state a power loss could leave: per flush interval, each subset of the
    sectors its writes touched (a random sample of them when there are many)."""
    rng = random.Random(seed)
    disk = bytearray(start)
    pieces: list[tuple[int, bytes]] = []
    for kind, offset, data in [*events, ("flush", 0, b"")]:
        if kind == "write":
            pos = offset
            while pos < offset + len(data):
                stop = min(offset + len(data), (pos // SECTOR + 1) * SECTOR)
                pieces.append((pos, data[pos - offset : stop - offset]))
                pos = stop
            continue
        assert kind == "flush", kind
        subsets: Iterator[tuple[int, ...]]
        if len(pieces) <= 10:
            subsets = itertools.chain.from_iterable(
                itertools.combinations(range(len(pieces)), r) for r in range(len(pieces) + 1)
            )
        else:
            subsets = (
                tuple(i for i in range(len(pieces)) if rng.random() < 0.5) for _ in range(300)
            )
        for subset in subsets:
            state = bytearray(disk)
            for i in subset:
                off, piece = pieces[i]
                state[off : off + len(piece)] = piece
            yield bytes(state)
        for off, piece in pieces:
            disk[off : off + len(piece)] = piece
        pieces = []


def others(exts: Extensions) -> Extensions:
    return [(k, d) for k, d in exts if k not in (BF, FT)]


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scene=scenes())
# the two-step re-points of QEMU's own v3 layout (feature-name table, bitmaps): the format
# extension added (a string without format, or no backing file) and dropped
@example(scene=qemu_like(old=(0, None), new=(20, "qcow2")))
@example(scene=qemu_like(old=(30, None), new=(700, "raw")))
@example(scene=qemu_like(old=(10, "qcow2"), new=(0, None)))
@example(scene=qemu_like(old=(900, "qcow2"), new=(1000, None)))
def test_every_crash_leaves_the_old_or_the_new_header(tmp_path: Path, scene: Scene) -> None:
    path = tmp_path / "top.qcow2"
    if path.exists():
        os.unlink(path)
    start = build(path, scene)
    assume(start is not None)
    assert start is not None
    cs = len(start)
    old_id, old_exts = qemu_reads(start)
    new_id: Identity = (name_of(scene.new[0], "n"), scene.new[1])
    events = written_or_refused(path, cs, lambda f, h: repoint(f, h, *new_id))
    if events is None:
        return
    event(f"{sum(1 for k, o, _ in events if k == 'write' and o == 0)} header write(s)")
    final = path.read_bytes()[:cs]
    assert qemu_reads(final)[0] == new_id
    ft = [d for k, d in old_exts if k == FT]
    for state in crashed(start, events, scene.seed):
        got, exts = qemu_reads(state)
        assert got in (old_id, new_id), (got, old_id, new_id)
        assert others(exts) == others(old_exts)
        kept = [d for k, d in exts if k == FT]
        assert kept == ft or (not kept and got == new_id), "the feature-name table"
        ours = hdr.parse(state + final[len(state) :], str(path), os.path.getsize(path))
        assert (ours.backing_file, ours.backing_format) == got
    _, final_exts = qemu_reads(final)
    assert [d for k, d in final_exts if k == FT] == ft


def with_autoclear(path: Path, start: bytes, exts: Extensions) -> bytes:
    """The built image with the autoclear bit of bitmaps set where it has the extension
    (as QEMU writes it: without the bit the extension is stale)."""
    bit = 1 if any(k == BM for k, _ in exts) else 0
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, hdr.AUTOCLEAR_OFFSET, bit)
    path.write_bytes(data)
    return bytes(data[: len(start)])


def bitmaps_bit(c: bytes) -> bool:
    return bool(struct.unpack_from(">Q", c, hdr.AUTOCLEAR_OFFSET)[0] & hdr.AUTOCLEAR_BITMAPS)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scene=scenes().filter(lambda s: s.version == 3))
# QEMU's own layout with a backing file: the first bitmap's extension pushes the area
# past the first sector, over the name
@example(scene=qemu_like(old=(20, "qcow2"), new=(0, None)))
@example(scene=qemu_like(old=(700, "raw"), new=(0, None)))
def test_bitmaps_extension_added_or_dropped(tmp_path: Path, scene: Scene) -> None:
    """``change_extensions``, as the first bitmap (the extension added, with the
    autoclear bit) and the removal of the last one (both dropped) use it: every crash
    state shows the same backing file and either the old or the new extensions, with
    the autoclear bit that goes with them (the feature-name table may be missing only
    with the new ones)."""
    path = tmp_path / "top.qcow2"
    if path.exists():
        os.unlink(path)
    built = build(path, scene)
    assume(built is not None)
    assert built is not None
    start = with_autoclear(path, built, scene.exts)
    cs = len(start)
    old_id, old_exts = qemu_reads(start)
    had = any(k == BM for k, _ in old_exts)
    if had:
        new_exts = [(k, d) for k, d in old_exts if k != BM]
    else:
        new_exts = [*old_exts, (BM, struct.pack(">IIQQ", 1, 0, 512, cs))]
    event("dropped" if had else "added")
    events = written_or_refused(
        path, cs, lambda f, h: change_extensions(f, h, new_exts, 0 if had else 1)
    )
    if events is None:
        return
    final = path.read_bytes()[:cs]
    assert qemu_reads(final) == (old_id, new_exts)
    assert bitmaps_bit(final) == (not had)
    ft = [d for k, d in old_exts if k == FT]
    for state in crashed(start, events, scene.seed):
        got, exts = qemu_reads(state)
        assert got == old_id, (got, old_id)
        is_new = others(exts) == others(new_exts)
        assert is_new or others(exts) == others(old_exts), exts
        assert bitmaps_bit(state) == (is_new != had), "the autoclear bit goes with the set"
        kept = [d for k, d in exts if k == FT]
        assert kept == ft or (not kept and is_new), "the feature-name table"
        ours = hdr.parse(state + final[len(state) :], str(path), os.path.getsize(path))
        assert (ours.backing_file, ours.backing_format) == got
