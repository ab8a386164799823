"""The mount's metadata cache: one byte budget and one LRU for the clean qcow2 metadata
of every layer of every chain (QEMU's ``cache-size``, but per mount, not per image).

What it holds is clean (what the file holds) and never changed while it is held: L2
slices and all-zero-slice markers of read-only layers, whole L2 tables of writable ones,
L1 slices of read-only layers, refcount blocks.  A layer about to change a table or a
block takes it out first (``take``) and keeps it, dirty, until its write-back has
written it; only then does it come back (``put``).  So an eviction, whichever chain's
thread causes it, only ever drops what the file still holds, and never loses a change.

Keys are (owner, kind, offset), the owner a number given once per open layer
(``owner``), never reused: what one open of a file cached is never served to another
(a job that reopens a layer gets a fresh owner), and ``forget`` drops an owner's
entries when its layer closes.

Memory: the entries' bytes plus ``ENTRY_OVERHEAD`` each stay within ``budget``; an
entry larger than the whole budget is not kept at all (its caller uses it once, and
every lookup reads it again).

Locking contract: thread-safe (one lock); chains call it from their worker threads.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

DEFAULT_CACHE_SIZE = 32 << 20  # QEMU's default l2-cache-size ceiling on Linux
MIN_CACHE_SIZE = 0  # a mount may cache nothing (every lookup then reads the file)
ENTRY_OVERHEAD = 256  # bytes of bookkeeping per entry (key, ordering, owner index)

# kinds of entry
L1_PIECE, L2_PIECE, L2_TABLE, REFCOUNT_BLOCK = range(4)

Key = tuple[int, int, int]
Piece = bytes | bytearray

_owners = itertools.count(1)


def owner() -> int:
    """A number for one open layer, never given twice in this process."""
    return next(_owners)


class MetaCache:
    """A byte-bounded LRU of clean metadata pieces, shared by every layer of a mount."""

    def __init__(self, budget: int = DEFAULT_CACHE_SIZE) -> None:
        self.budget = budget
        self.used = 0
        self._lru: OrderedDict[Key, Piece] = OrderedDict()
        self._by_owner: dict[int, set[Key]] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, key: Key) -> Piece | None:
        """The piece under ``key`` (now the most recently used), or None."""
        with self._lock:
            piece = self._lru.get(key)
            if piece is None:
                self.misses += 1
                return None
            self.hits += 1
            self._lru.move_to_end(key)
            return piece

    def put(self, key: Key, piece: Piece) -> None:
        """Keep ``piece`` (clean, and not to be changed while here) under ``key``,
        dropping the least recently used entries beyond the budget."""
        cost = len(piece) + ENTRY_OVERHEAD
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self.used -= len(old) + ENTRY_OVERHEAD
            if cost > self.budget:  # never fits: not kept
                self._by_owner.get(key[0], set()).discard(key)
                return
            self._lru[key] = piece
            self._by_owner.setdefault(key[0], set()).add(key)
            self.used += cost
            while self.used > self.budget:
                self._drop_oldest()

    def take(self, key: Key) -> Piece | None:
        """Remove and return the piece under ``key`` (its owner is about to change it)."""
        with self._lock:
            piece = self._lru.pop(key, None)
            if piece is not None:
                self.used -= len(piece) + ENTRY_OVERHEAD
                keys = self._by_owner.get(key[0])
                if keys is not None:
                    keys.discard(key)
            return piece

    def forget(self, who: int) -> None:
        """Drop every entry of the owner ``who`` (its layer closed)."""
        with self._lock:
            for key in self._by_owner.pop(who, ()):
                piece = self._lru.pop(key, None)
                if piece is not None:
                    self.used -= len(piece) + ENTRY_OVERHEAD

    def held(self, who: int) -> int:
        """Bytes (with overhead) the owner ``who`` has in the cache."""
        with self._lock:
            return sum(
                len(self._lru[k]) + ENTRY_OVERHEAD
                for k in self._by_owner.get(who, ())
                if k in self._lru
            )

    def resize(self, budget: int) -> None:
        """A new budget (the mount's ``cache_size=``), evicting down to it."""
        with self._lock:
            self.budget = budget
            while self.used > self.budget and self._lru:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        key, piece = self._lru.popitem(last=False)
        self.used -= len(piece) + ENTRY_OVERHEAD
        self.evictions += 1
        keys = self._by_owner.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_owner[key[0]]


# the process's cache: one process serves one mount (``mount`` sizes it from cache_size=)
CACHE = MetaCache()


def parse_size(text: str) -> int:
    """``cache_size=`` values: bytes, or a number with K, M or G (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in ("K", "M", "G") else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise ValueError(text)
    return int(number) * units[unit]
