"""External ids: int64 labels chosen by the user, mapped to storage rows.

Kept as two sorted arrays (ids, rows) rather than a dict: 16 bytes per vector instead of
~100, and lookups of many ids at once are one ``searchsorted``. Instances are immutable:
every change returns a new map, so a search holding the old one is undisturbed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidParameterError

__all__ = ["IdMap", "as_ids"]

I64 = npt.NDArray[np.int64]


def as_ids(ids: Any, what: str = "ids") -> I64:
    """Validate user ids: a 1-D sequence of integers >= 0 -> ``(n,)`` int64.

    ``-1`` marks "no result" in search results, so negative ids are refused.
    """
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidParameterError(
            f"{what} must be a 1-D sequence of integers, got shape {arr.shape}"
        )
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise InvalidParameterError(f"{what} must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
        raise InvalidParameterError(f"{what} must fit in int64")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise InvalidParameterError(
            f"{what} must be >= 0 (-1 marks 'no result'), got {int(arr[arr < 0][0])}"
        )
    return arr


class IdMap:
    """Immutable id -> row map: the live storage rows, ordered by their ids.

    Holds one int64 per live vector, plus a sorted copy of the ids once a lookup needed
    it (so an index that is only searched pays 8 bytes per vector, not 16).
    """

    def __init__(self, row_id: I64, order: I64) -> None:
        """``order``: live rows sorted by ``row_id``; use :meth:`from_rows` otherwise."""
        self._row_id = row_id
        self._order = order

    @classmethod
    def from_rows(cls, row_id: I64, live_rows: I64) -> IdMap:
        return cls(row_id, live_rows[np.argsort(row_id[live_rows], kind="stable")])

    def __len__(self) -> int:
        return int(self._order.shape[0])

    @property
    def nbytes(self) -> int:
        cached = self.__dict__.get("_sorted_ids")
        return int(self._order.nbytes) + (int(cached.nbytes) if cached is not None else 0)

    @functools.cached_property
    def _sorted_ids(self) -> I64:
        return self._row_id[self._order]

    @property
    def max_id(self) -> int:
        return int(self._row_id[self._order[-1]]) if len(self) else -1

    def rows(self, ids: I64) -> I64:
        """Rows of ``ids``; ``-1`` where an id is not present."""
        if not len(self):
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self) - 1)
        rows = self._order[pos]
        return np.where(self._row_id[rows] == ids, rows, -1)

    def with_added(self, row_id: I64, rows: I64) -> IdMap:
        """A new map over ``row_id`` (the old array, extended) with new live ``rows``."""
        new = rows[np.argsort(row_id[rows], kind="stable")]
        pos = np.searchsorted(self._sorted_ids, row_id[new])
        return IdMap(row_id, np.insert(self._order, pos, new))

    def without(self, ids: I64) -> IdMap:
        """A new map without ``ids`` (ids that are not present are ignored)."""
        rows = self.rows(ids)
        return IdMap(self._row_id, self._order[~np.isin(self._order, rows[rows >= 0])])

    def items(self) -> tuple[I64, I64]:
        """(ids, rows) of the live vectors, sorted by id."""
        return self._sorted_ids, self._order
