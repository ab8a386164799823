"""The file system under a source directory, and whether chainfs may write there.

Many hosts may serve one shared store (an NFSv4 export) only if the store's locks are
real and a host that lost them cannot write behind them: the OFD locks chainfs and QEMU
take must reach the server (not ``nolock``, not ``local_lock``), a dead host's locks
must expire with its lease (NFSv4, not v3, whose locks outlive the host until it
reboots), a write must fail rather than be dropped (``hard``, not ``soft``), and a
client that lost its lease must not take its locks back behind another host's
(``recover_lost_locks`` off).  ``check_source`` refuses a read-write mount that lacks
one of these, naming the option and what to set instead.  Read-only mounts and local
file systems are not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ChainfsError

MOUNTINFO = "/proc/self/mountinfo"
RECOVER_LOST_LOCKS = "/sys/module/nfs/parameters/recover_lost_locks"
NFS_TYPES = ("nfs", "nfs4")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``: where, which file system, its options."""

    mountpoint: str
    fstype: str
    source: str
    options: dict[str, str]  # the super block's options (value "" for a flag)

    @classmethod
    def parse(cls, line: str) -> MountEntry:
        fields = line.split()
        sep = fields.index("-")  # the optional fields end with a lone "-"
        fstype, source, sup = fields[sep + 1], fields[sep + 2], fields[sep + 3]
        options = {}
        for opt in (fields[5] + "," + sup).split(","):
            key, _, value = opt.partition("=")
            if key:
                options[key] = value
        return cls(_unescape(fields[4]), fstype, _unescape(source), options)


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space) undone."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str, mountinfo: str) -> MountEntry | None:
    """The mount that holds ``path`` (an absolute, resolved path): the last mounted of
    those with the longest mount point above it."""
    best: MountEntry | None = None
    for line in mountinfo.splitlines():
        if not line.strip():
            continue
        entry = MountEntry.parse(line)
        mp = entry.mountpoint
        above = path == mp or path.startswith(mp.rstrip("/") + "/")
        if above and (best is None or len(mp) >= len(best.mountpoint)):
            best = entry
    return best


def problems(entry: MountEntry, recover_lost_locks: str | None) -> list[str]:
    """What makes ``entry`` unsafe to write through, each naming the option and what to
    set instead; empty for a local file system or a well-mounted NFSv4."""
    if entry.fstype not in NFS_TYPES:
        return []
    opts = entry.options
    found = []
    version = opts.get("vers", "4" if entry.fstype == "nfs4" else "3")
    if not version.startswith("4"):
        found.append(
            f"it is NFSv{version} (vers={version}), whose locks outlive a dead host until "
            "it reboots: mount with vers=4.2 (NFSv4.1 or later)"
        )
    if "nolock" in opts:
        found.append("'nolock' keeps locks local to this host: remove nolock")
    local_lock = opts.get("local_lock", "none")
    if local_lock != "none":
        found.append(
            f"'local_lock={local_lock}' keeps locks local to this host: set local_lock=none"
        )
    for soft in ("soft", "softerr"):
        if soft in opts:
            found.append(f"'{soft}' may drop a write after a time-out: mount with 'hard'")
    if recover_lost_locks is not None and recover_lost_locks.strip().upper() in ("Y", "1"):
        found.append(
            "the nfs module's recover_lost_locks=Y takes locks back after a lost lease, "
            "behind another host's: set it to N (options nfs recover_lost_locks=0 in "
            f"/etc/modprobe.d, or echo N > {RECOVER_LOST_LOCKS})"
        )
    return found


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def check_source(source_path: str, *, readonly: bool) -> None:
    """Refuse a read-write mount of ``source_path`` on a shared file system mounted
    without the locks and errors that keep two hosts apart (see the module's doc)."""
    if readonly:
        return
    path = os.path.realpath(source_path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    mountinfo = _read(MOUNTINFO)
    if mountinfo is None:
        return
    entry = mount_of(directory, mountinfo)
    if entry is None:
        return
    found = problems(entry, _read(RECOVER_LOST_LOCKS) if entry.fstype in NFS_TYPES else None)
    if found:
        raise ChainfsError(
            f"{directory!r} is on {entry.fstype} ({entry.source} at {entry.mountpoint}) and "
            "cannot be served read-write safely: "
            + "; ".join(found)
            + " (or mount chainfs read-only: -o ro)"
        )
