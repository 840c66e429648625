"""Score the leaves that queries probe, grouped by leaf, and keep each query's best rows.

Pure array code over a *scorer*: anything with ``leaf_offsets`` and
``score(queries, leaf, a, b) -> (nq, b - a) float32``. Used with binary codes by the NumPy
backend and with full vectors by ``leaf_scan="vectors"``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from .topk import NO_KEY, keys_of, rows_of, smallest

__all__ = ["LeafScorer", "select_candidates"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

#: Entries of the (queries, leaf slots, candidates) buffer per block of queries.
_CANDIDATE_BLOCK = 1 << 22
_FMAX = float(np.finfo(np.float32).max)


class LeafScorer(Protocol):
    """Scores the rows of one leaf for the queries that probe it."""

    leaf_offsets: I64

    def score(self, q: F32, leaf: int, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 scores of storage rows ``a:b`` (leaf ``leaf``)."""
        ...


def select_candidates(scorer: LeafScorer, queries: F32, leaves: I64, m: int) -> I64:
    """The ``m`` rows of the given leaves with the best scores, per query.

    Work is grouped by leaf: every leaf is scored once against all the queries that probe
    it, as one (queries x rows) block. Selection is exact and tie-free (see ``topk``): the
    ``m`` smallest scores, ties to the lower row.

    Parameters
    ----------
    scorer : scores one leaf for several queries
    queries : (nq, d') float32, in the space the scorer expects (rotated for codes)
    leaves : (nq, L) int64 leaf numbers per query, ``-1`` padded
    m : candidates wanted per query

    Returns
    -------
    (nq, m') int64 storage rows, ``-1`` where fewer exist, unsorted;
    ``m' = min(m, L * max leaf size)``
    """
    nq, n_slots = leaves.shape
    max_leaf_rows = int(np.diff(scorer.leaf_offsets).max(initial=0))
    per_slot = max(1, min(m, max_leaf_rows))
    keep = min(m, n_slots * per_slot)
    out = np.empty((nq, keep), dtype=np.int64)
    block = max(1, _CANDIDATE_BLOCK // (n_slots * per_slot))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        keys = _score_block(scorer, queries[start:stop], leaves[start:stop], per_slot)
        out[start:stop] = rows_of(smallest(keys.reshape(stop - start, -1), keep))
    return out


def _score_block(scorer: LeafScorer, q: F32, leaves: I64, per_slot: int) -> U64:
    """Keys of the best ``per_slot`` rows of each (query, leaf slot): ``(nq, L, per_slot)``."""
    nq, n_slots = leaves.shape
    keys = np.full((nq, n_slots, per_slot), NO_KEY, dtype=np.uint64)
    qi, slot = np.nonzero(leaves >= 0)
    leaf = leaves[qi, slot]
    by_leaf = np.argsort(leaf, kind="stable")
    qi, slot, leaf = qi[by_leaf], slot[by_leaf], leaf[by_leaf]
    bounds = np.flatnonzero(np.diff(leaf)) + 1
    offsets = scorer.leaf_offsets
    for group in np.split(np.arange(leaf.shape[0]), bounds):
        if group.shape[0] == 0:
            continue
        lf = int(leaf[group[0]])
        a, b = int(offsets[lf]), int(offsets[lf + 1])
        if a == b:
            continue
        gq, gs = qi[group], slot[group]
        leaf_est = scorer.score(q[gq], lf, a, b)
        # Huge vectors overflow float32 scores; keep them ordered and distinct from padding.
        np.nan_to_num(leaf_est, copy=False, nan=_FMAX, posinf=_FMAX, neginf=-_FMAX)
        best = smallest(keys_of(leaf_est, np.arange(a, b)), per_slot)
        keys[gq, gs, : best.shape[1]] = best
    return keys
