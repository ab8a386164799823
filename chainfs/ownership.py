"""Who serves a chain read-write: one owner per chain, by an OFD lock on its owner file.

Several hosts may mount one source directory on shared storage (NFSv4); each chain has
at most one owner, the mount holding an OFD write lock on ``.chainfs/CHAIN.owner``.  The
lock is the truth: the file's content (host, mount id, pid, time of the last heartbeat)
only tells the others who holds it.  The owner also holds OFD write locks on the chain's
state file and journal (``.chainfs/CHAIN.state``, ``.chainfs/CHAIN.journal``) before it
writes them, so that a host whose locks a server took away (its lease expired) has every
later write to them refused (EIO) instead of landing over the new owner's.

OFD locks belong to the open file description: two mounts of one directory on one
machine are two holders, exactly as two hosts are; the locks go away when the process
dies (``kill -9``) or, on NFSv4, when the host's lease expires.

Locking contract: an ``Ownership`` is used from the trio thread (``heartbeat`` may run
in a worker thread while the trio thread waits for it, nothing else then touching it);
one being taken (``mount.wait_for_owner``, ``mount.Hosts.take``) is used by the
take-over's worker threads, one step at a time, until the chain is served.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import ClassVar

from . import sharedfs
from .errors import ChainfsError
from .eventlog import _stem
from .hostfile import HostFile, HostIOError, open_meta, read_meta
from .locks import F_OFD_GETLK, F_OFD_SETLK, F_UNLCK, F_WRLCK, _fcntl

log = logging.getLogger(__name__)

OWN_DIR = ".chainfs"
OWNER_SUFFIX, STATE_SUFFIX, JOURNAL_SUFFIX = ".owner", ".state", ".journal"
MOUNT_ID = "m-" + secrets.token_hex(3)  # this process's mount, as the owner files name it
# an owner file not rewritten for this long (three heartbeats) is overdue: its host may be
# dead or cut off (only its lock, which ``status`` does not test, can tell)
STALE_AFTER = 15.0


# file systems several hosts mount at once: a lost lock shows there as EIO
SHARED_TYPES = frozenset(
    {"nfs", "nfs4", "ceph", "fuse.ceph", "fuse.cephfs", "glusterfs", "fuse.glusterfs"}
    | {"gfs2", "ocfs2", "gpfs", "lustre", "cifs", "smb3", "9p"}
)


def fs_type(path: str, mountinfo: str = sharedfs.MOUNTINFO) -> str:
    """The type of the file system ``path`` lies on, as ``/proc/self/mountinfo`` says
    ("" if it cannot be told)."""
    try:
        with open(mountinfo) as f:
            text = f.read()
    except OSError:
        return ""
    entry = sharedfs.mount_of(os.path.realpath(path), text)
    return entry.fstype if entry is not None else ""


def is_shared(path: str) -> bool:
    """Whether ``path`` lies on a file system other hosts may mount too (NFS, CephFS...)."""
    return fs_type(path) in SHARED_TYPES


def own_dir(directory: str) -> str:
    return os.path.join(directory, OWN_DIR)


def chain_file(directory: str, chain: str, suffix: str) -> str:
    """``.chainfs/CHAIN<suffix>`` in the source directory ``directory``."""
    return os.path.join(own_dir(directory), _stem(chain) + suffix)


class OwnedElsewhere(ChainfsError):
    """The chain's owner lock is held by another mount (``holder`` says who, if known)."""

    errno = errno.EBUSY

    def __init__(self, chain: str, holder: str) -> None:
        super().__init__(f"chain {chain!r} is owned by {holder}")
        self.holder = holder


def try_lock(fd: int) -> bool:
    """Take an OFD write lock on the whole file; False if someone else holds one."""
    try:
        _fcntl(fd, F_OFD_SETLK, F_WRLCK, 0, 0)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_locked(path: str) -> bool:
    """Whether anyone (another open file description) holds a lock on ``path``."""
    try:
        fd = open_meta(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EINVAL):
            return False  # a symlink or FIFO planted there: nobody's lock (never locked)
        raise
    try:
        return _fcntl(fd, F_OFD_GETLK, F_WRLCK, 0, 0) != F_UNLCK
    finally:
        os.close(fd)


@dataclass
class Holder:
    """What an owner file says about its holder (diagnostics only)."""

    host: str = "?"
    mount: str = "?"
    pid: int = 0
    heartbeat: float = 0.0
    released: bool = False  # the holder gave the chain up (inactivate, unmount)
    unclean: bool = False  # it took the chain after an unclean stop, leaks not yet checked

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def describe(self, now: float | None = None) -> str:
        return (
            f"chainfs on host {self.host} (mount {self.mount}, pid {self.pid}, "
            f"heartbeat {round(self.age(now))} s ago)"
        )


def read_holder(path: str) -> Holder | None:
    """The holder an owner file names (None: no file, or not written yet)."""
    try:
        data = read_meta(path, 4096)
    except OSError:
        return None
    try:
        doc = json.loads(data.split(b"\n", 1)[0])
        return Holder(
            str(doc["host"]),
            str(doc["mount"]),
            int(doc["pid"]),
            float(doc["time"]),
            doc.get("released") is True,
            doc.get("unclean") is True,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def judge_owner(directory: str, chain: str, now: float | None = None) -> str | None:
    """Who owns ``chain``, judged by its owner file's content alone, for ``status`` on
    a mount that does not own it: the holder's words (saying when its heartbeat is
    overdue), or None when nobody does (no file, nothing written, or its last holder
    released it).  Diagnostics only: the lock is the truth, and it is NOT tested here --
    on NFS a lock test is a conflict for which Linux nfsd expires a cut-off owner's
    courteous (lease-expired) lock state, fencing an owner nobody took the chain from."""
    holder = read_holder(chain_file(directory, chain, OWNER_SUFFIX))
    if holder is None or holder.released:
        return None
    words = holder.describe(now)
    if holder.age(now) > STALE_AFTER:
        words += "; overdue: that host may be dead or cut off (adopt waits for its lock)"
    return words


def describe_holder(directory: str, chain: str) -> str:
    """Who holds ``chain``: the owner file's words, or what little is known."""
    path = chain_file(directory, chain, OWNER_SUFFIX)
    holder = read_holder(path)
    if holder is not None and is_locked(path):
        return holder.describe()
    if is_locked(path):
        return "another chainfs mount (its owner file names nobody)"
    return "another process -- QEMU? -- possibly on another host"


def _open_locked(path: str) -> int:
    new = not os.path.lexists(path)
    fd = open_meta(path, os.O_RDWR | os.O_CREAT)
    if new and HostFile.observer is not None:  # (the crash simulator sees it appear)
        HostFile.observer("create", path, 0, b"")
    try:
        if not try_lock(fd):
            os.close(fd)
            return -1
    except BaseException:
        os.close(fd)
        raise
    return fd


class Ownership:
    """The locks a mount holds on one chain while it serves it read-write."""

    # Whether the chains' files lie on storage other hosts share (a mount sets it from
    # its ``shared``): there every heartbeat is made durable on its own (fdatasync),
    # because that is where NFS finds a lost lock (the write-back to the server is
    # refused with EIO: the fence rule, ``mount._beat``) and how the other hosts get to
    # read it (close-to-open); and ``Source.save`` syncs each state record on its own.
    # On a local file system the owner file's content is diagnostics only (its lock,
    # which dies with the process, is the truth; other mounts read it through the same
    # page cache), so a heartbeat is written and not synced: a crash may leave an older
    # heartbeat there, which says nothing then anyway.  This took two fdatasyncs a
    # chain at mount (and one every few seconds a chain while serving).
    shared_storage: ClassVar[bool] = True

    def __init__(self, directory: str, chain: str) -> None:
        self.directory = directory
        self.chain = chain
        self.owner_path = chain_file(directory, chain, OWNER_SUFFIX)
        self.state_path = chain_file(directory, chain, STATE_SUFFIX)
        self.journal_path = chain_file(directory, chain, JOURNAL_SUFFIX)
        self.owner_fd = self.state_fd = self.journal_fd = -1
        self.lost: str | None = None  # why ownership was lost (fenced): never re-locked
        self.beating = False  # this mount's words are in the owner file
        # the previous holder's words did not say it released the chain: it stopped
        # uncleanly (kill -9, a crash, a cut-off host), and may have leaked clusters;
        # cleared once they were checked (``leaks``), said in the owner file until then
        self.unclean = False

    @classmethod
    def acquire(cls, directory: str, chain: str, *, describe: bool = True) -> Ownership:
        """Lock the chain's owner file, then its state file and journal, without waiting;
        ``OwnedElsewhere`` if any is held by someone else (naming the holder unless not
        to ``describe`` it: a waiter's tries, which say who only now and then)."""
        own = cls(directory, chain)
        try:
            os.makedirs(own_dir(directory), exist_ok=True)
            own.owner_fd = _open_locked(own.owner_path)
            if own.owner_fd < 0:
                holder = describe_holder(directory, chain) if describe else "another mount"
                raise OwnedElsewhere(chain, holder)
            own.state_fd = _open_locked(own.state_path)
            own.journal_fd = _open_locked(own.journal_path)
            if own.state_fd < 0 or own.journal_fd < 0:
                raise OwnedElsewhere(chain, "another chainfs mount (it holds the state or journal)")
            previous = read_holder(own.owner_path)
            own.unclean = previous is not None and (previous.unclean or not previous.released)
            own.heartbeat()
        except OSError as e:
            own.release()
            what = repr(e.filename) if e.errno == errno.ELOOP else "the owner file"
            raise HostIOError(
                f"cannot lock {what} of chain {chain!r}: {e.strerror}", e.errno or errno.EIO
            ) from None
        except BaseException:
            own.release()
            raise
        log.info("chain=%s owned: mount=%s host=%s", chain, MOUNT_ID, socket.gethostname())
        return own

    @property
    def held(self) -> bool:
        return self.owner_fd >= 0 and self.lost is None

    def heartbeat(self, *, released: bool = False) -> None:
        """Write the holder's diagnostics and the time into the owner file, durably on
        shared storage (``shared_storage``) (``released``: the last words, giving the
        chain up); OSError if the storage refuses (a lost lock: EIO)."""
        if self.lost is not None:
            raise OSError(errno.EIO, f"ownership lost: {self.lost}")
        doc: dict[str, object] = {
            "host": socket.gethostname(),
            "mount": MOUNT_ID,
            "pid": os.getpid(),
            "time": round(time.time(), 3),
        }
        if released:
            doc["released"] = True
        if self.unclean:  # (given up before its leaks were checked: the next owner does)
            doc["unclean"] = True
        data = (json.dumps(doc, sort_keys=True) + "\n").ljust(256).encode()
        if HostFile.observer is not None:
            HostFile.observer("heartbeat", self.owner_path, 0, data)
        os.pwrite(self.owner_fd, data, 0)
        if self.shared_storage:
            os.fdatasync(self.owner_fd)
        self.beating = True

    def fence(self, reason: str) -> None:
        """Ownership is lost: nothing is written under it any more (the descriptors stay
        open: closing them would let this host believe it had given the chain up)."""
        if self.lost is None:
            self.lost = reason

    def release(self) -> None:
        """Give the chain up: the owner file says so (for the others' ``status``), then
        the locks go with the descriptors."""
        if self.beating and self.owner_fd >= 0 and self.lost is None:
            try:
                self.heartbeat(released=True)
            except OSError as e:  # (only diagnostics: the lock goes all the same)
                log.info("chain=%s owner file not marked released: %s", self.chain, e.strerror)
            self.beating = False
        for name in ("journal_fd", "state_fd", "owner_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as e:
                    log.warning("chain=%s closing a lock file: %s", self.chain, e.strerror)
                setattr(self, name, -1)
