"""Many hosts on one store, on one machine: two chainfs mounts of ONE source directory.

OFD locks conflict between open file descriptions even within one host, so two mounts
of a directory are two hosts to each other's owner locks, exactly as two NFSv4 clients
are (the lab of many hosts under qemu is ``tests/lab``):

- exclusion both ways: a chain is served read-write by one mount only, read-only and
  shown owned elsewhere (with the holder's host, mount and pid) by the other;
  ``inactivate`` / ``activate`` move one chain of the directory to the other mount;
- ``kill -9`` of the owner in the middle of a rate-limited commit, then ``adopt`` on
  the other mount (and ``mount --adopt``): the commit resumes there and ends exact;
- hand-over round trips under a writer: the content stays exact; a running stream,
  commit or copy travels with the chain (stopped at its checkpoint, resumed from its
  journal by the other mount), a paused one paused (and stays paused when its host
  dies and the other adopts it); a backup refuses the hand-over;
- fencing (``-o shared``: as on NFS; a local disk is never fenced): an EIO from the owner
  file (injected, ``faultinject.py``) fences the chain: OWNERSHIP_LOST, the guest gets
  EIO, and it is never taken again by itself; a heartbeat blocked (injected stall) or
  failing other than with EIO only suspends the chain until one is written again.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfs.jobs.journal import Journal
from chainfs.ownership import Ownership

from . import conftest
from .conftest import (
    CHAINFS,
    Mount,
    Mounter,
    Seeds,
    assert_clean,
    assert_content,
    read_direct,
    run,
    wait_for,
)

MiB = 1 << 20
SIZE = 16 * MiB
FAULTINJECT = Path(__file__).with_name("faultinject.py")

# a second mount's refusals of the chain it does not own, and adopt's wait
read_only_refused = pytest.mark.expect_log(
    r"WARNING chainfs\.fs: .*(served read-only: owned by|is owned by chainfs|active block job)"
)


def owner(m: Mount, chain: str) -> dict[str, str]:
    [line] = [c for c in m.status() if c.get("chain") == chain]
    return line


def write(m: Mount, chain: str, model: bytearray, rng: random.Random, n: int = 8) -> None:
    fd = os.open(m.img(chain), os.O_RDWR)
    try:
        for _ in range(n):
            off = rng.randrange(len(model) - 65536) // 512 * 512
            data = rng.randbytes(rng.randrange(1, 128) * 512)
            assert os.pwrite(fd, data, off) == len(data)
            model[off : off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)


def refused_write(m: Mount, chain: str, err: int) -> None:
    with pytest.raises(OSError) as exc:
        fd = os.open(m.img(chain), os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 512, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert exc.value.errno == err, exc.value


@read_only_refused
def test_two_mounts_split_the_chains_of_one_directory(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    x, y = seeds(images, size=SIZE), seeds(images, "y", size=SIZE)
    a = mounter(images)
    b = mounter(images)
    for chain in ("E", "yE"):
        assert owner(a, chain)["owner"] == "self"
        seen = owner(b, chain)
        assert seen["owner"] == "elsewhere" and f"pid {a.pid}," in seen["holder"], seen
        assert os.stat(b.img(chain)).st_mode & 0o777 == 0o400
        refused_write(b, chain, errno.EROFS)
    # chainfs status says it in words
    out = run(*CHAINFS, "status", b.mountpoint).stdout
    assert f"yE: served read-only, owned by chainfs on host {os.uname().nodename} (mount m-" in out
    # hand chain yE over to the second mount
    run(*CHAINFS, "inactivate", a.mountpoint, "yE")
    assert owner(a, "yE")["owner"] == "none"
    run(*CHAINFS, "activate", b.mountpoint, "yE")
    assert owner(b, "yE")["owner"] == "self"
    seen = owner(a, "yE")
    assert seen["owner"] == "elsewhere" and f"pid {b.pid}," in seen["holder"], seen
    # each writes its own chain, and neither the other's
    rng = random.Random(5)
    mx, my = bytearray(x.content), bytearray(y.content)
    write(a, "E", mx, rng)
    write(b, "yE", my, rng)
    refused_write(a, "yE", errno.EROFS)
    refused_write(b, "E", errno.EROFS)
    a.refuse("yE", "snapshot", "S.qcow2", errno.EROFS)
    b.refuse("E", "snapshot", "S.qcow2", errno.EROFS)
    # activate refuses a chain another mount owns, naming it
    with pytest.raises(OSError) as exc:
        b.command("E", "activate", "E")
    assert exc.value.errno == errno.EBUSY
    assert b.events("E")[-1]["reason"].startswith("chain 'E' is owned by chainfs on host ")
    # jobs run where the chain is owned
    b.run_job("yE", "stream", "base=yA.qcow2")
    assert read_direct(b.img("yE")) == my
    a.unmount()
    b.unmount()
    assert_clean(x.layers + [y.active, y.layers[0]])
    assert_content(x.active, mx, tmp_path / "cmp")
    assert_content(y.active, my, tmp_path / "cmp")


@read_only_refused
@pytest.mark.parametrize("how", ["adopt", "mount --adopt"])
def test_adopt_after_kill_resumes_the_commit(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, how: str
) -> None:
    """The owner dies (kill -9) in the middle of a rate-limited intermediate commit;
    the other mount adopts the chain and the commit ends there, exact."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a = mounter(images)
    model = bytearray(seed.content)
    write(a, "E", model, random.Random(9))
    job = a.start_job("E", "commit", "top=D.qcow2 base=B.qcow2 speed=256K")

    def checkpoint() -> int | None:
        pending = Journal.load(str(images), "E", writable=False).pending()
        return pending[0].offset if pending and pending[0].offset else None

    wait_for(checkpoint, "the commit to record a checkpoint")
    if how == "adopt":
        b = mounter(images)
        assert owner(b, "E")["owner"] == "elsewhere"
    a.kill()
    a.wait_exit(None)
    run("fusermount3", "-u", "-z", a.mountpoint)
    if how == "adopt":
        out = run(*CHAINFS, "adopt", b.mountpoint, "E", "timeout=30")
        assert "E: adopted, served read-write" in out.stderr, out
    else:
        b = mounter(images, "adopt=E")
    assert owner(b, "E")["owner"] == "self"

    def ended() -> dict[str, str] | None:
        done = [
            e
            for e in b.events("E")
            if e.get("job") == job and e["event"] in ("JOB_COMPLETED", "JOB_ROLLED_BACK")
        ]
        return done[-1] if done else None

    end = wait_for(ended, "the adopted commit to end")
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    resumed = [e for e in b.events("E") if e.get("job") == job and e["event"] == "JOB_RESUMED"]
    assert resumed and int(resumed[0]["offset"]) > 0, resumed  # from its checkpoint
    assert b.layers("E") == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert read_direct(b.img("E")) == model
    b.unmount()
    assert_clean([images / n for n in ("A.qcow2", "B.qcow2", "E.qcow2")])
    assert_content(seed.active, model, tmp_path / "cmp")


@read_only_refused
def test_hand_over_round_trips_under_a_writer(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """Ten inactivate/activate round trips between two mounts, each side writing while
    it owns the chain (close-to-open: every layer reopened): the content stays exact."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a, b = mounter(images), mounter(images)
    model = bytearray(seed.content)
    rng = random.Random(3)
    here, there = a, b
    for _ in range(10):
        write(here, "E", model, rng)
        assert read_direct(here.img("E")) == model
        here.command("E", "inactivate", "E")
        assert read_direct(here.img("E")) == model  # still served, read-only
        there.command("E", "activate", "E")
        assert read_direct(there.img("E")) == model
        here, there = there, here
    here.run_job("E", "stream", "base=A.qcow2")
    assert read_direct(here.img("E")) == model
    a.unmount()
    b.unmount()
    assert_clean([seed.active, seed.layers[0]])
    assert_content(seed.active, model, tmp_path / "cmp")


# each kind of job that travels: its command, and the chain once it is done
TRAVELLING = {
    "stream": ("base=A.qcow2 speed=64K", ["E.qcow2", "A.qcow2"]),
    "commit": ("top=D.qcow2 base=B.qcow2 speed=64K", ["E.qcow2", "B.qcow2", "A.qcow2"]),
    "active commit": ("base=B.qcow2 speed=64K", ["B.qcow2", "A.qcow2"]),
    "copy": ("F.qcow2 sync=full speed=64K", ["F.qcow2"]),
}


@read_only_refused
@pytest.mark.parametrize("kind", list(TRAVELLING))
def test_a_running_job_travels_with_the_chain_and_ends_where_it_is_held(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, kind: str
) -> None:
    """Six hand-overs while a rate-limited job runs, each side writing while it holds
    the chain: ``inactivate`` stops the job at its checkpoint (its journal says where),
    ``activate`` on the other mount resumes it from there under its id; it ends on
    whichever mount holds the chain, and the content is exact."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a, b = mounter(images), mounter(images)
    model = bytearray(seed.content)
    rng = random.Random(11)
    text, layers = TRAVELLING[kind]
    job = a.start_job("E", kind.split()[-1], text)
    here, there = a, b
    for _ in range(6):
        write(here, "E", model, rng)
        assert here.job_offset("E") is not None, "the job ended before the hand-over"
        here.command("E", "inactivate", "E")  # returns once the chain is released
        assert owner(here, "E")["owner"] == "none"
        # stopped here (it may show as the journal's, waiting for the next owner)...
        assert [j["status"] for j in here.lines("E", "jobs")] in ([], ["interrupted"])
        stopped = [e for e in here.events("E") if e["event"] == "JOB_CANCELLED"][-1]
        assert stopped["job"] == job and stopped["reason"].startswith("handed over"), stopped
        assert read_direct(here.img("E")) == model
        there.command("E", "activate", "E")

        # ...and resumed there, under its id (the events since it took the chain; its
        # history was read again then, with the other mount's lines)
        # (``activate`` returns once the chain is taken; the job resumes just after)
        def since_taken(there: Mount = there) -> list[dict[str, str]] | None:
            seen = there.events("E")
            taken = max(i for i, e in enumerate(seen) if e["event"] == "OWNERSHIP_TAKEN")
            return seen[taken:] if any(e["event"] == "JOB_RESUMED" for e in seen[taken:]) else None

        seen = wait_for(since_taken, "the job to resume on the other mount")
        resumed = [e for e in seen if e["event"] == "JOB_RESUMED"]
        assert [e["job"] for e in resumed] == [job], seen
        # from its checkpoint; a mirror (active commit, copy) from the start: the guest
        # writes it tracks are in memory
        start = int(stopped["offset"]) if kind in ("stream", "commit") else 0
        assert int(resumed[0]["offset"]) == start, (resumed, stopped)
        assert read_direct(there.img("E")) == model
        here, there = there, here
    here.command("E", "speed", f"{job} 0")
    end = here.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert not [e for e in there.events("E") if e["event"] == "JOB_COMPLETED"]
    assert here.layers("E") == layers
    write(here, "E", model, rng)
    assert read_direct(here.img("E")) == model
    a.unmount()
    b.unmount()
    active = images / layers[0]
    assert_clean([active])
    assert_content(active, model, tmp_path / "cmp")


@read_only_refused
def test_a_job_running_on_the_other_mount_is_listed_there_as_running_elsewhere(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """A mount serving a chain read-only lists the owner's job in ``jobs`` (and
    ``chainfs status``), as the chain's journal says: a job handed over to the other
    mount, and one started there; ``status=running-elsewhere`` with the owner, or
    ``interrupted`` while nobody holds the chain; gone once it ended."""
    images = tmp_path / "images"
    seeds(images, size=SIZE)
    a, b = mounter(images), mounter(images)

    def listed(m: Mount, status: str) -> dict[str, str] | None:
        jobs = m.lines("E", "jobs")
        return jobs[0] if jobs and jobs[0]["status"] == status else None

    job = a.start_job("E", "stream", "base=A.qcow2 speed=64K")
    seen = wait_for(lambda: listed(b, "running-elsewhere"), "B to list A's stream")
    assert seen["id"] == job and seen["type"] == "stream", seen
    assert f"pid {a.pid}," in seen["owner"], seen
    a.command("E", "inactivate", "E")  # the stream travels: nobody holds it now
    seen = wait_for(lambda: listed(a, "interrupted"), "A to list the handed-over stream")
    assert seen["id"] == job and seen["waits-for"] == "activate or adopt", seen
    b.command("E", "activate", "E")
    seen = wait_for(lambda: listed(a, "running-elsewhere"), "A to list the stream on B")
    assert seen["id"] == job and f"pid {b.pid}," in seen["owner"], seen
    assert int(seen["offset"]) > 0, seen  # its last checkpoint, from the journal
    out = run(*CHAINFS, "status", a.mountpoint).stdout
    assert f"job {job}: stream running on another host (owned by chainfs on host " in out, out
    b.command("E", "speed", f"{job} 0")
    end = b.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    wait_for(lambda: not a.lines("E", "jobs"), "A to drop the stream once it ended")
    assert "no job running" in run(*CHAINFS, "status", a.mountpoint).stdout
    a.unmount()
    b.unmount()


@read_only_refused
def test_a_backup_does_not_travel_and_a_paused_job_travels_paused(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """A backup's point in time lives in memory: ``inactivate`` is refused in libvirt's
    words, saying why, and the chain stays served here, the job going on.  A job a user
    paused travels paused: the other mount resumes it from its checkpoint and holds it
    there (no step copied) until ``resume``."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a, b = mounter(images), mounter(images)
    job = a.start_job("E", "backup", "F.qcow2 speed=64K")
    event = a.refuse("E", "inactivate", "E", errno.EBUSY)
    assert event["reason"].startswith(f"chain has active block job {job!r}: a backup "), event
    assert owner(a, "E")["owner"] == "self"
    a.command("E", "speed", f"{job} 0")
    a.wait_job("E", job)
    job = a.start_job("E", "stream", "base=A.qcow2 speed=64K")
    a.command("E", "pause", job)
    wait_for(lambda: a.lines("E", "jobs")[0]["status"] == "paused", f"{job} to pause")
    a.command("E", "inactivate", "E")
    stopped = [e for e in a.events("E") if e["event"] == "INACTIVATED"][-1]
    assert stopped["job"] == job and stopped["paused"] == "true", stopped
    b.command("E", "activate", "E")
    # (activate returns once the chain is taken; the job is resumed just after it:
    # ``created`` for a moment, then paused)
    wait_for(
        lambda: [x for x in b.lines("E", "jobs") if x.get("status") not in (None, "created")],
        f"{job} resumed on b",
    )
    [line] = b.lines("E", "jobs")
    assert line["id"] == job and line["status"] == "paused", line
    held = line["offset"]
    assert int(held) == int(stopped["offset"]), (line, stopped)
    time.sleep(1)  # (a stream at 64K/s would have copied a step by now)
    [line] = b.lines("E", "jobs")
    assert line["status"] == "paused" and line["offset"] == held and line["copied"] == "0", line
    b.command("E", "resume", job)
    b.command("E", "speed", f"{job} 0")
    end = b.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert b.layers("E") == ["E.qcow2", "A.qcow2"]
    assert read_direct(b.img("E")) == seed.content
    a.unmount()
    b.unmount()


@read_only_refused
def test_a_paused_job_stays_paused_when_its_host_dies(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """A job paused on A, then A killed (-9): B adopts the chain and resumes the job
    paused (its pause is journalled), copying nothing until ``resume``; it then ends
    on B, exact."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a = mounter(images)
    model = bytearray(seed.content)
    write(a, "E", model, random.Random(11))
    job = a.start_job("E", "commit", "top=D.qcow2 base=B.qcow2 speed=256K")
    a.command("E", "pause", job)
    b = mounter(images)
    a.kill()
    a.wait_exit(None)
    run("fusermount3", "-u", "-z", a.mountpoint)
    out = run(*CHAINFS, "adopt", b.mountpoint, "E", "timeout=30")
    assert "E: adopted, served read-write" in out.stderr, out
    resumed = [e for e in b.events("E") if e.get("job") == job and e["event"] == "JOB_RESUMED"]
    assert resumed and resumed[0].get("paused") == "true", resumed
    [line] = b.lines("E", "jobs")
    assert line["id"] == job and line["status"] == "paused", line
    time.sleep(1)  # (a commit at 256K/s would have copied a step by now)
    [again] = b.lines("E", "jobs")
    assert again == {**line, "copied": "0"}, (line, again)
    b.command("E", "resume", job)
    b.command("E", "speed", f"{job} 0")
    end = b.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert b.layers("E") == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert read_direct(b.img("E")) == model
    b.unmount()
    assert_clean([images / n for n in ("A.qcow2", "B.qcow2", "E.qcow2")])


@pytest.mark.expect_log(
    r"ERROR chainfs\.disk: lost ownership of E: ",
    r"(WARNING|ERROR) chainfs\.\S+: .*(Input/output error|ownership)",
)
@pytest.mark.parametrize("where", ["heartbeat", "guest write"])
def test_an_eio_from_a_locked_file_fences_the_chain(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The storage refuses the owner file (as NFS does once the lease took the lock
    away): the chain is fenced at once -- OWNERSHIP_LOST in events, the guest's writes
    and fsyncs fail with EIO, the job stops -- and stays fenced when the storage works
    again: chainfs never takes it back by itself."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    rules = tmp_path / "faults"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    a = mounter(images, "shared")  # a local disk is never fenced: act as on NFS
    job = a.start_job("E", "stream", "base=A.qcow2 speed=64K")
    fd = os.open(a.img("E"), os.O_RDWR)
    try:
        if where == "heartbeat":
            rules.write_text("heartbeat EIO\n")
        else:
            rules.write_text("write EIO\nheartbeat EIO\n")
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            assert exc.value.errno == errno.EIO

        def lost() -> dict[str, str] | None:
            found = [e for e in a.events("E") if e["event"] == "OWNERSHIP_LOST"]
            return found[0] if found else None

        event = wait_for(lost, "the chain to be fenced")
        assert event["chain"] == "E" and "owner file" in event["reason"], event
        rules.unlink()  # the storage works again: the chain stays fenced
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"y" * 4096, 8192)
            assert exc.value.errno == errno.EIO
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    seen = owner(a, "E")
    assert seen["owner"] == "lost" and seen["reason"] == event["reason"], seen
    a.refuse("E", "activate", "E", errno.EIO)
    wait_for(lambda: not a.control("E", "jobs").read_text(), f"{job} to stop")
    assert "lost ownership of E: " in a.log_text()
    run("fusermount3", "-u", a.mountpoint)
    assert a.wait_exit(None) == 0  # (its log has the ERROR of the loss)
    monkeypatch.undo()
    again = mounter(images)  # the next mount resumes the stopped job
    wait_for(lambda: again.control("E", "jobs").read_text(), f"{job} to be resumed")
    again.command("E", "speed", f"{job} 0")
    again.wait_job("E", job)
    assert again.layers("E") == ["E.qcow2", "A.qcow2"]
    again.unmount()
    assert_content(seed.active, seed.content, tmp_path / "cmp")


@pytest.mark.expect_log(
    r"WARNING chainfs\.disk: ownership of E suspended: ",
    r"WARNING chainfs\.\S+: .*(Input/output error|suspended)",
)
@pytest.mark.parametrize("fault", ["STALL", "ETIMEDOUT"], ids=["blocked", "failing"])
def test_a_heartbeat_blocked_or_failing_suspends_the_chain_until_it_is_written_again(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The owner file's heartbeat blocks for half the lease (as on a cut-off NFS client)
    or fails other than with EIO: whether the lock is still held cannot be told, so the
    chain is suspended -- OWNERSHIP_SUSPENDED, the guest's writes are not acknowledged
    (EIO), the job waits -- not fenced; once a heartbeat is written again (the storage
    kept the lock: nobody took the chain) it resumes and goes on with nothing lost."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    model = bytearray(seed.content)
    rng = random.Random(21)
    rules = tmp_path / "faults"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    a = mounter(images, "shared,lease=4")  # suspended after 2 s without a heartbeat
    job = a.start_job("E", "stream", "base=A.qcow2 speed=64K")
    write(a, "E", model, rng)

    def seen(name: str) -> Callable[[], dict[str, str] | None]:
        def find() -> dict[str, str] | None:
            found = [e for e in a.events("E") if e["event"] == name]
            return found[-1] if found else None

        return find

    rules.write_text(f"heartbeat {fault} .owner\n")
    event = wait_for(seen("OWNERSHIP_SUSPENDED"), "the chain to be suspended")
    assert "owner file" in event["reason"], event
    line = owner(a, "E")
    assert line["owner"] == "suspended" and line["reason"] == event["reason"], line
    time.sleep(1)  # a step on its way ends; then the job waits
    held = a.job_offset("E")
    time.sleep(1.5)
    assert a.job_offset("E") == held
    a.refuse("E", "inactivate", "E", errno.EIO)  # nor handed over
    if fault == "STALL":
        # a guest write waits for the heartbeat it brings about, as for the storage
        failed: list[BaseException] = []

        def guest() -> None:
            try:
                write(a, "E", model, rng, 1)
            except BaseException as e:
                failed.append(e)

        waiting = threading.Thread(target=guest)
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()  # not acknowledged while it cannot be told
        rules.unlink()  # the storage answers again, the lock still held
        waiting.join()
        assert not failed, failed
    else:
        refused_write(a, "E", errno.EIO)  # not acknowledged while it cannot be told
        rules.unlink()  # the storage answers again, the lock still held
    wait_for(seen("OWNERSHIP_RESUMED"), "the chain to resume")
    assert seen("OWNERSHIP_LOST")() is None
    assert owner(a, "E")["owner"] == "self"
    write(a, "E", model, rng)  # the guest goes on
    a.command("E", "speed", f"{job} 0")
    a.wait_job("E", job)
    assert read_direct(a.img("E")) == model
    a.unmount()
    assert_clean([seed.active])
    assert_content(seed.active, model, tmp_path / "cmp")


@read_only_refused
def test_a_take_over_held_up_holds_up_no_other_chain(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adopting mount's take of one chain blocks in the storage (its first
    heartbeat held, as a write to a slow or stalled NFS server is): the other chain it
    serves answers meanwhile -- its flat file's stat, its events, its status, another
    control write -- and the take ends once the storage answers."""
    images = tmp_path / "images"
    seeds(images, "x", size=SIZE)
    seeds(images, "y", size=SIZE)
    rules = tmp_path / "rules"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    a = mounter(images)
    b = mounter(images)
    assert owner(b, "xE")["owner"] == "elsewhere" and owner(b, "yE")["owner"] == "elsewhere"
    a.kill()
    a.wait_exit(None)
    run("fusermount3", "-u", "-z", a.mountpoint)
    rules.write_text("heartbeat STALL /xE.owner\n")
    b.command("xE", "adopt", "xE")
    wait_for(lambda: rules.with_name("rules.stalled").exists() or None, "the take to block")
    answered: list[object] = []

    def other_chain() -> None:
        answered.append(os.stat(b.img("yE")).st_size)
        answered.append(len(b.events("yE")))
        answered.append(owner(b, "yE")["owner"])
        b.command("yE", "adopt", "yE")
        answered.append("adopt written")

    looker = threading.Thread(target=other_chain, daemon=True)
    looker.start()
    looker.join(conftest.DEADLINE)
    stuck = looker.is_alive()
    rules.unlink()  # the storage answers again
    assert not stuck, f"the other chain did not answer while xE's take was held: {answered}"
    assert answered[0] == SIZE and answered[2] == "elsewhere", answered

    def adopted(chain: str) -> bool | None:
        return owner(b, chain)["owner"] == "self" or None

    for chain in ("xE", "yE"):
        wait_for(functools.partial(adopted, chain), f"{chain} adopted")
    b.unmount()


def _dead_owner_mid_commit(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, Mount, str, bytearray, bytes]:
    """Chains xE and zE; mount a owns xE and runs a rate-limited commit on it, mount b
    owns zE (a handed it over); then a dies (kill -9) in the middle of the commit.
    Returns the images, the rules file of b's injected faults, b, the commit's id,
    zE's content and xE's."""
    images = tmp_path / "images"
    x = seeds(images, "x", size=SIZE)
    z = seeds(images, "z", size=SIZE)
    rules = tmp_path / "rules"
    monkeypatch.setattr(conftest, "CHAINFS", (sys.executable, str(FAULTINJECT), str(rules)))
    a = mounter(images)
    a.command("zE", "inactivate", "zE")
    b = mounter(images)
    assert owner(b, "zE")["owner"] == "self" and owner(b, "xE")["owner"] == "elsewhere"
    job = a.start_job("xE", "commit", "top=xD.qcow2 base=xB.qcow2 speed=256K")

    def checkpoint() -> int | None:
        pending = Journal.load(str(images), "xE", writable=False).pending()
        return pending[0].offset if pending and pending[0].offset else None

    wait_for(checkpoint, "the commit to record a checkpoint")
    a.kill()
    a.wait_exit(None)
    run("fusermount3", "-u", "-z", a.mountpoint)
    return images, rules, b, job, bytearray(z.content), x.content


def _ends_adopted(b: Mount, job: str) -> None:
    """xE is served read-write by ``b`` and the commit it adopted ends there."""
    wait_for(lambda: owner(b, "xE")["owner"] == "self" or None, "xE adopted")

    def ended() -> dict[str, str] | None:
        done = [
            e
            for e in b.events("xE")
            if e.get("job") == job and e["event"] in ("JOB_COMPLETED", "JOB_ROLLED_BACK")
        ]
        return done[-1] if done else None

    end = wait_for(ended, "the adopted commit to end")
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert b.layers("xE") == ["xE.qcow2", "xB.qcow2", "xA.qcow2"]


@read_only_refused
@pytest.mark.parametrize(
    "step",
    [
        "journal-load /xE.journal",
        "state-load /xE.state",
        "recover /xE.journal",
        "state-save /xE.state",
    ],
    ids=["journal", "state-record", "recovery", "state-save"],
)
def test_an_adopt_held_up_in_its_journal_or_state_holds_up_no_other_chain(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A take-over blocks in the storage while it loads the chain's journal or state
    record, runs the journal (the commit its dead owner left) or saves the record (a
    stalled NFS server): the guest's reads and writes of another chain the mount serves
    read-write are answered meanwhile, and so are its events and the status; once the
    storage answers, the chain is adopted, its commit ends there, and both chains are
    exact (content and ``qemu-img check``)."""
    images, rules, b, job, zmodel, xmodel = _dead_owner_mid_commit(
        tmp_path, mounter, seeds, monkeypatch
    )
    event, suffix = step.split()
    rules.write_text(f"{event} STALL {suffix}\n")
    b.command("xE", "adopt", "xE")
    wait_for(lambda: rules.with_name("rules.stalled").exists() or None, "the take to block")
    rng = random.Random(20)
    answered: list[object] = []

    def other_chain() -> None:
        answered.append(read_direct(b.img("zE"), 0, MiB) == bytes(zmodel[:MiB]))
        write(b, "zE", zmodel, rng)  # (fsync'ed)
        answered.append(read_direct(b.img("zE")) == zmodel)
        answered.append(len(b.events("zE")))
        answered.append(owner(b, "zE")["owner"])

    looker = threading.Thread(target=other_chain, daemon=True)
    looker.start()
    looker.join(conftest.DEADLINE)
    stuck = looker.is_alive()
    blocked = owner(b, "xE")["owner"] if not stuck else None
    rules.unlink()  # the storage answers again
    assert not stuck, f"zE did not answer while xE's take was held in {event}: {answered}"
    assert answered[0] is True and answered[1] is True and answered[3] == "self", answered
    assert blocked != "self"  # (xE was still being taken over meanwhile)
    _ends_adopted(b, job)
    assert read_direct(b.img("xE")) == xmodel
    b.unmount()
    layers = [images / f"{p}{n}.qcow2" for p in "xz" for n in "ABCDE"]
    assert_clean([p for p in layers if p.exists()])
    assert_content(images / "xE.qcow2", xmodel, tmp_path / "cmp")
    assert_content(images / "zE.qcow2", zmodel, tmp_path / "cmp")


@pytest.mark.expect_log(
    r"WARNING chainfs\.fs: .*(served read-only: owned by|is owned by chainfs)",
    r"WARNING chainfs\.mount: chain=xE adopt failed: .*failed: Input/output error",
)
@pytest.mark.parametrize(
    "step", ["journal-load /xE.journal", "events-load /xE.events"], ids=["early", "late"]
)
def test_an_adopt_failing_midway_leaves_the_chain_as_it_was(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A take-over fails in one of its steps in worker threads (the storage refuses the
    chain's journal, or its history once every layer is open writable): ADOPT_FAILED,
    and the chain is served read-only as before (its content readable, writes EROFS),
    its locks and layers released -- nothing of the take-over is left held, and a
    second adopt, the storage answering, takes it and finishes the commit exact."""
    images, rules, b, job, _, xmodel = _dead_owner_mid_commit(tmp_path, mounter, seeds, monkeypatch)
    event, suffix = step.split()
    rules.write_text(f"{event} EIO {suffix}\n")
    b.command("xE", "adopt", "xE")

    def failed() -> dict[str, str] | None:
        found = [e for e in b.events("xE") if e["event"] == "ADOPT_FAILED"]
        return found[-1] if found else None

    reason = wait_for(failed, "the adopt to fail")["reason"]
    assert f"{event} of " in reason and "Input/output error" in reason, reason
    rules.unlink()
    assert owner(b, "xE")["owner"] != "self"
    refused_write(b, "xE", errno.EROFS)
    assert read_direct(b.img("xE")) == xmodel  # served read-only as before
    # its locks released: another process takes them (and gives them back)
    taken = Ownership.acquire(str(images), "xE")
    taken.release()
    for layer in ("xE", "xD", "xB"):  # nobody writes its layers: QEMU may open them
        run("qemu-io", "-c", "read 0 512", str(images / f"{layer}.qcow2"))
    b.command("xE", "adopt", "xE")
    _ends_adopted(b, job)
    assert read_direct(b.img("xE")) == xmodel
    b.unmount()
    assert_clean([images / f"x{n}.qcow2" for n in "ABE"])
    assert_content(images / "xE.qcow2", xmodel, tmp_path / "cmp")


@read_only_refused
def test_an_unmount_in_the_middle_of_an_adopt_undoes_it(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount is unmounted while an adopt is held up in the storage (its journal's
    run blocked): once the storage answers, the take-over is undone (or, if it ended
    first, the chain is given up as an unmount does), the daemon ends cleanly with
    nothing of the chain held, the commit stays in the journal, and the next mount
    resumes it and ends exact."""
    images, rules, b, job, zmodel, xmodel = _dead_owner_mid_commit(
        tmp_path, mounter, seeds, monkeypatch
    )
    rules.write_text("recover STALL /xE.journal\n")
    b.command("xE", "adopt", "xE")
    wait_for(lambda: rules.with_name("rules.stalled").exists() or None, "the take to block")
    run("fusermount3", "-u", b.mountpoint)
    rules.unlink()  # the storage answers again
    assert b.wait_exit() == 0
    taken = Ownership.acquire(str(images), "xE")  # nothing of it is held
    taken.release()
    monkeypatch.undo()
    again = mounter(images)
    wait_for(lambda: again.control("xE", "jobs").read_text() or None, f"{job} resumed")
    again.command("xE", "speed", f"{job} 0")
    again.wait_job("xE", job)
    assert again.layers("xE") == ["xE.qcow2", "xB.qcow2", "xA.qcow2"]
    assert read_direct(again.img("xE")) == xmodel
    assert read_direct(again.img("zE")) == zmodel
    again.unmount()
    assert_clean([images / f"{p}{n}.qcow2" for p, n in ("xA", "xB", "xE", "zA", "zE")])
    assert_content(images / "xE.qcow2", xmodel, tmp_path / "cmp")


def _views_read_the_layers(m: Mount, seed_layers: list[Path], tmp: Path) -> None:
    """Every layer view of chain E on ``m`` reads its layer's disk as ``qemu-img`` shows it."""
    tmp.mkdir(parents=True, exist_ok=True)
    for layer in seed_layers:
        out = tmp / f"{layer.name}.raw"
        run("qemu-img", "convert", "-U", "-O", "raw", layer, out)
        got = read_direct(m.mountpoint / "layers" / "E" / f"{layer.name}.img")
        assert got == out.read_bytes(), layer.name


@read_only_refused
def test_the_layer_views_follow_the_chain_through_hand_overs_and_an_adopt(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    """``layers/E/`` reads through the chain each mount serves: after ``inactivate``
    (reopened read-only), ``activate`` on the other mount (reopened writable) and an
    ``adopt`` after the owner was killed, every view still reads its layer (not the
    chain closed under it)."""
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a, b = mounter(images), mounter(images)
    model = bytearray(seed.content)
    rng = random.Random(11)
    write(a, "E", model, rng)
    _views_read_the_layers(a, seed.layers, tmp_path / "a0")
    a.command("E", "inactivate", "E")
    _views_read_the_layers(a, seed.layers, tmp_path / "a1")
    _views_read_the_layers(b, seed.layers, tmp_path / "b0")
    b.command("E", "activate", "E")
    write(b, "E", model, rng)
    _views_read_the_layers(b, seed.layers, tmp_path / "b1")
    assert read_direct(b.mountpoint / "layers" / "E" / "E.qcow2.img") == model
    b.kill()
    out = run(*CHAINFS, "adopt", a.mountpoint, "E", "timeout=30")
    assert "E: adopted, served read-write" in out.stderr, out
    _views_read_the_layers(a, seed.layers, tmp_path / "a2")
    assert read_direct(a.mountpoint / "layers" / "E" / "E.qcow2.img") == model
    a.unmount()
    assert_clean(seed.layers)
    assert_content(seed.active, model, tmp_path / "cmp")
