"""qemu-iotests 030 (block-stream), ported to a real mount: ``stream`` control writes.

Each test is named after the iotests case it ports and builds the same images:

    TestSingleDrive          backing.img (raw, 1 MiB) <- mid.img <- test.img
    TestParallelOps          img-0.img (raw, 4 MiB) <- img-1.img <- ... <- img-8.img
    TestSmallerBackingFile   backing.img (raw, 1 MiB) <- test.img (2 MiB)
    TestStreamStop, TestSetSpeed   backing.img (raw) <- test.img, data in both

and is judged as the iotests judge it: ``qemu-io -c map`` of the streamed image equals
that of the image it now stands for, plus ``qemu-img check``, ``qemu-img compare``
against what QEMU read before, and the backing chain ``qemu-img info`` finds.

Not ported: pause/resume (chainfs has no pause), parallel streams on one chain and
stream next to commit (one job per chain: the second is refused, see
``test_030_overlapping``), quorum, and the on-error policies -- chainfs always
reports (``test_io_errors.py`` fails jobs on a full or failing disk); a read-only top
is ``EROFS`` on a read-only mount (``test_control.py``).
"""

from __future__ import annotations

import errno
from pathlib import Path

from interop import images as im

from .conftest import Mount, Mounter, assert_flat, expect_refusals, wait_for
from .iotests import (
    CHAIN,
    MiB,
    backing_of,
    chain_of,
    check,
    create_image,
    io_map,
    job_events,
    overlay,
    qemu_io,
)


def single_drive(d: Path) -> tuple[Path, Path, Path]:
    """TestSingleDrive: raw backing with data at 0, mid with data at 512 KiB, empty test."""
    d.mkdir()
    backing, mid, test = d / "backing.img", d / "mid.img", d / "test.img"
    create_image(backing, MiB)
    overlay(mid, "backing.img", "raw")
    overlay(test, "mid.img", "qcow2")
    qemu_io(backing, "write -P 0x1 0 512", fmt="raw")
    qemu_io(mid, "write -P 0x1 524288 512")
    return backing, mid, test


def stream(m: Mount, text: str) -> dict[str, str]:
    end = m.run_job(CHAIN, "stream", text)
    assert m.lines(CHAIN, "jobs") == []
    return end


def test_030_stream(tmp_path: Path, mounter: Mounter) -> None:
    backing, _, test = single_drive(tmp_path / "images")
    want = im.reference(str(test))
    m = mounter(tmp_path / "images")
    end = stream(m, "speed=0")  # no base (an empty write is no command)
    assert int(end["offset"]) == MiB
    assert m.layers(CHAIN) == ["test.img"]
    assert_flat(m.img(CHAIN), want)
    m.unmount()
    assert io_map(test) == io_map(backing, "raw"), "the map does not match the backing file's"
    assert backing_of(test) == (None, None)
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))


def test_030_stream_intermediate(tmp_path: Path, mounter: Mounter) -> None:
    backing, mid, test = single_drive(tmp_path / "images")
    assert io_map(mid) != io_map(backing, "raw")
    want = im.reference(str(test))
    m = mounter(tmp_path / "images")
    stream(m, "node=mid.img")
    assert m.layers(CHAIN) == ["test.img", "mid.img"]
    m.unmount()
    assert io_map(mid) == io_map(backing, "raw"), "the map does not match the backing file's"
    assert chain_of(test) == ["test.img", "mid.img"]
    check(mid)
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))


def test_030_stream_no_op(tmp_path: Path, mounter: Mounter) -> None:
    """``base=mid``: nothing lies between test and mid, so nothing is copied."""
    _, _, test = single_drive(tmp_path / "images")
    empty = io_map(test)
    m = mounter(tmp_path / "images")
    stream(m, "base=mid.img")
    assert m.layers(CHAIN) == ["test.img", "mid.img", "backing.img"]
    m.unmount()
    assert io_map(test) == empty, "the map changed after a no-op"
    assert backing_of(test) == ("mid.img", "qcow2")
    check(test)


def test_030_stream_partial(tmp_path: Path, mounter: Mounter) -> None:
    _, mid, test = single_drive(tmp_path / "images")
    want = im.reference(str(test))
    m = mounter(tmp_path / "images")
    stream(m, "base=backing.img")
    assert m.layers(CHAIN) == ["test.img", "backing.img"]
    m.unmount()
    assert io_map(test) == io_map(mid), "the map does not match mid's"
    assert backing_of(test) == ("backing.img", "raw")
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))


@expect_refusals
def test_030_device_not_found(tmp_path: Path, mounter: Mounter) -> None:
    """A node or base that is no layer of the chain is refused, changing nothing."""
    images = single_drive(tmp_path / "images")
    before = im.file_digests(str(p) for p in images)
    m = mounter(tmp_path / "images")
    for text in ("node=nonexistent", "base=nonexistent", "node=/nowhere/mid.img"):
        reason = m.refuse(CHAIN, "stream", text, errno.EINVAL)["reason"]
        assert "is not a layer of chain" in reason, reason
    m.unmount()
    assert im.file_digests(str(p) for p in images) == before


# -- TestParallelOps: nine images ----------------------------------------------------------

NUM_IMGS = 9


def parallel_ops(d: Path) -> list[Path]:
    """img-0.img (raw, 4 MiB) <- img-1.img <- ... <- img-8.img; the odd images hold
    data: 512 KiB and 1 MiB in turn, each in its own MiB."""
    d.mkdir()
    imgs = [d / f"img-{i}.img" for i in range(NUM_IMGS)]
    create_image(imgs[0], 4 * MiB)
    for i in range(1, NUM_IMGS):
        overlay(imgs[i], imgs[i - 1].name, "raw" if i == 1 else "qcow2")
    for i in range(NUM_IMGS // 2):
        kib = 512 + 512 * (i % 2)
        qemu_io(imgs[2 * i + 1], f"write -P {i} {i * MiB} {kib * 1024}")
    return imgs


@expect_refusals
def test_030_stream_base_node_name(tmp_path: Path, mounter: Mounter) -> None:
    """Streams into img-4: a base that does not exist, that is not below it, or that
    is img-4 itself is refused; base img-2 streams img-3 into it."""
    imgs = parallel_ops(tmp_path / "images")
    assert io_map(imgs[4]) != io_map(imgs[3])
    want = im.reference(str(imgs[-1]))
    m = mounter(tmp_path / "images")
    chain = "img-8.img"
    for text, reason in [
        ("node=img-4.img base=none", "'none' is not a layer of chain"),
        ("node=img-4.img base=img-6.img", "'img-6.img' is not below 'img-4.img'"),
        ("node=img-4.img base=img-4.img", "'img-4.img' is not below 'img-4.img'"),
    ]:
        got = m.refuse(chain, "stream", text, errno.EINVAL)["reason"]
        assert reason in got, (text, got)
    m.run_job(chain, "stream", "node=img-4.img base=img-2.img")
    names = [p.name for p in reversed(imgs)]
    assert m.layers(chain) == [n for n in names if n != "img-3.img"]
    assert_flat(m.img(chain), want)
    m.unmount()
    assert io_map(imgs[4]) == io_map(imgs[3]), "the map does not match img-3's"
    assert backing_of(imgs[4]) == ("img-2.img", "qcow2")
    for p in imgs[1:]:
        check(p)
    im.assert_same_as(str(imgs[-1]), want, str(tmp_path))


@expect_refusals
def test_030_overlapping(tmp_path: Path, mounter: Mounter) -> None:
    """test_overlapping_1/2/3 and test_stream_commit: while a stream, an intermediate
    commit or an active commit runs, every other job on the chain is refused with
    EBUSY naming the running job -- even one that would touch other layers, as chainfs
    runs one job per chain -- and the running job is unharmed."""
    imgs = parallel_ops(tmp_path / "images")
    want = im.reference(str(imgs[-1]))
    m = mounter(tmp_path / "images")
    chain = "img-8.img"
    others = [
        ("stream", "node=img-5.img base=img-2.img"),
        ("stream", "node=img-3.img base=img-2.img"),
        ("stream", "node=img-4.img"),
        ("commit", "base=img-4.img"),
        ("commit", "top=img-3.img base=img-1.img"),
        ("commit", "top=img-1.img base=img-0.img"),
        ("snapshot", "new.img"),
        ("copy", "copy.img"),
    ]
    for kind, text in [
        ("stream", "node=img-4.img base=img-1.img speed=256K"),
        ("commit", "top=img-5.img base=img-3.img speed=256K"),
        ("commit", "base=img-3.img speed=256K wait=ready"),
    ]:
        job = m.start_job(chain, kind, text)
        for other_kind, other_text in others:
            reason = m.refuse(chain, other_kind, other_text, errno.EBUSY)["reason"]
            assert job in reason, reason
        assert [j["id"] for j in m.lines(chain, "jobs")] == [job]
        m.command(chain, "cancel", job)
        assert m.wait_job(chain, job)["event"] == "JOB_CANCELLED"
    assert m.layers(chain) == [p.name for p in reversed(imgs)]
    assert_flat(m.img(chain), want)
    m.unmount()
    assert not (tmp_path / "images" / "new.img").exists()
    assert not (tmp_path / "images" / "copy.img").exists()
    for p in imgs[1:]:
        check(p)


# -- the rest ------------------------------------------------------------------------------


def test_030_stream_smaller_backing_file(tmp_path: Path, mounter: Mounter) -> None:
    """A 1 MiB backing file under a 2 MiB image: the stream must finish (not hang), the
    second MiB reading zeros."""
    d = tmp_path / "images"
    d.mkdir()
    backing, test = d / "backing.img", d / "test.img"
    create_image(backing, MiB)
    overlay(test, "backing.img", "raw", size=2 * MiB)
    want = backing.read_bytes() + bytes(MiB)
    m = mounter(d)
    end = m.run_job(CHAIN, "stream", "speed=0")
    assert int(end["offset"]) == 2 * MiB
    assert m.layers(CHAIN) == ["test.img"]
    assert_flat(m.img(CHAIN), want)
    m.unmount()
    assert backing_of(test) == (None, None)
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))


def stream_stop_images(d: Path, size: int) -> Path:
    """TestStreamStop/TestSetSpeed, smaller: raw backing with data in its first half,
    test with data in its second."""
    d.mkdir()
    backing, test = d / "backing.img", d / "test.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    qemu_io(backing, f"write -P 0x1 0 {size // 2}", fmt="raw")
    overlay(test, "backing.img", "raw")
    qemu_io(test, f"write -P 0x1 {size // 2} {size // 2}")
    return test


def test_030_stream_stop(tmp_path: Path, mounter: Mounter) -> None:
    """A stream held back by ``speed`` and cancelled: ``JOB_CANCELLED``, no completion,
    and the chain as it was."""
    test = stream_stop_images(tmp_path / "images", 8 * MiB)
    want = im.reference(str(test))
    m = mounter(tmp_path / "images")
    job = m.start_job(CHAIN, "stream", "speed=512K")
    wait_for(lambda: (m.job_offset(CHAIN) or 0) > 0, "the stream to make progress")
    assert job_events(m, job) == ["JOB_STARTED"]
    m.command(CHAIN, "cancel", job)
    end = m.wait_job(CHAIN, job)
    assert end["event"] == "JOB_CANCELLED", end
    assert job_events(m, job) == ["JOB_STARTED", "JOB_CANCELLED"]
    assert m.lines(CHAIN, "jobs") == []
    assert m.layers(CHAIN) == ["test.img", "backing.img"]
    assert_flat(m.img(CHAIN), want)
    m.unmount()
    assert backing_of(test) == ("backing.img", "raw")
    check(test)
    im.assert_same_as(str(test), want, str(tmp_path))


def test_030_set_speed(tmp_path: Path, mounter: Mounter) -> None:
    """The speed a stream was given shows in ``jobs``, in bytes per second."""
    stream_stop_images(tmp_path / "images", 8 * MiB)
    m = mounter(tmp_path / "images")
    for text, speed in [("64K", 64 * 1024), ("100000", 100000), ("512k", 512 * 1024)]:
        job = m.start_job(CHAIN, "stream", f"speed={text}")
        (line,) = m.lines(CHAIN, "jobs")
        assert line["id"] == job and int(line["speed"]) == speed, line
        m.command(CHAIN, "cancel", job)
        assert m.wait_job(CHAIN, job)["event"] == "JOB_CANCELLED"
    m.unmount()


@expect_refusals
def test_030_set_speed_invalid(tmp_path: Path, mounter: Mounter) -> None:
    """A negative or unreadable speed is refused; nothing starts."""
    stream_stop_images(tmp_path / "images", MiB)
    m = mounter(tmp_path / "images")
    for text in ["speed=-1", "speed=-4M", "speed=fast", "speed=", "speed=1T", "speed=1.5M"]:
        reason = m.refuse(CHAIN, "stream", text, errno.EINVAL)["reason"]
        assert "speed" in reason, reason
    assert m.lines(CHAIN, "jobs") == []
    assert not [e for e in m.events(CHAIN) if e["event"] == "JOB_STARTED"]
    m.unmount()
