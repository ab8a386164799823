"""The ``chainfs`` command line: argparse subcommands, each a thin call into the package.

This is the one place that turns errors into exit codes: a ``ChainfsError`` (or an
``OSError`` from the host) becomes one line ``chainfs: <message>`` on stderr and exit
status 1, never a traceback.  ``check`` exits as ``qemu-img check`` does (0, 1, 2, 3, 63);
a job followed with ``--wait`` exits 1 when it fails or is cancelled and 130 when
following is interrupted.

``mount`` serves in a daemon and returns once the filesystem is ready (``-f`` stays in
the foreground).  As ``mount.fuse3`` calls a filesystem's program as ``chainfs SOURCE
MOUNTPOINT -o OPTS``, a command line that starts with two paths (the first one existing
or with a slash in it) is read as ``mount``; any other first word must be a command.
The job subcommands write the control files, exactly as ``echo`` would, and ``--wait``
follows the job through ``events`` and ``jobs``.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .control import COMMANDS, format_line, parse_line, quote
from .errors import ChainfsError
from .features import describe, version_text
from .inspection import human_size

# The piece size ``digest`` reads the flat disk in.
DIGEST_PIECE = 1 << 20
UMOUNT_TIMEOUT = 120.0
JOB_COMMANDS = COMMANDS  # one subcommand per control file that takes a command
# what each job subcommand's --help says (QEMU's name for the verb in brackets)
JOB_HELP = {
    "snapshot": "FILE: add an overlay on top of the chain",
    "stream": "[base=LAYER] [node=LAYER] [speed=RATE]: copy data up into a layer",
    "commit": "[top=LAYER] [base=LAYER] [speed=RATE] [wait=ready] [copy-mode=MODE]: "
    "merge layers down",
    "copy": "DEST [sync=full|top] [speed=RATE] [wait=ready] [copy-mode=MODE]: "
    "move the live disk to DEST",
    "backup": "DEST [sync=full|top|none|bitmap] [bitmap=NAME] [bitmap-mode=MODE] "
    "[base=PREV] [speed=RATE] [format=qcow2|raw] [compress=on]: "
    "a point-in-time copy of the live disk into DEST (blockdev-backup)",
    "cancel": "JOB: stop a job; the chain stays as it was (job-cancel)",
    "complete": "JOB: pivot a job waiting in ready (job-complete)",
    "speed": "JOB RATE: change a running job's rate limit, 0 for none (block-job-set-speed)",
    "pause": "JOB: pause a job; it shows as paused in jobs (job-pause)",
    "resume": "JOB: resume a paused job (job-resume)",
    "change": "JOB copy-mode=write-blocking: copy a copy's or active commit's guest writes "
    "before they are acknowledged from now on (block-job-change)",
    "bitmap": "add NAME [granularity=SIZE] [disabled] | remove|clear|enable|disable NAME | "
    "merge TARGET SOURCE...: persistent dirty bitmaps of the active layer "
    "(block-dirty-bitmap-*)",
    "adopt": "[timeout=SECONDS]: take over a chain whose owner (another host or mount) "
    "died: wait for its locks, then finish or resume its jobs here",
    "inactivate": ": flush the chain and give it up for another host to activate (live "
    "migration); refused while a job runs",
    "activate": ": serve read-write a chain another host inactivated",
}
HOST_COMMANDS = ("adopt", "inactivate", "activate")
IMAGE_COMMANDS = ("info", "check", "digest")
POLL_INTERVAL = 0.2  # how often --wait looks at the job
PLAIN_INTERVAL = 1.0  # how often --wait prints a progress line when not on a terminal
RATE_WINDOW = 5.0  # seconds of progress the rate (and so the time left) is measured over
MIN_RATE_SPAN = 1.0  # no rate shown from looks closer together than this
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a command killed by SIGPIPE
BAR_TAIL = 50  # columns kept for the numbers after the progress bar

# keys of the control files that hold numbers (as numbers in ``status --json``)
NUMERIC_KEYS = frozenset(
    {"pid", "virtual-size", "allocated", "offset", "len", "speed", "copied", "remaining"}
)

log = logging.getLogger(__name__)


# -- image files without a mount -------------------------------------------------------------


def cmd_digest(ns: argparse.Namespace) -> int:
    """Print the xxh3-128 digest of the flat disk of the chain whose active layer is IMAGE."""
    import xxhash

    from .chain import Chain

    h = xxhash.xxh3_128()
    with Chain.open(ns.image) as chain:
        size = chain.size
        for offset in range(0, size, DIGEST_PIECE):
            h.update(chain.read(offset, min(DIGEST_PIECE, size - offset)))
    print(h.hexdigest())
    return 0


def cmd_info(ns: argparse.Namespace) -> int:
    from .inspection import info

    images = info(ns.image, backing_chain=ns.backing_chain)
    if ns.output == "json":
        data: Any = [i.to_json() for i in images] if ns.backing_chain else images[0].to_json()
        print(json.dumps(data, indent=4))
    else:
        print("\n\n".join(i.text() for i in images))
    return 0


def cmd_check(ns: argparse.Namespace) -> int:
    from .formats.qcow2.check import CHECK_LEAKS
    from .inspection import check, check_status, repair_leaks

    try:
        if ns.repair == "leaks":
            if ns.force_share:
                raise ChainfsError("-U cannot be used with -r: a repair takes the write lock")
            before, result = repair_leaks(ns.image)
            repaired = before.leaks - result.leaks
            if ns.output == "human" and before.status == CHECK_LEAKS and repaired > 0:
                print(
                    "The following inconsistencies were found and repaired:\n\n"
                    f"    {repaired} leaked clusters\n    0 corruptions\n\n"
                    "Double checking the fixed image now..."
                )
        else:
            result = check(ns.image, force_share=ns.force_share)
    except ChainfsError as e:
        print(f"chainfs: {e}", file=sys.stderr)
        return check_status(e)
    if ns.output == "json":
        print(json.dumps(result.to_json(), indent=4))
    else:
        print(result.text())
    return result.status


# -- mount -----------------------------------------------------------------------------------


def cmd_mount(ns: argparse.Namespace) -> int:
    from . import logs
    from .mount import parse_options, serve

    opts = parse_options(ns.options)
    opts.adopt += ns.adopt
    if ns.foreground:
        logs.setup(debug=opts.debug, syslog=False)
        serve(ns.source, ns.mountpoint, opts)
        return 0
    # Daemon: the child serves; the parent waits on a pipe for "ready" or the reason the
    # mount failed, so that `chainfs mount` returns only once the filesystem is usable.
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.read()
        if answer == b"ready":
            if os.path.ismount(os.path.realpath(ns.mountpoint)):
                return 0
            # (it died right after: its reason is in its log)
            print(
                f"chainfs: the daemon (pid {pid}) said the mount was ready, but nothing "
                f"is mounted on {ns.mountpoint!r}; see its log",
                file=sys.stderr,
            )
            return 1
        os.waitpid(pid, 0)
        print(f"chainfs: {answer.decode(errors='replace') or 'the daemon died'}", file=sys.stderr)
        return 1
    os.close(r)
    status = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        logs.setup(debug=opts.debug, syslog=True)

        told: list[bool] = []  # the pipe said "ready" and was closed: its number is reused

        def ready() -> None:
            os.write(w, b"ready")
            os.close(w)
            told.append(True)

        try:
            serve(ns.source, ns.mountpoint, opts, ready=ready)
            status = 0
        except ChainfsError as e:
            log.error("%s", e)
            if not told:
                _tell(w, str(e))
        except BaseException as e:
            log.exception("the daemon failed")
            if not told:
                _tell(w, _failure(e))
    finally:
        os._exit(status)


def _failure(e: BaseException) -> str:
    """What to tell ``chainfs mount`` of the daemon's failure: the one exception inside
    the trio nursery's group, not the group."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return str(e) if isinstance(e, ChainfsError) else f"the daemon failed: {e}"


def _tell(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    except OSError:
        pass  # the parent is gone or was already told "ready"


# -- talking to a mount ----------------------------------------------------------------------


def _control(mountpoint: str, *parts: str) -> str:
    return os.path.join(os.path.abspath(mountpoint), "control", *parts)


def _read_status(mountpoint: str) -> list[dict[str, str]]:
    path = _control(mountpoint, ".status")
    try:
        with open(path) as f:
            return [parse_line(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise ChainfsError(f"{os.path.abspath(mountpoint)!r} is not a chainfs mount") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            from .mount import dead_mount_message

            raise ChainfsError(dead_mount_message(os.path.abspath(mountpoint))) from None
        raise ChainfsError(f"cannot read {path!r}: {(e.strerror or str(e)).lower()}") from None


def _read_lines(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return [parse_line(line) for line in f if line.strip()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def cmd_umount(ns: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(ns.mountpoint)
    if ns.lazy:
        # detach now, whatever state the mount is in (a dead one above all); a live
        # daemon finishes once the last file open on the mount is closed: no waiting
        proc = subprocess.run(
            ["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True, check=False
        )
        if proc.returncode:
            raise ChainfsError(
                proc.stderr.strip().removeprefix("fusermount3: ") or "unmount failed"
            )
        return 0
    pid = int(_read_status(mountpoint)[0]["pid"])
    proc = subprocess.run(
        ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise ChainfsError(proc.stderr.strip().removeprefix("fusermount3: ") or "unmount failed")
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            raise ChainfsError(
                f"the daemon (pid {pid}) has not exited after {UMOUNT_TIMEOUT:.0f} s"
            )
        time.sleep(0.05)
    return 0


def _typed(entry: dict[str, str]) -> dict[str, Any]:
    """A control-file line with its numbers as numbers and its booleans as booleans."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in NUMERIC_KEYS and value.isdigit():
            out[key] = int(value)
        elif value in ("true", "false"):
            out[key] = value == "true"
        else:
            out[key] = value
    return out


def gather(mountpoint: str) -> dict[str, Any]:
    """The daemon, and every chain with its layers and jobs (or why it was refused)."""
    status = _read_status(mountpoint)
    daemon, entries = status[0], status[1:]
    chains = []
    for entry in entries:
        item = _typed(entry)
        if entry.get("status") == "served":
            item["layers"] = [
                _typed(x) for x in _read_lines(_control(mountpoint, entry["chain"], "chain"))
            ]
            item["jobs"] = [
                _typed(x) for x in _read_lines(_control(mountpoint, entry["chain"], "jobs"))
            ]
        chains.append(item)
    return {"daemon": _typed(daemon), "chains": chains}


def _stem(name: str) -> str:
    return name[: -len(".qcow2")] if name.endswith(".qcow2") else name


def draw_chain(layers: list[dict[str, Any]]) -> str:
    """``[A] <- [B] <- [E]``: base on the left, active layer on the right, as in the SPEC."""
    return " <- ".join(f"[{_stem(str(x['name']))}]" for x in reversed(layers))


def _percent(done: int, total: int) -> int:
    return done * 100 // total if total > 0 else 0


def render_status(info: dict[str, Any]) -> str:
    d = info["daemon"]
    mode = "read-only" if d.get("readonly") is True else "read-write"
    lines = [f"{d['mountpoint']}: {d['source']} (pid {d['pid']}, {mode})"]
    if "holes" in d:  # (a daemon older than the key says nothing)
        lines.append(describe(d.get("pyfuse3"), d["holes"] is True))
    served = [c for c in info["chains"] if c.get("status") == "served"]
    refused = [c for c in info["chains"] if c.get("status") != "served"]
    for c in served:
        layers = c["layers"]
        size = human_size(int(layers[0]["virtual-size"])) if layers else "?"
        lines.append("")
        lines.append(f"{c['chain']}  {size}  {draw_chain(layers)}")
        owner = c.get("owner")
        if owner == "elsewhere":
            lines.append(f"{c['chain']}: served read-only, owned by {c.get('holder', '?')}")
            if c.get("unstable"):  # what it serves may change under it: the owner's job
                lines.append(f"{c['chain']}: unstable: {c['unstable']}")
        elif owner == "none" and d.get("readonly") is not True:
            lines.append(f"{c['chain']}: served read-only, owned by nobody (activate or adopt it)")
        elif owner == "lost":
            lines.append(f"{c['chain']}: lost ownership: {c.get('reason', '?')}")
        if c.get("warning"):
            lines.append(f"    warning: {c['warning']}")
        width = max((len(str(x["name"])) for x in layers), default=0)
        for x in layers:
            lines.append(
                f"    {x['name']!s:<{width}}  {x['role']:<7}  "
                f"{human_size(int(x['allocated'])):>9} allocated  {x['format']}"
            )
        for j in c["jobs"]:
            if j.get("status") == "interrupted":  # on a read-only mount
                lines.append(
                    f"    job {j['id']}: {j['type']} interrupted at "
                    f"{human_size(int(j['offset']))}, waits for {j.get('waits-for', '?')}"
                )
                continue
            if j.get("status") == "running-elsewhere":  # the owner's, from its journal
                lines.append(
                    f"    job {j['id']}: {j['type']} running on another host "
                    f"(owned by {j.get('owner', '?')}), at {human_size(int(j['offset']))}"
                )
                continue
            off, length = int(j["offset"]), int(j["len"])
            speed = int(j.get("speed", 0))
            limit = f", speed limit {human_size(speed)}/s" if speed else ""
            if "remaining" in j:  # a mirror: what it still has to copy, and how
                limit += f", {human_size(int(j['remaining']))} left, {j.get('copy-mode')}"
            lines.append(
                f"    job {j['id']}: {j['type']} {j['status']} {_percent(off, length)}% "
                f"({human_size(off)} of {human_size(length)}{limit})"
            )
        if not c["jobs"]:
            lines.append("    no job running")
    if refused:
        lines.append("")
        lines.append("refused:")
        for c in refused:
            where = f" ({c['path']})" if c.get("path") else ""
            lines.append(f"    {c['chain']}{where}: {c.get('reason', '')}")
    if not served and not refused:
        lines.append("no chains")
    return "\n".join(lines)


def cmd_status(ns: argparse.Namespace) -> int:
    info = gather(ns.mountpoint)
    if ns.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_status(info))
    return 0


# -- job commands and --wait -----------------------------------------------------------------


def cmd_job(ns: argparse.Namespace) -> int:
    """Write one command to control/CHAIN/KIND, as ``echo ARGS > ...`` would."""
    path = _control(ns.mountpoint, ns.chain, ns.command)
    events = _control(ns.mountpoint, ns.chain, "events")
    if not os.path.isdir(os.path.dirname(path)):
        _read_status(ns.mountpoint)  # "not a chainfs mount" beats "no chain"
        raise ChainfsError(f"no chain {ns.chain!r} under {os.path.abspath(ns.mountpoint)!r}")
    mark = os.path.getsize(events)
    args = list(ns.args)
    if ns.command in HOST_COMMANDS:
        args = [ns.chain, *args]  # the control file wants the chain's name
    elif not args and ns.command in ("stream", "commit"):
        # every argument has a default, but an empty write is refused (so that a stray
        # truncation of the file is no command): spell the default speed out instead
        args = ["speed=0"]
    text = " ".join(quote(a) if "=" not in a else a for a in args) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        reason = _rejection(events, mark) or (e.strerror or str(e)).lower()
        raise ChainfsError(f"{ns.command} refused: {reason}") from None
    if ns.command == "adopt":
        return _wait_adopted(ns.mountpoint, ns.chain, events, mark, sys.stderr)
    if not ns.wait or ns.command in ("snapshot", "pause", "bitmap"):
        return 0  # (a paused job would be followed until someone resumes it)
    follower = Follower(ns.mountpoint, ns.chain, events, mark, sys.stderr)
    if ns.command in ("cancel", "complete", "speed", "resume", "change"):
        follower.job_id = ns.args[0] if ns.args else None
        follower.cancelling = ns.command == "cancel"
    # a sync=none backup (fleecing) runs until ``complete``: --wait ends at its ready
    fleecing = ns.command == "backup" and "sync=none" in ns.args
    follower.until_ready = "wait=ready" in ns.args or fleecing
    return follower.run()


def _wait_adopted(mountpoint: str, chain: str, events: str, mark: int, out: TextIO) -> int:
    """Follow an ``adopt`` until the chain is owned here or the daemon gives up,
    saying every few seconds how long the wait may still last."""
    started = time.monotonic()
    timeout: float | None = None
    said = 0.0
    reader = EventReader(events, mark)
    while True:
        for e in reader.read():
            if e.get("event") == "ADOPT_STARTED" and e.get("timeout", "").isdigit():
                timeout = float(e["timeout"])
            elif e.get("event") == "OWNERSHIP_TAKEN":
                print(f"{chain}: adopted, served read-write", file=out)
                return 0
            elif e.get("event") == "ADOPT_FAILED":
                raise ChainfsError(f"adopt failed: {e.get('reason', '?')}")
        now = time.monotonic()
        if now - said >= 5:
            said = now
            left = f", {max(0, timeout - (now - started)):.0f} s left" if timeout else ""
            holder = next(
                (c.get("holder") for c in _read_status(mountpoint) if c.get("chain") == chain),
                None,
            )
            print(
                f"{chain}: waiting for the owner's lock{left}"
                + (f" (owned by {holder})" if holder else ""),
                file=out,
                flush=True,
            )
        time.sleep(POLL_INTERVAL)


def _rejection(events: str, mark: int) -> str | None:
    for e in reversed(EventReader(events, mark).read()):
        if e.get("event") == "COMMAND_REJECTED":
            return e.get("reason")
    return None


class EventReader:
    """The lines appended to an ``events`` file since a mark, each parsed once."""

    def __init__(self, path: str, mark: int) -> None:
        self.path = path
        self.pos = mark
        self._partial = b""

    def read(self) -> list[dict[str, str]]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        out = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                out.append(parse_line(line))
            except ValueError:
                continue
        return out


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """A job's progress: a bar redrawn in place on a terminal, plain lines otherwise.

    The rate is that of the bytes the job copied (its ``copied`` counter, which its
    ``speed=`` limits), measured over the last ``RATE_WINDOW`` seconds once they span
    ``MIN_RATE_SPAN``, and never shown above the job's own limit (a job copies a step
    at once and then waits, so a short window can catch it mid-burst).  ``offset`` is
    not a rate: a stream's passes over whole stretches with nothing to copy in one go.
    The time left is the bytes still to copy at that rate, estimated as the share of
    the bytes passed so far that needed copying, applied to the bytes not yet passed.
    Plain lines are ``key=value`` pairs like the control files, one every
    ``PLAIN_INTERVAL`` seconds (and whenever the job's state changes), so a log of them
    can be grepped.
    """

    def __init__(
        self, out: TextIO, *, tty: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out = out
        self.tty = tty
        self.clock = clock
        # (time, offset, copied) of recent looks, and of the first one
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self.first: tuple[float, int, int] | None = None
        self.speed = 0
        self.last_plain = -PLAIN_INTERVAL
        self.last_status: str | None = None
        self.drawn = False

    def rate(self) -> float | None:
        """Bytes copied per second, recently; None until there is enough to tell."""
        if len(self.samples) < 2:
            return None
        (t0, _, c0), (t1, _, c1) = self.samples[0], self.samples[-1]
        if t1 - t0 < MIN_RATE_SPAN:
            return None
        rate = (c1 - c0) / (t1 - t0)
        return min(rate, self.speed) if self.speed > 0 else rate

    def to_copy(self, offset: int, total: int) -> float | None:
        """The bytes still to copy: what the part passed so far needed, pro rata."""
        if self.first is None or total <= offset:
            return 0.0 if total <= offset else None
        _, o0, c0 = self.first
        _, o1, c1 = self.samples[-1]
        if o1 <= o0 or c1 <= c0:
            return None  # nothing passed, or nothing copied yet: no telling
        return (c1 - c0) / (o1 - o0) * (total - offset)

    def update(self, job: dict[str, str]) -> None:
        now = self.clock()
        done, total = int(job.get("offset", 0)), int(job.get("len", 0))
        copied = int(job.get("copied", done))  # (a daemon before 0.2.1 shows no copied)
        self.speed = int(job.get("speed", 0) or 0)
        sample = (now, done, copied)
        if self.first is None:
            self.first = sample
        self.samples.append(sample)
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        rate = self.rate()
        to_copy = self.to_copy(done, total)
        left: float | None = None
        if to_copy == 0.0:
            left = 0.0 if rate is not None else None
        elif to_copy is not None and rate:
            left = to_copy / rate
        status = job.get("status", "?")
        if self.tty:
            self._draw(job.get("id", "?"), status, done, total, rate, left)
        elif now - self.last_plain >= PLAIN_INTERVAL or status != self.last_status:
            self.last_plain = now
            line = format_line(
                [
                    ("job", job.get("id", "?")),
                    ("status", status),
                    ("done", done),
                    ("len", total),
                    ("percent", _percent(done, total)),
                    ("copied", copied),
                    ("rate", None if rate is None else int(rate)),
                    ("eta", None if left is None else int(left + 0.5)),
                ]
            )
            print(line, file=self.out, flush=True)
        self.last_status = status

    def _draw(
        self,
        job_id: str,
        status: str,
        done: int,
        total: int,
        rate: float | None,
        left: float | None,
    ) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        pct = _percent(done, total)
        head = f"{job_id} {status} "
        tail = f" {pct:3d}%  {human_size(done)} / {human_size(total)}"
        tail += f"  {human_size(int(rate))}/s" if rate is not None else "  -- /s"
        tail += f"  {_duration(left)} left" if left is not None else ""
        # a width that does not jump as the numbers after the bar change length
        bar_width = max(10, min(40, width - len(head) - BAR_TAIL))
        filled = bar_width * pct // 100
        bar = "[" + "#" * filled + "-" * (bar_width - filled) + "]"
        line = (head + bar + tail)[: max(1, width - 1)]
        self.out.write("\r" + line + "\x1b[K")
        self.out.flush()
        self.drawn = True

    def finish(self) -> None:
        """End the bar's line, so that what follows starts on a line of its own."""
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


class Follower:
    """Follow one job on one chain until it ends; Ctrl-C stops following, not the job."""

    def __init__(self, mountpoint: str, chain: str, events: str, mark: int, out: TextIO) -> None:
        self.mountpoint = mountpoint
        self.chain = chain
        self.events = EventReader(events, mark)
        self.out = out
        self.job_id: str | None = None
        self.cancelling = False
        self.until_ready = False
        self.progress = Progress(out, tty=out.isatty())

    def say(self, message: str) -> None:
        self.progress.finish()
        print(message, file=self.out, flush=True)

    def _ended(self, e: dict[str, str]) -> int | None:
        """The exit status if event ``e`` ends the wait, else None."""
        kind = e.get("event")
        if kind == "JOB_CANCELLED":
            if self.cancelling:
                self.say(f"job {self.job_id} cancelled")
                return 0
            self.say(f"chainfs: job {self.job_id} was cancelled")
            return 1
        if kind == "JOB_COMPLETED":
            if e.get("error"):
                self.say(f"chainfs: job {self.job_id} failed: {e['error']}")
                return 1
            if self.cancelling:
                self.say(f"job {self.job_id} completed before it could be cancelled")
            else:
                self.say(f"job {self.job_id} completed")
            return 0
        if kind == "JOB_READY" and self.until_ready and e.get("type") == "backup":
            self.say(
                f"job {self.job_id} copies before writes until "
                f"'chainfs complete {self.mountpoint} {self.chain} {self.job_id}'"
            )
            return 0
        if kind == "JOB_READY" and self.until_ready:
            self.say(
                f"job {self.job_id} is ready; pivot with "
                f"'chainfs complete {self.mountpoint} {self.chain} {self.job_id}'"
            )
            return 0
        return None

    def step(self) -> int | None:
        """Look once at events and jobs; the exit status once the job has ended."""
        for e in self.events.read():
            if self.job_id is None and e.get("event") == "JOB_STARTED":
                self.job_id = e.get("job")
            if self.job_id is not None and e.get("job") == self.job_id:
                ended = self._ended(e)
                if ended is not None:
                    return ended
        for j in _read_lines(_control(self.mountpoint, self.chain, "jobs")):
            if j.get("id") == self.job_id:
                self.progress.update(j)
        return None

    def run(self) -> int:
        try:
            while True:
                try:
                    ended = self.step()
                except OSError as e:
                    self.say(
                        f"chainfs: lost the mount while following job {self.job_id or '?'}: "
                        f"{(e.strerror or str(e)).lower()}"
                    )
                    return 1
                if ended is not None:
                    return ended
                time.sleep(POLL_INTERVAL)
        except KeyboardInterrupt:
            job = self.job_id or "?"
            self.say(
                f"chainfs: stopped following; job {job} keeps running "
                f"(see 'chainfs status {self.mountpoint}', "
                f"stop it with 'chainfs cancel {self.mountpoint} {self.chain} {job}')"
            )
            return EXIT_INTERRUPTED


# -- the parser ------------------------------------------------------------------------------


def _subcommand(
    sub: Any,
    func: Callable[[argparse.Namespace], int],
    usage: str,
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand ``usage`` ("NAME ARG1 ARG2": positional arguments named by their
    metavar) that runs ``func``."""
    name, *positionals = usage.split()
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    for metavar in positionals:
        parser.add_argument(metavar.lower(), metavar=metavar)
    parser.set_defaults(func=func)
    return parser


class _Version(argparse.Action):
    """``--version``: chainfs's, pyfuse3's, and whether holes and discard are on (which
    imports pyfuse3, so only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainfs",
        description="Show chains of QEMU disk images as flat raw disks, and run live block "
        "operations on them.",
        epilog="See chainfs(1) for the mounted tree, the control files and the errors.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="show the version, and whether holes and discard are on, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mount = _subcommand(
        sub,
        cmd_mount,
        "mount SOURCE MOUNTPOINT",
        "mount the chains of SOURCE on MOUNTPOINT",
        "Mount the chains of SOURCE (a directory of images or a TOML file) on MOUNTPOINT. "
        "Returns once the mount is ready; the daemon keeps serving.",
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (for systemd)"
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="ro, allow_other, debug, allow_dir=PATH, allow_backing=PATH, lease=SECONDS, "
        "adopt=CHAIN, cache_size=SIZE (repeatable)",
    )
    mount.add_argument(
        "--adopt",
        action="append",
        default=[],
        metavar="CHAIN",
        help="take over CHAIN from a dead owner: wait for its locks, then finish or resume "
        "its jobs here (repeatable)",
    )
    umount = _subcommand(
        sub, cmd_umount, "umount MOUNTPOINT", "unmount cleanly and wait for the daemon"
    )
    umount.add_argument(
        "-l",
        "--lazy",
        action="store_true",
        help="detach at once, without waiting (fusermount3 -u -z): for a mount whose "
        "daemon was killed",
    )
    status = _subcommand(
        sub, cmd_status, "status MOUNTPOINT", "show the chains, jobs and refusals of a mount"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    for kind in JOB_COMMANDS:
        job = _subcommand(
            sub,
            cmd_job,
            f"{kind} MOUNTPOINT CHAIN",
            f"{kind} {JOB_HELP[kind]}",
            f"Write ARGS to control/CHAIN/{kind}: {JOB_HELP[kind]}.",
        )
        job.add_argument("args", nargs="*", metavar="ARGS", help="as in the control file")
        job.add_argument(
            "--wait", action="store_true", help="follow the job until it ends, with progress"
        )
    info = _subcommand(
        sub,
        cmd_info,
        "info IMAGE",
        "show what an image file is (as qemu-img info)",
        "Show an image's format, sizes and backing file, read by chainfs's own drivers, "
        "without a mount and without taking image locks.",
    )
    info.add_argument("--backing-chain", action="store_true", help="also every backing file")
    info.add_argument("--output", choices=("human", "json"), default="human")
    check = _subcommand(
        sub,
        cmd_check,
        "check IMAGE",
        "check a qcow2 image for corruptions and leaks (as qemu-img check)",
        "Walk a qcow2 image's L1/L2 tables, snapshots, bitmaps and refcounts and report "
        "corruptions and leaked clusters; with -r leaks, repair leaked clusters (only: "
        "nothing is repaired on an image with corruptions). Exit status, of the image "
        "after any repair: 0 clean, 1 check not completed, 2 corruptions, 3 leaked "
        "clusters only, 63 nothing to check (raw).",
    )
    check.add_argument("--output", choices=("human", "json"), default="human")
    check.add_argument(
        "-r",
        dest="repair",
        choices=("leaks",),
        help="repair leaked clusters (as qemu-img check -r leaks), taking QEMU's write lock",
    )
    check.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="check even an image another program (QEMU, a mount) is writing",
    )
    digest = _subcommand(
        sub,
        cmd_digest,
        "digest",
        "print the xxh3-128 digest of a chain's flat disk",
        "Read the flat disk of the chain whose active layer is IMAGE through chainfs (as a "
        "guest would see it) and print its xxh3-128 hex digest.",
    )
    digest.add_argument("image", metavar="IMAGE", help="the chain's active layer")
    return parser


def _describe_os_error(e: OSError) -> str:
    reason = (e.strerror or str(e)).lower()
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    return reason


def _command_names() -> tuple[str, ...]:
    return ("mount", "umount", "status", *JOB_COMMANDS, *IMAGE_COMMANDS)


def _looks_like_path(word: str) -> bool:
    """A word mount.fuse3 passes as SOURCE: it names something, or has a slash in it."""
    return "/" in word or os.path.lexists(word)


def _as_mount_helper(args: list[str]) -> list[str]:
    """``chainfs SOURCE MOUNTPOINT [-o OPTS]`` (how mount.fuse3 calls us) means mount.

    Only when SOURCE looks like a path (a slash in it, or something by that name
    exists): any other first word is a command, and a mistyped one is refused as such
    (``chainfs strem M vm1`` is no mount of ./strem)."""
    if (
        len(args) >= 2
        and args[0] not in _command_names()
        and not args[0].startswith("-")
        and _looks_like_path(args[0])
    ):
        return ["mount", *args]
    return args


def _invalid_command(word: str) -> str | None:
    """What argparse would say of a first word that is no command (None: it is one)."""
    names = _command_names()
    if not word or word in names or word.startswith("-"):
        return None
    close = difflib.get_close_matches(word, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(names)}"
    return f"argument COMMAND: invalid choice: {word!r} ({hint})"


def main(args: list[str] | None = None) -> int:
    argv = _as_mount_helper(sys.argv[1:] if args is None else args)
    parser = build_parser()
    invalid = _invalid_command(argv[0]) if argv else None
    if invalid is not None:
        parser.error(invalid)
    ns = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except ChainfsError as e:
        print(f"chainfs: {e}", file=sys.stderr)
    except BrokenPipeError:
        # the reader went away (``chainfs status | head``): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        print(f"chainfs: {_describe_os_error(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 1
