"""What ships beside the code: the man page and the systemd units.

The man page must render without a warning (``groff -ww``, and ``man -l`` where man-db
is installed) and name every subcommand, option, mount option, control file and errno the
code knows, so that it cannot silently fall behind the parser.  The units must pass
``systemd-analyze verify`` (with the binary path replaced by a real one, and the man page
findable for ``Documentation=``), and the service must keep the properties FUSE needs:
``Type=notify``, a stop through ``chainfs umount``, and no option that would give it a
mount namespace of its own and so hide the mount.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chainfs import cli
from chainfs.control import COMMANDS
from chainfs.fs import CONTROL_FILES

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "chainfs" / "chainfs.1"
UNITS = ROOT / "systemd"
SERVICE = UNITS / "chainfs@.service"
MOUNT_UNIT = UNITS / "srv-chainfs.mount"
MOUNT_OPTIONS = (
    "ro",
    "allow_other",
    "debug",
    "allow_dir=",
    "allow_backing=",
    "lease=",
    "adopt=",
    "shared",
    "cache_size=",
)
ERRNOS = ("EINVAL", "EBUSY", "EEXIST", "ENOENT", "EACCES", "EROFS", "ENOSPC", "EIO")
# options that give a service its own mount namespace, where the FUSE mount would vanish
NAMESPACING = (
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProtectHostname",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountFlags",
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return path


def man_text() -> str:
    """The man page source with roff's escaped hyphens made plain."""
    return MAN.read_text().replace("\\-", "-")


# -- the man page ------------------------------------------------------------------------------


def test_man_page_renders_without_warnings() -> None:
    proc = subprocess.run(
        [tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(MAN)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("width", [80, 120])
def test_man_shows_the_page(width: int, tmp_path: Path) -> None:
    """``man ./chainfs/chainfs.1``, as a user would look at it from the repository."""
    env = dict(os.environ, MANWIDTH=str(width), MANPAGER="cat", PAGER="cat", LANG="C.UTF-8")
    proc = subprocess.run(
        [tool("man"), "--warnings", "./chainfs/chainfs.1"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = proc.stdout
    for section in ("NAME", "SYNOPSIS", "COMMANDS", "MOUNT OPTIONS", "THE MOUNTED TREE",
                    "CONTROL FILES", "EXIT STATUS", "FILES", "SYSTEMD", "SEE ALSO"):  # fmt: skip
        assert re.search(rf"^{section}$", text, re.M), section
    assert "chainfs - QEMU disk image chains" in " ".join(text.split())


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_man_page_covers_every_command_and_option() -> None:
    text = man_text()
    missing = []
    for name, sub in subcommands().items():
        if not re.search(rf"\b{name}\b", text):
            missing.append(name)
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and not re.search(rf"(?<![\w-]){opt}\b", text):
                    missing.append(f"{name} {opt}")
    for word in (*MOUNT_OPTIONS, *CONTROL_FILES, *COMMANDS, *ERRNOS, "--version"):
        if word not in text:
            missing.append(word)
    assert not missing, f"the man page does not mention: {missing}"


def test_man_page_names_the_state_files() -> None:
    from chainfs.jobs.journal import JOURNAL_NAME
    from chainfs.source import STATE_NAME

    text = man_text()
    assert STATE_NAME in text and JOURNAL_NAME in text


# -- systemd units -------------------------------------------------------------------------------


def settings(unit: Path) -> list[tuple[str, str]]:
    """(key, value) of every setting, comments and section headers left out."""
    out = []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart's binary replaced by this checkout's chainfs."""
    binary = Path(sys.executable).parent / "chainfs"
    if not binary.exists():
        binary = tmp_path / "chainfs"
        binary.write_text(f'#!/bin/sh\nexec {sys.executable} -m chainfs "$@"\n')
        binary.chmod(0o755)
    d = tmp_path / "units"
    d.mkdir()
    for unit in (SERVICE, MOUNT_UNIT):
        text = unit.read_text().replace("/usr/local/bin/chainfs", str(binary))
        (d / unit.name).write_text(text)
    return d


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Documentation=man:chainfs(1) is checked with man(1): let it find the page
    manpath = tmp_path / "man"
    (manpath / "man1").mkdir(parents=True, exist_ok=True)
    shutil.copy(MAN, manpath / "man1" / "chainfs.1")
    man = ["--man=yes"] if shutil.which("man") else ["--man=no"]
    return subprocess.run(
        [tool("systemd-analyze"), "verify", *man, str(unit)],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, MANPATH=str(manpath)),
    )


def test_service_verifies(unit_dir: Path, tmp_path: Path) -> None:
    proc = verify(unit_dir / "chainfs@srv-images.service", tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_mount_unit_verifies(unit_dir: Path, tmp_path: Path) -> None:
    proc = verify(unit_dir / MOUNT_UNIT.name, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """The check above can fail: the unit as shipped names a path absent here."""
    if Path("/usr/local/bin/chainfs").exists():
        pytest.skip("chainfs is installed in /usr/local/bin")
    d = tmp_path / "raw"
    d.mkdir()
    shutil.copy(SERVICE, d / SERVICE.name)
    proc = verify(d / "chainfs@srv-images.service", tmp_path)
    assert proc.returncode != 0 and "/usr/local/bin/chainfs" in proc.stderr


def test_service_keeps_what_fuse_needs() -> None:
    s = settings(SERVICE)
    keys = dict(s)
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert " mount -f " in keys["ExecStart"] and "%f" in keys["ExecStart"]
    assert keys["ExecStop"].endswith("chainfs umount ${MOUNTPOINT}")
    assert keys["Restart"] == "on-failure"
    assert keys["DeviceAllow"] == "/dev/fuse rw"
    assert "CAP_SYS_ADMIN" in keys["CapabilityBoundingSet"]
    assert "@mount" in keys["SystemCallFilter"]
    namespaced = [k for k, _ in s if k in NAMESPACING]
    assert not namespaced, f"these would hide the mount in a private namespace: {namespaced}"


def test_mount_unit_matches_its_fstab_line() -> None:
    keys = dict(settings(MOUNT_UNIT))
    assert keys["Type"] == "fuse.chainfs"
    fstab = next(x for x in MOUNT_UNIT.read_text().splitlines() if "fuse.chainfs" in x)
    what, where, kind, options = fstab.lstrip("# ").split()[:4]
    assert (what, where, kind) == (keys["What"], keys["Where"], keys["Type"])
    assert keys["Options"] in options
