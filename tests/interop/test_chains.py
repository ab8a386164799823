"""Chains as QEMU builds them: depth, mixed cluster sizes, raw bases, short backing files,
relative/absolute/``..`` backing strings resolved against the overlay's own directory, and
the two chain edits chainfs makes itself (``create_overlay``, ``set_backing``), judged by
``qemu-img info``/``check``/``compare``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from chainfs.chain import Chain
from chainfs.errors import ChainfsError
from chainfs.formats.qcow2 import create_overlay, set_backing

from . import images as im
from .images import KiB, MiB

CYCLE = [64 * KiB, 512, 4 * KiB, 2 * MiB]


def read_all(top: str) -> bytes:
    with Chain.open(top) as chain:
        return bytes(chain.read(0, chain.size))


def write_some(top: str, model: im.Model, seed: int, count: int = 6) -> None:
    """A few partial-cluster writes through chainfs (copy-on-write through the chain)."""
    rng = random.Random(seed)
    size = len(model.data)
    with Chain.open(top, writable=True) as chain:
        for _ in range(count):
            offset = rng.randrange(size - 1)
            data = rng.randbytes(min(rng.randrange(1, 9000), size - offset))
            chain.write(offset, data)
            model.put(offset, data)


def assert_same(top: str, model: im.Model, directory: Path) -> None:
    assert read_all(top) == bytes(model)
    im.assert_same_as(top, bytes(model), str(directory))


def realpaths(chain: Chain) -> list[str]:
    return [os.path.realpath(layer.path) for layer in chain.layers]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 6, 9, 16])
def test_depth_with_mixed_cluster_sizes(tmp_path: Path, depth: int) -> None:
    size = 4 * MiB
    layers = [
        {
            "name": f"L{i:02d}.qcow2",
            "create": {"cluster_size": CYCLE[i % len(CYCLE)]},
            "writes": im.varied_writes(size, CYCLE[i % len(CYCLE)], i + 1, salt=i),
        }
        for i in range(depth)
    ]
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    top = paths[-1]
    assert im.reference(top) == bytes(model)
    with Chain.open(top) as chain:
        assert realpaths(chain) == [os.path.realpath(p) for p in reversed(paths)]
        assert chain.read(0, chain.size) == bytes(model)
    below = im.file_digests(paths[:-1])
    write_some(top, model, seed=depth)
    assert im.file_digests(paths[:-1]) == below
    im.assert_chain_clean(paths)
    assert_same(top, model, tmp_path)


def test_raw_base_under_three_overlays(tmp_path: Path) -> None:
    size = 3 * MiB
    layers: list[dict[str, Any]] = [
        {"name": "base.raw", "fmt": "raw", "writes": im.varied_writes(size, 4 * KiB, 0x11)}
    ]
    for i, cluster in enumerate([4 * KiB, 512, 64 * KiB], start=1):
        layers.append(
            {
                "name": f"o{i}.qcow2",
                "create": {"cluster_size": cluster},
                "writes": im.varied_writes(size, cluster, 0x11 * (i + 1), salt=i),
            }
        )
    paths, model = im.build_chain(str(tmp_path), layers, size=size)
    with Chain.open(paths[-1]) as chain:
        assert [layer.format_name for layer in chain.layers] == ["qcow2"] * 3 + ["raw"]
        assert chain.read(0, size) == bytes(model) == im.reference(paths[-1])
    write_some(paths[-1], model, seed=5)
    im.assert_chain_clean(paths)
    assert_same(paths[-1], model, tmp_path)


@pytest.mark.parametrize("mid_size", [MiB, MiB + 1536, 700 * KiB])
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_short_backing_reads_zeros_and_masks_below(
    tmp_path: Path, mid_size: int, base_fmt: str
) -> None:
    """base (2M, all data) <- mid (shorter) <- top (2M): past mid's end reads zeros."""
    size = 2 * MiB
    paths, model = im.build_chain(
        str(tmp_path),
        [
            {"name": f"base.{base_fmt}", "fmt": base_fmt, "writes": [(0, size, 0x11)]},
            {
                "name": "mid.qcow2",
                "size": mid_size,
                "create": {"cluster_size": 4 * KiB},
                "writes": [(mid_size - 100, 100, 0x22), (0, 3000, 0x23)],
            },
            {
                "name": "top.qcow2",
                "create": {"cluster_size": 64 * KiB},
                "writes": [(size - 10 * KiB, 5000, 0x33)],
            },
        ],
        size=size,
    )
    top = paths[-1]
    ref = im.reference(top)
    assert ref == bytes(model)
    assert ref[mid_size : mid_size + 4096] == bytes(4096)
    assert read_all(top) == ref
    # copy-on-write of a cluster straddling mid's end must zero-fill, not read base
    with Chain.open(top, writable=True) as chain:
        chain.write(mid_size - 50, b"\xab" * 100)
        chain.write(mid_size + 7000, b"\xcd" * 3)
    model.put(mid_size - 50, b"\xab" * 100)
    model.put(mid_size + 7000, b"\xcd" * 3)
    im.assert_chain_clean(paths)
    assert_same(top, model, tmp_path)


def test_absolute_backing_strings(tmp_path: Path) -> None:
    size = 2 * MiB
    base = im.create(str(tmp_path / "base.qcow2"), size, cluster_size=4 * KiB)
    im.write(base, im.varied_writes(size, 4 * KiB, 0x11))
    mid = im.create(str(tmp_path / "mid.qcow2"), backing=base)
    im.write(mid, im.varied_writes(size, 64 * KiB, 0x22, salt=1))
    top = im.create(str(tmp_path / "top.qcow2"), backing=mid)
    assert im.info(top)["backing-filename"] == mid  # stored as given: absolute
    model = im.Model(size, im.reference(top))
    assert read_all(top) == bytes(model)
    write_some(top, model, seed=2)
    im.assert_chain_clean([base, mid, top])
    assert_same(top, model, tmp_path)


def nested_chain(tmp_path: Path) -> tuple[list[str], im.Model]:
    """d/a/base.qcow2 <- d/b/mid.qcow2 ("../a/base.qcow2") <- d/top.qcow2 ("b/mid.qcow2")
    <- d/c/sub/act.qcow2 ("../../top.qcow2").  Each string only makes sense relative to
    the directory of the image that holds it."""
    size = 2 * MiB
    for sub in ("a", "b", "c/sub"):
        (tmp_path / sub).mkdir(parents=True)
    base = im.create(str(tmp_path / "a/base.qcow2"), size)
    mid = im.create(
        str(tmp_path / "b/mid.qcow2"), backing="../a/base.qcow2", cwd=str(tmp_path / "b")
    )
    top = im.create(str(tmp_path / "top.qcow2"), backing="b/mid.qcow2", cwd=str(tmp_path))
    act = im.create(
        str(tmp_path / "c/sub/act.qcow2"),
        backing="../../top.qcow2",
        cwd=str(tmp_path / "c/sub"),
    )
    model = im.Model(size)
    for i, path in enumerate([base, mid, top, act]):
        writes = im.varied_writes(size, 64 * KiB, 0x11 * (i + 1), salt=i)
        im.write(path, writes)
        model.apply(writes)
    assert im.info(mid)["backing-filename"] == "../a/base.qcow2"
    assert im.info(act)["backing-filename"] == "../../top.qcow2"
    assert im.reference(act) == bytes(model)
    return [base, mid, top, act], model


def plant_decoys(directory: Path) -> None:
    """Images with the chain's backing names but other content, where a wrong resolution
    (against the cwd or the active layer's directory) would find them."""
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2", "a/base.qcow2", "b/mid.qcow2"]:
        p = directory / name
        p.parent.mkdir(parents=True, exist_ok=True)
        im.create(str(p), 2 * MiB)
        im.write(str(p), [(0, 2 * MiB, 0x99)])


def test_dotdot_backing_strings_resolve_against_each_overlay(tmp_path: Path) -> None:
    d = tmp_path / "chain"
    d.mkdir()
    paths, model = nested_chain(d)
    # decoys where resolution against the active layer's directory would look
    plant_decoys(d / "c/sub")
    plant_decoys(d / "c")
    with Chain.open(paths[-1]) as chain:
        assert realpaths(chain) == [os.path.realpath(p) for p in reversed(paths)]
        assert chain.read(0, chain.size) == bytes(model)
    write_some(paths[-1], model, seed=3)
    im.assert_chain_clean(paths)
    assert_same(paths[-1], model, d)


@pytest.mark.parametrize("how", ["absolute", "relative-to-cwd"])
def test_open_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    d = tmp_path / "chain"
    d.mkdir()
    paths, model = nested_chain(d)
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    plant_decoys(elsewhere)
    plant_decoys(elsewhere.parent)
    monkeypatch.chdir(elsewhere)
    target = paths[-1] if how == "absolute" else os.path.relpath(paths[-1], elsewhere)
    with Chain.open(target) as chain:
        assert realpaths(chain) == [os.path.realpath(p) for p in reversed(paths)]
        assert chain.read(0, chain.size) == bytes(model)
    write_some(target, model, seed=4)
    monkeypatch.chdir(tmp_path)
    im.assert_chain_clean(paths)
    assert_same(paths[-1], model, d)


def test_symlinked_directory_in_the_active_path(tmp_path: Path) -> None:
    """A relative backing string next to a symlinked active path: QEMU resolves it against
    the path as given; with the link pointing at the chain's own directory both agree."""
    size = MiB
    d = tmp_path / "real"
    d.mkdir()
    _, model = im.build_chain(
        str(d),
        [
            {"name": "base.qcow2", "writes": [(0, 5000, 0x11)]},
            {"name": "top.qcow2", "writes": [(4000, 5000, 0x22)]},
        ],
        size=size,
    )
    (tmp_path / "link").symlink_to(d)
    via_link = str(tmp_path / "link" / "top.qcow2")
    assert im.reference(via_link) == bytes(model)
    assert read_all(via_link) == bytes(model)


# ---- create_overlay ----


def seed_pair(d: Path, size: int = 3 * MiB) -> tuple[list[str], im.Model]:
    return im.build_chain(
        str(d),
        [
            {"name": "A.qcow2", "writes": im.varied_writes(size, 64 * KiB, 0x11)},
            {
                "name": "B.qcow2",
                "create": {"cluster_size": 4 * KiB},
                "writes": im.varied_writes(size, 4 * KiB, 0x22, salt=1),
            },
        ],
        size=size,
    )


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB, 2 * MiB])
def test_create_overlay_is_a_valid_qcow2_overlay(tmp_path: Path, cluster_size: int) -> None:
    paths, model = seed_pair(tmp_path)
    top = str(tmp_path / "C.qcow2")
    below = im.file_digests(paths)
    create_overlay(
        top,
        size=len(model.data),
        backing="B.qcow2",
        backing_format="qcow2",
        cluster_size=cluster_size,
    )
    assert im.file_digests(paths) == below
    info = im.info(top)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == len(model.data)
    assert info["cluster-size"] == cluster_size
    assert info["backing-filename"] == "B.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert not info.get("dirty-flag")
    im.assert_clean(top)
    chain_info = im.info(top, backing_chain=True)
    assert [os.path.realpath(i["filename"]) for i in chain_info] == [
        os.path.realpath(p) for p in [top, *reversed(paths)]
    ]
    assert im.reference(top) == bytes(model)
    assert read_all(top) == bytes(model)
    write_some(top, model, seed=cluster_size)
    assert im.file_digests(paths) == below
    im.assert_chain_clean([*paths, top])
    assert_same(top, model, tmp_path)
    # QEMU can write it after chainfs did
    im.write(top, [(100, 1000, 0x5C)])
    model.apply([(100, 1000, 0x5C)])
    im.assert_clean(top)
    assert read_all(top) == bytes(model)


def test_create_overlay_without_backing(tmp_path: Path) -> None:
    top = str(tmp_path / "new.qcow2")
    size = 5 * MiB + 512
    create_overlay(top, size=size, backing=None, backing_format=None)
    info = im.info(top)
    assert info["virtual-size"] == size
    assert "backing-filename" not in info
    im.assert_clean(top)
    model = im.Model(size)
    assert read_all(top) == bytes(model)
    write_some(top, model, seed=11)
    im.assert_clean(top)
    assert_same(top, model, tmp_path)


def test_create_overlay_with_dotdot_and_raw_backing(tmp_path: Path) -> None:
    size = 2 * MiB
    base = im.create(str(tmp_path / "base.raw"), size, fmt="raw")
    im.write(base, [(0, 300 * KiB, 0x11)])
    (tmp_path / "sub").mkdir()
    top = str(tmp_path / "sub" / "top.qcow2")
    create_overlay(top, size=size, backing="../base.raw", backing_format="raw")
    info = im.info(top)
    assert info["backing-filename"] == "../base.raw"
    assert info["backing-filename-format"] == "raw"
    im.assert_clean(top)
    model = im.Model(size)
    model.apply([(0, 300 * KiB, 0x11)])
    assert im.reference(top) == bytes(model)
    write_some(top, model, seed=12)
    im.assert_clean(top)
    assert_same(top, model, tmp_path)


def test_create_overlay_refuses_an_existing_path(tmp_path: Path) -> None:
    paths, _ = seed_pair(tmp_path)
    before = im.file_digests(paths)
    with pytest.raises((ChainfsError, FileExistsError)):
        create_overlay(paths[0], size=MiB, backing="B.qcow2", backing_format="qcow2")
    assert im.file_digests(paths) == before


# ---- set_backing ----


def three_layers(d: Path, *, compat: str = "1.1") -> list[str]:
    size = 3 * MiB
    paths, _ = im.build_chain(
        str(d),
        [
            {
                "name": "A.qcow2",
                "create": {"compat": compat},
                "writes": im.varied_writes(size, 64 * KiB, 0x11),
            },
            {
                "name": "B.qcow2",
                "create": {"compat": compat},
                "writes": im.varied_writes(size, 64 * KiB, 0x22, salt=2),
            },
            {
                "name": "C.qcow2",
                "create": {"compat": compat, "cluster_size": 4 * KiB},
                "writes": im.varied_writes(size, 4 * KiB, 0x33, salt=4)[::2],
            },
        ],
        size=size,
    )
    return paths


def rebased_by_qemu(path: str, backing: str | None, backing_fmt: str | None) -> bytes:
    """What ``path`` reads as once QEMU itself (``qemu-img rebase -u``) points it at
    ``backing``: done on a copy beside it, so relative strings resolve the same way.
    (Clusters of ``path`` that were copied-on-write keep the old backing's bytes.)"""
    copy = path + ".qemu-rebased.qcow2"
    shutil.copyfile(path, copy)
    try:
        args = [im.QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-b", backing or ""]
        if backing is not None:
            args += ["-F", backing_fmt or "qcow2"]
        im.run([*args, copy])
        return im.reference(copy)
    finally:
        os.unlink(copy)


def header_facts(path: str) -> dict[str, Any]:
    info = im.info(path)
    return {
        "virtual-size": info["virtual-size"],
        "cluster-size": info["cluster-size"],
        "format-specific": info["format-specific"],
    }


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_set_backing_to_a_lower_layer(tmp_path: Path, compat: str) -> None:
    a, b, c = three_layers(tmp_path, compat=compat)
    expected = rebased_by_qemu(c, "A.qcow2", "qcow2")
    assert expected != im.reference(c), "B holds nothing C sees; the test proves nothing"
    facts = header_facts(c)
    untouched = im.file_digests([a, b])
    set_backing(c, "A.qcow2", "qcow2")
    assert im.file_digests([a, b]) == untouched
    chain_info = im.info(c, backing_chain=True)
    assert [os.path.basename(i["filename"]) for i in chain_info] == ["C.qcow2", "A.qcow2"]
    assert chain_info[0]["backing-filename"] == "A.qcow2"
    assert chain_info[0]["backing-filename-format"] == "qcow2"
    assert header_facts(c) == facts
    im.assert_clean(c)
    assert im.reference(c) == expected
    assert read_all(c) == expected
    model = im.Model(len(expected), expected)
    write_some(c, model, seed=21)
    im.assert_chain_clean([a, c])
    assert_same(c, model, tmp_path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_set_backing_none_removes_the_backing_file(tmp_path: Path, compat: str) -> None:
    c = three_layers(tmp_path, compat=compat)[-1]
    expected = rebased_by_qemu(c, None, None)
    facts = header_facts(c)
    set_backing(c, None, None)
    info = im.info(c, backing_chain=True)
    assert len(info) == 1
    assert "backing-filename" not in info[0]
    assert "backing-filename-format" not in info[0]
    assert header_facts(c) == facts
    im.assert_clean(c)
    assert im.reference(c) == expected
    assert read_all(c) == expected


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_set_backing_long_absolute_string_and_back(tmp_path: Path, compat: str) -> None:
    """A longer string than before (header extensions and name must be relaid out in
    cluster 0), then a relative one with a raw format, then back."""
    a, b, c = three_layers(tmp_path, compat=compat)
    facts = header_facts(c)
    far = tmp_path / ("x" * 200) / ("y" * 200)
    far.mkdir(parents=True)
    far_a = far / "A-copy.qcow2"
    far_a.write_bytes(Path(a).read_bytes())
    expected = rebased_by_qemu(c, str(far_a), "qcow2")
    set_backing(c, str(far_a), "qcow2")
    info = im.info(c)
    assert info["backing-filename"] == str(far_a)
    assert info["backing-filename-format"] == "qcow2"
    im.assert_clean(c)
    assert im.reference(c) == expected == read_all(c)

    raw = tmp_path / "flat.raw"
    im.run([im.QEMU_IMG, "convert", "-O", "raw", b, str(raw)])
    expected = rebased_by_qemu(c, "flat.raw", "raw")
    set_backing(c, "flat.raw", "raw")
    info = im.info(c)
    assert info["backing-filename"] == "flat.raw"
    assert info["backing-filename-format"] == "raw"
    im.assert_clean(c)
    assert im.reference(c) == expected == read_all(c)

    set_backing(c, "B.qcow2", "qcow2")
    assert im.info(c)["backing-filename"] == "B.qcow2"
    assert header_facts(c) == facts
    im.assert_clean(c)
    assert im.reference(c) == expected == read_all(c)


# ---- the seed chain script ----

SEED_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make-seed-chain"


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "4M"],
        ["--size", "3M", "--cluster-size", "4096", "--base-format", "raw"],
        ["--size", "2M", "--cluster-size", "512", "--depth", "12"],
    ],
)
def test_seed_chain_script(tmp_path: Path, args: list[str]) -> None:
    d = tmp_path / "seed"
    proc = im.run([str(SEED_SCRIPT), str(d), *args])
    top = proc.stdout.strip()
    assert os.path.isfile(top)
    chain_info = im.info(top, backing_chain=True)
    names = sorted(p.name for p in d.iterdir())
    assert len(chain_info) == len(names)
    for layer in chain_info[:-1]:
        assert "/" not in layer["backing-filename"], "backing strings must stay relative"
        assert "backing-filename-format" in layer
    im.assert_chain_clean(str(d / n) for n in names)
    # every layer holds data of its own that shows through at the top
    ref = im.reference(top)
    for i in range(len(names)):
        pattern = 0x11 * (i + 1) if i < 15 else 1 + (i * 37) % 255
        assert bytes([pattern]) * 256 in ref, f"layer {names[i]} is invisible"
    assert read_all(top) == ref
    # it never overwrites
    before = im.file_digests(str(d / n) for n in names)
    again = im.run([str(SEED_SCRIPT), str(d), *args], ok=range(1, 256))
    assert "refusing" in again.stderr
    assert im.file_digests(str(d / n) for n in names) == before
