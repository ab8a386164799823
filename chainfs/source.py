"""Where chains come from: a directory of images or a TOML file, plus the state file.

In a directory, every qcow2 image that is not the backing file of another image there
is the active layer of one chain, named after its file without ``.qcow2``.  The name
must survive snapshots (the active layer changes) and streams and commits (layers leave
the chain and would otherwise look like chains of their own), so chainfs keeps a small
state record per chain beside the images, ``.chainfs/NAME.state``::

    {"version": 2, "chain": "vm1",
     "active": "vm1-snap2.qcow2",               # the active layer as last known
     "retired": ["B.qcow2", "C.qcow2"]}          # layers that left the chain

Paths inside the source directory are stored relative to it.  Several hosts may share
the directory (``ownership``), so the record is written only by the chain's owner, under
an OFD lock on the file, and in place: the file holds two slots, each checksummed and
numbered (a generation); a save writes the slot not holding the newest record and syncs
it; a reader takes the valid slot with the higher generation, so a torn save leaves the
previous record.  No shared metadata is ever renamed.  If chainfs stops after an overlay
was created but before the state was updated, the name is still found: a chain's name is
that of the nearest recorded active layer at or below its top.

The state of earlier versions, one file for all chains (``.chainfs.json``, version 1),
is read where a chain has no record of its own yet; the first read-write mount that owns
every chain it names writes their records and removes it.

A TOML source names chains explicitly (``[chains.NAME] active = "path"``, relative
paths against the TOML file's directory); its state file sits beside it.

Each chain comes with the directories its files may lie in by default (``homes``, which
a mount widens with ``allow_dir`` and ``allow_backing``, ``confine``): the source
directory; for a TOML source, the TOML file's directory and that of the active layer
the TOML names for the chain (not one the state file names: the state file sits among
the images, and whoever can write the images can write it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import xxhash

from .chain import resolve_backing
from .errors import ChainfsError
from .formats import is_qcow2
from .formats.qcow2 import read_backing
from .hostfile import HostFile, HostIOError, _libc, read_meta, sync_dir
from .ownership import STATE_SUFFIX, Ownership, chain_file, own_dir

log = logging.getLogger(__name__)

LEGACY_STATE_NAME = ".chainfs.json"  # version 1: one file for all chains
STATE_NAME = ".chainfs/NAME.state"  # (as the documentation names it)
SLOT = 64 << 10  # bytes per slot of a state file
_SLOT_HEAD = struct.Struct("<4sQIQ")  # magic, generation, length, xxh64 of the JSON
_MAGIC = b"CFS2"


def _kernel() -> tuple[int, ...]:
    return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2] if x.isdigit())


# syncfs(fd): the whole file system under fd made durable (a batch of state records);
# it reports write-back errors since Linux 5.8 (before: each record synced on its own)
_syncfs = cast(
    "Callable[[int], int] | None", _libc("syncfs", "c_int") if _kernel() >= (5, 8) else None
)


def encode_slot(generation: int, record: dict[str, object]) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    if _SLOT_HEAD.size + len(body) > SLOT:
        raise ChainfsError(f"the state record of {record.get('chain')!r} is too large")
    digest = _digest(generation, body)
    return _SLOT_HEAD.pack(_MAGIC, generation, len(body), digest) + body


def _digest(generation: int, body: bytes) -> int:
    """The checksum of a slot: its generation and length as well as its record (a torn
    header must not lend a new generation to an old record)."""
    return xxhash.xxh64_intdigest(struct.pack("<QI", generation, len(body)) + body)


def decode_slot(data: bytes) -> tuple[int, dict[str, object]] | None:
    """(generation, record) of one slot's bytes, or None if it is not a whole valid one."""
    if len(data) < _SLOT_HEAD.size:
        return None
    magic, generation, length, digest = _SLOT_HEAD.unpack_from(data)
    body = data[_SLOT_HEAD.size : _SLOT_HEAD.size + length]
    if magic != _MAGIC or len(body) != length or _digest(generation, body) != digest:
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    return (generation, record) if isinstance(record, dict) else None


def read_slots(data: bytes) -> tuple[int, dict[str, object] | None]:
    """The newest valid record of a state file's content, and its generation (0, None:
    none)."""
    best: tuple[int, dict[str, object] | None] = (0, None)
    for i in (0, 1):
        found = decode_slot(data[i * SLOT : (i + 1) * SLOT])
        if found is not None and (best[1] is None or found[0] > best[0]):
            best = found
    return best


@dataclass
class ChainSpec:
    name: str
    active: str  # absolute path of the active layer
    # the directories the source gives for the chain's files: a directory source's own
    # directory; a TOML source's directory and that of the active layer it names (a
    # mount widens them with allow_dir and allow_backing: ``confine``)
    homes: tuple[str, ...] = ()


@dataclass
class Refused:
    name: str
    path: str
    reason: str


@dataclass
class Source:
    """What a mount serves, and the state it keeps."""

    path: str  # the directory or TOML file given to ``chainfs mount``
    directory: str  # where the images (and the state file) live
    chains: list[ChainSpec] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    recorded: dict[str, str] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)  # of every chain
    # each chain's retired layers, as its state record holds them
    retired_by: dict[str, set[str]] = field(default_factory=dict)
    # the chains this process owns (holds the locks of), and their records' generations
    owned: dict[str, Ownership] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    legacy: set[str] = field(default_factory=set)  # chains the version-1 file names
    elsewhere: dict[str, str] = field(default_factory=dict)  # chain -> who owns it
    # each chain's record as its state file holds it (read or written by this process):
    # a save that would write the same is skipped
    on_disk: dict[str, dict[str, object]] = field(default_factory=dict)
    _unsynced: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def state_path(self) -> str:
        """The state of earlier versions (version 1, all chains in one file)."""
        return os.path.join(self.directory, LEGACY_STATE_NAME)

    def chain_state_path(self, chain: str) -> str:
        return chain_file(self.directory, chain, STATE_SUFFIX)

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.directory)
        return path if rel.startswith("..") else rel

    def _abs(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.directory, path))

    def spec(self, name: str) -> ChainSpec | None:
        """Chain ``name`` as its state record (read again, its journal's work redone)
        says it is now, from that record alone: what ``activate`` and ``adopt`` serve,
        without a scan of the source (which read every image's header, O(chains) a
        command).  None when the record names no active layer that is there (the caller
        scans then).  An overlay made over the recorded layer by another tool while the
        chain was owned elsewhere is found by the next mount's scan, not here."""
        active = self.recorded.get(name)
        if active is None or active in self.retired or not os.path.isfile(active):
            return None
        homes = next((c.homes for c in self.chains if c.name == name), (self.directory,))
        return ChainSpec(name, active, homes)

    def own(self, chain: str) -> Ownership:
        """The locks of ``chain``, taken now if this process does not hold them yet
        (``OwnedElsewhere`` if another does); never taken again once lost."""
        ownership = self.owned.get(chain)
        if ownership is None:
            ownership = Ownership.acquire(self.directory, chain)
            self.owned[chain] = ownership
            self._reload(chain)
        return ownership

    def disown(self, chain: str) -> None:
        ownership = self.owned.pop(chain, None)
        if ownership is not None:
            ownership.release()

    def owns(self, chain: str) -> bool:
        ownership = self.owned.get(chain)
        return ownership is not None and ownership.held

    def save(self, chains: list[str] | None = None) -> None:
        """Write the state records of ``chains`` (default: every chain this process
        owns), each in place under its lock; a record the chain's state file holds
        already is not written again (a mount rewrote thousands of them, a sync each).

        When that fails (a full disk) the previous record stays, and what changed in
        memory is written by the next save that succeeds.
        """
        names = sorted(self.owned) if chains is None else chains
        due = [n for n in names if n in self.recorded or self.retired_by.get(n)]
        # several records on local storage (a mount's first save): written first, then
        # made durable at once (``_sync_all``); on shared storage each is synced on its
        # own (a lost lock shows there as that sync's EIO)
        batch = len(due) > 1 and not Ownership.shared_storage and _syncfs is not None
        written: list[tuple[str, int, bool]] = []
        for name in due:
            done = self._save_one(name, sync=not batch)
            if done is not None:
                written.append((name, *done))
        if written and batch:
            self._sync_all(written)

    def _record(self, name: str) -> dict[str, object]:
        return {
            "version": 2,
            "chain": name,
            # (none yet: a recovery that retired layers before the chain was found)
            "active": self._rel(self.recorded[name]) if name in self.recorded else None,
            "retired": sorted(self._rel(p) for p in self.retired_by.get(name, set())),
        }

    def _save_one(self, name: str, *, sync: bool = True) -> tuple[int, bool] | None:
        """Write ``name``'s record into the slot its newest record is not in; None if
        the file holds that record already, else (the new generation, whether the file
        was created); with ``sync`` made durable and its generation counted, else the
        caller does both (``_sync_all``)."""
        ownership = self.own(name)
        path = ownership.state_path
        record = self._record(name)
        if self.on_disk.get(name) == record:
            return None
        generation = self.generations.get(name, 0) + 1
        try:
            slot = encode_slot(generation, record)
        except ChainfsError:  # only layers still there can be taken for chains
            retired = {p for p in self.retired_by.get(name, set()) if os.path.exists(p)}
            self.retired_by[name] = retired
            record["retired"] = sorted(self._rel(p) for p in retired)
            slot = encode_slot(generation, record)
        try:
            if ownership.lost is not None:
                raise OSError(errno.EIO, f"ownership of the chain was lost ({ownership.lost})")
            if HostFile.observer is not None:
                HostFile.observer("state", path, (generation % 2) * SLOT, slot)
            created = os.fstat(ownership.state_fd).st_size == 0
            os.pwrite(ownership.state_fd, slot, (generation % 2) * SLOT)
            if sync:
                os.fdatasync(ownership.state_fd)
                if created:
                    sync_dir(own_dir(self.directory))
        except OSError as e:
            raise HostIOError(
                f"saving the state file {path!r} failed: {e.strerror}", e.errno or errno.EIO
            ) from None
        if sync:
            self.generations[name] = generation
            self.on_disk[name] = record
        else:
            self._unsynced[name] = record
        return generation, created

    def _sync_all(self, written: list[tuple[str, int, bool]]) -> None:
        """Make the records just written (not synced) durable with one ``syncfs`` of
        the file system under ``.chainfs``, then count their generations.

        As safe as a sync per record: each record went to the slot not holding the
        chain's newest valid one, so until the sync returns a crash leaves each file
        its previous record or the new one (a torn slot fails its checksum); the
        generation moves on only once the sync returned, as after an fdatasync, so no
        later save writes over a slot that is not durable yet; and nothing relies on a
        record before ``save`` returns (a mount serves, and jobs start, after it).
        ``syncfs`` also makes the new files' names durable (one journal commit for
        them all), and since Linux 5.8 it reports a write-back error of the file
        system; where it fails, each record is synced on its own, which names the
        chain whose file failed."""
        fd = os.open(own_dir(self.directory), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            assert _syncfs is not None
            synced = _syncfs(fd) == 0
        finally:
            os.close(fd)
        try:
            for name, generation, created in written:
                if not synced:
                    ownership = self.owned[name]
                    try:
                        os.fdatasync(ownership.state_fd)
                        if created:
                            sync_dir(own_dir(self.directory))
                    except OSError as e:
                        raise HostIOError(
                            f"saving the state file {ownership.state_path!r} failed: {e.strerror}",
                            e.errno or errno.EIO,
                        ) from None
                self.generations[name] = generation
                self.on_disk[name] = self._unsynced.pop(name)
        finally:
            self._unsynced.clear()

    def finish_migration(self) -> None:
        """Remove the version-1 state file once every chain it names has its own record
        (written by this process, which owns them all)."""
        if not self.legacy or not all(self.generations.get(n) for n in self.legacy):
            return
        try:
            os.unlink(self.state_path)
            sync_dir(self.directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("state=%s cannot be removed after migration: %s", self.state_path, e)
            return
        log.info("state=%s migrated to %s", self.state_path, own_dir(self.directory))
        self.legacy = set()

    def _retire(self, chain: str, paths: set[str]) -> None:
        self.retired |= paths
        self.retired_by.setdefault(chain, set()).update(paths)

    def _unretire(self, path: str) -> None:
        self.retired.discard(path)
        for retired in self.retired_by.values():
            retired.discard(path)

    def record_active(self, name: str, path: str) -> None:
        self.recorded[name] = os.path.abspath(path)
        self.save([name])

    def retire(self, paths: list[str], chain: str) -> None:
        self._retire(chain, {os.path.abspath(p) for p in paths})
        self.save([chain])

    def move_active(self, name: str, path: str, leaving: list[str]) -> None:
        """A pivot, in one atomic save: ``path`` is now the active layer of chain
        ``name``, and ``leaving`` left it."""
        self._retire(name, {os.path.abspath(p) for p in leaving})
        self._unretire(os.path.abspath(path))
        self.recorded[name] = os.path.abspath(path)
        self.save([name])

    def _load_state(self) -> None:
        self._load_legacy()
        try:
            entries = sorted(os.listdir(own_dir(self.directory)))
        except FileNotFoundError:
            entries = []
        except OSError as e:
            raise ChainfsError(f"cannot read {own_dir(self.directory)!r}: {e.strerror}") from None
        for entry in entries:
            if entry.endswith(STATE_SUFFIX) and not entry.startswith("."):
                self._load_record(os.path.join(own_dir(self.directory), entry))

    def _state_from(self, state: Source | None) -> None:
        """The state ``state`` holds (copied: a scan adds names to its own), or read from
        the files when there is none or it has records not yet synced."""
        if state is None or state._unsynced or state.directory != self.directory:
            self._load_state()
            return
        self.recorded = dict(state.recorded)
        self.retired = set(state.retired)
        self.retired_by = {chain: set(paths) for chain, paths in state.retired_by.items()}
        self.generations = dict(state.generations)
        self.legacy = set(state.legacy)
        self.on_disk = dict(state.on_disk)

    def staged(self, chain: str, ownership: Ownership) -> Source:
        """A copy of this source's state, owning ``chain`` alone, for a take-over of
        ``chain`` to reload and recover in a worker thread (``mount.Hosts.take``) while
        the event loop goes on changing this one for the other chains; what the
        take-over changed is then applied here (``merge``), on the event loop."""
        staged = Source(path=self.path, directory=self.directory, chains=list(self.chains))
        staged.recorded = dict(self.recorded)
        staged.retired = set(self.retired)
        staged.retired_by = {name: set(paths) for name, paths in self.retired_by.items()}
        staged.generations = dict(self.generations)
        staged.legacy = set(self.legacy)
        staged.on_disk = dict(self.on_disk)
        staged.owned = {chain: ownership}
        return staged

    def merge(
        self, staged: Source, chain: str, recorded: dict[str, str], retired: set[str]
    ) -> None:
        """Take over what a take-over of ``chain`` changed in its ``staged`` copy, which
        began as this source's state when it held ``recorded`` and ``retired``: the
        chain's record as read and saved there, and what its journal's recovery did to
        the others (``journal.redo``: a layer made active here is no longer the active
        layer a scan named after itself, nor retired by any chain).  Whatever else
        changed here meanwhile (the other chains' jobs) stays."""
        for name, path in recorded.items():
            if name != chain and name not in staged.recorded and self.recorded.get(name) == path:
                del self.recorded[name]
        for path in retired - staged.retired:
            self._unretire(path)
        if chain in staged.recorded:
            self.recorded[chain] = staged.recorded[chain]
        else:
            self.recorded.pop(chain, None)
        mine = set(staged.retired_by.get(chain, set()))
        before = self.retired_by.get(chain, set())
        self.retired_by[chain] = mine
        if before <= mine:
            self.retired |= mine
        else:
            self.retired = set().union(*self.retired_by.values())
        for fields in ("generations", "on_disk"):
            theirs, ours = getattr(staged, fields), getattr(self, fields)
            if chain in theirs:
                ours[chain] = theirs[chain]
            else:
                ours.pop(chain, None)

    def _reload(self, chain: str) -> None:
        """Read ``chain``'s record again (another host may have written it)."""
        path = self.chain_state_path(chain)
        if os.path.exists(path):
            self._load_record(path)

    def _load_record(self, path: str) -> None:
        try:
            data = read_meta(path, 2 * SLOT)
        except OSError as e:
            raise ChainfsError(f"cannot read the state file {path!r}: {e.strerror}") from None
        generation, record = read_slots(data)
        if record is None:
            if data.strip(b"\0"):
                log.warning("state=%s holds no valid record; ignored", path)
            return
        chain, active, retired = record.get("chain"), record.get("active"), record.get("retired")
        if (
            record.get("version") != 2
            or not isinstance(chain, str)
            or not isinstance(active, str | None)
            or not isinstance(retired, list)
        ):
            raise ChainfsError(f"the state file {path!r} is malformed")
        if chain_file(self.directory, chain, STATE_SUFFIX) != path:
            # chainfs writes a chain's record into that chain's file only: a name that
            # is not the file's (``../x``) would make a chain of a name it never served
            log.warning("state=%s names chain %r, not the file's own; ignored", path, chain)
            return
        if active is not None:
            self.recorded[chain] = self._abs(active)
        self.on_disk[chain] = record
        mine = {self._abs(str(p)) for p in retired}
        before = self.retired_by.get(chain, set())
        self.retired_by[chain] = mine
        if before <= mine:
            self.retired |= mine
        else:  # a layer left the record: the union again (not for every record read: a
            # mount reading thousands of records made that quadratic)
            self.retired = set().union(*self.retired_by.values())
        self.generations[chain] = generation

    def _load_legacy(self) -> None:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise ChainfsError(f"cannot read the state file {self.state_path!r}: {e}") from None
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ChainfsError(f"the state file {self.state_path!r} is not one chainfs wrote")
        chains = state.get("chains", {})
        retired = state.get("retired", [])
        if not isinstance(chains, dict) or not isinstance(retired, list):
            raise ChainfsError(f"the state file {self.state_path!r} is malformed")
        bad = [k for k in chains if not usable_name(str(k))]
        if bad:
            log.warning("state=%s names no chain %s; ignored", self.state_path, bad)
        self.recorded = {str(k): self._abs(str(v)) for k, v in chains.items() if k not in bad}
        self.retired = {self._abs(str(p)) for p in retired}
        # which chain a layer left is not known: each chain keeps them all
        self.retired_by = {name: set(self.retired) for name in self.recorded}
        self.legacy = set(self.recorded)


def usable_name(name: str) -> bool:
    """Whether ``name`` can name a chain: its flat file's name, and its files' in
    ``.chainfs`` (never a path)."""
    return bool(name) and not name.startswith(".") and not {"/", "\0"} & set(name)


def _stem(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(".qcow2")] if base.endswith(".qcow2") else base


def _backing_of(path: str) -> str | None:
    """The absolute path an image's backing string points at (None: no backing)."""
    string = read_backing(path)
    if not string:
        return None
    return os.path.normpath(resolve_backing(os.path.abspath(path), string))


def load_state(path: str, owned: dict[str, Ownership] | None = None) -> Source:
    """Only the state of a directory or TOML source, without looking for chains: what
    recovery of interrupted jobs changes before the chains are found.  ``owned``: the
    chains this process already holds the locks of."""
    path = os.path.abspath(path)
    src = Source(path=path, directory=path if os.path.isdir(path) else os.path.dirname(path))
    src._load_state()
    src.owned = owned if owned is not None else {}
    return src


def load(
    path: str, owned: dict[str, Ownership] | None = None, *, state: Source | None = None
) -> Source:
    """Find the chains of a directory or TOML source (opening no chain yet).  ``state``:
    a ``load_state`` of the same source whose records are as it read or wrote them:
    its state is copied rather than every record read again (a mount of 10,000 chains
    read each twice, once in recovery and once here)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        src = Source(path=path, directory=path)
        src._state_from(state)
        _scan_directory(src)
    elif os.path.isfile(path):
        _refuse_image(path)
        src = Source(path=path, directory=os.path.dirname(path))
        src._state_from(state)
        _read_toml(src)
    else:
        raise ChainfsError(f"source {path!r} is neither a directory nor a TOML file")
    src.owned = owned if owned is not None else {}
    return src


def _refuse_image(path: str) -> None:
    """A disk image given as SOURCE (``chainfs mount vm1.qcow2 /mnt``): say what SOURCE
    must be, and the directory that serves the image's chain."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return  # reading it as TOML says why
    try:
        head.decode()
        binary = b"\0" in head
    except UnicodeDecodeError as e:
        binary = e.start < len(head) - 3  # not a character cut off at the end
    if binary:
        raise ChainfsError(
            f"source {path!r} is a file that is not TOML (a disk image?): SOURCE must be a "
            "directory of images or a TOML file naming chains; to serve the chain of this "
            f"image, mount its directory: chainfs mount {os.path.dirname(path)} MOUNTPOINT"
        )


def _scan_directory(src: Source) -> None:
    images: dict[str, str | None] = {}  # qcow2 image -> its backing file
    for entry in sorted(os.scandir(src.directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        p = os.path.join(src.directory, entry.name)
        try:
            if not is_qcow2(p):
                continue
        except OSError:
            continue
        try:
            images[p] = _backing_of(p)
        except ChainfsError as e:
            src.refused.append(Refused(_stem(p), p, str(e)))
    # a retired layer's backing pointer no longer makes a chain: after an active commit
    # the base is the active layer although the retired layers above still point at it
    backing = {b for p, b in images.items() if b and p not in src.retired}
    recorded_by_path = {p: name for name, p in src.recorded.items()}
    taken: set[str] = set()
    # active layers outside the directory (snapshot or copy into an allowed directory):
    # served under their recorded name; the layers of their chains here are not tops
    for name, p in sorted(src.recorded.items()):
        if p in images or p in src.retired or not os.path.isfile(p):
            continue
        taken.add(name)
        src.chains.append(ChainSpec(name, p, (src.directory,)))
        seen: set[str] = set()
        q: str | None = p
        while q is not None and q not in seen:
            seen.add(q)
            try:
                q = _backing_of(q)
            except ChainfsError:
                break  # raw, or unreadable: Chain.open reports it
            if q is not None:
                backing.add(q)
    for top in images:
        if top in backing or top in src.retired:
            continue
        name = _name_for(top, images, recorded_by_path)
        if name in taken:
            src.refused.append(Refused(name, top, f"a second chain claims the name {name!r}"))
            continue
        taken.add(name)
        src.chains.append(ChainSpec(name, top, (src.directory,)))
        if src.recorded.get(name) != top:
            src.recorded[name] = top


def _name_for(top: str, images: dict[str, str | None], recorded: dict[str, str]) -> str:
    """The nearest recorded active layer at or below ``top`` names the chain."""
    seen: set[str] = set()
    p: str | None = top
    while p is not None and p not in seen:
        if p in recorded:
            return recorded[p]
        seen.add(p)
        p = images.get(p)
    return _stem(top)


def _read_toml(src: Source) -> None:
    try:
        with open(src.path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ChainfsError(f"cannot read {src.path!r}: {e}") from None
    chains = doc.get("chains")
    if not isinstance(chains, dict) or not chains:
        raise ChainfsError(f"{src.path!r} names no chains ([chains.NAME] active = ...)")
    for name, table in chains.items():
        if not isinstance(table, dict) or not isinstance(table.get("active"), str):
            src.refused.append(Refused(name, "", "no 'active' path given"))
            continue
        if not usable_name(name):
            src.refused.append(Refused(name, "", f"{name!r} is not a usable chain name"))
            continue
        active = named = src._abs(table["active"])
        # after a snapshot the recorded active layer is the newer one
        recorded = src.recorded.get(name)
        if recorded and os.path.exists(recorded):
            active = recorded
        # the state file may name an active layer anywhere: the TOML's word counts
        homes = (src.directory, os.path.dirname(named))
        src.chains.append(ChainSpec(name, active, homes))
        src.recorded[name] = active
