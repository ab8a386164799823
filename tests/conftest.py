"""Shared pytest wiring: the layers run lowest first (unit, interop, mount), the
``--runslow`` switch, skipping interop tests without QEMU, the ``checklogs`` plugin (a
test fails on a WARNING it did not declare with ``@pytest.mark.expect_log``), and the
``bounded_reads`` fixture of the hostile-image tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from chainfs.hostfile import HostFile

TESTS_DIR = Path(__file__).parent
INTEROP_DIR = TESTS_DIR / "interop"
QEMU_TOOLS = ("qemu-img", "qemu-io")
LAYERS = ("unit", "interop", "mount", "nfs")  # the order they run in: lower layers first

pytest_plugins = ["checklogs", "pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def layer(item: pytest.Item) -> int:
    """The rank of the item's layer in ``LAYERS``; anything else runs last."""
    try:
        name = item.path.relative_to(TESTS_DIR).parts[0]
    except ValueError:
        return len(LAYERS)
    return LAYERS.index(name) if name in LAYERS else len(LAYERS)


# trylast: after pytest grouped the items by their parametrized fixtures; the sort is
# stable, so that grouping and the file order within a layer are kept
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=layer)
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


@pytest.fixture
def bounded_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host read in the test: a sane offset and no longer than the file or two of the
    largest clusters (what one compressed cluster may need)."""
    pread, preadinto = HostFile.pread, HostFile.preadinto

    def check(f: HostFile, length: int, offset: int) -> None:
        assert 0 <= offset < 1 << 63, f"read at offset {offset:#x}"
        limit = max(os.fstat(f.fd).st_size, 4 << 20)
        assert length <= limit, f"read of {length} bytes from a {limit}-byte file"

    def checked_pread(f: HostFile, length: int, offset: int) -> bytes:
        check(f, length, offset)
        return pread(f, length, offset)

    def checked_preadinto(f: HostFile, buf: memoryview, offset: int) -> None:
        check(f, len(buf), offset)
        preadinto(f, buf, offset)

    monkeypatch.setattr(HostFile, "pread", checked_pread)
    monkeypatch.setattr(HostFile, "preadinto", checked_preadinto)
