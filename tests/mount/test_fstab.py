"""``mount -t fuse.chainfs SOURCE MOUNTPOINT`` and an fstab line, through mount(8) itself.

mount(8) runs its helpers without the caller's PATH, and ``mount.fuse3`` then runs
``/bin/sh -c 'chainfs SOURCE MOUNTPOINT -o OPTS'``, so chainfs must sit in a directory
of the shell's default PATH, as an installed program would (``/usr/local/sbin``).  The
test does exactly that inside a private mount namespace (``unshare --mount``), with a
temporary directory holding a ``chainfs`` link bind-mounted over ``/usr/local/sbin``:
nothing outside the namespace sees the bind mount or the chainfs mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chainfs.control import parse_line

from .conftest import DEADLINE, Seeds, assert_clean, backing_chain, root_only

pytestmark = [
    root_only,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("unshare", "mount.fuse3", "findmnt")),
        reason="needs unshare (util-linux), findmnt and mount.fuse3 (fuse3)",
    ),
]

SCRIPT = r"""
set -eu
trap 'umount -l "$MP" 2>/dev/null || true' EXIT
mount --bind "$BIN" /usr/local/sbin

mount -t fuse.chainfs "$SRC" "$MP"
echo "== status"
cat "$MP/control/.status"
cmp "$MP/E.img" "$REF"
echo "== findmnt"
findmnt -n -o FSTYPE,OPTIONS "$MP"
chainfs umount "$MP"

mount -T "$FSTAB" "$MP"
echo "$COPIES/S.qcow2" > "$MP/control/E/snapshot"
echo "== chain"
cat "$MP/control/E/chain"
chainfs umount "$MP"

mount -t fuse.chainfs -o ro,allow_backing="$COPIES" "$SRC" "$MP"
echo "== read-only"
findmnt -n -o OPTIONS "$MP"
cat "$MP/control/.status"
if echo "$COPIES/T.qcow2" > "$MP/control/E/snapshot"; then exit 1; fi
chainfs umount "$MP"
echo "== done"
"""


def sections(out: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("== "):
            current = line[3:]
            result[current] = []
        elif current:
            result[current].append(line)
    return result


def test_mount_t_fuse_chainfs_and_fstab(tmp_path: Path, seeds: Seeds) -> None:
    seed = seeds(tmp_path / "images")
    mp, copies, bin_ = tmp_path / "mnt", tmp_path / "copies", tmp_path / "bin"
    for d in (mp, copies, bin_):
        d.mkdir()
    (bin_ / "chainfs").symlink_to(Path(sys.executable).parent / "chainfs")
    ref = tmp_path / "ref.raw"
    ref.write_bytes(seed.content)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# chainfs, as an fstab line\n"
        f"{seed.active.parent}  {mp}  fuse.chainfs  noauto,nofail,allow_dir={copies}  0  0\n"
    )
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "MP": str(mp),
        "SRC": str(seed.active.parent),
        "REF": str(ref),
        "BIN": str(bin_),
        "FSTAB": str(fstab),
        "COPIES": str(copies),
    }
    if "PYTHONPATH" in os.environ:  # the tree under test, not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = sections(proc.stdout)
    assert list(out) == ["status", "findmnt", "chain", "read-only", "done"], proc.stdout
    daemon, chain = (parse_line(x) for x in out["status"])
    assert daemon["source"] == str(seed.active.parent) and daemon["readonly"] == "false"
    assert chain == {
        "chain": "E",
        "status": "served",
        "active": str(seed.active),
        "owner": "self",
    }
    fstype, options = out["findmnt"][0].split()
    assert fstype == "fuse.chainfs" and "rw" in options.split(",")
    names = [parse_line(x)["name"] for x in out["chain"]]
    assert names == ["S.qcow2", "E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert "ro" in out["read-only"][0].split(",")
    # the chain's active layer lies in COPIES now: allow_backing reached chainfs
    ro_daemon, ro_chain = (parse_line(x) for x in out["read-only"][1:])
    assert ro_daemon["readonly"] == "true"
    assert ro_chain == {
        "chain": "E",
        "status": "served",
        "active": str(copies / "S.qcow2"),
        "owner": "none",  # a read-only mount owns nothing, and nobody else does
    }
    assert not (copies / "T.qcow2").exists()
    assert not mp.is_mount()
    snap = copies / "S.qcow2"
    assert_clean([*seed.layers, snap])
    assert backing_chain(snap) == names
