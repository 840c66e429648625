"""The ids a dict filter matched, kept for the next search with the same filter.

SQLite evaluates a dict filter by parsing every document's JSON (~2 us each: 240 ms over
110,000 documents), and a search asks for the same filter again and again. A
:class:`FilterCache` keeps the answers, least recently used first out, at most
:data:`MAX_ENTRIES` of them and :data:`MAX_BYTES` of ids in all; an answer larger than
that is not kept. An entry is keyed by the filter's compiled SQL and parameters (one key
per meaning: ``True`` and ``1`` compile alike) and holds the store's change count
(:attr:`MetadataStore.version`) it was computed at: it answers only while the documents
are unchanged. Callable filters are never cached (Python code may read anything).
Not thread-safe by itself: the metadata store uses it under its own lock, so that an
answer and the version it belongs to are read and written together.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .._types import I64

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "FilterCache", "filter_key"]

#: Filters whose matches are kept.
MAX_ENTRIES = 32
#: Bytes of matched ids kept in all (8 bytes an id).
MAX_BYTES = 64 << 20


def filter_key(sql: str, params: list[Any]) -> tuple[Any, ...]:
    """The key of a compiled filter: its SQL and each parameter with its type (so that
    ``"1"`` and ``1`` differ; ``1`` and ``1.0`` do not, and compare equal in SQLite too)."""
    return (sql, *((type(p) is str, p) for p in params))


class FilterCache:
    """Matched ids ``(m,)`` int64, read-only, by filter key, all of one change count:
    a newer one empties it."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self._entries: OrderedDict[tuple[Any, ...], I64] = OrderedDict()
        self._version = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...], version: int) -> I64 | None:
        """The ids kept for ``key`` at ``version``, or ``None``."""
        self._at(version)
        ids = self._entries.get(key)
        if ids is not None:
            self._entries.move_to_end(key)
        return ids

    def put(self, key: tuple[Any, ...], version: int, ids: I64) -> I64:
        """Keep ``ids`` (made read-only) for ``key`` at ``version``; return them."""
        ids.setflags(write=False)
        self._at(version)
        if ids.nbytes > self._max_bytes:
            return ids
        if key in self._entries:
            self._drop(key)
        self._entries[key] = ids
        self.nbytes += ids.nbytes
        while len(self._entries) > self._max_entries or self.nbytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
        return ids

    def _at(self, version: int) -> None:
        if version != self._version:
            self._entries.clear()
            self.nbytes = 0
            self._version = version

    def _drop(self, key: tuple[Any, ...]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
