"""Backing files stay inside the directories a mount was given (SPEC, "Command line").

One tree serves every mount of this module: the seed chain ``E`` in ``images`` beside
overlays whose backing files leave it — an absolute path, ``..``, a symlinked file, a
symlinked directory, a sibling directory whose name starts like ``images`` (``images2``),
and a qcow2 layer outside over the secret — where ``outside/secret.raw`` stands for a
file such as ``/etc/shadow``.  By default each of them is refused alone, with the
backing string, the file it resolves to and the option that would allow it, in the
log, ``control/.status`` and ``chainfs status``, while ``E`` is served; ``allow_backing``
(a directory or one file, repeatable) and ``allow_dir`` widen the rule; a symlinked
source directory works as the directory it points to; a TOML source allows its own
directory and each chain's named active layer's; and a state file naming an active
layer elsewhere does not make a mount serve it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from .conftest import CHAINFS, MiB, Mount, Mounter, Seed, Seeds, assert_flat, run

SECRET = (b"root:$6$not-for-any-guest:19000:0:99999:7:::\n" * (MiB // 16))[:MiB]

refusals = pytest.mark.expect_log(r"WARNING chainfs\.mount: chain=\S+ refused: ")


@dataclass
class Tree:
    root: Path
    seed: Seed

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    @property
    def secret(self) -> Path:
        return self.outside / "secret.raw"


# chain -> (backing string, the directory its real path lies in, relative to the root)
ESCAPES = {
    "abs": ("{root}/outside/secret.raw", "outside"),
    "dotdot": ("../outside/secret.raw", "outside"),
    "link": ("link.raw", "outside"),  # images/link.raw -> outside/secret.raw
    "dirlink": ("sub/secret.raw", "outside"),  # images/sub -> outside
    "prefix": ("../images2/secret.raw", "images2"),
    "mid": ("../outside/mid.qcow2", "outside"),  # a qcow2 layer outside, over the secret
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, seeds: Seeds) -> Tree:
    root = tmp_path_factory.mktemp("confined")
    t = Tree(root, seeds(root / "images", size=4 * MiB))
    for d in ("outside", "images2", "vm", "conf"):
        (root / d).mkdir()
    t.secret.write_bytes(SECRET)
    shutil.copyfile(t.secret, root / "images2" / "secret.raw")
    im.create(str(t.outside / "mid.qcow2"), backing="secret.raw", backing_fmt="raw", cwd="/")
    (t.images / "link.raw").symlink_to(t.secret)
    (t.images / "sub").symlink_to(t.outside)
    for name, (string, _) in ESCAPES.items():
        fmt = "qcow2" if string.endswith(".qcow2") else "raw"
        string = string.format(root=root)
        im.create(str(t.images / f"{name}.qcow2"), backing=string, backing_fmt=fmt, cwd="/")
    (root / "via").symlink_to(t.images)
    return t


def status(m: Mount) -> dict[str, dict[str, str]]:
    return {e["chain"]: e for e in m.status()[1:]}


def assert_refused(m: Mount, tree: Tree, names: set[str]) -> None:
    """Exactly ``names`` of the escapes are refused, each naming its backing string, the
    file it resolves to and the option; ``E`` and the other escapes are served."""
    got = status(m)
    assert got["E"]["status"] == "served"
    assert_flat(m.img("E"), tree.seed.content)
    for name, (string, where) in ESCAPES.items():
        entry = got[name]
        if name not in names:
            assert entry["status"] == "served", entry
            assert_flat(m.img(name), SECRET)
            continue
        assert entry["status"] == "refused", entry
        assert not m.img(name).exists()
        reason = entry["reason"]
        string = string.format(root=tree.root)
        top = tree.images / f"{name}.qcow2"
        real = tree.root / where / ("mid.qcow2" if name == "mid" else "secret.raw")
        assert f"backing file {string!r} of {str(top)!r}" in reason, reason
        assert str(real) in reason, reason
        assert f"-o allow_backing={real.parent} allows it" in reason, reason
        assert f"chain={name} refused: {reason}" in m.log_text()


@refusals
def test_backing_files_outside_are_refused_the_others_served(
    module_mounter: Mounter, tree: Tree
) -> None:
    m = module_mounter(tree.images)
    assert_refused(m, tree, set(ESCAPES))
    text = run(*CHAINFS, "status", m.mountpoint).stdout
    for name in ESCAPES:
        assert f"    {name} ({tree.images / name}.qcow2): backing file " in text, text
    m.unmount()


@refusals
def test_allow_backing_widens_the_rule(module_mounter: Mounter, tree: Tree) -> None:
    """Repeatable, in one ``-o`` or several; ``images2`` is allowed as itself only."""
    m = module_mounter(tree.images, f"allow_backing={tree.outside}")
    assert_refused(m, tree, {"prefix"})
    m.unmount()
    m = module_mounter(
        tree.images, f"rw,allow_backing={tree.outside}", f"allow_backing={tree.root / 'images2'}"
    )
    assert_refused(m, tree, set())
    m.unmount()


@refusals
def test_allow_backing_of_one_file(module_mounter: Mounter, tree: Tree) -> None:
    """The secret itself is allowed, not the qcow2 layer beside it."""
    m = module_mounter(tree.images, f"allow_backing={tree.secret}")
    assert_refused(m, tree, {"prefix", "mid"})
    m.unmount()


@refusals
def test_allow_dir_counts(module_mounter: Mounter, tree: Tree) -> None:
    m = module_mounter(tree.images, f"allow_dir={tree.outside}")
    assert_refused(m, tree, {"prefix"})
    m.unmount()


@refusals
def test_a_symlinked_source_directory(module_mounter: Mounter, tree: Tree) -> None:
    """Mounted through a symlink, the source directory is the one it points to: its own
    chains are served, the escapes refused as before."""
    m = module_mounter(tree.root / "via")
    got = status(m)
    assert got["E"]["status"] == "served"
    assert_flat(m.img("E"), tree.seed.content)
    assert {n for n in ESCAPES if got[n]["status"] == "refused"} == set(ESCAPES)
    m.unmount()


@refusals
def test_toml_source(module_mounter: Mounter, tree: Tree) -> None:
    """A chain's layers may lie in the TOML file's directory (``here``) or beside the
    active layer the TOML names for that chain (``near``), not beside another chain's
    (``far``) nor elsewhere (``leak``)."""
    vm, conf = tree.root / "vm", tree.root / "conf"
    (vm / "base.raw").write_bytes(SECRET)
    im.create(str(vm / "top.qcow2"), backing="base.raw", backing_fmt="raw", cwd="/")
    (tree.root / "vm2").mkdir()
    (conf / "local.raw").write_bytes(SECRET)
    here = str(tree.root / "vm2" / "here.qcow2")
    im.create(here, backing="../conf/local.raw", backing_fmt="raw", cwd="/")
    im.create(str(conf / "far.qcow2"), backing="../vm/base.raw", backing_fmt="raw", cwd="/")
    im.create(str(vm / "leak.qcow2"), backing=str(tree.secret), backing_fmt="raw", cwd="/")
    toml = conf / "chains.toml"
    toml.write_text(
        '[chains.near]\nactive = "../vm/top.qcow2"\n'
        '[chains.here]\nactive = "../vm2/here.qcow2"\n'
        '[chains.far]\nactive = "far.qcow2"\n'
        '[chains.leak]\nactive = "../vm/leak.qcow2"\n'
    )
    m = module_mounter(toml)
    got = status(m)
    assert {n: e["status"] for n, e in got.items()} == {
        "near": "served",
        "here": "served",
        "far": "refused",
        "leak": "refused",
    }
    assert_flat(m.img("near"), SECRET)
    assert_flat(m.img("here"), SECRET)
    assert f"'../vm/base.raw' of '{conf / 'far.qcow2'}' resolves to" in got["far"]["reason"]
    assert f"-o allow_backing={tree.outside} allows it" in got["leak"]["reason"]
    m.unmount()
    m = module_mounter(toml, f"allow_backing={tree.outside}")
    assert status(m)["leak"]["status"] == "served"
    assert_flat(m.img("leak"), SECRET)
    m.unmount()


@refusals
def test_a_state_file_naming_an_active_layer_elsewhere(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, tree: Tree
) -> None:
    """``.chainfs.json`` sits among the images, writable by whoever writes them: a
    chain it names outside the directory (here the secret itself, a raw file) is
    refused unless an option allows the file's directory."""
    images = tmp_path / "images"
    seed = seeds(images, size=4 * MiB)
    state = {"version": 1, "chains": {"E": "E.qcow2", "evil": str(tree.secret)}, "retired": []}
    (images / ".chainfs.json").write_text(json.dumps(state))
    m = mounter(images)
    got = status(m)
    assert got["E"]["status"] == "served"
    assert_flat(m.img("E"), seed.content)
    assert got["evil"]["status"] == "refused"
    assert got["evil"]["reason"].startswith(f"active layer {str(tree.secret)!r} lies outside")
    assert not m.img("evil").exists()
    m.unmount()
    m = mounter(images, f"allow_backing={tree.outside}")
    assert status(m)["evil"]["status"] == "served"
    assert os.path.getsize(m.img("evil")) == len(SECRET)
    m.unmount()
