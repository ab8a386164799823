"""snapshot: a new, empty overlay on top of the active layer, as QEMU's
blockdev-snapshot-sync.

    [A] <- [B] <- [C] <- [D] <- [E]    snapshot F   ->  [A] <- ... <- [E] <- [F]

One synchronous step, done when the ``write(2)`` returns: the active layer is flushed,
the overlay is created (whole under a temporary name, locked, flushed, then renamed into
place: the file FILE is complete whenever it exists) and made active under the chain's
lock, still on the descriptor that holds its lock, so a guest write lands either in the
old active layer before the switch or in the new one after it; the flat content does not
change.  No job runs alongside and there is no window between steps for a guest request
to fall into.

It is journalled so that the next mount can finish or undo it should chainfs die
half-way (``settle``); a snapshot that fails while chainfs lives is undone at once.
"""

from __future__ import annotations

import contextlib
import errno
import os

from ..chain import MAX_DEPTH, resolve_backing
from ..control import CommandError, SnapshotCmd
from ..errors import ChainfsError
from ..formats import is_qcow2, open_layer
from ..formats.qcow2 import create_image
from ..source import Source
from .backing import backing_string
from .journal import Pending, record_active, redo
from .served import Served, chain_changed, check_target, refuse_busy, vet_new_file


def take(served: Served, cmd: SnapshotCmd) -> None:
    """``snapshot FILE``: create FILE over the active layer and make it active."""
    refuse_busy(served)
    chain = served.chain
    if len(chain.layers) >= MAX_DEPTH:  # up front: nothing created, the chain unchanged
        raise CommandError(
            errno.EINVAL,
            f"chain {served.name!r} has {len(chain.layers)} layers: a snapshot would pass "
            f"the cap of {MAX_DEPTH} layers (stream or commit first)",
        )
    target = check_target(served, cmd.target)
    active = chain.active
    journal = served.journal
    params = {"target": target, "below": active.path}
    key = journal.begin("snapshot", "snapshot", served.name, params).key if journal else ""
    try:
        chain.flush()
        if os.path.lexists(target):  # appeared since check_target: not ours to remove
            raise CommandError(errno.EEXIST, f"{target!r} already exists")
        image = create_image(
            target,
            size=chain.size,
            backing=backing_string(target, active.path),
            backing_format=active.format_name,
            vet=vet_new_file(served, target),
        )
        try:
            chain.push_overlay(target, image)
        except BaseException:
            # a refused command changes nothing: the unused overlay (ours: create_image
            # never replaces a file) goes
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            raise
    except BaseException:
        if journal is not None:
            journal.end(key, "rolled-back")
        raise
    served.source.record_active(served.name, target)
    if journal is not None:
        journal.end(key, "done")
    served.emit("SNAPSHOT_TAKEN", file=target)
    chain_changed(served)


def settle(p: Pending, src: Source) -> list[tuple[str, dict[str, object]]]:
    """At mount: finish a snapshot whose overlay exists (it is complete: it got its name
    only then), roll back one that never got there (recovery removed the temporary file
    of its creation); return the events that say which."""
    target, below = str(p.params.get("target")), str(p.params.get("below"))
    try:
        complete = is_qcow2(target)
    except FileNotFoundError:
        return [("JOB_ROLLED_BACK", {"file": target, "reason": "the overlay was never created"})]
    except OSError as e:
        raise ChainfsError(f"cannot read {target!r}: {e.strerror}") from None
    if complete:
        layer = open_layer(target, "qcow2", writable=False)
        try:
            string = layer.backing_string
        finally:
            layer.close()
        backing = os.path.normpath(resolve_backing(target, string)) if string else None
        if backing != os.path.normpath(below):
            reason = f"{target!r} is not an overlay of {below!r}; left alone"
            return [("JOB_ROLLED_BACK", {"file": target, "reason": reason})]
        # the overlay is complete (renamed into place once durable): the snapshot stands
        redo([record_active(p.chain, target)], src, p.chain)
        return [("JOB_RESUMED", {"file": target}), ("SNAPSHOT_TAKEN", {"file": target})]
    reason = f"{target!r} is not an image chainfs made; left alone"
    return [("JOB_ROLLED_BACK", {"file": target, "reason": reason})]
