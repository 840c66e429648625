"""Fusion of ranked lists (vector hits, text hits) into one ranking: pure functions.

``rrf``: reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): an id's score is
the sum over the lists it is in of ``1 / (RRF_K + rank)``, ranks counted from 1, with the
customary constant ``RRF_K = 60``. It needs no comparable scores, only orders.

``weighted``: each list's scores min-max normalised to ``[0, 1]`` (all equal: 1), then
``alpha * vector + (1 - alpha) * text``, an id absent from a list taking 0 there;
``alpha = 1`` ranks by the vector side alone, ``0`` by the text side alone (LlamaIndex's
convention).

Ties keep the first appearance: the first list's order, then the second's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._types import F64, I64

__all__ = ["RRF_K", "rrf", "weighted"]

#: The constant of reciprocal rank fusion.
RRF_K = 60


def _top(scores: dict[int, float], k: int) -> tuple[I64, F64]:
    ids = np.fromiter(scores, dtype=np.int64, count=len(scores))
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    order = np.argsort(-values, kind="stable")[:k]
    return ids[order], values[order]


def rrf(lists: Sequence[I64], k: int, c: int = RRF_K) -> tuple[I64, F64]:
    """The ``k`` best ids of ``lists`` (each ``(m_i,)`` int64, best first, distinct ids) by
    reciprocal rank fusion: ids ``(<= k,)`` int64 and scores float64, best first."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, id_ in enumerate(ranked.tolist(), start=1):
            scores[id_] = scores.get(id_, 0.0) + 1.0 / (c + rank)
    return _top(scores, k)


def _normalised(values: F64) -> F64:
    if values.size == 0:
        return values
    low, span = float(values.min()), float(values.max() - values.min())
    return (values - low) / span if span > 0 else np.ones_like(values)


def weighted(
    vector: tuple[I64, F64], text: tuple[I64, F64], alpha: float, k: int
) -> tuple[I64, F64]:
    """The ``k`` best ids of a vector list and a text list, each ``(ids (m,) int64,
    scores (m,) float64, higher better)``, by ``alpha`` times the normalised vector score
    plus ``1 - alpha`` times the normalised text score; ids and fused scores, best first."""
    scores: dict[int, float] = {}
    for (ids, values), weight in ((vector, alpha), (text, 1.0 - alpha)):
        for id_, v in zip(ids.tolist(), _normalised(values).tolist(), strict=True):
            scores[id_] = scores.get(id_, 0.0) + weight * v
    return _top(scores, k)
