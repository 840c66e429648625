"""One batch of queries sent to the shards, and their answers merged.

With ``route=m`` (kmeans placement) each query goes to the ``m`` shards whose centroids
are nearest it, and each shard gets only the rows routed to it (the whole batch is
shipped once; a shard picks its rows). A shard that is unavailable fails the batch, or,
with ``allow_partial``, is left out and marked in :attr:`Answer.missing`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._types import F32, I64
from ..core.metrics import prepare
from ..engine.keys import BatchKey
from ..errors import InvalidParameterError, ShardUnavailableError
from .backends.base import Backend
from .layout import ShardLayout
from .merge import merge_topk, padding
from .placement import route as route_queries
from .replicas import ShardGroup

__all__ = ["Answer", "check_route", "cut", "fan_out"]


@dataclass(frozen=True)
class Answer:
    """A batch's merged answer: ``(nq, k)`` ids and distances, ``(nq, shards)`` bool of
    the shards asked for a row that did not answer, and their errors."""

    ids: I64
    dists: F32
    missing: np.ndarray
    errors: dict[int, ShardUnavailableError]


def cut(answer: Answer, start: int, stop: int) -> Answer:
    """Rows ``start:stop`` of ``answer``."""
    return Answer(
        answer.ids[start:stop], answer.dists[start:stop], answer.missing[start:stop], answer.errors
    )


async def fan_out(
    groups: list[ShardGroup],
    backend: Backend,
    layout: ShardLayout,
    queries: F32,
    bk: BatchKey,
    m: int | None,
    allow_partial: bool,
) -> Answer:
    """Search ``queries`` ``(nq, d)`` with ``bk``'s parameters on every shard (or the ``m``
    nearest each query) and merge: see the module docstring."""
    shards, nq, k = layout.shards, queries.shape[0], bk.k
    if m is None or layout.centroids is None:
        asked: list[tuple[int, I64 | None]] = [(s, None) for s in range(shards)]
    else:
        near = route_queries(prepare(queries, layout.metric), layout.centroids, m)
        asked = []
        for s in range(shards):
            hit = np.flatnonzero((near == s).any(axis=1))
            if hit.size:
                asked.append((s, hit))
    ref = backend.put(queries)  # once for all shards
    calls = [
        groups[s].read(
            "search",
            ref,
            rows,
            k,
            bk.probes,
            bk.rerank_factor,
            bk.filter.value,
            bk.target_recall,
        )
        for s, rows in asked
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    all_ids, all_d = padding(len(asked) * nq, k)
    all_ids, all_d = all_ids.reshape(len(asked), nq, k), all_d.reshape(len(asked), nq, k)
    missing = np.zeros((nq, shards), dtype=bool)
    errors: dict[int, ShardUnavailableError] = {}
    for i, ((s, rows), r) in enumerate(zip(asked, results, strict=True)):
        where: Any = slice(None) if rows is None else rows
        if isinstance(r, ShardUnavailableError) and allow_partial:
            missing[where, s] = True
            errors[s] = r
        elif isinstance(r, BaseException):
            raise r
        else:
            all_ids[i, where], all_d[i, where] = r
    ids, dists = merge_topk(all_ids, all_d, k)
    return Answer(ids, dists, missing, errors)


def check_route(layout: ShardLayout, route: Any) -> int | None:
    """``route`` checked against the layout (``InvalidParameterError``)."""
    if route is None:
        return None
    if layout.centroids is None:
        raise InvalidParameterError(
            "route= needs placement='kmeans' (with hash placement every shard may hold a neighbour)"
        )
    if isinstance(route, bool) or not isinstance(route, int) or not 1 <= route <= layout.shards:
        raise InvalidParameterError(
            f"route must be an integer in [1, {layout.shards}], got {route!r}"
        )
    return route
