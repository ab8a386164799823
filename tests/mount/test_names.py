"""Chain names and sources: a chain keeps its name across snapshots, streams and remounts
(the state records ``.chainfs/NAME.state`` beside the images remember what changed), a TOML file
names chains explicitly, and a broken chain is left out with its reason in ``chainfs
status`` while the others are served.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from interop import images as im

from chainfs import source as sources

from .conftest import (
    CHAINFS,
    Mounter,
    Seeds,
    assert_clean,
    assert_content,
    assert_flat,
    backing_chain,
    digests,
    run,
)

MiB = im.MiB


def state(directory: Path) -> Any:
    """Every chain's state record, as one dict (the layout of version 1's single file)."""
    chains: dict[str, str] = {}
    retired: set[str] = set()
    for path in sorted((directory / ".chainfs").glob("*.state")):
        _, record = sources.read_slots(path.read_bytes())
        assert record is not None
        chains[str(record["chain"])] = str(record["active"])
        retired.update(str(p) for p in cast(list[str], record["retired"]))
    return {"version": 1, "chains": chains, "retired": sorted(retired)}


def served(m: Any) -> dict[str, str]:
    return {e["chain"]: e["status"] for e in m.status()[1:]}


def write_some(path: Path, model: bytearray, offset: int, data: bytes) -> None:
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())
    model[offset : offset + len(data)] = data


def test_name_survives_snapshot_stream_and_remount(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    model = bytearray(seed.content)
    m = mounter(images)
    m.command("E", "snapshot", "F.qcow2")
    write_some(m.img("E"), model, 3 * MiB, b"\x77" * 70000)
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "control", "layers"]
    m.run_job("E", "stream", "base=A.qcow2")
    assert m.layers("E") == ["F.qcow2", "A.qcow2"]
    m.unmount()
    assert state(images) == {
        "version": 1,
        "chains": {"E": "F.qcow2"},
        "retired": ["B.qcow2", "C.qcow2", "D.qcow2", "E.qcow2"],
    }
    m = mounter(images)
    assert served(m) == {"E": "served"}
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "control", "layers"]
    assert m.layers("E") == ["F.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    m.command("E", "snapshot", "G.qcow2")
    m.unmount()
    m = mounter(images)
    assert served(m) == {"E": "served"}
    assert m.layers("E") == ["G.qcow2", "F.qcow2", "A.qcow2"]
    m.unmount()
    assert_clean([*seed.layers, images / "F.qcow2", images / "G.qcow2"])
    assert_content(images / "G.qcow2", model, tmp_path / "cmp")


@pytest.mark.expect_log(r"WARNING chainfs\.mount: chain=E refused: active layer ")
def test_snapshot_into_another_directory_then_stream_then_remount(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """The seed's recipe for moving a live disk: snapshot elsewhere, then a full stream.
    After every step, and after remounting, the chain is still ``E`` and its active
    layer the new file: the old layers must never be served as a chain again.  Its
    files now lie elsewhere: a mount without an option that allows that directory
    refuses the chain (the state file alone does not let a mount serve a file)."""
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    elsewhere.mkdir()
    seed = seeds(images)
    before = digests(seed.layers)
    model = bytearray(seed.content)
    disk = elsewhere / "disk.qcow2"
    m = mounter(images, f"allow_dir={elsewhere}")
    m.command("E", "snapshot", str(disk))
    assert run("qemu-img", "info", "-U", "--output=json", disk).stdout.count(str(seed.active))
    write_some(m.img("E"), model, MiB, b"\x42" * 5000)
    m.unmount()
    assert backing_chain(disk)[:2] == ["disk.qcow2", "E.qcow2"]

    m = mounter(images, f"allow_dir={elsewhere}")
    assert served(m) == {"E": "served"}
    assert m.lines("E", "chain")[0]["path"] == str(disk)
    assert_flat(m.img("E"), model)
    m.run_job("E", "stream", "node=disk.qcow2")
    assert m.layers("E") == ["disk.qcow2"]
    m.unmount()
    assert digests(seed.layers) == before

    m = mounter(images)
    (entry,) = m.status()[1:]
    assert entry["status"] == "refused"
    assert f"active layer {str(disk)!r} lies outside" in entry["reason"]
    assert f"-o allow_backing={elsewhere} allows it" in entry["reason"]
    m.unmount()

    m = mounter(images, f"allow_backing={elsewhere}")
    assert served(m) == {"E": "served"}
    assert m.lines("E", "chain") and m.layers("E") == ["disk.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([disk])
    assert backing_chain(disk) == ["disk.qcow2"]
    assert_content(disk, model, tmp_path / "cmp")
    assert digests(seed.layers) == before


def test_toml_source(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """``[chains.NAME] active = PATH`` (relative to the TOML file); a relative snapshot
    goes beside the active layer, which is where chainfs may create files by default."""
    images, conf = tmp_path / "images", tmp_path / "conf"
    seed = seeds(images)
    other = seeds(tmp_path / "other", "o-")
    conf.mkdir()
    toml = conf / "chains.toml"
    toml.write_text(
        f'[chains.vm1]\nactive = "../images/E.qcow2"\n\n[chains.vm2]\nactive = "{other.active}"\n'
    )
    m = mounter(toml)
    assert served(m) == {"vm1": "served", "vm2": "served"}
    assert sorted(os.listdir(m.mountpoint)) == ["control", "layers", "vm1.img", "vm2.img"]
    assert_flat(m.img("vm1"), seed.content)
    assert_flat(m.img("vm2"), other.content)
    m.command("vm1", "snapshot", "snap.qcow2")
    assert m.lines("vm1", "chain")[0]["path"] == str(images / "snap.qcow2")
    m.run_job("vm2", "stream", "base=o-A.qcow2")
    m.unmount()
    assert sorted(p.name for p in (conf / ".chainfs").glob("*.state")) == [
        "vm1.state",
        "vm2.state",
    ]
    m = mounter(toml)
    assert m.layers("vm1") == ["snap.qcow2", *(p.name for p in reversed(seed.layers))]
    assert m.layers("vm2") == ["o-E.qcow2", "o-A.qcow2"]
    m.unmount()
    assert_clean([*seed.layers, images / "snap.qcow2", *other.layers])
    assert_content(images / "snap.qcow2", seed.content, tmp_path / "cmp")


@pytest.mark.expect_log(r"WARNING chainfs\.mount: chain=\S+ refused: ")
def test_broken_chains_are_left_out(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    seed = seeds(images)
    im.create(str(images / "gone-base.qcow2"), MiB)
    im.create(str(images / "orphan.qcow2"), MiB, backing="gone-base.qcow2", cwd=str(images))
    os.unlink(images / "gone-base.qcow2")
    im.create(str(images / "future.qcow2"), MiB)
    im.set_incompatible_features(str(images / "future.qcow2"), 1 << 40)
    im.create(str(images / "badversion.qcow2"), MiB)
    im.patch(str(images / "badversion.qcow2"), 4, (7).to_bytes(4, "big"))
    im.create(str(images / "corrupt.qcow2"), MiB)
    im.set_incompatible_features(str(images / "corrupt.qcow2"), im.INCOMPAT_CORRUPT)
    im.create(str(images / "badl1.qcow2"), MiB)
    im.patch(str(images / "badl1.qcow2"), 40, (1 << 50).to_bytes(8, "big"))
    m = mounter(images)
    status = {e["chain"]: e for e in m.status()[1:]}
    assert {k: v["status"] for k, v in status.items()} == {
        "E": "served",
        "orphan": "refused",
        "future": "refused",
        "badversion": "refused",
        "corrupt": "refused",
        "badl1": "refused",
    }
    assert "gone-base.qcow2" in status["orphan"]["reason"]
    assert "does not exist" in status["orphan"]["reason"]
    assert "feature" in status["future"]["reason"]
    assert "version" in status["badversion"]["reason"]
    assert "corrupt" in status["corrupt"]["reason"]
    assert "L1 table" in status["badl1"]["reason"]
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "control", "layers"]
    assert_flat(m.img("E"), seed.content)

    proc = subprocess.run(
        [*CHAINFS, "status", str(m.mountpoint), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["daemon"]["source"] == str(images)
    chains = {c["chain"]: c for c in doc["chains"]}
    assert chains["orphan"]["status"] == "refused"
    assert chains["orphan"]["reason"] == status["orphan"]["reason"]
    assert [x["name"] for x in chains["E"]["layers"]] == m.layers("E")
    assert chains["E"]["jobs"] == []

    proc = subprocess.run([*CHAINFS, "status", str(m.mountpoint)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("orphan", "future", "badversion", "corrupt", "badl1"):
        assert name in proc.stdout and status[name]["reason"] in proc.stdout
    assert all(p.name in proc.stdout for p in seed.layers)
    m.unmount()


def test_names_with_spaces_and_unicode(tmp_path: Path, mounter: Mounter) -> None:
    """Chain and layer names are file names: spaces, quotes and non-ASCII letters work in
    the tree, in the quoted values of ``chain``, and in commands."""
    images = tmp_path / "images"
    images.mkdir()
    size = 2 * MiB
    base = im.create(str(images / "base 1.qcow2"), size)
    im.write(base, [(0, size, 0x11)])
    mid = im.create(str(images / 'mid "ü".qcow2'), size, backing="base 1.qcow2", cwd=str(images))
    im.write(mid, [(MiB, 4096, 0x22)])
    top = im.create(str(images / "vm 1.qcow2"), size, backing='mid "ü".qcow2', cwd=str(images))
    im.write(top, [(5000, 3000, 0x33)])
    content = im.reference(top)
    m = mounter(images)
    assert sorted(os.listdir(m.mountpoint)) == ["control", "layers", "vm 1.img"]
    assert m.layers("vm 1") == ["vm 1.qcow2", 'mid "ü".qcow2', "base 1.qcow2"]
    text = m.control("vm 1", "chain").read_text()
    assert 'name="vm 1.qcow2"' in text and 'name="mid \\"ü\\".qcow2"' in text
    m.command("vm 1", "snapshot", '"snap ü.qcow2"')
    m.run_job("vm 1", "stream", 'base="base 1.qcow2"')
    assert m.layers("vm 1") == ["snap ü.qcow2", "base 1.qcow2"]
    assert_flat(m.img("vm 1"), content)
    m.unmount()
    m = mounter(images)
    assert sorted(os.listdir(m.mountpoint)) == ["control", "layers", "vm 1.img"]
    assert m.layers("vm 1") == ["snap ü.qcow2", "base 1.qcow2"]
    m.unmount()
    assert backing_chain(images / "snap ü.qcow2") == ["snap ü.qcow2", "base 1.qcow2"]
    assert_content(images / "snap ü.qcow2", content, tmp_path / "cmp")


def test_two_chains_sharing_a_base(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    """A fork, ``[A] <- ... <- [D] <- [E]`` and ``[D] <- [F]``: both chains are served (the
    shared layers read-locked twice), a full stream of one leaves the other intact."""
    images = tmp_path / "images"
    seed = seeds(images)
    fork = images / "F.qcow2"
    im.create(str(fork), backing="D.qcow2", cwd=str(images))
    im.write(str(fork), [(0, 3 * MiB, 0x66)])
    fork_content = im.reference(str(fork))
    shared = digests(seed.layers[:-1])
    m = mounter(images)
    assert served(m) == {"E": "served", "F": "served"}
    model = bytearray(seed.content)
    write_some(m.img("E"), model, 7 * MiB, b"\xee" * 100000)
    m.run_job("E", "stream", "node=E.qcow2")
    assert m.layers("E") == ["E.qcow2"]
    assert m.layers("F") == ["F.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    assert_flat(m.img("F"), fork_content)
    m.unmount()
    assert digests(seed.layers[:-1]) == shared
    # the layers E left are still F's: they must not be retired as chains' leftovers
    m = mounter(images)
    assert served(m) == {"E": "served", "F": "served"}
    assert m.layers("F") == ["F.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("F"), fork_content)
    m.unmount()
    assert_clean([*seed.layers, fork])
    assert_content(fork, fork_content, tmp_path / "f")
    assert_content(seed.active, model, tmp_path / "e")


def test_snapshots_in_a_subdirectory_and_hidden(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """Snapshot targets the scan does not see as chains of their own (a subdirectory, a
    hidden name) still become the chain's active layer after a remount."""
    images = tmp_path / "images"
    seed = seeds(images)
    (images / "sub").mkdir()
    model = bytearray(seed.content)
    m = mounter(images)
    m.command("E", "snapshot", "sub/S1.qcow2")
    write_some(m.img("E"), model, 2 * MiB, b"\x31" * 3000)
    m.command("E", "snapshot", ".S2.qcow2")  # relative: beside the active layer, in sub
    write_some(m.img("E"), model, 3 * MiB, b"\x32" * 3000)
    want = [".S2.qcow2", "S1.qcow2", *(p.name for p in reversed(seed.layers))]
    assert m.layers("E") == want
    m.unmount()
    m = mounter(images)
    assert served(m) == {"E": "served"}
    assert m.layers("E") == want
    assert_flat(m.img("E"), model)
    m.unmount()
    top = images / "sub" / ".S2.qcow2"
    assert_clean([*seed.layers, images / "sub" / "S1.qcow2", top])
    assert backing_chain(top) == want
    assert_content(top, model, tmp_path / "cmp")
