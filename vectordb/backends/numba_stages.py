"""Compiled CPU kernels of the stages around the code scan (numba): routing a few queries
on a flat tree, the error-bound cut and the rerank.

Pure functions over arrays, cached and run without the GIL like :mod:`.numba_kernels`.
:func:`within_bound` takes NumPy's float32 steps and keys (``core.topk.within_bound``);
:func:`route_flat` sums in any order, and its choice is trusted only where the rounding
cannot change it (``search.route``).
:func:`rerank_rows` reads each candidate's row where it lies (no gathered copy) and sums its
distance in float64, rounded once to float32: the exact distance's nearest float32 but for
about one pair in 10^8 (NumPy's float32 sums are a few units in the last place off).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..search.route import rounding_error
from .numba_kernels import (
    NO_KEY,
    TWO,
    ZERO,
    cached_jit,
    key_of,
    prefetch_row,
    replace_top,
    row_of,
    score_of,
)

__all__ = [
    "COSINE",
    "IP",
    "L2",
    "rerank_rows",
    "route_flat",
    "within_bound",
]

#: Metric codes of :func:`rerank_rows`.
L2, COSINE, IP = 0, 1, 2

_rounding_error = cached_jit(nogil=True, inline="always")(rounding_error)


# Fast scores: any summation order is within route.rounding_bound of the exact ones, and
# the choice is trusted only where that cannot change it.
@cached_jit(nogil=True, fastmath={"reassoc", "contract"})
def route_flat(
    q: Any,
    centroids: Any,
    c_sq: Any,
    ip: bool,
    c_max: float,
    sizes: Any,
    leaves: Any,
    held: Any,
    unsure: Any,
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
    sizes : (n_leaves,) int64 rows per leaf
    leaves : (nq, keep) int64, overwritten with the leaves, ascending; ``keep < n_leaves``
    held : (nq,) int64, overwritten: the rows the leaves hold (by ``sizes``)
    unsure : (nq,) bool, overwritten: the ``keep``-th and ``keep + 1``-th scores lie within
        twice the bound (the caller routes those queries the exact way)
    """
    nq, dim = q.shape
    n_leaves = centroids.shape[0]
    keep = leaves.shape[1]
    scores = np.empty(n_leaves, dtype=np.float32)
    score_bits = scores.view(np.uint32)
    heap = np.empty(keep + 1, dtype=np.uint64)  # max-heap of (score, leaf) keys
    no_radius = np.empty(keep + 1, dtype=np.float32)
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    for qi in range(nq):
        qq = q[qi]
        q_sq = 0.0
        for d in range(dim):
            q_sq += np.float64(qq[d]) * np.float64(qq[d])
        bound = np.float32(_rounding_error(np.sqrt(q_sq), c_max, dim, ip))
        # All scores first, then the choice: the dot products' loop stays vectorised
        # (interleaved with the heap it ran 20% slower).
        for leaf in range(n_leaves):
            c = centroids[leaf]
            dot = np.float32(0.0)
            for d in range(dim):
                dot += c[d] * qq[d]
            scores[leaf] = (-dot if ip else c_sq[leaf] - TWO * dot) + ZERO
        heap[:] = NO_KEY
        for leaf in range(n_leaves):
            key = key_of(score_bits[leaf], leaf)
            if key < heap[0]:
                replace_top(heap, no_radius, key, ZERO)
        first_dropped = score_of(heap[0], scratch, scratch_bits)
        last_kept = -np.float32(np.inf)
        rows = 0
        for j in range(1, keep + 1):
            last_kept = max(last_kept, score_of(heap[j], scratch, scratch_bits))
            leaf = row_of(heap[j])
            leaves[qi, j - 1] = leaf
            rows += sizes[leaf]
        leaves[qi].sort()
        held[qi] = rows
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
            out[qi, j] = -1 if est[j] - radius[qi, j] > kth else row_of(key)


# Not inlined into the caller (numba would compile it with the caller's strict flags).
@cached_jit(nogil=True, fastmath={"reassoc"})
def _distance(q: Any, v: Any, metric: int) -> Any:
    """The float32 distance of prepared query ``q`` ``(d,)`` to row ``v`` ``(d,)`` (both
    float32): float64 sums of exact float32 products, in any order, rounded once."""
    acc = 0.0
    if metric == L2:
        for t in range(q.shape[0]):
            diff = np.float64(v[t]) - np.float64(q[t])
            acc += diff * diff
        return np.float32(acc)
    for t in range(q.shape[0]):
        acc += np.float64(v[t]) * np.float64(q[t])
    return np.float32(1.0 - acc) if metric == COSINE else np.float32(-acc)


#: Candidates whose rows the rerank asks the CPU to load ahead of their distances (16
#: took a cold rerank of 68 rows of 384 d from 28 to 16 us here; 8 to 68 gave as much).
_AHEAD = 16


@cached_jit(nogil=True, inline="always")
def _prefetch_candidate(row: Any, first: Any, second: Any) -> None:
    """:func:`.prefetch_row` of storage row ``row`` (see :func:`rerank_rows`; none if -1)."""
    if row < 0:
        return
    if row < first.shape[0]:
        prefetch_row(first, row)
    else:
        prefetch_row(second, row - first.shape[0])


@cached_jit(nogil=True)
def rerank_rows(
    q: Any, rows: Any, first: Any, second: Any, metric: int, out_rows: Any, out_dist: Any
) -> None:
    """``search.rerank.rerank`` with each distance rounded once (see the module docstring):
    the ``k`` best ``(distance, row)`` keys of each query, ascending.

    Parameters
    ----------
    q : (nq, d) float32 prepared (not rotated) queries
    rows : (nq, m) int64 candidate storage rows, ``-1`` for none (read nothing)
    first, second : (n1, d) and (n2, d) float32, the store's rows: row ``r`` is
        ``first[r]`` below ``n1``, else ``second[r - n1]``
    metric : ``L2``, ``COSINE`` or ``IP``
    out_rows : (nq, k) int64, overwritten: best first, ``-1`` where the distance is
        ``inf`` or no candidate is left
    out_dist : (nq, k) float32, overwritten: ascending, ``inf`` padded
    """
    nq, m = rows.shape
    k = out_rows.shape[1]
    n_first, n_rows = first.shape[0], first.shape[0] + second.shape[0]
    size = min(k, m)  # a k past the candidates keeps no more (k may be huge)
    heap = np.empty(size, dtype=np.uint64)  # max-heap of (distance, row) keys
    kept = np.empty(size, dtype=np.float32)  # their distances as measured (-0.0 stays)
    bits = np.empty(1, dtype=np.float32)
    as_int = bits.view(np.uint32)
    for qi in range(nq):
        heap[:] = NO_KEY
        qq = q[qi]
        for j in range(min(m, _AHEAD)):
            _prefetch_candidate(rows[qi, j], first, second)
        found = 0
        for j in range(m):
            if j + _AHEAD < m:
                _prefetch_candidate(rows[qi, j + _AHEAD], first, second)
            row = rows[qi, j]
            if row < 0:
                continue
            if row >= n_rows:
                raise IndexError("a candidate row past the store's rows")
            if row < n_first:
                d = _distance(qq, first[row], metric)
            else:
                d = _distance(qq, second[row - n_first], metric)
            bits[0] = d + ZERO  # -0.0 -> +0.0, as keys_of
            key = key_of(as_int[0], row)
            found += 1
            if size > 0 and key < heap[0]:
                replace_top(heap, kept, key, d)
        n = min(found, size)  # the heap's largest slots hold NO_KEY past the found
        order = np.argsort(heap)[:n]
        for j in range(k):
            if j < n and not np.isinf(kept[order[j]]):
                out_rows[qi, j] = row_of(heap[order[j]])
                out_dist[qi, j] = kept[order[j]]
            else:
                out_rows[qi, j] = -1
                out_dist[qi, j] = np.inf
