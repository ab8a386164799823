"""PEP 517 build backend: pyfuse3 3.5.0 from its PyPI sdist, with the patches in PATCHES.

`pip install ./third_party/pyfuse3` (or `pip wheel`) runs this. It takes the pinned sdist
(from $CHAINFS_PYFUSE3_SDIST when set, else from the download cache next to this file,
else from PyPI into that cache), checks its sha256, unpacks it into a temporary
directory, applies the patches in order, removes the C file Cython generated for the unpatched
sources, and hands the tree to pyfuse3's own build backend (util/build_backend.py), which
cythonizes and compiles it against the system's libfuse 3. The wheel is `pyfuse3` with
the version `3.5.0+chainfs.N`.

When a patch changes (or one is added), bump LOCAL, so that scripts/setup reinstalls it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UPSTREAM = "3.5.0"
LOCAL = "chainfs.5"
VERSION = f"{UPSTREAM}+{LOCAL}"
SDIST = f"pyfuse3-{UPSTREAM}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/b9/a9/"
    f"ce2c0513e9611ee2ffeeb482a33d23a210326801d48866df30a989562d43/{SDIST}"
)
SDIST_ENV = "CHAINFS_PYFUSE3_SDIST"

HERE = Path(__file__).resolve().parent
# applied in this order, each against the tree the ones before it left
PATCHES = [
    HERE / "lseek-fallocate.patch",
    HERE / "nonblocking-receive.patch",
    HERE / "read-map.patch",
    HERE / "busy-poll.patch",
    HERE / "write-map.patch",
]
CACHE = HERE / "downloads" / SDIST


def _say(msg: str) -> None:
    print(f"pyfuse3 {VERSION}: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path) -> Path:
    got = _sha256(path)
    if got != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {got}, expected {SDIST_SHA256} for {SDIST}")
    return path


def _download(dest: Path) -> Path:
    _say(f"downloading {SDIST_URL}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(SDIST_URL, timeout=120) as r, part.open("wb") as f:
        while block := r.read(1 << 20):
            f.write(block)
    try:
        _verified(part)
    except RuntimeError:
        part.unlink()
        raise
    part.replace(dest)
    return dest


def _sdist(workdir: Path) -> Path:
    named = os.environ.get(SDIST_ENV)
    if named:
        _say(f"using {named} (from ${SDIST_ENV})")
        return _verified(Path(named))
    if CACHE.exists():
        try:
            return _verified(CACHE)
        except RuntimeError as e:
            _say(f"{e}; downloading it again")
            CACHE.unlink()
    try:
        return _download(CACHE)
    except PermissionError:  # a read-only checkout: keep it with the build only
        return _download(workdir / SDIST)


def _lines(text: str) -> list[str]:
    """Lines with their newlines, split at \\n only (str.splitlines also splits at \\f)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


_HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def apply_patch(patch: str, root: Path) -> list[str]:
    """Apply a git-format patch that only changes existing text files, exactly.

    No fuzz: every hunk must match the pinned tree where it says (the sdist is pinned by
    its hash, so anything else is a wrong tree). Returns the changed paths.
    """
    files: list[tuple[str, list[tuple[int, list[str], list[str]]]]] = []
    old_left = new_left = 0  # lines of the current hunk still to read
    for line in _lines(patch):
        if old_left or new_left:
            kind, text = (line[:1], line[1:]) if line != "\n" else (" ", "\n")
            if kind not in " -+":
                raise ValueError(f"bad hunk line: {line.rstrip()}")
            _, old, new = files[-1][1][-1]
            if kind != "+":
                old.append(text)
                old_left -= 1
            if kind != "-":
                new.append(text)
                new_left -= 1
        elif line.startswith("diff --git "):
            files.append((line.split()[2].removeprefix("a/"), []))
        elif line.startswith(("new file", "deleted file", "rename ", "Binary files", "\\")):
            raise ValueError(f"unsupported patch line: {line.rstrip()}")
        elif m := _HUNK.match(line):
            old_left = int(m.group(2) or 1)
            new_left = int(m.group(4) or 1)
            files[-1][1].append((int(m.group(1)), [], []))
        # anything else: the message, file headers, the trailer
    for name, hunks in files:
        path = root / name
        with path.open(encoding="utf-8", newline="") as f:
            lines = _lines(f.read())
        shift = 0
        for start, old, new in hunks:
            at = start - 1 + shift if old else start + shift
            if lines[at : at + len(old)] != old:
                raise ValueError(f"{name}: hunk at line {start} does not match")
            lines[at : at + len(old)] = new
            shift += len(new) - len(old)
        with path.open("w", encoding="utf-8", newline="") as f:
            f.write("".join(lines))
    return [name for name, _ in files]


def _prepare(workdir: Path) -> Path:
    sdist = _sdist(workdir)
    with tarfile.open(sdist) as tar:
        # the sdist's sha256 was checked, so its members are known; the "data" filter
        # came with Python 3.11.4 (Debian 12 has 3.11.2)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(workdir, filter="data")
        else:
            tar.extractall(workdir)
    tree = workdir / f"pyfuse3-{UPSTREAM}"
    for patch in PATCHES:
        changed = apply_patch(patch.read_text(encoding="utf-8"), tree)
        _say(f"applied {patch.name} to {len(changed)} files")
    # The sdist ships the C that Cython made from the unpatched .pyx; without it, the
    # build cythonizes the patched sources.
    (tree / "src" / "pyfuse3" / "__init__.c").unlink()
    return tree


@contextlib.contextmanager
def _upstream_backend(tree: Path) -> Iterator[Any]:
    """pyfuse3's own backend, run in its tree, building version VERSION."""
    old_cwd = Path.cwd()
    old_env = os.environ.get("SETUPTOOLS_SCM_PRETEND_VERSION")
    spec = importlib.util.spec_from_file_location(
        "pyfuse3_upstream_build_backend", tree / "util" / "build_backend.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    os.chdir(tree)
    os.environ["SETUPTOOLS_SCM_PRETEND_VERSION"] = VERSION
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            del os.environ["SETUPTOOLS_SCM_PRETEND_VERSION"]
        else:
            os.environ["SETUPTOOLS_SCM_PRETEND_VERSION"] = old_env


# -- PEP 517 hooks ------------------------------------------------------------------------


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return []  # pyproject.toml's build-system.requires: those of pyfuse3's own backend


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    wheel_directory = os.path.abspath(wheel_directory)
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build-") as tmp:
        tree = _prepare(Path(tmp))
        with _upstream_backend(tree) as backend:
            name: str = backend.build_wheel(wheel_directory, config_settings)
    _say(f"built {name}")
    return name
