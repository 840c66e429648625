"""The last stage of a search: exact distances to the candidates, best ``k`` kept.

A pure function over arrays and a ``take`` that reads storage rows (RAM or a memory-mapped
file): the rerank reads only the candidates' full vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._types import F32, I64
from ..core.metrics import Metric, distances
from ..core.topk import NO_KEY, keys_of

__all__ = ["rerank"]


#: Bytes of gathered float32 vectors per rerank block: small enough to stay in the CPU's
#: cache while the distances are taken (64 MiB blocks ran 2x slower end to end).
_RERANK_BLOCK_BYTES = 1 << 20


def rerank(
    queries: F32,
    rows: I64,
    k: int,
    take: Callable[[I64], F32],
    metric: Metric,
) -> tuple[I64, F32]:
    """Exact distances to candidate rows, best ``k`` per query.

    Parameters
    ----------
    queries : (nq, d) float32, prepared (not rotated) queries
    rows : (nq, m) int64 candidate storage rows, ``-1`` for none (read nothing)
    k : results per query
    take : reads storage rows ``(r,)`` int64 -> ``(r, d)`` float32

    Returns
    -------
    rows : (nq, k) int64, best first, ``-1`` padded
    dists : (nq, k) float32, ascending, ``inf`` padded. Ties are ordered by row.
    """
    nq, m = rows.shape
    d = queries.shape[1]
    out_rows = np.full((nq, k), -1, dtype=np.int64)
    out_dist = np.full((nq, k), np.inf, dtype=np.float32)
    valid = rows >= 0
    width = int(valid.sum(axis=1).max(initial=0))
    if width < m:  # candidates pruned by their bounds: read only the others
        order = np.argsort(~valid, axis=1, kind="stable")[:, :width]
        rows = np.take_along_axis(rows, order, axis=1)
        m = width
    if m == 0:
        return out_rows, out_dist
    block = max(1, _RERANK_BLOCK_BYTES // (m * d * 4))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        r = rows[start:stop]
        valid = r >= 0
        vecs = take(np.where(valid, r, 0).ravel()).reshape(stop - start, m, d)
        dist = distances(queries[start:stop], vecs, metric, overwrite_x=True)
        dist[~valid] = np.inf
        # (distance, row) keys: equal distances go to the lower row, whatever order the
        # candidates came in.
        keys = keys_of(dist, np.maximum(r, 0))
        keys[~valid] = NO_KEY
        kk = min(k, m)
        pick = np.argpartition(keys, kk - 1, axis=1)[:, :kk] if kk < m else None
        if pick is not None:
            keys = np.take_along_axis(keys, pick, axis=1)
        order = np.argsort(keys, axis=1)
        if pick is not None:
            order = np.take_along_axis(pick, order, axis=1)
        r = np.take_along_axis(r, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        r = np.where(np.isinf(dist), -1, r)
        out_rows[start:stop, :kk] = r
        out_dist[start:stop, :kk] = dist
    return out_rows, out_dist
