"""Shared pytest wiring: the ``--runslow`` switch and skipping interop tests without QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

INTEROP_DIR = Path(__file__).parent / "interop"
QEMU_TOOLS = ("qemu-img", "qemu-io")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [tool for tool in QEMU_TOOLS if shutil.which(tool) is None]
    skip_qemu = pytest.mark.skip(
        reason=f"interop tests need {' and '.join(missing)} on PATH (install qemu-utils)"
    )
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    runslow = config.getoption("--runslow")
    for item in items:
        if missing and INTEROP_DIR in item.path.parents:
            item.add_marker(skip_qemu)
        if not runslow and "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def qemu_img() -> str:
    """The path of qemu-img; skips the test when it is not installed."""
    path = shutil.which("qemu-img")
    if path is None:
        pytest.skip("qemu-img is not installed (install qemu-utils)")
    return path
