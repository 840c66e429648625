"""Score the leaves that queries probe, grouped by leaf, and keep each query's best rows.

Pure array code over a *scorer*: anything with
``score(queries, leaf, part, a, b) -> (nq, b - a) float32`` for slots ``a:b`` of a ``Part``. Used
with binary codes by the NumPy backend and with full vectors by ``leaf_scan="vectors"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .parts import Part
from .topk import NO_KEY, candidate_keys, rows_of, smallest

__all__ = ["LeafScorer", "leaf_sizes", "select_candidates"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]

#: Entries of the (queries, leaf slots, candidates) buffer per block of queries.
_CANDIDATE_BLOCK = 1 << 22


class LeafScorer(Protocol):
    """Scores some slots of one part for the queries that probe their leaf."""

    def score(self, q: F32, leaf: int, part: Part, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 scores of slots ``a:b`` of ``part`` (all in ``leaf``)."""
        ...


def leaf_sizes(parts: Sequence[Part], row_ok: B | None = None) -> I64:
    """(n_leaves,) int64 slots per leaf over ``parts``; only rows with ``row_ok`` if given."""
    total = np.zeros(parts[0].offsets.shape[0] - 1, dtype=np.int64)
    for part in parts:
        if row_ok is None:
            total += np.diff(part.offsets)
        elif part.size:
            ok = row_ok[part.all_rows].astype(np.int64)
            total += np.diff(np.concatenate([[0], np.cumsum(ok)])[part.offsets])
    return total


def select_candidates(
    scorer: LeafScorer,
    parts: Sequence[Part],
    queries: F32,
    leaves: I64,
    m: int,
    row_ok: B | None = None,
) -> I64:
    """The ``m`` rows of the given leaves with the best scores, per query.

    Work is grouped by leaf: every leaf is scored once against all the queries that probe
    it, as one (queries x slots) block per part. Selection is exact and tie-free (see
    ``topk``): the ``m`` smallest scores, ties to the lower row. Rows without ``row_ok``
    (deleted, or filtered out) are never selected.

    Parameters
    ----------
    scorer : scores slots of a part for several queries
    parts : the index's parts (base, delta)
    queries : (nq, d') float32, in the space the scorer expects (rotated for codes)
    leaves : (nq, L) int64 leaf numbers per query, ``-1`` padded
    m : candidates wanted per query
    row_ok : (R,) bool over storage rows, or ``None`` for all

    Returns
    -------
    (nq, m') int64 storage rows, ``-1`` where fewer exist, unsorted;
    ``m' = min(m, L * max leaf size)``
    """
    nq, n_slots = leaves.shape
    max_leaf_rows = int(leaf_sizes(parts).max(initial=0))
    per_slot = max(1, min(m, max_leaf_rows))
    keep = min(m, n_slots * per_slot)
    out = np.empty((nq, keep), dtype=np.int64)
    block = max(1, _CANDIDATE_BLOCK // (n_slots * per_slot))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        keys = _score_block(
            scorer, parts, queries[start:stop], leaves[start:stop], per_slot, row_ok
        )
        out[start:stop] = rows_of(smallest(keys.reshape(stop - start, -1), keep))
    return out


def _score_block(
    scorer: LeafScorer,
    parts: Sequence[Part],
    q: F32,
    leaves: I64,
    per_slot: int,
    row_ok: B | None,
) -> U64:
    """Keys of the best ``per_slot`` rows of each (query, leaf slot): ``(nq, L, per_slot)``."""
    nq, n_slots = leaves.shape
    keys = np.full((nq, n_slots, per_slot), NO_KEY, dtype=np.uint64)
    qi, slot = np.nonzero(leaves >= 0)
    leaf = leaves[qi, slot]
    by_leaf = np.argsort(leaf, kind="stable")
    qi, slot, leaf = qi[by_leaf], slot[by_leaf], leaf[by_leaf]
    bounds = np.flatnonzero(np.diff(leaf)) + 1
    for group in np.split(np.arange(leaf.shape[0]), bounds):
        if group.shape[0] == 0:
            continue
        lf = int(leaf[group[0]])
        gq, gs = qi[group], slot[group]
        found: list[U64] = []
        for part in parts:
            a, b = int(part.offsets[lf]), int(part.offsets[lf + 1])
            if a == b:
                continue
            est = scorer.score(q[gq], lf, part, a, b)
            part_keys = candidate_keys(est, part.row_range(a, b), row_ok)
            found.append(smallest(part_keys, per_slot))
        if found:
            best = smallest(np.concatenate(found, axis=1), per_slot)
            keys[gq, gs, : best.shape[1]] = best
    return keys
