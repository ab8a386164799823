"""The job journal's record format: checksums, torn tails, garbage, compaction, redo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainfs import source as sources
from chainfs.formats import open_layer
from chainfs.formats.qcow2 import create_overlay
from chainfs.jobs import journal as jn
from chainfs.jobs.journal import Journal, decode, encode

STREAM = {"node": "/images/E.qcow2", "base": "/images/A.qcow2", "speed": 0}

# loading a journal with a damaged or torn record says so, once per load
torn = pytest.mark.expect_log(r"WARNING chainfs\.jobs\.journal: .* damaged or torn records$")


def jpath(tmp_path: Path) -> Path:
    """The journal of chain vm1 in the source directory ``tmp_path``."""
    path = Path(jn.journal_path(str(tmp_path), "vm1"))
    path.parent.mkdir(exist_ok=True)
    return path


def journal_bytes(tmp_path: Path) -> bytes:
    return jpath(tmp_path).read_bytes()


def test_a_record_is_a_checksummed_line() -> None:
    line = encode({"r": "end", "key": "k1", "how": "done"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line[16:17] == b" "
    records, bad = decode(line)
    assert records == [{"r": "end", "key": "k1", "how": "done"}] and bad == 0


def test_newlines_in_values_stay_inside_the_record() -> None:
    record = {"r": "intent", "key": "k", "id": "x", "type": "t", "chain": "a\nb", "params": {}}
    records, bad = decode(encode(record))
    assert records == [record] and bad == 0


def test_a_job_is_pending_until_it_ends(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    p = j.begin("stream", "stream-1", "vm1", STREAM)
    j.progress(p.key, 1 << 20)
    j.progress(p.key, 2 << 20)
    j.close()
    again = Journal.load(str(tmp_path), "vm1")
    [pending] = again.pending()
    assert (pending.id, pending.type, pending.chain) == ("stream-1", "stream", "vm1")
    assert pending.params == STREAM and pending.offset == 2 << 20 and pending.phase is None
    actions = [jn.retire(["/images/B.qcow2"]), jn.set_backing("/images/E.qcow2", "A.qcow2", "raw")]
    j.phase(p.key, "prepare", actions)
    j.close()
    [pending] = Journal.load(str(tmp_path), "vm1").pending()
    assert pending.phase == "prepare" and pending.actions == actions
    j.end(p.key, "done")
    assert Journal.load(str(tmp_path), "vm1").pending() == []


def test_compaction_empties_the_file_in_place_when_no_job_is_left(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    b = j.begin("snapshot", "snapshot", "vm1", {"target": "/x", "below": "/y"})
    inode = jpath(tmp_path).stat().st_ino
    j.end(a.key, "done")
    assert jpath(tmp_path).stat().st_size > 0
    j.end(b.key, "failed")
    # the same file (never renamed or removed: other hosts may hold it open), empty
    assert jpath(tmp_path).stat().st_ino == inode and jpath(tmp_path).stat().st_size == 0
    assert sorted(os.listdir(jpath(tmp_path).parent)) == [
        "vm1.journal",
        "vm1.owner",
        "vm1.state",
    ]


def test_compaction_keeps_what_running_jobs_need(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    for i in range(jn.COMPACT_AFTER + 10):
        j.progress(a.key, i * 65536)
    j.close()
    # compacted on the way: far fewer lines than records written
    assert journal_bytes(tmp_path).count(b"\n") < jn.COMPACT_AFTER
    [pending] = Journal.load(str(tmp_path), "vm1").pending()
    assert pending.offset == (jn.COMPACT_AFTER + 9) * 65536
    j.compact()
    assert journal_bytes(tmp_path).count(b"\n") == 1


@torn
def test_every_torn_tail_is_ignored_and_then_cut_off(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    p = j.begin("stream", "stream-1", "vm1", STREAM)
    j.progress(p.key, 4096)
    j.close()
    whole = journal_bytes(tmp_path)
    last = encode({"r": "progress", "key": p.key, "offset": 8192})
    for cut in range(1, len(last)):
        jpath(tmp_path).write_bytes(whole + last[:cut])
        again = Journal.load(str(tmp_path), "vm1")
        assert again.ignored == 1
        [pending] = again.pending()
        assert pending.offset == 4096
        # the next record lands after the valid ones, not glued to the torn one
        again.progress(p.key, 12288)
        again.close()
        [pending] = Journal.load(str(tmp_path), "vm1").pending()
        assert pending.offset == 12288
        assert Journal.load(str(tmp_path), "vm1").ignored == 0


@torn
def test_a_checksum_mismatch_drops_that_record_only(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    p = j.begin("stream", "stream-1", "vm1", STREAM)
    j.progress(p.key, 4096)
    j.progress(p.key, 8192)
    j.close()
    lines = journal_bytes(tmp_path).split(b"\n")
    # a flipped digit in the last progress record's offset: the checksum catches it
    lines[2] = lines[2].replace(b"8192", b"8193")
    jpath(tmp_path).write_bytes(b"\n".join(lines))
    again = Journal.load(str(tmp_path), "vm1")
    assert again.ignored == 1
    assert again.pending()[0].offset == 4096


@torn
@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 100 + b"\n",
        b"not a record at all\n",
        b"%016x {}\n" % 0,
        encode({"r": "intent", "key": "k"})[:-3] + b"xx\n",
        b"ffffffffffffffff [1, 2, 3]\n",
        os.urandom(300) + b"\n",
    ],
)
def test_garbage_is_ignored(tmp_path: Path, garbage: bytes) -> None:
    j = Journal(str(tmp_path), "vm1")
    p = j.begin("stream", "stream-1", "vm1", STREAM)
    j.close()
    with open(jpath(tmp_path), "ab") as f:
        f.write(garbage)
        f.write(encode({"r": "progress", "key": p.key, "offset": 65536}))
    again = Journal.load(str(tmp_path), "vm1")
    assert again.ignored >= 1
    [pending] = again.pending()
    assert pending.offset == 65536


@torn
def test_well_formed_records_of_the_wrong_shape_are_ignored(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"r": "intent", "key": "a", "id": 3, "type": "stream", "chain": "c", "params": {}},
        {"r": "intent", "key": "b", "id": "x", "type": "stream", "chain": "c", "params": []},
        {"r": "bogus", "key": "c"},
        {"r": "progress", "key": "nobody", "offset": 5},
    ]
    jpath(tmp_path).write_bytes(b"".join(encode(r) for r in records))
    assert Journal.load(str(tmp_path), "vm1").pending() == []


def test_a_resumed_job_takes_the_place_of_the_interrupted_one(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    old = j.begin("stream", "stream-3", "vm1", STREAM)
    j.progress(old.key, 3 << 20)
    j.close()
    j = Journal.load(str(tmp_path), "vm1")
    [pending] = j.pending()
    other = j.begin("stream", "stream-1", "vm2", STREAM)  # not a resumption
    new = j.begin("stream", "stream-3", "vm1", STREAM, resumes=pending)
    assert other.offset == 0 and other.previous is None
    assert new.offset == 3 << 20 and new.previous == "stream-3"
    assert {p.key for p in Journal.load(str(tmp_path), "vm1").pending()} == {other.key, new.key}


def test_a_resumption_whose_old_end_was_lost_still_replaces_it(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    old = j.begin("stream", "stream-3", "vm1", STREAM)
    j.close()
    j = Journal.load(str(tmp_path), "vm1")
    new = j.begin("stream", "stream-3", "vm1", STREAM, resumes=j.pending()[0])
    j.close()
    # drop the old job's end record, as if the crash came just before it was written
    lines = journal_bytes(tmp_path).splitlines(keepends=True)
    kept = [x for x in lines if b'"r":"end"' not in x]
    assert len(kept) == len(lines) - 1
    jpath(tmp_path).write_bytes(b"".join(kept))
    assert [p.key for p in Journal.load(str(tmp_path), "vm1").pending()] == [new.key]
    assert old.key != new.key


def paused_after_load(tmp_path: Path) -> list[tuple[str, bool]]:
    return [(p.id, p.paused) for p in Journal.load(str(tmp_path), "vm1").pending()]


def test_a_pause_and_a_resume_are_records_that_a_load_replays(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    b = j.begin("commit", "commit-2", "vm2", STREAM)
    j.pause(a.key, True)
    lines = journal_bytes(tmp_path).splitlines(keepends=True)
    assert decode(lines[-1]) == ([{"r": "pause", "key": a.key}], 0)  # synced as it returns
    assert paused_after_load(tmp_path) == [("stream-1", True), ("commit-2", False)]
    j.pause(a.key, False)
    assert decode(journal_bytes(tmp_path).splitlines(keepends=True)[-1])[0] == [
        {"r": "resume", "key": a.key}
    ]
    assert paused_after_load(tmp_path) == [("stream-1", False), ("commit-2", False)]
    j.pause(b.key, True)
    j.progress(b.key, 1 << 20)  # later records of the job keep the pause
    assert paused_after_load(tmp_path) == [("stream-1", False), ("commit-2", True)]
    # a compaction keeps it (in the job's intent), and forgets the records
    j.compact()
    assert journal_bytes(tmp_path).count(b"\n") == 1
    assert paused_after_load(tmp_path) == [("stream-1", False), ("commit-2", True)]
    # the job resumed from its record (a remount, adopt, activate) is paused, durably,
    # from its intent on: its old record's end may follow or be lost
    j.close()
    j = Journal.load(str(tmp_path), "vm1")
    old = next(p for p in j.pending() if p.id == "commit-2")
    new = j.begin("commit", "commit-2", "vm2", STREAM, resumes=old)
    assert new.paused and new.offset == 1 << 20
    j.close()
    assert paused_after_load(tmp_path) == [("stream-1", False), ("commit-2", True)]
    intent = next(r for r in decode(journal_bytes(tmp_path))[0] if r.get("key") == new.key)
    assert intent["r"] == "intent" and intent["paused"] is True, intent
    j.end(new.key, "cancelled")  # a paused job cancelled is gone, pause and all
    assert paused_after_load(tmp_path) == [("stream-1", False)]


def test_a_pause_of_a_job_the_journal_does_not_hold_is_ignored(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    j.end(a.key, "done")
    b = j.begin("stream", "stream-2", "vm1", STREAM)
    j.close()
    forged = [{"r": "pause", "key": "nobody"}, {"r": "pause", "key": a.key}]
    with open(jpath(tmp_path), "ab") as f:
        f.write(b"".join(encode(r) for r in forged))
    assert paused_after_load(tmp_path) == [("stream-2", False)]
    assert [p.key for p in Journal.load(str(tmp_path), "vm1").pending()] == [b.key]


def test_an_old_handover_record_naming_paused_jobs_still_pauses_them(tmp_path: Path) -> None:
    """Journals of earlier versions carry a pause only in a hand-over record."""
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    j.begin("commit", "commit-2", "vm1", STREAM)
    j.progress(a.key, 65536)
    j.close()
    old = {"r": "handover", "key": "-", "host": "h", "mount": "m", "ids": ["stream-1"]}
    with open(jpath(tmp_path), "ab") as f:
        f.write(encode({**old, "paused": ["stream-1"]}))
    assert paused_after_load(tmp_path) == [("stream-1", True), ("commit-2", False)]
    j = Journal.load(str(tmp_path), "vm1")
    j.compact()  # the mark moves into the intent
    j.close()
    assert b'"r":"handover"' not in journal_bytes(tmp_path)
    assert paused_after_load(tmp_path) == [("stream-1", True), ("commit-2", False)]


def test_a_handover_record_no_longer_names_the_paused_jobs(tmp_path: Path) -> None:
    """The pause travels in its own record: a hand-over record is for diagnostics."""
    j = Journal(str(tmp_path), "vm1")
    a = j.begin("stream", "stream-1", "vm1", STREAM)
    j.pause(a.key, True)
    j.handover("h", "m", ["stream-1"])
    j.close()
    [record] = [r for r in decode(journal_bytes(tmp_path))[0] if r["r"] == "handover"]
    assert "paused" not in record
    assert paused_after_load(tmp_path) == [("stream-1", True)]


def test_a_read_only_journal_refuses_to_write(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), "vm1", writable=False)
    with pytest.raises(Exception, match="read-only"):
        j.begin("stream", "stream-1", "vm1", STREAM)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.integers(0, 3)),
        st.tuples(st.just("progress"), st.integers(0, 3), st.integers(0, 1 << 40)),
        st.tuples(st.just("phase"), st.integers(0, 3)),
        st.tuples(st.just("end"), st.integers(0, 3)),
        st.tuples(st.just("pause"), st.integers(0, 3), st.booleans()),
    ),
    max_size=30,
)


@torn
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops, cut=st.integers(0, 1 << 16), noise=st.binary(max_size=40))
def test_a_cut_anywhere_loses_only_the_torn_record(
    tmp_path: Path, ops: list[tuple[Any, ...]], cut: int, noise: bytes
) -> None:
    """Model: the state after the records wholly before the cut."""
    path = jpath(tmp_path)
    if path.exists():
        path.unlink()
    j = Journal(str(tmp_path), "vm1")
    keys: dict[int, str] = {}
    sizes: list[int] = []  # file size after each record
    states: list[dict[str, tuple[int, str | None, bool]]] = []
    model: dict[str, tuple[int, str | None, bool]] = {}
    for op in ops:
        slot = op[1]
        key = keys.get(slot)
        if op[0] == "begin":
            if key is not None:
                continue
            p = j.begin("stream", f"stream-{slot}", "vm1", {"slot": slot})
            keys[slot] = key = p.key
            model[key] = (0, None, False)
        elif key is None:
            continue
        elif op[0] == "progress":
            j.progress(key, op[2])
            model[key] = (op[2], *model[key][1:])
        elif op[0] == "phase":
            j.phase(key, "prepare", [jn.retire([f"/x/{slot}"])])
            model[key] = (model[key][0], "prepare", model[key][2])
        elif op[0] == "pause":  # (a crash on either side of it: paused, or as before)
            j.pause(key, op[2])
            model[key] = (*model[key][:2], op[2])
        else:
            j.end(key, "done")
            del keys[slot], model[key]
            if not model:  # compacted away: start the record of sizes afresh
                sizes, states = [], []
                continue
        if not path.exists():
            continue
        sizes.append(path.stat().st_size)
        states.append(dict(model))
    j.close()
    if not sizes:
        return
    data = path.read_bytes()
    assert len(data) == sizes[-1]
    at = min(cut, len(data))
    path.write_bytes(data[:at] + noise.replace(b"\n", b""))
    pending = Journal.load(str(tmp_path), "vm1").pending()
    loaded = {p.key: (p.offset, p.phase, p.paused) for p in pending}
    whole = [s for s in sizes if s <= at]
    assert loaded == (states[len(whole) - 1] if whole else {})


# -- redo ----------------------------------------------------------------------------------


def make_chain(d: Path) -> tuple[str, str, str]:
    a, b, c = (str(d / n) for n in ("A.qcow2", "B.qcow2", "C.qcow2"))
    create_overlay(a, size=1 << 20, backing=None, backing_format=None)
    create_overlay(b, size=1 << 20, backing="A.qcow2", backing_format="qcow2")
    create_overlay(c, size=1 << 20, backing="B.qcow2", backing_format="qcow2")
    return a, b, c


def backing_of(path: str) -> tuple[str | None, str | None]:
    layer = open_layer(path, "qcow2", writable=False)
    try:
        return layer.backing_string, layer.backing_format
    finally:
        layer.close()


def redo(directory: Path, actions: list[jn.Action]) -> None:
    """Redo ``actions`` of chain vm1 on a freshly loaded source, then let go of its locks."""
    src = sources.load(str(directory))
    try:
        jn.redo(actions, src, "vm1")
    finally:
        for name in list(src.owned):
            src.disown(name)


def test_redo_applies_a_phase_and_applying_it_again_changes_nothing(tmp_path: Path) -> None:
    _, b, c = make_chain(tmp_path)
    actions = [
        jn.retire([b]),
        jn.set_backing(c, "A.qcow2", "qcow2"),
        jn.record_active("vm1", c),
    ]
    for _ in range(2):
        redo(tmp_path, actions)
        assert backing_of(c) == ("A.qcow2", "qcow2")
        src = sources.load(str(tmp_path))
        assert src.retired == {b} and src.recorded["vm1"] == c
    stat = os.stat(c)
    redo(tmp_path, actions)
    assert os.stat(c).st_mtime_ns == stat.st_mtime_ns  # nothing rewritten the third time


def test_redo_can_remove_a_backing_file(tmp_path: Path) -> None:
    _, _, c = make_chain(tmp_path)
    redo(tmp_path, [jn.set_backing(c, None, None)])
    assert backing_of(c) == (None, None)


def test_redo_refuses_an_unknown_action(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown action"):
        redo(tmp_path, [{"do": "format-disk"}])
