"""The control-file grammar and the key=value line format, without FUSE or images."""

from __future__ import annotations

import errno
import re
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainfs.control import (
    COMMANDS,
    MAX_COMMAND,
    BackupCmd,
    BitmapCmd,
    CancelCmd,
    ChangeCmd,
    Command,
    CommandError,
    CommitCmd,
    CompleteCmd,
    CopyCmd,
    HostCmd,
    PauseCmd,
    ResumeCmd,
    SnapshotCmd,
    SpeedCmd,
    StreamCmd,
    format_line,
    parse_command,
    parse_line,
    parse_rate,
    quote,
)
from chainfs.errors import ChainfsError

ACCEPTED: list[tuple[str, bytes, Command]] = [
    ("snapshot", b"F.qcow2", SnapshotCmd("F.qcow2")),
    ("snapshot", b"/abs/F.qcow2\n", SnapshotCmd("/abs/F.qcow2")),
    ("snapshot", b"  F.qcow2\t\r\n", SnapshotCmd("F.qcow2")),
    ("snapshot", b'"/my disks/F.qcow2"\n', SnapshotCmd("/my disks/F.qcow2")),
    ("snapshot", b'/my" "disks/F.qcow2', SnapshotCmd("/my disks/F.qcow2")),
    ("snapshot", b'"a=b.qcow2"', SnapshotCmd("a=b.qcow2")),
    ("snapshot", b'"say \\"hi\\" \\\\ \\t"', SnapshotCmd('say "hi" \\ \t')),
    ("snapshot", b'"caf\\u00e9 \\x41"', SnapshotCmd("café A")),
    ("snapshot", "café.qcow2".encode(), SnapshotCmd("café.qcow2")),
    ("snapshot", b"it's.qcow2", SnapshotCmd("it's.qcow2")),
    ("stream", b"A.qcow2", StreamCmd(base="A.qcow2")),
    ("stream", b"base=A.qcow2", StreamCmd(base="A.qcow2")),
    ("stream", b'base="/x y/A.qcow2"', StreamCmd(base="/x y/A.qcow2")),
    ("stream", b"node=D.qcow2 base=B.qcow2", StreamCmd(base="B.qcow2", node="D.qcow2")),
    ("stream", b"B.qcow2 node=D.qcow2", StreamCmd(base="B.qcow2", node="D.qcow2")),
    ("stream", b"node=D.qcow2 B.qcow2", StreamCmd(base="B.qcow2", node="D.qcow2")),
    ("stream", b"node=D.qcow2", StreamCmd(node="D.qcow2")),
    ("stream", b"speed=10M", StreamCmd(speed=10 << 20)),
    ("stream", b"A speed=0\n", StreamCmd(base="A", speed=0)),
    ("stream", b"base=x=y", StreamCmd(base="x=y")),
    ("commit", b"top=D.qcow2", CommitCmd(top="D.qcow2")),
    ("commit", b"base=A.qcow2", CommitCmd(base="A.qcow2")),
    (
        "commit",
        b"top=D.qcow2 base=B.qcow2 speed=512k wait=ready\n",
        CommitCmd(top="D.qcow2", base="B.qcow2", speed=512 << 10, wait_ready=True),
    ),
    ("commit", b"wait=ready", CommitCmd(wait_ready=True)),
    ("commit", b'"top"=D', CommitCmd(top="D")),
    ("copy", b"/new/disk.qcow2", CopyCmd("/new/disk.qcow2")),
    ("backup", b"/b/F.qcow2", BackupCmd("/b/F.qcow2")),
    (
        "backup",
        b"F.raw sync=full format=raw speed=1M",
        BackupCmd("F.raw", sync="full", format="raw", speed=1 << 20),
    ),
    ("backup", b"F sync=top compress=on", BackupCmd("F", sync="top", compress=True)),
    ("backup", b"F sync=none compress=off", BackupCmd("F", sync="none")),
    ("backup", b"F sync=bitmap bitmap=b1", BackupCmd("F", sync="bitmap", bitmap="b1")),
    (
        "backup",
        b"F sync=bitmap bitmap=b1 bitmap-mode=never base=full.qcow2",
        BackupCmd("F", sync="bitmap", bitmap="b1", bitmap_mode="never", base="full.qcow2"),
    ),
    (
        "backup",
        b"F sync=bitmap bitmap=b1 bitmap-mode=always",
        BackupCmd("F", sync="bitmap", bitmap="b1", bitmap_mode="always"),
    ),
    ("copy", b"/new/disk.qcow2 sync=full", CopyCmd("/new/disk.qcow2", sync="full")),
    ("copy", b"sync=top /new/disk.qcow2", CopyCmd("/new/disk.qcow2", sync="top")),
    (
        "copy",
        b'"/new dir/disk.qcow2" sync=top speed=1G wait=ready\r\n',
        CopyCmd("/new dir/disk.qcow2", sync="top", speed=1 << 30, wait_ready=True),
    ),
    ("cancel", b"stream-1", CancelCmd("stream-1")),
    ("cancel", b"stream-1\n", CancelCmd("stream-1")),
    ("complete", b"copy-3\n", CompleteCmd("copy-3")),
    ("speed", b"copy-3 10M\n", SpeedCmd("copy-3", 10 << 20)),
    ("speed", b"stream-1 0", SpeedCmd("stream-1", 0)),
    ("speed", b'"stream-1" 512k', SpeedCmd("stream-1", 512 << 10)),
    ("pause", b"commit-2\n", PauseCmd("commit-2")),
    ("resume", b"commit-2", ResumeCmd("commit-2")),
    # the copy mode of a mirror (QEMU's MirrorCopyMode) and block-job-change
    ("copy", b"D copy-mode=write-blocking", CopyCmd("D", copy_mode="write-blocking")),
    ("copy", b"copy-mode=background D", CopyCmd("D", copy_mode="background")),
    ("commit", b"copy-mode=write-blocking", CommitCmd(copy_mode="write-blocking")),
    ("commit", b"wait=ready", CommitCmd(wait_ready=True, copy_mode=None)),
    ("change", b"copy-1 copy-mode=write-blocking\n", ChangeCmd("copy-1", "write-blocking")),
    ("change", b"copy-mode=background commit-2", ChangeCmd("commit-2", "background")),
]


@pytest.mark.parametrize(("kind", "data", "expected"), ACCEPTED)
def test_accepted(kind: str, data: bytes, expected: Command) -> None:
    assert parse_command(kind, data) == expected


@pytest.mark.parametrize("kind", ["stream", "commit"])
def test_all_defaults_must_be_spelled_out(kind: str) -> None:
    # An empty write is refused even where every argument is optional, so that
    # `echo $UNSET > commit` does not merge the whole chain; name node= or top= instead.
    with pytest.raises(CommandError, match="empty command"):
        parse_command(kind, b"\n")


def test_commands_listed() -> None:
    assert set(COMMANDS) == {
        *("snapshot", "stream", "commit", "copy", "backup"),
        *("cancel", "complete", "speed", "pause", "resume", "change"),
        *("adopt", "inactivate", "activate"),
        "bitmap",
    }


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (b"add b1\n", BitmapCmd("add", ("b1",))),
        (b"add b1 granularity=128k disabled", BitmapCmd("add", ("b1",), 131072, True)),
        (b"remove b1", BitmapCmd("remove", ("b1",))),
        (b"clear b1", BitmapCmd("clear", ("b1",))),
        (b"enable b1", BitmapCmd("enable", ("b1",))),
        (b"disable b1", BitmapCmd("disable", ("b1",))),
        (b"merge t a b", BitmapCmd("merge", ("t", "a", "b"))),
        (b'add "a name"', BitmapCmd("add", ("a name",))),
    ],
)
def test_bitmap_commands(text: bytes, want: BitmapCmd) -> None:
    assert parse_command("bitmap", text) == want


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"", "empty command"),
        (b"grow b1", "bitmap needs one of add, remove, clear, enable, disable, merge, got 'grow'"),
        (b"add", "bitmap add needs a bitmap name"),
        (b"merge t", "bitmap merge needs a target and at least one source"),
        (b"clear a b", "bitmap clear takes one name, got 'a' and 'b'"),
        (b"clear a granularity=4k", "unknown key 'granularity' for bitmap clear"),
        (b"add a speed=1", "unknown key 'speed' for bitmap"),
        (b"add a granularity=x", "granularity"),
    ],
)
def test_bitmap_commands_refused(text: bytes, reason: str) -> None:
    with pytest.raises(CommandError, match=re.escape(reason)):
        parse_command("bitmap", text)


@pytest.mark.parametrize("kind", ["adopt", "inactivate", "activate"])
def test_host_verbs_take_the_chain_name(kind: str) -> None:
    assert parse_command(kind, b"vm1\n") == HostCmd(kind, "vm1")
    for bad in (b"", b" \n", b"vm1 vm2", b"speed=1"):
        with pytest.raises(CommandError) as exc:
            parse_command(kind, bad)
        assert exc.value.errno == errno.EINVAL
    if kind == "adopt":
        assert parse_command(kind, b"vm1 timeout=30") == HostCmd(kind, "vm1", 30.0)
        with pytest.raises(CommandError):
            parse_command(kind, b"vm1 timeout=soon")
    else:
        with pytest.raises(CommandError):
            parse_command(kind, b"vm1 timeout=30")


REJECTED: list[tuple[str, bytes, str]] = [
    ("backup", b"", "empty command"),
    ("backup", b"sync=full", "backup needs a destination"),
    ("backup", b"F sync=mirror", "sync must be 'full', 'top', 'none' or 'bitmap', got 'mirror'"),
    ("backup", b"F sync=bitmap", "sync=bitmap needs bitmap=NAME"),
    ("backup", b"F bitmap=b1", "bitmap= needs sync=bitmap"),
    ("backup", b"F sync=top base=A.qcow2", "base= needs sync=bitmap"),
    ("backup", b"F sync=full bitmap-mode=never", "bitmap-mode= needs sync=bitmap"),
    (
        "backup",
        b"F sync=bitmap bitmap=b1 bitmap-mode=sometimes",
        "bitmap-mode must be 'on-success', 'always' or 'never', got 'sometimes'",
    ),
    ("backup", b"F format=vmdk", "format must be 'qcow2' or 'raw', got 'vmdk'"),
    ("backup", b"F compress=yes", "compress must be 'on' or 'off', got 'yes'"),
    ("backup", b"F wait=ready", "unknown key 'wait' for backup"),
    ("resize", b"1G", "unknown control file 'resize'"),
    ("snapshot", b"", "empty command"),
    ("snapshot", b"\n", "empty command"),
    ("stream", b"  \t \r\n", "empty command"),
    ("snapshot", b"x" * (MAX_COMMAND + 1), "command too long"),
    ("snapshot", b"F\n\n", "control character '\\n' in command"),
    ("snapshot", b"F\x00", "control character '\\x00' in command"),
    ("snapshot", b"F\rG", "control character '\\r' in command"),
    ("snapshot", b"F\x7f", "control character '\\x7f' in command"),
    ("snapshot", "F\x85".encode(), "control character '\\x85' in command"),
    ("snapshot", b"F\xff.qcow2", "command is not valid utf-8"),
    ("snapshot", b'"F.qcow2', "unbalanced quote"),
    ("snapshot", b'"F.qcow2\\"', "unbalanced quote"),
    ("snapshot", b'F.qcow2"', "unbalanced quote"),
    ("snapshot", b"F\\ G", "backslash outside quotes"),
    ("snapshot", b'"F\\q"', "unknown escape '\\\\q' in quotes"),
    ("snapshot", b'"F\\x4"', "bad escape"),
    ("snapshot", b'"F\\U00110000"', "bad escape"),
    ("snapshot", b'"F\\x00"', "nul character in file"),
    ("snapshot", b'"F\\ud800"', "is not a valid file name"),
    ("snapshot", b'""', "empty file"),
    ("snapshot", b"F G", "snapshot takes one file, got 'F' and 'G'"),
    ("snapshot", b"file=F", "unknown key 'file' for snapshot"),
    ("copy", b"speed=1M wait=ready", "copy needs a destination"),
    ("copy", b"D copy-mode=sync", "copy-mode must be 'background' or 'write-blocking', got 'sync'"),
    ("commit", b"copy-mode=", "empty value for 'copy-mode'"),
    ("stream", b"copy-mode=write-blocking", "unknown key 'copy-mode' for stream"),
    ("change", b"copy-1", "change needs copy-mode=write-blocking"),
    ("change", b"copy-mode=write-blocking", "change needs a job"),
    ("change", b"copy-1 speed=1M", "unknown key 'speed' for change"),
    ("change", b"copy-1 copy-mode=active", "copy-mode must be 'background' or 'write-blocking'"),
    ("stream", b"B C", "stream takes one layer, got 'B' and 'C'"),
    ("stream", b"sped=1M", "unknown key 'sped' for stream"),
    ("stream", b"wait=ready", "unknown key 'wait' for stream"),
    ("stream", b"top=D", "unknown key 'top' for stream"),
    ("stream", b"=A", "missing key before '='"),
    ("stream", b"base=A base=B", "repeated key 'base'"),
    ("stream", b"base=", "empty value for 'base'"),
    ("stream", b'node=""', "empty value for 'node'"),
    ("stream", b"A base=B", "stream base given twice: 'A' and base='B'"),
    ("stream", b"A base=A", "stream base given twice"),
    ("stream", b"speed=-5", "speed must be a byte rate like 10M, got '-5'"),
    ("stream", b"speed=10MB", "speed must be a byte rate like 10M, got '10MB'"),
    ("stream", b"speed=1T", "speed must be a byte rate"),
    ("stream", b"speed=99999999999G", "speed '99999999999G' is too large"),
    ("commit", b"D.qcow2", "commit takes no bare argument, got 'D.qcow2'"),
    ("commit", b"top=D wait=now", "wait only accepts 'ready', got 'now'"),
    ("commit", b"sync=top", "unknown key 'sync' for commit"),
    ("commit", b"node=D", "unknown key 'node' for commit"),
    ("commit", b"speed=1M speed=2M", "repeated key 'speed'"),
    ("copy", b"sync=top", "copy needs a destination"),
    ("copy", b"D E", "copy takes one destination, got 'D' and 'E'"),
    ("copy", b"D sync=mirror", "sync must be 'full' or 'top', got 'mirror'"),
    ("copy", b"D sync=FULL", "sync must be 'full' or 'top'"),
    ("copy", b"D base=A", "unknown key 'base' for copy"),
    ("copy", b"D wait=", "empty value for 'wait'"),
    ("cancel", b"job=stream-1", "unknown key 'job' for cancel"),
    ("cancel", b"stream-1 copy-2", "cancel takes one job, got 'stream-1' and 'copy-2'"),
    ("complete", b"force=true", "unknown key 'force' for complete"),
    ("complete", b"a b", "complete takes one job"),
    ("speed", b"stream-1", "speed takes a job and a rate, got 1 words"),
    ("speed", b"stream-1 1M 2M", "speed takes a job and a rate, got 3 words"),
    ("speed", b"stream-1 speed=1M", "unknown key 'speed' for speed"),
    ("speed", b"stream-1 fast", "rate must be a byte rate like 10M, got 'fast'"),
    ("speed", b"stream-1 -1", "rate must be a byte rate"),
    ("speed", b"", "empty command"),
    ("pause", b"", "empty command"),
    ("pause", b"a b", "pause takes one job"),
    ("resume", b"now=1", "unknown key 'now' for resume"),
    ("resume", b"\n", "empty command"),
]


@pytest.mark.parametrize(("kind", "data", "reason"), REJECTED)
def test_rejected(kind: str, data: bytes, reason: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(kind, data)
    assert info.value.errno == errno.EINVAL
    assert reason in str(info.value)
    assert str(info.value) == info.value.reason


def test_longest_command_is_accepted() -> None:
    data = b"x" * (MAX_COMMAND - 1) + b"\n"
    assert parse_command("snapshot", data) == SnapshotCmd("x" * (MAX_COMMAND - 1))


def test_long_values_are_cut_short_in_reasons() -> None:
    with pytest.raises(CommandError) as info:
        parse_command("snapshot", b"a " + b"b" * 1000)
    assert len(str(info.value)) < 200


def test_command_error() -> None:
    error = CommandError(errno.EBUSY, "another job already runs on 'vm1'")
    assert isinstance(error, ChainfsError)
    assert error.errno == errno.EBUSY
    assert str(error) == "another job already runs on 'vm1'"


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("1", 1),
        ("1048576", 1048576),
        ("007", 7),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("10M", 10 * 1024**2),
        ("10m", 10 * 1024**2),
        ("1G", 1024**3),
        ("3g", 3 * 1024**3),
        ("0M", 0),
        ("8589934591G", 8589934591 * 1024**3),
    ],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-5",
        "+5",
        "1.5M",
        "10MB",
        "10 M",
        " 10M",
        "10M ",
        "M",
        "1T",
        "1KiB",
        "ten",
        "0x10",
        "١٢",  # non-ASCII digits
        "8589934592G",  # 2**63: beyond int64
        "9" * 40,
    ],
)
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_rate(text)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("E.qcow2", "E.qcow2"),
        ("/abs/E.qcow2", "/abs/E.qcow2"),
        ("café", "café"),
        ("it's", "it's"),
        (12345, "12345"),
        (True, "true"),
        (False, "false"),
        ("", '""'),
        ("a b", '"a b"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines\ttab\rcr", '"two\\nlines\\ttab\\rcr"'),
        ("bell\x07", '"bell\\x07"'),
        ("nbsp\xa0", '"nbsp\\xa0"'),
        ("ls\u2028", '"ls\\u2028"'),
        ("undecodable\udcff", '"undecodable\\udcff"'),
        ("tag\U000e0041", '"tag\\U000e0041"'),
    ],
)
def test_quote(value: object, quoted: str) -> None:
    assert quote(value) == quoted


def test_format_line() -> None:
    line = format_line(
        [
            ("id", "stream-1"),
            ("type", "stream"),
            ("offset", 0),
            ("base", None),
            ("ready", False),
            ("error", 'disk "full"'),
        ]
    )
    assert line == 'id=stream-1 type=stream offset=0 ready=false error="disk \\"full\\""'
    assert format_line([]) == ""


@pytest.mark.parametrize("key", ["", "a b", "a=b", 'a"', "a\\", "a\n"])
def test_format_line_rejects_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="bad key"):
        format_line([(key, "v")])


def test_parse_line() -> None:
    assert parse_line('name=E.qcow2 path="/a b/E.qcow2"  role=active\n') == {
        "name": "E.qcow2",
        "path": "/a b/E.qcow2",
        "role": "active",
    }
    assert parse_line("") == {}
    assert parse_line('k=""') == {"k": ""}
    assert parse_line("k=") == {"k": ""}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("role", "expected key=value"),
        ("=x", "missing key"),
        ('k="open', "unbalanced quote"),
        ('k="\\q"', "unknown escape"),
        ("k=a\\b", "backslash outside quotes"),
        ("k=1 k=2", "repeated key"),
    ],
)
def test_parse_line_rejects(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_line(line)


KEYS = st.from_regex(r"[a-z-]+", fullmatch=True)


@given(st.dictionaries(KEYS, st.text(), max_size=8))
def test_format_parse_round_trip(pairs: dict[str, str]) -> None:
    line = format_line(pairs.items())
    assert "\n" not in line and "\r" not in line
    assert line.splitlines() == ([line] if line else [])
    assert parse_line(line) == pairs
    assert parse_line(line + "\n") == pairs


@given(st.text())
def test_quoted_value_is_one_token(value: str) -> None:
    quoted = quote(value)
    assert quoted.startswith('"') or not any(c in ' \t\n"\\=' for c in quoted)
    assert parse_line(f"k={quoted}") == {"k": value}
    quoted.encode("utf-8")  # even lone surrogates come out escaped


@given(st.text() | st.text(alphabet=' \t\n"\\=ab/\x7f\xa0\u2028'))
def test_a_value_is_bare_exactly_when_no_character_needs_quoting(value: str) -> None:
    """The one-pass test of a bare value (``str.isprintable`` and a regex) says what the
    test of each character said."""
    bare = bool(value) and all(c not in ' \t\n"\\=' and c.isprintable() for c in value)
    assert (quote(value) == value) == bare


@given(st.text().filter(lambda v: v and "\x00" not in v))
def test_quoted_path_round_trips_through_snapshot(value: str) -> None:
    # A value copied from a `chain` line can be pasted into a command.
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return
    data = f"{quote(value)}\n".encode()
    if len(data) > MAX_COMMAND:
        return
    assert parse_command("snapshot", data) == SnapshotCmd(value)


def _check_parse(kind: str, data: bytes) -> None:
    try:
        result = parse_command(kind, data)
    except CommandError as exc:
        assert exc.errno == errno.EINVAL
        assert str(exc)
    else:
        assert isinstance(result, get_args(Command))


@given(st.sampled_from(COMMANDS), st.binary(max_size=300))
def test_fuzz_bytes(kind: str, data: bytes) -> None:
    _check_parse(kind, data)


WORDS = st.sampled_from(
    [
        *COMMANDS,
        "base",
        "node",
        "top",
        "speed",
        "sync",
        "wait",
        "ready",
        "full",
        "file",
        "=",
        '"',
        "\\",
        "\\n",
        "\\x",
        "\\u12",
        "10M",
        "-1",
        "0",
        "A.qcow2",
        "/x y/B.qcow2",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\x00",
        "é",
    ]
)


@given(st.sampled_from(COMMANDS), st.lists(WORDS, max_size=12))
def test_fuzz_token_soup(kind: str, words: list[str]) -> None:
    _check_parse(kind, "".join(words).encode("utf-8"))
    _check_parse(kind, " ".join(words).encode("utf-8"))
