"""The ``chainfs`` command line: argparse subcommands, each a thin call into the package.

This is the one place that turns errors into exit codes: a ``ChainfsError`` (or an
``OSError`` from the host) becomes one line ``chainfs: <message>`` on stderr and exit
status 1, never a traceback.

``mount`` serves in a daemon and returns once the filesystem is ready (``-f`` stays in
the foreground).  As ``mount.fuse3`` calls a filesystem's program as ``chainfs SOURCE
MOUNTPOINT -o OPTS``, a command line that starts with two paths is read as ``mount``.
The job subcommands write the control files, exactly as ``echo`` would.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from .control import parse_line, quote
from .errors import ChainfsError

# The piece size ``digest`` reads the flat disk in.
DIGEST_PIECE = 1 << 20
UMOUNT_TIMEOUT = 120.0
JOB_COMMANDS = ("snapshot", "stream", "commit", "copy", "cancel", "complete")


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


# -- mount ---------------------------------------------------------------------------------


def _setup_logging(*, debug: bool, to_syslog: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if to_syslog:
        if not os.path.exists("/dev/log"):
            root.addHandler(logging.NullHandler())
            return
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("chainfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def cmd_mount(ns: argparse.Namespace) -> int:
    from .mount import parse_options, serve

    opts = parse_options(ns.options)
    if ns.foreground:
        _setup_logging(debug=opts.debug, to_syslog=False)
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
            return 0
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
        _setup_logging(debug=opts.debug, to_syslog=True)

        def ready() -> None:
            os.write(w, b"ready")
            os.close(w)

        try:
            serve(ns.source, ns.mountpoint, opts, ready=ready)
            status = 0
        except ChainfsError as e:
            logging.getLogger(__name__).error("%s", e)
            _tell(w, str(e))
        except BaseException as e:
            logging.getLogger(__name__).exception("the daemon failed")
            _tell(w, f"the daemon failed: {e}")
    finally:
        os._exit(status)


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
        raise ChainfsError(f"cannot read {path!r}: {e.strerror}") from None


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


def _gather(mountpoint: str) -> dict[str, Any]:
    status = _read_status(mountpoint)
    daemon, entries = status[0], status[1:]
    chains = []
    for entry in entries:
        item: dict[str, Any] = dict(entry)
        if entry.get("status") == "served":
            item["layers"] = _read_lines(_control(mountpoint, entry["chain"], "chain"))
            item["jobs"] = _read_lines(_control(mountpoint, entry["chain"], "jobs"))
        chains.append(item)
    return {"daemon": daemon, "chains": chains}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_status(ns: argparse.Namespace) -> int:
    info = _gather(ns.mountpoint)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    d = info["daemon"]
    print(
        f"{d['mountpoint']}: source {d['source']}, pid {d['pid']}"
        + (", read-only" if d.get("readonly") == "true" else "")
    )
    for c in info["chains"]:
        if c.get("status") != "served":
            print(f"  {c['chain']}: refused: {c.get('reason', '')}")
            continue
        layers = c["layers"]
        drawing = " <- ".join(f"[{x['name']}]" for x in reversed(layers))
        print(f"  {c['chain']}: {drawing}  ({_size(int(layers[0]['virtual-size']))})")
        for x in layers:
            print(f"      {x['name']:<24} {x['role']:<8} {_size(int(x['allocated']))} allocated")
        for j in c["jobs"]:
            done = int(j["offset"]) * 100 // max(1, int(j["len"]))
            print(f"      job {j['id']} {j['type']} {j['status']} {done}%")
    return 0


def cmd_job(ns: argparse.Namespace) -> int:
    """Write one command to control/CHAIN/KIND, as ``echo ARGS > ...`` would."""
    path = _control(ns.mountpoint, ns.chain, ns.command)
    events = _control(ns.mountpoint, ns.chain, "events")
    if not os.path.isdir(os.path.dirname(path)):
        raise ChainfsError(f"no chain {ns.chain!r} under {os.path.abspath(ns.mountpoint)!r}")
    mark = os.path.getsize(events)
    text = " ".join(quote(a) if "=" not in a else a for a in ns.args) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        reason = _rejection(events, mark) or (e.strerror or str(e)).lower()
        raise ChainfsError(f"{ns.command} refused: {reason}") from None
    if not ns.wait or ns.command in ("snapshot", "cancel", "complete"):
        return 0
    return _follow(ns.mountpoint, ns.chain, events, mark)


def _new_events(events: str, mark: int) -> list[dict[str, str]]:
    with open(events, "rb") as f:
        f.seek(mark)
        data = f.read().decode(errors="replace")
    out = []
    for line in data.splitlines():
        try:
            out.append(parse_line(line))
        except ValueError:
            continue
    return out


def _rejection(events: str, mark: int) -> str | None:
    for e in reversed(_new_events(events, mark)):
        if e.get("event") == "COMMAND_REJECTED":
            return e.get("reason")
    return None


def _follow(mountpoint: str, chain: str, events: str, mark: int) -> int:
    """Follow the job just started until it ends; Ctrl-C stops following only."""
    tty = sys.stderr.isatty()
    job_id: str | None = None
    last_print = 0.0
    try:
        while True:
            for e in _new_events(events, mark):
                if job_id is None and e.get("event") == "JOB_STARTED":
                    job_id = e.get("job")
                if job_id is not None and e.get("job") == job_id:
                    if e.get("event") == "JOB_CANCELLED":
                        print(f"\nchainfs: job {job_id} was cancelled", file=sys.stderr)
                        return 1
                    if e.get("event") == "JOB_COMPLETED":
                        if e.get("error"):
                            print(f"\nchainfs: job {job_id} failed: {e['error']}", file=sys.stderr)
                            return 1
                        print(("\n" if tty else "") + f"job {job_id} completed", file=sys.stderr)
                        return 0
            jobs = _read_lines(_control(mountpoint, chain, "jobs"))
            now = time.monotonic()
            for j in jobs:
                if j.get("id") == job_id and (tty or now - last_print >= 1.0):
                    last_print = now
                    off, length = int(j["offset"]), max(1, int(j["len"]))
                    pct = off * 100 // length
                    line = f"{job_id} {j['status']} {pct:3d}% {_size(off)} of {_size(length)}"
                    print(
                        ("\r" + line) if tty else line,
                        end="" if tty else "\n",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"\nchainfs: stopped following; job {job_id or '?'} keeps running", file=sys.stderr)
        return 130


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainfs",
        description="Show chains of QEMU disk images as flat raw disks.",
    )
    parser.add_argument("--version", action="version", version=f"chainfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mount = sub.add_parser(
        "mount",
        help="mount the chains of SOURCE on MOUNTPOINT",
        description="Mount the chains of SOURCE (a directory of images or a TOML file) "
        "on MOUNTPOINT. Returns once the mount is ready; the daemon keeps serving.",
    )
    mount.add_argument("source", metavar="SOURCE")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="ro, allow_other, debug, allow_dir=PATH (repeatable)",
    )
    mount.set_defaults(func=cmd_mount)

    umount = sub.add_parser("umount", help="unmount cleanly and wait for the daemon")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(func=cmd_umount)

    status = sub.add_parser("status", help="show the chains, jobs and refusals of a mount")
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    for kind in JOB_COMMANDS:
        job = sub.add_parser(kind, help=f"write a command to control/CHAIN/{kind}")
        job.add_argument("mountpoint", metavar="MOUNTPOINT")
        job.add_argument("chain", metavar="CHAIN")
        job.add_argument("args", nargs="*", metavar="ARGS", help="as in the control file")
        job.add_argument("--wait", action="store_true", help="follow the job until it ends")
        job.set_defaults(func=cmd_job)

    digest = sub.add_parser(
        "digest",
        help="print the xxh3-128 digest of a chain's flat disk",
        description="Read the flat disk of the chain whose active layer is IMAGE through "
        "chainfs (as a guest would see it) and print its xxh3-128 hex digest.",
    )
    digest.add_argument("image", metavar="IMAGE", help="the chain's active layer")
    digest.set_defaults(func=cmd_digest)
    return parser


def _describe_os_error(e: OSError) -> str:
    reason = (e.strerror or str(e)).lower()
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    return reason


def _as_mount_helper(args: list[str]) -> list[str]:
    """``chainfs SOURCE MOUNTPOINT [-o OPTS]`` (how mount.fuse3 calls us) means mount."""
    commands = {"mount", "umount", "status", "digest", *JOB_COMMANDS}
    if len(args) >= 2 and args[0] not in commands and not args[0].startswith("-"):
        return ["mount", *args]
    return args


def main(args: list[str] | None = None) -> int:
    argv = _as_mount_helper(sys.argv[1:] if args is None else args)
    ns = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except ChainfsError as e:
        print(f"chainfs: {e}", file=sys.stderr)
    except OSError as e:
        print(f"chainfs: {_describe_os_error(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
