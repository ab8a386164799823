"""The command line without a mount: parsing, the progress display, following a job
through its control files, the status drawing, and the logging helpers.

A job is followed here through plain files laid out like a mount's ``control/CHAIN``
directory (``events`` appended to, ``jobs`` rewritten), which is all ``--wait`` reads.
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfs import __version__, cli, logs
from chainfs.control import format_line, parse_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def job(offset: int, length: int = 100 << 20, status: str = "running") -> dict[str, str]:
    return {
        "id": "stream-1",
        "type": "stream",
        "status": status,
        "offset": str(offset),
        "len": str(length),
        "speed": "0",
    }


def chainfs_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``chainfs ARGS`` as a user runs it (this checkout's code), no terminal."""
    return subprocess.run(
        [sys.executable, "-m", "chainfs", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


# -- parsing -----------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"chainfs {__version__} (pyfuse3 ")


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/srv/images", "/mnt", "-o", "rw,allow_other"], "mount"),
        (["mount", "/srv/images", "/mnt"], "mount"),
        (["info", "a.qcow2"], "info"),
        (["check", "a.qcow2"], "check"),
        (["status", "/mnt"], "status"),
        (["stream", "/mnt", "vm", "base=A.qcow2", "--wait"], "stream"),
    ],
)
def test_commands_parse(argv: list[str], command: str) -> None:
    ns = cli.build_parser().parse_args(cli._as_mount_helper(argv))
    assert ns.command == command


def test_mount_helper_form_keeps_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative SOURCE that exists, as mount(8) may pass it
    ns = cli.build_parser().parse_args(cli._as_mount_helper(["src", "mnt", "-o", "ro"]))
    assert (ns.source, ns.mountpoint, ns.options, ns.foreground) == ("src", "mnt", ["ro"], False)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["strem", "M", "vm1"], "invalid choice: 'strem' (did you mean 'stream'?)"),
        (["stat", "/mnt"], "invalid choice: 'stat' (did you mean 'status'?)"),
        (["umount", "/mnt", "x"], "unrecognized arguments: x"),  # a command stays one
        (["zzz", "/mnt"], "invalid choice: 'zzz' (choose from mount, umount, status, "),
    ],
)
def test_a_mistyped_command_is_no_mount(
    argv: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chainfs stat /mnt`` was taken for a mount of ./stat; argparse's words instead."""
    monkeypatch.chdir(tmp_path)
    proc = chainfs_cli(*argv)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(
        "usage: chainfs "
    ) and f"chainfs: error: {says}" in proc.stderr.replace("argument COMMAND: ", "")
    assert "neither a directory" not in proc.stderr


def test_the_mount_helper_form_still_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What mount.fuse3 runs, ``chainfs SOURCE MOUNTPOINT -o OPTS``: read as mount, with
    SOURCE absolute, or relative and existing (here it fails on the mountpoint, after
    parsing)."""
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in ("images", str(tmp_path / "images"), "./nowhere"):
        proc = chainfs_cli(source, "missing-mnt", "-o", "ro")
        assert proc.returncode == 1, proc.stderr
        assert (
            proc.stderr
            == f"chainfs: mountpoint {str(tmp_path / 'missing-mnt')!r} is not a directory\n"
        )


def test_not_a_mount_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"chainfs: {str(tmp_path)!r} is not a chainfs mount\n"


@pytest.mark.parametrize(
    "content",
    [b"QFI\xfb\x00\x00\x00\x03" + bytes(504), bytes(1 << 16)],
    ids=["qcow2", "raw"],
)
def test_mount_of_an_image_file_says_what_source_must_be(tmp_path: Path, content: bytes) -> None:
    """``chainfs mount vm1.qcow2 /mnt`` printed "'utf-8' codec can't decode byte 0xfb"."""
    images, mnt = tmp_path / "images", tmp_path / "mnt"
    images.mkdir()
    mnt.mkdir()
    image = images / "vm1.qcow2"
    image.write_bytes(content)
    proc = chainfs_cli("mount", image, mnt)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "codec" not in proc.stderr
    assert proc.stderr == (
        f"chainfs: source {str(image)!r} is a file that is not TOML (a disk image?): SOURCE "
        "must be a directory of images or a TOML file naming chains; to serve the chain of "
        f"this image, mount its directory: chainfs mount {images} MOUNTPOINT\n"
    )
    assert not os.path.ismount(mnt)


# -- progress ----------------------------------------------------------------------------------


def test_plain_progress_lines_are_key_value_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    p = cli.Progress(out, tty=False, clock=clock)
    p.update(job(0))
    for step in range(1, 4):
        clock.now += 1.0
        p.update(job(step * (10 << 20)))
    lines = [parse_line(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 4
    assert "rate" not in lines[0] and "eta" not in lines[0]  # no rate from one sample
    last = lines[-1]
    assert last["job"] == "stream-1" and last["status"] == "running"
    assert (last["done"], last["len"], last["percent"]) == (str(30 << 20), str(100 << 20), "30")
    assert last["rate"] == str(10 << 20)
    assert last["eta"] == "7"  # 70 MiB left at 10 MiB/s


def test_plain_progress_is_throttled_but_reports_state_changes() -> None:
    out, clock = io.StringIO(), Clock()
    p = cli.Progress(out, tty=False, clock=clock)
    p.update(job(0))
    clock.now += 0.2
    p.update(job(1 << 20))  # too soon: no line
    clock.now += 0.2
    p.update(job(2 << 20, status="ready"))  # a new state: a line at once
    statuses = [parse_line(x)["status"] for x in out.getvalue().splitlines()]
    assert statuses == ["running", "ready"]


def test_rate_is_measured_over_a_recent_window() -> None:
    out, clock = io.StringIO(), Clock()
    p = cli.Progress(out, tty=False, clock=clock)
    p.update(job(0))
    clock.now += 1
    p.update(job(50 << 20))  # a fast start...
    for i in range(2, 12):
        clock.now += 1
        p.update(job((50 << 20) + (i - 1) * (1 << 20)))  # ...then 1 MiB/s
    rate = p.rate()
    assert rate is not None and (1 << 20) * 0.9 < rate < (1 << 20) * 1.1


class SparseStream:
    """A stream job as ``jobs`` shows it, on a fake clock: one 1 MiB step in eight holds
    data and is copied at ``speed`` (a step at once, then the job waits out its budget,
    as ``Job.checkpoint`` does); the steps between are passed over in one go, so
    ``offset`` runs eight times ahead of the bytes copied."""

    STEP, EVERY = 1 << 20, 8

    def __init__(self, speed: int, length: int = 1 << 30, limit_shown: int | None = None) -> None:
        self.speed, self.len = speed, length
        self.shown = speed if limit_shown is None else limit_shown
        self.to_copy = length // self.EVERY

    def copied(self, t: float) -> int:
        steps = int(t * self.speed / self.STEP) + 1  # the first step goes at once
        return min(steps * self.STEP, self.to_copy)

    def line(self, t: float) -> dict[str, str]:
        copied = self.copied(t)
        offset = min(copied * self.EVERY, self.len)
        return {
            "id": "stream-1",
            "type": "stream",
            "status": "running",
            "offset": str(offset),
            "len": str(self.len),
            "speed": str(self.shown),
            "copied": str(copied),
        }

    def seconds_left(self, t: float) -> float:
        return (self.to_copy - self.copied(t)) / self.speed


@pytest.mark.parametrize("shown", [8 << 20, 0], ids=["limit-shown", "limit-unknown"])
def test_rate_and_eta_come_from_the_bytes_copied(shown: int) -> None:
    """A stream with ``speed=8M`` over a sparse chain: the displayed rate stays within
    10% of the limit (not the 8x the offset runs at) and the time left within 25% of
    the true one, whether or not the jobs line states the limit."""
    limit = 8 << 20
    sim = SparseStream(limit, limit_shown=shown)
    out, clock = io.StringIO(), Clock()
    p = cli.Progress(out, tty=False, clock=clock)
    start = clock.now
    checked = 0
    while clock.now - start < 14:
        t = clock.now - start
        p.update(sim.line(t))
        rate = p.rate()
        if t >= 2:
            assert rate is not None and 0.9 * limit <= rate <= 1.1 * limit, (t, rate)
            left = sim.seconds_left(t)
            shown_left = p.to_copy(int(sim.line(t)["offset"]), sim.len)
            assert shown_left is not None
            assert abs(shown_left / rate - left) <= 0.25 * left, (t, shown_left / rate, left)
            checked += 1
        clock.now += cli.POLL_INTERVAL
    assert checked > 50
    lines = [parse_line(x) for x in out.getvalue().splitlines()]
    rates = [int(x["rate"]) for x in lines if "rate" in x]
    assert rates and all(r <= 1.1 * limit for r in rates), rates
    assert all(int(x["copied"]) * 8 == int(x["done"]) for x in lines)


def test_displayed_rate_never_passes_the_jobs_limit() -> None:
    """Looks a second apart catch the job's step burst: what shows is still the limit."""
    limit = 1 << 20
    sim = SparseStream(limit)
    out, clock = io.StringIO(), Clock()
    p = cli.Progress(out, tty=False, clock=clock)
    for _ in range(40):
        p.update(sim.line(clock.now - 100.0))
        rate = p.rate()
        assert rate is None or rate <= limit
        clock.now += cli.POLL_INTERVAL


def test_terminal_progress_is_a_bar_redrawn_in_place() -> None:
    out, clock = TTY(), Clock()
    p = cli.Progress(out, tty=True, clock=clock)
    p.update(job(0))
    clock.now += 2
    p.update(job(50 << 20))
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 2
    last = text.rsplit("\r", 1)[1]
    assert "stream-1 running [" in last and "#" in last
    assert " 50%" in last and "50 MiB / 100 MiB" in last
    assert "25 MiB/s" in last and "0:02 left" in last
    p.finish()
    assert out.getvalue().endswith("\n")


def test_duration() -> None:
    assert [cli._duration(s) for s in (0, 59.6, 61, 3600 + 62)] == [
        "0:00",
        "1:00",
        "1:01",
        "1:01:02",
    ]


# -- following a job ---------------------------------------------------------------------------


class FakeChain:
    """``control/vm`` of a pretend mount: events to append to, jobs to rewrite."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "control" / "vm"
        self.dir.mkdir(parents=True)
        self.events = self.dir / "events"
        self.jobs = self.dir / "jobs"
        self.events.write_text("")
        self.jobs.write_text("")
        self.mark = 0

    def emit(self, event: str, **fields: str) -> None:
        with open(self.events, "a") as f:
            f.write(
                format_line([("time", "t"), ("event", event), ("chain", "vm"), *fields.items()])
            )
            f.write("\n")

    def set_job(self, **fields: str) -> None:
        self.jobs.write_text(format_line(list(fields.items())) + "\n" if fields else "")

    def follower(self, out: io.StringIO) -> cli.Follower:
        return cli.Follower(str(self.root), "vm", str(self.events), self.mark, out)


@pytest.fixture
def chain(tmp_path: Path) -> FakeChain:
    return FakeChain(tmp_path)


def run_script(
    monkeypatch: pytest.MonkeyPatch, follower: cli.Follower, script: Iterator[Callable[[], None]]
) -> int:
    """Run the follower; each of its sleeps performs the next step of ``script``."""

    def sleep(_: float) -> None:
        next(script)()

    monkeypatch.setattr(time, "sleep", sleep)
    return follower.run()


def test_follow_to_completion(chain: FakeChain, monkeypatch: pytest.MonkeyPatch) -> None:
    chain.emit("JOB_STARTED", job="stream-1", type="stream")
    chain.set_job(id="stream-1", type="stream", status="running", offset="0", len="100")

    def steps() -> Iterator[Callable[[], None]]:
        yield lambda: chain.set_job(
            id="stream-1", type="stream", status="running", offset="50", len="100"
        )

        def end() -> None:
            chain.set_job()
            chain.emit("JOB_COMPLETED", job="stream-1")

        yield end

    out = io.StringIO()
    assert run_script(monkeypatch, chain.follower(out), steps()) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1] == "job stream-1 completed"
    assert parse_line(lines[0])["done"] == "0"


def test_follow_failure_exits_1_with_the_reason(
    chain: FakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.emit("JOB_STARTED", job="stream-1", type="stream")
    chain.emit("JOB_COMPLETED", job="stream-1", error="writing '/x' failed: no space left")
    out = io.StringIO()
    assert run_script(monkeypatch, chain.follower(out), iter(())) == 1
    assert out.getvalue() == ("chainfs: job stream-1 failed: writing '/x' failed: no space left\n")


def test_follow_cancelled_job_exits_1(chain: FakeChain, monkeypatch: pytest.MonkeyPatch) -> None:
    chain.emit("JOB_STARTED", job="commit-2", type="commit")
    chain.emit("JOB_CANCELLED", job="commit-2", type="commit")
    out = io.StringIO()
    assert run_script(monkeypatch, chain.follower(out), iter(())) == 1
    assert out.getvalue() == "chainfs: job commit-2 was cancelled\n"


def test_follow_ignores_other_jobs_and_partial_lines(
    chain: FakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.emit("JOB_COMPLETED", job="stream-0")  # an older job's end, before ours started
    chain.mark = os.path.getsize(chain.events)
    chain.emit("JOB_STARTED", job="stream-1", type="stream")

    def steps() -> Iterator[Callable[[], None]]:
        line = format_line([("time", "t"), ("event", "JOB_COMPLETED"), ("job", "stream-1")])
        with open(chain.events, "a") as f:
            f.write(line[:10])  # half a line: not an event yet

        def rest() -> None:
            with open(chain.events, "a") as f:
                f.write(line[10:] + "\n")

        yield rest

    out = io.StringIO()
    follower = chain.follower(out)
    assert run_script(monkeypatch, follower, steps()) == 0
    assert follower.job_id == "stream-1"


def test_cancel_wait_succeeds_when_the_job_is_cancelled(
    chain: FakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.emit("JOB_CANCELLED", job="stream-1", type="stream")
    out = io.StringIO()
    follower = chain.follower(out)
    follower.job_id, follower.cancelling = "stream-1", True
    assert run_script(monkeypatch, follower, iter(())) == 0
    assert out.getvalue() == "job stream-1 cancelled\n"


def test_wait_ready_stops_at_ready(chain: FakeChain, monkeypatch: pytest.MonkeyPatch) -> None:
    chain.emit("JOB_STARTED", job="copy-1", type="copy")
    chain.emit("JOB_READY", job="copy-1", type="copy")
    out = io.StringIO()
    follower = chain.follower(out)
    follower.until_ready = True
    assert run_script(monkeypatch, follower, iter(())) == 0
    assert "job copy-1 is ready" in out.getvalue()
    assert f"chainfs complete {chain.root} vm copy-1" in out.getvalue()


def test_ctrl_c_stops_following_only(chain: FakeChain, monkeypatch: pytest.MonkeyPatch) -> None:
    chain.emit("JOB_STARTED", job="stream-1", type="stream")
    chain.set_job(id="stream-1", type="stream", status="running", offset="1", len="100")

    def steps() -> Iterator[Callable[[], None]]:
        def interrupt() -> None:
            raise KeyboardInterrupt

        yield interrupt

    out = TTY()
    assert run_script(monkeypatch, chain.follower(out), steps()) == 130
    text = out.getvalue()
    assert text.startswith("\r")  # the bar was drawn...
    last = text.splitlines()[-1]  # ...and the message has a line of its own
    assert last.startswith("chainfs: stopped following; job stream-1 keeps running")
    assert f"chainfs cancel {chain.root} vm stream-1" in last


def test_lost_mount_while_following(chain: FakeChain, monkeypatch: pytest.MonkeyPatch) -> None:
    chain.emit("JOB_STARTED", job="stream-1", type="stream")

    def steps() -> Iterator[Callable[[], None]]:
        yield lambda: os.unlink(chain.events)

    out = io.StringIO()
    assert run_script(monkeypatch, chain.follower(out), steps()) == 1
    assert out.getvalue().startswith("chainfs: lost the mount while following job stream-1")


# -- status ------------------------------------------------------------------------------------


def layer(name: str, role: str, allocated: int) -> dict[str, object]:
    return {
        "name": name,
        "path": f"/srv/{name}",
        "format": "qcow2",
        "virtual-size": 64 << 20,
        "allocated": allocated,
        "role": role,
    }


def test_status_drawing() -> None:
    info = {
        "daemon": {"pid": 7, "source": "/srv", "mountpoint": "/mnt", "readonly": False},
        "chains": [
            {
                "chain": "vm1",
                "status": "served",
                "active": "/srv/E.qcow2",
                "layers": [
                    layer("E.qcow2", "active", 1 << 20),
                    layer("B.qcow2", "backing", 2 << 20),
                    layer("A.qcow2", "base", 64 << 20),
                ],
                "jobs": [
                    {
                        "id": "stream-1",
                        "type": "stream",
                        "status": "running",
                        "offset": 16 << 20,
                        "len": 64 << 20,
                        "speed": 1 << 20,
                    }
                ],
            },
            {
                "chain": "vm2",
                "status": "refused",
                "path": "/srv/vm2.qcow2",
                "reason": "'/srv/vm2.qcow2' is encrypted",
            },
        ],
    }
    text = cli.render_status(info)
    assert text.splitlines()[0] == "/mnt: /srv (pid 7, read-write)"
    assert "vm1  64 MiB  [A] <- [B] <- [E]" in text
    assert re.search(r"\n    E\.qcow2 +active +1 MiB allocated +qcow2\n", text), text
    assert re.search(r"\n    A\.qcow2 +base +64 MiB allocated +qcow2\n", text), text
    assert "job stream-1: stream running 25% (16 MiB of 64 MiB, speed limit 1 MiB/s)" in text
    assert "vm2 (/srv/vm2.qcow2): '/srv/vm2.qcow2' is encrypted" in text


def test_status_drawing_of_a_mirror_says_what_is_left() -> None:
    job = {"id": "copy-2", "type": "copy", "status": "ready", "offset": 96 << 20}
    job |= {"len": 96 << 20, "speed": 0, "copy-mode": "background", "remaining": 3 << 20}
    info = {
        "daemon": {"pid": 7, "source": "/srv", "mountpoint": "/mnt", "readonly": False},
        "chains": [
            {
                "chain": "vm1",
                "status": "served",
                "active": "/srv/E.qcow2",
                "layers": [layer("E.qcow2", "active", 1 << 20)],
                "jobs": [job],
            }
        ],
    }
    text = cli.render_status(info)
    assert "job copy-2: copy ready 100% (96 MiB of 96 MiB, 3 MiB left, background)" in text


def test_typed_values() -> None:
    assert cli._typed({"pid": "12", "name": "7", "readonly": "true", "len": "x"}) == {
        "pid": 12,
        "name": "7",
        "readonly": True,
        "len": "x",
    }


# -- logging -----------------------------------------------------------------------------------


@pytest.mark.expect_log(r"WARNING chainfs\.test\.throttle: ")  # the warnings it throttles
def test_throttle_passes_a_burst_then_counts() -> None:
    clock = Clock()
    logger = logging.getLogger("chainfs.test.throttle")
    logger.setLevel(logging.INFO)
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Catch()
    logger.addHandler(handler)
    try:
        t = logs.Throttle(logger, burst=2, interval=10, clock=clock)
        passed = [t.warning("read", "cluster %d damaged", i) for i in range(5)]
        assert passed == [True, True, False, False, False]
        assert t.warning("write", "other key") is True  # keys are independent
        clock.now += 10
        assert t.warning("read", "cluster %d damaged", 9) is True
    finally:
        logger.removeHandler(handler)
    assert records == [
        "cluster 0 damaged",
        "cluster 1 damaged",
        "other key",
        "cluster 9 damaged (3 similar messages suppressed)",
    ]


def test_journal_formatter_prefixes_every_line_with_the_priority() -> None:
    f = logs.JournalFormatter("%(message)s")

    def fmt(level: int, msg: str) -> str:
        return f.format(logging.LogRecord("x", level, "f", 1, msg, None, None))

    assert fmt(logging.WARNING, "a\nb") == "<4>a\n<4>b"
    assert fmt(logging.ERROR, "e") == "<3>e"
    assert fmt(logging.DEBUG, "d") == "<7>d"
    assert fmt(logging.INFO + 1, "i") == "<6>i"


def test_stderr_is_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not logs.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.stderr_is_journal()


@pytest.mark.expect_log(r"chainfs\.test: ")  # the lines it sends to syslog
def test_daemon_logs_to_syslog_with_priorities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
    root = logging.getLogger()
    level = root.level
    handler = logs.setup(debug=False, syslog=True)
    try:
        logging.getLogger("chainfs.test").warning("chain=%s refused", "vm2")
        logging.getLogger("chainfs.test").debug("not at INFO")
        logging.getLogger("chainfs.test").error("it broke")
        first, second = sock.recv(4096), sock.recv(4096)
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        sock.close()
    # facility daemon (3): priority 3 * 8 + severity (warning 4, error 3)
    assert first == f"<28>chainfs[{os.getpid()}]: chain=vm2 refused\x00".encode()
    assert second == f"<27>chainfs[{os.getpid()}]: it broke\x00".encode()


def test_describe_call_leaves_payloads_out() -> None:
    assert logs.describe_call("read", (3, 0, 4096)) == "read(3, 0, 4096)"
    assert (
        logs.describe_call("lookup", (1, b"vm1.img", object())) == "lookup(1, b'vm1.img', object)"
    )
    assert logs.describe_call("write", (3, 0, bytes(65536))) == "write(3, 0, <65536 bytes>)"


def test_a_reader_that_goes_away_ends_output_quietly(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(4096))
    r, w = os.pipe()
    os.close(r)  # nobody will read: the first write fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "chainfs", "info", str(image)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        os.close(w)
    assert (proc.returncode, proc.stderr) == (141, "")
