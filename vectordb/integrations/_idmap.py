"""A text store's string ids and the int64 ids its index keeps them under.

Each new string id gets the next int and keeps it when deleted: written again, it comes
back under the same int, so however a delete and an upsert of one id interleave, at most
one document carries it. A string id whose int is not in the index is absent; the store
checks the index on every read. Deleted ids leave the maps only once they far outnumber
the live ones, with no write in flight (:meth:`StringIds.prune`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

from .._types import I64
from ..index.clustered import ClusteredIndex

__all__ = ["PRUNE_SLACK", "StringIds"]

#: Deleted ids the maps may keep beyond twice the live ones (see ``StringIds.prune``).
PRUNE_SLACK = 1024


class StringIds:
    """The maps ``ints`` (string -> int) and ``sids`` (int -> string), thread-safe, and
    the count of writes in flight that took ints from them."""

    def __init__(self, ints: dict[str, int] | None = None) -> None:
        self.ints: dict[str, int] = dict(ints or {})
        self.sids: dict[int, str] = {i: s for s, i in self.ints.items()}
        self.next_int = max(self.sids, default=-1) + 1
        self.writing = 0
        self._lock = threading.Lock()  # short: the event loop's thread takes it too

    def take(self, sids: Sequence[str]) -> I64:
        """The ints ``(n,)`` int64 of ``sids`` (new strings get new ints now); the write
        counts as in flight until :meth:`done`."""
        with self._lock:
            for sid in sids:
                if sid not in self.ints:
                    self.ints[sid], self.sids[self.next_int] = self.next_int, sid
                    self.next_int += 1
            self.writing += 1
            return np.asarray([self.ints[s] for s in sids], dtype=np.int64)

    def done(self, index: ClusteredIndex | None, failed: I64 | None = None) -> None:
        """End a write; forget the ints of a ``failed`` one that ``index`` lacks, unless
        another write is in flight (it may hold them)."""
        with self._lock:
            self.writing -= 1
            if failed is not None and not self.writing:
                for i in failed.tolist():
                    if (index is None or i not in index) and i in self.sids:
                        del self.ints[self.sids.pop(i)]

    def prune(self, index: ClusteredIndex) -> None:
        """Forget deleted string ids once they outnumber twice the live ones (plus
        :data:`PRUNE_SLACK`). Only with no write in flight: one may hold the int of a
        deleted id, to land after the pruning, which would leave a document the maps do
        not know."""
        with self._lock:
            if self.writing or len(self.sids) <= 2 * len(index) + PRUNE_SLACK:
                return
            self.sids = {i: self.sids[i] for i in index.ids.tolist() if i in self.sids}
            self.ints = {sid: i for i, sid in self.sids.items()}

    def known(self, sids: Iterable[str]) -> I64:
        """The ints ``(m,)`` int64 of the mapped ones among ``sids``, in order (deleted ones
        too)."""
        with self._lock:
            found = [self.ints[s] for s in sids if isinstance(s, str) and s in self.ints]
        return np.asarray(found, dtype=np.int64)
