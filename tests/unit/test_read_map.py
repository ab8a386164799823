"""The flat file's read map (``chainfs/fastread.py``), kept by the chain, judged by a model.

A model map stands in for pyfuse3's: it records what the chain puts in it (per granule,
a host file descriptor and offset, or zeros) and what it clears.  Random reads fill it;
random guest writes, zero writes, discards, stream steps and reopened layers change the
chain.  After every step, every granule the map names must read — from that descriptor,
still open on the same file, or as zeros — exactly what the model of the disk says:
what pyfuse3 would answer without asking chainfs.
"""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain

from .test_map import build_chain


class ModelMap:
    """pyfuse3's read map for one inode, in Python (``chain.ReadMap``)."""

    def __init__(self) -> None:
        self.owner: Chain | None = None
        self.size = self.granule = 0
        self.extents: dict[int, tuple[int, int, str] | None] = {}  # granule -> fd, host, file
        self.sets = 0

    def take(self, chain: Chain) -> None:
        self.owner = chain

    def reset(self, size: int, granule: int) -> None:
        self.size, self.granule = size, granule
        self.extents.clear()

    def set(self, offset: int, fd: int | None, host: int = 0) -> None:
        assert offset % self.granule == 0 and offset < self.size
        self.sets += 1
        if fd is None:
            self.extents[offset // self.granule] = None
        else:
            self.extents[offset // self.granule] = (fd, host, os.readlink(f"/proc/self/fd/{fd}"))

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        end = self.size if length is None else min(self.size, offset + length)
        for gi in range(offset // self.granule, -(-end // self.granule)):
            self.extents.pop(gi, None)

    def release(self) -> None:
        self.extents.clear()
        if self.owner is not None:
            self.owner.read_map = None
        self.owner = None

    # overwrites (``test_write_map``): none here
    def set_writable(self, offset: int, fd: int, host: int) -> None:
        raise AssertionError("marked writable without a write map")

    def revoke_writes(self) -> None:
        pass

    def writes(self) -> int:
        return 0

    def written_ns(self) -> int:
        return 0

    def check(self, model: bytearray) -> None:
        """What pyfuse3 would answer for every mapped granule is the model's content."""
        g = self.granule
        for gi, ext in self.extents.items():
            want = bytes(model[gi * g : min(len(model), (gi + 1) * g)])
            if ext is None:
                assert want == bytes(len(want)), f"granule {gi} mapped as zeros"
                continue
            fd, host, name = ext
            assert os.readlink(f"/proc/self/fd/{fd}") == name, f"granule {gi}: fd {fd} reused"
            got = os.pread(fd, len(want), host)
            got += bytes(len(want) - len(got))
            assert got == want, f"granule {gi} mapped to {name} at {host}"


def _step(chain: Chain, model: bytearray, rng: random.Random) -> None:
    size, g = len(model), chain.granule
    kind = rng.choice(["read", "read", "read", "write", "zeroes", "discard", "stream", "reopen"])
    offset = rng.choice([rng.randrange(size), rng.randrange(-(-size // g)) * g]) % size
    length = min(size - offset, rng.choice([1, 512, 4096, g, 2 * g, rng.randrange(1, 3 * g)]))
    if kind == "read":
        assert chain.read(offset, length) == model[offset : offset + length]
    elif kind == "write":
        data = rng.randbytes(length)
        chain.write(offset, data)
        model[offset : offset + length] = data
    elif kind in ("zeroes", "discard"):
        (chain.write_zeroes if kind == "zeroes" else chain.discard)(offset, length)
        model[offset : offset + length] = bytes(length)
    elif kind == "stream" and len(chain.layers) > 1:
        chain.engine.stream_step(0, len(chain.layers), offset, length)
    elif kind == "reopen" and len(chain.layers) > 1:
        i = rng.randrange(1, len(chain.layers))
        chain.reopen(i, writable=True)
        chain.reopen(i, writable=False)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 5))
def test_read_map_never_says_what_the_disk_does_not_show(seed: int, depth: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="chainfs-readmap-") as d:
        top, model = build_chain(d, rng, depth)
        read_map = ModelMap()
        with Chain.open(top, writable=True, lock=False) as chain:
            model = model[: chain.size] + bytes(max(0, chain.size - len(model)))
            chain.attach_read_map(read_map)
            for _ in range(60):
                _step(chain, model, rng)
                read_map.check(model)
            for offset in range(0, chain.size, chain.granule):  # everything read: all mapped
                assert chain.read(offset, 4096) == model[offset : offset + 4096]
            read_map.check(model)
        assert chain.read_map is None and not read_map.extents  # closing released it


def test_reads_fill_the_map() -> None:
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="chainfs-readmap-") as d:
        top, model = build_chain(d, rng, 3)
        read_map = ModelMap()
        with Chain.open(top, lock=False) as chain:
            chain.attach_read_map(read_map)
            g = chain.granule
            for offset in range(0, chain.size, g):
                chain.read(offset, min(4096, chain.size - offset))
            # granules read are mapped (not where the holder shows more than one extent,
            # or not data alone: a compressed or partly allocated cluster)
            assert len(read_map.extents) >= chain.size // g // 2
            read_map.check(model)
            chain.release_read_map()
            assert chain.read_map is None and not read_map.extents
