"""Search stages after routing: score leaf codes, keep the best candidates, rerank exactly.

Pure functions over arrays; the index supplies its arrays and storage. Shapes use ``nq``
queries, ``L`` leaf slots per query, ``w`` code words, ``d`` dimensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .backends import NumpyBackend
from .codes import estimate, pack_signs
from .metrics import Metric, distances
from .topk import NO_KEY, keys_of, rows_of, smallest

__all__ = [
    "CodeScorer",
    "CodeTable",
    "LeafScorer",
    "VectorScorer",
    "rerank",
    "select_candidates",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

#: Entries of the (queries, leaf slots, candidates) buffer per block of queries.
_CANDIDATE_BLOCK = 1 << 22
_FMAX = float(np.finfo(np.float32).max)
#: Bytes of gathered float32 vectors per rerank block: small enough to stay in the CPU's
#: cache while the distances are taken (64 MiB blocks ran 2x slower end to end).
_RERANK_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class CodeTable:
    """Everything candidate scoring reads, in storage order.

    Attributes
    ----------
    codes : (w, n) uint64, word-major residual codes
    norms : (n,) float32, residual norms ``|x - c_leaf|``
    dots : (n,) float32 ``<x - c_leaf, c_leaf>`` for ``Metric.IP``, else ``None``
    centroids : (n_nodes, bits) float32, the tree's node centroids in the rotated space
        (shared with the tree, not counted in ``nbytes``)
    leaf_nodes : (n_leaves,) int64, tree node of every leaf
    cos_lut : (bits + 1,) float32, ``cos(pi * h / bits)``
    metric : the index's metric
    """

    codes: U64
    norms: F32
    dots: F32 | None
    centroids: F32
    leaf_nodes: I64
    cos_lut: F32
    metric: Metric

    @property
    def nbytes(self) -> int:
        arrays: list[npt.NDArray[Any]] = [
            self.codes,
            self.norms,
            self.leaf_nodes,
            self.cos_lut,
        ]
        if self.dots is not None:
            arrays.append(self.dots)
        return sum(int(a.nbytes) for a in arrays)


class CodeScorer:
    """Estimated distances from a leaf's binary codes (the default, for d >= 128)."""

    def __init__(self, table: CodeTable, leaf_offsets: I64, backend: NumpyBackend) -> None:
        self.table = table
        self.backend = backend
        self.leaf_offsets = leaf_offsets

    def score(self, q: F32, leaf: int, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 estimates for rotated queries ``q`` ``(nq, bits)``."""
        table = self.table
        centre = table.centroids[table.leaf_nodes[leaf]]
        residual = q - centre
        r_q = np.sqrt(np.einsum("qd,qd->q", residual, residual))
        hamming = self.backend.hamming(pack_signs(residual), table.codes[:, a:b])
        # einsum, not a BLAS product: per-row results must not depend on the batch's size.
        c_q = np.einsum("qd,d->q", q, centre) if table.metric is Metric.IP else None
        dots = table.dots[a:b] if table.dots is not None else None
        with np.errstate(over="ignore", invalid="ignore"):
            return estimate(hamming, table.norms[a:b], r_q, table.cos_lut, table.metric, dots, c_q)


class VectorScorer:
    """Exact distances from a leaf's full vectors, for low dimensions where 1-bit codes
    cannot rank (GloVe-50: recall@10 0.42 by codes at the defaults).

    Leaves are contiguous rows of the vector file, so in mmap mode this reads whole pages
    in order.
    """

    def __init__(self, vectors: Callable[[], F32], leaf_offsets: I64, metric: Metric) -> None:
        self.vectors = vectors
        self.leaf_offsets = leaf_offsets
        self.metric = metric

    def score(self, q: F32, leaf: int, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 distances for prepared queries ``q`` ``(nq, d)``."""
        x = self.vectors()[a:b]
        # A BLAS product, 5-10x faster than einsum here. Its rounding depends on the batch
        # size, but these scores only pick candidates: the rerank recomputes their distances
        # batch-independently, so only a tie at the last candidate's score could differ.
        dots = q @ x.T
        if self.metric is Metric.L2:
            return (
                np.einsum("nd,nd->n", x, x)[None, :]
                - 2.0 * dots
                + np.einsum("qd,qd->q", q, q)[:, None]
            )
        return np.float32(1.0) - dots if self.metric is Metric.COSINE else -dots


LeafScorer = CodeScorer | VectorScorer


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
    rows : (nq, m) int64 candidate storage rows, ``-1`` for none
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
    if m == 0:
        return out_rows, out_dist
    block = max(1, _RERANK_BLOCK_BYTES // (m * d * 4))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        r = rows[start:stop]
        valid = r >= 0
        vecs = take(np.where(valid, r, 0).ravel()).reshape(stop - start, m, d)
        dist = distances(queries[start:stop], vecs, metric)
        dist[~valid] = np.inf
        kk = min(k, m)
        if kk < m:
            pick = np.argpartition(dist, kk - 1, axis=1)[:, :kk]
            dist = np.take_along_axis(dist, pick, axis=1)
            r = np.take_along_axis(r, pick, axis=1)
        order = np.lexsort((r, dist), axis=1)
        r = np.take_along_axis(r, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        r = np.where(np.isinf(dist), -1, r)
        out_rows[start:stop, :kk] = r
        out_dist[start:stop, :kk] = dist
    return out_rows, out_dist
