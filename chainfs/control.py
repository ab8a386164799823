"""The language of the control files: what a write to ``control/CHAIN/KIND`` means, and
how the lines of ``chain``, ``jobs`` and ``events`` are spelled.  A write is one command
of whitespace-separated tokens, each ``key=value`` or a bare word (the command's main
argument); double quotes group, with ``\\"`` ``\\\\`` ``\\n`` ``\\t`` ``\\r`` ``\\xHH``
``\\uHHHH`` ``\\UHHHHHHHH`` escapes inside them, and a quoted ``=`` is an ordinary
character.  Lines read back are ``key=value`` pairs quoted the same way, so a value
copied from ``chain`` can be pasted into a command.  Everything here is pure: no I/O, no
trio, no FUSE; a bad command raises ``CommandError`` with ``EINVAL`` and a short reason.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from .errors import ChainfsError

MAX_COMMAND = 4096  # bytes in one write, trailing newline included
MAX_RATE = 2**63 - 1  # QEMU keeps speeds in an int64

COMMANDS: tuple[str, ...] = (
    "snapshot",
    "stream",
    "commit",
    "copy",
    "backup",
    "cancel",
    "complete",
    "speed",
    "pause",
    "resume",
    "change",
    "bitmap",
    "adopt",
    "inactivate",
    "activate",
)
# many hosts: a chain's ownership moves (adopt takes it from a dead owner, inactivate
# gives it up for another host to activate)
HOST_VERBS: tuple[str, ...] = ("adopt", "inactivate", "activate")
# the commands that act on a running job (QEMU's job verbs), each naming the job
JOB_VERBS: tuple[str, ...] = ("cancel", "complete", "speed", "pause", "resume", "change")
SYNC_MODES: tuple[str, ...] = ("full", "top")
BACKUP_SYNC_MODES: tuple[str, ...] = ("full", "top", "none", "bitmap")
BITMAP_MODES: tuple[str, ...] = ("on-success", "always", "never")  # QEMU's BitmapSyncMode
BACKUP_FORMATS: tuple[str, ...] = ("qcow2", "raw")
# how a mirror (copy, active commit) treats guest writes (QEMU's MirrorCopyMode)
BACKGROUND, WRITE_BLOCKING = "background", "write-blocking"
COPY_MODES: tuple[str, ...] = (BACKGROUND, WRITE_BLOCKING)


class CommandError(ChainfsError):
    """A control-file write that cannot be carried out, with the errno ``write(2)`` returns."""

    errno = errno.EINVAL

    def __init__(self, errno_: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno_
        self.reason = reason


@dataclass(frozen=True)
class SnapshotCmd:
    target: str


@dataclass(frozen=True)
class StreamCmd:
    base: str | None = None
    node: str | None = None
    speed: int = 0


@dataclass(frozen=True)
class CommitCmd:
    top: str | None = None
    base: str | None = None
    speed: int = 0
    wait_ready: bool = False
    copy_mode: str | None = None  # None: not given (background for an active commit)


@dataclass(frozen=True)
class CopyCmd:
    dest: str
    sync: str = "full"
    speed: int = 0
    wait_ready: bool = False
    copy_mode: str = BACKGROUND


@dataclass(frozen=True)
class BackupCmd:
    dest: str
    sync: str = "full"
    speed: int = 0
    format: str = "qcow2"
    compress: bool = False
    bitmap: str | None = None  # sync=bitmap: the persistent dirty bitmap that says what
    bitmap_mode: str = "on-success"  # when the bitmap restarts (QEMU's bitmap-mode)
    base: str | None = None  # sync=bitmap: DEST's backing file (the previous backup)


@dataclass(frozen=True)
class VerbCmd:
    """A verb applied to a running job: ``KIND JOB``."""

    job: str


class CancelCmd(VerbCmd):
    """``cancel JOB``: QEMU's ``block-job-cancel``."""


class CompleteCmd(VerbCmd):
    """``complete JOB``: QEMU's ``block-job-complete``."""


class PauseCmd(VerbCmd):
    """``pause JOB``: QEMU's ``job-pause``."""


class ResumeCmd(VerbCmd):
    """``resume JOB``: QEMU's ``job-resume``."""


@dataclass(frozen=True)
class SpeedCmd(VerbCmd):
    """``speed JOB RATE``: QEMU's ``block-job-set-speed``."""

    speed: int


@dataclass(frozen=True)
class ChangeCmd(VerbCmd):
    """``change JOB copy-mode=write-blocking``: QEMU's ``block-job-change``."""

    copy_mode: str


@dataclass(frozen=True)
class HostCmd:
    """``adopt``, ``inactivate`` or ``activate``, naming the chain it is written for (a
    stray write moves no chain); ``adopt`` also takes ``timeout=SECONDS``, how long to
    wait for the owner's lock."""

    kind: str
    chain: str
    timeout: float | None = None


BITMAP_ACTIONS: tuple[str, ...] = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass(frozen=True)
class BitmapCmd:
    """A persistent dirty bitmap command (QEMU's ``block-dirty-bitmap-*``): ``names`` is
    the bitmap (merge: the target, then the sources)."""

    action: str
    names: tuple[str, ...]
    granularity: int | None = None
    disabled: bool = False


Command: TypeAlias = (
    SnapshotCmd
    | StreamCmd
    | CommitCmd
    | CopyCmd
    | BackupCmd
    | CancelCmd
    | CompleteCmd
    | SpeedCmd
    | PauseCmd
    | ResumeCmd
    | ChangeCmd
    | BitmapCmd
    | HostCmd
)

# Per command: the keys it accepts, and what its bare word is called (None: it takes none).
_KEYS: dict[str, frozenset[str]] = {
    "snapshot": frozenset(),
    "stream": frozenset({"base", "node", "speed"}),
    "commit": frozenset({"top", "base", "speed", "wait", "copy-mode"}),
    "copy": frozenset({"sync", "speed", "wait", "copy-mode"}),
    "backup": frozenset({"sync", "speed", "format", "compress", "bitmap", "bitmap-mode", "base"}),
    "cancel": frozenset(),
    "complete": frozenset(),
    "speed": frozenset(),
    "pause": frozenset(),
    "resume": frozenset(),
    "change": frozenset({"copy-mode"}),
    "bitmap": frozenset({"granularity"}),
}
_MAIN: dict[str, str | None] = {
    "snapshot": "file",
    "stream": "layer",
    "commit": None,
    "copy": "destination",
    "backup": "destination",
    "cancel": "job",
    "complete": "job",
    "speed": "job",
    "pause": "job",
    "resume": "job",
    "change": "job",
    "bitmap": "action",
}
_REQUIRED = frozenset({"snapshot", "copy", "backup", "bitmap", *JOB_VERBS})

_RATE = re.compile(r"([0-9]{1,30})([kmg]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

_SEPARATORS = " \t"
# Characters that force a value into quotes, besides anything str.isprintable() rejects
# (control and format characters, line separators, lone surrogates from undecodable
# file names): a bare value then never confuses awk, splitlines() or a UTF-8 encoder.
# (A regex, with ``str.isprintable``: one C pass each, not a Python test a character; a
# chain's line of ``.status`` is rendered at every read where the mount does not own it.)
_SPECIAL_RE = re.compile('[ \t\n"\\\\=]')
_ESCAPE_OUT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_ESCAPE_IN = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _invalid(reason: str) -> CommandError:
    return CommandError(errno.EINVAL, reason)


def _show(text: str, limit: int = 60) -> str:
    """``text`` as it appears in a reason: repr'd and cut short, since reasons go to logs."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


# -- key=value lines ---------------------------------------------------------------------


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _escape(char: str) -> str:
    if char in _ESCAPE_OUT:
        return _ESCAPE_OUT[char]
    if char == " " or char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def quote(value: object) -> str:
    """``value`` as it appears after ``key=``: bare when that is unambiguous, else quoted."""
    text = _text(value)
    if text and text.isprintable() and _SPECIAL_RE.search(text) is None:
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


def _check_key(key: str) -> None:
    if not key or not key.isprintable() or _SPECIAL_RE.search(key) is not None:
        raise ValueError(f"bad key {_show(key)}")


def format_line(pairs: Iterable[tuple[str, object]]) -> str:
    """``k1=v1 k2=v2``, without a newline; pairs whose value is None are left out."""
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        _check_key(key)
        parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


class _Token(NamedTuple):
    text: str
    eq: int | None  # index of the first unquoted '=' in text


def _tokenize(line: str) -> list[_Token]:
    """Split ``line`` at unquoted blanks, undoing quotes and escapes; ValueError if malformed."""
    tokens: list[_Token] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in _SEPARATORS:
            i += 1
            continue
        chars: list[str] = []
        eq: int | None = None
        while i < n and line[i] not in _SEPARATORS:
            char = line[i]
            if char == "\\":
                raise ValueError("backslash outside quotes")
            if char != '"':
                if char == "=" and eq is None:
                    eq = len(chars)
                chars.append(char)
                i += 1
                continue
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unbalanced quote")
                char = line[i]
                if char == '"':
                    i += 1
                    break
                if char != "\\":
                    chars.append(char)
                    i += 1
                    continue
                if i + 1 >= n:
                    raise ValueError("unbalanced quote")
                kind = line[i + 1]
                if kind in _ESCAPE_IN:
                    chars.append(_ESCAPE_IN[kind])
                    i += 2
                elif kind in _HEX_ESCAPES:
                    digits = line[i + 2 : i + 2 + _HEX_ESCAPES[kind]]
                    if len(digits) != _HEX_ESCAPES[kind] or not all(
                        d in "0123456789abcdefABCDEF" for d in digits
                    ):
                        raise ValueError(f"bad escape {_show(line[i : i + 2 + len(digits)])}")
                    code = int(digits, 16)
                    if code > 0x10FFFF:
                        raise ValueError(f"bad escape {_show(line[i : i + 10])}")
                    chars.append(chr(code))
                    i += 2 + len(digits)
                else:
                    raise ValueError(f"unknown escape {_show(line[i : i + 2])} in quotes")
        tokens.append(_Token("".join(chars), eq))
    return tokens


def _strip_newline(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def parse_line(line: str) -> dict[str, str]:
    """The pairs of a ``format_line`` line; ValueError if it is not one."""
    result: dict[str, str] = {}
    for token in _tokenize(_strip_newline(line)):
        if token.eq is None:
            raise ValueError(f"expected key=value, got {_show(token.text)}")
        key, value = token.text[: token.eq], token.text[token.eq + 1 :]
        if not key:
            raise ValueError(f"missing key before '=' in {_show(token.text)}")
        if key in result:
            raise ValueError(f"repeated key {_show(key)}")
        result[key] = value
    return result


# -- commands ----------------------------------------------------------------------------


def _parse_rate(text: str, what: str) -> int:
    match = _RATE.fullmatch(text)
    if match is None:
        raise _invalid(f"{what} must be a byte rate like 10M, got {_show(text)}")
    rate = int(match[1]) * _UNITS[match[2].lower()]
    if rate > MAX_RATE:
        raise _invalid(f"{what} {_show(text)} is too large")
    return rate


def parse_rate(text: str) -> int:
    """Bytes per second from ``0``, ``1048576``, ``512K``, ``10M`` or ``1G`` (1024-based)."""
    return _parse_rate(text, "value")


def _decode(data: bytes) -> str:
    if len(data) > MAX_COMMAND:
        raise _invalid("command too long")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("command is not valid utf-8") from None
    for char in text:
        code = ord(char)
        if char != "\t" and (code < 0x20 or 0x7F <= code < 0xA0):
            raise _invalid(f"control character {char!r} in command")
    return text


def _check_value(what: str, value: str) -> None:
    # Escapes can smuggle in what the raw text may not hold; a NUL or an unencodable
    # surrogate would blow up later in os calls instead of failing the write.
    if not value:
        raise _invalid(f"empty {what}")
    if "\x00" in value:
        raise _invalid(f"nul character in {what}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _invalid(f"{what} {_show(value)} is not a valid file name") from None


def parse_command(kind: str, data: bytes) -> Command:
    """The command written to control file ``kind``; CommandError (EINVAL) if it is malformed.

    Only the grammar is checked here: whether layers, files and jobs exist is the caller's.
    """
    if kind in HOST_VERBS:
        return _parse_host(kind, _decode(data))
    if kind not in _KEYS:
        raise _invalid(f"unknown control file {_show(kind)}")
    text = _decode(data)
    if not text.strip(_SEPARATORS):
        if _MAIN[kind] is None or kind not in _REQUIRED:
            # a stray newline must not start a whole-chain job; the defaults are one key away
            raise _invalid(f"empty command; to run {kind} with its defaults write 'speed=0'")
        raise _invalid("empty command")
    try:
        tokens = _tokenize(text)
    except ValueError as exc:
        raise _invalid(str(exc)) from None

    bare: list[str] = []
    keys: dict[str, str] = {}
    for token in tokens:
        if token.eq is None:
            bare.append(token.text)
            continue
        key, value = token.text[: token.eq], token.text[token.eq + 1 :]
        if not key:
            raise _invalid(f"missing key before '=' in {_show(token.text)}")
        if key not in _KEYS[kind]:
            raise _invalid(f"unknown key {_show(key)} for {kind}")
        if key in keys:
            raise _invalid(f"repeated key {_show(key)}")
        if not value:
            raise _invalid(f"empty value for {_show(key)}")
        _check_value(f"value for {key!r}", value)
        keys[key] = value

    name = _MAIN[kind]
    main: str | None = None
    if kind == "speed":
        # two bare words, as QEMU's block_job_set_speed DEVICE SPEED
        if len(bare) != 2:
            raise _invalid(f"speed takes a job and a rate, got {len(bare)} words")
        _check_value("job", bare[0])
        return SpeedCmd(job=bare[0], speed=_parse_rate(bare[1], "rate"))
    if kind == "bitmap":
        return _bitmap_command(bare, keys)
    if name is None:
        if bare:
            raise _invalid(f"{kind} takes no bare argument, got {_show(bare[0])}")
    elif len(bare) > 1:
        raise _invalid(f"{kind} takes one {name}, got {_show(bare[0])} and {_show(bare[1])}")
    elif bare:
        main = bare[0]
        _check_value(name, main)
    elif kind in _REQUIRED:
        raise _invalid(f"{kind} needs a {name}")

    speed = _parse_rate(keys["speed"], "speed") if "speed" in keys else 0
    wait = keys.get("wait")
    if wait is not None and wait != "ready":
        raise _invalid(f"wait only accepts 'ready', got {_show(wait)}")
    wait_ready = wait is not None
    copy_mode = keys.get("copy-mode")
    if copy_mode is not None and copy_mode not in COPY_MODES:
        raise _invalid(
            f"copy-mode must be 'background' or 'write-blocking', got {_show(copy_mode)}"
        )

    if kind == "snapshot":
        assert main is not None
        return SnapshotCmd(target=main)
    if kind == "stream":
        if main is not None and "base" in keys:
            raise _invalid(f"stream base given twice: {_show(main)} and base={_show(keys['base'])}")
        base = main if main is not None else keys.get("base")
        return StreamCmd(base=base, node=keys.get("node"), speed=speed)
    if kind == "commit":
        return CommitCmd(
            top=keys.get("top"),
            base=keys.get("base"),
            speed=speed,
            wait_ready=wait_ready,
            copy_mode=copy_mode,
        )
    if kind == "copy":
        assert main is not None
        sync = keys.get("sync", "full")
        if sync not in SYNC_MODES:
            raise _invalid(f"sync must be 'full' or 'top', got {_show(sync)}")
        return CopyCmd(
            dest=main,
            sync=sync,
            speed=speed,
            wait_ready=wait_ready,
            copy_mode=copy_mode or BACKGROUND,
        )
    if kind == "backup":
        assert main is not None
        sync = keys.get("sync", "full")
        if sync not in BACKUP_SYNC_MODES:
            raise _invalid(f"sync must be 'full', 'top', 'none' or 'bitmap', got {_show(sync)}")
        fmt = keys.get("format", "qcow2")
        if fmt not in BACKUP_FORMATS:
            raise _invalid(f"format must be 'qcow2' or 'raw', got {_show(fmt)}")
        compress = keys.get("compress", "off")
        if compress not in ("on", "off"):
            raise _invalid(f"compress must be 'on' or 'off', got {_show(compress)}")
        bitmap, mode = keys.get("bitmap"), keys.get("bitmap-mode")
        if sync == "bitmap" and not bitmap:
            raise _invalid("sync=bitmap needs bitmap=NAME")
        if sync != "bitmap":
            for key in ("bitmap", "bitmap-mode", "base"):
                if key in keys:
                    raise _invalid(f"{key}= needs sync=bitmap")
        if mode is not None and mode not in BITMAP_MODES:
            raise _invalid(
                f"bitmap-mode must be 'on-success', 'always' or 'never', got {_show(mode)}"
            )
        return BackupCmd(
            dest=main,
            sync=sync,
            speed=speed,
            format=fmt,
            compress=compress == "on",
            bitmap=bitmap,
            bitmap_mode=mode or "on-success",
            base=keys.get("base"),
        )
    assert main is not None
    if kind == "cancel":
        return CancelCmd(job=main)
    if kind == "pause":
        return PauseCmd(job=main)
    if kind == "resume":
        return ResumeCmd(job=main)
    if kind == "change":
        if copy_mode is None:
            # the only option a job has to change, as QEMU's block-job-change for a mirror
            raise _invalid("change needs copy-mode=write-blocking")
        return ChangeCmd(job=main, copy_mode=copy_mode)
    return CompleteCmd(job=main)


def _parse_host(kind: str, text: str) -> HostCmd:
    if not text.strip(_SEPARATORS):
        raise _invalid(f"empty command; write the chain's name to {kind} it")
    try:
        tokens = _tokenize(text)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    timeout: float | None = None
    words = [t.text for t in tokens if t.eq is None]
    if len(words) != 1:
        raise _invalid(f"{kind} takes one word, the chain's name, got {len(words)}")
    _check_value("chain", words[0])
    for token in tokens:
        if token.eq is None:
            continue
        key, value = token.text[: token.eq], token.text[token.eq + 1 :]
        if kind != "adopt" or key != "timeout":
            raise _invalid(f"unknown key {_show(key)} for {kind}")
        if timeout is not None:
            raise _invalid("repeated key 'timeout'")
        if not value.isdigit() or len(value) > 9:
            raise _invalid(f"timeout must be a number of seconds, got {_show(value)}")
        timeout = float(value)
    return HostCmd(kind=kind, chain=words[0], timeout=timeout)


def _bitmap_command(bare: list[str], keys: dict[str, str]) -> BitmapCmd:
    """``add NAME [granularity=SIZE] [disabled]``, ``remove|clear|enable|disable NAME``,
    ``merge TARGET SOURCE...``."""
    if not bare or bare[0] not in BITMAP_ACTIONS:
        got = f", got {_show(bare[0])}" if bare else ""
        raise _invalid(f"bitmap needs one of {', '.join(BITMAP_ACTIONS)}{got}")
    action, names = bare[0], bare[1:]
    disabled = False
    if action == "add" and names[1:] == ["disabled"]:
        names, disabled = names[:1], True
    if "granularity" in keys and action != "add":
        raise _invalid(f"unknown key 'granularity' for bitmap {action}")
    if not names:
        raise _invalid(f"bitmap {action} needs a bitmap name")
    if action == "merge":
        if len(names) < 2:
            raise _invalid("bitmap merge needs a target and at least one source")
    elif len(names) > 1:
        raise _invalid(
            f"bitmap {action} takes one name, got {_show(names[0])} and {_show(names[1])}"
        )
    for n in names:
        _check_value("bitmap name", n)
    granularity = _parse_rate(keys["granularity"], "granularity") if "granularity" in keys else None
    return BitmapCmd(action, tuple(names), granularity, disabled)
