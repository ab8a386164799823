"""A guest's zeros over clusters a copy or an active commit is still writing survive the
pivot (the data loss fixed by 092c886).

    [A] <- [E]      copy F sync=full      ->  [F]
                    copy F sync=top       ->  [A] <- [F]
                    commit base=A         ->  [A]          (active commit)

The mirror writes data into its target with a started write (``write_started``: it may
still be on its way when the step returns) and skips a run of zeros where the target
already reads zeros.  Before the fix that zero test asked the target while a started
write over the same clusters had not landed: it saw the old content (zeros), skipped
the guest's zeros, and the started write then landed the guest's older data.  After
the pivot the disk showed data the guest had overwritten with zeros.

- Ready route (one mount, one chain per case): the job waits in ``ready``
  (``wait=ready``); an O_DIRECT write of 0xAA at 5 MiB + 8 KiB, 4 KiB or 64 KiB long, is
  mirrored (the job's ``offset`` in ``jobs`` moves); an O_DIRECT write of zeros over the
  same bytes is mirrored; ``complete``.  Over a region that reads zeros (``plain``) and
  over a base holding data there that the top layer masks with zero clusters
  (``masked``, made by ``qemu-io -c "write -z"``).
- First-pass route: a job with ``speed=`` and no ``wait=ready`` copies the last MiB of
  data the chain holds, then sleeps for the rate limit with its ``offset`` just past it;
  while it sleeps, whole 64 KiB clusters of that MiB are written with data, then with
  zeros, behind the pass.  The drain after the pass copies them, then the pivot.
- ext4 route (slow): ext4 (4 KiB blocks) on a loop device over the flat file, a file
  of zeros written before the job starts; while the job is ready, one whole aligned
  64 KiB cluster of the file written with 0xAA, ``fdatasync``, mirrored, then zeros,
  ``fdatasync``, mirrored; ``complete``; the file read again through a fresh loop device.

Verdicts: the flat file reads zeros where the guest wrote them and equals the model
everywhere; the new active layer, read by ``qemu-img compare -U`` while the mount
serves it (it was flushed at the pivot and nothing writes it since), shows the model;
``qemu-img check -U`` finds nothing wrong; the ext4 file's md5 is the zeros' and
``e2fsck -fn`` is clean.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from interop import images as im

from .conftest import (
    Mount,
    Mounter,
    PivotChain,
    assert_clean,
    assert_content,
    first_difference,
    read_direct,
    root_only,
    run,
    wait_for,
)
from .test_ext4 import loop_device, mounted

KiB, MiB = im.KiB, im.MiB
SIZE = 32 * MiB
CLUSTER = 64 * KiB
# the ready route: the region reads zeros, or the top masks the base's data there
REGION, REGION_LEN = 4 * MiB, 3 * MiB
AT = 5 * MiB + 8 * KiB
# the first-pass route: the last MiB of data the chain holds, and the rate that makes
# the pass sleep ~2 s right after copying it
PASS_DATA = 8 * MiB
PASS_SPEED = "512K"
PASS_ZEROED = (PASS_DATA + 512 * KiB, 2 * CLUSTER)  # whole clusters, behind the pass

JOBS = ["copy-full", "copy-top", "commit"]


@dataclass
class Chain(PivotChain):
    """One chain of the module's source directory: ``NAME-base.qcow2 <- NAME.qcow2``."""

    content: bytes = field(repr=False)  # what it shows as built (32 MiB: kept out of reports)


def build(directory: Path, name: str, *, masked: bool = False, first_pass: bool = False) -> Chain:
    """``NAME-base.qcow2 <- NAME.qcow2``, 32 MiB, made by qemu-img and qemu-io.

    Ready route: data in both layers away from ``[REGION, REGION + REGION_LEN)``, which
    reads zeros; ``masked``: the base holds 0x5a there and the top zero clusters.
    First-pass route: the base holds 64 KiB at 0 and the top the MiB at ``PASS_DATA``,
    and nothing lies past it, so its started write is the pass's last one.
    """
    base = str(directory / f"{name}-base.qcow2")
    top = str(directory / f"{name}.qcow2")
    im.create(base, SIZE)
    im.create(top, backing=os.path.basename(base), cwd=str(directory))
    if first_pass:
        below: list[im.Write] = [(0, CLUSTER, 0x11)]
        above: list[im.Write] = [(PASS_DATA, MiB, 0x33)]
    else:
        below = [(0, MiB, 0x11), (12 * MiB, MiB, 0x12)]
        above = [(2 * MiB, MiB, 0x21), (20 * MiB + 100, CLUSTER, 0x22)]
        if masked:
            below.append((REGION, REGION_LEN, 0x5A))
            above.append((REGION, REGION_LEN, None))
    im.write(base, below)
    im.write(top, above)
    content = im.reference(top)
    assert content[REGION : REGION + REGION_LEN] == bytes(REGION_LEN)
    return Chain(directory, name, content)


def ready_name(job: str, length: int, masked: bool) -> str:
    return f"{job}-{length // KiB}k-{'masked' if masked else 'plain'}"


@dataclass
class Served:
    mount: Mount
    chains: dict[str, Chain]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter) -> Served:
    d = tmp_path_factory.mktemp("pivot-zeros") / "images"
    d.mkdir()
    chains: dict[str, Chain] = {}
    for job in JOBS:
        for length in (4 * KiB, 64 * KiB):
            for masked in (False, True):
                name = ready_name(job, length, masked)
                chains[name] = build(d, name, masked=masked)
        chains[f"{job}-pass"] = build(d, f"{job}-pass", first_pass=True)
    return Served(module_mounter(d), chains)


# -- helpers ---------------------------------------------------------------------------------


def write_direct(path: Path, offset: int, data: bytes) -> None:
    """One O_DIRECT write (``offset`` and ``len(data)`` multiples of 4 KiB)."""
    buf = mmap.mmap(-1, len(data))  # page aligned, as O_DIRECT wants
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def job_line(m: Mount, chain: str) -> dict[str, str]:
    lines = m.lines(chain, "jobs")
    assert len(lines) == 1, f"{chain}: one job should run, not {lines}"
    return lines[0]


def wait_ready(m: Mount, chain: str, job: str) -> None:
    wait_for(
        lambda: any(e["event"] == "JOB_READY" and e["job"] == job for e in m.events(chain)),
        f"{job} on {chain} to be ready",
    )
    assert job_line(m, chain)["status"] == "ready"


def mirrored_write(m: Mount, chain: str, offset: int, data: bytes) -> None:
    """Write ``data`` while the job is ready; return once the job copied it (its
    ``offset`` moved: a ready job copies only what the guest dirtied)."""
    before = int(job_line(m, chain)["offset"])
    write_direct(m.img(chain), offset, data)
    wait_for(
        lambda: int(job_line(m, chain)["offset"]) > before,
        f"the job on {chain} to copy the write at {offset}",
    )


def assert_zeros(m: Mount, chain: str, offset: int, length: int) -> None:
    got = read_direct(m.img(chain), offset, length)
    if got != bytes(length):
        i = len(got) - len(got.lstrip(bytes(1)))
        raise AssertionError(
            f"{chain}: the flat file reads {got[i]:#x} at {offset + i} ("
            f"{length - got.count(0)} non-zero bytes in {length}) where the guest wrote zeros"
        )


def assert_on_disk(active: Path, raw: Path) -> None:
    """The new active layer, read while the mount serves it (``-U``), shows what the
    raw file ``raw`` holds, and ``qemu-img check`` finds nothing wrong with it."""
    cmp = run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", active, raw, ok=(0, 1))
    assert cmp.returncode == 0, f"qemu-img compare {active} vs model: {cmp.stdout}{cmp.stderr}"
    run("qemu-img", "check", "-U", "-f", "qcow2", active)


def finish(m: Mount, chain: Chain, job: str, jid: str, zeroed: tuple[int, int], tmp: Path) -> None:
    """The job ended well; the guest's zeros at ``zeroed`` are there, the flat file is
    what the chain showed plus those zeros, and so is the new active layer on disk.
    (No disk-sized bytes in this frame's arguments: a failure's report stays quick.)"""
    end = m.wait_job(chain.name, jid)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert_zeros(m, chain.name, *zeroed)
    active, layers = chain.after(job)
    assert m.layers(chain.name) == layers
    model = bytearray(chain.content)
    offset, length = zeroed
    model[offset : offset + length] = bytes(length)
    got = read_direct(m.img(chain.name))
    if got != model:
        raise AssertionError(
            f"{chain.name}: the flat file is not the model: " + first_difference(got, model)
        )
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    del got, model
    assert_on_disk(active, raw)


# -- the ready route ------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("length", [4 * KiB, 64 * KiB], ids=["4k", "64k"])
@pytest.mark.parametrize("job", JOBS)
def test_zeros_over_mirrored_data_survive_complete(
    served: Served, tmp_path: Path, job: str, length: int, masked: bool
) -> None:
    m = served.mount
    chain = served.chains[ready_name(job, length, masked)]
    kind, text = chain.command(job, "wait=ready")
    jid = m.start_job(chain.name, kind, text)
    wait_ready(m, chain.name, jid)
    mirrored_write(m, chain.name, AT, b"\xaa" * length)
    mirrored_write(m, chain.name, AT, bytes(length))
    assert_zeros(m, chain.name, AT, length)
    m.command(chain.name, "complete", jid)
    finish(m, chain, job, jid, (AT, length), tmp_path)


# -- the first-pass route -------------------------------------------------------------------


@pytest.mark.parametrize("job", ["copy-full", "commit"])
def test_zeros_behind_the_first_pass_survive(served: Served, tmp_path: Path, job: str) -> None:
    m = served.mount
    chain = served.chains[f"{job}-pass"]
    kind, text = chain.command(job, f"speed={PASS_SPEED}")
    jid = m.start_job(chain.name, kind, text)
    passed = PASS_DATA + MiB  # the pass's offset while it sleeps after the data
    wait_for(
        lambda: int(job_line(m, chain.name)["offset"]) >= passed,
        f"the pass on {chain.name} to copy the MiB at {PASS_DATA}",
    )
    offset, length = PASS_ZEROED
    write_direct(m.img(chain.name), offset, b"\xaa" * length)
    write_direct(m.img(chain.name), offset, bytes(length))
    line = job_line(m, chain.name)
    # the guest wrote while the pass slept right after the data (else the window the
    # test aims at was missed: the machine is too slow for this rate)
    assert line["status"] == "running" and int(line["offset"]) == passed, line
    finish(m, chain, job, jid, PASS_ZEROED, tmp_path)


# -- ext4 on a loop device over the flat file -----------------------------------------------

FILE_LEN = 256 * KiB
FIBMAP = 1  # ioctl: a file's block -> the device's block
# 4 KiB blocks; inode tables and journal written now, not later in the background
MKFS = ("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0")


def wait_drained(m: Mount, chain: str, at_least: int) -> None:
    """Wait until a ready job copied at least up to ``at_least`` and caught up with what
    it took (``offset == len``), the same on two reads in a row."""
    seen: list[tuple[str, str]] = []

    def drained() -> bool:
        line = job_line(m, chain)
        seen.append((line["offset"], line["len"]))
        done = int(line["offset"]) >= at_least and line["offset"] == line["len"]
        return done and len(seen) > 1 and seen[-2] == seen[-1]

    wait_for(drained, f"the job on {chain} to copy what the guest wrote")


def aligned_cluster(path: Path, block: int) -> int:
    """An offset in the file whose ``CLUSTER`` bytes lie on one whole, aligned cluster
    of the device (contiguous blocks), so one write covers the cluster all at once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        phys = [
            struct.unpack("i", fcntl.ioctl(fd, FIBMAP, struct.pack("i", i)))[0]
            for i in range(os.fstat(fd).st_size // block)
        ]
    finally:
        os.close(fd)
    n = CLUSTER // block
    for i in range(len(phys) - n + 1):
        blocks = phys[i : i + n]
        if blocks[0] * block % CLUSTER == 0 and blocks == list(range(blocks[0], blocks[0] + n)):
            return i * block
    raise AssertionError(f"no aligned cluster among the blocks of {path}: {phys}")


@root_only
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("losetup", "mkfs.ext4", "e2fsck")),
    reason="needs losetup, mkfs.ext4 and e2fsck",
)
@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_ext4_file_zeroed_before_complete(tmp_path: Path, mounter: Mounter, job: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    chain = build(images, "disk")
    m = mounter(images)
    with loop_device(m.img("disk")) as dev:
        run(*MKFS, dev)
        # lazytime, commit=300: an overwrite in place writes its data blocks and nothing
        # else, so the job's last started write is the file's
        with mounted(dev, tmp_path / "fs", "lazytime", "commit=300") as fs:
            # the file's blocks hold zeros when the job starts: its first pass leaves
            # them unallocated in the target, so the 0xAA goes there as new clusters
            with open(fs / "f", "wb") as f:
                f.write(bytes(FILE_LEN))
            os.sync()
            at = aligned_cluster(fs / "f", 4096)
            kind, text = chain.command(job, "wait=ready")
            jid = m.start_job("disk", kind, text)
            wait_ready(m, "disk", jid)
            for data in (b"\xaa" * CLUSTER, bytes(CLUSTER)):
                before = int(job_line(m, "disk")["offset"])
                with open(fs / "f", "r+b") as f:
                    f.seek(at)
                    f.write(data)
                    f.flush()
                    os.fdatasync(f.fileno())
                wait_drained(m, "disk", before + CLUSTER)
            m.command("disk", "complete", jid)
            end = m.wait_job("disk", jid)
            assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("disk") == chain.after(job)[1]
    flat = read_direct(m.img("disk"))
    zeros_md5 = hashlib.md5(bytes(FILE_LEN)).hexdigest()
    with loop_device(m.img("disk")) as dev:  # a fresh device: nothing cached
        fsck = run("e2fsck", "-fn", dev, ok=range(256))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(dev, tmp_path / "fs", "ro") as fs:
            got = hashlib.md5((fs / "f").read_bytes()).hexdigest()
            assert got == zeros_md5, f"the file's md5 is {got}, not that of its zeros"
    m.unmount()
    active = chain.after(job)[0]
    assert_clean([chain.base, active])
    assert_content(active, flat, tmp_path / "cmp")
