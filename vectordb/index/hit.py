"""``Hit``: one answer of ``ClusteredIndex.query``, the document it found with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Hit"]


@dataclass(frozen=True, slots=True)
class Hit:
    """One result of :meth:`~vectordb.ClusteredIndex.query`, immutable.

    Attributes
    ----------
    id : int
        The vector's id.
    distance : float or None
        Its distance to the query vector (the index's metric, as ``search`` returns it);
        ``None`` when it was found by text alone (a text query, or a hybrid query's text
        side only).
    score : float
        What ranked it, higher is better: ``-distance`` for a vector query, the BM25 score
        (``-bm25()`` of SQLite FTS5, > 0) for a text query, the fused score for a hybrid
        one (see :mod:`vectordb.core.fusion`).
    metadata : dict or None
        Its metadata document (``None`` if it has none).
    """

    id: int
    distance: float | None
    score: float
    metadata: dict[str, Any] | None
