"""Every example command of README.md and the man page, run as written on a real mount.

``doc_examples`` finds the commands (its docstring has the convention).  Each example
block runs on its own copy of the seed chain ``[A] <- [B] <- [C] <- [D] <- [E]`` (32 MiB,
``scripts/make-seed-chain``) in IMAGES: mounted on MNT with ``-o allow_dir=NEW`` when
the block names a mountpoint, unless its first command is a ``chainfs mount`` of its
own; with nothing mounted when it names none.  Its commands run in order with bash, in
a scratch directory, ``chainfs`` being this checkout's, after these substitutions:

    MOUNTPOINT, /mnt/disks   MNT
    /mnt/nowhere             a path that does not exist
    /srv/images              IMAGES
    /srv/new                 NEW
    vm1 (a word)             E, the seed's chain

A command must exit 0, or non-zero where its output in the example says it fails
(``chainfs: ...`` or ``bash: ...``); output is not compared.  After the block every job
must have ended without an error, and every image must pass ``qemu-img check``.  A
command that cannot run here is in ``EXCUSED`` with the reason; an excuse for a line
that is no longer in the documents fails, and so does a line whose program
``doc_examples.PROGRAMS`` lacks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import doc_examples
import pytest
from doc_examples import Block, Command

from .conftest import DEADLINE, Mounter, Seeds, assert_clean, expect_refusals, wait_for

SYNOPSIS = "a synopsis: its upper-case words are placeholders, not paths"
INSTALL = (
    "changes the host (/opt, /usr/local); the Installing steps run as written in a mount "
    "namespace by tests/unit/test_cli_packaging.py::"
    "test_readme_install_steps_then_the_units_verify (slow)"
)
SYSTEMD = (
    "enables a service on the host; tests/unit/test_cli_docs.py checks the units with "
    "systemd-analyze verify"
)
ZERO_CHECK = (
    "the check for a disk that went through the 0.1.0 bug: OLD and NEW are images of such a disk"
)
EXCUSED: dict[str, str] = {
    "./scripts/demo": "run twice by tests/mount/test_demo.py, in a stand-in checkout",
    "./scripts/test": "the whole suite, this test among it",
    "./scripts/bench": "a benchmark of minutes, no test",
    (
        "./scripts/soak --rounds 200 --mode both      # as root; ./soak-work, evidence in "
        "./soak-evidence"
    ): ("20 minutes; tests/mount/test_soak.py runs 6 rounds of each mode in the slow suite"),
    "apt-get install fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc": (
        "installs system packages (scripts/setup does, for the tests)"
    ),
    "python3 -m venv /opt/chainfs": INSTALL,
    "/opt/chainfs/bin/pip install ./third_party/pyfuse3   # from a checkout of this repository": (
        INSTALL
    ),
    "/opt/chainfs/bin/pip install .": INSTALL,
    "ln -s /opt/chainfs/bin/chainfs /usr/local/bin/chainfs": INSTALL,
    "mkdir -p /usr/local/share/man/man1": INSTALL,
    "ln -s /opt/chainfs/share/man/man1/chainfs.1 /usr/local/share/man/man1/chainfs.1": INSTALL,
    "chainfs --version     # chainfs 0.2.0 (pyfuse3 3.5.0+chainfs.5: holes and discard on)": (
        INSTALL
    ),
    "man -w chainfs": INSTALL,
    "systemd-analyze verify systemd/*.service systemd/*.mount": INSTALL,
    "chainfs mount SOURCE MOUNTPOINT [-f|--foreground] [-o OPT[,OPT...]]": SYNOPSIS,
    (
        "chainfs mount SOURCE MOUNTPOINT [-f] [--adopt CHAIN]... "
        "[-o ro,allow_other,debug,allow_dir=PATH,allow_backing=PATH,"
        "lease=SECONDS,adopt=CHAIN,shared,cache_size=SIZE]"
    ): SYNOPSIS,
    "chainfs umount [--lazy] MOUNTPOINT": SYNOPSIS,
    "chainfs info IMAGE [--backing-chain] [--output=json]": SYNOPSIS,
    "chainfs check IMAGE [-U | -r leaks] [--output=json]": SYNOPSIS,
    "tail -f MOUNTPOINT/control/E/events": (
        "follows the file forever; tests/mount/test_control.py::test_tail_follows_events"
    ),
    (
        "qemu-img convert -O raw OLD.qcow2 /tmp/old.raw    # copy: the old active layer (its"
    ): ZERO_CHECK,
    "qemu-img convert -O raw NEW.qcow2 /tmp/new.raw    # the chain's active layer now": ZERO_CHECK,
    "cmp -l /tmp/old.raw /tmp/new.raw | awk '$2 == 0 {print $1 - 1}' | head": ZERO_CHECK,
    "cp systemd/chainfs@.service /etc/systemd/system/": SYSTEMD,
    "systemctl daemon-reload": SYSTEMD,
    'systemctl enable --now "chainfs@$(systemd-escape --path /srv/images).service"': SYSTEMD,
}
MOUNT_WORDS = ("MOUNTPOINT", "/mnt/disks")


def runnable(block: Block) -> list[Command]:
    return [c for c in block.commands if c.text not in EXCUSED]


BLOCKS = [b for b in doc_examples.blocks() if runnable(b)]


def substitute(text: str, where: dict[str, Path]) -> str:
    for word in MOUNT_WORDS:
        text = text.replace(word, str(where["mnt"]))
    text = text.replace("/mnt/nowhere", str(where["nowhere"]))
    text = text.replace("/srv/images", str(where["images"]))
    text = text.replace("/srv/new", str(where["new"]))
    return re.sub(r"\bvm1\b", "E", text)


def test_every_example_is_run_or_excused() -> None:
    """No excuse outlives its line, every program is known, and there is something to run."""
    lines = {c.text for b in doc_examples.blocks() for c in b.commands}
    stale = sorted(set(EXCUSED) - lines)
    assert not stale, f"excuses for lines no longer in README.md or chainfs.1: {stale}"
    assert not doc_examples.unknown_programs(), (
        "example lines whose program doc_examples.PROGRAMS does not list (add it, so that "
        f"the line is run or excused): {doc_examples.unknown_programs()}"
    )
    docs = {c.doc for b in BLOCKS for c in runnable(b)}
    assert docs == {"README.md", "chainfs.1"}


def _no_job_runs(mnt: Path) -> bool:
    control = mnt / "control"
    return all(not (d / "jobs").read_text().strip() for d in control.iterdir() if d.is_dir())


@expect_refusals
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_example_block(block: Block, tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    where = {
        "images": tmp_path / "images",
        "new": tmp_path / "new",
        "mnt": tmp_path / "mnt",
        "nowhere": tmp_path / "nowhere",
    }
    seeds(where["images"])
    where["new"].mkdir()
    where["mnt"].mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "chainfs"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m chainfs "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    commands = runnable(block)
    first = commands[0].text.split()
    own_mount = first[:2] == ["chainfs", "mount"]
    m = None
    if any(w in block.text for w in MOUNT_WORDS) and not own_mount:
        m = mounter(where["images"], f"allow_dir={where['new']}", mountpoint=where["mnt"])
    try:
        for c in commands:
            line = substitute(c.text, where)
            proc = subprocess.run(
                ["bash", "-c", line],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=2 * DEADLINE,
                stdin=subprocess.DEVNULL,
            )
            said = f"{c.where}: {line}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"
            if c.fails:
                assert proc.returncode != 0, f"the example says this fails:\n{said}"
            else:
                assert proc.returncode == 0, said
        if os.path.ismount(where["mnt"]):
            wait_for(lambda: _no_job_runs(where["mnt"]), "the example's jobs to end")
            for d in (where["mnt"] / "control").iterdir():
                if d.is_dir():
                    events = (d / "events").read_text()
                    assert " error=" not in events, events
    finally:
        if own_mount and os.path.ismount(where["mnt"]):
            subprocess.run(["fusermount3", "-u", "-z", str(where["mnt"])], check=False)
    if m is not None:
        m.unmount()
    images = [p for d in ("images", "new") for p in sorted(where[d].iterdir())]
    assert_clean([p for p in images if p.suffix == ".qcow2"])
