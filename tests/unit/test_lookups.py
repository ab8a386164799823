"""Name and inode lookups without FUSE: ``Operations`` finds a chain's files by dicts,
never by a walk of the mount's disks (a disks list that refuses to be walked proves it),
and the layer views' names and inodes follow the chains' layers through snapshot,
stream, commit and copy (a hypothesis property test against a model).  ``.status`` lines
are rendered again only for the chains whose shown fields were said to change, and a
guest write pays nothing for it."""

from __future__ import annotations

import ast
import errno
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, cast

import pyfuse3
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import chainfs.disk
import chainfs.jobs.served
import chainfs.mount
from chainfs.chain import Chain
from chainfs.control import CommandError
from chainfs.disk import SHOWN_IN_STATUS, Disk
from chainfs.eventlog import EventLog
from chainfs.formats.base import Layer
from chainfs.fs import (
    CONTROL,
    CONTROL_FILES,
    LAYERS,
    READ_FILES,
    ROOT,
    STATUS,
    STATUS_RENDERS,
    TEXT_PIECE,
    Operations,
)
from chainfs.jobs.served import Readers, chain_changed, refuse_shared
from chainfs.source import Refused, Source
from chainfs.views import Views

from .fake_chain import SIZE, FakeChain, FakeLayer

T = TypeVar("T")


@dataclass(eq=False)
class FakeDisk:
    """What ``Operations`` uses of a ``Disk`` to look up, stat and list (hashed by
    identity, as ``Disk``)."""

    name: str
    chain: FakeChain
    views: Views = field(init=False)
    readonly: bool = False
    writable_here: bool = True
    mtime_ns: int = 0
    ctime_ns: int = 0
    warning: str | None = None
    owned: bool = True
    fenced: str | None = None

    def __post_init__(self) -> None:
        self.views = Views(self.name, self.chain)  # type: ignore[arg-type]

    def owner_pairs(self) -> list[tuple[str, object]]:
        return [("owner", "self")]


class NoScan(list[T]):
    """The mount's disks, refusing every walk once ``armed``: indexing by position and
    ``len`` only (what an inode's arithmetic needs)."""

    armed = False
    walks = 0

    def _refuse(self) -> None:
        self.walks += 1
        if self.armed:
            raise AssertionError("the request path walked the list of disks")

    def __iter__(self) -> Iterator[T]:
        self._refuse()
        return super().__iter__()

    def index(self, *args: Any) -> int:
        self._refuse()
        return super().index(*args)

    def __contains__(self, item: object) -> bool:
        self._refuse()
        return super().__contains__(item)

    def count(self, item: Any) -> int:
        self._refuse()
        return super().count(item)


def operations(disks: list[FakeDisk]) -> Operations:
    return Operations(
        cast(list[Disk], disks), Source("/srv", "/srv"), readonly=False, mountpoint="/mnt"
    )


def lookup(ops: Operations, parent: int, name: str | bytes) -> int | None:
    raw = os.fsencode(name)
    try:
        return int(trio.run(ops.lookup, parent, raw).st_ino)
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.ENOENT
        return None


def listing(ops: Operations, inode: int) -> list[tuple[bytes, int]]:
    """``readdir`` from the start, a few entries per call (as the kernel's buffer fills),
    each entry stat'ed as readdirplus does."""
    out: list[tuple[bytes, int]] = []
    room = [0]

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room[0] == 0:
            return False  # the buffer is full: not taken, asked for again
        assert next_id == len(out) + 1
        room[0] -= 1
        out.append((name, int(attr.st_ino)))
        return True

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pyfuse3, "readdir_reply", reply)
        fh = trio.run(ops.opendir, inode, None)
        while True:
            before, room[0] = len(out), 7
            trio.run(ops.readdir, fh, before, None)
            if len(out) == before:
                return out


def test_lookups_and_listings_never_walk_the_disks() -> None:
    n = 3000
    disks = NoScan(
        FakeDisk(f"vm{i}", FakeChain([FakeLayer(f"/img/vm{i}.qcow2")])) for i in range(n)
    )
    ops = operations(disks)
    # (the dicts were built at start: O(n), once)
    disks.armed = True
    for i in (0, 1, n // 2, n - 1):
        img = lookup(ops, ROOT, f"vm{i}.img")
        assert img is not None and int(trio.run(ops.getattr, img, None).st_size) == SIZE
        folder = lookup(ops, CONTROL, f"vm{i}")
        assert folder is not None
        assert lookup(ops, folder, "snapshot") == folder - 1 + 2 + CONTROL_FILES.index("snapshot")
        assert lookup(ops, folder, "nothing") is None
        layers = lookup(ops, LAYERS, f"vm{i}")
        assert layers is not None
        view = lookup(ops, layers, f"vm{i}.qcow2.img")
        assert view is not None and trio.run(ops.getattr, view, None).st_size == SIZE
        assert [name for name, _ in listing(ops, layers)] == [f"vm{i}.qcow2.img".encode()]
    assert lookup(ops, ROOT, "vm3000.img") is None
    # ``control/.status`` shows every chain, from each chain's line kept (no walk)
    assert lookup(ops, CONTROL, ".status") == STATUS
    root = listing(ops, ROOT)
    assert len(root) == n + 2 and len(set(root)) == n + 2
    assert root[2] == (b"vm0.img", lookup(ops, ROOT, "vm0.img"))
    assert len(listing(ops, CONTROL)) == n + 1
    assert len(listing(ops, LAYERS)) == n
    assert trio.run(ops.statfs, None).f_blocks == n * SIZE // 4096  # (summed at start)
    img = lookup(ops, ROOT, "vm7.img")
    assert img is not None
    with pytest.raises(pyfuse3.FUSEError) as e:  # a file is no directory
        trio.run(ops.lookup, img, b"x", None)
    assert e.value.errno == errno.ENOTDIR


# -- the layer views follow the jobs ----------------------------------------------------

POOL = [f"L{i}" for i in range(8)]  # layer file names: a name can come back
CHAINS = ("a", "b", "c")
PROBES = ["base.qcow2.img"] + [f"{p}{n}.qcow2.img" for n in POOL for p in ("", "copy-")]

layer_names = st.sampled_from(POOL)
steps = st.one_of(
    st.tuples(st.just("snapshot"), st.sampled_from(CHAINS), layer_names),
    st.tuples(st.just("stream"), st.sampled_from(CHAINS), st.integers(0, 9)),
    st.tuples(st.just("commit"), st.sampled_from(CHAINS), st.integers(0, 9)),
    st.tuples(st.just("copy"), st.sampled_from(CHAINS), layer_names),
)


def apply(disk: FakeDisk, step: tuple[str, str, Any]) -> None:
    """A job's effect on the chain's layers (active first), then the views follow it, as
    ``launch``/``chain_changed``/``job_ended`` drive them."""
    kind, _, arg = step
    layers = disk.chain.layers
    if kind == "snapshot":
        new = [FakeLayer(f"/img/{disk.name}/{arg}.qcow2"), *layers]
        writes: list[str] = []
    elif kind == "stream":  # into the active layer from a base: the layers between go
        base = 1 + arg % len(layers) if len(layers) > 1 else len(layers)
        new = [layers[0], *layers[base:]]
        writes = [layers[0].path]
    elif kind == "commit":  # the layers above a base go into it (active commit: top too)
        base = arg % len(layers)
        new = layers[base:]
        writes = [layers[base].path]
    else:  # copy (full): a new file is the whole chain
        new = [FakeLayer(f"/img/{disk.name}/copy-{arg}.qcow2")]
        writes = []
    disk.views.refuse("job", writes)
    disk.chain.layers = new
    disk.views.refresh()
    disk.views.job_ended()


@settings(max_examples=50, deadline=None)
@given(st.lists(steps, max_size=20))
def test_view_names_and_inodes_follow_the_layers(ops_steps: list[tuple[str, str, Any]]) -> None:
    disks = NoScan(FakeDisk(c, FakeChain([FakeLayer(f"/img/{c}/base.qcow2")])) for c in CHAINS)
    ops = operations(disks)
    by_name = {d.name: d for d in disks}
    # the model: per chain, each view name's inode, given at its first sight for the
    # mount's life (a name that comes back gets the inode it had)
    model: dict[str, dict[str, int]] = {c: {} for c in CHAINS}
    fixed = {
        parent: listing(ops, parent) for parent in (ROOT, CONTROL, LAYERS)
    }  # chain names never change: neither do these

    def check() -> None:
        seen: set[int] = set()
        for c in CHAINS:
            disk = by_name[c]
            folder = lookup(ops, LAYERS, c)
            assert folder is not None
            shown = dict(listing(ops, folder))
            assert len(shown) == len(listing(ops, folder))  # no name twice
            # every layer of the chain has its view, under the model's inode
            current = [os.path.basename(x.path) + ".img" for x in disk.chain.layers]
            for name in current:
                assert os.fsencode(name) in shown
            for name in dict.fromkeys([*current, *PROBES]):
                found = lookup(ops, folder, name)
                assert found == shown.get(os.fsencode(name))  # a lookup agrees with readdir
                if found is None:
                    continue
                inode = model[c].setdefault(name, found)
                assert found == inode  # the name keeps its inode
                assert found not in seen  # and no other view (of any chain) has it
                seen.add(found)
                assert int(trio.run(ops.getattr, found, None).st_ino) == found
                view = ops._view_of(found)
                assert view is not None and view[0] is cast(Disk, disk) and view[1] is not None
                assert view[1].name == name
            # retired views may stay, but only ones the chain had
            assert {os.fsdecode(n) for n in shown} <= set(model[c])
        for parent, entries in fixed.items():
            assert listing(ops, parent) == entries
            for entry, inode in entries:
                assert lookup(ops, parent, entry) == inode

    check()
    for step in ops_steps:
        apply(by_name[step[1]], step)
        check()


# -- .status and refuse_shared: only the chains concerned -------------------------------


def served_disk(name: str, paths: list[str], readers: Readers) -> Disk:
    """A real ``Disk`` over a fake chain (layers active first)."""
    chain = FakeChain([FakeLayer(p) for p in paths])
    return Disk(
        name,
        cast(Chain, chain),
        Source("/srv", "/srv"),
        allowed_dirs=[],
        readonly=False,
        spawn=lambda fn: None,
        readers=readers,
    )


def test_status_renders_again_only_the_chains_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 2000
    readers = Readers()
    disks = NoScan(served_disk(f"vm{i}", [f"/img/vm{i}.qcow2"], readers) for i in range(n))
    ops = operations(cast(list[FakeDisk], disks))
    rendered = counted_renders(monkeypatch)
    disks.armed = True  # no read of ``.status`` walks the disks
    first = ops.status_text()
    assert len(rendered) == n and first.count(b"status=served") == n
    assert ops.status_text() == first and len(rendered) == n  # nothing changed: kept
    assert trio.run(ops.getattr, STATUS, None).st_size == len(first)
    assert len(rendered) == n

    rendered.clear()
    disks[5].warning = "served read-only: too deep"
    disks[5].shown_changed()
    snap = disks[7]  # a snapshot: a new active layer, then ``chain_changed``
    snap.chain.layers.insert(0, cast(Layer, FakeLayer("/img/vm7-snap.qcow2")))
    chain_changed(snap)
    disks[9].fenced = "the lock is gone"
    disks[9].shown_changed()
    text = ops.status_text()
    assert sorted(rendered) == ["vm5", "vm7", "vm9"]
    lines = text.decode().splitlines()
    assert "warning=" in lines[1 + 5] and "active=/img/vm7-snap.qcow2" in lines[1 + 7]
    assert "owner=lost" in lines[1 + 9] and lines[1 + 8] == first.decode().splitlines()[1 + 8]

    rendered.clear()
    disks[11].owned = False  # owned elsewhere or by nobody: a lock probe at every read
    disks[11].shown_changed()
    ops.status_text()
    text = ops.status_text()
    assert rendered == ["vm11", "vm11"]
    disks.armed = False
    assert (
        text
        == Operations(  # what rendering every chain afresh gives
            cast(list[Disk], list(disks)), ops.source, readonly=False, mountpoint="/mnt"
        ).status_text()
    )


def read_status(ops: Operations, size: int = 1 << 20) -> tuple[bytes, list[int]]:
    """``.status`` opened and read to its end as the kernel asks (1 MiB a request):
    the text and each reply's length."""
    fh = trio.run(ops.open, STATUS, os.O_RDONLY, None).fh
    text, replies = b"", []
    while piece := trio.run(ops.read, fh, len(text), size):
        replies.append(len(piece))
        text += piece
    trio.run(ops.release, fh)
    return text, replies


def counted_renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the chains whose line is rendered from now on."""
    rendered: list[str] = []
    owner_pairs = Disk.owner_pairs

    def counted(self: Disk) -> list[tuple[str, object]]:
        rendered.append(self.name)
        return owner_pairs(self)

    monkeypatch.setattr(Disk, "owner_pairs", counted)
    return rendered


def test_a_read_of_status_renders_a_few_lines_and_gives_a_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No read of ``.status`` holds the request worker for long: each reply is at most
    ``TEXT_PIECE`` bytes (the kernel asks 1 MiB) and renders at most ``STATUS_RENDERS``
    lines, on the first read after the mount (every line to render) and on a mount that
    owns none of its chains (every line rendered at each read) alike."""
    n = 2000
    readers = Readers()
    disks = NoScan(served_disk(f"vm{i}", [f"/img/vm{i}.qcow2"], readers) for i in range(n))
    ops = operations(cast(list[FakeDisk], disks))
    ops.source.refused += [Refused(f"r{i}", f"/img/r{i}.qcow2", "EMFILE " * 30) for i in range(900)]
    rendered = counted_renders(monkeypatch)
    disks.armed = True  # (and no walk of the disks)
    per_read: list[int] = []
    fh = trio.run(ops.open, STATUS, os.O_RDONLY, None).fh
    assert rendered == []  # the open renders nothing
    text = b""
    while True:
        before = len(rendered)
        piece = trio.run(ops.read, fh, len(text), 1 << 20)
        per_read.append(len(rendered) - before)
        if not piece:
            break
        assert len(piece) <= TEXT_PIECE
        text += piece
    assert max(per_read) == STATUS_RENDERS and len(rendered) == n
    assert len(text) > 4 * TEXT_PIECE and text.count(b"status=refused") == 900
    assert trio.run(ops.getattr, STATUS, None).st_size == len(text)
    # a read that starts past what was rendered: rendered on to there
    fh = trio.run(ops.open, STATUS, os.O_RDONLY, None).fh
    assert trio.run(ops.read, fh, len(text) - 10, 4096) == text[-10:]
    assert trio.run(ops.read, fh, 0, 100) == text[:100]
    assert trio.run(ops.read, fh, len(text), 4096) == b""
    # read whole and nothing changed since: the next opens share that text as it is
    # (no line copied again), until a line changes
    first, second = (trio.run(ops.open, STATUS, os.O_RDONLY, None).fh for _ in range(2))
    assert ops.handles[first].status is ops.handles[second].status
    assert read_status(ops)[0] == text
    disks[3].warning = "served read-only: too deep"
    disks[3].shown_changed()
    third = trio.run(ops.open, STATUS, os.O_RDONLY, None).fh
    assert ops.handles[third].status is not ops.handles[first].status
    assert trio.run(ops.read, first, 0, 1 << 20) == text[:TEXT_PIECE]  # (as it was)
    changed, _ = read_status(ops)
    assert b"warning=" in changed and changed != text
    disks[3].warning = None
    disks[3].shown_changed()
    text, _ = read_status(ops)
    disks.armed = False
    rendered.clear()
    assert text == ops.status_text() and rendered == []  # each line kept

    # a mount that owns none of them: every line rendered at each read, a few a reply
    for d in disks:
        d.owned = False
        d.shown_changed()
    rendered.clear()
    again, replies = read_status(ops)
    assert len(rendered) == n and len(replies) >= n // STATUS_RENDERS
    assert again.count(b" owner=none") == n
    assert (
        again
        == Operations(  # what rendering every chain afresh gives
            cast(list[Disk], list(disks)), ops.source, readonly=False, mountpoint="/mnt"
        ).status_text()
    )


SHOWN_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["warning", "fence", "disown", "own", "snapshot", "read", "partial"]),
        st.integers(0, 11),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(steps=SHOWN_STEPS)
def test_status_read_in_pieces_equals_a_full_rendering(steps: list[tuple[str, int]]) -> None:
    """After any changes of the shown fields, with reads of ``.status`` (whole, or cut
    short) between them, the text a read gives is the text rendered afresh."""
    readers = Readers()
    disks = [served_disk(f"vm{i}", [f"/img/vm{i}.qcow2"], readers) for i in range(12)]
    ops = operations(cast(list[FakeDisk], disks))
    ops.source.refused.append(Refused("gone", "/img/gone.qcow2", "not a qcow2 image"))
    sizes = iter([5, 70, 4096, 1 << 20] * 10)
    for kind, i in steps:
        disk = disks[i]
        if kind == "warning":
            disk.warning = f"served read-only: step {len(disk.name)}"
            disk.shown_changed()
        elif kind == "fence":
            disk.fenced = "the lock is gone"
            disk.shown_changed()
        elif kind in ("disown", "own"):
            disk.owned = kind == "own"
            disk.shown_changed()
        elif kind == "snapshot":
            disk.chain.layers.insert(0, cast(Layer, FakeLayer(f"/img/{disk.name}-s{i}.qcow2")))
            chain_changed(disk)
        elif kind == "read":
            read_status(ops, next(sizes))
        else:  # a reader that stops after a piece
            fh = trio.run(ops.open, STATUS, os.O_RDONLY, None).fh
            trio.run(ops.read, fh, 0, next(sizes))
            trio.run(ops.release, fh)
    fresh = Operations(disks, ops.source, readonly=False, mountpoint="/mnt")
    whole = fresh.status_text()
    assert read_status(ops, next(sizes))[0] == whole
    assert ops.status_text() == whole


@pytest.mark.expect_log(r"WARNING chainfs\.disk: ownership of vm0 suspended: ")
def test_a_guest_write_calls_nothing_of_the_status_watching() -> None:
    disk = served_disk("vm0", ["/img/vm0.qcow2"], Readers())
    ops = operations(cast(list[FakeDisk], [disk]))
    img = lookup(ops, ROOT, "vm0.img")
    assert img is not None and b"vm0" in ops.status_text()
    told: list[Disk] = []
    disk.on_status = told.append
    fh = trio.run(ops.open, img, os.O_RDWR, None).fh
    watching = chainfs.jobs.served.__file__
    entered: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == watching:
            entered.append(frame.f_code.co_name)

    before = disk.mtime_ns = disk.ctime_ns = 0
    sys.setprofile(profile)
    try:
        assert trio.run(ops.write, fh, 4096, b"x" * 4096) == 4096
    finally:
        sys.setprofile(None)
    fake = cast(FakeChain, disk.chain)
    assert fake.writes == [(4096, 4096)] and disk.mtime_ns > before  # the times stamped
    assert entered == [] and told == []  # ... and no status watching paid for it
    disk.suspend("the owner file's heartbeat is blocked")  # a shown field set: said
    assert told == [disk]
    disk.resume()
    assert told == [disk, disk]


def shown_sets() -> Iterator[tuple[str, str, int, bool]]:
    """Every set of a field of ``SHOWN_IN_STATUS`` in the modules that serve a chain,
    outside an ``__init__``: (module, function, line, whether the function says so)."""
    for module in (chainfs.disk, chainfs.mount):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.name == "__init__":
                continue
            says = any(
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and n.func.attr in ("shown_changed", "status_changed")
                for n in ast.walk(fn)
            )
            for node in ast.walk(fn):
                if not isinstance(node, ast.Assign):
                    continue
                for t in node.targets:
                    for x in t.elts if isinstance(t, ast.Tuple) else [t]:
                        # (``self.views.chain`` is the views' chain, not a shown field)
                        if (
                            isinstance(x, ast.Attribute)
                            and x.attr in SHOWN_IN_STATUS
                            and not isinstance(x.value, ast.Attribute)
                        ):
                            yield module.__name__, fn.name, node.lineno, says


def test_every_set_of_a_shown_field_says_so() -> None:
    sets = list(shown_sets())
    assert {(m, f) for m, f, _, _ in sets} >= {
        ("chainfs.disk", "fence"),
        ("chainfs.mount", "serve"),  # (a take-over, ``_Taking``)
    }
    assert [s for s in sets if not s[3]] == []


def test_refuse_shared_looks_only_at_the_chains_reading_the_layer() -> None:
    readers = Readers()
    a = served_disk("a", ["/img/a.qcow2", "/img/golden.qcow2"], readers)
    b = served_disk("b", ["/img/b.qcow2", "/img/golden.qcow2"], readers)
    c = served_disk("c", ["/img/c.qcow2", "/img/c-base.qcow2"], readers)
    rest = [served_disk(f"vm{i}", [f"/img/vm{i}.qcow2"], readers) for i in range(1000)]
    for d in rest:  # a chain that shares nothing with them is never looked at
        d.chain = cast(Chain, None)
    with pytest.raises(CommandError) as e:
        refuse_shared(a, a.chain.layers[1])
    assert e.value.errno == errno.EBUSY and "chain 'b'" in str(e.value)
    refuse_shared(a, a.chain.layers[0])
    refuse_shared(c, c.chain.layers[1])
    b.chain.layers[1:] = []  # b streamed golden into its active layer: no longer shared
    chain_changed(b)
    refuse_shared(a, a.chain.layers[1])


def test_an_events_file_open_across_a_take_over_reads_on_untorn() -> None:
    """A take-over puts the chain's history in place of what the mount showed while
    it waited (``EventLog.carry_into``): a reader that opened ``events`` before reads
    on where it was, the lines since the take-over began and the new ones, never the
    history's bytes at its old offset (a torn line)."""

    def line(n: int) -> str:
        return f"time=t{n} event=E{n} chain=vm1"

    disk = served_disk("vm1", ["/img/vm1.qcow2"], Readers())
    ops = operations(cast(list[FakeDisk], [disk]))
    for n in range(3):  # shown before the take-over
        disk.events.append(line(n))
    fh = trio.run(ops.open, ops._inode(disk, 2 + READ_FILES.index("events")), os.O_RDONLY, None).fh
    got = trio.run(ops.read, fh, 0, 40)
    shown = len(disk.events)  # the take-over begins
    disk.events.append(line(3))
    history = EventLog(chain="vm1")
    for n in range(100, 110):  # the chain's history: longer than what was shown
        history.append(line(n))
    old = disk.events
    old.carry_into(history, shown)
    disk.events = history
    history.append(line(4))
    while piece := trio.run(ops.read, fh, len(got), 40):
        got += piece
    assert got.decode().splitlines() == [line(n) for n in range(5)]
    assert len(old) == len(got)
    assert bytes(history).decode().splitlines()[-2:] == [line(3), line(4)]
