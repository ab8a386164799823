"""Incremental backup (``backup DEST sync=bitmap bitmap=NAME base=PREV``) on a real
mount, judged by qemu-img.

    [A] <- [B] <- [C] <- [D] <- [E]    bitmap b1 on E
    full.qcow2 <- inc1.qcow2 <- inc2.qcow2    the backups: each over the previous one

A guest (``Scatter``, a thread) writes small random pieces all over the disk while
each backup runs; the point in time of each backup is taken with the guest held (the
model is the flat file then).  Verdicts: ``qemu-img compare`` of each backup, read
through the chain of backups below it, against the disk at its command; an incremental
backup holds only the clusters written since the previous one's command (``qemu-img
map``); after each, the bitmap marks exactly what was written since its command.  Then
``bitmap-mode`` never/always/on-success on completed, cancelled and failed (DEST's
disk full, ``faultinject.py``) backups, EBUSY for
the commands on a frozen bitmap, and a kill -9 during an incremental backup: after the
remount the bitmap still marks everything written since the previous backup.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sys
import threading
from pathlib import Path

import pytest
from interop import images as im
from interop.test_bitmaps import granules, qemu_dirty

from . import conftest
from .conftest import Mount, Mounter, Seeds, assert_clean, expect_refusals, run, wait_for
from .test_backup import compare
from .test_io_errors import FAULTINJECT

MiB, KiB = im.MiB, im.KiB
SIZE = 16 * MiB
G = 64 * KiB  # the bitmap's granularity (the default on these 64 KiB-cluster images)


class Scatter(threading.Thread):
    """Write random pieces (512 B .. 128 KiB, not aligned) anywhere on the disk, as fast
    as it can; the model and the list of writes follow.  ``hold()``/``go()`` stop and
    restart it between two writes."""

    def __init__(self, path: Path, model: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.model = path, model
        self.rng = random.Random(seed)
        self.writes: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._go = threading.Event()
        self._idle = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                while not self._halt.is_set():
                    if not self._go.is_set():
                        os.fsync(fd)
                        self._idle.set()
                        self._go.wait()
                        self._idle.clear()
                        continue
                    n = self.rng.randint(512, 128 * KiB)
                    off = self.rng.randrange(0, len(self.model) - n)
                    data = bytes([self.rng.randrange(256)]) * n
                    assert os.pwrite(fd, data, off) == n
                    self.model[off : off + n] = data
                    self.writes.append((off, n))
                    if len(self.writes) % 8 == 0:
                        self._halt.wait(0.01)  # a guest, not a benchmark: stay sparse
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e
            self._idle.set()

    def hold(self) -> int:
        """Stop between two writes (fsynced); the number of writes so far."""
        self._go.clear()
        wait_for(lambda: self._idle.is_set(), "the guest to hold")
        assert self.error is None, self.error
        return len(self.writes)

    def go(self) -> None:
        self._go.set()

    def wait_writes(self, n: int) -> None:
        target = len(self.writes) + n
        wait_for(lambda: len(self.writes) >= target or self.error is not None, f"{n} writes")
        assert self.error is None, self.error

    def stop(self) -> None:
        self._halt.set()
        self._go.set()
        self.join()
        assert self.error is None, self.error


def own_clusters(image: Path) -> list[tuple[int, int]]:
    """The ranges (start, end) ``image`` itself holds (data or zeros), merged."""
    out: list[tuple[int, int]] = []
    for e in json.loads(run("qemu-img", "map", "--output=json", "-U", image).stdout):
        if e["depth"] != 0 or not e["present"]:
            continue
        a, b = e["start"], e["start"] + e["length"]
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def dirty(m: Mount, name: str) -> list[tuple[int, int]]:
    return [
        (int(x["start"]), int(x["start"]) + int(x["length"]))
        for x in m.lines("E", "dirty")
        if x["bitmap"] == name
    ]


def test_full_then_two_incrementals_while_writing(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    model = bytearray(seed.content)
    m = mounter(images)
    guest = Scatter(m.img("E"), model, seed=5)
    guest.start()
    points: list[bytes] = []
    since: list[int] = []  # the writes before each backup's command
    try:
        # QEMU's recipe: the bitmap and the full backup at the same point in time
        m.command("E", "bitmap", "add b1")
        points.append(bytes(model))
        since.append(0)
        job = m.start_job("E", "backup", f"{images}/full.qcow2 sync=full speed=8M")
        guest.go()
        guest.wait_writes(40)
        end = m.wait_job("E", job)
        assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
        for name, prev in (("inc1", "full"), ("inc2", "inc1")):
            guest.wait_writes(40)  # writes between two backups
            since.append(guest.hold())
            points.append(bytes(model))
            text = f"{images}/{name}.qcow2 sync=bitmap bitmap=b1 base={prev}.qcow2 speed=2M"
            job = m.start_job("E", "backup", text)
            # the bitmap restarted at the command: only what the guest writes from now
            assert dirty(m, "b1") == []
            guest.go()
            guest.wait_writes(40)  # writes during the backup
            end = m.wait_job("E", job)
            assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
            assert job in [e.get("job") for e in m.events("E") if e["event"] == "BITMAP_CHANGED"]
        guest.wait_writes(10)
        n = guest.hold()
        # the bitmap marks what was written since the last backup's command, the writes
        # during it included
        assert dirty(m, "b1") == granules(guest.writes[since[-1] : n], G)
    finally:
        guest.stop()
    m.unmount()
    backups = [images / f"{x}.qcow2" for x in ("full", "inc1", "inc2")]
    assert_clean([*backups, *seed.layers])
    assert im.info(str(backups[1]))["backing-filename"] == "full.qcow2"
    assert im.info(str(backups[2]))["backing-filename"] == "inc1.qcow2"
    for backup, point in zip(backups, points, strict=True):
        compare(backup, point, tmp_path)  # through the chain of backups below it
    # an incremental holds the clusters written between the two commands, no others
    for i in (1, 2):
        assert own_clusters(backups[i]) == granules(guest.writes[since[i - 1] : since[i]], G)
    compare(seed.active, model, tmp_path)
    # after umount QEMU reads the same bitmap
    assert qemu_dirty(str(seed.active), "b1") == granules(guest.writes[since[-1] :], G)


def write(m: Mount, writes: list[tuple[int, int]], fill: int) -> None:
    fd = os.open(m.img("E"), os.O_WRONLY)
    try:
        for offset, length in writes:
            os.pwrite(fd, bytes([fill]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


X = [(0, 4096), (3 * MiB + 100, 3 * MiB)]
Y = [(10 * MiB, 70000)]
Z = [(12 * MiB, 512), (15 * MiB, 65536)]


@expect_refusals
def test_bitmap_modes_and_busy(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seeds(images, size=SIZE)
    m = mounter(images)
    m.command("E", "bitmap", "add b1")
    m.command("E", "bitmap", "add other")
    write(m, X, 1)
    # never: a completed backup gives the bits back, the bitmap goes on accumulating
    job = m.start_job("E", "backup", "n.qcow2 sync=bitmap bitmap=b1 bitmap-mode=never")
    write(m, Y, 2)
    assert m.wait_job("E", job)["event"] == "JOB_COMPLETED"
    assert dirty(m, "b1") == granules(X + Y, G)
    assert own_clusters(images / "n.qcow2") == granules(X, G)
    # on-success, cancelled: the bits stay; while it runs the bitmap is busy
    job = m.start_job("E", "backup", "c.qcow2 sync=bitmap bitmap=b1 speed=64K")
    for command in ("clear b1", "remove b1", "disable b1", "merge b1 other", "merge other b1"):
        m.refuse("E", "bitmap", command, errno.EBUSY)
    m.refuse("E", "snapshot", "S.qcow2", errno.EBUSY)  # one job at a time: no snapshot
    m.refuse("E", "backup", "d.qcow2 sync=bitmap bitmap=other", errno.EBUSY)
    write(m, Z, 3)
    m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    assert dirty(m, "b1") == granules(X + Y + Z, G)
    m.command("E", "bitmap", "clear other")  # the other bitmap was never busy
    # always, cancelled: the bitmap restarts anyway
    job = m.start_job("E", "backup", "a.qcow2 sync=bitmap bitmap=b1 speed=64K bitmap-mode=always")
    write(m, Y, 4)
    m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    assert dirty(m, "b1") == granules(Y, G)
    # refusals before anything is made
    m.refuse("E", "backup", "x.qcow2 sync=bitmap bitmap=nosuch", errno.ENOENT)
    m.refuse("E", "backup", "x.qcow2 sync=bitmap bitmap=b1 base=nosuch.qcow2", errno.ENOENT)
    m.refuse("E", "backup", "x.qcow2 sync=bitmap bitmap=b1 format=raw", errno.EINVAL)
    assert not (images / "x.qcow2").exists()
    # without base: DEST has no backing file
    job = m.start_job("E", "backup", "nb.qcow2 sync=bitmap bitmap=b1")
    assert m.wait_job("E", job)["event"] == "JOB_COMPLETED"
    assert dirty(m, "b1") == []
    m.unmount()
    assert im.info(str(images / "nb.qcow2")).get("backing-filename") is None
    assert own_clusters(images / "nb.qcow2") == granules(Y, G)
    assert_clean([images / f"{x}.qcow2" for x in ("n", "c", "a", "nb", "E")])


def test_kill9_during_incremental_backup(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """The bitmap on disk is the union of the frozen bits and the new ones until the
    backup ends: after a kill -9 during it, the next mount's bitmap marks all of them
    (the backup itself is rolled back)."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    m = mounter(images)
    m.command("E", "bitmap", "add b1")
    write(m, X, 1)
    m.command("E", "backup", f"{images}/i.qcow2 sync=bitmap bitmap=b1 speed=64K")
    write(m, Z, 2)  # marks the restarted bitmap (and the union on disk)
    m.kill(signal.SIGKILL)
    assert m.wait_exit(None) == -signal.SIGKILL
    m.cleanup()
    m = mounter(images)
    wait_for(lambda: any(e["event"] == "BACKUP_ABANDONED" for e in m.events("E")), "the rollback")
    assert dirty(m, "b1") == granules(X + Z, G)
    m.unmount()
    assert not (images / "i.qcow2").exists()
    assert qemu_dirty(str(seed.active), "b1") == granules(X + Z, G)


@pytest.mark.expect_log(r"WARNING chainfs\.jobs\.base: job=backup-\d+ (abort )?failed: .*No space")
def test_failed_incremental_backup_keeps_the_bits(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bitmap-mode=on-success``: a backup that fails (DEST's disk full) gives the
    frozen bits back, and the bitmap keeps the writes made meanwhile too."""
    images = tmp_path / "images"
    seeds(images, size=SIZE)
    rules = tmp_path / "faults"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    m = mounter(images)
    m.command("E", "bitmap", "add b1")
    write(m, X, 1)
    job = m.start_job("E", "backup", "f.qcow2 sync=bitmap bitmap=b1 speed=64K")
    write(m, Y, 2)
    rules.write_text("write ENOSPC /f.qcow2\n")  # DEST only: the chain's images work
    end = m.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "No space left" in end.get("error", ""), end
    rules.unlink()
    assert dirty(m, "b1") == granules(X + Y, G)
    kept = [e for e in m.events("E") if e["event"] == "BITMAP_CHANGED" and e.get("job") == job]
    assert [e["action"] for e in kept] == ["kept"]
    m.unmount()
