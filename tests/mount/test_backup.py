"""backup (QEMU's blockdev-backup with copy-before-write) on a real mount, judged by
qemu-img.

    [A] <- [B] <- [C] <- [D] <- [E]    backup F sync=full   F: the disk at the command
                                       backup F sync=top    F over D: the disk at the command
                                       backup F sync=none   F: old content of what was overwritten

A guest (``Rewriter``, a thread) rewrites the whole disk with a new pattern, back to
front and as fast as it can, over and over, while the backup's pass copies front to back
at a ``speed=`` low enough that the guest overtakes it: nearly every cluster reaches
DEST through copy-before-write.  The point in time is taken with the guest held (the
model is the flat file then); the guest goes on right after the command.  Verdicts:
``qemu-img compare`` of DEST (sync=top: DEST over the chain's backing) against the
model, for qcow2 and raw DEST, compressed and not; the flat file and, after unmounting,
the active layer are the guest's model (the chain changed only by the guest's writes);
the layers below the active one are byte-for-byte what they were; ``qemu-img check``
clean on every image and DEST.  sync=none: DEST holds the old content of exactly the
clusters the guest overwrote (``qemu-img map``), and DEST over the active layer is the
point in time while the job runs.  Also: cancel (DEST abandoned, never a chain),
pause/resume and speed, refusals.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from interop import images as im

from chainfs.control import parse_line

from .conftest import (
    DEADLINE,
    Mount,
    Mounter,
    Seeds,
    assert_clean,
    assert_flat,
    digests,
    expect_refusals,
    run,
    wait_for,
)

MiB, KiB = im.MiB, im.KiB
SIZE = 16 * MiB
SPEED = "64K"  # the pass (minutes for the disk); the guest rewrites it in seconds


class Rewriter(threading.Thread):
    """Rewrite the whole disk with a new pattern, back to front, in random-sized writes
    (4 KiB .. 192 KiB, not cluster-aligned), as fast as it can; the model follows.
    ``hold()``/``go()`` stop and restart it between two writes."""

    def __init__(self, path: Path, model: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.model = path, model
        self.rng = random.Random(seed)
        self.rounds = 0
        self.writes = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                while not self._halt.is_set():
                    self._round(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e

    def _round(self, fd: int) -> None:
        size = len(self.model)
        pattern = self.rng.randrange(1, 256)
        end = size
        while end > 0 and not self._halt.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait()
                self._idle.clear()
            n = min(end, self.rng.randint(4 * KiB, 192 * KiB))
            data = bytes([pattern]) * n if self.writes % 5 else os.urandom(n)
            if self.writes % 17 == 0:
                data = bytes(n)  # zeros too
            assert os.pwrite(fd, data, end - n) == n
            self.model[end - n : end] = data
            self.writes += 1
            end -= n
        self.rounds += 1

    def hold(self) -> None:
        self._go.clear()
        wait_for(lambda: self._idle.is_set() or self.error is not None, "the guest to hold")

    def go(self) -> None:
        self._go.set()

    def wait_rounds(self, n: int) -> None:
        target = self.rounds + n

        def done() -> bool:
            if self.error is not None:
                raise AssertionError(f"the guest failed: {self.error!r}") from self.error
            return self.rounds >= target

        wait_for(done, f"{n} more rewrites of the disk", 4 * DEADLINE)

    def stop(self) -> None:
        self._halt.set()
        self._go.set()
        self.join(timeout=DEADLINE)
        if self.error is not None:
            raise AssertionError(f"the guest failed: {self.error!r}") from self.error


def write_raw(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(data)
    return path


def compare(image: Path, model: bytes | bytearray, tmp: Path, fmt: str = "qcow2") -> None:
    raw = write_raw(tmp / "model.raw", model)
    proc = run("qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", image, raw, ok=(0, 1))
    assert proc.returncode == 0, f"qemu-img compare {image}: {proc.stdout}{proc.stderr}"


def compressed_clusters(path: Path) -> int:
    out = run("qemu-img", "check", "-U", "--output=json", path).stdout
    return int(json.loads(out).get("compressed-clusters", 0))


def start_at_point(m: Mount, guest: Rewriter, model: bytearray, text: str) -> tuple[str, bytes]:
    """Hold the guest, take the point in time (the model now), start the backup, let
    the guest go on: the job id and the point-in-time content."""
    guest.hold()
    point = bytes(model)
    job = m.start_job("E", "backup", text)
    guest.go()
    return job, point


@pytest.mark.parametrize(
    "fmt,compress",
    [("qcow2", False), ("qcow2", True), ("raw", False)],
    ids=["qcow2", "qcow2-compressed", "raw"],
)
def test_backup_full_while_rewriting(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, fmt: str, compress: bool
) -> None:
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    below = digests(seed.layers[:-1])
    model = bytearray(seed.content)
    dest = tmp_path / "images" / f"F.{fmt}"
    m = mounter(images)
    guest = Rewriter(m.img("E"), model, seed=7)
    guest.start()
    try:
        guest.wait_rounds(1)
        opts = f"{dest} sync=full speed={SPEED} format={fmt}" + (" compress=on" if compress else "")
        job, point = start_at_point(m, guest, model, opts)
        guest.wait_rounds(2)  # the whole disk rewritten twice behind DEST's back
        # the pass alone would take minutes: it ends because copy-before-write did it
        end = m.wait_job("E", job)
        guest.wait_rounds(1)
    finally:
        guest.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert_flat(m.img("E"), model)
    assert [e["event"] for e in m.events("E") if e.get("job") == job].count("BACKUP_ABANDONED") == 0
    assert [s["chain"] for s in m.status() if s.get("status") == "served"] == ["E"]
    m.unmount()
    compare(dest, point, tmp_path, fmt)
    if fmt == "qcow2":
        assert_clean([dest])
        assert im.info(str(dest)).get("backing-filename") is None
        if compress:
            assert compressed_clusters(dest) > 0
    assert digests(seed.layers[:-1]) == below  # only the guest wrote, into E
    compare(seed.active, model, tmp_path)
    assert_clean(seed.layers)
    # the next mount does not serve DEST as a chain
    m2 = mounter(images)
    assert [s["chain"] for s in m2.status() if s.get("status") == "served"] == ["E"]
    m2.unmount()


def test_backup_top_while_rewriting(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    model = bytearray(seed.content)
    dest = images / "F.qcow2"
    m = mounter(images)
    guest = Rewriter(m.img("E"), model, seed=8)
    guest.start()
    try:
        job, point = start_at_point(m, guest, model, f"{dest} sync=top speed={SPEED}")
        guest.wait_rounds(2)
        end = m.wait_job("E", job)
    finally:
        guest.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    m.unmount()
    assert im.info(str(dest))["backing-filename"] == "D.qcow2"
    compare(dest, point, tmp_path)  # DEST over D, C, B, A: the disk at the command
    assert_clean([dest, *seed.layers])
    compare(seed.active, model, tmp_path)


def test_backup_none_fleecing(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """sync=none: DEST over the live active layer is the point in time while the job
    runs; after ``complete``, DEST holds the old content of exactly the clusters the
    guest overwrote."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    point = seed.content
    dest = images / "F.qcow2"
    m = mounter(images)
    job = m.start_job("E", "backup", f"{dest} sync=none")
    wait_for(lambda: any(e["event"] == "JOB_READY" for e in m.events("E")), "JOB_READY")
    model = bytearray(point)
    fd = os.open(m.img("E"), os.O_RDWR)
    try:
        for off, n, byte in [(0, 4 * KiB, 1), (3 * MiB + 100, 200 * KiB, 2), (SIZE - MiB, MiB, 0)]:
            data = bytes([byte]) * n
            os.pwrite(fd, data, off)
            model[off : off + n] = data
        os.fsync(fd)
        # DEST over the active layer, as the chain shows it now: the point in time
        compare(dest, point, tmp_path)
    finally:
        os.close(fd)
    m.command("E", "complete", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([dest, *seed.layers])
    # exactly the 64 KiB clusters the writes touched are DEST's own
    mapped = json.loads(run("qemu-img", "map", "--output=json", dest).stdout)
    own = sorted((e["start"], e["length"]) for e in mapped if e["depth"] == 0)
    merged: list[list[int]] = []
    for a, n in own:
        if merged and merged[-1][1] == a:
            merged[-1][1] = a + n
        else:
            merged.append([a, a + n])
    want = [[0, 64 * KiB], [3 * MiB, 3 * MiB + 256 * KiB], [SIZE - MiB, SIZE]]
    assert merged == want, merged
    # and hold what was there: DEST over E (changed only where DEST has its own
    # clusters) is the point in time again
    compare(dest, point, tmp_path)


def test_backup_cancel_pause_resume(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    dest = images / "F.qcow2"
    m = mounter(images)
    job = m.start_job("E", "backup", f"{dest} speed=512K")
    m.command("E", "pause", job)
    wait_for(lambda: m.lines("E", "jobs")[0]["status"] == "paused", "paused")
    m.command("E", "resume", job)
    wait_for(lambda: m.lines("E", "jobs")[0]["status"] == "running", "running")
    m.command("E", "speed", f"{job} 256K")
    assert m.lines("E", "jobs")[0]["speed"] == str(256 * KiB)
    m.command("E", "cancel", job)
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_CANCELLED", end
    abandoned = [e for e in m.events("E") if e["event"] == "BACKUP_ABANDONED"]
    assert [e["file"] for e in abandoned] == [str(dest)]
    assert dest.exists()
    m.unmount()
    assert_clean([dest, *seed.layers])
    m2 = mounter(images)
    assert [s["chain"] for s in m2.status() if s.get("status") == "served"] == ["E"]
    m2.unmount()


@expect_refusals
def test_backup_refusals(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seeds(images, size=SIZE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (images / "exists.qcow2").write_bytes(b"")
    m = mounter(images)
    m.refuse("E", "backup", "F.raw format=raw compress=on", errno.EINVAL)
    m.refuse("E", "backup", "F.raw format=raw sync=top", errno.EINVAL)
    m.refuse("E", "backup", "F.qcow2 sync=bitmap", errno.EINVAL)
    m.refuse("E", "backup", "exists.qcow2", errno.EEXIST)
    m.refuse("E", "backup", f"{outside}/F.qcow2", errno.EACCES)
    job = m.start_job("E", "backup", "F.qcow2 speed=64K")
    m.refuse("E", "backup", "G.qcow2", errno.EBUSY)
    m.refuse("E", "stream", "speed=0", errno.EBUSY)
    m.refuse("E", "complete", job, errno.EINVAL)  # not a sync=none backup: never ready
    m.command("E", "cancel", job)
    m.wait_job("E", job)
    assert not (outside / "F.qcow2").exists() and not (images / "F.raw").exists()
    m.unmount()


def test_backup_unmount_abandons(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """A backup does not outlive the mount: an unmount abandons it, and the next mount
    does not serve or resume it."""
    images = tmp_path / "images"
    seeds(images, size=SIZE)
    dest = images / "F.qcow2"
    m = mounter(images)
    job = m.start_job("E", "backup", f"{dest} speed=64K")
    m.unmount()
    assert_clean([dest])
    m2 = mounter(images)
    assert [s["chain"] for s in m2.status() if s.get("status") == "served"] == ["E"]
    assert not any(e.get("job") == job for e in m2.events("E")[1:] if e["event"] == "JOB_STARTED")
    m2.unmount()


class SyncGuest(threading.Thread):
    """A guest that fsyncs after every write: ``synced`` is the disk as acknowledged,
    ``last`` the write on its way (at a kill it may have landed in part)."""

    def __init__(self, path: Path, model: bytes, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.synced = bytes(model)
        self.rng = random.Random(seed)
        self.last: tuple[int, bytes] | None = None
        self.writes = 0
        self.killed = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            self.error = e
            return
        model = bytearray(self.synced)
        try:
            while True:
                n = self.rng.randint(4 * KiB, 128 * KiB)
                off = self.rng.randrange(len(model) - n)
                data = self.rng.randbytes(n)
                self.last = (off, data)
                os.pwrite(fd, data, off)
                os.fsync(fd)
                model[off : off + n] = data
                self.synced = bytes(model)
                self.last = None
                self.writes += 1
        except OSError as e:
            if not self.killed:
                self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def assert_acknowledged(got: bytes, guest: SyncGuest) -> None:
    """The disk is what the guest's fsyncs acknowledged; the write on its way at the
    kill may show old or new content, 4 KiB block by 4 KiB block (or a sector's)."""
    want = bytearray(guest.synced)
    if guest.last is not None:
        off, data = guest.last
        for a in range(off - off % 512, off + len(data), 512):
            b = min(a + 512, off + len(data))
            lo = max(a, off)
            if got[lo:b] == data[lo - off : b - off]:
                want[lo:b] = got[lo:b]
    assert got == bytes(want), "the disk after the kill: " + _first_diff(got, want)


def _first_diff(a: bytes, b: bytes | bytearray) -> str:
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"first difference at {i}"


def kill_during_backup(tmp_path: Path, mounter: Mounter, seeds: Seeds, seed: int) -> None:
    rng = random.Random(seed)
    images = tmp_path / "images"
    s = seeds(images, size=SIZE)
    below = digests(s.layers[:-1])
    dest = images / "F.qcow2"
    sync = rng.choice(["full", "top", "none"])
    extra = rng.choice(["", " compress=on"])
    m = mounter(images)
    guest = SyncGuest(m.img("E"), s.content, seed)
    guest.start()
    wait_for(lambda: guest.writes >= 5 or guest.error is not None, "the guest to write")
    m.command("E", "backup", f"{dest} sync={sync} speed=2M{extra}")
    time.sleep(rng.uniform(0.0, 2.0))
    guest.killed = True
    m.kill(signal.SIGKILL)
    assert m.wait_exit(None) == -signal.SIGKILL
    m.cleanup()
    guest.join(timeout=DEADLINE)
    assert guest.error is None, guest.error
    for layer in s.layers:
        rc = run("qemu-img", "check", layer, ok=(0, 3)).returncode  # leaks allowed
        assert rc in (0, 3)
    assert digests(s.layers[:-1]) == below  # nothing but the guest wrote, into E
    m = mounter(images)
    assert_acknowledged((m.mountpoint / "E.img").read_bytes(), guest)

    def over() -> list[dict[str, str]] | None:
        events = m.events("E")
        ends = ("BACKUP_ABANDONED", "JOB_COMPLETED")
        return events if any(e["event"] in ends for e in events) else None

    events = wait_for(over, "the backup rolled back or over")
    abandoned = [e for e in events if e["event"] == "BACKUP_ABANDONED"]
    done = [e for e in events if e["event"] == "JOB_COMPLETED" and e.get("type") == "backup"]
    if abandoned:  # rolled back: DEST, which chainfs made, is gone
        assert abandoned[-1]["removed"] == "true", abandoned
        assert not dest.exists()
        assert any(e["event"] == "JOB_ROLLED_BACK" for e in events)
    else:  # the backup ended before the kill: a complete DEST (not a chain)
        assert done, events
        assert_clean([dest])
    assert [x["chain"] for x in m.status() if x.get("status") == "served"] == ["E"]
    assert not m.lines("E", "jobs")
    assert not [p for p in images.iterdir() if p.name.startswith(".chainfs-new")]
    m.unmount()
    for layer in s.layers:  # a crash may leak clusters (of the guest's writes), no more
        assert run("qemu-img", "check", layer, ok=(0, 3)).returncode in (0, 3)


def test_kill9_during_backup(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    kill_during_backup(tmp_path, mounter, seeds, 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 14))
def test_kill9_during_backup_many(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, seed: int
) -> None:
    kill_during_backup(tmp_path, mounter, seeds, seed)


def test_backup_through_the_cli(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """``chainfs backup MOUNTPOINT CHAIN DEST ... --wait`` follows the job with progress
    lines; ``chainfs status`` shows it running; a ``sync=none`` backup's ``--wait`` ends
    once it copies before writes, naming the ``complete`` that ends it."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    m = mounter(images)
    cli = (sys.executable, "-m", "chainfs")
    run(*cli, "backup", m.mountpoint, "E", "S.qcow2", "speed=1M")
    wait_for(lambda: m.lines("E", "jobs"), "the backup in jobs")
    out = run(*cli, "status", m.mountpoint).stdout
    (row,) = [x for x in out.splitlines() if x.strip().startswith("job backup-1:")]
    assert "backup running" in row and "speed limit 1 MiB/s" in row, out
    run(*cli, "cancel", m.mountpoint, "E", "backup-1", "--wait")
    proc = run(*cli, "backup", m.mountpoint, "E", "F.qcow2", "speed=4M", "compress=on", "--wait")
    lines = proc.stderr.splitlines()
    assert lines[-1] == "job backup-2 completed", proc.stderr
    assert [parse_line(x)["job"] for x in lines[:-1]], "no progress line before the end"
    proc = run(*cli, "backup", m.mountpoint, "E", "G.qcow2", "sync=none", "--wait")
    assert proc.stderr.splitlines()[-1] == (
        f"job backup-3 copies before writes until 'chainfs complete {m.mountpoint} E backup-3'"
    ), proc.stderr
    run(*cli, "complete", m.mountpoint, "E", "backup-3", "--wait")
    m.unmount()
    compare(images / "F.qcow2", seed.content, tmp_path)
    assert compressed_clusters(images / "F.qcow2") > 0
    assert_clean([images / "F.qcow2", images / "G.qcow2", images / "S.qcow2"])
