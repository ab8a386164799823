"""A chain's ``events``: what the control file shows, its bounded history on disk, and
the chain's job-id counter.

The ``events`` file shows the history the last mount left (at most ``LIMIT`` lines)
followed by every line since: it only grows while mounted, so ``tail -f`` follows it.
On disk the history sits with the chain's other files (owner, state, journal), written
only by the chain's owner::

    .chainfs/NAME.events      the current segment: key=value lines, as shown
    .chainfs/NAME.events.1    the segment before it
    .chainfs/NAME.ids         the last job number given out on the chain

Earlier versions kept them in one directory for all chains (``.chainfs.events/NAME.log``,
``NAME.log.1``, ``NAME.ids``): the chain's owner moves each file (a rename, file by
file: a crash between two leaves each in one place or the other, and a reader takes
each from where it is), and the old directory goes once the last chain moved out.

Bounded: a segment holds at most ``LIMIT / 2`` lines; the append that would pass that
first renames the segment over ``.log.1`` (one atomic step: the older segment goes),
so the two never hold more than ``LIMIT`` lines.  Crash-safe: each line is appended with
one ``write`` and made durable (``fdatasync``) before the command that caused it
returns; reading keeps the complete, well-formed lines and drops the rest (a torn last
line, garbage a power loss left), and the first append after such a read rewrites the
segment without them, so a new line never glues onto a torn one.  A rotation that
stops half-way leaves one segment or the other, never a mixed file.

Job ids are ``TYPE-N`` with ``N`` counting up per chain for the chain's whole life: the
counter is written (in place, fixed width, synced) before an id is used, and when it is
read back it is never taken lower than the highest ``N`` the history names, so ids never
repeat across unmounts and crashes.  A job resumed after one keeps its id.

The disk failing under the log (a full disk) never fails a command: the line is still
shown, the log says so (a few times a minute at most), and the next append tries again;
only an id that cannot be recorded refuses the job that asked for it.

Locking contract: used only from the trio thread (or before it starts).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from datetime import UTC, datetime

from .control import format_line, parse_line
from .hostfile import HostIOError, open_meta, read_meta, sync_dir
from .logs import Throttle

log = logging.getLogger(__name__)
_throttle = Throttle(log)

EVENTS_DIR = ".chainfs"  # (``ownership.OWN_DIR``: the chain's files)
LEGACY_EVENTS_DIR = ".chainfs.events"  # earlier versions: the histories of every chain
LIMIT = 10_000  # lines of history kept across mounts
SEGMENT = LIMIT // 2  # lines per segment file
_ID_WIDTH = 20  # digits of the counter file (an int64 fits)
_JOB_NUMBER = re.compile(r"[a-z][a-z-]*-([0-9]{1,18})")
_MAX_STEM = 200  # bytes of a chain name used as a file name as it is


def _stem(chain: str) -> str:
    """The file-name stem of a chain's log: its name, or (too long for a file name with
    a suffix, or no file name: a ``/`` in it, as a forged state record could give) a
    prefix of it and a digest; never a path out of the directory."""
    raw = os.fsencode(chain)
    if len(raw) <= _MAX_STEM and not chain.startswith(".") and not {"/", "\0"} & set(chain):
        return chain
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[:100].replace(b"/", b"_").replace(b"\0", b"_")
    return os.fsdecode(head).rstrip(".") + "~" + digest


def _valid(line: bytes) -> bool:
    """A line the log could have written: UTF-8 ``key=value`` pairs naming an event."""
    try:
        pairs = parse_line(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return "event" in pairs


def _read_lines(path: str) -> tuple[list[bytes], int]:
    """The valid lines of a segment (without newlines), and how many were dropped."""
    try:
        data = read_meta(path)
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        log.warning("events=%s cannot be read: %s", path, e.strerror)
        return [], 0
    parts = data.split(b"\n")
    tail = parts.pop()  # after the last newline: empty, or a torn line
    good = [p for p in parts if _valid(p)]
    return good, len(parts) - len(good) + (1 if tail else 0)


class EventLog:
    """The events of one chain.  Without a directory (or read-only) it keeps them in
    memory only."""

    def __init__(self, directory: str | None = None, chain: str = "", *, writable: bool = False):
        self.chain = chain
        self.writable = writable and directory is not None
        self.dir = os.path.join(directory, EVENTS_DIR) if directory is not None else None
        stem = _stem(chain)
        self.path = os.path.join(self.dir, stem + ".events") if self.dir else ""
        self.old_path = self.path + ".1" if self.dir else ""
        self.ids_path = os.path.join(self.dir, stem + ".ids") if self.dir else ""
        # where earlier versions kept them: (old, new)
        self.legacy_dir = os.path.join(directory, LEGACY_EVENTS_DIR) if directory else ""
        self.legacy = (
            [
                (os.path.join(self.legacy_dir, stem + old), new)
                for old, new in ((".log.1", self.old_path), (".ids", self.ids_path))
                + ((".log", self.path),)
            ]
            if directory
            else []
        )
        self._view = bytearray()  # what the ``events`` file shows
        # the log that took this one's place (a take-over: ``carry_into``), where in this
        # log's view it goes on, and from where in its own
        self._next: tuple[EventLog, int, int] | None = None
        self._lines = 0  # lines in the current segment
        self._size = 0  # bytes of well-formed lines in the current segment
        self._repair = False  # the segment holds a torn or damaged line
        self._fd = -1
        self._ids_fd = -1
        self._last_id = 0

    @classmethod
    def open(cls, directory: str, chain: str, *, writable: bool) -> EventLog:
        """The log of ``chain`` in the source directory ``directory``, its history read."""
        events = cls(directory, chain, writable=writable)
        events._load()
        return events

    # -- reading ----------------------------------------------------------------------------

    def _load(self) -> None:
        if self.writable:
            self._migrate()
        # (read-only: each file from where it is, the earlier versions' place or this one)
        where = {new: new if os.path.lexists(new) else old for old, new in self.legacy}
        old, old_bad = _read_lines(where.get(self.old_path, self.old_path))
        cur, cur_bad = _read_lines(where.get(self.path, self.path))
        if old_bad or cur_bad:
            log.warning(
                "chain=%s events: dropped %d torn or damaged lines of the history",
                self.chain,
                old_bad + cur_bad,
            )
        history = (old + cur)[-LIMIT:]
        if history:
            self._view += b"\n".join(history) + b"\n"
        self._lines = len(cur)
        self._size = sum(len(x) + 1 for x in cur)
        self._repair = cur_bad > 0
        self._last_id = max(self._read_counter(), *map(_job_number, history), 0)

    def _migrate(self) -> None:
        """Move the chain's history from where earlier versions kept it, file by file."""
        moved = False
        if os.path.islink(self.legacy_dir):  # not chainfs's: nothing is moved from there
            return
        try:
            for old, new in self.legacy:
                if os.path.lexists(old) and not os.path.lexists(new):
                    assert self.dir is not None
                    os.makedirs(self.dir, exist_ok=True)
                    os.rename(old, new)
                    moved = True
            if not moved:
                return
            assert self.dir is not None
            sync_dir(self.dir)
            sync_dir(self.legacy_dir)
        except OSError as e:
            log.warning("chain=%s events: history not moved to %s: %s", self.chain, self.dir, e)
            return
        log.info("chain=%s events: history moved from %s", self.chain, self.legacy_dir)
        try:
            os.rmdir(self.legacy_dir)  # the last chain moved out
        except OSError:
            return  # (other chains' histories wait there for their owners)
        sync_dir(os.path.dirname(self.legacy_dir))

    def _read_counter(self) -> int:
        ids_path = self.ids_path
        if not os.path.lexists(ids_path):
            ids_path = next((old for old, new in self.legacy if new == ids_path), ids_path)
        try:
            text = read_meta(ids_path, 64)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("events=%s cannot be read: %s", self.ids_path, e.strerror)
            return 0
        digits = text.split(b"\n", 1)[0].strip()
        return int(digits) if digits.isdigit() else 0

    def __len__(self) -> int:
        nxt = self._next
        if nxt is None:
            return len(self._view)
        log, here, there = nxt
        return here + len(log) - there

    def read(self, offset: int, size: int) -> bytes:
        """The bytes at ``offset`` of this log's view, and once another log took its place
        (``carry_into``), from where this view goes on there: a reader that opened the
        file before the change reads on without a torn line, the new log's lines that
        follow what it read included."""
        nxt = self._next
        if nxt is None:
            return bytes(self._view[offset : offset + size])
        log, here, there = nxt
        if offset < here:
            return bytes(self._view[offset : min(here, offset + size)])  # (asked again)
        return log.read(there + offset - here, size)

    def carry_into(self, log: EventLog, shown: int) -> None:
        """``log`` (the chain's history, at a take-over) shows the chain's events from
        now on: the lines this log showed from ``shown`` on are added to it, and a
        reader of this one reads on there (``read``)."""
        since = bytes(self._view[shown:])
        there = len(log)
        for line in since.decode(errors="replace").splitlines():
            log.append(line)
        self._next = (log, shown, there)

    def __bytes__(self) -> bytes:
        return bytes(self._view)

    def decode(self) -> str:
        """All lines as text (what ``bytes(log).decode()`` gives)."""
        return self._view.decode()

    # -- writing ----------------------------------------------------------------------------

    def emit(self, event: str, **fields: object) -> None:
        """Append the line of one event of this chain, stamped with the time (and log it)."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = format_line(
            [("time", stamp), ("event", event), ("chain", self.chain), *fields.items()]
        )
        self.append(line)
        log.info("%s", line)

    def append(self, line: str) -> None:
        """Show ``line`` (one key=value line, no newline) and add it to the history."""
        data = line.encode() + b"\n"
        self._view += data
        if not self.writable:
            return
        try:
            self._write(data)
        except OSError as e:
            self._repair = True  # a short write may have left a torn line
            _throttle.warning(
                ("events", self.chain),
                "chain=%s events cannot be written to %s: %s",
                self.chain,
                self.path,
                e.strerror,
            )

    def _write(self, data: bytes) -> None:
        if self._repair:
            self._rewrite()
        if self._lines >= SEGMENT:
            self._rotate()
        fd = self._open()
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(errno.ENOSPC, "short write")
        os.fdatasync(fd)
        self._lines += 1
        self._size += len(data)

    def _open(self) -> int:
        if self._fd < 0:
            assert self.dir is not None
            if not os.path.isdir(self.dir):
                os.makedirs(self.dir, exist_ok=True)
                sync_dir(os.path.dirname(self.dir))
            self._fd = open_meta(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            if os.fstat(self._fd).st_size == 0:
                os.fdatasync(self._fd)
                sync_dir(self.dir)  # the new file itself must survive a power loss
        return self._fd

    def _rotate(self) -> None:
        """The current segment becomes the older one; the next line starts a new one."""
        assert self.dir is not None
        self.close()
        os.replace(self.path, self.old_path)
        sync_dir(self.dir)
        self._lines = self._size = 0

    def _rewrite(self) -> None:
        """Drop the torn and damaged lines of the current segment, atomically."""
        assert self.dir is not None
        self.close()
        good, _ = _read_lines(self.path)
        tmp = self.path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # (a file left by a crash, or planted: a new one is made)
        with open(open_meta(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(b"".join(x + b"\n" for x in good))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        sync_dir(self.dir)
        self._lines, self._size = len(good), sum(len(x) + 1 for x in good)
        self._repair = False

    # -- job ids ----------------------------------------------------------------------------

    def next_id(self, kind: str) -> str:
        """A new job id, ``KIND-N``, never given out before on this chain (recorded
        before it is returned: HostIOError if that fails)."""
        n = self._last_id + 1
        if self.writable:
            try:
                self._write_counter(n)
            except OSError as e:
                raise HostIOError(
                    f"recording a job id in {self.ids_path!r} failed: {e.strerror}",
                    e.errno or errno.EIO,
                ) from None
        self._last_id = n
        return f"{kind}-{n}"

    def _write_counter(self, n: int) -> None:
        if self._ids_fd < 0:
            assert self.dir is not None
            self._open()  # the directory
            self._ids_fd = open_meta(self.ids_path, os.O_RDWR | os.O_CREAT)
            created = os.fstat(self._ids_fd).st_size == 0
        else:
            created = False
        # in place and fixed width: one sector, never a mix of two numbers' digits
        data = b"%0*d\n" % (_ID_WIDTH, n)
        if os.pwrite(self._ids_fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        os.fdatasync(self._ids_fd)
        if created:
            sync_dir(self.dir or ".")

    def close(self) -> None:
        for name in ("_fd", "_ids_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass


def _job_number(line: bytes) -> int:
    """The ``N`` of the job id a history line names (0: none)."""
    try:
        pairs = parse_line(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return 0
    match = _JOB_NUMBER.fullmatch(pairs.get("job", ""))
    return int(match[1]) if match else 0
