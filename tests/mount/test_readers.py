"""A chain served read-only for another mount's writes (issue 21, item 7), on one machine:
two mounts of one source directory are two hosts to each other's locks (``test_hosts``).

- While the flat file is open on the reading mount, the chain's backing layers hold
  QEMU's reader locks (as a read-only ``qemu-img`` takes them): the owner's commit into
  one is refused with QEMU's words, and goes once the reader closed it.
- The reading mount follows the owner: after the owner's writes and a snapshot, then a
  stream, it serves the chain as it now is (its cached qcow2 metadata and layer list
  revalidated every few seconds), and ``status`` marks the chain unstable while the
  owner's job runs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .conftest import CHAINFS, Mount, Mounter, Seeds, read_direct, run, wait_for
from .test_hosts import write

MiB = 1 << 20
SIZE = 16 * MiB


def ended(m: Mount, kind: str, text: str) -> dict[str, str]:
    """Run a job on chain E to its end, failed or not: its last event."""
    return m.wait_job("E", m.start_job("E", kind, text))


def unstable(m: Mount, chain: str) -> str | None:
    [line] = [c for c in m.status() if c.get("chain") == chain]
    assert line["owner"] == "elsewhere", line
    return line.get("unstable")


# the commit into a layer the other mount reads
REFUSED_COMMIT = r"WARNING chainfs\.jobs\.base: job=commit-\d+ failed: Failed to get \"write\" lock"


@pytest.mark.expect_log(REFUSED_COMMIT)
def test_a_chain_another_mount_writes_is_read_under_reader_locks_and_followed(
    tmp_path: Path, mounter: Mounter, seeds: Seeds
) -> None:
    images = tmp_path / "images"
    seed = seeds(images, size=SIZE)
    a = mounter(images)
    b = mounter(images)
    model = bytearray(seed.content)
    rng = random.Random(7)
    # B reads E: its backing layers are under reader locks, so A cannot commit into them
    fd = os.open(b.img("E"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == model[:4096]
        end = ended(a, "commit", "top=D.qcow2 base=B.qcow2")
        assert 'Failed to get "write" lock' in end.get("error", ""), end
        assert a.layers("E") == ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    finally:
        os.close(fd)

    def committed() -> bool:  # (the kernel releases B's handle after close returns)
        end = ended(a, "commit", "top=C.qcow2 base=B.qcow2")
        assert end["event"] == "JOB_COMPLETED", end
        assert "error" not in end or "lock" in end["error"], end
        return "error" not in end

    wait_for(committed, "the commit to go once B closed the flat file")
    wait_for(lambda: a.layers("E") == ["E.qcow2", "D.qcow2", "B.qcow2", "A.qcow2"], "commit")
    # A writes, snapshots, writes: B follows (a fresh look every few seconds)
    write(a, "E", model, rng)
    a.command("E", "snapshot", "S.qcow2")
    write(a, "E", model, rng)
    wait_for(
        lambda: b.layers("E")[0] == "S.qcow2" and read_direct(b.img("E")) == model,
        "B to serve the chain as A wrote it",
    )
    # A's stream: unstable on B while it runs, then B serves the streamed chain
    job = a.start_job("E", "stream", "speed=64K")
    why = wait_for(lambda: unstable(b, "E"), "B to mark the chain unstable")
    assert f"'{job}'" in why and "stream" in why, why
    out = run(*CHAINFS, "status", b.mountpoint).stdout
    assert f"E: unstable: the owner's stream job '{job}' is not finished" in out, out
    a.command("E", "speed", f"{job} 0")
    end = a.wait_job("E", job)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    wait_for(
        lambda: b.layers("E") == ["S.qcow2"] and not unstable(b, "E"),
        "B to follow the stream's end",
    )
    assert read_direct(b.img("E")) == model
    assert read_direct(a.img("E")) == model
    a.unmount()
    b.unmount()
