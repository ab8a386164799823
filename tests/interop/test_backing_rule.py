"""The one backing-string rule (``chainfs.jobs.backing``) that snapshot, stream, commit and
copy share, judged by QEMU: for each case of (the old string relative or absolute) x
(the target beside the node or elsewhere), the string the rule gives is written into a
real overlay, ``qemu-img info`` shows it verbatim, and ``qemu-io`` opening the overlay
reads the target's bytes through it.  Then stream and commit, which used to spell the
same case differently, are run on one chain and give the same string.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chainfs.jobs.backing import backing_string

from . import images as im
from .test_commit_copy import backing_string as written_string
from .test_commit_copy import run_job, serve

MiB = im.MiB

# (node's dir, target's dir, over's dir or None, over's string as "rel"/"abs"/"bare",
#  the string expected: "name", "rel", "abs", or "kept")
CASES = [
    ("d", "d", "d", "rel", "kept"),  # all in one directory: the user's string stays
    ("d", "d", "d", "abs", "kept"),
    ("d2", "d2", "d1", "abs", "name"),  # target beside the node: its file name
    ("d2", "d2", "d1", "rel", "name"),
    ("d3", "d1", "d2", "rel", "rel"),  # a tree of relative strings stays relative
    ("d3", "d1", "d2", "abs", "abs"),
    ("d3", "d1", "d1", "bare", "abs"),  # a bare name said "beside": not from d3
    ("d2", "d2", None, None, "name"),  # snapshot: no overlay yet
    ("d3", "d1", None, None, "abs"),
]


@pytest.mark.parametrize(("node_dir", "target_dir", "over_dir", "old", "want"), CASES)
def test_the_rule_resolves_for_qemu(
    tmp_path: Path,
    node_dir: str,
    target_dir: str,
    over_dir: str | None,
    old: str | None,
    want: str,
) -> None:
    for d in {node_dir, target_dir, over_dir} - {None}:
        (tmp_path / str(d)).mkdir(exist_ok=True)
    target = tmp_path / target_dir / "T.qcow2"
    im.create(str(target), MiB)
    im.write(str(target), [(0, 65536, 0x5A)])
    over: tuple[str, str | None] | None = None
    if over_dir is not None:
        over_path = tmp_path / over_dir / "O.qcow2"
        old_string = {
            "rel": os.path.relpath(target, over_path.parent),
            "abs": str(target),
            "bare": target.name,
        }[str(old)]
        over = (str(over_path), old_string)
    node = tmp_path / node_dir / "N.qcow2"
    string = backing_string(str(node), str(target), over)
    expected = {
        "name": target.name,
        "rel": os.path.relpath(target, node.parent),
        "abs": str(target),
        "kept": over[1] if over else None,
    }[want]
    assert string == expected
    im.create(str(node), backing=string, backing_fmt="qcow2", cwd="/")
    assert im.info(str(node))["backing-filename"] == string
    out = im.qemu_io(str(node), ["read -P 0x5a 0 64k"])
    assert "verification failed" not in out, out


@pytest.mark.parametrize("job", ["stream base=A.raw", "commit top=B.qcow2 base=A.raw"])
async def test_stream_and_commit_spell_the_same_case_alike(tmp_path: Path, job: str) -> None:
    """``A <- B <- E`` with A (raw) and E in one directory, B elsewhere pointing at A by an
    absolute path: both jobs point E at A by its file name (stream used to, commit wrote
    the absolute path)."""
    d, other = tmp_path / "images", tmp_path / "other"
    d.mkdir()
    other.mkdir()
    # a raw base, so that the directory holds one chain, not A as a chain of its own
    a, b, e = d / "A.raw", other / "B.qcow2", d / "E.qcow2"
    im.create(str(a), 4 * MiB, fmt="raw")
    im.write(str(a), [(0, 4 * MiB, 0x11)], fmt="raw")
    im.create(str(b), backing=str(a), backing_fmt="raw")
    im.write(str(b), [(MiB, MiB, 0x22)])
    im.create(str(e), backing=str(b), backing_fmt="qcow2")
    im.write(str(e), [(2 * MiB, 4096, 0x33)])
    want = im.reference(str(e))
    kind, text = job.split(" ", 1)
    async with serve(d, other) as disk:
        end = await run_job(disk, kind, text)
        assert "error" not in end, end
    assert written_string(e) == "A.raw"
    im.assert_clean(str(e))
    im.assert_same_as(str(e), want, str(tmp_path))
