"""The flat files of a mount read exactly what ``qemu-img convert -O raw`` reads.

One mount serves a directory of differently shaped chains (the seed chain, a raw base,
a backing file shorter than its overlay, mixed cluster sizes down to 512 bytes and up to
2 MiB, absolute and ``..`` backing strings, a v2 image, compressed clusters); every flat
file, read through the page cache and past it, must equal QEMU's reading of its chain,
and ``control/NAME/chain`` must list the chain as ``qemu-img info --backing-chain`` does.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from interop import images as im

from .conftest import (
    Mount,
    Mounter,
    Seeds,
    _server_lines,
    backing_chain,
    first_difference,
    read_direct,
)

KiB, MiB = im.KiB, im.MiB


@dataclass
class Source:
    directory: Path
    content: dict[str, bytes] = field(default_factory=dict)  # chain -> flat content
    layers: dict[str, list[Path]] = field(default_factory=dict)  # chain -> layers, top first


def _build(src: Source, name: str, layers: list[dict[str, Any]], size: int) -> None:
    paths, model = im.build_chain(str(src.directory), layers, size=size)
    top = paths[-1]
    assert im.reference(top) == bytes(model)
    src.content[name] = bytes(model)
    src.layers[name] = [Path(p) for p in reversed(paths)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, seeds: Seeds) -> Source:
    root = tmp_path_factory.mktemp("flat")
    src = Source(root / "images")
    d = src.directory
    for prefix, base_format in (("seed-", "qcow2"), ("rawbase-", "raw")):
        seed = seeds(d, prefix, base_format=base_format)
        src.content[seed.name] = seed.content
        src.layers[seed.name] = list(reversed(seed.layers))

    size = 4 * MiB
    _build(
        src,
        "short-top",
        [
            {"name": "short-base.qcow2", "writes": [(0, size, 0x11)]},
            {
                "name": "short-mid.qcow2",
                "size": MiB + 1536,
                "create": {"cluster_size": 4 * KiB},
                "writes": [(MiB + 1000, 536, 0x22), (5000, 3000, 0x23)],
            },
            {"name": "short-top.qcow2", "writes": [(size - 10 * KiB, 5000, 0x33)]},
        ],
        size,
    )

    size = 6 * MiB + 1536
    mixed = [512, 2 * MiB, 4 * KiB, 64 * KiB]
    _build(
        src,
        "mixed-top",
        [
            {
                "name": "mixed-top.qcow2" if i == len(mixed) - 1 else f"mixed-{i}.qcow2",
                "create": {"cluster_size": cs},
                "writes": im.varied_writes(size, cs, 0x40 + i, salt=i),
            }
            for i, cs in enumerate(mixed)
        ],
        size,
    )

    # absolute backing strings, a v2 image and a compressed base kept in a subdirectory
    # (which is not scanned for chains), and a ``..`` string leaving the source directory
    size = 3 * MiB
    lower, outside = d / "lower", root / "outside"
    lower.mkdir()
    outside.mkdir()
    plain = root / "plain.raw"
    plain.write_bytes(random.Random(1).randbytes(size))
    base = im.convert_compressed(str(plain), str(lower / "abs-base.qcow2"))
    mid = im.create(str(d / "abs-mid.qcow2"), size, compat="0.10", backing=base)
    top = im.create(str(d / "abs-top.qcow2"), size, cluster_size=4 * KiB, backing=mid)
    im.write(mid, im.varied_writes(size, 64 * KiB, 0x51))
    im.write(top, im.varied_writes(size, 4 * KiB, 0x52, salt=3))
    src.content["abs-top"] = im.reference(top)
    src.layers["abs-top"] = [Path(top), Path(mid), Path(base)]

    dd_base = im.create(str(outside / "dd-base.qcow2"), size)
    im.write(dd_base, [(0, size, 0x61)])
    dd_top = im.create(
        str(d / "dd-top.qcow2"), size, backing="../outside/dd-base.qcow2", cwd=str(d)
    )
    im.write(dd_top, im.varied_writes(size, 64 * KiB, 0x62))
    src.content["dd-top"] = im.reference(dd_top)
    src.layers["dd-top"] = [Path(dd_top), Path(dd_base)]
    return src


@pytest.fixture(scope="module")
def mount(module_mounter: Mounter, source: Source) -> Mount:
    # dd-top's base lies outside the source directory: the mount must be told
    outside = source.directory.parent / "outside"
    return module_mounter(source.directory, f"allow_backing={outside}")


# SPEC: the files of control/NAME
CONTROL_FILES = (
    "chain",
    "jobs",
    "events",
    "snapshot",
    "stream",
    "commit",
    "copy",
    "backup",
    "cancel",
    "complete",
    "speed",
    "pause",
    "resume",
    "change",
    "bitmap",
    "bitmaps",
    "dirty",
    "adopt",
    "inactivate",
    "activate",
)
CHAINS = ["seed-E", "rawbase-E", "short-top", "mixed-top", "abs-top", "dd-top"]


def test_tree(mount: Mount) -> None:
    assert sorted(os.listdir(mount.mountpoint)) == sorted(
        ["control", "layers", *(f"{c}.img" for c in CHAINS)]
    )
    assert sorted(os.listdir(mount.mountpoint / "control")) == sorted([".status", *CHAINS])
    assert sorted(os.listdir(mount.mountpoint / "layers")) == sorted(CHAINS)
    for chain in CHAINS:
        assert sorted(os.listdir(mount.mountpoint / "control" / chain)) == sorted(CONTROL_FILES)
    served = {e["chain"]: e["status"] for e in mount.status()[1:]}
    assert served == dict.fromkeys(CHAINS, "served")


@pytest.mark.parametrize("chain", CHAINS)
def test_flat_file_equals_qemu_img_convert(mount: Mount, source: Source, chain: str) -> None:
    want = source.content[chain]
    path = mount.img(chain)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(want)
    assert 0 < st.st_blocks * 512 <= len(want) + 4096
    got = path.read_bytes()  # through the page cache (empty on the first read)
    assert got == want, first_difference(got, want)
    got = read_direct(path)  # and from the server again
    assert got == want, first_difference(got, want)


@pytest.mark.parametrize("chain", ["mixed-top", "short-top", "abs-top"])
def test_unaligned_reads(mount: Mount, source: Source, chain: str) -> None:
    want = source.content[chain]
    rng = random.Random(chain)
    with open(mount.img(chain), "rb", buffering=0) as f:
        for _ in range(200):
            off = rng.randrange(len(want) + 100)
            n = rng.choice([1, 511, 513, 4095, 65537, 300000])
            assert os.pread(f.fileno(), n, off) == want[off : off + n], (off, n)


@pytest.mark.parametrize("chain", CHAINS)
def test_chain_file_lists_the_layers(mount: Mount, source: Source, chain: str) -> None:
    layers = source.layers[chain]
    lines = mount.lines(chain, "chain")
    assert [x["path"] for x in lines] == [str(p) for p in layers]
    assert [x["name"] for x in lines] == [p.name for p in layers]
    assert [x["name"] for x in lines] == backing_chain(layers[0], force_share=True)
    roles = ["active"] + ["backing"] * (len(layers) - 2) + ["base"]
    assert [x["role"] for x in lines] == roles
    assert [x["format"] for x in lines] == [im.image_format(str(p)) for p in layers]
    sizes = {int(x["virtual-size"]) for x in lines[:1]}
    assert sizes == {len(source.content[chain])}
    for x, p in zip(lines, layers, strict=True):
        assert int(x["allocated"]) == os.stat(p).st_blocks * 512


def test_files_are_untouched_by_reading(mount: Mount, source: Source) -> None:
    before = im.file_digests(str(p) for layers in source.layers.values() for p in layers)
    for chain in CHAINS:
        read_direct(mount.img(chain), 0, 1 << 20)
    after = im.file_digests(str(p) for layers in source.layers.values() for p in layers)
    assert after == before


def test_a_server_that_dies_is_reported_at_once(tmp_path: Path, mounter: Mounter) -> None:
    """The fixtures' own failure path: wait_for_mount fails as soon as the server exits,
    with its log, instead of waiting for the deadline."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "E.qcow2").write_bytes(b"QFI\xfb" + bytes(100))  # broken header
    with pytest.raises(AssertionError, match="exited with status 1 before mounting") as exc:
        mounter(tmp_path / "missing")
    assert "neither a directory nor a TOML file" in str(exc.value)
    # a chain that cannot be opened does not stop the mount
    m = mounter(tmp_path / "empty")
    assert [e["status"] for e in m.status()[1:]] == ["refused"]
    m.unmount()


def test_the_servers_last_lines_outlive_their_log(tmp_path: Path, seeds: Seeds) -> None:
    """A passed test's ``tmp_path`` goes when it ends (``tmp_path_retention_policy``), its
    servers' logs with it, before ``checklogs`` reads what they logged in the test's
    teardown: tearing the mounts down reads it first."""
    seeds(tmp_path / "images", size=4 * MiB)
    mounter = Mounter(tmp_path / "mounts")
    (tmp_path / "mounts").mkdir()
    m = mounter(tmp_path / "images")
    _server_lines()  # (what checklogs read during the test)
    with pytest.raises(OSError):  # a line logged after that: a refusal
        m.command("E", "stream", "foo=bar")
    mounter.close()  # the fixture's teardown
    shutil.rmtree(tmp_path / "mounts")  # then pytest's, of a passed test
    lines = _server_lines()  # then checklogs'
    warned = [x for x in lines if " WARNING " in x or " ERROR " in x]
    assert len(warned) == 1 and "chainfs.fs: chain=E command refused: " in warned[0], lines
