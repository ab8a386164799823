"""Raw images: every byte is data, nothing defers to a backing file."""

from __future__ import annotations

from ..errors import ChainfsError
from ..hostfile import HostFile
from .base import DATA, ZERO, Buffer, Extent, Fill, Layer, lane_ones

RAW_GRANULE = 512


class RawLayer(Layer):
    format_name = "raw"

    def __init__(self, file: HostFile) -> None:
        self.file = file
        size = file.size()
        # a raw image's virtual size is its length rounded up to whole sectors, as QEMU
        # does (a 3-byte file is a 512-byte disk); the tail past the end reads as zeros
        self.virtual_size = -(-size // RAW_GRANULE) * RAW_GRANULE
        self.cluster_size = RAW_GRANULE

    def allocation_map(self, start: int, count: int, granule: int) -> int:
        return lane_ones(count)

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        out: list[Extent] = []
        if offset < self.virtual_size:
            n = min(end, self.virtual_size) - offset
            out.append(Extent(offset, n, DATA, offset))
            offset += n
        if offset < end:
            out.append(Extent(offset, end - offset, ZERO))
        return out

    def read_compressed(self, host: int, clen: int) -> Buffer:
        raise AssertionError("raw images have no compressed clusters")

    def write(self, offset: int, data: Buffer, fill: Fill) -> None:
        if offset + len(data) > self.virtual_size:
            raise ChainfsError(f"write past the end of {self.path!r}")
        self.file.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int, fill: Fill) -> None:
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            self.write(pos, bytes(min(step, offset + length - pos)), fill)

    def grow(self, size: int, fill: Fill, *, backing_size: int) -> None:
        size -= size % RAW_GRANULE
        if size <= self.virtual_size:
            return
        self.file.truncate(size)  # a raw image has no backing: the new area reads zeros
        self.file.flush()
        self.virtual_size = size

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            if self.file.writable:
                self.file.flush()
        finally:
            self.file.close()
