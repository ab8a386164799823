"""qemu-iotests 040 (block-commit), ported to a real mount: ``commit`` control writes.

Each test is named after the iotests case it ports and builds the same images:

    TestSingleDrive          backing.img (raw) <- mid.img <- test.img, 1 MiB
                             (0xab in backing's first half, 0xef in mid's second)
    TestActiveZeroLengthImage    the same, 0 bytes long
    TestRelativePaths        dir1/backing.img <- dir2/mid.img <- dir2/dir3/test.img,
                             backing strings "../dir1/backing.img" and "../mid.img"
    TestSetSpeed             TestSingleDrive's images, a commit held back by speed
    TestReopenOverlay        img0.img (raw) <- img1.img <- img2.img <- img3.img
    zero blocks              backing.img (qcow2) <- mid.img (zeros) <- test.img

and is judged as the iotests judge it -- ``qemu-io -c 'read -P ...'`` finds the
committed data in the base -- plus ``qemu-img check``, ``qemu-img compare`` against
what QEMU read before, and the backing chain ``qemu-img info`` finds.

Not ported: the error-handling matrix (chainfs always reports: ``test_io_errors.py``
fails commits on a full or failing disk), filters and overridden backing (no such
things in chainfs).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from .conftest import Mount, Mounter, assert_flat, expect_refusals, run, wait_for
from .iotests import (
    CHAIN,
    KiB,
    MiB,
    backing_of,
    chain_of,
    check,
    create_image,
    job_events,
    overlay,
    qemu_io,
)


@dataclass
class Single:
    """TestSingleDrive's images."""

    dir: Path
    backing: Path
    mid: Path
    test: Path
    size: int

    @property
    def images(self) -> list[Path]:
        return [self.backing, self.mid, self.test]


def single_drive(d: Path, size: int) -> Single:
    d.mkdir()
    s = Single(d, d / "backing.img", d / "mid.img", d / "test.img", size)
    create_image(s.backing, size)
    overlay(s.mid, "backing.img", "raw", size=size)
    overlay(s.test, "mid.img", "qcow2", size=size)
    if size:
        qemu_io(s.backing, "write -P 0xab 0 524288", fmt="raw")
        qemu_io(s.mid, "write -P 0xef 524288 524288")
    return s


def assert_committed(backing: Path, size: int) -> None:
    """The iotests' verdict: the base holds 0xab, then mid's 0xef."""
    if size:
        qemu_io(backing, "read -P 0xab 0 524288", "read -P 0xef 524288 524288", fmt="raw")


SIZES = [pytest.param(MiB, id="1M"), pytest.param(0, id="zero-length")]


@pytest.mark.parametrize("size", SIZES)
def test_040_commit(tmp_path: Path, mounter: Mounter, size: int) -> None:
    s = single_drive(tmp_path / "images", size)
    want = im.reference(str(s.test))
    m = mounter(s.dir)
    end = m.run_job(CHAIN, "commit", "top=mid.img base=backing.img")
    assert int(end["offset"]) == size, end
    assert m.layers(CHAIN) == ["test.img", "backing.img"]
    assert_flat(m.img(CHAIN), want)
    m.unmount()
    assert_committed(s.backing, size)
    assert backing_of(s.test) == ("backing.img", "raw")
    check(s.test)
    im.assert_same_as(str(s.test), want, str(tmp_path))


def active_commit(m: Mount, text: str, *, complete: bool) -> dict[str, str]:
    """An active commit: JOB_READY, then the pivot -- on ``complete JOB`` as the iotests
    send ``block-job-complete`` on BLOCK_JOB_READY, or by itself -- then JOB_COMPLETED."""
    job = m.start_job(CHAIN, "commit", text + (" wait=ready" if complete else ""))
    if complete:
        wait_for(lambda: "JOB_READY" in job_events(m, job), f"{job} to be ready")
        assert m.lines(CHAIN, "jobs")[0]["status"] == "ready"
        m.command(CHAIN, "complete", job)
    end = m.wait_job(CHAIN, job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    events = job_events(m, job)
    assert events.index("JOB_READY") < events.index("JOB_COMPLETED"), events
    return end


@pytest.mark.parametrize("size", SIZES)
def test_040_top_is_active(tmp_path: Path, mounter: Mounter, size: int) -> None:
    s = single_drive(tmp_path / "images", size)
    want = im.reference(str(s.test))
    m = mounter(s.dir)
    active_commit(m, "top=test.img base=backing.img", complete=True)
    assert m.layers(CHAIN) == ["backing.img"]
    assert_flat(m.img(CHAIN), want)
    m.unmount()
    assert_committed(s.backing, size)
    assert s.backing.read_bytes() == want


@pytest.mark.parametrize("size", SIZES)
def test_040_top_is_default_active(tmp_path: Path, mounter: Mounter, size: int) -> None:
    """No top and no base: the active layer into the deepest one."""
    s = single_drive(tmp_path / "images", size)
    want = im.reference(str(s.test))
    m = mounter(s.dir)
    # every argument defaulted (an empty write is no command); the pivot comes by itself
    active_commit(m, "speed=0", complete=False)
    assert m.layers(CHAIN) == ["backing.img"]
    m.unmount()
    assert_committed(s.backing, size)
    assert s.backing.read_bytes() == want


# -- refusals: one mount for them all ------------------------------------------------------


@dataclass
class Served:
    single: Single
    mount: Mount
    digests: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, module_mounter: Mounter) -> Iterator[Served]:
    s = single_drive(tmp_path_factory.mktemp("refusals") / "images", MiB)
    digests = im.file_digests(str(p) for p in s.images)
    yield Served(s, module_mounter(s.dir), digests)


def refuse(served: Served, text: str, reason: str) -> None:
    """The commit is refused with EINVAL and the reason; nothing changed."""
    m = served.mount
    got = m.refuse(CHAIN, "commit", text, errno.EINVAL)["reason"]
    assert reason in got, (text, got)
    assert m.lines(CHAIN, "jobs") == []
    assert m.layers(CHAIN) == ["test.img", "mid.img", "backing.img"]
    assert im.file_digests(str(p) for p in served.single.images) == served.digests


def test_040_device_not_found(served: Served) -> None:
    """No such chain: there is no control file to write to."""
    with pytest.raises(FileNotFoundError):
        served.mount.command("nonexistent", "commit", "top=mid.img")


@expect_refusals
def test_040_top_same_base(served: Served) -> None:
    refuse(served, "top=backing.img base=backing.img", "a layer cannot commit into itself")
    refuse(served, "top=mid.img base=mid.img", "a layer cannot commit into itself")


@expect_refusals
def test_040_top_invalid(served: Served) -> None:
    refuse(served, "top=badfile base=backing.img", "'badfile' is not a layer of chain")


@expect_refusals
def test_040_base_invalid(served: Served) -> None:
    refuse(served, "top=mid.img base=badfile", "'badfile' is not a layer of chain")


@expect_refusals
def test_040_top_and_base_reversed(served: Served) -> None:
    refuse(served, "top=backing.img base=mid.img", "'mid.img' is not below 'backing.img'")


# -- TestRelativePaths ---------------------------------------------------------------------


@dataclass
class Relative:
    root: Path
    backing: Path  # dir1/backing.img
    mid: Path  # dir2/mid.img
    test: Path  # dir2/dir3/test.img


def relative_paths(root: Path) -> Relative:
    """QEMU's tree across three directories: the mount of ``dir2/dir3`` must be allowed
    the backing files above it (``allow_backing=ROOT``)."""
    r = Relative(
        root, root / "dir1/backing.img", root / "dir2/mid.img", root / "dir2/dir3/test.img"
    )
    for p in (r.backing, r.test):
        p.parent.mkdir(parents=True)
    create_image(r.backing, MiB)
    overlay(r.mid, "../dir1/backing.img", "raw")
    overlay(r.test, "../mid.img", "qcow2")
    qemu_io(r.backing, "write -P 0xab 0 524288", fmt="raw")
    qemu_io(r.mid, "write -P 0xef 524288 524288")
    return r


def moved(r: Relative, dest: Path) -> Relative:
    """The whole tree renamed: relative backing strings must still resolve."""
    r.root.rename(dest)
    return Relative(dest, *(dest / p.relative_to(r.root) for p in (r.backing, r.mid, r.test)))


def test_040_relative_paths_commit(tmp_path: Path, mounter: Mounter) -> None:
    r = relative_paths(tmp_path / "tree")
    want = im.reference(str(r.test))
    m = mounter(r.test.parent, f"allow_backing={r.root}")
    m.run_job(CHAIN, "commit", "top=mid.img base=backing.img")
    assert m.layers(CHAIN) == ["test.img", "backing.img"]
    m.unmount()
    assert_committed(r.backing, MiB)
    assert backing_of(r.test) == ("../../dir1/backing.img", "raw")
    r = moved(r, tmp_path / "moved")
    assert chain_of(r.test) == ["test.img", "backing.img"]
    check(r.test)
    im.assert_same_as(str(r.test), want, str(tmp_path))


def test_040_relative_paths_top_is_active(tmp_path: Path, mounter: Mounter) -> None:
    r = relative_paths(tmp_path / "tree")
    want = im.reference(str(r.test))
    m = mounter(r.test.parent, f"allow_backing={r.root}")
    active_commit(m, "top=test.img base=backing.img", complete=True)
    assert m.layers(CHAIN) == ["backing.img"]
    m.unmount()
    assert_committed(r.backing, MiB)
    assert r.backing.read_bytes() == want


def test_040_relative_paths_stream(tmp_path: Path, mounter: Mounter) -> None:
    """030's partial stream on 040's tree: the new backing string is relative too."""
    r = relative_paths(tmp_path / "tree")
    want = im.reference(str(r.test))
    m = mounter(r.test.parent, f"allow_backing={r.root}")
    m.run_job(CHAIN, "stream", "base=backing.img")
    assert m.layers(CHAIN) == ["test.img", "backing.img"]
    m.unmount()
    assert backing_of(r.test) == ("../../dir1/backing.img", "raw")
    r = moved(r, tmp_path / "moved")
    assert chain_of(r.test) == ["test.img", "backing.img"]
    check(r.test)
    im.assert_same_as(str(r.test), want, str(tmp_path))


# -- the rest ------------------------------------------------------------------------------


def test_040_set_speed(tmp_path: Path, mounter: Mounter) -> None:
    """The speed a commit was given shows in ``jobs``; cancelled, it changes nothing."""
    s = single_drive(tmp_path / "images", MiB)
    digests = im.file_digests(str(p) for p in s.images)
    m = mounter(s.dir)
    job = m.start_job(CHAIN, "commit", "top=mid.img speed=64K")
    (line,) = m.lines(CHAIN, "jobs")
    assert line["id"] == job and int(line["speed"]) == 64 * KiB, line
    assert line["top"] == "mid.img" and line["base"] == "backing.img", line
    m.command(CHAIN, "cancel", job)
    assert m.wait_job(CHAIN, job)["event"] == "JOB_CANCELLED"
    assert m.layers(CHAIN) == ["test.img", "mid.img", "backing.img"]
    m.unmount()
    assert im.file_digests(str(p) for p in s.images[1:]) == {
        k: v for k, v in digests.items() if not k.endswith("backing.img")
    }
    check(s.test)


def test_040_reopen_overlay(tmp_path: Path, mounter: Mounter) -> None:
    """Committing img1 into img0 rewrites the backing string of img2, a read-only
    backing layer the commit must reopen read-write."""
    d = tmp_path / "images"
    d.mkdir()
    imgs = [d / f"img{i}.img" for i in range(4)]
    create_image(imgs[0], MiB)
    for i in range(1, 4):
        overlay(imgs[i], imgs[i - 1].name, "raw" if i == 1 else "qcow2")
    qemu_io(imgs[1], "write -P 0xab 0 128K")
    want = im.reference(str(imgs[3]))
    m = mounter(d)
    chain = "img3.img"
    m.run_job(chain, "commit", "top=img1.img base=img0.img")
    assert m.layers(chain) == ["img3.img", "img2.img", "img0.img"]
    assert_flat(m.img(chain), want)
    m.unmount()
    qemu_io(imgs[0], "read -P 0xab 0 128K", fmt="raw")
    assert backing_of(imgs[2]) == ("img0.img", "raw")
    for p in imgs[2:]:
        check(p)
    im.assert_same_as(str(imgs[3]), want, str(tmp_path))


def test_040_zero_blocks_stay_sparse(tmp_path: Path, mounter: Mounter) -> None:
    """Zeros written in mid over data in a qcow2 base reach the base as zero clusters,
    not as allocated zeros."""
    d = tmp_path / "images"
    d.mkdir()
    backing, mid, test = d / "backing.img", d / "mid.img", d / "test.img"
    cluster = 64 * KiB
    run("qemu-img", "create", "-q", "-f", "qcow2", backing, str(MiB))
    qemu_io(backing, f"write -P 0x11 0 {MiB}")
    overlay(mid, "backing.img", "qcow2")
    overlay(test, "mid.img", "qcow2")
    qemu_io(mid, f"write -z 0 {4 * cluster}", f"write -z {8 * cluster} {4 * cluster}")
    qemu_io(test, f"write -P 0x33 {14 * cluster} {cluster}")
    want = im.reference(str(test))
    m = mounter(d)
    m.run_job(CHAIN, "commit", "top=mid.img base=backing.img")
    m.unmount()
    check(backing)
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))
    extents = json.loads(run("qemu-img", "map", "--output=json", backing).stdout)
    for e in extents:
        a, b = e["start"], e["start"] + e["length"]
        if a < 4 * cluster or (a < 12 * cluster and b > 8 * cluster):
            assert e["zero"] and not e["data"], e
    report = json.loads(run("qemu-img", "check", "--output=json", backing).stdout)
    assert report["allocated-clusters"] == 8, report  # the 16 data clusters but 8 zeroed
