"""A pytest plugin that fails a test when chainfs logs a warning the test did not declare.

After the setup and the call of each test, and again after its teardown, every line
logged since the last check is looked at: a ``WARNING``, ``ERROR`` or ``CRITICAL`` line,
or a ``Traceback``, fails the test unless a pattern the test declared matches it.  A test
declares what it expects with a marker (on the test, its class, or a module's
``pytestmark``), each pattern a regular expression searched in the line::

    @pytest.mark.expect_log(r"command refused", r"WARNING chainfs\\.jobs\\.base: .*failed")
    def test_refuses_a_stale_base(...): ...

The lines come from sources: this module watches the ``chainfs`` loggers of the test
process, formatting each record as ``LEVEL NAME: MESSAGE``; ``tests/mount/conftest.py``
adds the logs of the servers it starts (``watch``), whose lines have the same shape after
their timestamp.  The idea is s3ql's ``tests/pytest_checklogs.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator, Iterable

import pytest

MARKER = "expect_log"
SUSPICIOUS = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback ")

_pending = pytest.StashKey[list[str]]()


class Recorder(logging.Handler):
    """Keeps the records of WARNING and above, formatted as the servers' log lines are."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # the message without an attached traceback: the level line is what is judged
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def take(self) -> list[str]:
        self.acquire()  # records may come from worker threads
        try:
            lines, self.lines = self.lines, []
        finally:
            self.release()
        return lines


_recorder = Recorder()
_sources: list[Callable[[], Iterable[str]]] = [_recorder.take]


def watch(source: Callable[[], Iterable[str]]) -> None:
    """Check the lines ``source()`` returns: each call, those logged since the last one."""
    _sources.append(source)


def declared(item: pytest.Item) -> list[re.Pattern[str]]:
    """The patterns of every ``expect_log`` marker that applies to ``item``."""
    return [re.compile(p) for mark in item.iter_markers(MARKER) for p in mark.args]


def unexpected(lines: Iterable[str], patterns: Iterable[re.Pattern[str]]) -> list[str]:
    """The suspicious lines among ``lines`` that no pattern matches."""
    allowed = list(patterns)
    return [
        line
        for line in lines
        if SUSPICIOUS.search(line) and not any(p.search(line) for p in allowed)
    ]


def _collect(item: pytest.Item) -> list[str]:
    pending = item.stash.setdefault(_pending, [])
    for source in _sources:
        pending.extend(source())
    return pending


def _discard(item: pytest.Item) -> None:
    """A phase failed on its own: that failure is the report, the lines go with it."""
    _collect(item)
    item.stash[_pending] = []


def _check(item: pytest.Item, when: str) -> None:
    lines = _collect(item)
    item.stash[_pending] = []
    bad = unexpected(lines, declared(item))
    if bad:
        shown = "\n".join(f"  {line}" for line in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        pytest.fail(
            f"{len(bad)} log line(s) during {when} the test did not declare "
            f"(@pytest.mark.{MARKER}(PATTERN, ...)):\n{shown}{more}",
            pytrace=False,
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*patterns): regular expressions of the WARNING/ERROR log lines the test "
        "expects (tests/checklogs.py)",
    )
    logger = logging.getLogger("chainfs")
    if _recorder not in logger.handlers:
        logger.addHandler(_recorder)


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger("chainfs").removeHandler(_recorder)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    # what was logged between two tests is the next test's: collected with its setup
    try:
        result = yield
    except BaseException:
        _discard(item)
        raise
    _collect(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    try:
        result = yield
    except BaseException:
        _discard(item)
        raise
    _check(item, "setup and call")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None]:
    try:
        result = yield
    except BaseException:
        _discard(item)
        raise
    _check(item, "teardown")
    return result
