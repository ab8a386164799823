"""The short form of ``scripts/soak``: ext4 on a loop device over the flat file, xfstests'
fsstress writing into it while live jobs run underneath, every file compared through a
fresh loop device after each round, in the buffered and the direct-I/O loop modes.  The
long runs (200 rounds a mode) and their figures are in the README.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SCRIPTS, root_only

SOAK = SCRIPTS / "soak.py"
UNAVAILABLE = 77  # soak.py's exit status when it cannot run here

pytestmark = [root_only, pytest.mark.slow]


def soak(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SOAK), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def test_soak_short(tmp_path: Path) -> None:
    build = soak("--build-only", timeout=600)
    if build.returncode == UNAVAILABLE:
        pytest.skip(f"fsstress cannot be had: {build.stderr.strip()}")
    assert build.returncode == 0, build.stdout + build.stderr
    proc = soak(
        "--rounds",
        "6",
        "--mode",
        "both",
        "--seed",
        "6",
        "--ready-timeout",
        "5",
        "--work",
        str(tmp_path / "work"),
        "--keep",
        str(tmp_path / "evidence"),
        timeout=1200,
    )
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"the soak cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert "mode buffered: 6 rounds" in proc.stdout, proc.stdout
    assert "mode direct: 6 rounds" in proc.stdout, proc.stdout
    assert "0 differences" in proc.stdout, proc.stdout
