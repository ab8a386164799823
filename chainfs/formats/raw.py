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

    def next_mapped(self, offset: int) -> int | None:
        """Where the file's data starts at or after ``offset`` (SEEK_DATA): its holes
        hold nothing the count would find."""
        size = self.file.size()
        if offset >= size:
            return None
        data = self.file.next_data(offset)
        return data if data < size else None

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

    def data_extents(self, offset: int, length: int) -> list[Extent]:
        """The file's own holes (SEEK_DATA/SEEK_HOLE on it) as ZERO, its data as DATA."""
        out: list[Extent] = []
        pos, end = offset, offset + length
        stop = min(end, self.virtual_size)
        while pos < stop:
            data = min(self.file.next_data(pos), stop)
            if data > pos:
                out.append(Extent(pos, data - pos, ZERO))
            if data >= stop:
                pos = stop
                break
            hole = min(max(self.file.next_hole(data), data + 1), stop)
            out.append(Extent(data, hole - data, DATA, data))
            pos = hole
        if pos < end:
            out.append(Extent(pos, end - pos, ZERO))
        return out

    def discard(self, offset: int, length: int, fill: Fill, below_has_data: bytes) -> None:
        """Punch the range out of the file (sector-aligned part; zeros where it cannot)."""
        if offset + length > self.virtual_size:
            raise ChainfsError(f"write past the end of {self.path!r}")
        a = -(-offset // RAW_GRANULE) * RAW_GRANULE
        b = max(a, (offset + length) // RAW_GRANULE * RAW_GRANULE)
        if b > a and self.file.punch_hole(a, b - a):
            self.write_zeroes(offset, min(a, offset + length) - offset, fill)
            self.write_zeroes(b, max(0, offset + length - b), fill)
        else:
            self.write_zeroes(offset, length, fill)

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
