"""Layer views through a real mount, judged by QEMU's tools.

- every ``layers/CHAIN/LAYER.img`` of the seed chain (qcow2 and raw base) against
  ``qemu-img convert -O raw`` of that layer; read-only (EROFS), mode 0400, the active
  one changing with the flat file, a snapshot freezing it;
- SEEK_DATA/SEEK_HOLE on views against ``qemu-img map`` of their layers (``holes_only``);
- the job rules: an open view makes a commit into a layer it reads, or a stream into
  it, refuse with EBUSY naming the view, and the job runs once it is closed; after a
  commit the views of the layers it retired are gone (ENOENT); an open descriptor of a
  view whose layer a job changed gets EIO; stream keeps the removed layers' views;
- a chain of 200 layers: every view listed and stat'ed, some compared.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from interop import images as im

from .conftest import Mount, Mounter, Seed, Seeds, expect_refusals, holes_only, mixed_chain, run
from .test_holes import build, data_granules, lseek_table, map_extents, qemu_map

MiB = im.MiB

gone = pytest.mark.expect_log(r"WARNING chainfs\.fs: read failed: layers/\S+ is gone: ")


def view(mnt: Path, chain: str, layer: str) -> Path:
    return mnt / "layers" / chain / f"{layer}.img"


def seeded(tmp_path: Path, seeds: Seeds, mounter: Mounter) -> tuple[Seed, Mount, Path]:
    """The seed chain in ``tmp_path/images``, mounted: the seed, the mount, its mountpoint."""
    seed = seeds(tmp_path / "images")
    m = mounter(seed.active.parent)
    return seed, m, m.mountpoint


def assert_reads_eio(fd: int) -> None:
    with pytest.raises(OSError) as e:
        os.pread(fd, 4096, 0)
    assert e.value.errno == errno.EIO


def converted(layer: Path, tmp: Path) -> Path:
    """``qemu-img convert -O raw`` of the chain opened at ``layer``."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{layer.name}.raw"
    run("qemu-img", "convert", "-U", "-f", im.image_format(str(layer)), "-O", "raw", layer, out)
    return out


def virtual_size(layer: Path) -> int:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", layer).stdout)
    return int(info["virtual-size"])


def assert_cmp(a: Path, b: Path) -> None:
    r = subprocess.run(["cmp", a, b], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_view_is_its_layers_disk_as_qemu_shows_it(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    src = tmp_path / "images"
    qcow = seeds(src)
    raw = seeds(src, "r", base_format="raw")
    m = mounter(src)
    mnt = m.mountpoint
    assert sorted(os.listdir(mnt / "layers")) == ["E", "rE"]
    for seed in (qcow, raw):
        names = m.layers(seed.name)
        assert sorted(os.listdir(mnt / "layers" / seed.name)) == sorted(f"{n}.img" for n in names)
        for layer in seed.layers:
            v = view(mnt, seed.name, layer.name)
            assert_cmp(converted(layer, tmp_path), v)
            st = os.stat(v)
            assert st.st_size == virtual_size(layer)
            assert stat.S_IMODE(st.st_mode) == 0o400
            assert 0 < st.st_blocks * 512 <= st.st_size
    # the active view is the flat file, as it changes
    with open(m.img("E"), "r+b") as f:
        f.write(b"\x99" * 4096)
    assert view(mnt, "E", "E.qcow2").read_bytes() == m.img("E").read_bytes()
    assert view(mnt, "E", "D.qcow2").read_bytes()[:4096] != b"\x99" * 4096


def test_views_of_mixed_clusters_short_layers_and_a_raw_base(
    tmp_path: Path, mounter: Mounter
) -> None:
    """Cluster sizes 512 B to 2 MiB over a disk that ends inside a page; a sparse raw
    base, a compressed layer shorter than the disk with zero clusters: every view as
    ``qemu-img convert`` shows its layer, and its size the layer's."""
    mixed = mixed_chain(tmp_path / "mixed")
    top, _ = build(tmp_path / "holes")
    holes = [top.parent / n for n in ("A.raw", "B.qcow2", "E.qcow2")]
    for chain, layers in (("m3", mixed.layers), ("E", holes)):
        m = mounter(layers[-1].parent)
        for layer in layers:
            v = view(m.mountpoint, chain, layer.name)
            assert os.stat(v).st_size == virtual_size(layer), layer.name
            assert_cmp(converted(layer, tmp_path / chain), v)


def test_views_are_read_only(tmp_path: Path, seeds: Seeds, mounter: Mounter) -> None:
    seed = seeds(tmp_path / "images")
    m = mounter(seed.active.parent)
    for name in ("E.qcow2", "B.qcow2"):
        v = view(m.mountpoint, "E", name)
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as e:
                os.open(v, flags)
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.truncate(v, 0)
        assert e.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        os.stat(view(m.mountpoint, "E", "Z.qcow2"))


@holes_only
def test_seek_data_and_hole_on_views_as_qemu_maps_the_layers(
    tmp_path: Path, mounter: Mounter
) -> None:
    """The holes chain of ``test_holes`` (a sparse raw base, a compressed middle shorter
    than the disk with zero clusters, a top): each view's lseek extents against
    ``qemu-img map`` of its layer, granule by granule."""
    top, _ = build(tmp_path / "images")
    g = 64 * 1024
    layers = (("E.qcow2", "qcow2"), ("B.qcow2", "qcow2"), ("A.raw", "raw"))
    maps = {name: qemu_map(top.parent / name, fmt) for name, fmt in layers}
    m = mounter(top.parent)
    for name, _ in layers:
        size = virtual_size(top.parent / name)
        chain_map = maps[name]
        v = view(m.mountpoint, "E", name)
        table = lseek_table(v)
        ours = data_granules(table, g, size)
        sure = data_granules(map_extents(chain_map, sure=True), g, size)
        maybe = data_granules(map_extents(chain_map, sure=False), g, size)
        for i in range(len(ours)):
            assert ours[i] or not sure[i], f"{name} granule {i}: data for QEMU, a hole here"
            assert maybe[i] or not ours[i], f"{name} granule {i}: a hole for QEMU, data here"
        assert 0 < sum(ours) < len(ours), name
        # st_blocks once opened: the data lseek finds
        assert os.stat(v).st_blocks * 512 == sum(b - a for a, b in table), name


@expect_refusals
def test_an_open_view_refuses_the_jobs_that_would_change_it(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    c_raw = converted(seed.layer("C"), tmp_path)
    fd = os.open(view(mnt, "E", "C.qcow2"), os.O_RDONLY)
    try:
        # a commit into a layer C reads, and a stream into C itself
        for kind, text in (("commit", "top=D.qcow2 base=B.qcow2"), ("stream", "node=C.qcow2")):
            e = m.refuse("E", kind, text, errno.EBUSY)
            assert "layers/E/C.qcow2.img is open" in e["reason"], e
        # jobs that change nothing C shows run: a stream into D, above it
        m.run_job("E", "stream", "node=D.qcow2 base=C.qcow2")
        assert os.pread(fd, 1 << 20, 0) == c_raw.read_bytes()[: 1 << 20]
    finally:
        os.close(fd)
    assert m.layers("E") == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    # closed: the commit runs, and the views of the layers it retired are gone
    m.run_job("E", "commit", "top=D.qcow2 base=B.qcow2")
    retired = {e["file"]: e["valid"] for e in m.events("E") if e["event"] == "LAYER_RETIRED"}
    assert retired == {"C.qcow2": "false", "D.qcow2": "true"}
    listed = sorted(os.listdir(mnt / "layers" / "E"))
    assert listed == ["A.qcow2.img", "B.qcow2.img", "E.qcow2.img"]
    for name in ("C.qcow2", "D.qcow2"):  # D: a valid image, but it reads the base written
        with pytest.raises(FileNotFoundError):
            os.stat(view(mnt, "E", name))
        with pytest.raises(FileNotFoundError):
            os.open(view(mnt, "E", name), os.O_RDONLY)
    # the new base's view is what QEMU shows for it now
    assert_cmp(converted(seed.layer("B"), tmp_path / "after"), view(mnt, "E", "B.qcow2"))


@gone
def test_an_open_view_whose_layer_a_job_changed_reads_eio(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    """The active layer's view never refuses a job (as the flat file does not); a stream
    into its layer ends it: its open descriptor gets EIO, a new open reads on."""
    seed = seeds(tmp_path / "images")
    m = mounter(seed.active.parent)
    v = view(m.mountpoint, "E", "E.qcow2")
    fd = os.open(v, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == seed.content[:4096]
        m.run_job("E", "stream", "base=B.qcow2")
        assert_reads_eio(fd)
    finally:
        os.close(fd)
    assert v.read_bytes() == seed.content


@gone
def test_an_active_commit_ends_the_active_view(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    fd = os.open(view(mnt, "E", "E.qcow2"), os.O_RDONLY)
    try:
        m.run_job("E", "commit", "base=B.qcow2")
        assert_reads_eio(fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(mnt / "layers" / "E")) == ["A.qcow2.img", "B.qcow2.img"]
    assert view(mnt, "E", "B.qcow2").read_bytes() == seed.content


def test_stream_keeps_the_removed_layers_views(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    c_raw = converted(seed.layer("C"), tmp_path)
    fd = os.open(view(mnt, "E", "C.qcow2"), os.O_RDONLY)  # open across the stream
    try:
        m.run_job("E", "stream", "node=D.qcow2 base=B.qcow2")
        assert m.layers("E") == ["E.qcow2", "D.qcow2", "B.qcow2", "A.qcow2"]
        assert os.pread(fd, 4 * MiB, 0) == c_raw.read_bytes()[: 4 * MiB]
    finally:
        os.close(fd)
    listed = sorted(os.listdir(mnt / "layers" / "E"))
    assert listed == [f"{x}.qcow2.img" for x in "ABCDE"]
    for layer in seed.layers:
        assert_cmp(converted(layer, tmp_path / layer.stem), view(mnt, "E", layer.name))
    # a stream down to the base: every removed layer keeps its view
    m.run_job("E", "stream", "base=A.qcow2")
    assert sorted(os.listdir(mnt / "layers" / "E")) == [f"{x}.qcow2.img" for x in "ABCDE"]
    assert_cmp(c_raw, view(mnt, "E", "C.qcow2"))


def test_a_snapshot_freezes_the_old_active_view(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    fd = os.open(view(mnt, "E", "E.qcow2"), os.O_RDONLY)
    try:
        m.command("E", "snapshot", "F.qcow2")
        with open(m.img("E"), "r+b") as f:
            f.write(b"\x77" * 8192)
        # the open descriptor goes on, showing E, which no longer changes
        assert os.pread(fd, 8192, 0) == seed.content[:8192]
    finally:
        os.close(fd)
    assert view(mnt, "E", "E.qcow2").read_bytes() == seed.content
    assert view(mnt, "E", "F.qcow2").read_bytes() == m.img("E").read_bytes()


def test_copy_keeps_the_old_layers_views(tmp_path: Path, seeds: Seeds, mounter: Mounter) -> None:
    """A copy retires the old layers still valid: their views stay, and the old active
    one now shows the disk as it was at the pivot."""
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    m.run_job("E", "copy", "new.qcow2 sync=full")
    with open(m.img("E"), "r+b") as f:
        f.write(b"\x55" * 4096)
    names = sorted(os.listdir(mnt / "layers" / "E"))
    assert names == [f"{x}.qcow2.img" for x in "ABCDE"] + ["new.qcow2.img"]
    assert view(mnt, "E", "E.qcow2").read_bytes() == seed.content
    assert view(mnt, "E", "new.qcow2").read_bytes()[:4096] == b"\x55" * 4096


@pytest.mark.slow  # (26 s; test_depth covers depth by default)
def test_a_chain_of_200_layers(tmp_path: Path, mounter: Mounter) -> None:
    """Every view listed and stat'ed; the top, a middle and the bottom view against
    ``qemu-img convert`` (the 1,000-layer timing is in ``scripts/bench.py``)."""
    d = tmp_path / "images"
    d.mkdir()
    depth, size = 200, 4 * MiB
    names = [f"L{i:03d}.qcow2" for i in range(depth)]
    im.create(str(d / names[0]), size)
    for i in range(1, depth):
        im.create(str(d / names[i]), size, backing=names[i - 1], backing_fmt="qcow2", cwd=str(d))
    for i in (0, 57, 123, 199):  # a few layers write their own byte over their own MiB
        im.write(str(d / names[i]), [((i % 4) * MiB, MiB, 1 + i % 250), (i * 4096, 4096, 7)])
    m = mounter(d)
    top = names[-1].removesuffix(".qcow2")
    vdir = m.mountpoint / "layers" / top
    listed = os.listdir(vdir)
    assert sorted(listed) == sorted(f"{n}.img" for n in names)
    for name in listed:
        assert os.stat(vdir / name).st_size == size
    for i in (199, 123, 100, 0):
        assert_cmp(converted(d / names[i], tmp_path), vdir / f"{names[i]}.img")


@pytest.mark.expect_log(r"WARNING chainfs\.fs: open failed: layers/E/\w\.qcow2\.img is changing: ")
def test_a_view_a_running_job_changes_cannot_be_opened(
    tmp_path: Path, seeds: Seeds, mounter: Mounter
) -> None:
    """While a commit into B runs, the views reading B (B, C, D; the active layer's is the
    flat file's) refuse to open (EBUSY), the others open; the commit cancelled, B keeps
    part of what it copied, and the views show the layers' disks as they are now."""
    seed, m, mnt = seeded(tmp_path, seeds, mounter)
    job = m.start_job("E", "commit", "top=D.qcow2 base=B.qcow2 speed=64K")
    try:
        for name in ("B.qcow2", "C.qcow2", "D.qcow2"):
            with pytest.raises(OSError) as e:
                os.open(view(mnt, "E", name), os.O_RDONLY)
            assert e.value.errno == errno.EBUSY, name
        for name in ("A.qcow2", "E.qcow2"):
            os.close(os.open(view(mnt, "E", name), os.O_RDONLY))
    finally:
        m.command("E", "cancel", job)
    assert m.wait_job("E", job)["event"] == "JOB_CANCELLED"
    assert m.layers("E") == [f"{x}.qcow2" for x in "EDCBA"]
    for letter in "BCD":
        layer = seed.layer(letter)
        assert_cmp(converted(layer, tmp_path / "after"), view(mnt, "E", layer.name))
