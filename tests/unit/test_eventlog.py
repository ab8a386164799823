"""The events log (``chainfs/eventlog.py``): history across mounts, bounded, rotated,
crash-safe, and the job-id counter that never gives an id twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfs import eventlog
from chainfs.control import format_line, parse_line
from chainfs.eventlog import EVENTS_DIR, LEGACY_EVENTS_DIR, EventLog


def line(n: int, event: str = "JOB_STARTED", **fields: object) -> str:
    return format_line([("time", f"t{n}"), ("event", event), ("chain", "vm1"), *fields.items()])


def shown(log: EventLog) -> list[dict[str, str]]:
    return [parse_line(x) for x in bytes(log).decode().splitlines()]


def test_history_survives_a_reopen(tmp_path: Path) -> None:
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    for n in range(5):
        log.append(line(n, job=f"stream-{n + 1}"))
    log.close()
    again = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert [e["time"] for e in shown(again)] == [f"t{n}" for n in range(5)]
    again.append(line(5))
    assert len(shown(again)) == 6
    # shown as one file that only grows: what was read stays where it was
    assert again.read(0, len(again)) == bytes(again)
    assert (tmp_path / EVENTS_DIR / "vm1.events").exists()


def test_chains_keep_their_own_history(tmp_path: Path) -> None:
    a = EventLog.open(str(tmp_path), "vm1", writable=True)
    b = EventLog.open(str(tmp_path), "vm2", writable=True)
    a.append(line(1))
    assert len(shown(EventLog.open(str(tmp_path), "vm2", writable=True))) == 0
    assert len(shown(EventLog.open(str(tmp_path), "vm1", writable=True))) == 1
    a.close()
    b.close()


def test_the_history_is_bounded_and_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eventlog, "LIMIT", 10)
    monkeypatch.setattr(eventlog, "SEGMENT", 5)
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    for n in range(23):
        log.append(line(n))
        d = tmp_path / EVENTS_DIR
        lines = sum(len(p.read_bytes().splitlines()) for p in d.glob("vm1.events*"))
        assert lines <= 10
    assert len(shown(log)) == 23  # the file shown only grows while mounted
    log.close()
    again = EventLog.open(str(tmp_path), "vm1", writable=True)
    kept = [e["time"] for e in shown(again)]
    assert kept == [f"t{n}" for n in range(23 - len(kept), 23)] and 5 <= len(kept) <= 10
    assert sorted(p.name for p in (tmp_path / EVENTS_DIR).iterdir()) == [
        "vm1.events",
        "vm1.events.1",
    ]


@pytest.mark.expect_log(r"WARNING chainfs\.eventlog: chain=vm1 events: dropped 1 torn")
@pytest.mark.parametrize("cut", [1, 10, 30])
def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path: Path, cut: int) -> None:
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    log.append(line(1))
    log.append(line(2, "JOB_COMPLETED", job="stream-1"))
    log.close()
    path = tmp_path / EVENTS_DIR / "vm1.events"
    whole = path.read_bytes()
    torn = (line(3) + "\n").encode()[:cut]
    path.write_bytes(whole + torn)  # a crash in the middle of the third append
    again = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert [e["time"] for e in shown(again)] == ["t1", "t2"]
    again.append(line(4))
    again.close()
    # the torn piece is gone from the file: the new line did not glue onto it
    assert path.read_bytes() == whole + (line(4) + "\n").encode()


@pytest.mark.expect_log(r"WARNING chainfs\.eventlog: chain=vm1 events: dropped 2 torn")
def test_garbage_lines_are_dropped(tmp_path: Path) -> None:
    d = tmp_path / EVENTS_DIR
    d.mkdir()
    good = (line(1) + "\n").encode()
    (d / "vm1.events").write_bytes(good + b"\x00\x00\x00\x00\n" + b"\xff\xfe not utf-8\n" + good)
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert len(shown(log)) == 2


def test_ids_never_repeat_across_reopens(tmp_path: Path) -> None:
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert [log.next_id("stream"), log.next_id("commit")] == ["stream-1", "commit-2"]
    log.close()  # no event was appended: the counter alone remembers
    again = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert again.next_id("copy") == "copy-3"
    other = EventLog.open(str(tmp_path), "vm2", writable=True)
    assert other.next_id("stream") == "stream-1"  # per chain


def test_the_counter_never_goes_below_an_id_the_history_names(tmp_path: Path) -> None:
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    log.next_id("stream")
    log.append(line(1, job="commit-41"))
    log.close()
    (tmp_path / EVENTS_DIR / "vm1.ids").write_bytes(b"\x00" * 21)  # torn to nothing
    again = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert again.next_id("stream") == "stream-42"


def test_a_read_only_log_writes_nothing(tmp_path: Path) -> None:
    log = EventLog.open(str(tmp_path), "vm1", writable=False)
    log.append(line(1))
    assert log.next_id("stream") == "stream-1"
    assert len(shown(log)) == 1
    assert not (tmp_path / EVENTS_DIR).exists()


def test_a_long_chain_name_gets_a_usable_file_name(tmp_path: Path) -> None:
    name = "x" * 255
    log = EventLog.open(str(tmp_path), name, writable=True)
    log.append(line(1))
    log.next_id("stream")
    log.close()
    assert all(len(p.name) < 255 for p in (tmp_path / EVENTS_DIR).iterdir())
    assert len(shown(EventLog.open(str(tmp_path), name, writable=True))) == 1


def test_the_history_of_earlier_versions_moves_to_the_chains_own_files(tmp_path: Path) -> None:
    """Earlier versions kept every chain's history in ``.chainfs.events/``: a read-only
    open reads it there and moves nothing; the owner's open moves each file beside the
    chain's owner, state and journal (``.chainfs/``), history and job ids intact; the
    old directory goes once the last chain moved out."""
    old = tmp_path / LEGACY_EVENTS_DIR
    old.mkdir()
    (old / "vm1.log.1").write_text(line(1) + "\n")
    (old / "vm1.log").write_text(line(2, job="stream-7") + "\n")
    (old / "vm1.ids").write_bytes(b"%020d\n" % 9)
    (old / "vm2.log").write_text(line(3) + "\n")
    reader = EventLog.open(str(tmp_path), "vm1", writable=False)
    assert [e["time"] for e in shown(reader)] == ["t1", "t2"]
    assert reader.next_id("stream") == "stream-10"
    assert sorted(p.name for p in old.iterdir()) == ["vm1.ids", "vm1.log", "vm1.log.1", "vm2.log"]
    log = EventLog.open(str(tmp_path), "vm1", writable=True)
    assert [e["time"] for e in shown(log)] == ["t1", "t2"]
    assert log.next_id("commit") == "commit-10"
    log.append(line(4))
    log.close()
    new = tmp_path / EVENTS_DIR
    assert sorted(p.name for p in new.iterdir()) == ["vm1.events", "vm1.events.1", "vm1.ids"]
    assert (new / "vm1.events").read_text() == line(2, job="stream-7") + "\n" + line(4) + "\n"
    assert sorted(p.name for p in old.iterdir()) == ["vm2.log"]  # its owner moves it
    # a crash between two renames: each file is read from where it is
    (new / "vm1.events").rename(old / "vm1.log")
    again = EventLog.open(str(tmp_path), "vm1", writable=False)
    assert [e["time"] for e in shown(again)] == ["t1", "t2", "t4"]
    EventLog.open(str(tmp_path), "vm1", writable=True).close()
    EventLog.open(str(tmp_path), "vm2", writable=True).close()
    assert not old.exists()
    assert [e["time"] for e in shown(EventLog.open(str(tmp_path), "vm2", writable=False))] == ["t3"]
