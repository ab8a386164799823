"""``scripts/demo`` as the README tells a new user to run it, twice.

The demo runs in a copy of the checkout whose ``.venv`` is a stand-in for the one
``scripts/setup`` would make (wrappers around this interpreter, with the stamp that tells
setup the install is current), so that the test installs nothing.  It must end with
MATCH and exit 0, never print a rate above its own ``speed=``, and leave its mount up
for the README's ``.venv/bin/chainfs status demo/mnt``; the second run unmounts what the
first one left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.control import parse_line

from .conftest import run

ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEED = 4 << 20  # the demo's `chainfs stream ... speed=4M --wait`


def stand_in_checkout(dest: Path) -> Path:
    """A copy of what the demo uses, with a ``.venv`` that runs this interpreter."""
    for name in ("chainfs", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    # scripts/setup reads the patched pyfuse3's version there (and finds it installed)
    shutil.copytree(
        ROOT / "third_party",
        dest / "third_party",
        ignore=shutil.ignore_patterns("__pycache__", "build", "downloads", "*.egg-info"),
    )
    bin_dir = dest / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, tail in (("python", '"$@"'), ("chainfs", '-m chainfs "$@"')):
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {tail}\n")
        wrapper.chmod(0o755)
    stamp = dest / ".venv" / ".chainfs-installed"
    stamp.mkdir()
    (stamp / "base").write_text(
        hashlib.sha256((dest / "pyproject.toml").read_bytes()).hexdigest() + "\n"
    )
    return dest


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    dest = stand_in_checkout(tmp_path / "checkout")
    try:
        yield dest
    finally:
        mnt = dest / "demo" / "mnt"
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def demo(checkout: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run(
        ["bash", "scripts/demo"],
        cwd=checkout,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("MATCH: "), proc.stdout
    assert "MISMATCH" not in proc.stdout
    return lines


def test_demo_twice_leaves_its_mount_up_and_keeps_to_its_speed(checkout: Path) -> None:
    lines = demo(checkout)
    # the progress of `chainfs stream ... speed=4M --wait`: never above the limit
    progress = [parse_line(x) for x in lines if x.startswith("job=stream-2 status=")]
    rates = [int(p["rate"]) for p in progress if "rate" in p]
    assert progress and all(r <= DEMO_SPEED for r in rates), rates
    assert "unmount it with '.venv/bin/chainfs umount demo/mnt'." in lines
    # the README's example, right after the demo
    status = run(".venv/bin/chainfs", "status", "demo/mnt", cwd=checkout).stdout
    assert "[A] <- [E]" in status
    # a second run unmounts the mount the first one left, and ends the same way
    lines = demo(checkout)
    assert "==> unmounting the mount the last run left on ./demo/mnt" in lines
    run(".venv/bin/chainfs", "umount", "demo/mnt", cwd=checkout)
