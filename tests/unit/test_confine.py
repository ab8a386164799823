"""The backing-file rule (``chainfs.confine``): a mount opens a chain's layers only when
their real paths lie inside the directories it was given.

Chains are made by chainfs itself (qcow2 overlays over a raw file standing for a secret
host file such as ``/etc/shadow``) in a tree with a source directory ``images``, a
directory ``outside`` holding the secret, and a sibling ``images2`` whose name starts
like the source directory's.  Each way out — an absolute path, ``..``, a symlinked
file, a symlinked directory, ``..`` after a symlink, the prefix sibling, a qcow2 layer
in the middle, the active layer itself — is refused with ``OutsideError`` naming the
backing string, the file it resolves to and the option that allows it; the options
widen the rule, a symlinked source directory still works, and a symlink swapped
between the check and the open is caught by the check of the open descriptor.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from chainfs.chain import Chain
from chainfs.confine import Confinement, OutsideError, inside
from chainfs.formats.qcow2 import create_overlay
from chainfs.mount import parse_options

MiB = 1 << 20
SECRET = b"shadow:$6$not-for-guests\n" * 1000


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("images", "images2", "outside", "outside/d"):
        (tmp_path / d).mkdir()
    (tmp_path / "outside" / "secret.raw").write_bytes(SECRET)
    (tmp_path / "images2" / "secret.raw").write_bytes(SECRET)
    (tmp_path / "images" / "base.raw").write_bytes(b"\x11" * MiB)
    # a decoy where textual ``..`` resolution would land
    (tmp_path / "images" / "secret.raw").write_bytes(b"\x22" * MiB)
    return tmp_path


def overlay(path: Path, backing: str | None, fmt: str | None = "raw") -> Path:
    create_overlay(str(path), size=MiB, backing=backing, backing_format=fmt if backing else None)
    return path


def confined_to(*paths: Path) -> Confinement:
    return Confinement.of(str(p) for p in paths)


def test_inside_is_a_path_prefix_test() -> None:
    assert inside("/srv/img", "/srv/img")
    assert inside("/srv/img/a.qcow2", "/srv/img")
    assert inside("/srv/img/sub/a.qcow2", "/srv/img")
    assert not inside("/srv/img2", "/srv/img")
    assert not inside("/srv/img2/a.qcow2", "/srv/img")
    assert not inside("/srv", "/srv/img")
    assert inside("/etc/shadow", "/")
    assert inside("/srv/img/a.raw", "/srv/img/a.raw")  # allow_backing of one file
    assert not inside("/srv/img/a.raw2", "/srv/img/a.raw")


# (how the backing string leaves ``images``, the string, links to make in ``images``)
ESCAPES = [
    ("absolute", "{root}/outside/secret.raw", {}),
    ("dotdot", "../outside/secret.raw", {}),
    ("symlinked file", "link.raw", {"link.raw": "{root}/outside/secret.raw"}),
    ("symlinked directory", "sub/secret.raw", {"sub": "{root}/outside"}),
    ("dotdot after a symlink", "d/../../outside/secret.raw", {"d": "{root}/outside/d"}),
    ("relative symlink", "rel.raw", {"rel.raw": "../outside/secret.raw"}),
    ("prefix sibling", "../images2/secret.raw", {}),
]


@pytest.mark.parametrize(("how", "string", "links"), ESCAPES, ids=[e[0] for e in ESCAPES])
def test_a_raw_base_outside_is_refused(
    tree: Path, how: str, string: str, links: dict[str, str]
) -> None:
    images = tree / "images"
    for name, target in links.items():
        (images / name).symlink_to(target.format(root=tree))
    string = string.format(root=tree)
    top = overlay(images / "top.qcow2", string)
    real = os.path.realpath(os.path.abspath(images / string))
    assert not real.startswith(str(images) + "/")
    with pytest.raises(OutsideError) as info:
        Chain.open(str(top), confine=confined_to(images))
    message = str(info.value)
    assert f"backing file {string!r} of {str(top)!r}" in message
    assert repr(real) in message
    assert f"-o allow_backing={os.path.dirname(real)} allows it" in message
    assert info.value.errno == 13  # EACCES
    # the same chain opens without a confinement (info, check), and with the option
    with Chain.open(str(top)) as chain:
        assert chain.read(0, 16) == SECRET[:16]
    with Chain.open(str(top), confine=confined_to(images, Path(real).parent)) as chain:
        assert chain.read(0, 16) == SECRET[:16]


def test_a_missing_file_outside_is_refused_as_outside(tree: Path) -> None:
    """The refusal does not tell whether a file outside exists."""
    images = tree / "images"
    for name in ("secret.raw", "nothing.raw"):
        top = overlay(images / "top.qcow2", str(tree / "outside" / name))
        string = re.escape(repr(str(tree / "outside" / name)))
        with pytest.raises(OutsideError, match=f"^backing file {string} of .* lies outside"):
            Chain.open(str(top), confine=confined_to(images))
        os.unlink(top)


def test_a_qcow2_layer_outside_in_the_middle_is_refused(tree: Path) -> None:
    images, outside = tree / "images", tree / "outside"
    overlay(outside / "mid.qcow2", "secret.raw")
    top = overlay(images / "top.qcow2", "../outside/mid.qcow2", "qcow2")
    with pytest.raises(OutsideError, match=r"'\.\./outside/mid\.qcow2' of .* resolves to"):
        Chain.open(str(top), confine=confined_to(images))
    # allowing the middle layer's directory allows its backing file beside it too
    with Chain.open(str(top), confine=confined_to(images, outside)) as chain:
        assert len(chain.layers) == 3


def test_the_active_layer_outside_is_refused(tree: Path) -> None:
    """A state file (writable by whoever writes the images) may name any active layer."""
    top = overlay(tree / "outside" / "top.qcow2", "secret.raw")
    with pytest.raises(OutsideError) as info:
        Chain.open(str(top), confine=confined_to(tree / "images"))
    assert str(info.value).startswith(f"active layer {str(top)!r} lies outside")
    # a raw file named as the active layer (probed: raw) just the same
    with pytest.raises(OutsideError):
        Chain.open(str(tree / "outside" / "secret.raw"), confine=confined_to(tree / "images"))


def test_the_file_checked_is_the_file_opened(tree: Path) -> None:
    """chainfs resolves a backing string's ``..`` textually (``d/../secret.raw`` is
    ``images/secret.raw``, where the kernel would follow ``d`` first): the rule judges
    the file chainfs opens, so the chain reads the same with the rule as without."""
    images = tree / "images"
    (images / "d").symlink_to(tree / "outside" / "d")
    top = overlay(images / "top.qcow2", "d/../secret.raw")
    with Chain.open(str(top)) as free, Chain.open(str(top), confine=confined_to(images)) as kept:
        assert free.layers[1].path == kept.layers[1].path == str(images / "secret.raw")
        assert kept.read(0, 8) == free.read(0, 8) == b"\x22" * 8


def test_layers_inside_are_served(tree: Path) -> None:
    images = tree / "images"
    (images / "sub").mkdir()
    (images / "link.raw").symlink_to(images / "base.raw")
    mid = overlay(images / "sub" / "mid.qcow2", "../link.raw")
    top = overlay(images / "top.qcow2", "sub/mid.qcow2", "qcow2")
    with Chain.open(str(top), writable=True, confine=confined_to(images)) as chain:
        assert [x.path for x in chain.layers] == [str(top), str(mid), str(images / "link.raw")]
        assert chain.read(0, 4) == b"\x11" * 4


def test_allow_backing_of_one_file(tree: Path) -> None:
    images, secret = tree / "images", tree / "outside" / "secret.raw"
    top = overlay(images / "top.qcow2", str(secret))
    with Chain.open(str(top), confine=confined_to(images, secret)) as chain:
        assert chain.read(0, 6) == SECRET[:6]
    (tree / "outside" / "other.raw").write_bytes(SECRET)
    top2 = overlay(images / "top2.qcow2", str(tree / "outside" / "other.raw"))
    with pytest.raises(OutsideError):
        Chain.open(str(top2), confine=confined_to(images, secret))


def test_a_symlinked_source_directory_still_works(tree: Path) -> None:
    images = tree / "images"
    (tree / "via").symlink_to(images)
    overlay(images / "top.qcow2", "base.raw")
    top = tree / "via" / "top.qcow2"
    with Chain.open(str(top), confine=confined_to(tree / "via")) as chain:
        assert chain.read(0, 4) == b"\x11" * 4


def swap_link_to_secret(tree: Path) -> None:
    """Points ``images/link.raw`` at ``outside/secret.raw`` in one atomic rename."""
    images = tree / "images"
    (images / "new").symlink_to(tree / "outside" / "secret.raw")
    os.replace(images / "new", images / "link.raw")


def swap_link_after_its_check(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check by path of ``link.raw`` passes, then the link is swapped to the secret
    before the open."""
    check_path = Confinement.check_path

    def check_then_swap(self: Confinement, path: str, what: str, shown: str) -> None:
        check_path(self, path, what, shown)
        if path.endswith("link.raw"):
            swap_link_to_secret(tree)

    monkeypatch.setattr(Confinement, "check_path", check_then_swap)


def test_a_symlink_swapped_after_the_check_is_caught_at_the_open(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check by path passes on the symlink's first target; the symlink is then
    swapped to the secret before the open: the check of the open descriptor refuses."""
    images = tree / "images"
    (images / "link.raw").symlink_to(images / "base.raw")
    top = overlay(images / "top.qcow2", "link.raw")
    swap_link_after_its_check(tree, monkeypatch)
    with pytest.raises(OutsideError, match=r"resolves to .*/outside/secret\.raw'"):
        Chain.open(str(top), confine=confined_to(images))


def test_a_layer_reopened_later_is_checked_again(tree: Path) -> None:
    """A job reopens a backing layer read-write by its path: a symlink on that path
    swapped meanwhile to a file outside is refused, the chain keeps its layer."""
    images = tree / "images"
    (images / "link.raw").symlink_to(images / "base.raw")
    top = overlay(images / "top.qcow2", "link.raw")
    with Chain.open(str(top), writable=True, confine=confined_to(images)) as chain:
        swap_link_to_secret(tree)
        with pytest.raises(OutsideError):
            chain.reopen(1, writable=True)
        with pytest.raises(OutsideError):
            chain.open_layer(str(images / "link.raw"), "raw", writable=False)


def test_allow_backing_is_parsed_repeatable_and_checked(tree: Path) -> None:
    opts = parse_options(
        [f"allow_backing={tree / 'outside'},allow_dir={tree / 'images2'}", "allow_backing=/"]
    )
    assert opts.allow_backing == [str(tree / "outside"), "/"]
    assert opts.allow_dirs == [str(tree / "images2")]
    file_opts = parse_options([f"allow_backing={tree / 'outside' / 'secret.raw'}"])
    assert file_opts.allow_backing == [str(tree / "outside" / "secret.raw")]
    for bad in ("allow_backing=", f"allow_backing={tree / 'nothing'}"):
        with pytest.raises(Exception, match="no such file or directory"):
            parse_options([bad])


def test_without_proc_the_descriptor_must_be_the_file_checked(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``/proc/self/fd`` cannot be read, the open descriptor is compared with the
    file the real path names: a swap after the open is refused all the same."""
    import chainfs.confine

    monkeypatch.setattr(chainfs.confine, "_fd_path", lambda fd: None)
    images = tree / "images"
    (images / "link.raw").symlink_to(images / "base.raw")
    top = overlay(images / "top.qcow2", "link.raw")
    with Chain.open(str(top), confine=confined_to(images)) as chain:
        assert chain.read(0, 4) == b"\x11" * 4
    swap_link_after_its_check(tree, monkeypatch)
    with pytest.raises(OutsideError, match=r"resolves to .*secret"):
        Chain.open(str(top), confine=confined_to(images))
