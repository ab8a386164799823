"""The depth cap (1000 layers, ``chain.MAX_DEPTH``), on real chains that deep.

A snapshot on a chain at the cap is refused up front (EINVAL, the cap named): nothing is
created, the chain is unchanged and still served read-write after a remount (it used to
be accepted, and the next mount dropped the chain as "deeper than 1000 layers").  A chain
found deeper than the cap is served read-only with a warning in ``status`` and the log:
its flat file reads right and refuses writes (EROFS), and so do its commands.

The chains are built in well under a second: ``qemu-img create -b`` in a loop takes
minutes at this depth (each call opens the chain below), so one overlay made by qemu-img
is copied with its backing string swapped for one of the same length.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from interop import images as im

from chainfs.chain import MAX_DEPTH

from .conftest import CHAINFS, Mount, Mounter, expect_refusals, run

PATTERN = b"\x5a" * 65536  # written into the base: read through every layer

pytestmark = [
    expect_refusals,
    pytest.mark.expect_log(
        r"WARNING chainfs\.mount: chain=deep served read-only: 1001 layers, deeper than "
        r"the cap of 1000"
    ),
]


def build(directory: Path, prefix: str, layers: int) -> list[Path]:
    """``PREFIX0000.qcow2 <- ... <- PREFIX{layers-1}.qcow2``, base first."""
    base = directory / f"{prefix}0000.qcow2"
    im.create(str(base), im.MiB)
    im.qemu_io(str(base), ["write -P 0x5a 0 64k"])
    template = directory / ".template.qcow2"
    im.create(
        str(template),
        im.MiB,
        cluster_size=4096,
        backing=base.name,
        backing_fmt="qcow2",
        cwd=str(directory),
    )
    data = template.read_bytes()
    template.unlink()
    first = base.name.encode()
    assert data.count(first) == 1
    paths = [base]
    for i in range(1, layers):
        below = f"{prefix}{i - 1:04d}.qcow2".encode()
        path = directory / f"{prefix}{i:04d}.qcow2"
        path.write_bytes(data.replace(first, below))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """Chain ``atcap`` of exactly 1000 layers and chain ``deep`` of 1001."""
    src = tmp_path_factory.mktemp("depth")
    atcap = build(src, "atcap", MAX_DEPTH)
    deep = build(src, "deep", MAX_DEPTH + 1)
    # the chains are named after their tops: rename the tops to plain names
    os.rename(atcap[-1], src / "atcap.qcow2")
    atcap[-1] = src / "atcap.qcow2"
    os.rename(deep[-1], src / "deep.qcow2")
    deep[-1] = src / "deep.qcow2"
    return src, atcap, deep


def check_alone(path: Path) -> None:
    """``qemu-img check`` of one layer without its backing chain (which qemu-img would
    open too: about 10 s at this depth), and no dirty bit left."""
    spec = json.dumps(
        {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    )
    run("qemu-img", "check", "-q", f"json:{spec}")
    assert not im.incompatible_features(str(path)) & im.INCOMPAT_DIRTY


def images(src: Path) -> list[str]:
    """The files of the source but chainfs's state and events (``.chainfs-new-*``, an
    overlay being made, stays in)."""
    return sorted(n for n in os.listdir(src) if not n.startswith(".chainfs."))


def served(m: Mount) -> dict[str, dict[str, str]]:
    return {x["chain"]: x for x in m.status()[1:] if x["status"] == "served"}


def test_a_snapshot_at_the_cap_is_refused_and_the_chain_stays_served(
    source: tuple[Path, list[Path], list[Path]], mounter: Mounter
) -> None:
    src, atcap, _ = source
    m = mounter(src)
    assert "warning" not in served(m)["atcap"]
    assert len(m.layers("atcap")) == MAX_DEPTH
    before = images(src)
    with pytest.raises(OSError) as exc:
        m.command("atcap", "snapshot", "over.qcow2")
    assert exc.value.errno == errno.EINVAL
    reason = [e for e in m.events("atcap") if e["event"] == "COMMAND_REJECTED"][-1]["reason"]
    assert reason == (
        "chain 'atcap' has 1000 layers: a snapshot would pass the cap of 1000 layers "
        "(stream or commit first)"
    )
    assert images(src) == before  # nothing created, not even a temporary file
    assert len(m.layers("atcap")) == MAX_DEPTH
    # the chain reads through all its layers, and takes writes
    with open(m.img("atcap"), "r+b") as f:
        assert f.read(65536) == PATTERN
        f.seek(1 << 19)
        f.write(b"w" * 4096)
    m.unmount()
    check_alone(atcap[-1])
    m = mounter(src)  # still served, read-write, after a remount
    assert "warning" not in served(m)["atcap"]
    assert len(m.layers("atcap")) == MAX_DEPTH
    with open(m.img("atcap"), "rb") as f:
        assert f.read(65536) == PATTERN
        f.seek(1 << 19)
        assert f.read(4096) == b"w" * 4096
    m.unmount()


def test_a_chain_deeper_than_the_cap_is_served_read_only(
    source: tuple[Path, list[Path], list[Path]], mounter: Mounter
) -> None:
    src, _, deep = source
    before = {p: p.stat().st_mtime_ns for p in deep[-2:]}
    m = mounter(src)
    line = served(m)["deep"]
    assert line["warning"] == (
        "served read-only: 1001 layers, deeper than the cap of 1000; stream or commit it "
        "with qemu-img to serve it read-write"
    )
    assert len(m.layers("deep")) == MAX_DEPTH + 1
    flat = m.img("deep")
    assert flat.stat().st_mode & 0o777 == 0o400
    with open(flat, "rb") as f:
        assert f.read(65536) == PATTERN
    with pytest.raises(OSError) as exc:
        os.open(flat, os.O_WRONLY)
    assert exc.value.errno == errno.EROFS
    for kind, text in (("snapshot", "x.qcow2"), ("stream", "speed=0"), ("commit", "speed=0")):
        with pytest.raises(OSError) as exc:
            m.command("deep", kind, text)
        assert exc.value.errno == errno.EROFS, kind
    reason = [e for e in m.events("deep") if e["event"] == "COMMAND_REJECTED"][-1]["reason"]
    assert reason.startswith("chain 'deep' is served read-only: 1001 layers")
    # chainfs status shows it with its warning
    proc = run(*CHAINFS, "status", m.mountpoint)
    assert "    warning: served read-only: 1001 layers" in proc.stdout
    # and the chain at the cap beside it is served read-write
    assert "warning" not in served(m)["atcap"]
    m.unmount()
    assert {p: p.stat().st_mtime_ns for p in deep[-2:]} == before  # nothing written
    check_alone(deep[-1])
