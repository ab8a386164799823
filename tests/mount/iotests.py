"""What the ports of qemu-iotests 030 and 040 share: their images, made the way the
iotests make them, and their verdicts, taken from ``qemu-io`` and ``qemu-img``.

The iotests name their files ``backing.img``, ``mid.img`` and ``test.img`` (qcow2 but
for the raw backing file); so do the ports, so the chain is called ``test.img`` and its
flat file is ``test.img.img``.  Backing strings are relative names, as a directory
source wants them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .conftest import Mount, run

KiB, MiB = 1024, 1024 * 1024
CHAIN = "test.img"


def create_image(path: Path, size: int) -> None:
    """``iotests.create_image``: a raw file whose every sector starts and ends with its
    own index (big-endian), so misplaced sectors show."""
    sector = struct.Struct(">l504xl")
    with open(path, "wb") as f:
        f.write(b"".join(sector.pack(i, i) for i in range(size // 512)))


def qemu_img(*args: str | Path, cwd: Path | None = None) -> str:
    return run("qemu-img", *args, cwd=cwd).stdout


def overlay(path: Path, backing: str, backing_fmt: str, size: int | None = None) -> None:
    """``qemu-img create -f qcow2 -b BACKING -F FMT``, the string stored as given."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt]
    args.append(path.name)
    if size is not None:
        args.append(str(size))
    qemu_img(*args, cwd=path.parent)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    """Run ``qemu-io`` commands (read-only unless one writes); fail on any failure."""
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    if not any(c.split()[0] in ("write", "discard") for c in commands):
        args += ["-r"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, path).stdout
    assert "verification failed" not in out and "failed" not in out.lower(), out
    return out


def io_map(path: Path, fmt: str = "qcow2") -> str:
    """``qemu-io -c map``: the allocation map the iotests compare."""
    return run("qemu-io", "-f", fmt, "-r", "-U", "-c", "map", path).stdout


def backing_of(path: Path) -> tuple[str | None, str | None]:
    """(backing string, backing format) as ``qemu-img info`` reads them."""
    info = json.loads(qemu_img("info", "--output=json", path))
    return info.get("backing-filename"), info.get("backing-filename-format")


def chain_of(path: Path) -> list[str]:
    """The file names of ``path``'s chain as ``qemu-img info --backing-chain`` finds it."""
    info = json.loads(qemu_img("info", "--backing-chain", "--output=json", path))
    return [Path(x["filename"]).name for x in info]


def check(path: Path) -> None:
    """``qemu-img check`` finds nothing wrong (no corruption, no leak)."""
    run("qemu-img", "check", "-q", path)


def compare(path: Path, other: Path, other_fmt: str = "raw") -> None:
    """``qemu-img compare``: the chain of ``path`` shows what ``other`` holds."""
    run("qemu-img", "compare", "-F", other_fmt, path, other)


def job_events(m: Mount, job: str) -> list[str]:
    return [e["event"] for e in m.events(CHAIN) if e.get("job") == job]
