"""third_party/pyfuse3's patch applier: git-format patches applied exactly (no fuzz,
newlines kept), and a tree that is not the one the patch was made against refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
Subject: [PATCH] example

-- a line of the message that looks like a removal
---
 a.txt | 3 ++-
 1 file changed, 2 insertions(+), 1 deletion(-)

diff --git a/a.txt b/a.txt
index 1111111..2222222 100644
--- a/a.txt
+++ b/a.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
@@ -6,2 +6,3 @@ five
 six
 seven
+eight
diff --git a/sub/b.txt b/sub/b.txt
index 3333333..4444444 100644
--- a/sub/b.txt
+++ b/sub/b.txt
@@ -1 +1 @@
-crlf\r
+CRLF\r
--\x20
2.39.0
"""


def backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_patched", ROOT / "third_party" / "pyfuse3" / "build_patched.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree(root: Path, two: str = "two") -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(f"one\n{two}\nthree\nfour\nfive\nsix\nseven\n")
    (root / "sub" / "b.txt").write_bytes(b"crlf\r\n")
    return root


def test_applies_exactly(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    assert backend().apply_patch(PATCH, root) == ["a.txt", "sub/b.txt"]
    assert (root / "a.txt").read_text() == "one\nTWO\nthree\nfour\nfive\nsix\nseven\neight\n"
    assert (root / "sub" / "b.txt").read_bytes() == b"CRLF\r\n"


def test_refuses_another_tree(tmp_path: Path) -> None:
    root = tree(tmp_path / "t", two="deux")
    with pytest.raises(ValueError, match=r"a\.txt: hunk at line 1 does not match"):
        backend().apply_patch(PATCH, root)


def test_the_pinned_patches_are_ones_the_applier_reads(tmp_path: Path) -> None:
    # only changes to existing files, parsed to the end: what stops each here is the
    # missing pyfuse3 tree, at its first file
    b = backend()
    assert [p.name for p in b.PATCHES] == [
        "lseek-fallocate.patch",
        "nonblocking-receive.patch",
        "read-map.patch",
        "busy-poll.patch",
        "write-map.patch",
    ]
    for patch in b.PATCHES:
        with pytest.raises(FileNotFoundError, match=r"Changes\.rst"):
            b.apply_patch(patch.read_text(), tmp_path)
