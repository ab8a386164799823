"""File descriptors: the soft ``RLIMIT_NOFILE`` raised to the hard limit at start, and
the budget by which a mount opens its chains without starving what it needs later.

A served chain holds one descriptor per layer, two more (its events log and job-id
counter) from its first event on, and three while this mount owns it (its owner file,
state record and journal, locked); on a read-only mount only its layers (its events are
kept in memory, nothing is owned).  The mount keeps ``RESERVE`` descriptors back from the
chains for what comes after them: ``/dev/fuse``, the journal, the state file, a job's
target, a command's new overlay, the log.  A chain that does not fit in what is left is
refused alone, with the reason (EMFILE, the descriptors it needs, the limit, how to raise
it: one short line) in ``status`` and the log, and one warning explains it in full and
says what serving every chain needs; the chains before it are served.

Locking contract: used at bring-up only, on the trio thread.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from . import chain
from .chain import MAX_READ_ONLY_DEPTH

log = logging.getLogger(__name__)

RESERVE = 64  # kept back from the chains: /dev/fuse, journal, state file, jobs, commands
EVENT_LOG = 2  # a chain's events log and job-id counter, open from its first event
OWNER_FILES = 3  # an owned chain's owner file, state record and journal (``ownership``)
NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling when the hard limit is "unlimited"
RAISE_HINT = "LimitNOFILE= in the systemd unit, or ulimit -n before chainfs mount"
SHORT_HINT = "LimitNOFILE= or ulimit -n"  # (a refused chain's reason in ``status``)


def raise_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN) as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warning("descriptors: cannot raise the limit from %d to %d: %s", soft, target, e)
            return soft
        log.info("descriptors: limit=%d (raised from %d to the hard limit)", target, soft)
        return target
    log.info("descriptors: limit=%d (the hard limit)", soft)
    return soft


def open_count() -> int:
    """The descriptors this process has open (the listing's own not counted)."""
    return len(os.listdir("/proc/self/fd")) - 1


def count_layers(active: str) -> int:
    """How many layers the chain of ``active`` has (for a refusal's figure)."""
    return chain.count_layers(active, MAX_READ_ONLY_DEPTH)


@dataclass
class Budget:
    """The descriptors left for chains: the limit less what is open and the reserve."""

    limit: int
    in_use: int
    reserve: int = RESERVE
    # a chain's descriptors besides its layers: none on a read-only mount
    per_chain: int = EVENT_LOG + OWNER_FILES
    refused: int = 0  # chains refused for want of descriptors
    wanted: int = 0  # the descriptors those chains would need

    @classmethod
    def now(cls) -> Budget:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(limit=soft, in_use=open_count())

    @property
    def room(self) -> int:
        return self.limit - self.reserve - self.in_use

    def fits(self, layers: int) -> bool:
        """Whether a chain of ``layers`` layers would fit now."""
        return layers + self.per_chain <= self.room

    def take(self, layers: int) -> bool:
        """Count a chain of ``layers`` layers as served, if it fits."""
        need = layers + self.per_chain
        if need > self.room:
            return False
        self.in_use += need
        return True

    def refusal(self, layers: int) -> str:
        """Why a chain of ``layers`` layers is not served, counting it as refused: short
        (one such line per chain in ``status``: 10,000 chains past a limit made a text
        of 3.4 MB); ``report`` explains it once."""
        need = layers + self.per_chain
        self.refused += 1
        self.wanted += need
        return (
            f"too many open files (EMFILE): needs {need} descriptors, limit {self.limit}"
            f" reached; raise {SHORT_HINT} and mount again"
        )

    def report(self) -> None:
        """After the chains were opened: say, once, why chains were refused and what
        serving all of them would take."""
        if self.refused:
            needs = (
                f"one per layer, {EVENT_LOG} for its events log and {OWNER_FILES} for its"
                " owner, state and journal files"
                if self.per_chain
                else "one per layer (a read-only mount)"
            )
            log.warning(
                "descriptors: %d chains refused for want of descriptors (EMFILE): a chain"
                " needs %s; of this mount's limit of %d (RLIMIT_NOFILE) %d are in"
                " use and %d kept for requests, control files, jobs and the journal;"
                " serving every chain needs a limit of at least %d: raise it (%s) and"
                " mount again",
                self.refused,
                needs,
                self.limit,
                self.in_use,
                self.reserve,
                self.in_use + self.wanted + self.reserve,
                RAISE_HINT,
            )
