"""The shape of the job model, checked: the package has no import cycle (type-checking
imports included), and a stream command goes from the served chain (``disk.py``) to its
job module and stays there: from the write of the command to the re-pointed backing
file, the served-chain module is entered at most twice.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import chainfs
import chainfs.disk

from . import images as im
from .test_commit_copy import backing_string, run_job, serve

PACKAGE = Path(chainfs.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (relative imports, at any level of
    the file, ``if TYPE_CHECKING:`` blocks included)."""
    names = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for p in PACKAGE.rglob("*.py"):
        mod = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = mod.removesuffix(".__init__") if p.name == "__init__.py" else mod
        here = package.split(".") if p.name == "__init__.py" else package.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = here[: len(here) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & names
            if node.module is None and subs:
                edges |= subs  # ``from . import header``: the submodule
            else:
                edges |= {target} | subs
        graph[mod.removesuffix(".__init__")] = edges & names - {package}
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "chainfs.disk" in graph and "chainfs.jobs.stream" in graph
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            cycle = path[path.index(mod) :] + [mod]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if mod in done:
            return
        for dep in sorted(graph.get(mod, ())):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])


async def test_a_stream_enters_the_served_chain_module_at_most_twice(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    a, e = d / "A.qcow2", d / "E.qcow2"
    im.create(str(a), 4 * im.MiB)
    im.write(str(a), [(0, 4 * im.MiB, 0x11)])
    im.create(str(b := d / "B.qcow2"), backing="A.qcow2", cwd=str(d))
    im.write(str(b), [(im.MiB, im.MiB, 0x22)])
    im.create(str(e), backing="B.qcow2", cwd=str(d))
    served_module = chainfs.disk.__file__
    entries = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal entries
        if event == "call" and frame.f_code.co_filename == served_module:
            caller = frame.f_back
            if caller is None or caller.f_code.co_filename != served_module:
                entries += 1

    async with serve(d) as disk:
        sys.setprofile(profile)
        try:
            end = await run_job(disk, "stream", "base=A.qcow2")
        finally:
            sys.setprofile(None)
        assert "error" not in end, end
    assert backing_string(e) == "A.qcow2"
    # the command itself, and nothing else: the job, its events and its prepare never
    # call back into the served chain's module
    assert 1 <= entries <= 2, entries
