"""Build test images with QEMU's own tools and ask QEMU what a chain contains.

Every image the interop tests feed to chainfs is made by ``qemu-img``/``qemu-io``, and every
verdict comes from them too: ``reference`` is QEMU's reading of a chain (``qemu-img convert
-O raw``), ``check`` is ``qemu-img check``, ``compare`` is ``qemu-img compare``.  Images are
kept to a few MiB so the suite stays fast.  ``Model`` mirrors the writes made to a chain in
a plain bytearray, so a test can state what the disk must contain without asking QEMU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"

KiB = 1024
MiB = 1024 * KiB

QCOW2_MAGIC = b"QFI\xfb"

# incompatible feature bits (QCOW2.md §1.2)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1

# (offset, length, pattern byte); a pattern of None writes zeros (``write -z``)
Write = tuple[int, int, int | None]


def tools_missing() -> list[str]:
    """The QEMU tools these helpers need that are not on PATH."""
    return [tool for tool in (QEMU_IMG, QEMU_IO) if shutil.which(tool) is None]


def run(
    args: Sequence[str], *, cwd: str | None = None, ok: Iterable[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run a tool; fail with its full output unless its exit status is in ``ok``."""
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode not in tuple(ok):
        raise AssertionError(
            f"{shlex.join(args)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
    return proc


def image_format(path: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def create(
    path: str,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    cluster_size: int | None = None,
    compat: str | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    options: Sequence[str] = (),
    unsafe: bool = False,
    cwd: str | None = None,
) -> str:
    """``qemu-img create``; ``size`` None takes the backing file's size.  Returns ``path``.

    A relative ``backing`` is stored verbatim (QEMU resolves it against the new image's
    directory), so chains built here keep relative backing strings.
    """
    opts: list[str] = []
    if fmt == "qcow2":
        if cluster_size is not None:
            opts.append(f"cluster_size={cluster_size}")
        if compat is not None:
            opts.append(f"compat={compat}")
        if refcount_bits is not None:
            opts.append(f"refcount_bits={refcount_bits}")
        if lazy_refcounts:
            opts.append("lazy_refcounts=on")
    opts.extend(options)
    args = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if unsafe:
        args.append("-u")
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(path)
    if size is not None:
        args.append(str(size))
    run(args, cwd=cwd)
    return path


def io_command(w: Write) -> str:
    """The ``qemu-io`` command for one write."""
    offset, length, pattern = w
    if pattern is None:
        return f"write -z {offset} {length}"
    return f"write -P {pattern} {offset} {length}"


def qemu_io(path: str, commands: Sequence[str], *, fmt: str | None = None) -> str:
    """Run many ``qemu-io`` commands in one process (one open of the chain)."""
    if not commands:
        return ""
    args = [QEMU_IO, "-f", fmt or image_format(path)]
    for c in commands:
        args += ["-c", c]
    args.append(path)
    proc = run(args)
    out = proc.stdout + proc.stderr
    # older qemu-io exits 0 even when a command fails; look at what it said as well
    if "failed" in out or "error" in out.lower():
        raise AssertionError(f"{shlex.join(args)} reported an error:\n{out}")
    return proc.stdout


def write(path: str, writes: Iterable[Write], *, fmt: str | None = None) -> None:
    """Apply pattern writes (``write -P``) and zero writes (``write -z``) with qemu-io."""
    qemu_io(path, [io_command(w) for w in writes], fmt=fmt)


def write_compressed(path: str, writes: Iterable[tuple[int, int, int]]) -> None:
    """``write -c -P``: compressed writes; offsets and lengths must be whole clusters."""
    qemu_io(path, [f"write -c -P {p} {o} {n}" for o, n, p in writes], fmt="qcow2")


def make_dirty(path: str, writes: Iterable[Write]) -> None:
    """Write to a lazy_refcounts image and die by SIGKILL, leaving the dirty bit set."""
    args = [QEMU_IO, "-f", "qcow2"]
    for w in writes:
        args += ["-c", io_command(w)]
    args += ["-c", "sigraise 9", path]
    run(args, ok=(-9,))
    if not incompatible_features(path) & INCOMPAT_DIRTY:
        raise AssertionError(f"{path}: qemu-io was killed but the dirty bit is not set")


def convert_compressed(
    src: str, dst: str, *, cluster_size: int = 64 * KiB, options: Sequence[str] = ()
) -> str:
    """``qemu-img convert -c``: a standalone qcow2 copy of ``src`` with compressed clusters."""
    opts = ",".join([f"cluster_size={cluster_size}", *options])
    run([QEMU_IMG, "convert", "-c", "-f", image_format(src), "-O", "qcow2", "-o", opts, src, dst])
    return dst


def reference(path: str) -> bytes:
    """The whole disk as QEMU reads it: ``qemu-img convert -O raw`` of the chain."""
    with tempfile.TemporaryDirectory(prefix="chainfs-ref-") as tmp:
        out = os.path.join(tmp, "ref.raw")
        run([QEMU_IMG, "convert", "-f", image_format(path), "-O", "raw", path, out])
        with open(out, "rb") as f:
            return f.read()


def check(path: str) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit status, report)."""
    proc = run([QEMU_IMG, "check", "--output=json", "-f", "qcow2", path], ok=(0, 1, 2, 3, 63))
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"stdout": proc.stdout, "stderr": proc.stderr}
    return proc.returncode, report


def assert_clean(path: str) -> None:
    """``qemu-img check`` exits 0: no corruption, no leaks, no check errors."""
    rc, report = check(path)
    if rc != 0:
        human = run([QEMU_IMG, "check", "-f", "qcow2", path], ok=range(256))
        raise AssertionError(
            f"qemu-img check {path} exited {rc}: {report}\n{human.stdout}{human.stderr}"
        )


def assert_chain_clean(paths: Iterable[str]) -> None:
    """``assert_clean`` on every qcow2 file among ``paths`` (raw files have nothing to check)."""
    for p in paths:
        if image_format(p) == "qcow2":
            assert_clean(p)


def compare(image: str, raw: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare`` of a chain against a raw file; exit 0 means identical content."""
    return run([QEMU_IMG, "compare", "-f", image_format(image), "-F", "raw", image, raw], ok=(0, 1))


def assert_same_as(image: str, data: bytes, tmpdir: str) -> None:
    """``qemu-img compare`` says the chain at ``image`` holds exactly ``data``."""
    raw = os.path.join(tmpdir, "model.raw")
    with open(raw, "wb") as f:
        f.write(data)
    proc = compare(image, raw)
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img compare {image} vs model: {proc.stdout}{proc.stderr}")


def info(path: str, *, backing_chain: bool = False) -> Any:
    """``qemu-img info --output=json`` (a list of dicts with ``backing_chain``)."""
    args = [QEMU_IMG, "info", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    proc = run([*args, path])
    return json.loads(proc.stdout)


def read_header(path: str, length: int = 112) -> bytes:
    with open(path, "rb") as f:
        return f.read(length)


def patch(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place (header surgery QEMU offers no option for)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def incompatible_features(path: str) -> int:
    return int.from_bytes(read_header(path)[72:80], "big")


def set_incompatible_features(path: str, bits: int) -> None:
    """Rewrite header bytes 72-79 (v3 only)."""
    patch(path, 72, bits.to_bytes(8, "big"))


class Model:
    """The disk as a plain bytearray, fed the same writes as the chain."""

    def __init__(self, size: int, data: bytes | None = None) -> None:
        self.data = bytearray(data if data is not None else bytes(size))
        assert len(self.data) == size

    def apply(self, writes: Iterable[Write]) -> None:
        for offset, length, pattern in writes:
            end = min(offset + length, len(self.data))
            self.data[offset:end] = bytes([pattern or 0]) * (end - offset)

    def put(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def __bytes__(self) -> bytes:
        return bytes(self.data)


def build_chain(
    directory: str,
    layers: Sequence[dict[str, Any]],
    *,
    size: int,
) -> tuple[list[str], Model]:
    """Build a chain bottom-up in ``directory``; return (paths bottom first, model).

    Each layer is a dict: ``name`` (file name), optional ``fmt`` (only the bottom may be
    ``raw``), ``size`` (defaults to ``size``), ``create`` (extra keyword arguments for
    ``create``) and ``writes`` (a list of ``Write``).  Backing strings are the bare names,
    relative to ``directory``.  The model accounts for short layers: a layer shorter than
    the disk reads zeros past its end and hides whatever lies below there.
    """
    paths: list[str] = []
    model = Model(size)
    below: str | None = None
    below_fmt: str | None = None
    for layer in layers:
        name = layer["name"]
        fmt = layer.get("fmt", "qcow2")
        lsize = layer.get("size", size)
        path = os.path.join(directory, name)
        create(
            path,
            lsize,
            fmt=fmt,
            backing=below,
            backing_fmt=below_fmt,
            cwd=directory,
            **layer.get("create", {}),
        )
        # what lies beyond this layer's end reads as zeros through it
        model.data[lsize:] = bytes(max(0, size - lsize))
        writes = layer.get("writes", [])
        write(path, writes, fmt=fmt)
        model.apply(writes)
        paths.append(path)
        below, below_fmt = name, fmt
    return paths, model


def varied_writes(size: int, cluster: int, pattern: int, salt: int = 0) -> list[Write]:
    """A spread of writes for one layer: a whole cluster, a partial cluster, one across a
    cluster boundary, an unaligned multi-cluster range, a bulk range and the disk's tail.

    ``salt`` shifts the unaligned offsets so that layers built with different salts overlap
    each other only partly.
    """

    def at(eighth: int) -> int:
        return (size * eighth // 8) // cluster * cluster

    raw: list[Write] = [
        (at(1), cluster, pattern),
        (at(2) + 100 + salt, max(1, cluster // 3), pattern),
        (at(3) + cluster - 77 - salt, 200, pattern),
        (at(4) + 1 + salt, size // 8 + 3, pattern),
        (at(5) + 1, 2 * cluster + 3, pattern),
        (at(6) + 512 * salt + 5, 4096, pattern),
        (max(0, size - 1000 - salt), 1000 + salt, pattern),
    ]
    return clip(raw, size)


def clip(writes: Iterable[Write], size: int) -> list[Write]:
    """Drop the parts of writes that fall outside a disk of ``size`` bytes."""
    out: list[Write] = []
    for offset, length, pattern in writes:
        offset = max(0, offset)
        length = min(length, size - offset)
        if length > 0:
            out.append((offset, length, pattern))
    return out


def file_digests(paths: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each file, to show that an operation left files untouched."""
    out: dict[str, str] = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def compressed_clusters(path: str) -> int:
    """How many compressed clusters ``qemu-img check`` counts in the image."""
    _, report = check(path)
    return int(report.get("compressed-clusters", 0))


def zero_extents(path: str) -> list[dict[str, Any]]:
    """``qemu-img map`` extents of the top image that read as zeros without data."""
    proc = run([QEMU_IMG, "map", "--output=json", "-f", image_format(path), path])
    extents: list[dict[str, Any]] = json.loads(proc.stdout)
    return [e for e in extents if e.get("zero") and not e.get("data") and e.get("depth") == 0]
