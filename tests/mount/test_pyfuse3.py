"""The daemon runs the patched pyfuse3 that ``third_party/pyfuse3`` builds: scripts/setup
installs it as the README's "Installing" does (``pip install ./third_party/pyfuse3``),
so this proves that those steps give holes and discard, and that the daemon says so in
``control/.status``, ``chainfs status``, ``--version`` and its log."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chainfs import __version__

from .conftest import CHAINFS, Mounter, Seeds, run

ROOT = Path(__file__).resolve().parents[2]


def patched_version() -> str:
    """The version third_party/pyfuse3 builds (``3.5.0+chainfs.N``)."""
    spec = importlib.util.spec_from_file_location(
        "build_patched", ROOT / "third_party" / "pyfuse3" / "build_patched.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.VERSION)


def test_the_daemon_runs_the_patched_pyfuse3(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    want = patched_version()
    seeds(tmp_path / "src")
    m = mounter(tmp_path / "src")
    daemon = m.status()[0]
    assert (daemon.get("pyfuse3"), daemon.get("holes")) == (want, "true"), (
        "not the pyfuse3 of third_party/pyfuse3: scripts/setup installs it "
        "(pip install ./third_party/pyfuse3)"
    )
    said = f"pyfuse3 {want}: holes and discard on"
    assert said in run(*CHAINFS, "status", m.mountpoint).stdout.splitlines()
    assert run(*CHAINFS, "--version").stdout == f"chainfs {__version__} ({said})\n"
    assert f"pyfuse3={want} holes=on" in m.log_text()
    m.unmount()
