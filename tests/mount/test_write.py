"""Writing through the flat file: random ``pwrite``s mirrored in a bytes model and ``dd``,
then fsync and unmount; ``qemu-img check`` must pass every layer, ``qemu-img compare``
must find the model, and the layers below the active one must be untouched.  Also
``stat`` (size, mtime, st_blocks), writes at the disk's end, and a read-only mount.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from interop import images as im

from .conftest import (
    Mounter,
    Seed,
    Seeds,
    assert_clean,
    assert_content,
    assert_flat,
    digests,
    mixed_chain,
    run,
)
from .test_holes import lseek_table

KiB, MiB = im.KiB, im.MiB


Build = Callable[[Path, Seeds], Seed]
CHAINS: dict[str, Build] = {
    "seed": lambda d, seeds: seeds(d),
    "raw-base": lambda d, seeds: seeds(d, base_format="raw"),
    "mixed-clusters": lambda d, seeds: mixed_chain(d),
}


def random_writes(path: Path, model: bytearray, rng: random.Random, count: int) -> None:
    """``count`` writes of 1 byte to 200 KiB at any offset; every tenth one read back."""
    size = len(model)
    with open(path, "r+b", buffering=0) as f:
        # the disk's last bytes, and a write across its last page boundary
        for off, n in ((size - 1000, 1000), (size - 5000, 4500)):
            data = rng.randbytes(n)
            assert os.pwrite(f.fileno(), data, off) == n
            model[off : off + n] = data
        for i in range(count):
            n = rng.choice([1, 512, 4096, rng.randint(1, 200 * KiB)])
            off = rng.randrange(size - n + 1)
            data = rng.randbytes(n)
            assert os.pwrite(f.fileno(), data, off) == n
            model[off : off + n] = data
            if i % 10 == 0:
                assert os.pread(f.fileno(), n + 100, max(0, off - 50)) == bytes(
                    model[max(0, off - 50) : off + n + 50]
                )
        os.fsync(f.fileno())


def dd(src: Path, dest: Path, model: bytearray, *, bs: int, seek: int, flags: list[str]) -> None:
    data = src.read_bytes()
    run("dd", f"if={src}", f"of={dest}", f"bs={bs}", f"seek={seek}", "status=none", *flags)
    model[seek * bs : seek * bs + len(data)] = data


@pytest.mark.parametrize("shape", list(CHAINS))
def test_random_writes_then_qemu_img_compare(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, shape: str
) -> None:
    chain = CHAINS[shape](tmp_path / "images", seeds)
    below = digests(chain.layers[:-1])
    model = bytearray(chain.content)
    m = mounter(tmp_path / "images")
    flat = m.img(chain.name)
    random_writes(flat, model, random.Random(shape), 300)
    src = tmp_path / "dd.bin"
    src.write_bytes(random.Random(1).randbytes(3 * 64 * KiB + 1000))
    dd(src, flat, model, bs=64 * KiB, seek=5, flags=["conv=notrunc,fsync"])
    src.write_bytes(random.Random(2).randbytes(8 * 4096))
    dd(src, flat, model, bs=4096, seek=77, flags=["conv=notrunc", "oflag=direct"])
    run("sync", flat)
    assert_flat(flat, model)
    m.unmount()
    assert_clean(chain.layers)
    assert_content(chain.active, model, tmp_path / "cmp")
    assert digests(chain.layers[:-1]) == below


def test_stat(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    chain = seeds(tmp_path / "images")
    m = mounter(tmp_path / "images")
    flat = m.img(chain.name)
    st = os.stat(flat)
    assert st.st_size == len(chain.content)
    assert 0 < st.st_blocks * 512 <= st.st_size
    flat.read_bytes()
    assert os.stat(flat).st_mtime_ns == st.st_mtime_ns, "reading changed mtime"
    with open(flat, "r+b", buffering=0) as f:
        # a region the seed's active layer does not hold: 16 new clusters are allocated
        f.seek(5 * MiB)
        f.write(random.Random(0).randbytes(MiB))
        os.fsync(f.fileno())
    after = os.stat(flat)
    assert after.st_size == st.st_size
    assert after.st_mtime_ns > st.st_mtime_ns and after.st_ctime_ns > st.st_ctime_ns
    # st_blocks: the data SEEK_DATA finds through the chain, recounted by the fsync
    assert after.st_blocks >= st.st_blocks
    if hasattr(pyfuse3.Operations, "lseek"):
        assert after.st_blocks * 512 == sum(b - a for a, b in lseek_table(flat))
    assert os.stat(flat).st_mtime_ns == after.st_mtime_ns, "mtime is not stable"
    m.unmount()
    assert_clean(chain.layers)
    # the times survive a remount, and stay put while nothing is written
    m = mounter(tmp_path / "images")
    again = os.stat(m.img(chain.name))
    assert again.st_mtime_ns >= after.st_mtime_ns and again.st_size == st.st_size
    m.unmount()
    m = mounter(tmp_path / "images")
    assert os.stat(m.img(chain.name)).st_mtime_ns == again.st_mtime_ns
    m.unmount()


def test_writes_at_the_end_of_the_disk(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    chain = seeds(tmp_path / "images")
    size = len(chain.content)
    model = bytearray(chain.content)
    m = mounter(tmp_path / "images")
    flat = m.img(chain.name)
    fd = os.open(flat, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\xaa" * 100, size - 10) == 10
        model[size - 10 :] = b"\xaa" * 10
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"\xbb" * 10, size)
        assert exc.value.errno == errno.ENOSPC
        for length in (size - 4096, size + 4096):
            with pytest.raises(OSError):
                os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
    # as on a block device, O_TRUNC (``> disk.img``) truncates nothing
    open(flat, "wb").close()
    assert os.stat(flat).st_size == size
    assert_flat(flat, model)
    m.unmount()
    assert_clean(chain.layers)
    assert_content(chain.active, model, tmp_path / "cmp")


def test_a_write_crossing_the_end_never_gives_eio(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """An 8 KiB write whose second half lies past the end: buffered, a short write of
    4096 (the kernel hands the count back); O_DIRECT, ENOSPC with nothing written (FUSE's
    asynchronous direct I/O turned the short write into EIO after writing 4 KiB); also
    with ``dd oflag=direct``.  Nothing past the end ever changes, nor does the file."""
    chain = seeds(tmp_path / "images")
    size = len(chain.content)
    model = bytearray(chain.content)
    m = mounter(tmp_path / "images")
    flat = m.img(chain.name)
    buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT needs
    buf.write(b"\xcc" * 8192)
    fd = os.open(flat, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as exc:
            os.pwritev(fd, [buf], size - 4096)
        assert exc.value.errno == errno.ENOSPC
        # a direct write that stays inside the disk still works, right up to the end
        assert os.pwritev(fd, [memoryview(buf)[:4096]], size - 4096) == 4096
        model[size - 4096 :] = b"\xcc" * 4096
    finally:
        os.close(fd)
    assert_flat(flat, model)
    proc = run(
        "dd", "if=/dev/zero", f"of={flat}", "bs=8k", "count=1", f"seek={size - 4096}",
        "oflag=direct,seek_bytes", "conv=notrunc", ok=(1,),
    )  # fmt: skip
    assert "No space left on device" in proc.stderr and "Input/output" not in proc.stderr
    assert_flat(flat, model)
    fd = os.open(flat, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\xdd" * 8192, size - 4096) == 4096
        model[size - 4096 :] = b"\xdd" * 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(flat).st_size == size
    assert_flat(flat, model)
    m.unmount()
    assert_clean(chain.layers)
    assert_content(chain.active, model, tmp_path / "cmp")


def test_read_only_mount(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    chain = seeds(tmp_path / "images")
    before = digests(chain.layers)
    m = mounter(tmp_path / "images", "ro")
    flat = m.img(chain.name)
    assert m.status()[0]["readonly"] == "true"
    assert os.stat(flat).st_mode & 0o222 == 0
    with pytest.raises(OSError) as exc:
        os.open(flat, os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError) as exc:
        m.command(chain.name, "snapshot", "new.qcow2")
    assert exc.value.errno == errno.EROFS
    assert_flat(flat, chain.content)
    m.unmount()
    assert digests(chain.layers) == before
    assert sorted(os.listdir(tmp_path / "images")) == sorted(p.name for p in chain.layers)
