"""The example command lines of README.md and the man page, as the tests find them.

The convention (README's "Tests" section says it for writers of examples):

- An *example block* is a code block: in README.md an indented block (four spaces, or
  four more than the list item it sits in) after a blank line; in ``chainfs/chainfs.1``
  the lines between ``.EX`` and ``.EE`` (roff escapes ``\\-`` and ``\\(aq`` undone).
- In a block with ``$ `` prompts, the prompted lines are the commands and the lines after
  each are its output (an output line starting with ``chainfs: `` or ``bash: `` says the
  command fails).  In a block without prompts, a line is a command when its first word
  is a program of ``PROGRAMS`` or a path starting with ``./`` or ``/`` that ends in one
  of them; every other line (file contents, listings, output) is not.
- ``unknown_programs`` names the first words of other lines that are programs on this
  machine: an example with a program the list lacks fails the tests until it is added.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAN = ROOT / "chainfs" / "chainfs.1"

# the programs examples run; add one here when an example uses it
PROGRAMS = frozenset(
    {
        "apt-get",
        "awk",
        "cat",
        "chainfs",
        "cmp",
        "cp",
        "dd",
        "demo",
        "echo",
        "fusermount3",
        "grep",
        "head",
        "ln",
        "losetup",
        "man",
        "mkdir",
        "mount",
        "pip",
        "printf",
        "python3",
        "qemu-img",
        "qemu-io",
        "soak",
        "systemctl",
        "systemd-analyze",
        "tail",
        "test",
        "bench",
        "umount",
    }
)
# first words of lines that are not commands although a program of that name exists
NOT_PROGRAMS = frozenset({"job", "jobs", "cancel", "chain", "events", "E", "refused:"})
FAILS = ("chainfs: ", "bash: ")  # output lines of a command that fails


@dataclass
class Command:
    """One example command line: where it is, its text, and whether it must succeed."""

    doc: str  # "README.md" or "chainfs.1"
    line: int
    text: str
    fails: bool = False

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass
class Block:
    doc: str
    line: int
    lines: list[tuple[int, str]]
    commands: list[Command] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def text(self) -> str:
        return "\n".join(x for _, x in self.lines)


def _readme_blocks(text: str) -> list[Block]:
    raw: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    previous_blank = True
    for n, line in enumerate(text.splitlines(), 1):
        if current is not None:
            if line.startswith("    ") or not line.strip():
                current.append((n, line))
                continue
            raw.append(current)
            current = None
        if line.startswith("    ") and line.strip() and previous_blank:
            current = [(n, line)]
        previous_blank = not line.strip()
    if current is not None:
        raw.append(current)
    blocks = []
    for lines in raw:
        while not lines[-1][1].strip():
            lines.pop()
        indent = min(len(x) - len(x.lstrip()) for _, x in lines if x.strip())
        blocks.append(Block("README.md", lines[0][0], [(n, x[indent:]) for n, x in lines]))
    return blocks


def _unroff(line: str) -> str:
    return line.replace("\\-", "-").replace("\\(aq", "'").replace("\\(rs", "\\")


def _man_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    current: list[tuple[int, str]] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() == ".EX":
            current = []
        elif line.strip() == ".EE" and current is not None:
            if current:
                blocks.append(Block("chainfs.1", current[0][0], current))
            current = None
        elif current is not None:
            current.append((n, _unroff(line)))
    return blocks


def first_word(text: str) -> str:
    return text.split(maxsplit=1)[0] if text.strip() else ""


def is_program(word: str) -> bool:
    name = word.rsplit("/", 1)[-1] if word.startswith(("./", "/", ".venv/")) else word
    return name in PROGRAMS


def _commands(block: Block) -> list[Command]:
    prompted = any(x.startswith("$ ") for _, x in block.lines)
    out: list[Command] = []
    for n, x in block.lines:
        if prompted:
            if x.startswith("$ "):
                out.append(Command(block.doc, n, x[2:].strip()))
            elif out and x.startswith(FAILS):
                out[-1].fails = True
        elif is_program(first_word(x)):
            out.append(Command(block.doc, n, x.strip()))
    return out


def blocks() -> list[Block]:
    """Every example block of README.md and the man page, each with its commands."""
    found = _readme_blocks(README.read_text()) + _man_blocks(MAN.read_text())
    for b in found:
        b.commands = _commands(b)
    return found


def section(title: str) -> list[Block]:
    """The README's example blocks under the heading ``title`` (up to the next one)."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    first = text.count("\n", 0, start) + 2
    last = text.count("\n", 0, end if end >= 0 else len(text)) + 1
    return [b for b in blocks() if b.doc == "README.md" and first <= b.line <= last]


def unknown_programs() -> list[str]:
    """Lines whose first word is a program on this machine that PROGRAMS does not list
    (so that an example with a new program cannot pass unnoticed)."""
    out = []
    for b in blocks():
        prompted = any(x.startswith("$ ") for _, x in b.lines)
        for n, x in b.lines:
            if prompted and not x.startswith("$ "):
                continue
            word = first_word(x.removeprefix("$ "))
            if not word or word in NOT_PROGRAMS or is_program(word) or word.startswith("#"):
                continue
            if re.fullmatch(r"[\w.+-]+", word) and shutil.which(word) is not None:
                out.append(f"{b.doc}:{n}: {x.strip()}")
    return out
