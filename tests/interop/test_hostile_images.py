"""Fuzzed qcow2 images: real qemu-img-made images with their headers and tables damaged.

A seeded mutator flips bytes and plants hostile values (offsets past the end of the file,
into other metadata, misaligned, near 2^63 and 2^64; absurd sizes; compressed descriptors
pointing anywhere) in the header, the header extensions, the L1 and L2 tables and the
refcount table and blocks.  Every mutated image must be either refused with a
``ChainfsError`` or read without any other exception, with every host read bounded, and
without a byte of it changing.  Where QEMU reads the same image too, the two must agree.
A writable session on a damaged image may refuse or succeed, but ``qemu-img check``
must never find more corruption after it than before, and on an image QEMU found clean
the data written must be there for QEMU to read.

Cases are numbered; a failure names the case, whose image is left in the test's
``tmp_path``, and ``CASE=n`` in the test's id reproduces it.  The default run does a few
thousand cases in seconds; ``--runslow`` runs many more.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.errors import ChainfsError

from . import images as im
from .images import KiB, MiB

OFFSET_MASK = 0x00FFFFFFFFFFFE00

# (offset, width) of the fixed header fields after the magic
FIELDS = [
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
    (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]  # fmt: skip
SMALL_VALUES = [0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 20, 21, 22, 31, 32, 63, 64, 72, 103, 104]
SMALL_VALUES += [105, 112, 113, 1023, 1024, 2048, 0xFFFFFFFF, 0x7FFFFFFF]


# -- the seeds: every variant QEMU writes that chainfs reads ------------------------


@dataclass(frozen=True)
class Seed:
    name: str  # the file that gets damaged
    open: str  # the file whose chain is opened (a damaged base is opened through its top)


SEEDS = [
    Seed("v3.qcow2", "v3.qcow2"),
    Seed("v2.qcow2", "v2.qcow2"),
    Seed("rc1.qcow2", "rc1.qcow2"),
    Seed("top.qcow2", "top.qcow2"),
    Seed("base.qcow2", "top.qcow2"),
    Seed("base.qcow2", "base.qcow2"),
    Seed("zlib.qcow2", "zlib.qcow2"),
]


def build_seeds(d: Path) -> dict[str, bytes]:
    """Small images with data, zero clusters, compressed clusters and a backing chain."""
    p = {name: str(d / name) for name in {s.name for s in SEEDS} | {"plain.raw"}}
    im.create(p["v3.qcow2"], MiB, cluster_size=4 * KiB)
    im.write(p["v3.qcow2"], [(0, 100 * KiB, 0x11), (200 * KiB, 64 * KiB, None)])
    im.write(p["v3.qcow2"], [(600 * KiB, 5000, 0x22)])
    im.write_compressed(p["v3.qcow2"], [(800 * KiB, 4 * KiB, 0x33)])
    im.create(p["v2.qcow2"], 256 * KiB, cluster_size=512, compat="0.10")
    im.write(p["v2.qcow2"], [(0, 10 * KiB, 0x11), (100 * KiB, 5000, 0x22)])
    im.write_compressed(p["v2.qcow2"], [(200 * KiB, 512, 0x33)])
    im.create(p["rc1.qcow2"], 2 * MiB, cluster_size=64 * KiB, refcount_bits=1)
    im.write(p["rc1.qcow2"], [(0, 100 * KiB, 0x11), (MiB, 5000, 0x22)])
    im.create(p["base.qcow2"], 512 * KiB, cluster_size=1024, refcount_bits=64)
    im.write(p["base.qcow2"], [(0, 512 * KiB, 0x44)])
    im.create(p["top.qcow2"], 512 * KiB, cluster_size=2048, backing="base.qcow2", cwd=str(d))
    im.write(p["top.qcow2"], [(3000, 9000, 0x55), (64 * KiB, 8 * KiB, None)])
    im.write_compressed(p["top.qcow2"], [(128 * KiB, 2 * KiB, 0x66)])
    with open(p["plain.raw"], "wb") as f:
        f.write(random.Random(7).randbytes(256 * KiB))
    im.convert_compressed(p["plain.raw"], p["zlib.qcow2"], cluster_size=16 * KiB)
    os.unlink(p["plain.raw"])
    return {name: Path(path).read_bytes() for name, path in p.items() if name != "plain.raw"}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return build_seeds(tmp_path_factory.mktemp("seeds"))


# -- the mutator ----------------------------------------------------------------------


def u64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def regions(data: bytes | bytearray) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """Where an (intact or already damaged) image's structures are: kind -> (offset, length)."""
    out: dict[str, list[tuple[int, int]]] = {
        "header": [], "l1": [], "l2": [], "reftable": [], "refblock": [],
    }  # fmt: skip
    if len(data) < 72:
        return out, 512
    cb = struct.unpack_from(">I", data, 20)[0]
    if not 9 <= cb <= 21:
        return out, 512
    cs = 1 << cb
    out["header"].append((0, min(cs, len(data))))
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", data, 36)
    out["l1"].append((l1_off, l1_size * 8))
    out["reftable"].append((rt_off, rt_clusters * cs))
    for e in table(data, l1_off, l1_size):
        if e & OFFSET_MASK and (e & OFFSET_MASK) + cs <= len(data):
            out["l2"].append((e & OFFSET_MASK, cs))
    for e in table(data, rt_off, rt_clusters * cs // 8):
        if e & ~511 and (e & ~511) + cs <= len(data):
            out["refblock"].append((e & ~511, cs))
    return out, cs


def table(data: bytes | bytearray, offset: int, entries: int) -> tuple[int, ...]:
    """Up to 4096 entries of a table, as far as the file holds them."""
    n = max(0, min(entries, 4096, (len(data) - offset) // 8))
    return struct.unpack_from(f">{n}Q", data, offset) if offset < len(data) else ()


def hostile_value(rng: random.Random, data: bytearray, cs: int, where: list[int]) -> int:
    eof = len(data)
    values = [0, 1, 8, 511, 512, cs - 1, cs, cs + 8, eof, eof - cs, eof + cs, eof - 8]
    values += [eof // cs * cs, 1 << 63, (1 << 63) - cs, (1 << 64) - 1, 1 << 62, (1 << 56) - cs]
    values += [1 << 32, 1 << 31, (1 << 32) - 1, rng.getrandbits(64), rng.getrandbits(32)]
    values += [rng.randrange(eof + 1)]
    values += [w + d for w in where for d in (0, 8, cs // 2)]
    return rng.choice(values) & ((1 << 64) - 1)


def mutate(rng: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        found, cs = regions(data)
        where = [off for spans in found.values() for off, _ in spans]
        kind = rng.randrange(9)
        if kind == 0:  # a header field
            off, width = rng.choice(FIELDS)
            value = hostile_value(rng, data, cs, where)
            if width == 4:
                value = rng.choice([value & 0xFFFFFFFF, *SMALL_VALUES, cs, cs + 8])
            value &= (1 << (8 * width)) - 1
            data[off : off + width] = value.to_bytes(width, "big")
        elif kind in (1, 2, 3):  # a table entry
            tables = [k for k in ("l1", "l2", "reftable", "refblock") if found[k]]
            table = rng.choice(tables or ["header"])
            if not found[table]:
                continue
            off, length = rng.choice(found[table])
            if off >= len(data):
                continue
            length = max(8, min(length, len(data) - off))
            at = off + rng.randrange(max(1, length // 8)) * 8
            if table == "refblock":
                width = rng.choice([1, 2, 8])
                value = rng.choice([0, 1, 2, 0xFF, rng.getrandbits(8 * width)])
                data[at : at + width] = value.to_bytes(width, "big")
            else:
                flags = rng.choice([0, 0, 1 << 63, 1 << 62, 1, (1 << 63) | 1, 0x100])
                value = hostile_value(rng, data, cs, where) | flags
                data[at : at + 8] = (value & ((1 << 64) - 1)).to_bytes(8, "big")
        elif kind == 4:  # bit flips in a structure
            spans = [s for spans in found.values() for s in spans if s[0] < len(data)]
            if not spans:
                continue
            off, length = rng.choice(spans)
            length = max(1, min(length, len(data) - off))
            for _ in range(rng.randint(1, 8)):
                at = off + rng.randrange(length)
                data[at] ^= 1 << rng.randrange(8)
        elif kind == 5:  # random bytes in the header and its extensions
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 512))] = rng.randrange(256)
        elif kind == 6:  # truncated
            del data[rng.randrange(len(data) + 1) :]
        elif kind == 7:  # garbage appended
            data += rng.randbytes(rng.randrange(1, 3 * cs))
        elif kind == 8 and found["l2"]:  # a compressed descriptor pointing anywhere
            off, length = rng.choice(found["l2"])
            at = off + rng.randrange(length // 8) * 8
            if at + 8 <= len(data):
                value = (
                    rng.getrandbits(62) if rng.random() < 0.5 else rng.randrange(len(data) + 2 * cs)
                )
                data[at : at + 8] = ((1 << 62) | value).to_bytes(8, "big")
    return bytes(data)


# -- the invariants -------------------------------------------------------------------


class Workdir:
    """The seeds laid out in a directory, one of them damaged per case."""

    def __init__(self, d: Path, seeds: dict[str, bytes]) -> None:
        self.d, self.seeds = d, seeds
        d.mkdir(exist_ok=True)
        self.restore()

    def restore(self) -> None:
        for name, data in self.seeds.items():
            self._put(name, data)

    def _put(self, name: str, data: bytes) -> None:
        # overwritten in place: truncating to zero first costs milliseconds a file
        fd = os.open(self.d / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def damage(self, case: int) -> tuple[Seed, str, bytes]:
        """Damage one seed file for ``case``; return it, the path to open, the new bytes."""
        rng = random.Random(case)
        seed = rng.choice(SEEDS)
        data = mutate(rng, self.seeds[seed.name])
        self._put(seed.name, data)
        return seed, str(self.d / seed.open), data

    def undo(self, seed: Seed) -> None:
        self._put(seed.name, self.seeds[seed.name])


def read_everything(path: str) -> bytes | ChainfsError:
    """The whole disk, in reads of several sizes, or the ChainfsError that stopped it."""
    try:
        with Chain.open(path, lock=False) as chain:
            out = bytearray()
            step = 64 * KiB
            for offset in range(0, chain.size, step):
                out += chain.read(offset, step)
            chain.read(max(0, chain.size - 700), 1400)
            return bytes(out)
    except ChainfsError as e:
        return e


def run_read_cases(work: Workdir, cases: range) -> None:
    for case in cases:
        seed, path, data = work.damage(case)
        try:
            read_everything(path)
        except Exception as e:
            raise AssertionError(
                f"case {case} ({seed.name}, opened as {seed.open}): "
                f"{type(e).__name__}: {e}; the image is in {work.d}"
            ) from e
        assert (work.d / seed.name).read_bytes() == data, f"case {case}: a read changed the file"
        work.undo(seed)


def test_fuzzed_images_read_or_refused(
    tmp_path: Path, seeds: dict[str, bytes], bounded_reads: None
) -> None:
    run_read_cases(Workdir(tmp_path / "w", seeds), range(4000))


@pytest.mark.slow
def test_fuzzed_images_read_or_refused_many(
    tmp_path: Path, seeds: dict[str, bytes], bounded_reads: None
) -> None:
    run_read_cases(Workdir(tmp_path / "w", seeds), range(100_000, 140_000))


def qemu_reads(path: str, out: str) -> bytes | None:
    proc = subprocess.run(
        [im.QEMU_IMG, "convert", "-O", "raw", path, out], capture_output=True, check=False
    )
    return Path(out).read_bytes() if proc.returncode == 0 else None


def run_differential_cases(work: Workdir, cases: range) -> dict[str, int]:
    tally = {"both read": 0, "only chainfs reads": 0, "only qemu reads": 0, "neither": 0}
    for case in cases:
        seed, path, _ = work.damage(case)
        ours = read_everything(path)
        theirs = qemu_reads(path, str(work.d / "qemu.raw"))
        if isinstance(ours, bytes) and theirs is not None:
            assert ours == theirs, f"case {case}: chainfs and QEMU read {seed.name} differently"
        key = ("both read", "only chainfs reads", "only qemu reads", "neither")[
            2 * (not isinstance(ours, bytes)) + (theirs is None)
        ]
        tally[key] += 1
        work.undo(seed)
    return tally


def test_fuzzed_images_read_like_qemu(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    tally = run_differential_cases(Workdir(tmp_path / "w", seeds), range(200_000, 200_200))
    # the cases must exercise both outcomes, or the comparison proves little
    assert tally["both read"] > 20 and tally["neither"] > 20, tally


@pytest.mark.slow
def test_fuzzed_images_read_like_qemu_many(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    run_differential_cases(Workdir(tmp_path / "w", seeds), range(300_000, 303_000))


# -- writing into damaged images -------------------------------------------------------


@dataclass
class Verdict:
    """What ``qemu-img check`` says: exit status (63: cannot open), corruptions, and
    whether some damage lies beyond what chainfs checks without reading every L2 table:
    a cluster with more references than its refcount, or a reference past the end of
    the file (chainfs allocates there)."""

    rc: int
    corruptions: int
    needs_full_scan: bool


def qemu_check(path: str) -> Verdict:
    # not ``images.check``: a damaged backing name can make QEMU's messages invalid UTF-8
    proc = subprocess.run(
        [im.QEMU_IMG, "check", "-f", "qcow2", path],
        capture_output=True, text=True, errors="replace", check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    found = re.search(r"(\d+) errors were found on the image", out)
    counts = re.findall(r"refcount=(\d+) reference=(\d+)", out)
    undercounted = any(int(refs) > int(count) for count, refs in counts)
    past_eof = "exceeding the end of the file" in out
    return Verdict(proc.returncode, int(found[1]) if found else 0, undercounted or past_eof)


WRITES = [(0, 100, 0x78), (5000, 9000, 0x77), (-7000, 6000, 0x76)]


def write_session(path: str) -> tuple[list[im.Write], ChainfsError | None]:
    """Open writable, write the patterns, close; return what was acknowledged."""
    done: list[im.Write] = []
    try:
        with Chain.open(path, writable=True, lock=False) as chain:
            for offset, length, pattern in WRITES:
                offset = offset % max(1, chain.size - length) if offset < 0 else offset
                end = offset + length
                # on a (damaged, tiny) disk the writes may not fit, or overlap
                if end > chain.size or any(o < end and offset < o + n for o, n, _ in done):
                    continue
                chain.write(offset, bytes([pattern]) * length)
                done.append((offset, length, pattern))
            chain.flush()
    except ChainfsError as e:
        return done, e
    return done, None


def run_write_cases(work: Workdir, cases: range) -> dict[str, int]:
    tally = {"refused at open": 0, "refused later": 0, "written": 0}
    for case in cases:
        seed, _, data = work.damage(case)
        path = str(work.d / seed.name)  # the damaged file itself is the one written
        before = qemu_check(path)
        done, error = write_session(path)
        after = Path(path).read_bytes()
        verdict = qemu_check(path)
        what = f"case {case} ({seed.name}: check {before} -> {verdict}, {error})"
        if error is not None and not done:
            tally["refused at open" if after == data else "refused later"] += 1
        else:
            tally["written" if error is None else "refused later"] += 1
        # (exit 1 or 63: QEMU could not check the image at all)
        if before.rc in (0, 2, 3) and not before.needs_full_scan:
            # (a cluster referenced from two L2 tables but counted once, or a reference
            # past the end of the file in a table the session never loads, is beyond
            # what chainfs checks: that takes reading every table, which QEMU does not
            # do either)
            assert verdict.corruptions <= before.corruptions, what
            assert verdict.rc != 2 or before.rc == 2, what
        if before.rc in (0, 3) and error is None:
            # an image QEMU found consistent stays so, and holds what was written
            assert verdict.rc in (0, 3), what
            if done and shutil.which(im.QEMU_IO):
                im.qemu_io(path, [f"read -P {p} {o} {n}" for o, n, p in done], fmt="qcow2")
        work.undo(seed)
    return tally


def test_fuzzed_images_written_never_get_worse(tmp_path: Path, seeds: dict[str, bytes]) -> None:
    tally = run_write_cases(Workdir(tmp_path / "w", seeds), range(400_000, 400_120))
    assert tally["written"] > 10 and tally["refused at open"] > 10, tally


@pytest.mark.slow
def test_fuzzed_images_written_never_get_worse_many(
    tmp_path: Path, seeds: dict[str, bytes]
) -> None:
    run_write_cases(Workdir(tmp_path / "w", seeds), range(500_000, 501_500))


# -- named cases, with QEMU's verdict alongside -------------------------------------


def test_backing_string_of_1023_bytes_reads_like_qemu(tmp_path: Path) -> None:
    name = "/".join(["d" * 200] * 4 + ["e" * 210, "base.raw"])  # components <= 255 bytes
    assert len(name) == 1023
    base = tmp_path / name
    base.parent.mkdir(parents=True)
    base.write_bytes(random.Random(3).randbytes(MiB))
    top = str(tmp_path / "top.qcow2")
    im.create(top, MiB, backing=name, backing_fmt="raw", cwd=str(tmp_path))
    im.write(top, [(4096, 10000, 0x61)])
    with Chain.open(top, lock=False) as chain:
        assert chain.layers[0].backing_string == name
        assert chain.read(0, MiB) == im.reference(top)


def test_backing_string_of_1024_bytes_is_refused_by_both(tmp_path: Path) -> None:
    top = str(tmp_path / "top.qcow2")
    im.create(top, MiB, backing="b" * 200, backing_fmt="raw", unsafe=True, cwd=str(tmp_path))
    offset = u64(im.read_header(top), 8)
    im.patch(top, offset, b"b" * 1024)
    im.patch(top, 16, (1024).to_bytes(4, "big"))
    proc = subprocess.run([im.QEMU_IMG, "info", top], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "too long" in proc.stderr
    with pytest.raises(ChainfsError, match="1024 bytes; at most 1023"):
        Chain.open(top, lock=False)


@pytest.fixture
def compressed_image(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    """A 64 KiB-cluster image of compressed clusters: (path, L2 offset, cluster size)."""
    raw = str(tmp_path / "data.raw")
    with open(raw, "wb") as f:
        f.write(random.Random(5).randbytes(128 * KiB) + b"\x5a" * (384 * KiB))
    path = im.convert_compressed(raw, str(tmp_path / "c.qcow2"))
    header = im.read_header(path)
    l1 = u64(header, 40)
    with open(path, "rb") as f:
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & OFFSET_MASK
    assert im.compressed_clusters(path) >= 6
    yield path, l2, 64 * KiB


def compressed_entry(coffset: int, sectors: int, cs: int = 64 * KiB) -> int:
    x = 62 - (cs.bit_length() - 1 - 8)
    return 1 << 62 | (sectors - 1) << x | coffset


@pytest.mark.parametrize(
    "target",
    ["past-eof", "far-past-eof", "header", "l1", "mid-stream", "max-sectors", "one-sector"],
)
def test_compressed_descriptor_pointing_anywhere(
    compressed_image: tuple[str, int, int], target: str, bounded_reads: None
) -> None:
    path, l2, cs = compressed_image
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(l2 + 8 * 4)
        e = int.from_bytes(f.read(8), "big")
    x = 62 - (cs.bit_length() - 1 - 8)
    coffset, sectors = e & ((1 << x) - 1), ((e >> x) & ((1 << (cs.bit_length() - 9)) - 1)) + 1
    entry = {
        "past-eof": compressed_entry(size + 100, 3),
        "far-past-eof": compressed_entry((1 << x) - 1, 1 << (cs.bit_length() - 9)),
        "header": compressed_entry(0, 8),
        "l1": compressed_entry(u64(im.read_header(path), 40), 2),
        "mid-stream": compressed_entry(coffset + 37, sectors),
        "max-sectors": compressed_entry(coffset, 1 << (cs.bit_length() - 9)),
        "one-sector": compressed_entry(coffset, 1),
    }[target]
    im.patch(path, l2 + 8 * 4, entry.to_bytes(8, "big"))
    before = Path(path).read_bytes()
    ours = read_everything(path)
    theirs = qemu_reads(path, path + ".raw")
    if isinstance(ours, bytes):
        assert theirs is None or ours == theirs
    else:
        assert "compressed cluster" in str(ours) and os.path.basename(path) in str(ours)
    if target == "max-sectors":
        # more input than the cluster needs: decompression stops at one cluster
        assert isinstance(ours, bytes) and ours == theirs
    assert Path(path).read_bytes() == before


def test_dirty_image_with_damaged_tables_is_not_rebuilt(tmp_path: Path) -> None:
    """QEMU's own dirty (lazy refcounts, killed) image, then an L2 entry pointing into
    the L1 table: the writable open must refuse before the rebuild writes anything."""
    path = im.create(str(tmp_path / "dirty.qcow2"), MiB, lazy_refcounts=True, cluster_size=4 * KiB)
    im.make_dirty(path, [(0, 64 * KiB, 0x31)])
    data = Path(path).read_bytes()
    l1 = u64(data, 40)
    l2 = u64(data, l1) & OFFSET_MASK
    im.patch(path, l2 + 8, (1 << 63 | l1).to_bytes(8, "big"))
    before = Path(path).read_bytes()
    with pytest.raises(ChainfsError, match="pointing into metadata"):
        Chain.open(path, writable=True, lock=False)
    assert Path(path).read_bytes() == before
    # QEMU agrees that this is corruption
    assert qemu_check(path).rc == 2
