"""No false fail-over, second half (issue 21's "Done when"): the NFS server restarted in
the middle of a job.  Its NFSv4 state is gone; the server comes back in its grace period,
during which the clients reclaim their opens and locks (chainfs's OFD locks among them)
and nothing new is granted.  The owner's job waits through it (its writes, and the
heartbeat, block while the client recovers; a heartbeat late by half the lease only
suspends the chain) and goes on; the other host, serving the chain read-only, never
takes it; the content is exact and every image ``qemu-img check`` clean.
"""

from __future__ import annotations

import pytest
from lab.lab import Lab

from .conftest import KiB, MiB, Model, Site
from .test_nfs_hosts import LEASED, SIZE, completed, event_after, status_of

# the guest's server, as its init starts it (tests/lab/guest-init): stopping every nfsd
# thread ends the server and forgets its NFSv4 state; started again, it is in grace
RESTART = "rpc.nfsd 0 && sleep 1 && rpc.nfsd -N 3 -V 4.1 -V 4.2 4"


@pytest.mark.slow
def test_the_server_restarted_during_a_job_which_waits_through_grace_and_goes_on(
    lab: Lab, site: Site
) -> None:
    model = Model(SIZE)
    names = site.make_chain("x", 3, SIZE, model)
    a = site.mount("a", *LEASED)
    a.write("x", model, 6 * MiB, 64 * KiB, 0xA6)
    b = site.mount("b", *LEASED)
    job = a.start_job("x", "commit", f"top={names[1]} base={names[0]} speed=32K")
    # the server's clock when it stops (the hosts' too: one guest kernel), as events say it
    stopped = lab.sh(None, f"date -u +%Y-%m-%dT%H:%M:%S.%3NZ && {RESTART}").out.split()[0]
    # (nfsd's v4_end_grace reads N while the server is in its grace period)
    assert lab.sh(None, "cat /proc/fs/nfsd/v4_end_grace").out.strip() == "N"
    # the owner goes on: the commit ends, the guest writes
    end = completed(a, "x")
    assert end["job"] == job and end["time"] > stopped, ("the commit ended first", end, stopped)
    a.write("x", model, 7 * MiB, 64 * KiB, 0xA7)
    assert a.digest("x") == model.digest()
    # nobody took the chain: A still owns it, B serves it read-only and never adopted
    assert event_after(a, "x", 0, "OWNERSHIP_LOST") is None, a.events("x")
    assert status_of(a, "x").get("owner") == "self", status_of(a, "x")
    assert status_of(b, "x").get("owner") == "elsewhere", status_of(b, "x")
    assert event_after(b, "x", 0, "OWNERSHIP_TAKEN", "ADOPT_STARTED") is None, b.events("x")
    a.unmount()
    b.unmount()
    site.check_images(site.existing(names))
    assert site.digest("x.qcow2") == model.digest()
