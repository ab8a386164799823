"""Two hosts serving one directory on NFSv4.2 (issue 21's "Done when", in the lab):
exclusion, no false fail-over (the owner cut off for three leases with nobody adopting)
and hand-over (inactivate/activate).  Fail-over mid-job is ``test_nfs_failover.py``'s,
the server restarted during a job ``test_nfs_restart.py``'s.  Every image ends
``qemu-img check`` clean and every flat content equal to its ``Model``.

The interface under test (issue 21, items 2-8): a chain owned by another host is
served read-only (``owner=elsewhere`` in ``control/.status``, its flat file refusing
writes); ``control/CHAIN/adopt`` (``CHAIN timeout=SECONDS``) takes a dead owner's chain
and runs its journal (events ``OWNERSHIP_TAKEN`` / ``ADOPT_FAILED``);
``control/CHAIN/inactivate`` and ``control/CHAIN/activate`` (``CHAIN``) hand a chain
over; a host that lost ownership says ``event=OWNERSHIP_LOST`` and fails the guest's
writes.
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from lab.lab import LEASE, Lab

from chainfs.control import parse_line

from .conftest import REPO_CHAINFS, ChainfsMount, KiB, MiB, Model, Site, wait_for, writer_script

SIZE = 8 * MiB
SPEED = "speed=1M"  # a commit of the 8 MiB chain lasts seconds: room for the instants
SEED = 21
LEASED = ("-o", f"lease={LEASE}")  # chainfs told the lab's lease, for its heartbeat


def status_of(m: ChainfsMount, chain: str) -> dict[str, str]:
    """The chain's line of ``control/.status`` (owner=, holder=, ...)."""
    return status_in(m.sh(f"cat {m.mountpoint}/control/.status").out, chain)


def status_in(text: str, chain: str) -> dict[str, str]:
    """The chain's line of a ``control/.status`` read."""
    for line in text.splitlines():
        entry = parse_line(line)
        if entry.get("chain") == chain:
            return entry
    return {}


def sections(out: str) -> dict[str, str]:
    """What a command printed under each ``#NAME`` line it printed."""
    found: dict[str, list[str]] = {"": []}
    name = ""
    for line in out.splitlines():
        if line.startswith("#"):
            name = line[1:]
            found[name] = []
        else:
            found[name].append(line)
    return {k: "\n".join(v) for k, v in found.items()}


def event_after(m: ChainfsMount, chain: str, before: int, *names: str) -> dict[str, str] | None:
    for e in m.events(chain)[before:]:
        if e["event"] in names:
            return e
    return None


def completed(m: ChainfsMount, chain: str, before: int = 0) -> dict[str, str]:
    """The chain's next JOB_COMPLETED (or a failure) in ``m``'s events."""
    e = wait_for(
        lambda: event_after(m, chain, before, "JOB_COMPLETED", "JOB_CANCELLED"),
        f"the job on {chain} to end on {m.host}",
        300,
    )
    assert e["event"] == "JOB_COMPLETED" and "error" not in e, e
    return e


# -- exclusion -------------------------------------------------------------------------------


def test_a_chain_owned_by_one_host_is_never_writable_on_the_other(lab: Lab, site: Site) -> None:
    mx = Model(SIZE)
    x = site.make_chain("x", 2, SIZE, mx)
    a = site.mount("a")
    a.write("x", mx, 1 * MiB, 64 * KiB, 0xA1)
    my = Model(SIZE)
    y = site.make_chain("y", 2, SIZE, my)  # after A's mount: nobody owns it yet
    b = site.mount("b")
    # B serves Y read-write, X read-only (or not at all), never writable
    b.write("y", my, 2 * MiB, 64 * KiB, 0xB2)
    r = b.sh(writer_script(b.img("x"), 0, 4 * KiB, 0xBB), check=False)
    assert r.rc != 0, "host B wrote to the chain host A serves"
    assert "Read-only file system" in r.err or "No such file" in r.err, r.err
    # QEMU on B: refused with QEMU's words, for the active layer and its backing file
    r = site.sh("b", f"qemu-img info {x[-1]}", check=False)
    assert r.rc != 0 and 'Failed to get shared "write" lock' in r.err, r.err
    for name in x:
        r = site.sh("b", f"qemu-io -c 'write -P 0xbb 0 4k' {name}", check=False)
        assert r.rc != 0 and 'Failed to get "write" lock' in r.err, (name, r.err)
    # A goes on
    a.write("x", mx, 3 * MiB, 64 * KiB, 0xA3)
    assert a.digest("x") == mx.digest()
    # status says who owns what
    assert status_of(b, "y").get("owner") == "self", status_of(b, "y")
    sx = status_of(b, "x")
    assert sx.get("owner") == "elsewhere" and "host-a" in sx.get("holder", ""), sx
    assert status_of(a, "x").get("owner") == "self", status_of(a, "x")
    # the finding: a directory flock is local to each NFS client
    assert "fcntl.flock(" not in (REPO_CHAINFS / "mount.py").read_text()
    a.unmount()
    b.unmount()
    site.check_images(x + y)
    assert site.digest("x.qcow2") == mx.digest()
    assert site.digest("y.qcow2") == my.digest()


# -- fail-over mid-job ---------------------------------------------------------------------------


def start_commit(
    site: Site, model: Model, *options: str
) -> tuple[list[str], ChainfsMount, ChainfsMount, str]:
    """Chain x (3 layers), A serving it with an intermediate commit running at speed=,
    B serving the directory (x read-only there)."""
    names = site.make_chain("x", 3, SIZE, model)
    a = site.mount("a", *options)
    a.write("x", model, 6 * MiB, 64 * KiB, 0xA6)
    b = site.mount("b", *options)
    job = a.start_job("x", "commit", f"top={names[1]} base={names[0]} {SPEED}")
    return names, a, b, job


# -- no false fail-over ----------------------------------------------------------------------------


@pytest.mark.slow
def test_owner_cut_off_for_three_leases_goes_on_when_nobody_adopts(lab: Lab, site: Site) -> None:
    model = Model(SIZE)
    names, a, b, _job = start_commit(site, model, *LEASED)
    lab.cut("a")
    # B is asked who owns x meanwhile: its status judges by the owner file's content and
    # never tests the lock (a conflict for which Linux nfsd would expire A's courteous,
    # lease-expired state: A would be fenced though nobody adopted)
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        seen = status_of(b, "x")
        assert seen.get("owner") == "elsewhere" and "host-a" in seen.get("holder", ""), seen
        time.sleep(2)
    assert "overdue" in seen["holder"], seen  # A's heartbeat stopped with the cut
    lab.heal("a")
    completed(a, "x")
    a.write("x", model, 7 * MiB, 64 * KiB, 0xA7)
    assert a.digest("x") == model.digest()
    assert event_after(a, "x", 0, "OWNERSHIP_LOST") is None
    assert status_of(b, "x").get("owner") == "elsewhere"
    a.unmount()
    b.unmount()
    site.check_images(site.existing(names))
    assert site.digest("x.qcow2") == model.digest()


# -- hand-over ---------------------------------------------------------------------------------


def make_striped(site: Site, chain: str, size: int, model: Model) -> list[str]:
    """A chain ``CHAIN-0.qcow2 <- CHAIN.qcow2`` whose base holds 64 KiB in every MiB:
    a stream of it copies something at every 1 MiB step, so a rate-limited one runs
    through as many hand-overs as the disk has MiB (each owner copies a step at once)."""
    base, top = f"{chain}-0.qcow2", f"{chain}.qcow2"
    writes = []
    for i in range(size // MiB):
        writes.append(f"-c 'write -P {0x40 + i % 64} {i * MiB} {64 * KiB}'")
        model.write(i * MiB, 64 * KiB, 0x40 + i % 64)
    site.sh(
        "a",
        f"qemu-img create -q -f qcow2 {base} {size} && "
        f"qemu-io -f qcow2 {' '.join(writes)} {base} >/dev/null && "
        f"qemu-img create -q -f qcow2 -F qcow2 -b {base} {top} {size}",
    )
    return [base, top]


@pytest.mark.parametrize(
    "round_trips", [2, pytest.param(20, marks=pytest.mark.slow)], ids=["2", "20"]
)
def test_inactivate_activate_round_trips_while_a_stream_runs(
    lab: Lab, site: Site, round_trips: int
) -> None:
    """Hand-over round trips while a rate-limited stream runs, with a verifying writer
    (a write on the holder, the whole disk verified on the next holder): every
    ``inactivate`` stops the stream at its checkpoint and every ``activate`` resumes it
    from the journal on the other host; it finishes on whichever host holds the chain,
    and the content is exact."""
    rng = random.Random(SEED)
    size = (2 * round_trips + 6) * MiB  # a step to copy for every hand-over, and more
    model = Model(size)
    names = make_striped(site, "x", size, model)
    a = site.mount("a")
    b = site.mount("b")
    job = a.start_job("x", "stream", "speed=1K")  # a step, then 64 s before the next
    holder, other = a, b
    for i in range(2 * round_trips):
        off = rng.randrange(size // (64 * KiB)) * 64 * KiB
        # each host's part of a hand-over in one command (each one a command through
        # the agent): the holder writes, inactivates (the write returns once the chain
        # is released) and says what it shows then
        said = sections(
            holder.sh(
                f"{writer_script(holder.img('x'), off, 64 * KiB, 0x20 + i % 200)}\n"
                f"printf '%s\\n' x > {holder.control('x', 'inactivate')}\n"
                f"echo '#status'; cat {holder.mountpoint}/control/.status\n"
                f"echo '#events'; cat {holder.control('x', 'events')}"
            ).out
        )
        model.write(off, 64 * KiB, 0x20 + i % 200)
        assert status_in(said["status"], "x").get("owner") != "self"
        seen = [parse_line(line) for line in said["events"].splitlines()]
        stopped = [e for e in seen if e["event"] == "INACTIVATED"][-1]
        assert stopped.get("job") == job, f"the stream ended before hand-over {i + 1}"
        # the other activates and reads: the whole disk now and then, else the block
        # written before the hand-over
        whole = round_trips <= 2 or (i + 1) % 5 == 0
        read = f"dd if={other.img('x')} bs=64K skip={off // (64 * KiB)} count=1 2>/dev/null |"
        if whole:
            read = f"< {other.img('x')}"
        said = sections(
            other.sh(
                f"printf '%s\\n' x > {other.control('x', 'activate')}\n"
                f"echo '#events'; cat {other.control('x', 'events')}\n"
                f"echo '#digest'; {read} sha256sum"
            ).out
        )
        seen = [parse_line(line) for line in said["events"].splitlines()]
        taken = max(k for k, e in enumerate(seen) if e["event"] == "OWNERSHIP_TAKEN")
        resumed = [e for e in seen[taken:] if e["event"] == "JOB_RESUMED"]
        assert [e["job"] for e in resumed] == [job], seen[taken:]
        got = said["digest"].split()[0]
        if whole:
            assert got == model.digest(), f"after hand-over {i + 1}"
        else:
            want = hashlib.sha256(model.data[off : off + 64 * KiB]).hexdigest()
            assert got == want, f"the block written before hand-over {i + 1}"
        holder, other = other, holder
    holder.command("x", "speed", f"{job} 0")
    end = holder.wait_job("x", job, 300)
    assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
    seen = holder.events("x")
    taken = max(k for k, e in enumerate(seen) if e["event"] == "OWNERSHIP_TAKEN")
    assert end in seen[taken:]  # on the holder, after it took the chain last
    assert holder.digest("x") == model.digest()
    a.unmount()
    b.unmount()
    site.check_images(names[-1:])
    assert site.digest("x.qcow2") == model.digest()
