"""I/O errors and full disks under a real mount: the images on a small loop-mounted ext4.

    [A] <- [B] <- [C] <- [D] <- [E]   on an 80 MiB ext4 image, mounted with ``-o loop``

A filler file eats the free space while a job runs and a guest writes through the flat
file: the job ends in ``JOB_COMPLETED error="... No space left on device"`` with the
chain as it was, the guest's writes fail with ENOSPC (never silently: a write either
reports the bytes it wrote or fails), what the guest fsync'ed is never lost, and once
the filler is gone the failed writes land, fsync works, and the same job runs to
completion.  ``qemu-img check`` finds no corruption and no leak in the chain, and
``qemu-img compare`` finds the guest's writes.

For EIO, the ext4 is shut down under the mount (``FS_IOC_SHUTDOWN``, as ``xfs_io -c
shutdown`` does; device-mapper is not available everywhere): every read, write and
fsync of the images fails.  The job fails with the reason, the guest gets EIO from
write, read and fsync (never a false success), the mount keeps answering and unmounts
cleanly; after the ext4 is mounted again, the images have no corruption, show every
byte the guest fsync'ed, and the next mount completes the job.

A failing ``fdatasync`` alone is injected with ``faultinject.py`` (chainfs under a
``HostFile`` observer that fails what a rules file names): every later fsync of the
flat file reports the error, even once the device works again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
import sys
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest
from interop import crashsim as cs
from interop import images as im

from . import conftest
from .conftest import (
    DEADLINE,
    GuestThread,
    Mount,
    Mounter,
    Seed,
    Seeds,
    assert_clean,
    assert_content,
    assert_flat,
    read_direct,
    run,
    wait_for,
)

KiB, MiB = im.KiB, im.MiB
FS_SIZE = 80 * MiB
SIZE = 16 * MiB  # the seed chain's disk
FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
SHUTDOWN_NOLOGFLUSH = 2  # as a power cut: nothing more reaches the disk
NOSPC = os.strerror(errno.ENOSPC)
FAULTINJECT = Path(__file__).with_name("faultinject.py")


# -- the small filesystem ------------------------------------------------------------------


class SmallFs:
    """An ext4 of ``FS_SIZE`` bytes in a file, loop-mounted at ``path``."""

    def __init__(self, root: Path) -> None:
        self.image = root / "ext4.img"
        self.path = root / "fs"
        self.path.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(FS_SIZE)
        # no blocks reserved for root (the tests run as root): full means full
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", self.image)
        self.mount()

    def mount(self) -> None:
        run("mount", "-o", "loop", self.image, self.path)

    def umount(self) -> None:
        run("umount", self.path)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> Path:
        """Take all free space but ``leave`` bytes with a file of zeros; return it."""
        filler = self.path / ".filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = bytes(MiB)
            while self.free() > leave:
                n = min(len(chunk), self.free() - leave)
                try:
                    os.write(fd, chunk[: max(4096, n)])
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
            os.fsync(fd)
        finally:
            os.close(fd)
        return filler

    def shut_down(self) -> None:
        """Every later I/O on the filesystem fails with EIO (until it is mounted again)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    fs = SmallFs(tmp_path)
    try:
        yield fs
    finally:
        if os.path.ismount(fs.path):
            run("umount", "-l", fs.path, ok=(0, 32))


# -- a guest on a disk that may fail ---------------------------------------------------------


class Guest(GuestThread):
    """Random writes through one descriptor of the flat file, an fsync every few.

    A write that fails must fail with one of ``errnos`` (or write fewer bytes than asked
    for); its unwritten part is kept in ``failed`` (where the disk may read old or new)
    to be written again by ``again``.  ``synced`` is the model as of the last good fsync
    with no failed write outstanding: the disk must never show less than that.
    """

    def __init__(
        self,
        path: Path,
        model: bytearray,
        *,
        seed: int,
        errnos: set[int],
        stop_on_error: bool = False,
    ) -> None:
        super().__init__()
        self.path, self.model = path, model
        self.rng = random.Random(seed)
        self.errnos = errnos
        self.stop_on_error = stop_on_error
        self.failed: list[tuple[int, bytes]] = []
        self.seen: set[int] = set()  # the errnos met
        # the disk as of the last good fsync, and after each write since (a failed one
        # as if it had landed): a crash may leave each sector as any of them
        self.since_sync = [bytes(model)]
        self._halt = threading.Event()

    def _loop(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self._halt.is_set() and not (self.stop_on_error and self.seen):
                self._one(fd)
        finally:
            os.close(fd)

    def _fail(self, e: OSError) -> None:
        assert e.errno in self.errnos, f"unexpected {e!r}"
        self.seen.add(e.errno)

    def _one(self, fd: int) -> None:
        rng = self.rng
        n = rng.randint(4 * KiB, 192 * KiB)
        off = rng.randrange(len(self.model) - n) // 512 * 512
        data = rng.randbytes(n)
        try:
            done = os.pwrite(fd, data, off)
        except OSError as e:
            self._fail(e)
            done = 0
        self.model[off : off + done] = data[:done]
        if done < n:
            self.failed.append((off + done, data[done:]))
            attempt = bytearray(self.model)
            attempt[off : off + n] = data
            self.since_sync.append(bytes(attempt))
        self.since_sync.append(bytes(self.model))
        self.count += 1
        if self.count % 4 == 0:
            try:
                os.fsync(fd)
            except OSError as e:
                self._fail(e)
            else:
                if not self.failed:
                    self.since_sync = [bytes(self.model)]

    def wait_error(self, err: int) -> None:
        def seen() -> bool:
            self.check()
            return err in self.seen

        wait_for(seen, f"a guest write to fail with {errno.errorcode[err]}")

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=DEADLINE)
        assert not self.is_alive(), "the guest did not stop"
        self.check()

    def again(self) -> None:
        """Write the failed ranges again (the disk works now) and fsync."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            for off, data in self.failed:
                assert os.pwrite(fd, data, off) == len(data)
                self.model[off : off + len(data)] = data
            self.failed.clear()
            os.fsync(fd)
            self.since_sync = [bytes(self.model)]
        finally:
            os.close(fd)

    def assert_disk(self, disk: bytes) -> None:
        """The disk is the model but where a write failed (there: old or new bytes)."""
        want = bytearray(self.model)
        for off, data in self.failed:
            want[off : off + len(data)] = disk[off : off + len(data)]
        assert disk == want, cs_difference(disk, want)


def cs_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            return f"the disk differs from the model in [{i:#x}, +4096)"
    return "identical"


def check_images(paths: list[Path], *, leaky: Collection[str] = ()) -> None:
    """No corruption anywhere; no leak either but in the ``leaky`` files."""
    for p in paths:
        if p.exists() and im.image_format(str(p)) == "qcow2":
            if p.name in leaky:
                cs.assert_check_ok(str(p))
            else:
                im.assert_clean(str(p))


# -- a full disk -----------------------------------------------------------------------------

# (command, layers afterwards (active first); F1/F2 are a copy's destinations)
JOBS = {
    "stream": ("stream", "base=A.qcow2", ["E.qcow2", "A.qcow2"]),
    "commit": ("commit", "top=D.qcow2 base=B.qcow2", ["E.qcow2", "B.qcow2", "A.qcow2"]),
    "active-commit": ("commit", "base=B.qcow2", ["B.qcow2", "A.qcow2"]),
    "copy": ("copy", "F{n}.qcow2 sync=full", ["F{n}.qcow2"]),
}


def seed_on(fs: SmallFs, seeds: Seeds) -> Seed:
    """The seed chain on the small filesystem, durably (a shutdown loses the unsynced)."""
    seed = seeds(fs.path / "images", size=SIZE)
    os.sync()
    return seed


def unmount(m: Mount) -> None:
    """Unmount; the server must exit 0 without a traceback (warnings are expected)."""
    run("fusermount3", "-u", m.mountpoint)
    m.wait_exit(None)
    assert m.proc is not None and m.proc.returncode == 0, m.log_text()
    assert "Traceback" not in m.log_text(), m.log_text()


@pytest.mark.parametrize("case", list(JOBS))
@pytest.mark.expect_log(r"WARNING chainfs\.\S+: .*No space left on device$")
def test_disk_fills_up_during_a_job(
    small_fs: SmallFs, mounter: Mounter, seeds: Seeds, case: str
) -> None:
    kind, text, after = JOBS[case]
    seed = seed_on(small_fs, seeds)
    images = small_fs.path / "images"
    model = bytearray(seed.content)
    m = mounter(images)
    guest = Guest(m.img("E"), model, seed=len(case), errnos={errno.ENOSPC})
    guest.start()
    try:
        guest.wait_writes(8)
        job = m.start_job("E", kind, text.format(n=1) + " speed=2M")
        wait_for(lambda: (m.job_offset("E") or 0) > 0, "the job to make progress")
        filler = small_fs.fill()
        end = m.wait_job("E", job)
        guest.wait_error(errno.ENOSPC)
    finally:
        guest.stop()
    # the job failed with the reason and changed nothing; the guest lost nothing
    assert end["event"] == "JOB_COMPLETED" and end.get("error", "").endswith(NOSPC), end
    assert m.layers("E") == [p.name for p in reversed(seed.layers)]
    assert m.lines("E", "jobs") == []
    guest.assert_disk(read_direct(m.img("E")))
    assert m.alive
    # space again: the failed writes land, fsync works, the job runs to completion
    filler.unlink()
    guest.again()
    m.run_job("E", kind, text.format(n=2))
    assert m.layers("E") == [x.format(n=2) for x in after]
    assert_flat(m.img("E"), model)
    history = m.events("E")
    unmount(m)
    # the copy the failure abandoned may leak what its last write-back could not record
    check_images([*seed.layers, images / "F1.qcow2", images / "F2.qcow2"], leaky={"F1.qcow2"})
    assert_content(images / after[0].format(n=2), model, small_fs.path / "cmp")
    # the next mount serves that one chain, and has nothing left to do
    m2 = mounter(images)
    served = [x["chain"] for x in m2.status()[1:]]
    assert served == ["E"], m2.status()
    assert m2.layers("E") == [x.format(n=2) for x in after]
    assert m2.events("E") == history, m2.events("E")  # the history, and nothing new
    unmount(m2)


@pytest.mark.expect_log(r"WARNING chainfs\.\S+: .*No space left on device$")
def test_guest_fills_the_disk(small_fs: SmallFs, mounter: Mounter, seeds: Seeds) -> None:
    """No job: the guest's own writes fill the disk.  They fail with ENOSPC (or come back
    short), what they wrote and what was fsync'ed stays, the mount keeps serving, and
    after space is freed every write and fsync succeeds."""
    seed = seed_on(small_fs, seeds)
    model = bytearray(seed.content)
    m = mounter(small_fs.path / "images")
    filler = small_fs.fill(leave=2 * MiB)
    guest = Guest(m.img("E"), model, seed=7, errnos={errno.ENOSPC})
    guest.start()
    try:
        guest.wait_error(errno.ENOSPC)
        guest.wait_writes(16)  # and it goes on meeting a full disk
    finally:
        guest.stop()
    assert guest.failed
    guest.assert_disk(read_direct(m.img("E")))
    filler.unlink()
    guest.again()
    assert_flat(m.img("E"), model)
    assert m.alive
    unmount(m)
    assert "Traceback" not in m.log_text()
    check_images(seed.layers)
    assert_content(seed.active, model, small_fs.path / "cmp")


# -- a failing disk --------------------------------------------------------------------------


@pytest.mark.expect_log(r"(WARNING|ERROR) chainfs\.\S+: .*Input/output error")
def test_disk_fails_during_a_stream(small_fs: SmallFs, mounter: Mounter, seeds: Seeds) -> None:
    seed = seed_on(small_fs, seeds)
    images = small_fs.path / "images"
    model = bytearray(seed.content)
    m = mounter(images)
    guest = Guest(m.img("E"), model, seed=3, errnos={errno.EIO}, stop_on_error=True)
    guest.start()
    try:
        guest.wait_writes(12)
        job = m.start_job("E", "stream", "base=A.qcow2 speed=4M")
        wait_for(lambda: (m.job_offset("E") or 0) > 0, "the stream to make progress")
        guest.wait_writes(4)
        small_fs.shut_down()
        end = m.wait_job("E", job)
        guest.wait_error(errno.EIO)
    finally:
        guest.stop()
    assert end["event"] == "JOB_COMPLETED", end
    assert end.get("error", "").endswith(os.strerror(errno.EIO)), end
    # the guest hears EIO from every call that needs the disk, never a false success
    fd = os.open(m.img("E"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 4096, 5 * MiB)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        read_direct(m.img("E"))
    assert exc.value.errno == errno.EIO
    # the mount itself still answers, and unmounts (its last write-back failing)
    assert m.layers("E") == [p.name for p in reversed(seed.layers)]
    unmount(m)
    assert "did not close cleanly" in m.log_text()
    # the disk is back: no corruption, every fsync'ed byte there, the rest old or new
    small_fs.umount()
    small_fs.mount()
    check_images(seed.layers, leaky={p.name for p in seed.layers})
    disk = im.reference(str(seed.active))
    cs.assert_old_or_new(disk, guest.since_sync, 512)
    # the next mount resumes the stream (its end never reached the journal) or it is
    # started again; either way it completes
    m2 = mounter(images)
    started = [e["job"] for e in m2.events("E") if e["event"] == "JOB_STARTED"]
    if started:
        end = m2.wait_job("E", started[0])
        assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    else:
        m2.run_job("E", "stream", "base=A.qcow2")
    assert m2.layers("E") == ["E.qcow2", "A.qcow2"]
    assert_flat(m2.img("E"), disk)
    unmount(m2)
    check_images([seed.active], leaky={seed.active.name})
    assert_content(seed.active, disk, small_fs.path / "cmp")


# -- a failing fdatasync, injected -----------------------------------------------------------


@pytest.mark.expect_log(r"(WARNING|ERROR) chainfs\.\S+: .*Input/output error")
def test_fsync_after_a_failed_flush_never_claims_durability(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images' ``fdatasync`` fails once (``faultinject.py``: Linux may then have
    dropped what it could not write): that fsync of the flat file fails with EIO, and
    so does every later one, though the device works again and writes still go on --
    none may claim durability.  Unmounting works; the images have no corruption, keep
    what was fsync'ed before, and show the later writes old or new; the next mount
    writes and fsyncs again."""
    seed = seeds(tmp_path / "images")
    rules = tmp_path / "faults"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    m = mounter(tmp_path / "images")
    model = bytearray(seed.content)
    states = []
    rng = random.Random(11)
    fd = os.open(m.img("E"), os.O_RDWR)
    try:

        def write(off: int, n: int) -> None:
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off : off + n] = data
            states.append(bytes(model))

        write(1 * MiB + 100, 200 * KiB)
        os.fsync(fd)  # durable
        states = [bytes(model)]
        write(5 * MiB, 300 * KiB)
        rules.write_text("flush EIO\n")
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        rules.unlink()  # the device works again; the lost pages stay lost
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
            write(rng.randrange(SIZE - MiB) // 512 * 512, 64 * KiB)
        assert read_direct(m.img("E")) == model  # what this mount serves is the writes
    finally:
        os.close(fd)
    unmount(m)
    assert "did not close cleanly" in m.log_text()
    check_images(seed.layers, leaky={seed.active.name})
    disk = im.reference(str(seed.active))
    cs.assert_old_or_new(disk, states, 512)
    m2 = mounter(tmp_path / "images")
    assert_flat(m2.img("E"), disk)
    with open(m2.img("E"), "r+b", buffering=0) as f:
        f.seek(7 * MiB)
        f.write(b"after" * 1000)
        os.fsync(f.fileno())
    m2.unmount()
    assert_clean(seed.layers[:-1])
