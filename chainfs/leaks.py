"""Leaked clusters left by an unclean stop, repaired when a chain is taken again.

A chainfs daemon killed (kill -9, a crash, a host cut off) between a cluster's
allocation and the L2 entry that references it leaks that cluster, as QEMU does: the
refcount is higher than the references (``refcounts``' invariant keeps it never lower).
No harm to data, but ``qemu-img check`` exits 3.  When a mount owns a chain whose
previous owner did not release it (``Ownership.unclean``), every layer it opens writable
is checked once and its leaks repaired as ``qemu-img check -r leaks`` does, before
anything is served or resumed on it.  A layer the check finds anything else wrong with
is left as it is, with a warning: the chain is served as before.

Locking contract: called from the trio thread with the chain not yet served, or under
the chain's lock (``Chain.reopen``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import ChainfsError
from .formats.base import Layer
from .formats.qcow2.check import CHECK_LEAKS, CHECK_OK, repair_leaks
from .formats.qcow2.driver import Qcow2Layer

log = logging.getLogger(__name__)

# layers checked for leaks by this process (tests count them)
SCANNED: list[str] = []


def repair_layer(chain: str, layer: Layer, emit: Callable[..., object] | None = None) -> int:
    """Repair the leaks of ``layer`` (open writable) of ``chain``; the clusters repaired."""
    if not isinstance(layer, Qcow2Layer) or not layer.writable or layer.refs is None:
        return 0
    SCANNED.append(layer.path)
    try:
        layer.flush()  # (the check reads the file: what the layer holds goes there first)
        result = repair_leaks(layer.file, layer.refs, layer.path)
    except (ChainfsError, OSError) as e:
        log.warning("chain=%s leak check of %s failed, nothing repaired: %s", chain, layer.path, e)
        return 0
    if result.status == CHECK_OK:
        log.info("chain=%s no leaked clusters in %s after an unclean stop", chain, layer.path)
        return 0
    if result.status != CHECK_LEAKS or result.marked_corrupt or result.marked_dirty:
        log.warning(
            "chain=%s %s: the check after an unclean stop found %d errors and %d leaks; "
            "nothing repaired (see chainfs check)",
            chain,
            layer.path,
            result.corruptions + result.check_errors,
            result.leaks,
        )
        return 0
    log.info(
        "chain=%s repaired %d leaked clusters in %s after an unclean stop",
        chain,
        result.leaks,
        layer.path,
    )
    if emit is not None:
        emit("LEAKS_REPAIRED", layer=layer.path, clusters=result.leaks)
    return result.leaks


def repair_writable(
    chain: str, layers: list[Layer], emit: Callable[..., object] | None
) -> set[str]:
    """Repair every writable layer of ``layers``; the paths checked."""
    done: set[str] = set()
    for layer in layers:
        if layer.writable:
            repair_layer(chain, layer, emit)
            done.add(layer.path)
    return done
