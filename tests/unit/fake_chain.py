"""A stand-in chain for the unit tests of ``Views`` and ``Operations``: layer paths and
sizes, reads recorded by level, writes recorded, no image behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIZE = 1 << 20


@dataclass
class FakeLayer:
    path: str
    virtual_size: int = SIZE


@dataclass
class FakeChain:
    """What ``Operations`` and ``Views`` use of a chain: its layers' paths and sizes,
    its attributes, and reads by level (recorded in ``reads``)."""

    layers: list[FakeLayer]
    size: int = SIZE
    confine: Any = None
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    writes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    locked: bool = False
    read_map: Any = None  # what ``attach_read_map`` was given (nothing calls pyfuse3)

    @property
    def active(self) -> FakeLayer:
        return self.layers[0]

    def size_at(self, level: int) -> int:
        return self.layers[level].virtual_size

    def count_data(self, level: int = 0) -> int:
        return 4096 * (len(self.layers) - level)

    def count_is_cheap(self, level: int = 0) -> bool:
        return True

    def allocated(self) -> int:
        return 4096

    def read(self, offset: int, length: int, level: int = 0) -> bytes:
        self.reads.append((offset, length, level))
        return bytes(length)

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, len(data)))

    def attach_read_map(self, read_map: Any, *, writes: bool = False) -> None:
        self.read_map = read_map

    def written_ns(self) -> int:
        return 0  # (pyfuse3 never overwrites for it)

    def release_read_map(self) -> None:
        self.read_map = None

    def revoke_writes(self) -> None:
        pass  # (no marks: see ``written_ns``)
