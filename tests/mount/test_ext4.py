"""A filesystem on the flat file: a loop device over it, ext4 made on it, files written
while a snapshot and a stream run underneath, then ``fsck.ext4 -fn`` clean and every file
as written after unmounting everything and mounting it all again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DEADLINE, Mount, Mounter, Seeds, assert_clean, root_only, run, wait_for

pytestmark = [
    root_only,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "fsck.ext4")),
        reason="needs losetup, mkfs.ext4 and fsck.ext4",
    ),
]


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    dev = run("losetup", "--find", "--show", path).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, ok=(0, 1))


@contextlib.contextmanager
def mounted(dev: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", *(["-o", ",".join(options)] if options else []), dev, where)
    try:
        yield where
    finally:
        run("umount", where, ok=(0, 32))


class FileWriter(threading.Thread):
    """Creates, rewrites in part and deletes files in a directory, recording what each
    must contain; keeps the total under ``budget`` bytes."""

    def __init__(self, root: Path, seed: int, budget: int = 10 << 20) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(seed)
        self.budget = budget
        self.files: dict[str, bytes] = {}
        self.count = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._step()
                self.count += 1
        except BaseException as e:
            self.error = e

    def _step(self) -> None:
        rng = self.rng
        names = sorted(self.files)
        total = sum(len(d) for d in self.files.values())
        if names and (total > self.budget or rng.random() < 0.1):
            name = rng.choice(names)
            (self.root / name).unlink()
            del self.files[name]
        elif names and rng.random() < 0.3:
            name = rng.choice(names)
            old = bytearray(self.files[name])
            off = rng.randrange(len(old))
            piece = rng.randbytes(rng.randint(1, 20000))
            with open(self.root / name, "r+b") as f:
                f.seek(off)
                f.write(piece)
            old[off : off + len(piece)] = piece
            self.files[name] = bytes(old)
        else:
            name = f"f{self.count:05d}"
            data = rng.randbytes(rng.randint(1, 300_000))
            with open(self.root / name, "wb") as f:
                f.write(data)
                if self.count % 8 == 0:
                    os.fsync(f.fileno())
            self.files[name] = data

    def wait_steps(self, n: int) -> None:
        target = self.count + n

        def done() -> bool:
            if self.error is not None:
                raise AssertionError(f"the file writer failed: {self.error!r}")
            return self.count >= target

        wait_for(done, f"{n} more file operations in {self.root}")

    def stop(self) -> dict[str, bytes]:
        self._stop_event.set()
        self.join(timeout=DEADLINE)
        if self.error is not None:
            raise AssertionError(f"the file writer failed: {self.error!r}") from self.error
        return self.files


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_files(root: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in root.iterdir() if p.name != "lost+found") == sorted(files)
    for name, data in files.items():
        assert digest((root / name).read_bytes()) == digest(data), name


def test_ext4_through_snapshot_and_stream(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    m: Mount = mounter(images)
    with loop_device(m.img("E")) as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "fs") as fs:
            writer = FileWriter(fs, seed=7)
            writer.start()
            try:
                writer.wait_steps(20)
                m.command("E", "snapshot", "S.qcow2")
                writer.wait_steps(20)
                job = m.start_job("E", "stream", "base=A.qcow2 speed=4M")
                writer.wait_steps(20)
                end = m.wait_job("E", job)
                writer.wait_steps(10)
            finally:
                files = writer.stop()
            assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
            assert_files(fs, files)
        fsck = run("fsck.ext4", "-fn", dev, ok=range(256))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert m.layers("E") == ["S.qcow2", "A.qcow2"]
    m.unmount()
    assert_clean([*seed.layers, images / "S.qcow2"])

    m = mounter(images)
    with loop_device(m.img("E")) as dev:
        fsck = run("fsck.ext4", "-fn", dev, ok=range(256))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(dev, tmp_path / "fs", "ro") as fs:
            assert_files(fs, files)
    m.unmount()
