"""QEMU's job state machine as data: which state may follow which, and which verb a
job accepts in which state (``job.c``: ``JobSTT``, ``JobVerbTable``, ``job_apply_verb``).

    created -> running <-> paused            running -> waiting -> pending -> concluded
                  |                                 \\          \\           /
                  +--> ready <-> standby              +--------> aborting --+

The tables are QEMU's, restricted to the states and verbs chainfs has: jobs are born
``created`` and end ``concluded`` (QEMU's ``undefined`` and ``null`` are not shown), and
they finalize and dismiss themselves (QEMU's ``auto-finalize`` and ``auto-dismiss``), so
``finalize`` and ``dismiss`` are not verbs here.  A new verb is one more row of
``VERBS``; a new state one more row and column of both tables.

``transition`` is the only way a job's state changes (``Job.status``); ``apply_verb``
is the only gate for a user's verb, refusing with QEMU's words, "job 'commit-1' in state
'running' cannot accept 'complete'", and an errno: EBUSY while the job is on its way
out (waiting, pending, aborting, concluded: asking again will not help, the job is
ending), EINVAL otherwise (the verb makes no sense for the job as it is).

Pure: no I/O, no trio.
"""

from __future__ import annotations

import errno

from ..errors import ChainfsError

# -- states (QEMU's JobStatus names) -------------------------------------------------------

CREATED, RUNNING, PAUSED, READY = "created", "running", "paused", "ready"
STANDBY, WAITING, PENDING, ABORTING = "standby", "waiting", "pending", "aborting"
CONCLUDED = "concluded"

STATES: tuple[str, ...] = (
    CREATED,
    RUNNING,
    PAUSED,
    READY,
    STANDBY,
    WAITING,
    PENDING,
    ABORTING,
    CONCLUDED,
)

# -- verbs (QEMU's JobVerb names) ---------------------------------------------------------

CANCEL, PAUSE, RESUME, SET_SPEED, COMPLETE = "cancel", "pause", "resume", "set-speed", "complete"
CHANGE = "change"

VERB_NAMES: tuple[str, ...] = (CANCEL, PAUSE, RESUME, SET_SPEED, COMPLETE, CHANGE)

# fmt: off
# The state transition table (JobSTT): row = from, column = to.
_STT: dict[str, tuple[int, ...]] = {
    #              C  R  P  Y  S  W  D  X  E
    CREATED:     (0, 1, 0, 0, 0, 0, 0, 1, 0),
    RUNNING:     (0, 0, 1, 1, 0, 1, 0, 1, 0),
    PAUSED:      (0, 1, 0, 0, 0, 0, 0, 0, 0),
    READY:       (0, 0, 0, 0, 1, 1, 0, 1, 0),
    STANDBY:     (0, 0, 0, 1, 0, 0, 0, 0, 0),
    WAITING:     (0, 0, 0, 0, 0, 0, 1, 1, 0),
    PENDING:     (0, 0, 0, 0, 0, 0, 0, 1, 1),
    ABORTING:    (0, 0, 0, 0, 0, 0, 0, 1, 1),
    CONCLUDED:   (0, 0, 0, 0, 0, 0, 0, 0, 0),
}

# fmt: on

TRANSITIONS: dict[str, frozenset[str]] = {
    state: frozenset(to for to, ok in zip(STATES, row, strict=True) if ok)
    for state, row in _STT.items()
}
# The verb table (JobVerbTable), as the states that accept each verb: pause, resume,
# set-speed and change (QEMU's block-job-change) act on a job that is alive; cancel until
# it is on its way out; complete only a job that reported ready
_ALIVE = frozenset({CREATED, RUNNING, PAUSED, READY, STANDBY})
VERBS: dict[str, frozenset[str]] = {
    CANCEL: _ALIVE | {WAITING, PENDING},
    PAUSE: _ALIVE,
    RESUME: _ALIVE,
    SET_SPEED: _ALIVE,
    COMPLETE: frozenset({READY, STANDBY}),
    CHANGE: _ALIVE,
}

# states a job only passes through on its way out
ENDING = frozenset({WAITING, PENDING, ABORTING, CONCLUDED})


class JobStateError(ChainfsError):
    """A verb the job cannot accept now, with the errno the control-file write returns."""

    def __init__(self, errno_: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno_


class IllegalTransition(RuntimeError):
    """A state change the transition table forbids: a bug in chainfs, never the user's."""


def transition(job_id: str, old: str, new: str) -> str:
    """``new``, if the table lets a job go from ``old`` to it; else IllegalTransition."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job {job_id!r} cannot go from state {old!r} to {new!r}")
    return new


def allowed(verb: str, state: str) -> bool:
    return state in VERBS[verb]


def apply_verb(job_id: str, state: str, verb: str) -> None:
    """Let ``verb`` through, or refuse it as QEMU's ``job_apply_verb`` does."""
    if state in VERBS[verb]:
        return
    # QEMU's words; for complete also why, since the state alone does not say it
    why = ": it is not ready" if verb == COMPLETE and state not in ENDING else ""
    raise JobStateError(
        errno.EBUSY if state in ENDING else errno.EINVAL,
        f"job {job_id!r} in state {state!r} cannot accept {verb!r}{why}",
    )
