"""External ids: int64 labels chosen by the user, mapped to storage rows.

Kept as two sorted arrays (ids, rows) rather than a dict: 16 bytes per vector instead of
~100, and lookups of many ids at once are one ``searchsorted``. Instances are immutable:
every change returns a new map, so a search holding the old one is undisturbed.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import numpy as np

from .._types import I64
from ..errors import DuplicateIdError, InvalidParameterError

__all__ = ["MAX_ID", "IdMap", "as_ids", "check_new_ids", "one_id"]


#: The largest id: ids are int64 >= 0 (``-1`` marks "no result" in search results).
MAX_ID = int(np.iinfo(np.int64).max)


def _bad_range(what: str, value: int) -> InvalidParameterError:
    return InvalidParameterError(
        f"{what} must be integers between 0 and 2**63 - 1 (int64 >= 0; -1 marks"
        f" 'no result'), got {value}"
    )


def _from_objects(values: Any, what: str) -> I64:
    """Ids from Python objects one by one: NumPy turns a list mixing ints beyond int64 with
    negative ones into float64 (and huge ones into objects), which would misname the fault
    or, for floats, round ids above 2**53."""
    out = []
    for v in np.asarray(values, dtype=object).reshape(-1).tolist():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise InvalidParameterError(f"{what} must be integers, got {v!r} ({type(v).__name__})")
        if not 0 <= int(v) <= MAX_ID:
            raise _bad_range(what, int(v))
        out.append(int(v))
    return np.array(out, dtype=np.int64)


def as_ids(ids: Any, what: str = "ids") -> I64:
    """Validate user ids: one integer or a 1-D sequence of them, each in ``[0, 2**63 - 1]``
    -> ``(n,)`` int64.

    Bools and floats are refused (``InvalidParameterError``), even whole-number floats:
    float64 cannot hold every int64, so ``2.0**62 + 1`` would silently name another id.
    ``-1`` marks "no result" in search results, so negative ids are refused too.
    """
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError) as exc:  # ragged nested sequences
        raise InvalidParameterError(f"{what} must be a 1-D sequence of integers: {exc}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidParameterError(
            f"{what} must be a 1-D sequence of integers, got shape {arr.shape}"
        )
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == object or (
        not isinstance(ids, np.ndarray) and np.issubdtype(arr.dtype, np.floating)
    ):
        return _from_objects(ids, what)
    if isinstance(ids, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in ids):
        raise InvalidParameterError(f"{what} must be integers, got a bool")  # [1, True] -> int64
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidParameterError(f"{what} must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and int(arr.max()) > MAX_ID:
        raise _bad_range(what, int(arr.max()))
    arr = arr.astype(np.int64, copy=False)
    if (arr < 0).any():
        raise _bad_range(what, int(arr[arr < 0][0]))
    return arr


def one_id(id_: object) -> int | None:
    """One id given alone (``in``, ``get_metadata``): an ``int`` (or NumPy integer, not a
    bool) -> that int when some vector could have it, ``None`` when none can (negative, or
    beyond int64). Anything else raises ``InvalidParameterError``."""
    if isinstance(id_, (bool, np.bool_)) or not isinstance(id_, numbers.Integral):
        raise InvalidParameterError(f"an id must be an integer, got {id_!r} ({type(id_).__name__})")
    value = int(id_)
    return value if 0 <= value <= MAX_ID else None


def check_new_ids(ids: Any, n: int) -> I64:
    """``ids`` for ``n`` new vectors as ``(n,)`` int64 (see :func:`as_ids`), distinct:
    ``InvalidParameterError`` for another count, ``DuplicateIdError`` for a repeat."""
    arr = as_ids(ids)
    if arr.shape[0] != n:
        raise InvalidParameterError(f"got {arr.shape[0]} ids for {n} vectors")
    if np.unique(arr).shape[0] != n:
        dup = arr[np.flatnonzero(np.diff(np.sort(arr)) == 0)[0]]
        raise DuplicateIdError(f"id {int(dup)} appears twice")
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
