"""Many hosts on one store, without a mount: the owner lock, the state record's two slots,
the journal's in-place compaction under every crash, relative paths, the migration
of the single state file and journal of earlier versions, and the heartbeat's verdicts
(refused: fence; blocked or failing: suspend; written again: resume)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from chainfs import descriptors, mount, ownership
from chainfs import source as sources
from chainfs.disk import Disk
from chainfs.formats.qcow2 import create_overlay
from chainfs.jobs import journal as jn
from chainfs.jobs import recovery
from chainfs.jobs.journal import Journal
from chainfs.ownership import (
    MOUNT_ID,
    OWNER_SUFFIX,
    OwnedElsewhere,
    Ownership,
    chain_file,
    describe_holder,
    fs_type,
    judge_owner,
)

STREAM = {"node": "E.qcow2", "base": "A.qcow2", "speed": 0}


def make_chain(d: Path) -> tuple[str, str, str]:
    a, b, c = (str(d / n) for n in ("A.qcow2", "B.qcow2", "C.qcow2"))
    create_overlay(a, size=1 << 20, backing=None, backing_format=None)
    create_overlay(b, size=1 << 20, backing="A.qcow2", backing_format="qcow2")
    create_overlay(c, size=1 << 20, backing="B.qcow2", backing_format="qcow2")
    return a, b, c


def close_all(disks: list[Disk], rec: recovery.Recovery, src: sources.Source) -> None:
    """Close what a test opened: the disks, the journals, every chain's locks."""
    for disk in disks:
        disk.close()
    rec.close()
    for name in list(src.owned):
        src.disown(name)


def test_one_owner_per_chain_and_the_refusal_names_it(tmp_path: Path) -> None:
    """Two open file descriptions are two holders (as two hosts are): the second is
    refused with the first one's diagnostics; another chain is free; release frees."""
    first = Ownership.acquire(str(tmp_path), "vm1")
    with pytest.raises(OwnedElsewhere) as exc:
        Ownership.acquire(str(tmp_path), "vm1")
    assert exc.value.holder.startswith(f"chainfs on host {socket.gethostname()} ")
    assert f"mount {MOUNT_ID}, pid {os.getpid()}, heartbeat 0 s ago" in exc.value.holder
    other = Ownership.acquire(str(tmp_path), "vm2")
    first.release()
    again = Ownership.acquire(str(tmp_path), "vm1")
    assert describe_holder(str(tmp_path), "vm9").startswith("another process")
    again.release()
    other.release()


def test_the_state_record_is_written_in_place_in_two_slots(tmp_path: Path) -> None:
    _, b, c = make_chain(tmp_path)
    src = sources.load(str(tmp_path))
    src.record_active("C", c)
    path = Path(src.chain_state_path("C"))
    inode = path.stat().st_ino
    src.retire([b], "C")
    assert path.stat().st_ino == inode  # never replaced by a rename
    gen, record = sources.read_slots(path.read_bytes())
    assert gen == 2 and record == {
        "version": 2,
        "chain": "C",
        "active": "C.qcow2",
        "retired": ["B.qcow2"],
    }
    # a save torn anywhere in its slot leaves the record before it
    data = path.read_bytes()
    slot = (3 % 2) * sources.SLOT
    src.retire([c], "C")
    new = path.read_bytes()
    for cut in range(0, len(new) - slot, 7):
        torn = bytearray(data.ljust(len(new), b"\0"))
        torn[slot : slot + cut] = new[slot : slot + cut]
        assert sources.read_slots(bytes(torn)) == (gen, record)
    assert sources.read_slots(new)[0] == 3
    src.disown("C")


def test_local_storage_syncs_no_heartbeat_and_no_unchanged_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount's bring-up on a local file system (issue #20: two fdatasyncs a chain made
    10,000 chains mount in minutes): taking a chain's locks syncs nothing (the owner
    file's heartbeat is diagnostics only there), the first save of many records is made
    durable by one syncfs, and the next mount, whose records are unchanged, writes none.
    On shared storage every heartbeat is synced (the fence rule needs its EIO)."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        create_overlay(
            str(tmp_path / f"{name}.qcow2"), size=1 << 20, backing=None, backing_format=None
        )
    synced: list[int] = []
    syncfs: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    def counted_syncfs(fd: int) -> int:
        syncfs.append(fd)
        return 0

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(sources, "_syncfs", counted_syncfs, raising=False)
    monkeypatch.setattr(Ownership, "shared_storage", False, raising=False)

    def mount_once() -> sources.Source:
        src = sources.load(str(tmp_path))
        assert [c.name for c in src.chains] == names
        for name in names:
            src.own(name)
        src.save()
        return src

    src = mount_once()
    assert synced == [] and len(syncfs) == 1
    for name in names:
        gen, record = sources.read_slots(Path(src.chain_state_path(name)).read_bytes())
        assert gen == 1 and record is not None and record["active"] == f"{name}.qcow2"
        assert ownership.read_holder(chain_file(str(tmp_path), name, OWNER_SUFFIX)) is not None
        src.disown(name)
    syncfs.clear()
    src = mount_once()  # every record as the files hold it: nothing written
    assert synced == [] and syncfs == []
    assert all(src.generations[n] == 1 for n in names)
    # a change is written (alone: synced on its own)
    src.record_active("vm2", str(tmp_path / "vm2.qcow2"))
    assert synced == [] and syncfs == []  # (the same active layer: unchanged)
    src.retire([str(tmp_path / "gone.qcow2")], "vm2")
    assert len(synced) == 1 and src.generations["vm2"] == 2
    for name in names:
        src.disown(name)
    # where syncfs fails, each record is synced on its own (which names a failing file)
    synced.clear()
    monkeypatch.setattr(sources, "_syncfs", lambda fd: -1)
    src = sources.load(str(tmp_path))
    for name in names:
        src.own(name)
        src.retired_by[name] = {str(tmp_path / "old.qcow2")}
    src.save()
    assert len(synced) == 3 and all(src.generations[n] >= 2 for n in names)
    for name in names:
        src.disown(name)
    # shared storage: the heartbeat is synced (a lost lock is that sync's EIO)
    synced.clear()
    monkeypatch.setattr(Ownership, "shared_storage", True)
    own = Ownership.acquire(str(tmp_path), "vm1")
    assert synced == [own.owner_fd]
    own.release()


def test_journal_paths_are_relative_to_the_source_directory(tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    j = Journal(str(here), "vm1")
    outside = str(tmp_path / "elsewhere.qcow2")
    params = {"node": str(here / "E.qcow2"), "base": str(here / "A.qcow2"), "dest": outside}
    p = j.begin("copy", "copy-1", "vm1", params)
    j.phase(
        p.key, "pivot", [jn.retire([str(here / "B.qcow2")]), jn.set_backing(outside, "x", None)]
    )
    j.close()
    text = Path(jn.journal_path(str(here), "vm1")).read_text()
    assert str(here) not in text and '"node":"E.qcow2"' in text and outside in text
    shutil.copytree(here, there)  # another host mounts the store at another path
    [q] = Journal.load(str(there), "vm1").pending()
    assert q.params == {
        "node": str(there / "E.qcow2"),
        "base": str(there / "A.qcow2"),
        "dest": outside,
    }
    assert q.actions[0]["paths"] == [str(there / "B.qcow2")]


@pytest.mark.expect_log(r"WARNING chainfs\.jobs\.journal: .* damaged or torn records$")
def test_a_crash_anywhere_in_a_compaction_keeps_the_journal(tmp_path: Path) -> None:
    """Compaction appends a checkpoint, copies it to the front and cuts the file: the
    file after any prefix of those writes (each torn at any byte) reads as before."""
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    b = j.begin("stream", "stream-2", "vm1", STREAM)
    for i in range(1, 40):
        j.progress(a.key, i << 16)
    j.phase(b.key, "prepare", [jn.retire([str(tmp_path / "B.qcow2")])])
    path = Path(jn.journal_path(str(tmp_path), "vm1"))
    before = path.read_bytes()

    def state(data: bytes) -> dict[str, tuple[int, str | None]]:
        path.write_bytes(data)
        return {p.key: (p.offset, p.phase) for p in Journal.load(str(tmp_path), "vm1").pending()}

    expected = {a.key: (39 << 16, None), b.key: (0, "prepare")}
    j.compact()
    cp = path.read_bytes()
    assert cp.count(b"\n") == 1 and len(cp) < len(before)
    assert state(cp) == expected
    j.close()
    step1 = before + cp
    step2 = cp + step1[len(cp) :]
    crashes = [before + cp[:n] for n in range(0, len(cp) + 1, 5)]
    crashes += [cp[:n] + step1[n:] for n in range(0, len(cp) + 1, 5)]
    crashes += [step2, cp]
    for data in crashes:
        assert state(data) == expected
    # and the next append after such a crash lands after the last whole line
    path.write_bytes(before + cp[:20])
    again = Journal.load(str(tmp_path), "vm1")
    again.progress(a.key, 99 << 16)
    again.close()
    assert state(path.read_bytes())[a.key] == (99 << 16, None)


def test_the_files_of_earlier_versions_are_migrated(tmp_path: Path) -> None:
    """``.chainfs.json`` and ``.chainfs.journal`` (absolute paths, all chains): the first
    read-write recovery writes each chain's state record and journal, then removes them."""
    a, b, c = make_chain(tmp_path)
    (tmp_path / ".chainfs.json").write_text(
        json.dumps({"version": 1, "chains": {"vm1": "C.qcow2"}, "retired": ["Z.qcow2"]})
    )
    legacy = Journal(str(tmp_path), "", writable=False)
    stream = {"node": c, "base": a, "speed": 0}
    intent = jn.Pending("k1", "stream-4", "stream", "vm1", stream, offset=1 << 16)
    lines = b"".join(jn.encode(r) for r in intent.records())
    (tmp_path / ".chainfs.journal").write_bytes(lines)
    del legacy
    src, rec = recovery.recover(str(tmp_path), readonly=False)
    try:
        assert [s.name for s in src.chains] == ["vm1"]
        assert [p.id for p in rec.resume] == ["stream-4"] and rec.resume[0].offset == 1 << 16
        assert not (tmp_path / ".chainfs.journal").exists()
        [p] = Journal.load(str(tmp_path), "vm1", writable=False).pending()
        assert (p.key, p.params, p.offset) == ("k1", stream, 1 << 16)
        text = Path(jn.journal_path(str(tmp_path), "vm1")).read_text()
        assert str(tmp_path) not in text
        src.save()
        src.finish_migration()
        assert not (tmp_path / ".chainfs.json").exists()
        _, record = sources.read_slots(Path(src.chain_state_path("vm1")).read_bytes())
        assert record == {"version": 2, "chain": "vm1", "active": "C.qcow2", "retired": ["Z.qcow2"]}
    finally:
        close_all([], rec, src)
    again = sources.load(str(tmp_path))
    assert again.recorded == {"vm1": c} and again.retired == {str(tmp_path / "Z.qcow2")}
    assert b not in again.retired


def test_the_file_system_type_comes_from_mountinfo(tmp_path: Path) -> None:
    """Fencing is for shared storage only: the source's file system type, by the
    longest mount point above it."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /srv/images rw,relatime shared:9 - nfs4 srv:/export rw,vers=4.2\n"
        "41 22 0:51 / /srv/my\\040disks rw - ceph 10.0.0.1:/ rw\n"
    )
    assert fs_type("/srv/images/vm1", str(info)) == "nfs4"
    assert fs_type("/srv/images", str(info)) == "nfs4"
    assert fs_type("/srv/imagesX", str(info)) == "ext4"
    assert fs_type("/srv/my disks/x", str(info)) == "ceph"
    assert fs_type("/x", str(tmp_path / "none")) == ""


class BeatDisk:
    """What ``mount._beat`` sees of a disk: the verdicts it gives, in order."""

    name = "E"
    fencing = True

    def __init__(self) -> None:
        self.fenced: str | None = None
        self.calls: list[str] = []
        self.suspended = trio.Event()

    def suspend(self, reason: str) -> None:
        self.calls.append("suspend")
        self.suspended.set()

    def resume(self) -> None:
        self.calls.append("resume")

    def fence(self, reason: str) -> None:
        self.fenced = reason
        self.calls.append("fence")


class BeatOwnership:
    """An owner file whose heartbeat blocks until ``go`` is set, then raises ``error``."""

    lost: str | None = None

    def __init__(self, error: int | None, blocked: bool) -> None:
        self.error = error
        self.go = threading.Event()
        if not blocked:
            self.go.set()

    def heartbeat(self) -> None:
        self.go.wait()
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))


@pytest.mark.parametrize(
    ("error", "blocked", "verdicts"),
    [
        (None, False, ["resume"]),  # written: goes on (a no-op unless suspended)
        (errno.EIO, False, ["fence"]),  # refused: the server revoked the lock
        (errno.ETIMEDOUT, False, ["suspend"]),  # failing otherwise: cannot be told
        (None, True, ["suspend", "resume"]),  # blocked half the lease, then written
        (errno.EIO, True, ["suspend", "fence"]),  # blocked, then refused: lost
    ],
)
async def test_a_heartbeat_refused_fences_one_blocked_or_failing_suspends(
    error: int | None, blocked: bool, verdicts: list[str]
) -> None:
    disk, own, beating = BeatDisk(), BeatOwnership(error, blocked), {"E"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount._beat, disk, own, 0.2, beating)  # type: ignore[arg-type]
        if blocked:
            await disk.suspended.wait()
            assert beating == {"E"}  # no second heartbeat while this one is blocked
            own.go.set()
    assert disk.calls == verdicts
    assert not beating


def test_status_judges_the_owner_by_the_owner_file_without_testing_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that does not own a chain says who does from the owner file's heartbeat
    alone (fresh, overdue, released): it never tests the lock -- on NFS a lock test
    makes nfsd expire a cut-off owner's courteous locks, fencing an owner nobody took
    the chain from.  The fake: every fcntl lock call fails the test."""
    directory = str(tmp_path)
    owner = Ownership.acquire(directory, "vm1")
    path = chain_file(directory, "vm1", OWNER_SUFFIX)

    def no_lock_test(*args: object) -> int:
        raise AssertionError("the owner lock was tested")

    monkeypatch.setattr(ownership, "_fcntl", no_lock_test)
    # a Disk that does not own vm1, as status asks it (only what owner_pairs reads)
    fake = SimpleNamespace(
        name="vm1",
        fenced=None,
        suspended=None,
        owned=False,
        holder=None,
        unstable=None,
        source=SimpleNamespace(directory=directory),
    )
    pairs = dict(Disk.owner_pairs(fake))  # type: ignore[arg-type]
    assert pairs["owner"] == "elsewhere", pairs
    assert f"(mount {MOUNT_ID}, pid {os.getpid()}, heartbeat 0 s ago)" in str(pairs["holder"])
    assert "overdue" not in str(pairs["holder"])
    later = time.time() + ownership.STALE_AFTER + 5
    words = judge_owner(directory, "vm1", now=later)
    assert words is not None and words.endswith(
        "; overdue: that host may be dead or cut off (adopt waits for its lock)"
    ), words
    owner.release()  # its last words: released
    assert json.loads(Path(path).read_text())["released"] is True
    assert dict(Disk.owner_pairs(fake)) == {"owner": "none"}  # type: ignore[arg-type]
    assert fake.holder is None
    # no file, an empty one, garbage: nobody
    assert judge_owner(directory, "vm2") is None
    Path(chain_file(directory, "vm2", OWNER_SUFFIX)).write_bytes(b"")
    assert judge_owner(directory, "vm2") is None
    Path(chain_file(directory, "vm2", OWNER_SUFFIX)).write_bytes(b"[1, 2]\n")
    assert judge_owner(directory, "vm2") is None


async def test_activate_looks_at_its_chain_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``activate`` (and ``adopt``, which takes a chain the same way) serves the chain
    its state record names, without a scan of the source directory (which read every
    image's header: O(chains) a command on a mount of thousands)."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        base, top = tmp_path / f"{name}-base.qcow2", tmp_path / f"{name}.qcow2"
        create_overlay(str(base), size=1 << 20, backing=None, backing_format=None)
        create_overlay(str(top), size=1 << 20, backing=base.name, backing_format="qcow2")
    src, rec = recovery.recover(str(tmp_path), readonly=False)
    opts = mount.MountOptions()
    disks = mount.open_disks(src, opts, journals=rec.journals)
    src.save()
    try:
        async with trio.open_nursery() as nursery:
            hosts = mount.Hosts(src, opts, disks, rec, nursery, lambda d: None)
            vm2 = disks[1]
            assert vm2.name == "vm2"
            hosts.inactivate(vm2)
            assert not vm2.owned and not vm2.chain.writable

            def scan(*args: object, **kw: object) -> None:
                raise AssertionError("the source directory was scanned")

            monkeypatch.setattr(sources, "load", scan)
            monkeypatch.setattr(sources, "_scan_directory", scan)
            await hosts.take(vm2, Ownership.acquire(str(tmp_path), "vm2"), "activate")
            assert vm2.owned and vm2.chain.writable
            assert [os.path.basename(x.path) for x in vm2.chain.layers] == [
                "vm2.qcow2",
                "vm2-base.qcow2",
            ]
            nursery.cancel_scope.cancel()
    finally:
        close_all(disks, rec, src)


@pytest.mark.expect_log(r"WARNING chainfs\.(mount|descriptors): .*(refused|want of descriptors)")
def test_chains_past_the_descriptor_limit_are_neither_owned_nor_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once no chain fits in the descriptors left, the rest are refused as they come,
    before their locks are taken and their layers opened (each of 7,000 chains past a
    limit was owned, opened, closed and given up again: a third of the mount's time)."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        create_overlay(
            str(tmp_path / f"{name}.qcow2"), size=1 << 20, backing=None, backing_format=None
        )
    # room for one chain of one layer (1 + events log + owner, state and journal files)
    # and a few descriptors more, too few for another
    room = 1 + descriptors.EVENT_LOG + descriptors.OWNER_FILES + 3
    monkeypatch.setattr(
        descriptors.Budget, "now", classmethod(lambda cls: cls(limit=room, in_use=0, reserve=0))
    )
    src, rec = recovery.recover(str(tmp_path), readonly=False)
    disks = mount.open_disks(src, mount.MountOptions(), journals=rec.journals)
    try:
        assert [d.name for d in disks] == ["vm1"]
        assert [r.name for r in src.refused] == ["vm2", "vm3"]
        assert all("EMFILE" in r.reason for r in src.refused)
        for name in ("vm2", "vm3"):  # never locked: no owner file was made
            assert not os.path.exists(chain_file(str(tmp_path), name, OWNER_SUFFIX))
    finally:
        close_all(disks, rec, src)


def test_a_read_only_mount_counts_only_the_layers_of_a_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only mount owns nothing and keeps its chains' events in memory: a chain
    takes one descriptor a layer, and the budget counts that, not the six of a
    read-write mount's one-layer chain (10,000 one-layer chains fit a limit of 20,000
    there, 3,300 of them did)."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        create_overlay(
            str(tmp_path / f"{name}.qcow2"), size=1 << 20, backing=None, backing_format=None
        )
    monkeypatch.setattr(
        descriptors.Budget, "now", classmethod(lambda cls: cls(limit=3, in_use=0, reserve=0))
    )
    src, rec = recovery.recover(str(tmp_path), readonly=True)
    before = descriptors.open_count()
    disks = mount.open_disks(src, mount.MountOptions(readonly=True), journals=rec.journals)
    try:
        assert [d.name for d in disks] == names and src.refused == []
        assert descriptors.open_count() - before == len(names)  # the budget is right
    finally:
        close_all(disks, rec, src)


def test_a_mount_reads_each_state_record_once_before_it_owns_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery reads the state records, and the load that finds the chains takes its
    state from there: each record is read once until the chain is owned (then once
    more, after its lock is taken: another host may have written it meanwhile), not
    twice (1.2 s of a mount of 10,000 chains)."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        create_overlay(
            str(tmp_path / f"{name}.qcow2"), size=1 << 20, backing=None, backing_format=None
        )

    def mount_once() -> sources.Source:
        src, rec = recovery.recover(str(tmp_path), readonly=False)
        disks = mount.open_disks(src, mount.MountOptions(), journals=rec.journals)
        src.save()
        close_all(disks, rec, src)
        return src

    first = mount_once()
    paths = sorted(first.chain_state_path(name) for name in names)
    assert all(os.path.exists(p) for p in paths)
    reads: list[str] = []
    real = sources.Source._load_record

    def counted(self: sources.Source, path: str) -> None:
        reads.append(path)
        real(self, path)

    monkeypatch.setattr(sources.Source, "_load_record", counted)
    for readonly in (False, True):
        reads.clear()
        src, rec = recovery.recover(str(tmp_path), readonly=readonly)
        rec.close()
        assert sorted(reads) == paths
        assert src.generations == first.generations and src.on_disk == first.on_disk
        assert sorted(src.recorded) == names and [c.name for c in src.chains] == names
        for name in list(src.owned):
            src.disown(name)
    reads.clear()
    again = mount_once()
    assert sorted(reads) == sorted(paths * 2)  # (the second: each after its lock)
    assert again.generations == first.generations  # nothing written again


def test_an_unclean_stop_is_told_to_the_next_owner_until_its_leaks_are_checked(
    tmp_path: Path,
) -> None:
    d = str(tmp_path)
    first = ownership.Ownership.acquire(d, "E")
    assert not first.unclean  # (no owner before it)
    first.release()
    clean = ownership.Ownership.acquire(d, "E")
    assert not clean.unclean  # released: nothing to check
    os.close(clean.owner_fd)  # kill -9: the lock goes, the owner file says nothing more
    clean.owner_fd = -1
    clean.release()
    unclean = ownership.Ownership.acquire(d, "E")
    assert unclean.unclean
    unclean.release()  # given up before its leaks were checked (a refused chain)
    again = ownership.Ownership.acquire(d, "E")
    assert again.unclean
    again.unclean = False  # checked (``leaks``)
    again.release()
    last = ownership.Ownership.acquire(d, "E")
    assert not last.unclean
    last.release()


def test_a_take_overs_copy_of_the_state_merges_into_the_source(tmp_path: Path) -> None:
    """A take-over recovers its chain on a copy of the source's state, in a worker
    thread (``Source.staged``), while the event loop goes on changing the source for
    the other chains; ``merge`` then brings in what the recovery did -- the chain's
    record, the retired layers, a layer made active that a scan had named a chain of
    its own and another chain had retired -- and keeps what changed meanwhile."""
    d = str(tmp_path)
    vm1, vm2, dest, old = (f"{d}/{n}.qcow2" for n in ("vm1", "vm2", "dest", "old"))
    src = sources.Source(path=d, directory=d)
    src.recorded = {"vm1": vm1, "vm2": vm2, "dest": dest}  # (the scan named dest itself)
    src.retired_by = {"vm1": {old}, "vm2": {dest}}
    src.retired = {old, dest}
    owned = Ownership.acquire(d, "vm1")
    try:
        staged = src.staged("vm1", owned)
        recorded, retired = dict(src.recorded), set(src.retired)
        # vm1's journal: a copy's pivot to dest, vm1.qcow2 leaving the chain
        jn.redo([jn.retire([vm1]), jn.record_active("vm1", dest)], staged, "vm1")
        assert src.recorded["vm1"] == vm1 and src.retired == {old, dest}  # (not yet)
        src.retired_by["vm2"].add(f"{d}/vm2-b.qcow2")  # meanwhile, vm2's own job
        src.retired.add(f"{d}/vm2-b.qcow2")
        src.recorded["vm3"] = f"{d}/vm3.qcow2"  # and another chain's take-over
        src.merge(staged, "vm1", recorded, retired)
        assert src.recorded == {"vm1": dest, "vm2": vm2, "vm3": f"{d}/vm3.qcow2"}
        assert src.retired_by == {"vm1": {old, vm1}, "vm2": {f"{d}/vm2-b.qcow2"}}
        assert src.retired == {old, vm1, f"{d}/vm2-b.qcow2"}
        assert src.generations["vm1"] == staged.generations["vm1"] == 1
        assert src.on_disk["vm1"] == staged.on_disk["vm1"]
        again = sources.load_state(d)  # the record saved is the one merged
        assert again.recorded["vm1"] == dest and again.retired_by["vm1"] == {old, vm1}
    finally:
        owned.release()
