"""A forged journal or state file never makes recovery change a file it should not.

The journal (``.chainfs/CHAIN.journal``) and the state file sit in the image directory:
whoever can write the images can write them too, and their records name paths.  Each
test here forges what a job of each kind leaves for recovery -- a phase's redo list
(``set-backing``, ``retire``, ``record-active``), a snapshot to settle, a copy to
resume, a backup to roll back (which removes its DEST), the temporary files of an
interrupted creation -- naming a file outside the directories the mount was given
(absolute, ``..``, through a symlinked directory, a symlinked file), or a file inside
that is no business of the job (a layer it would remove, another chain's image), or
another chain.  Then a read-write mount:

- changes nothing outside: every file of the directory ``outside`` keeps its content
  and mtime, and no file appears there;
- comes up, and serves the chain read-only with the reason in ``.status`` (``warning``)
  and a ``JOB_REFUSED`` event; the log says which record and why;
- keeps the record in the journal (a mount with the directory allowed may finish it).

Symlinks planted among chainfs's own files, a legacy journal and a state record naming
a chain that is a path, are refused the same way, and nothing outside changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop import images as im

from chainfs import source as sources
from chainfs.jobs import journal as jn
from chainfs.jobs.journal import Journal, journal_path

from .conftest import CHAINFS, Mount, Mounter, Seeds, read_direct, run, wait_for

MiB = im.MiB
SIZE = 4 * MiB
NAME = "E"

refused = pytest.mark.expect_log(
    r"WARNING chainfs\.jobs\.recovery: chain=E job=\S+ type=\w+ journal record refused: ",
    r"WARNING chainfs\.jobs\.recovery: chain=E served read-only: the journal's record of job ",
)


@dataclass
class Tree:
    root: Path
    content: bytes  # what E.img shows
    layers: list[Path]  # A .. E

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def outside(self) -> Path:
        return self.root / "outside"


@pytest.fixture
def tree(tmp_path: Path, seeds: Seeds) -> Tree:
    """The seed chain in ``src``; decoys in ``outside``: a qcow2 image, a text file, the
    temporary file of an image creation; ``src/sub`` a symlink to ``outside`` and
    ``src/d/link.qcow2`` one to the image there; another chain ``X`` in ``src``."""
    seed = seeds(tmp_path / "src", size=SIZE)
    t = Tree(tmp_path, seed.content, seed.layers)
    t.outside.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", t.outside / "decoy.qcow2", str(SIZE))
    (t.outside / "decoy.txt").write_bytes(b"root:x:0:0:not for chainfs\n")
    (t.outside / ".chainfs-new-0123abcd-new.qcow2").write_bytes(b"an unfinished image?\n")
    (t.src / "sub").symlink_to(t.outside)
    (t.src / "d").mkdir()  # (below: no chain of its own)
    (t.src / "d" / "link.qcow2").symlink_to(t.outside / "decoy.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", t.src / "X.qcow2", str(SIZE))
    return t


def fingerprint(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry of ``directory``: mtime, size and a digest of its content."""
    out = {}
    for e in os.scandir(directory):
        st = e.stat(follow_symlinks=False)
        data = Path(e.path).read_bytes() if e.is_file(follow_symlinks=False) else b""
        out[e.name] = (st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())
    return out


def forge(src: Path, *records: dict[str, object]) -> None:
    """Append records to chain E's journal, each a valid line (checksummed)."""
    path = Path(journal_path(str(src), NAME))
    path.parent.mkdir(exist_ok=True)
    with open(path, "ab") as f:
        for record in records:
            f.write(jn.encode(record))


def intent(
    kind: str, params: dict[str, object], *, offset: int = 0, chain: str = NAME
) -> jn.Record:
    return {
        "r": "intent",
        "key": "k1",
        "id": f"{kind}-9",
        "type": kind,
        "chain": chain,
        "params": params,
        "offset": offset,
    }


def phase(name: str, actions: list[jn.Action]) -> jn.Record:
    return {"r": "phase", "key": "k1", "phase": name, "actions": actions}


def status_of(m: Mount, chain: str) -> dict[str, str]:
    [line] = [x for x in m.status() if x.get("chain") == chain]
    return line


# each forged job: its records (built from the tree), and words of the refusal
Forgery = Callable[[Tree], list[jn.Record]]


def stream_repoints_outside(t: Tree) -> list[jn.Record]:
    a, e = t.layers[0], t.layers[-1]
    decoy = str(t.outside / "decoy.qcow2")
    return [
        intent("stream", {"node": str(e), "base": str(a), "speed": 0}),
        phase("prepare", [jn.retire([]), jn.set_backing(decoy, "E.qcow2", "qcow2")]),
    ]


def commit_repoints_through_dotdot(t: Tree) -> list[jn.Record]:
    _, b, _, d, _ = t.layers
    # relative, as the journal stores paths: '..' leads out of the source directory
    return [
        intent("commit", {"top": str(d), "base": str(b), "speed": 0}),
        phase("prepare", [jn.set_backing("../outside/decoy.qcow2", "B.qcow2", "qcow2")]),
    ]


def commit_repoints_through_a_symlinked_dir(t: Tree) -> list[jn.Record]:
    _, b, _, d, _ = t.layers
    return [
        intent("commit", {"top": str(d), "base": str(b), "speed": 0}),
        phase("prepare", [jn.set_backing("sub/decoy.qcow2", "B.qcow2", "qcow2")]),
    ]


def commit_repoints_a_symlinked_file(t: Tree) -> list[jn.Record]:
    _, b, _, d, _ = t.layers
    return [
        intent("commit", {"top": str(d), "base": str(b), "speed": 0}),
        phase("prepare", [jn.set_backing("d/link.qcow2", "../B.qcow2", "qcow2")]),
    ]


def stream_repoints_another_chain(t: Tree) -> list[jn.Record]:
    a, e = t.layers[0], t.layers[-1]
    return [
        intent("stream", {"node": str(e), "base": str(a), "speed": 0}),
        phase("prepare", [jn.set_backing("X.qcow2", "A.qcow2", "qcow2")]),
    ]


def stream_points_at_a_file_outside(t: Tree) -> list[jn.Record]:
    a, e = t.layers[0], t.layers[-1]
    return [
        intent("stream", {"node": str(e), "base": str(a), "speed": 0}),
        phase("prepare", [jn.set_backing(str(e), "sub/decoy.qcow2", "qcow2")]),
    ]


def commit_pivots_to_a_file_outside(t: Tree) -> list[jn.Record]:
    _, b, c, d, e = t.layers
    decoy = str(t.outside / "decoy.qcow2")
    return [
        intent("commit", {"top": str(e), "base": str(b), "speed": 0, "wait": None}),
        phase("pivot", [jn.retire([str(e), str(d), str(c)]), jn.record_active(NAME, decoy)]),
    ]


def commit_pivots_another_chain(t: Tree) -> list[jn.Record]:
    _, b, c, d, e = t.layers
    return [
        intent("commit", {"top": str(e), "base": str(b), "speed": 0, "wait": None}),
        phase("pivot", [jn.retire([str(e), str(d), str(c)]), jn.record_active("X", str(b))]),
    ]


def copy_pivots_to_a_dest_outside(t: Tree) -> list[jn.Record]:
    dest = str(t.outside / "decoy.qcow2")
    return [
        intent("copy", {"dest": dest, "sync": "full", "speed": 0, "wait": None}),
        phase("pivot", [jn.retire([str(x) for x in t.layers]), jn.record_active(NAME, dest)]),
    ]


def copy_resumes_into_a_new_file_outside(t: Tree) -> list[jn.Record]:
    dest = str(t.outside / "new.qcow2")
    return [intent("copy", {"dest": dest, "sync": "full", "speed": 0, "wait": None})]


def copy_resumes_through_a_symlinked_dir(t: Tree) -> list[jn.Record]:
    return [intent("copy", {"dest": "sub/new.qcow2", "sync": "full", "speed": 0})]


def copy_resumes_into_another_chain(t: Tree) -> list[jn.Record]:
    return [intent("copy", {"dest": "X.qcow2", "sync": "full", "speed": 0})]


def backup_removes_a_file_outside(t: Tree) -> list[jn.Record]:
    # offset 1: "chainfs made DEST", so rolling the backup back removes it
    dest = str(t.outside / "decoy.txt")
    return [intent("backup", {"dest": dest, "sync": "full", "format": "qcow2"}, offset=1)]


def backup_removes_a_layer(t: Tree) -> list[jn.Record]:
    dest = "D.qcow2"
    return [intent("backup", {"dest": dest, "sync": "full", "format": "qcow2"}, offset=1)]


def snapshot_settles_outside(t: Tree) -> list[jn.Record]:
    # the temporary file of its creation would be removed from outside first
    target = "../outside/new.qcow2"
    return [intent("snapshot", {"target": target, "below": str(t.layers[-1])})]


def job_of_another_chain(t: Tree) -> list[jn.Record]:
    dest = str(t.outside / "new.qcow2")
    return [intent("copy", {"dest": dest, "sync": "full"}, chain="../../outside/pwn")]


FORGERIES: dict[str, tuple[Forgery, str]] = {
    "stream-prepare-abs": (stream_repoints_outside, "outside the directories this mount"),
    "commit-prepare-dotdot": (commit_repoints_through_dotdot, "outside the directories"),
    "commit-prepare-dirlink": (commit_repoints_through_a_symlinked_dir, "resolves to"),
    "commit-prepare-filelink": (commit_repoints_a_symlinked_file, "resolves to"),
    "stream-prepare-other-chain": (stream_repoints_another_chain, "not a layer of chain 'E'"),
    "stream-prepare-backing-outside": (stream_points_at_a_file_outside, "resolves to"),
    "commit-pivot-abs": (commit_pivots_to_a_file_outside, "outside the directories"),
    "commit-pivot-other-chain": (commit_pivots_another_chain, "in chain 'X', not 'E'"),
    "copy-pivot-abs": (copy_pivots_to_a_dest_outside, "outside the directories"),
    "copy-resume-abs": (copy_resumes_into_a_new_file_outside, "outside the directories"),
    "copy-resume-dirlink": (copy_resumes_through_a_symlinked_dir, "resolves to"),
    "copy-resume-other-chain": (copy_resumes_into_another_chain, "the active layer of 'X'"),
    "backup-rollback-abs": (backup_removes_a_file_outside, "outside the directories"),
    "backup-rollback-layer": (backup_removes_a_layer, "a layer of chain 'E'"),
    "snapshot-dotdot": (snapshot_settles_outside, "outside the directories"),
    "foreign-chain": (job_of_another_chain, "names chain '../../outside/pwn', not 'E'"),
}


def record_chains(t: Tree, mounter: Mounter) -> None:
    """A clean mount and unmount first, as a chain's jobs always follow one: the state
    file records each chain's active layer."""
    m = mounter(t.src)
    m.unmount()


@refused
@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_record_changes_nothing_outside(
    tree: Tree, mounter: Mounter, forgery: str
) -> None:
    build, words = FORGERIES[forgery]
    record_chains(tree, mounter)
    records = build(tree)
    forge(tree.src, *records)
    before, layers = fingerprint(tree.outside), fingerprint(tree.src)
    m = mounter(tree.src)
    job = str(records[0]["id"])
    events = wait_for(
        lambda: [e for e in m.events(NAME) if e["event"] == "JOB_REFUSED"], "the refusal"
    )
    assert events[0]["job"] == job and words in events[0]["reason"], events
    warning = status_of(m, NAME).get("warning", "")
    assert warning.startswith("served read-only: the journal's record of job"), warning
    assert words in warning and "the record is kept" in warning, warning
    assert read_direct(m.img(NAME)) == tree.content
    assert m.layers(NAME) == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    assert "warning" not in status_of(m, "X")  # the other chain is served as ever
    m.unmount()
    assert fingerprint(tree.outside) == before
    after = fingerprint(tree.src)
    assert {k: after[k] for k in ("A.qcow2", "D.qcow2")} == {
        k: layers[k] for k in ("A.qcow2", "D.qcow2")
    }
    assert not (tree.src / "new.qcow2").exists()
    # kept for a mount that may finish it (with the directory allowed) or its removal
    [pending] = Journal.load(str(tree.src), NAME, writable=False).pending()
    assert pending.id == job


@pytest.mark.expect_log(
    r"WARNING chainfs\.jobs\.recovery: chain=E journal cannot be recovered: cannot lock "
    r"'.*/E\.journal' of chain 'E': a symlink, which chainfs never follows",
    r"WARNING chainfs\.mount: chain=E refused: cannot lock '.*/E\.journal' of chain 'E': "
    "a symlink",
)
def test_a_symlink_planted_as_a_journal_is_never_written_through(
    tree: Tree, mounter: Mounter
) -> None:
    """A journal that is a symlink to a file elsewhere: followed, the compaction at
    mount would have cut that file to nothing."""
    own = tree.src / ".chainfs"
    own.mkdir()
    (own / "E.journal").symlink_to(tree.outside / "decoy.txt")
    before = fingerprint(tree.outside)
    m = mounter(tree.src)
    assert sorted(os.listdir(m.mountpoint)) == ["X.img", "control", "layers"]
    assert "a symlink, which chainfs never follows" in status_of(m, NAME)["reason"]
    m.unmount()
    assert fingerprint(tree.outside) == before


@pytest.mark.expect_log(
    r"WARNING chainfs\.mount: chain=E refused: cannot lock '.*/\.chainfs' of chain 'E': "
    "a symlink",
    r"WARNING chainfs\.mount: chain=X refused: cannot lock '.*/\.chainfs' of chain 'X': "
    "a symlink",
)
def test_a_symlink_planted_as_the_metadata_directory_is_never_followed(
    tree: Tree, mounter: Mounter
) -> None:
    (tree.src / ".chainfs").symlink_to(tree.outside)
    before = fingerprint(tree.outside)
    m = mounter(tree.src)
    assert sorted(os.listdir(m.mountpoint)) == ["control", "layers"]
    m.unmount()
    assert fingerprint(tree.outside) == before


@pytest.mark.expect_log(
    r"WARNING chainfs\.jobs\.journal: journal=.*\.chainfs\.journal job=copy-9 names no "
    r"chain \('\.\./\.\./outside/pwn'\); ignored$"
)
def test_a_legacy_journal_naming_a_path_for_a_chain_is_ignored(
    tree: Tree, mounter: Mounter
) -> None:
    """The journal of earlier versions names each job's chain; its jobs move into
    ``.chainfs/CHAIN.journal``: a name that is a path must not take files with it."""
    record = intent("copy", {"dest": str(tree.src / "F.qcow2"), "sync": "full"})
    record["chain"] = "../../outside/pwn"
    (tree.src / ".chainfs.journal").write_bytes(jn.encode(record))
    before = fingerprint(tree.outside)
    m = mounter(tree.src)
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "X.img", "control", "layers"]
    m.unmount()
    assert fingerprint(tree.outside) == before


@pytest.mark.expect_log(
    r"WARNING chainfs\.source: state=.*/\.chainfs/E\.state names chain '\.\./\.\./outside/pwn', "
    "not the file's own; ignored$"
)
def test_a_state_record_naming_a_path_for_a_chain_is_ignored(tree: Tree, mounter: Mounter) -> None:
    own = tree.src / ".chainfs"
    own.mkdir()
    record: dict[str, object] = {
        "version": 2,
        "chain": "../../outside/pwn",
        "active": "E.qcow2",
        "retired": [],
    }
    (own / "E.state").write_bytes(sources.encode_slot(1, record))
    before = fingerprint(tree.outside)
    m = mounter(tree.src)
    assert sorted(os.listdir(m.mountpoint)) == ["E.img", "X.img", "control", "layers"]
    m.unmount()
    assert fingerprint(tree.outside) == before


@refused
def test_a_genuine_record_refused_finishes_once_its_directory_is_allowed(
    tree: Tree, mounter: Mounter
) -> None:
    """A copy into an ``allow_dir``, interrupted, then a mount without that option: the
    record is refused (the chain read-only, nothing made there); a mount with it
    resumes the copy, which completes."""
    other = tree.root / "copies"
    other.mkdir()
    record_chains(tree, mounter)
    dest = other / "F.qcow2"
    forge(tree.src, intent("copy", {"dest": str(dest), "sync": "full", "speed": 0}))
    m = mounter(tree.src)
    wait_for(lambda: [e for e in m.events(NAME) if e["event"] == "JOB_REFUSED"], "the refusal")
    assert "served read-only" in status_of(m, NAME)["warning"]
    m.unmount()
    assert not os.listdir(other)
    again = mounter(tree.src, f"allow_dir={other}")
    end = again.wait_job(NAME, "copy-9")
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert "warning" not in status_of(again, NAME)
    assert again.layers(NAME) == ["F.qcow2"]
    assert read_direct(again.img(NAME)) == tree.content


@refused
def test_a_forged_record_met_at_activate_changes_nothing_outside(
    tree: Tree, mounter: Mounter
) -> None:
    """A chain handed over (``inactivate`` here, ``activate`` on another mount) with a
    record forged into its journal meanwhile: the mount taking it refuses the record as
    a mount does at start, and serves the chain read-only."""
    a, b = mounter(tree.src), mounter(tree.src)
    a.command(NAME, "inactivate", NAME)
    forge(tree.src, *backup_removes_a_file_outside(tree))
    before = fingerprint(tree.outside)
    b.command(NAME, "activate", NAME)
    events = wait_for(
        lambda: [e for e in b.events(NAME) if e["event"] == "JOB_REFUSED"], "the refusal"
    )
    assert "outside the directories" in events[0]["reason"], events
    assert status_of(b, NAME)["warning"].startswith("served read-only: the journal's record")
    assert read_direct(b.img(NAME)) == tree.content
    a.unmount()
    b.unmount()
    assert fingerprint(tree.outside) == before


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
@pytest.mark.parametrize("name", ["E.journal", "E.owner", "E.events", "E.ids"])
@pytest.mark.expect_log(r"WARNING chainfs\.\S+: .*not a regular file")
def test_a_fifo_planted_among_chainfs_files_never_hangs_the_mount(
    tree: Tree, mounter: Mounter, name: str, ro: bool
) -> None:
    """A FIFO under one of chainfs's own names: opened as a file, it would block the
    mount forever (a FIFO blocks an open until a writer comes).  It is refused as not a
    regular file: chain E is refused (read-write: its owner file cannot be locked, its
    journal read) or served without what the FIFO stood for (its events; read-only: the
    owner file tells nobody's lock); the other chain is served."""
    own = tree.src / ".chainfs"
    own.mkdir()
    os.mkfifo(own / name)
    m = mounter(tree.src, *(["ro"] if ro else []))
    assert "X.img" in os.listdir(m.mountpoint)
    line = status_of(m, NAME)
    if line["status"] == "refused":
        assert "not a regular file" in line["reason"]
    else:
        assert Path(m.mountpoint, "E.img").read_bytes() == tree.content
    m.unmount()


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_a_fifo_planted_as_a_state_file_is_refused_not_waited_on(tree: Tree, ro: bool) -> None:
    """A FIFO as a chain's state file: the mount refuses, as for a malformed one, with
    the reason, instead of blocking forever."""
    own = tree.src / ".chainfs"
    own.mkdir()
    os.mkfifo(own / "E.state")
    mp = tree.root / "mnt"
    mp.mkdir()
    out = run(*CHAINFS, "mount", tree.src, mp, *(["-o", "ro"] if ro else []), ok=(1,))
    assert "E.state': not a regular file" in out.stderr, out.stderr
    assert not os.path.ismount(mp)


def test_a_forged_pause_of_a_job_that_does_not_exist_is_ignored(
    tree: Tree, mounter: Mounter
) -> None:
    """A ``pause`` record holds nothing but a job's key: one naming no job the journal
    holds (a forgery, or a job already over) pauses nothing and changes nothing; the
    interrupted stream beside it resumes running, not paused, and ends exact."""
    record_chains(tree, mounter)
    a, e = tree.layers[0], tree.layers[-1]
    over = {**intent("stream", {"node": str(e), "base": str(a), "speed": 0}), "key": "k0"}
    forge(
        tree.src,
        over,
        {"r": "end", "key": "k0", "how": "done"},
        intent("stream", {"node": str(e), "base": str(a), "speed": 0}),
        {"r": "pause", "key": "nobody"},
        {"r": "pause", "key": "k0"},  # (after its end)
        {"r": "pause", "key": "-"},
    )
    [pending] = Journal.load(str(tree.src), NAME, writable=False).pending()
    assert pending.key == "k1" and not pending.paused
    before = fingerprint(tree.outside)
    m = mounter(tree.src)
    end = m.wait_job(NAME, "stream-9")
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    [resumed] = [x for x in m.events(NAME) if x["event"] == "JOB_RESUMED"]
    assert resumed["job"] == "stream-9" and "paused" not in resumed, resumed
    assert "warning" not in status_of(m, NAME)
    assert m.layers(NAME) == ["E.qcow2", "A.qcow2"]
    assert read_direct(m.img(NAME)) == tree.content
    m.unmount()
    assert fingerprint(tree.outside) == before
    assert Journal.load(str(tree.src), NAME, writable=False).pending() == []
