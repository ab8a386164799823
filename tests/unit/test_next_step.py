"""How a commit or copy pass walks the disk (``mirror.next_step``): it jumps over what
no layer of ``layers[top:stop]`` holds straight to the next unit (a target cluster,
at least a granule) that one holds, and copies from there a step at a time.  Checked
against every layer's extents on chains of mixed cluster sizes written at random, with
small scan windows so that the jumps cross them.  No QEMU; chainfs's own images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfs.chain import Chain
from chainfs.formats.base import UNALLOCATED
from chainfs.formats.qcow2 import create_overlay
from chainfs.jobs import mirror

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
STEP = 256 * KiB


def build(d: Path, sizes: list[int], writes: list[tuple[int, int, int]]) -> list[str]:
    """The chain ``[A] <- [B] <- [C]`` in ``d`` with the given cluster sizes, written at
    random: (level, offset, length), level 0 being A, the bottom.  Paths bottom first."""
    paths = [str(d / f"{name}.qcow2") for name in ("A", "B", "C")]
    below: str | None = None
    for path, cs in zip(paths, sizes, strict=True):
        create_overlay(
            path, size=SIZE, backing=below, backing_format=below and "qcow2", cluster_size=cs
        )
        below = path
    for level, offset, length in writes:
        with Chain.open(paths[level], writable=True, lock=False) as layer_chain:
            layer_chain.write(offset, os.urandom(min(length, SIZE - offset)))
    return paths


def held_units(chain: Chain, unit: int, top: int, stop: int) -> set[int]:
    """The units some layer of ``layers[top:stop]`` holds part of (from extents)."""
    out: set[int] = set()
    for layer in chain.layers[top:stop]:
        for e in layer.extents(0, SIZE):
            if e.kind != UNALLOCATED:
                out.update(range(e.offset // unit, -(-(e.offset + e.length) // unit)))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.sampled_from([4 * KiB, 64 * KiB, 256 * KiB]), min_size=3, max_size=3),
    target_cs=st.sampled_from([16 * KiB, 64 * KiB, 512 * KiB]),
    writes=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, SIZE - 1), st.integers(1, 300 * KiB)),
        max_size=12,
    ),
    top=st.integers(0, 1),
)
def test_the_walk_skips_only_what_nobody_holds(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    sizes: list[int],
    target_cs: int,
    writes: list[tuple[int, int, int]],
    top: int,
) -> None:
    monkeypatch.setattr(mirror, "SCAN", 2 * MiB)
    d = tmp_path_factory.mktemp("walk")
    paths = build(d, sizes, writes)
    target_path = str(d / "T.qcow2")
    create_overlay(
        target_path, size=SIZE, backing=None, backing_format=None, cluster_size=target_cs
    )
    stop = 2  # layers C and B (top=0) or B alone (top=1): A is below the base
    with Chain.open(paths[-1], lock=False) as chain, Chain.open(target_path, lock=False) as t:
        target = t.active
        unit = max(chain.granule, target_cs)
        held = held_units(chain, unit, top, stop)
        pos, copied = 0, set()
        while pos < SIZE:
            n, copy = mirror.next_step(chain, target, top, stop, pos, SIZE, STEP)
            assert n > 0
            units = set(range(pos // unit, -(-(pos + n) // unit)))
            if copy:
                assert pos // unit in held  # a step starts where something is held
                assert n == min(STEP, SIZE - pos)
                copied |= units
            else:
                assert not units & held  # a jump passes over nothing held
                assert (pos + n) % unit == 0 or pos + n == SIZE  # and lands on a unit
            pos += n
        assert pos == SIZE
        assert held <= copied  # everything held is in some copied step


def or_of_maps(chain: Chain, top: int, stop: int, start: int, count: int) -> bytes:
    """What ``held_map`` must say: the layers' own allocation maps, ORed."""
    held = 0
    for layer in chain.layers[top:stop]:
        held |= layer.allocation_map(start, count, chain.granule)
    return held.to_bytes(count, "little")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.sampled_from([4 * KiB, 64 * KiB, 256 * KiB]), min_size=3, max_size=3),
    writes=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, SIZE - 1), st.integers(1, 300 * KiB)),
        max_size=8,
    ),
    guest=st.lists(
        st.tuples(st.booleans(), st.integers(0, SIZE - 1), st.integers(1, 300 * KiB)),
        max_size=8,
    ),
)
def test_held_map_follows_guest_writes(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    writes: list[tuple[int, int, int]],
    guest: list[tuple[bool, int, int]],
) -> None:
    """``Chain.held_map`` for every ``top``/``stop`` equals the ORed allocation maps of
    the layers, also after guest writes and zero writes land on a map that was already
    built (from the active layer down it answers from the map of who holds what, which
    those writes must keep up to date), and past the disk's end."""
    paths = build(tmp_path_factory.mktemp("held"), sizes, writes)
    with Chain.open(paths[-1], writable=True, lock=False) as chain:
        g = chain.granule
        count = SIZE // g + 3  # and a few granules past the end
        cases = [(top, stop) for top in range(3) for stop in range(top + 1, 4)]

        def check() -> None:
            for top, stop in cases:
                want = or_of_maps(chain, top, stop, 0, count)
                assert chain.held_map(top, stop, 0, count) == want, (top, stop)
                assert chain.held_map(top, stop, 5 * g, 7) == want[5:12], (top, stop)

        check()  # builds the map
        for zeroes, offset, length in guest:
            n = min(length, SIZE - offset)
            if zeroes:
                chain.write_zeroes(offset, n)
            else:
                chain.write(offset, os.urandom(n))
        check()
