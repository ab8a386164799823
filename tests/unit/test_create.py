"""Creating an image under a temporary name and renaming it into place (no QEMU).

What a crash at every step leaves is proved in ``tests/interop/test_crash.py``; here:
the image is locked from its creation on and stays locked on the descriptor handed to
the caller, an existing file is never replaced (not even one that appears while the
image is written), no temporary file outlives a failed creation, the fallback for file
systems without ``renameat2`` works, and the next mount's clean-up removes only
chainfs's own unfinished files that nobody holds locked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chainfs import hostfile
from chainfs import source as sources
from chainfs.errors import ChainfsError
from chainfs.formats import open_layer
from chainfs.formats.qcow2 import (
    create_image,
    create_overlay,
    remove_unfinished,
    unfinished,
)
from chainfs.hostfile import HostFile, is_temporary, temporary_name
from chainfs.jobs import recovery
from chainfs.locks import holders, lock_image

MiB = 1 << 20
WRITER_BYTES = {100, 101, 103, 201, 203}


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_the_image_is_locked_before_its_first_byte_and_stays_locked(tmp_path: Path) -> None:
    target = tmp_path / "new.qcow2"
    seen: list[tuple[str, set[int]]] = []

    def observe(event: str, path: str, offset: int, data: bytes) -> None:
        if event == "write":  # what another process would see of the file being written
            fd = os.open(path, os.O_RDONLY)
            try:
                seen.append((os.path.basename(path), holders(fd)))
            finally:
                os.close(fd)

    saved = HostFile.observer
    HostFile.observer = observe
    try:
        f = create_image(str(target), size=MiB, backing=None, backing_format=None)
    finally:
        HostFile.observer = saved
    try:
        assert seen and all(is_temporary(n) and held == WRITER_BYTES for n, held in seen), seen
        assert f.path == str(target) and names(tmp_path) == ["new.qcow2"]
        fd = os.open(target, os.O_RDWR)
        try:
            assert holders(fd) == WRITER_BYTES  # the final name's open file holds them
            with pytest.raises(ChainfsError, match="Failed to get"):
                lock_image(fd, str(target), write=True)
        finally:
            os.close(fd)
        layer = open_layer(str(target), "qcow2", writable=False)
        layer.close()
    finally:
        f.close()


def test_an_existing_file_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "vm.qcow2"
    target.write_bytes(b"my own file\n")
    with pytest.raises(ChainfsError, match="already exists"):
        create_overlay(str(target), size=MiB, backing=None, backing_format=None)
    assert target.read_bytes() == b"my own file\n"
    assert names(tmp_path) == ["vm.qcow2"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-unlink"])
def test_a_file_that_appears_meanwhile_is_never_replaced(
    tmp_path: Path, renameat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone creates the target while chainfs writes its image: the rename refuses
    to replace it, and chainfs's temporary file goes."""
    if not renameat2:
        monkeypatch.setattr(hostfile, "_renameat2_fn", None)
    target = tmp_path / "vm.qcow2"

    def race(event: str, path: str, offset: int, data: bytes) -> None:
        if event == "rename":
            target.write_bytes(b"theirs\n")

    monkeypatch.setattr(HostFile, "observer", race)
    with pytest.raises(ChainfsError, match="already exists"):
        create_overlay(str(target), size=MiB, backing=None, backing_format=None)
    assert target.read_bytes() == b"theirs\n"
    assert names(tmp_path) == ["vm.qcow2"]


def test_without_renameat2_the_image_gets_its_name_by_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostfile, "_renameat2_fn", None)
    target = tmp_path / "vm.qcow2"
    create_overlay(str(target), size=MiB, backing="base.raw", backing_format="raw")
    assert names(tmp_path) == ["vm.qcow2"]
    assert os.stat(target).st_nlink == 1
    layer = open_layer(str(target), "qcow2", writable=False)
    try:
        assert layer.backing_string == "base.raw"
    finally:
        layer.close()


def test_a_failed_creation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(event: str, path: str, offset: int, data: bytes) -> None:
        if event == "flush":
            raise OSError(28, os.strerror(28))

    monkeypatch.setattr(HostFile, "observer", fail)
    with pytest.raises(ChainfsError, match="No space left"):
        create_overlay(str(tmp_path / "vm.qcow2"), size=MiB, backing=None, backing_format=None)
    assert names(tmp_path) == []


def test_temporary_names_fit_and_are_recognised(tmp_path: Path) -> None:
    long = "x" * 243 + ".qcow2"  # 249 bytes: the temporary name is cut short
    name = os.path.basename(temporary_name(str(tmp_path / long)))
    assert len(os.fsencode(name)) <= 255 and name.startswith(".chainfs-new-")
    assert is_temporary(name)
    assert temporary_name(str(tmp_path / "a")) != temporary_name(str(tmp_path / "a"))
    for other in (".chainfs-new-x", ".chainfs.json", ".chainfs-new-0123abcd", "a.qcow2"):
        assert not is_temporary(other), other
    create_overlay(str(tmp_path / long), size=MiB, backing=None, backing_format=None)
    assert names(tmp_path) == [long]


def test_the_clean_up_removes_only_unlocked_files_of_our_own(tmp_path: Path) -> None:
    stray = tmp_path / ".chainfs-new-0123abcd-vm.qcow2"
    busy = tmp_path / ".chainfs-new-89abcdef-vm2.qcow2"
    for p in (stray, busy):  # complete images, as a crash right before the rename leaves
        create_overlay(str(tmp_path / "x"), size=MiB, backing=None, backing_format=None)
        os.rename(tmp_path / "x", p)
    mine = [".chainfs-new-zz-vm.qcow2", ".notes", "vm.qcow2", ".chainfs.json"]
    for n in mine:
        (tmp_path / n).write_bytes(b'{"version": 1}' if n.endswith(".json") else b"keep")
    (tmp_path / ".chainfs-new-01234567-dir").mkdir()
    assert sources.load(str(tmp_path)).chains == []  # the scan never serves them
    assert unfinished(str(tmp_path)) == [str(stray), str(busy)]
    holder = os.open(busy, os.O_RDWR)  # a creation under way elsewhere
    try:
        lock_image(holder, str(busy), write=True)
        assert remove_unfinished(str(tmp_path)) == [str(stray)]
    finally:
        os.close(holder)
    assert names(tmp_path) == sorted([*mine, busy.name, ".chainfs-new-01234567-dir"])
    assert remove_unfinished(str(tmp_path)) == [str(busy)]


@pytest.mark.parametrize("readonly", [False, True], ids=["read-write", "read-only"])
def test_a_mount_clears_what_a_crash_left_of_a_creation(tmp_path: Path, readonly: bool) -> None:
    """At mount, with no job pending: the temporary file goes (a read-only mount only
    names it), the images stay, and the scan serves only the real chain."""
    create_overlay(str(tmp_path / "vm.qcow2"), size=MiB, backing=None, backing_format=None)
    stray = tmp_path / ".chainfs-new-0123abcd-vm-snap.qcow2"
    create_overlay(str(tmp_path / "x"), size=MiB, backing="vm.qcow2", backing_format="qcow2")
    os.rename(tmp_path / "x", stray)
    src, _ = recovery.recover(str(tmp_path), readonly=readonly)
    assert [os.path.basename(c.active) for c in src.chains] == ["vm.qcow2"]
    assert stray.exists() == readonly
    assert "vm.qcow2" in names(tmp_path)
