"""Other map sizes for the "who holds it" map tests (unit and interop), so that region,
table and slice boundaries fall everywhere in small images.  Needs no QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from chainfs import chain as chain_module
from chainfs.formats.qcow2 import tables

# (granules per region as a power of two, bytes per L2 slice): the real sizes, then tiny
# ones (a region of 4 granules, a slice of 2 entries), then odd middling ones
GEOMETRIES = [(chain_module.REGION_BITS, tables.L2_SLICE), (2, 16), (7, 256)]


@contextmanager
def geometry(region_bits: int, l2_slice: int) -> Iterator[None]:
    """Open chains inside this block with other map sizes (the slice size is per layer)."""
    with (
        mock.patch.object(chain_module, "REGION_BITS", region_bits),
        mock.patch.object(tables, "L2_SLICE", l2_slice),
    ):
        yield
