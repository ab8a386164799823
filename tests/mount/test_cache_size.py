"""``-o cache_size=``: the mount's one metadata cache, at sizes that evict all the time.

With no cache at all (``0``) and with one smaller than a single L2 table (``16K``), a
guest writes through the flat file while an intermediate commit rewrites ``B``'s tables
(a layer reopened read-write by the job, then read-only again): the flat file equals the
writer's model throughout, ``qemu-img check`` passes every image after unmounting and
QEMU reads the same content.  A size that is not one is refused at mount.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Mounter, Seeds, Writer, assert_clean, assert_content, assert_flat
from .test_cli_daemon import chainfs


@pytest.mark.parametrize("size", ["0", "16K"])
def test_commit_and_guest_writes_with_a_tiny_cache(
    tmp_path: Path, mounter: Mounter, seeds: Seeds, size: str
) -> None:
    seed = seeds(tmp_path / "images")
    model = bytearray(seed.content)
    m = mounter(tmp_path / "images", f"cache_size={size}")
    writer = Writer(m.img("E"), model, seed=31)
    writer.start()
    try:
        writer.wait_writes(20)
        job = m.start_job("E", "commit", "top=D.qcow2 base=B.qcow2")
        end = m.wait_job("E", job)
        writer.wait_writes(20)
    finally:
        writer.stop()
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    assert m.layers("E") == ["E.qcow2", "B.qcow2", "A.qcow2"]
    assert_flat(m.img("E"), model)
    m.unmount()
    assert_clean([p for p in seed.layers if p.exists()])
    assert_content(seed.active, model, tmp_path / "cmp")


def test_a_size_that_is_none_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = chainfs("mount", tmp_path, tmp_path / "mnt", "-o", "cache_size=lots", ok=(1,))
    assert proc.stderr == (
        "chainfs: cache_size=lots: not a size (bytes, or a number with K, M or G)\n"
    )
