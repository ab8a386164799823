"""The ``checklogs`` plugin (``tests/checklogs.py``) fails what it should and only that,
run on a small suite of its own in a separate pytest process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parents[1] / "checklogs.py"

SUITE = r"""
import logging

import pytest

log = logging.getLogger("chainfs.fs")
pytestmark = pytest.mark.expect_log("module-wide")


def test_undeclared():
    log.warning("chain=E command refused: busy")


@pytest.mark.expect_log(r"command refused")
def test_declared():
    log.warning("chain=E command refused: busy")


@pytest.mark.expect_log(r"command refused")
def test_declared_other():
    log.warning("chain=E command refused: busy")
    log.error("job=stream-1 failed: EIO")


def test_module_wide():
    log.warning("a module-wide warning")


def test_below_warning_and_other_loggers():
    log.info("chain=E served")
    logging.getLogger("elsewhere").warning("not chainfs")


def test_fails_on_its_own():
    log.warning("chain=E command refused: busy")
    assert False, "its own failure"


@pytest.fixture
def noisy_teardown():
    yield
    logging.getLogger("chainfs.mount").warning("chain=E did not close cleanly")


def test_teardown(noisy_teardown):
    pass


def test_server_line(server_log):
    server_log.append("2026-12-03 10:00:00,000 INFO chainfs.mount: chain=E served")
    server_log.append("2026-12-03 10:00:00,001 WARNING chainfs.fs: read failed: EIO")


@pytest.mark.expect_log(r"WARNING chainfs\.fs: read failed")
def test_server_line_declared(server_log):
    server_log.append("2026-12-03 10:00:00,001 WARNING chainfs.fs: read failed: EIO")


def test_server_traceback(server_log):
    server_log.append("Traceback (most recent call last):")
"""

# a stand-in for tests/mount/conftest.py, whose source is the servers' logs
CONFTEST = """
import pytest

from checklogs import watch

_LINES: list[str] = []


def _take():
    lines = list(_LINES)
    _LINES.clear()
    return lines


watch(_take)


@pytest.fixture
def server_log():
    return _LINES
"""


def test_checklogs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(checklogs=PLUGIN.read_text())
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider", "-p", "checklogs")
    outcomes: dict[str, set[str]] = {}
    for line in result.outlines:
        m = re.match(r"(PASSED|FAILED|ERROR) (?:at teardown of )?test_suite\.py::(\w+)", line)
        if m:
            outcomes.setdefault(m[2], set()).add(m[1])
    assert outcomes == {
        "test_undeclared": {"FAILED"},
        "test_declared": {"PASSED"},
        "test_declared_other": {"FAILED"},
        "test_module_wide": {"PASSED"},
        "test_below_warning_and_other_loggers": {"PASSED"},
        "test_fails_on_its_own": {"FAILED"},
        "test_teardown": {"PASSED", "ERROR"},
        "test_server_line": {"FAILED"},
        "test_server_line_declared": {"PASSED"},
        "test_server_traceback": {"FAILED"},
    }, result.stdout.str()
    out = result.stdout.str()
    # the report names the lines, not the declared ones
    assert "WARNING chainfs.fs: chain=E command refused: busy" in out
    assert "ERROR chainfs.fs: job=stream-1 failed: EIO" in out
    assert "during teardown" in out
    assert "WARNING chainfs.mount: chain=E did not close cleanly" in out
    assert "its own failure" in out
    # a test that failed on its own is reported for that alone
    own = out[out.index("_ test_fails_on_its_own _") :]
    own = own[: own.index("\n_")] if "\n_" in own else own
    assert "did not declare" not in own, own
