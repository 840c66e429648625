"""What an index holds, read by id or by metadata: membership, ids, documents, vectors.

:class:`Lookups` gives ``ClusteredIndex`` these methods; each reads one published state
(and the metadata store), so a write in another thread is seen whole or not at all.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .._types import F32, I64
from ..errors import InvalidParameterError, UnknownIdError
from ..storage.filters import Filter, check_filter
from ..storage.idmap import as_ids, one_id
from ..storage.metadata import MetadataStore
from .state import IndexState

__all__ = ["Lookups"]


def _many_ids(ids: Any) -> I64:
    """``as_ids`` of a sequence: one int alone is refused (a call for many ids)."""
    if np.isscalar(ids) or getattr(ids, "ndim", None) == 0:
        raise InvalidParameterError(f"ids must be a 1-D sequence of ints, got {ids!r:.80}")
    return as_ids(ids)


class Lookups:
    """The lookups of ``ClusteredIndex`` (see the module docstring)."""

    _state: IndexState
    _metadata: MetadataStore

    if TYPE_CHECKING:

        @property
        def dim(self) -> int: ...

    def __contains__(self, id_: object) -> bool:
        """Whether a live vector has id ``id_``. Anything that cannot be an id (not an int,
        a bool, a float, negative, beyond int64) is not in the index: ``False``, no error."""
        with contextlib.suppress(InvalidParameterError):
            return (value := one_id(id_)) is not None and self._state.has(value)
        return False

    def contains(self, ids: Any) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """``(n,)`` bool: whether a live vector has each of ``ids`` (``(n,)`` ints; a
        lookup each, not a scan). ``InvalidParameterError`` for what cannot be an id."""
        return self._state.rows_of(_many_ids(ids), missing_ok=True) >= 0

    @property
    def ids(self) -> I64:
        """(n,) int64 ids of the live vectors, ascending (a copy)."""
        return self._state.idmap.items()[0].copy()

    def get_metadata(self, id_: int) -> dict[str, Any] | None:
        """The metadata of ``id_`` (``None`` if it has none). ``UnknownIdError`` if no live
        vector has this id (any int); ``InvalidParameterError`` if ``id_`` is not an int."""
        if (value := one_id(id_)) is None or not self._state.has(value):
            raise UnknownIdError(f"id {id_!r} is not in the index")
        return self._metadata.get(value)

    def get_metadata_many(
        self, ids: Any, *, missing_ok: bool = False
    ) -> list[dict[str, Any] | None]:
        """The metadata of each of ``ids`` (``(n,)`` ints), in order, read in one query of
        the metadata store: ``None`` where a vector has none. ``UnknownIdError`` if an id
        is not in the index, or, with ``missing_ok``, ``None`` for it too."""
        if not isinstance(missing_ok, bool):
            raise InvalidParameterError(f"missing_ok must be a bool, got {missing_ok!r}")
        wanted = _many_ids(ids)
        live = self._state.rows_of(wanted, missing_ok=missing_ok) >= 0
        docs = self._metadata.get_many(wanted)
        return [doc if ok else None for doc, ok in zip(docs, live.tolist(), strict=True)]

    def ids_matching(self, filter: Filter) -> I64:
        """Ids ``(m,)`` int64, ascending, of the vectors whose metadata matches ``filter``
        (a dict of conditions or a predicate, as for ``search(filter=...)``; see
        :mod:`vectordb.storage.filters`). Vectors without metadata match no dict filter."""
        filt = check_filter(filter)
        if filt is None:
            raise InvalidParameterError("ids_matching needs a filter (a dict or a callable)")
        return np.sort(self._metadata.matching(filt))

    def get_vectors(self, ids: Any) -> F32:
        """The stored vectors of ``ids``: ``(n,)`` ints in, ``(n, d)`` float32 out, in order;
        with ``metric="cosine"`` normalised to unit length. Unknown ids raise
        ``UnknownIdError``. In mmap mode the rows are read from the file (page faults)."""
        st = self._state
        rows = st.rows_of(as_ids(ids))
        if rows.size == 0:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(st.storage.take(rows), dtype=np.float32)
