"""The zero tests of stream and commit (``buffers.zero_at``, ``engine._stretches``): a
memcmp per power-of-two piece against a kept block of zeros, checked against the plain
byte-by-byte answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chainfs import buffers, engine

PIECES = st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), min_size=1, max_size=8)


def build(pieces: list[tuple[bool, int]]) -> bytearray:
    return bytearray(b"".join(bytes(n) if zero else b"\x01" * n for zero, n in pieces))


@given(pieces=PIECES, a=st.integers(0, 40000), n=st.integers(0, 40000))
def test_zero_at_is_all_zeros(pieces: list[tuple[bool, int]], a: int, n: int) -> None:
    data = build(pieces)
    a = min(a, len(data))
    n = min(n, len(data) - a)
    assert buffers.zero_at(data, a, n) == (data[a : a + n].count(0) == n)


@given(pieces=PIECES, cs=st.sampled_from([512, 4096, 1000]), tail=st.integers(0, 100))
def test_stretches_alternate_and_cover(pieces: list[tuple[bool, int]], cs: int, tail: int) -> None:
    data = build(pieces) + b"\x07" * tail  # bytes past n must not count
    n = len(data) - tail
    out = list(engine._stretches(data, n, cs))
    assert out[0][0] == 0 and out[-1][1] == n if n else out == []
    for (a, b, zero), nxt in zip(out, out[1:] + [None], strict=True):
        pieces_ = [(p, min(p + cs, b)) for p in range(a, b, cs)]
        assert all((data[p:q].count(0) == q - p) == zero for p, q in pieces_)
        if nxt is not None:
            assert nxt[0] == b and nxt[2] != zero  # stretches alternate, no gap
