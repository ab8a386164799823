"""The command line against a real mount: ``status`` and the job subcommands with ``--wait``.

``--wait`` is run as a user would run it in a script, its stderr a pipe (not a terminal),
so it prints ``key=value`` progress lines; the streams are held back with ``speed`` so
that there is progress to see and time to cancel or interrupt.  The terminal form (a bar
redrawn in place) is tested in ``tests/unit/test_cli.py``.

    [A] <- [B] <- [C] <- [D] <- [E]      the seed chain, named E
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from interop import images as im

from chainfs import features
from chainfs.control import parse_line

from .conftest import (
    CHAINFS,
    DEADLINE,
    Mount,
    Mounter,
    Seeds,
    assert_clean,
    expect_refusals,
    run,
    wait_for,
)

MiB = im.MiB


@pytest.fixture
def mount(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> Mount:
    src = tmp_path / "src"
    seeds(src)
    # a second file that is no usable chain: an unknown incompatible feature bit
    bad = im.create(str(src / "bad.qcow2"), MiB)
    im.set_incompatible_features(bad, 1 << 40)
    return mounter(src)


def chainfs(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    return run(*CHAINFS, *args, ok=ok)


def start(*args: str | Path) -> subprocess.Popen[str]:
    argv = [*CHAINFS, *(str(a) for a in args)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the command did not end:\n{out}{err}") from None
    return proc.returncode, out, err


def running_job(m: Mount) -> str | None:
    jobs = m.lines("E", "jobs")
    return jobs[0]["id"] if jobs else None


def test_status_draws_chains_layers_and_refusals(mount: Mount, seeds: Seeds) -> None:
    out = chainfs("status", mount.mountpoint).stdout
    lines = out.splitlines()
    assert lines[0] == f"{mount.mountpoint}: {mount.source} (pid {mount.pid}, read-write)"
    assert "E  32 MiB  [A] <- [B] <- [C] <- [D] <- [E]" in lines
    for name, role in [("E", "active"), ("D", "backing"), ("A", "base")]:
        (row,) = [x for x in lines if x.strip().startswith(f"{name}.qcow2 ")]
        assert row.split()[1] == role and "allocated" in row
    assert "    no job running" in lines
    assert lines[lines.index("refused:") + 1].startswith(f"    bad ({mount.source / 'bad.qcow2'}):")
    assert "unknown incompatible feature bits" in out


def test_status_json(mount: Mount) -> None:
    info = json.loads(chainfs("status", "--json", mount.mountpoint).stdout)
    assert info["daemon"] == {
        "pid": mount.pid,
        "source": str(mount.source),
        "mountpoint": str(mount.mountpoint),
        "readonly": False,
        "pyfuse3": features.pyfuse3_version(),
        "holes": features.holes(),
    }
    served, refused = info["chains"]
    assert served["chain"] == "E" and served["status"] == "served" and served["jobs"] == []
    assert [x["name"] for x in served["layers"]] == [f"{c}.qcow2" for c in "EDCBA"]
    base = served["layers"][-1]
    assert base["role"] == "base" and base["virtual-size"] == 32 * MiB
    assert isinstance(base["allocated"], int) and base["allocated"] > 0
    assert refused["chain"] == "bad" and refused["status"] == "refused"
    assert "unknown incompatible feature bits" in refused["reason"]


def test_stream_wait_prints_progress_lines_and_exits_0(mount: Mount) -> None:
    proc = chainfs("stream", mount.mountpoint, "E", "base=A.qcow2", "speed=2M", "--wait")
    lines = proc.stderr.splitlines()
    assert lines[-1] == "job stream-1 completed", proc.stderr
    progress = [parse_line(x) for x in lines[:-1]]
    assert progress, "no progress line before the end"
    assert {p["job"] for p in progress} == {"stream-1"}
    assert all(p["len"] == str(32 * MiB) for p in progress)
    done = [int(p["done"]) for p in progress]
    assert done == sorted(done)
    # the rate is that of the bytes copied, which speed= limits (the offset passes over
    # what needs no copy): never above the limit, and the time left no more than what
    # is left to pass over at that rate
    copied = [int(p["copied"]) for p in progress]
    assert copied == sorted(copied) and all(c <= d for c, d in zip(copied, done, strict=True))
    rated = [p for p in progress if "rate" in p]
    assert all(0 <= int(p["rate"]) <= 2 * MiB * 1.1 for p in rated), rated
    for p in rated:
        if "eta" in p and int(p["rate"]):
            assert int(p["eta"]) <= (int(p["len"]) - int(p["done"])) / int(p["rate"]) + 1, p
    assert mount.layers("E") == ["E.qcow2", "A.qcow2"]
    assert proc.stdout == ""


def test_stream_without_arguments_streams_everything(mount: Mount, seeds: Seeds) -> None:
    proc = chainfs("stream", mount.mountpoint, "E", "--wait")
    assert proc.stderr.splitlines()[-1] == "job stream-1 completed", proc.stderr
    assert mount.layers("E") == ["E.qcow2"]


def test_status_shows_a_running_job(mount: Mount) -> None:
    chainfs("stream", mount.mountpoint, "E", "base=A.qcow2", "speed=1M")
    wait_for(lambda: running_job(mount), "the stream to show in jobs")
    out = chainfs("status", mount.mountpoint).stdout
    (row,) = [x for x in out.splitlines() if x.strip().startswith("job stream-1:")]
    assert "stream running" in row and "speed limit 1 MiB/s" in row
    info = json.loads(chainfs("status", "--json", mount.mountpoint).stdout)
    (job,) = info["chains"][0]["jobs"]
    assert job["id"] == "stream-1" and job["len"] == 32 * MiB and job["speed"] == MiB
    assert isinstance(job["copied"], int) and 0 <= job["copied"] <= job["offset"] + MiB
    chainfs("cancel", mount.mountpoint, "E", "stream-1", "--wait")


def test_cancel_ends_a_wait_with_status_1(mount: Mount) -> None:
    before = mount.layers("E")
    waiter = start("stream", mount.mountpoint, "E", "base=A.qcow2", "speed=64K", "--wait")
    wait_for(lambda: running_job(mount), "the stream to start")
    cancel = chainfs("cancel", mount.mountpoint, "E", "stream-1", "--wait")
    assert cancel.stderr == "job stream-1 cancelled\n"
    rc, _, err = finish(waiter)
    assert rc == 1 and err.splitlines()[-1] == "chainfs: job stream-1 was cancelled", err
    assert mount.layers("E") == before


# Ctrl-C at a terminal: SIGINT at its default disposition in the command, whatever this
# run inherited (a shell's ``&`` without job control ignores SIGINT in what it starts, and
# an ignored signal stays ignored across exec)
AT_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_ctrl_c_stops_following_and_the_job_keeps_running(mount: Mount) -> None:
    argv = [sys.executable, "-c", AT_A_TERMINAL, *CHAINFS, "stream", str(mount.mountpoint)]
    argv += ["E", "base=A.qcow2", "speed=64K", "--wait"]
    waiter = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiter.stderr is not None
    first = waiter.stderr.readline()  # a progress line: it is following now
    assert parse_line(first)["job"] == "stream-1", first
    waiter.send_signal(signal.SIGINT)
    rc, _, err = finish(waiter)
    assert rc == 130
    assert err.splitlines()[-1].startswith(
        "chainfs: stopped following; job stream-1 keeps running"
    ), err
    assert running_job(mount) == "stream-1"
    chainfs("cancel", mount.mountpoint, "E", "stream-1", "--wait")


@expect_refusals
def test_refused_command_says_why(mount: Mount) -> None:
    proc = chainfs("stream", mount.mountpoint, "E", "base=Z.qcow2", "--wait", ok=(1,))
    assert proc.stderr == "chainfs: stream refused: 'Z.qcow2' is not a layer of chain 'E'\n"
    proc = chainfs("cancel", mount.mountpoint, "E", "stream-9", ok=(1,))
    assert proc.stderr == "chainfs: cancel refused: no job 'stream-9' on chain 'E'\n"
    proc = chainfs("stream", mount.mountpoint, "nope", ok=(1,))
    assert proc.stderr == f"chainfs: no chain 'nope' under {str(mount.mountpoint)!r}\n"


def test_snapshot_then_umount(mount: Mount) -> None:
    chainfs("snapshot", mount.mountpoint, "E", "S.qcow2", "--wait")
    assert mount.layers("E")[:2] == ["S.qcow2", "E.qcow2"]
    chainfs("umount", mount.mountpoint)
    assert not os.path.ismount(mount.mountpoint)
    mount.wait_exit(0)
    assert_clean([mount.source / f"{c}.qcow2" for c in "ABCDES"])
    proc = chainfs("status", mount.mountpoint, ok=(1,))
    assert proc.stderr == f"chainfs: {str(mount.mountpoint)!r} is not a chainfs mount\n"
