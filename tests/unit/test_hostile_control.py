"""Hostile writes to the control files, at the grammar level (``parse_command``).

Whatever bytes arrive — random, huge, cut in the middle of a quote or a UTF-8 sequence,
every combination of keys with good and bad values — the answer is a command or a
``CommandError`` with EINVAL and a short one-line reason, never another exception.
Every keyword combination is checked against an independent statement of the SPEC's
grammar, so accepting too much fails as surely as refusing too much.  The mount-level
counterpart is ``tests/mount/test_hostile.py``.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.control import (
    COMMANDS,
    HOST_VERBS,
    MAX_COMMAND,
    BackupCmd,
    CancelCmd,
    ChangeCmd,
    Command,
    CommandError,
    CommitCmd,
    CompleteCmd,
    CopyCmd,
    PauseCmd,
    ResumeCmd,
    SnapshotCmd,
    SpeedCmd,
    StreamCmd,
    parse_command,
    quote,
)

# The SPEC's grammar, stated apart from the implementation:
# command -> (keys it takes, name of its bare word or None, bare word required)
GRAMMAR: dict[str, tuple[frozenset[str], bool, bool]] = {
    "snapshot": (frozenset(), True, True),
    "stream": (frozenset({"base", "node", "speed"}), True, False),
    "commit": (frozenset({"top", "base", "speed", "wait", "copy-mode"}), False, False),
    "copy": (frozenset({"sync", "speed", "wait", "copy-mode"}), True, True),
    # (format= and compress= are left to test_control.py: fewer combinations here)
    # (sync=bitmap's keys too: base= here, with sync=top, is refused)
    "backup": (
        frozenset({"sync", "speed", "format", "compress", "bitmap", "bitmap-mode", "base"}),
        True,
        True,
    ),
    "cancel": (frozenset(), True, True),
    "complete": (frozenset(), True, True),
    "speed": (frozenset(), True, True),  # two bare words: JOB RATE
    "pause": (frozenset(), True, True),
    "resume": (frozenset(), True, True),
    "change": (frozenset({"copy-mode"}), True, True),  # copy-mode required
    "bitmap": (frozenset({"granularity"}), True, True),  # first bare word: the action
}
ALL_KEYS = ("base", "node", "top", "speed", "sync", "wait", "file", "job", "copy-mode")
GOOD = {"base": "A.qcow2", "node": "D.qcow2", "top": "C.qcow2", "speed": "10M", "sync": "top"}
GOOD |= {"wait": "ready", "file": "F", "job": "stream-1", "copy-mode": "write-blocking"}
BAD = {"speed": "fast", "sync": "mirror", "wait": "now", "copy-mode": "sync"}


def outcome(kind: str, data: bytes) -> Command | CommandError:
    """``parse_command``'s answer, checking that a refusal is well-formed."""
    try:
        return parse_command(kind, data)
    except CommandError as e:
        assert e.errno == errno.EINVAL, (kind, data, e.errno)
        assert e.reason and str(e) == e.reason
        assert "\n" not in e.reason and len(e.reason) < 300, e.reason
        return e


def expected(kind: str, keys: dict[str, str], bare: list[str]) -> Command | None:
    """What the SPEC says the command means, or None if it must be refused."""
    allowed, takes_bare, needs_bare = GRAMMAR[kind]
    if not keys and not bare:
        return None  # an empty write never defaults to anything
    if kind == "bitmap":
        return None  # no bare word here is an action, no key granularity (test_control)
    if set(keys) - allowed or any(BAD.get(k) == v for k, v in keys.items()):
        return None
    if kind == "speed":
        if keys or len(bare) != 2 or bare[1] != "10M":
            return None
        return SpeedCmd(bare[0], 10 << 20)
    if len(bare) > 1 or (bare and not takes_bare) or (needs_bare and not bare):
        return None
    main = bare[0] if bare else None
    speed = 10 << 20 if "speed" in keys else 0
    ready = "wait" in keys
    if kind == "snapshot":
        return SnapshotCmd(main or "")
    if kind == "stream":
        if main is not None and "base" in keys:
            return None
        return StreamCmd(base=main or keys.get("base"), node=keys.get("node"), speed=speed)
    mode = keys.get("copy-mode")
    if kind == "commit":
        return CommitCmd(
            top=keys.get("top"),
            base=keys.get("base"),
            speed=speed,
            wait_ready=ready,
            copy_mode=mode,
        )
    if kind == "copy":
        sync = keys.get("sync", "full")
        return CopyCmd(
            main or "", sync=sync, speed=speed, wait_ready=ready, copy_mode=mode or "background"
        )
    if kind == "backup":
        if "base" in keys:
            return None  # base= needs sync=bitmap (never drawn here)
        return BackupCmd(main or "", sync=keys.get("sync", "full"), speed=speed)
    if kind == "change":
        return None if mode is None else ChangeCmd(main or "", mode)
    if kind == "cancel":
        return CancelCmd(main or "")
    if kind == "pause":
        return PauseCmd(main or "")
    if kind == "resume":
        return ResumeCmd(main or "")
    return CompleteCmd(main or "")


def combinations() -> list[tuple[str, dict[str, str], list[str]]]:
    out = []
    for kind in COMMANDS:
        if kind in HOST_VERBS:
            continue  # one word, the chain's name (test_control.py)
        for n in range(len(ALL_KEYS) + 1):
            for chosen in itertools.combinations(ALL_KEYS, n):
                with_bad = [k for k in chosen if k in BAD]
                for bad in itertools.product([False, True], repeat=len(with_bad)):
                    keys = {k: GOOD[k] for k in chosen}
                    keys |= {k: BAD[k] for k, b in zip(with_bad, bad, strict=True) if b}
                    for bare in ([], ["X.qcow2"], ["X.qcow2", "Y.qcow2"], ["X", "10M"]):
                        out.append((kind, keys, bare))
    return out


def test_every_keyword_combination() -> None:
    cases = combinations()
    assert len(cases) > 15_000
    accepted = 0
    for kind, keys, bare in cases:
        words = [f"{k}={v}" for k, v in keys.items()] + bare
        for order in (words, words[::-1]):
            data = " ".join(order).encode() + b"\n"
            got = outcome(kind, data)
            want = expected(kind, keys, [w for w in order if "=" not in w])
            if want is None:
                assert isinstance(got, CommandError), (kind, data, got)
            else:
                assert got == want, (kind, data, got)
                accepted += 1
    assert accepted > 50


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(COMMANDS), st.binary(max_size=3 * MAX_COMMAND))
def test_random_bytes_of_any_length(kind: str, data: bytes) -> None:
    got = outcome(kind, data)
    if len(data) > MAX_COMMAND:
        assert isinstance(got, CommandError) and "too long" in got.reason


@pytest.mark.parametrize("size", [MAX_COMMAND + 1, 64 * 1024, 1 << 20, 16 << 20])
@pytest.mark.parametrize("kind", COMMANDS)
def test_huge_writes(kind: str, size: int) -> None:
    for data in (b"x" * size, b'"' * size, (b"base=" + b"a" * size)[:size], b"\xff" * size):
        got = outcome(kind, data)
        assert isinstance(got, CommandError) and got.reason == "command too long"


QUOTING = st.sampled_from(
    ['"', '\\"', "\\", "\\\\", "\\x", "\\x4", "\\x41", "\\u00e9", "\\U0001F600", "\\U00110000",
     "\\ud800", "\\n", "\\t", "\\q", "=", " ", "\t", "a", "é", "\x00", "\r", "\n", "\x7f"]
)  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(
    st.sampled_from(COMMANDS),
    st.sampled_from(["", "base=", "dest ", "top=", "node=", "sync="]),
    st.lists(QUOTING, max_size=16),
)
def test_quoting_edge_cases(kind: str, prefix: str, pieces: list[str]) -> None:
    text = prefix + "".join(pieces)
    data = text.encode("utf-8", "surrogatepass")
    outcome(kind, data)
    outcome(kind, data[: len(data) // 2])  # cut anywhere, even inside a UTF-8 sequence


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_any_name_quoted_is_taken_verbatim(name: str) -> None:
    """What ``quote`` makes of a name is accepted as that name in every place a layer,
    file or job goes — or refused with a reason (NUL, lone surrogates), never garbled."""
    q = quote(name)
    for kind, data, field in [
        ("snapshot", q, "target"),
        ("copy", f"{q} sync=full", "dest"),
        ("stream", f"node={q}", "node"),
        ("commit", f"top={q} base={q}", "base"),
        ("cancel", q, "job"),
    ]:
        raw = data.encode("utf-8", "surrogateescape") if _encodable(data) else None
        if raw is None or len(raw) > MAX_COMMAND:
            continue
        got = outcome(kind, raw)
        if not isinstance(got, CommandError):
            assert getattr(got, field) == name


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True
