"""Images chainfs must refuse, and chains it cannot assemble.

Each refusal is an ``UnsupportedFeature`` (or ``ChainError``) whose message names the
feature and the file; a refusal never touches the refused files, never leaves a lock
behind, and never disturbs another, good chain.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.errors import ChainError, UnsupportedFeature

from . import images as im
from .images import KiB, MiB

SIZE = MiB


def encrypted(path: str) -> None:
    """LUKS (crypt_method 2), made by qemu-img where it can time its key derivation.

    On some machines QEMU's PBKDF timing fails ("Unable to get accurate CPU usage")
    whatever the iter-time; the image is then a plain one with crypt_method 2 patched in,
    which is what chainfs looks at to refuse it.
    """
    for _ in range(3):
        proc = subprocess.run(
            [
                im.QEMU_IMG, "create", "-q", "-f", "qcow2",
                "--object", "secret,id=sec0,data=abc",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                path, str(SIZE),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            return
        assert "accurate CPU usage" in proc.stderr, proc.stderr
        if os.path.exists(path):
            os.unlink(path)
    im.create(path, SIZE)
    im.patch(path, 32, (2).to_bytes(4, "big"))


def aes_encrypted(path: str) -> None:
    """Legacy AES (crypt_method 1): qemu-img no longer makes these; patch the header."""
    im.create(path, SIZE)
    im.patch(path, 32, (1).to_bytes(4, "big"))


def external_data_file(path: str) -> None:
    im.create(path, SIZE, options=[f"data_file={path}.data"])
    im.write(path, [(0, 4096, 0x11)])


def extended_l2(path: str) -> None:
    im.create(path, SIZE, options=["extended_l2=on"])
    im.write(path, [(0, 4096, 0x11)])


def unknown_incompatible_bit(bit: int) -> Callable[[str], None]:
    def make(path: str) -> None:
        im.create(path, SIZE)
        im.write(path, [(0, 4096, 0x11)])
        im.set_incompatible_features(path, im.incompatible_features(path) | 1 << bit)

    return make


def corrupt_bit(path: str) -> None:
    im.create(path, SIZE)
    im.write(path, [(0, 4096, 0x11)])
    im.set_incompatible_features(path, im.incompatible_features(path) | im.INCOMPAT_CORRUPT)


# builder, words of which the message must contain at least one (lower-case)
ALWAYS_REFUSED: dict[str, tuple[Callable[[str], None], tuple[str, ...]]] = {
    "luks": (encrypted, ("encrypt",)),
    "aes": (aes_encrypted, ("encrypt",)),
    "data-file": (external_data_file, ("data file", "data_file", "data-file", "external")),
    "extended-l2": (extended_l2, ("extended",)),
    "unknown-bit-5": (unknown_incompatible_bit(5), ("incompatible", "unknown")),
    "unknown-bit-63": (unknown_incompatible_bit(63), ("incompatible", "unknown")),
}


def assert_names(
    err: pytest.ExceptionInfo[BaseException], words: tuple[str, ...], path: str
) -> None:
    msg = str(err.value)
    assert any(w in msg.lower() for w in words), f"{msg!r} names none of {words}"
    assert os.path.basename(path) in msg, f"{msg!r} does not name {path}"


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("feature", list(ALWAYS_REFUSED))
def test_refused_as_active_layer(tmp_path: Path, feature: str, writable: bool) -> None:
    build, words = ALWAYS_REFUSED[feature]
    path = str(tmp_path / f"{feature}.qcow2")
    build(path)
    files = [str(p) for p in tmp_path.iterdir()]
    before = im.file_digests(files)
    with pytest.raises(UnsupportedFeature) as err:
        Chain.open(path, writable=writable)
    assert_names(err, words, path)
    assert im.file_digests(files) == before


@pytest.mark.parametrize("feature", list(ALWAYS_REFUSED))
def test_refused_as_backing_layer(tmp_path: Path, feature: str) -> None:
    build, words = ALWAYS_REFUSED[feature]
    bad = str(tmp_path / f"{feature}.qcow2")
    build(bad)
    top = im.create(
        str(tmp_path / "top.qcow2"), SIZE, backing=os.path.basename(bad), unsafe=True,
        cwd=str(tmp_path),
    )  # fmt: skip
    before = im.file_digests([top, bad])
    for writable in (False, True):
        with pytest.raises(UnsupportedFeature) as err:
            Chain.open(top, writable=writable)
        assert_names(err, words, bad)
    assert im.file_digests([top, bad]) == before


def test_corrupt_bit_refused_for_writing(tmp_path: Path) -> None:
    path = str(tmp_path / "corrupt.qcow2")
    corrupt_bit(path)
    before = im.file_digests([path])
    with pytest.raises(UnsupportedFeature) as err:
        Chain.open(path, writable=True)
    assert_names(err, ("corrupt",), path)
    assert im.file_digests([path]) == before
    # QEMU still reads a corrupt-flagged image; chainfs may read it or refuse it, but if it
    # reads it, it must read it right
    try:
        chain = Chain.open(path)
    except UnsupportedFeature as e:
        assert "corrupt" in str(e).lower()
    else:
        with chain:
            assert chain.read(0, chain.size) == im.reference(path)
    assert im.file_digests([path]) == before


def with_snapshot(path: str) -> im.Model:
    im.create(path, 2 * MiB, cluster_size=4 * KiB)
    first: list[im.Write] = [(0, 100 * KiB, 0x11), (MiB + 3, 5000, 0x12)]
    im.write(path, first)
    im.run([im.QEMU_IMG, "snapshot", "-c", "s1", path])
    # written after the snapshot: these clusters' old copies are shared with s1
    later: list[im.Write] = [(50 * KiB, 100 * KiB, 0x21)]
    im.write(path, later)
    model = im.Model(2 * MiB)
    model.apply(first + later)
    assert im.info(path).get("snapshots")
    return model


def test_internal_snapshots_refused_for_writing_but_readable(tmp_path: Path) -> None:
    path = str(tmp_path / "snap.qcow2")
    model = with_snapshot(path)
    before = im.file_digests([path])
    with pytest.raises(UnsupportedFeature) as err:
        Chain.open(path, writable=True)
    assert_names(err, ("snapshot",), path)
    assert im.file_digests([path]) == before
    with Chain.open(path) as chain:
        assert chain.read(0, chain.size) == bytes(model) == im.reference(path)
    assert im.file_digests([path]) == before
    im.assert_clean(path)


def test_backing_file_with_internal_snapshots_is_fine_for_writing_above(tmp_path: Path) -> None:
    """Only the active layer is written; a backing file's snapshots are never touched."""
    base = str(tmp_path / "snap.qcow2")
    model = with_snapshot(base)
    top = im.create(str(tmp_path / "top.qcow2"), backing="snap.qcow2", cwd=str(tmp_path))
    before = im.file_digests([base])
    with Chain.open(top, writable=True) as chain:
        chain.write(60 * KiB + 1, b"\x42" * 10000)
    model.put(60 * KiB + 1, b"\x42" * 10000)
    assert im.file_digests([base]) == before
    im.assert_chain_clean([base, top])
    assert im.reference(top) == bytes(model)


# ---- chains that cannot be assembled ----


def test_missing_backing_file(tmp_path: Path) -> None:
    top = im.create(
        str(tmp_path / "top.qcow2"), SIZE, backing="gone.qcow2", unsafe=True, cwd=str(tmp_path)
    )
    for writable in (False, True):
        with pytest.raises(ChainError) as err:
            Chain.open(top, writable=writable)
        assert "gone.qcow2" in str(err.value)


def test_missing_backing_file_deeper_down(tmp_path: Path) -> None:
    base = im.create(str(tmp_path / "base.qcow2"), SIZE)
    (tmp_path / "sub").mkdir()
    im.create(str(tmp_path / "sub/mid.qcow2"), backing="base.qcow2", backing_fmt="qcow2",
              unsafe=True, cwd=str(tmp_path / "sub"), size=SIZE)  # fmt: skip
    top = im.create(
        str(tmp_path / "top.qcow2"), SIZE, backing="sub/mid.qcow2", unsafe=True,
        cwd=str(tmp_path),
    )  # fmt: skip
    assert os.path.exists(base)  # present beside top, but mid's string means sub/base.qcow2
    with pytest.raises(ChainError) as err:
        Chain.open(top)
    assert "base.qcow2" in str(err.value)


def test_active_image_missing(tmp_path: Path) -> None:
    with pytest.raises(ChainError) as err:
        Chain.open(str(tmp_path / "nothing.qcow2"))
    assert "nothing.qcow2" in str(err.value)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_backing_loop(tmp_path: Path, length: int) -> None:
    names = [f"loop{i}.qcow2" for i in range(length)]
    for i, name in enumerate(names):
        # each image backs onto the next, the last onto the first
        im.create(str(tmp_path / name), SIZE, backing=names[(i + 1) % length], unsafe=True,
                  cwd=str(tmp_path))  # fmt: skip
    for writable in (False, True):
        with pytest.raises(ChainError) as err:
            Chain.open(str(tmp_path / names[0]), writable=writable)
        assert any(n in str(err.value) for n in names), str(err.value)


def test_loop_through_a_different_spelling(tmp_path: Path) -> None:
    """b backs onto "./sub/../a.qcow2", which is a.qcow2 again."""
    (tmp_path / "sub").mkdir()
    im.create(str(tmp_path / "a.qcow2"), SIZE, backing="b.qcow2", unsafe=True, cwd=str(tmp_path))
    im.create(str(tmp_path / "b.qcow2"), SIZE, backing="./sub/../a.qcow2", unsafe=True,
              cwd=str(tmp_path))  # fmt: skip
    with pytest.raises(ChainError) as err:
        Chain.open(str(tmp_path / "a.qcow2"))
    assert "a.qcow2" in str(err.value) or "b.qcow2" in str(err.value)


def deep_chain(d: Path, layers: int) -> str:
    """``layers`` tiny qcow2 files L0000 <- L0001 <- ...; returns the active one.

    Made by copying one template and patching its fixed-length backing name, since a
    thousand qemu-img runs would take too long."""
    width = 5
    first = d / f"L{0:0{width}d}.qcow2"
    im.create(str(first), 64 * KiB, cluster_size=512)
    im.write(str(first), [(0, 512, 0x11)])
    template = d / "template.qcow2"
    placeholder = f"L{0:0{width}d}.qcow2"
    im.create(str(template), 64 * KiB, cluster_size=512, backing=placeholder, cwd=str(d))
    data = template.read_bytes()
    off = int.from_bytes(data[8:16], "big")
    assert data[off : off + len(placeholder)] == placeholder.encode()
    for i in range(1, layers):
        name = f"L{i - 1:0{width}d}.qcow2".encode()
        patched = data[:off] + name + data[off + len(name) :]
        (d / f"L{i:0{width}d}.qcow2").write_bytes(patched)
    template.unlink()
    return str(d / f"L{layers - 1:0{width}d}.qcow2")


def test_chain_deeper_than_1000_is_refused(tmp_path: Path) -> None:
    top = deep_chain(tmp_path, 1001)
    with pytest.raises(ChainError) as err:
        Chain.open(top)
    names = {p.name for p in tmp_path.iterdir()}
    assert any(n in str(err.value) for n in names), str(err.value)


def test_a_mount_opens_a_chain_deeper_than_1000_read_only(tmp_path: Path) -> None:
    """As a mount opens chains (``deep_read_only``): asked for writing, the chain is
    opened read-only, its active layer never opened for writing (no byte of it changes)."""
    top = deep_chain(tmp_path, 1001)
    before = Path(top).read_bytes()
    with Chain.open(top, writable=True, deep_read_only=True) as chain:
        assert chain.too_deep and not chain.writable and len(chain.layers) == 1001
        assert not chain.active.writable
        assert chain.read(0, 513) == b"\x11" * 512 + b"\x00"
    assert Path(top).read_bytes() == before


@pytest.mark.slow
def test_chain_of_exactly_1000_is_accepted(tmp_path: Path) -> None:
    top = deep_chain(tmp_path, 1000)
    assert im.reference(top)[:513] == b"\x11" * 512 + b"\x00"
    with Chain.open(top) as chain:
        assert len(chain.layers) == 1000
        assert chain.read(0, 513) == b"\x11" * 512 + b"\x00"


# ---- refusals stay local ----


def test_a_refused_chain_does_not_disturb_a_good_one(tmp_path: Path) -> None:
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    paths, model = im.build_chain(
        str(good_dir),
        [
            {"name": "base.qcow2", "writes": im.varied_writes(2 * MiB, 64 * KiB, 0x11)},
            {"name": "top.qcow2", "writes": im.varied_writes(2 * MiB, 64 * KiB, 0x22, salt=1)},
        ],
        size=2 * MiB,
    )
    # a bad chain that shares the good chain's base: refused only because of its own top
    bad_top = str(bad_dir / "top.qcow2")
    im.create(bad_top, backing="../good/base.qcow2", cwd=str(bad_dir))
    im.set_incompatible_features(bad_top, 1 << 9)
    encrypted(str(bad_dir / "enc.qcow2"))

    with Chain.open(paths[-1], writable=True) as good:
        for bad in (bad_top, str(bad_dir / "enc.qcow2")):
            for writable in (False, True):
                with pytest.raises(UnsupportedFeature):
                    Chain.open(bad, writable=writable)
        assert good.read(0, good.size) == bytes(model)
        good.write(12345, b"still fine")
        model.put(12345, b"still fine")
    im.assert_chain_clean(paths)
    im.assert_same_as(paths[-1], bytes(model), str(tmp_path))


def test_a_refused_open_leaves_no_locks_behind(tmp_path: Path) -> None:
    """chainfs refuses the chain at its base after opening the layers above it; those
    must not stay locked: QEMU can then write every file of the chain."""
    base = im.create(str(tmp_path / "base.qcow2"), SIZE)
    mid = im.create(str(tmp_path / "mid.qcow2"), backing="base.qcow2", cwd=str(tmp_path))
    top = im.create(str(tmp_path / "top.qcow2"), backing="mid.qcow2", cwd=str(tmp_path))
    im.set_incompatible_features(base, 1 << 7)
    with pytest.raises(UnsupportedFeature):
        Chain.open(top, writable=True)
    im.set_incompatible_features(base, 0)
    # qemu-io takes QEMU's write lock on the file it opens and keeps writers out of the
    # files below: any lock chainfs left behind fails these
    for path in (top, mid, base):
        im.write(path, [(0, 512, 0x01)])
    im.assert_chain_clean([base, mid, top])
