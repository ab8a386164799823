"""A job's new file lands, and a rollback removes one, only in an allowed directory, as
the kernel finds it when the file is made, not as it was when the command was checked.

``check_target`` judges a snapshot's, copy's or backup's new file by the real path of
its directory when the command arrives; the file is made later (a copy: when its job
starts).  A directory on the path swapped for a symlink to elsewhere in between must
not make chainfs create the file there: ``create_image`` checks the new file's
descriptor (``vet_new_file``) and removes a file that lies outside.  A backup's
rollback removes its DEST relative to a descriptor of the directory it checked
(``remove_inside``).  chainfs's own files, in ``.chainfs``, are never opened through
a symlink, and a chain's name never makes a path out of there.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from chainfs.control import CommandError
from chainfs.formats.qcow2 import create_image
from chainfs.hostfile import open_meta
from chainfs.jobs.served import Served, check_target, remove_inside, vet_new_file
from chainfs.ownership import chain_file
from chainfs.source import usable_name

MiB = 1 << 20


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("images", "images/sub", "outside"):
        (tmp_path / d).mkdir()
    (tmp_path / "outside" / "keep.qcow2").write_bytes(b"not chainfs's to remove\n")
    return tmp_path


def served_in(directory: Path) -> Served:
    return cast(Served, SimpleNamespace(allowed_dirs=[os.path.realpath(directory)], chain=None))


def swap_for_symlink(directory: Path, to: Path) -> None:
    """Replace the directory ``directory`` with a symlink to ``to`` (one rename)."""
    directory.rename(directory.with_name("was-" + directory.name))
    tmp = directory.with_name(".new-link")
    tmp.symlink_to(to)
    tmp.rename(directory)


def test_a_directory_swapped_for_a_symlink_after_the_check_gets_no_new_file(
    tree: Path,
) -> None:
    served = served_in(tree / "images")
    target = check_target(served, str(tree / "images" / "sub" / "new.qcow2"))
    swap_for_symlink(tree / "images" / "sub", tree / "outside")
    with pytest.raises(CommandError, match=r"outside the directories .* resolves to") as e:
        create_image(
            target, size=MiB, backing=None, backing_format=None, vet=vet_new_file(served, target)
        )
    assert e.value.errno == errno.EACCES
    assert sorted(os.listdir(tree / "outside")) == ["keep.qcow2"]


def test_a_new_file_in_an_allowed_directory_is_made(tree: Path) -> None:
    served = served_in(tree / "images")
    target = check_target(served, str(tree / "images" / "sub" / "new.qcow2"))
    create_image(
        target, size=MiB, backing=None, backing_format=None, vet=vet_new_file(served, target)
    ).close()
    assert os.path.isfile(target)


def test_a_removal_through_a_symlinked_directory_is_refused(tree: Path) -> None:
    served = served_in(tree / "images")
    (tree / "images" / "link").symlink_to(tree / "outside")
    with pytest.raises(CommandError, match="outside the directories") as e:
        remove_inside(served, str(tree / "images" / "link" / "keep.qcow2"))
    assert e.value.errno == errno.EACCES
    assert (tree / "outside" / "keep.qcow2").exists()
    (tree / "images" / "mine.qcow2").write_bytes(b"")
    remove_inside(served, str(tree / "images" / "mine.qcow2"))
    assert not (tree / "images" / "mine.qcow2").exists()


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", "/etc/passwd", "..", "x\0y"])
def test_a_chain_name_that_is_a_path_names_a_file_in_the_metadata_directory(
    tmp_path: Path, name: str
) -> None:
    """A chain's files in ``.chainfs`` never lie elsewhere, whatever its name (a forged
    state record's or a legacy journal's); such a name is no usable chain name."""
    path = chain_file(str(tmp_path), name, ".journal")
    assert os.path.dirname(path) == str(tmp_path / ".chainfs")
    assert not usable_name(name)


def test_chainfs_files_are_never_opened_through_a_symlink(tmp_path: Path) -> None:
    own = tmp_path / ".chainfs"
    own.mkdir()
    (tmp_path / "victim").write_bytes(b"keep\n")
    (own / "vm1.journal").symlink_to(tmp_path / "victim")
    with pytest.raises(OSError) as e:
        open_meta(str(own / "vm1.journal"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    assert e.value.errno == errno.ELOOP and "never follows" in str(e.value)
    (own / "vm1.journal").unlink()
    own.rmdir()
    (tmp_path / ".chainfs").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OSError) as e:
        open_meta(str(own / "vm1.journal"), os.O_RDWR | os.O_CREAT)
    assert e.value.errno == errno.ELOOP
    assert not os.listdir(tmp_path / "elsewhere")
    assert (tmp_path / "victim").read_bytes() == b"keep\n"
