"""Where chainfs's log goes, and how a flood of one warning is kept to a trickle.

In the foreground the log goes to stderr, with timestamps; when stderr is systemd's
journal (``JOURNAL_STREAM`` names it) each line instead starts with the ``<N>`` priority
prefix the journal understands and carries no timestamp of its own.  A daemon (``chainfs
mount`` without ``-f``) has no stderr and logs to syslog (``/dev/log``, facility daemon),
which the journal also collects, with priorities.  ``-o debug`` lowers the level to DEBUG,
where the filesystem traces every request.

``Throttle`` is for warnings that can repeat once per request or per cluster (a damaged
cluster read over and over, a disk that keeps failing): each key passes ``burst`` times
per ``interval`` seconds; the rest are counted, and the next message that passes says how
many were suppressed.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

SYSLOG_SOCKET = "/dev/log"
TRACE_BYTES = 64  # byte arguments up to this length are traced in full


class JournalFormatter(logging.Formatter):
    """``<priority>message``: the journal reads the prefix off each stderr line."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = max((lv for lv in self.PRIORITIES if lv <= record.levelno), default=logging.DEBUG)
        prefix = f"<{self.PRIORITIES[level]}>"
        # every line of a multi-line message (a traceback) keeps the priority
        return "\n".join(prefix + line for line in text.splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd set up for this service."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup(*, debug: bool, syslog: bool) -> logging.Handler:
    """Send the root logger to stderr (foreground) or syslog (daemon); return the handler."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if syslog:
        if not os.path.exists(SYSLOG_SOCKET):
            handler = logging.NullHandler()  # no syslog daemon, no journal: nowhere to log
        else:
            handler = logging.handlers.SysLogHandler(
                SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
            handler.setFormatter(logging.Formatter("chainfs[%(process)d]: %(message)s"))
    elif stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


class Throttle:
    """Rate-limit messages per key: ``burst`` per ``interval`` seconds, the rest counted."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        # key -> [window start, messages passed in the window, messages suppressed]
        self._state: dict[Hashable, list[Any]] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log unless ``key`` has used up its burst; return whether it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        state = self._state.get(key)
        if state is None or now - state[0] >= self.interval:
            suppressed = state[2] if state is not None else 0
            state = self._state[key] = [now, 0, suppressed]
            if len(self._state) > 1024:  # forget old keys, keep this one
                self._state = {key: state}
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            msg += " (%d similar messages suppressed)"
            args = (*args, state[2])
            state[2] = 0
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kwargs)


def describe_call(name: str, args: tuple[object, ...]) -> str:
    """``read(3, 0, 131072)``: a request as the debug trace shows it (no payloads)."""
    parts = []
    for a in args:
        if isinstance(a, bytes | bytearray | memoryview):
            parts.append(repr(bytes(a)) if len(a) <= TRACE_BYTES else f"<{len(a)} bytes>")
        elif a is None or isinstance(a, int | str | float):
            parts.append(repr(a))
        else:
            parts.append(type(a).__name__)
    return f"{name}({', '.join(parts)})"
