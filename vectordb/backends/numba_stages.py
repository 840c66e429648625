"""Compiled CPU kernels of the stages around the code scan (numba): routing a few queries
on a flat tree, the error-bound cut and the rerank's choice.

Pure functions over arrays, cached and run without the GIL like :mod:`.numba_kernels`.
:func:`within_bound` and :func:`best_rows` take NumPy's float32 steps and keys
(``core.topk.within_bound``, ``search.rerank``); :func:`route_flat` sums in any order, and
its choice is trusted only where the rounding cannot change it (``search.route``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..search.route import rounding_error
from .numba_kernels import NO_KEY, TWO, ZERO, cached_jit, key_of, replace_top, score_of

__all__ = ["best_rows", "compact_rows", "route_flat", "within_bound"]

_rounding_error = cached_jit(nogil=True, inline="always")(rounding_error)


# Fast scores: any summation order is within route.rounding_bound of the exact ones, and
# the choice is trusted only where that cannot change it.
@cached_jit(nogil=True, fastmath={"reassoc", "contract"})
def route_flat(
    q: Any, centroids: Any, c_sq: Any, ip: bool, c_max: float, leaves: Any, unsure: Any
) -> None:
    """The ``keep`` leaves of best routing scores (``route.leaf_scores``) per query, where
    the rounding of the scores cannot change which: ``route``'s leaves.

    Parameters
    ----------
    q : (nq, D) float32 rotated queries
    centroids : (n_leaves, D) float32 leaf centroids; ``c_sq`` (n_leaves,) their squared
        norms
    ip : inner-product scores (``-<c, q>``; else ``|c|^2 - 2 <c, q>``)
    c_max : the largest centroid norm, for each query's ``route.rounding_bound`` (its
        formula, ``route.rounding_error``, taken of the norm in float64)
    leaves : (nq, keep) int64, overwritten with the leaves, ascending; ``keep < n_leaves``
    unsure : (nq,) bool, overwritten: the ``keep``-th and ``keep + 1``-th scores lie within
        twice the bound (the caller routes those queries the exact way)
    """
    nq, dim = q.shape
    n_leaves = centroids.shape[0]
    keep = leaves.shape[1]
    heap = np.empty(keep + 1, dtype=np.uint64)  # max-heap of (score, leaf) keys
    no_radius = np.empty(keep + 1, dtype=np.float32)
    score = np.empty(1, dtype=np.float32)
    score_bits = score.view(np.uint32)
    for qi in range(nq):
        qq = q[qi]
        q_sq = 0.0
        for d in range(dim):
            q_sq += np.float64(qq[d]) * np.float64(qq[d])
        bound = np.float32(_rounding_error(np.sqrt(q_sq), c_max, dim, ip))
        heap[:] = NO_KEY
        for leaf in range(n_leaves):
            c = centroids[leaf]
            dot = np.float32(0.0)
            for d in range(dim):
                dot += c[d] * qq[d]
            score[0] = (-dot if ip else c_sq[leaf] - TWO * dot) + ZERO
            key = key_of(score_bits[0], leaf)
            if key < heap[0]:
                replace_top(heap, no_radius, key, ZERO)
        first_dropped = score_of(heap[0], score, score_bits)
        last_kept = -np.float32(np.inf)
        for j in range(1, keep + 1):
            last_kept = max(last_kept, score_of(heap[j], score, score_bits))
            leaves[qi, j - 1] = np.int64(heap[j] & np.uint64(0xFFFFFFFF))
        leaves[qi].sort()
        unsure[qi] = not (last_kept + TWO * bound < first_dropped)


@cached_jit(nogil=True)
def within_bound(keys: Any, radius: Any, k: int, out: Any) -> None:
    """``core.topk.within_bound`` into ``out`` ``(nq, m)`` int64: the same float32 steps.

    ``keys`` ``(nq, m)`` uint64, ``radius`` ``(nq, m)`` float32, ``m > k >= 1``.
    """
    nq, m = keys.shape
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    est = np.empty(m, dtype=np.float32)
    upper = np.empty(m, dtype=np.float32)
    for qi in range(nq):
        for j in range(m):
            est[j] = score_of(keys[qi, j], scratch, scratch_bits)
            upper[j] = est[j] + radius[qi, j]
        kth = np.sort(upper)[k - 1]  # NaN last, as np.partition
        for j in range(m):
            key = keys[qi, j]
            if key == NO_KEY or est[j] - radius[qi, j] > kth:
                out[qi, j] = -1
            else:
                out[qi, j] = np.int64(key & np.uint64(0xFFFFFFFF))


@cached_jit(nogil=True)
def best_rows(dist: Any, rows: Any, k: int, out_rows: Any, out_dist: Any) -> None:
    """The rerank's choice (``search.rerank``): the ``k`` best ``(distance, row)`` keys of
    each query, ascending.

    Parameters
    ----------
    dist : (nq, m) float32 exact distances (``inf`` where ``rows`` is ``-1``)
    rows : (nq, m) int64 candidate rows, ``-1`` for none
    k : results per query, ``<= out_rows.shape[1]``
    out_rows : (nq, k) int64, overwritten: best first, ``-1`` where the distance is
        ``inf`` or no candidate is left
    out_dist : (nq, k) float32, overwritten: ascending, ``inf`` padded
    """
    nq, m = rows.shape
    bits = np.empty(m, dtype=np.float32)
    as_int = bits.view(np.uint32)
    keys = np.empty(m, dtype=np.uint64)
    column = np.empty(m, dtype=np.int64)
    for qi in range(nq):
        n = 0
        for j in range(m):
            row = rows[qi, j]
            if row < 0:
                continue
            bits[n] = dist[qi, j] + ZERO  # -0.0 -> +0.0, as keys_of
            keys[n] = key_of(as_int[n], row)
            column[n] = j
            n += 1
        order = np.argsort(keys[:n])  # equal keys: one row twice, the same distance
        for j in range(k):
            if j < n:
                c = column[order[j]]
                d = dist[qi, c]  # as measured (-0.0 stays -0.0)
                out_dist[qi, j] = d
                out_rows[qi, j] = -1 if np.isinf(d) else rows[qi, c]
            else:
                out_dist[qi, j] = np.inf
                out_rows[qi, j] = -1


@cached_jit(nogil=True)
def compact_rows(rows: Any, out: Any) -> None:
    """Each row of ``rows`` ``(nq, m)`` int64 with its ``-1`` entries moved to the end, in
    order, into ``out`` ``(nq, w)`` (``w`` at least the most valid entries of a row; the rest
    ``-1``)."""
    nq, m = rows.shape
    w = out.shape[1]
    for qi in range(nq):
        n = 0
        for j in range(m):
            if rows[qi, j] >= 0:
                out[qi, n] = rows[qi, j]
                n += 1
        for j in range(n, w):
            out[qi, j] = -1
