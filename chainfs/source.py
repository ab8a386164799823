"""Where chains come from: a directory of images or a TOML file, plus the state file.

In a directory, every qcow2 image that is not the backing file of another image there
is the active layer of one chain, named after its file without ``.qcow2``.  The name
must survive snapshots (the active layer changes) and streams and commits (layers leave
the chain and would otherwise look like chains of their own), so chainfs keeps a small
state file beside the images, ``.chainfs.json``::

    {"version": 1,
     "chains": {"vm1": "vm1-snap2.qcow2"},      # name -> active layer as last known
     "retired": ["B.qcow2", "C.qcow2"]}          # layers that left a chain

Paths inside the source directory are stored relative to it.  The file is replaced
atomically (write, fsync, rename, fsync the directory).  If chainfs stops after an
overlay was created but before the state was updated, the name is still found: a
chain's name is that of the nearest recorded active layer at or below its top.

A TOML source names chains explicitly (``[chains.NAME] active = "path"``, relative
paths against the TOML file's directory); its state file sits beside it.

Each chain comes with the directories its files may lie in by default (``homes``, which
a mount widens with ``allow_dir`` and ``allow_backing``, ``confine``): the source
directory; for a TOML source, the TOML file's directory and that of the active layer
the TOML names for the chain (not one the state file names: the state file sits among
the images, and whoever can write the images can write it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field

from .chain import resolve_backing
from .errors import ChainfsError
from .formats import is_qcow2
from .formats.qcow2 import read_backing
from .hostfile import HostIOError, sync_dir

log = logging.getLogger(__name__)

STATE_NAME = ".chainfs.json"


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
    retired: set[str] = field(default_factory=set)

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, STATE_NAME)

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.directory)
        return path if rel.startswith("..") else rel

    def _abs(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.directory, path))

    def save(self) -> None:
        """Write the state file atomically.

        When that fails (a full disk) the old file stays, and what changed in memory
        is written by the next save that succeeds.
        """
        state = {
            "version": 1,
            "chains": {name: self._rel(p) for name, p in sorted(self.recorded.items())},
            "retired": sorted(self._rel(p) for p in self.retired),
        }
        tmp = self.state_path + ".tmp"
        try:
            try:
                with open(tmp, "w") as f:
                    json.dump(state, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.state_path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            sync_dir(self.directory)
        except OSError as e:
            raise HostIOError(
                f"saving the state file {self.state_path!r} failed: {e.strerror}",
                e.errno or errno.EIO,
            ) from None

    def record_active(self, name: str, path: str) -> None:
        self.recorded[name] = os.path.abspath(path)
        self.save()

    def retire(self, paths: list[str]) -> None:
        self.retired.update(os.path.abspath(p) for p in paths)
        self.save()

    def move_active(self, name: str, path: str, leaving: list[str]) -> None:
        """A pivot, in one atomic save: ``path`` is now the active layer of chain
        ``name``, and ``leaving`` left it."""
        self.retired.update(os.path.abspath(p) for p in leaving)
        self.retired.discard(os.path.abspath(path))
        self.recorded[name] = os.path.abspath(path)
        self.save()

    def _load_state(self) -> None:
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
        self.recorded = {str(k): self._abs(str(v)) for k, v in chains.items()}
        self.retired = {self._abs(str(p)) for p in retired}


def _stem(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(".qcow2")] if base.endswith(".qcow2") else base


def _backing_of(path: str) -> str | None:
    """The absolute path an image's backing string points at (None: no backing)."""
    string = read_backing(path)
    if not string:
        return None
    return os.path.normpath(resolve_backing(os.path.abspath(path), string))


def load_state(path: str) -> Source:
    """Only the state file of a directory or TOML source, without looking for chains:
    what recovery of interrupted jobs changes before the chains are found."""
    path = os.path.abspath(path)
    src = Source(path=path, directory=path if os.path.isdir(path) else os.path.dirname(path))
    src._load_state()
    return src


def load(path: str) -> Source:
    """Find the chains of a directory or TOML source (opening no chain yet)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        src = Source(path=path, directory=path)
        src._load_state()
        _scan_directory(src)
    elif os.path.isfile(path):
        _refuse_image(path)
        src = Source(path=path, directory=os.path.dirname(path))
        src._load_state()
        _read_toml(src)
    else:
        raise ChainfsError(f"source {path!r} is neither a directory nor a TOML file")
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
        if "/" in name or name.startswith(".") or not name:
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
