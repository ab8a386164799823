"""A chain read on the host that does not own it (issue 21, item 7), in the lab: while a
reader holds host B's flat file of chain x open, x's backing layers carry QEMU's reader
locks on the server, so host A's commit into one is refused in QEMU's words; and B
follows what A does to x (NFS is close-to-open: B sees A's writes only through a fresh
open or a lock), serving A's writes and snapshot within a few heartbeats.
"""

from __future__ import annotations

import shlex

import pytest
from lab.lab import Lab

from .conftest import ChainfsMount, KiB, MiB, Model, Site, wait_for
from .test_nfs_hosts import SIZE, event_after


def completed_or_failed(m: ChainfsMount, before: int) -> dict[str, str]:
    return wait_for(lambda: event_after(m, "x", before, "JOB_COMPLETED"), "the commit's end")


READING = "/run/reading-x"  # made once the reader holds the flat file open


@pytest.mark.slow
def test_a_chain_read_on_the_other_host_locks_its_bases_and_follows_the_owner(
    lab: Lab, site: Site
) -> None:
    model = Model(SIZE)
    names = site.make_chain("x", 3, SIZE, model)
    a = site.mount("a")
    b = site.mount("b")
    b.sh(f"rm -f {READING}")
    img = shlex.quote(b.img("x"))
    reader = lab.spawn("b", ["sh", "-c", f"exec 3<{img}; touch {READING}; exec sleep 600"])
    try:
        wait_for(lambda: b.sh(f"test -e {READING}", check=False).rc == 0, "the reader")
        before = len(a.events("x"))
        a.command("x", "commit", f"top={names[1]} base={names[0]}")
        end = completed_or_failed(a, before)
        assert 'Failed to get "write" lock' in end.get("error", ""), end
    finally:
        lab.signal(reader, "SIGKILL")
        lab.wait(reader)

    # the reader gone (its handle released after it died: the kernel's own time), the
    # commit goes
    def committed() -> bool:
        before = len(a.events("x"))
        a.command("x", "commit", f"top={names[1]} base={names[0]}")
        end = completed_or_failed(a, before)
        assert "error" not in end or "lock" in end["error"], end
        return "error" not in end

    wait_for(committed, "the commit to go once the reader on B is gone")
    # A writes, snapshots, writes: B serves it so
    a.write("x", model, 1 * MiB, 64 * KiB, 0xC1)
    a.command("x", "snapshot", "x-s.qcow2")
    a.write("x", model, 3 * MiB, 64 * KiB, 0xC3)
    wait_for(
        lambda: b.lines("x", "chain")[0]["name"] == "x-s.qcow2" and b.digest("x") == model.digest(),
        "host B to serve x as host A wrote it",
    )
    a.unmount()
    b.unmount()
    site.check_images(["x-s.qcow2", "x.qcow2", names[0]])
    assert site.digest("x-s.qcow2") == model.digest()
