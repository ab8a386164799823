"""Adopting many chains at once: ``adopt`` written for ten chains whose owner is in the
middle of a rate-limited commit on each, then that owner killed (kill -9): the ten
take-overs run side by side, not one after another (the server log's "owned: mount=" and
"served read-write" lines: a chain's take-over starts before another's ends); each
commit ends exact on the adopting mount, every layer clean."""

from __future__ import annotations

import functools
import itertools
import random
import re
from datetime import datetime
from pathlib import Path

from chainfs.jobs.journal import Journal

from .conftest import Mount, Mounter, Seeds, assert_clean, read_direct, wait_for
from .test_hosts import owner, read_only_refused, write

MiB = 1 << 20
SIZE = 16 * MiB
PREFIXES = [f"c{i}" for i in range(10)]

# a take-over starts with the owner lock taken ("owned: mount=...") and ends served
_LINE = re.compile(r"^(\S+ \S+) INFO chainfs\.\S+: chain=(\S+) (owned: mount=|served read-write)")


def take_overs(m: Mount) -> dict[str, tuple[datetime, datetime]]:
    """Each chain's take-over as the server logged it: (start, end)."""
    start: dict[str, datetime] = {}
    spans: dict[str, tuple[datetime, datetime]] = {}
    for line in m.log_text().splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        when = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f")
        if found[3] != "served read-write":
            start[found[2]] = when
        elif found[2] in start:
            spans[found[2]] = (start[found[2]], when)
    return spans


@read_only_refused
def test_ten_chains_are_adopted_together(tmp_path: Path, mounter: Mounter, seeds: Seeds) -> None:
    images = tmp_path / "images"
    chains = [p + "E" for p in PREFIXES]
    made = {p + "E": seeds(images, p, size=SIZE) for p in PREFIXES}
    a = mounter(images)
    models = {}
    rng = random.Random(21)
    for chain in chains:
        models[chain] = bytearray(made[chain].content)
        write(a, chain, models[chain], rng)
    jobs = {}
    for p, chain in zip(PREFIXES, chains, strict=True):
        jobs[chain] = a.start_job(chain, "commit", f"top={p}D.qcow2 base={p}B.qcow2 speed=256K")

    def checkpoints() -> bool | None:
        for chain in chains:
            pending = Journal.load(str(images), chain, writable=False).pending()
            if not (pending and pending[0].offset):
                return None
        return True

    wait_for(checkpoints, "every commit to record a checkpoint")
    b = mounter(images)
    for chain in chains:  # (each write returns at once: the wait runs behind it)
        b.command(chain, "adopt", chain)
    a.kill()
    a.wait_exit(None)

    def adopted(chain: str) -> bool | None:
        return owner(b, chain)["owner"] == "self" or None

    for chain in chains:
        wait_for(functools.partial(adopted, chain), f"{chain} adopted")
    spans = take_overs(b)
    assert sorted(spans) == sorted(chains), spans
    # (taken over one after another, each would end before the next one starts)
    ordered = sorted(spans.values())
    assert any(nxt[0] < end for (_, end), nxt in itertools.pairwise(ordered)), ordered

    def ended(chain: str) -> dict[str, str] | None:
        done = [
            e
            for e in b.events(chain)
            if e.get("job") == jobs[chain] and e["event"] in ("JOB_COMPLETED", "JOB_ROLLED_BACK")
        ]
        return done[-1] if done else None

    for chain in chains:
        end = wait_for(functools.partial(ended, chain), f"the adopted commit of {chain} to end")
        assert end["event"] == "JOB_COMPLETED" and "error" not in end, end
        assert read_direct(b.img(chain)) == models[chain]
    b.unmount()
    assert_clean([images / f"{p}{n}.qcow2" for p in PREFIXES for n in "ABE"])
