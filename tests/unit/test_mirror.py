"""The mirror's dirty map: which granules a guest wrote behind the copy, and in what order
they come back, checked against a plain set model with hypothesis."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from chainfs.jobs.mirror import DirtyMap

G = 65536
SIZE = 64 * G


def test_writes_past_the_horizon_are_not_recorded() -> None:
    woken: list[int] = []
    m = DirtyMap(G, lambda: woken.append(1))
    m.mark(0, 100)
    assert len(m) == 0 and not woken  # the first pass has not copied anything yet
    m.horizon = 4 * G
    m.mark(3 * G + 10, 2 * G)  # straddles the horizon: only the part behind it counts
    assert m.take() == [(3 * G, G)] and woken == [1]
    m.horizon = SIZE
    m.mark(G - 1, 2)  # two bytes across a granule boundary: both granules
    assert m.take() == [(0, 2 * G)]
    assert m.take() == [] and len(m) == 0


def test_take_is_lowest_first_and_bounded() -> None:
    m = DirtyMap(G, lambda: None)
    m.horizon = SIZE
    for i in (9, 1, 2, 3, 7):
        m.mark(i * G, 1)
    assert m.take(2 * G) == [(G, 2 * G)]
    assert m.take(G) == [(3 * G, G)]
    assert m.take() == [(7 * G, G), (9 * G, G)]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("mark"), st.integers(0, SIZE - 1), st.integers(1, 5 * G)),
            st.tuples(st.just("take"), st.integers(0, 8 * G), st.just(0)),
            st.tuples(st.just("horizon"), st.integers(0, SIZE), st.just(0)),
        ),
        max_size=40,
    )
)
def test_against_a_set_model(ops: list[tuple[str, int, int]]) -> None:
    m = DirtyMap(G, lambda: None)
    model: set[int] = set()
    horizon = 0
    for op, a, b in ops:
        if op == "mark":
            end = min(a + b, horizon)
            if a < end:
                model.update(range(a // G, -(-end // G)))
            m.mark(a, b)
        elif op == "horizon":
            horizon = m.horizon = max(horizon, a)
        else:
            got = m.take(a or None)
            granules = [o // G + k for o, n in got for k in range(n // G)]
            want = sorted(model)[: max(1, a // G)] if a else sorted(model)
            assert granules == want
            # ranges are maximal runs
            assert all(x[0] + x[1] < y[0] for x, y in itertools.pairwise(got))
            model.difference_update(granules)
        assert len(m) == len(model)


def test_discard_cleans_whole_granules() -> None:
    m = DirtyMap(G, lambda: None)
    m.horizon = SIZE
    for i in (1, 2, 3, 5):
        m.mark(i * G + 7, 1)
    m.discard(2 * G, 4 * G)  # what a write-blocking copy of granules 2..3 made clean
    assert m.take() == [(G, G), (5 * G, G)]


def test_the_bounded_drain_copies_what_is_dirty_now_once() -> None:
    # ready needs the granules dirty at the end of the first pass copied once, not a
    # dirty set that a guest writing faster than the job may never let empty
    m = DirtyMap(G, lambda: None)
    m.horizon = SIZE
    for i in (1, 2, 3, 7, 9):
        m.mark(i * G, 1)
    batches = m.batches(2 * G)
    assert batches == [[1, 2], [3, 7], [9]]
    assert m.take_granules(batches[0]) == [(G, 2 * G)]
    m.mark(G, 1)  # dirtied again meanwhile: left for later, not in this drain
    m.mark(20 * G, 1)
    m.discard(3 * G, 4 * G)  # copied by a write-blocking guest write meanwhile
    assert m.take_granules(batches[1]) == [(7 * G, G)]
    assert m.take_granules(batches[2]) == [(9 * G, G)]
    assert m.take() == [(G, G), (20 * G, G)]
