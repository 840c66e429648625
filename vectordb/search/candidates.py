"""The candidate stage: score the leaves that queries probe and keep each query's best rows.

Pure array code over a *scorer*: anything with
``score(queries, leaf, part, a, b) -> (scores, radius)``, ``(nq, b - a)`` float32 each, for slots
``a:b`` of a ``Part``; ``radius`` bounds each score's error (``None``: no bound, so
nothing is pruned). Used with binary
codes by the NumPy backend and with full vectors by ``leaf_scan="vectors"``. Selection returns
the candidates' keys and radii, which ``core.topk.within_bound`` turns into the rows the rerank
must check.

Most scanned rows cannot make a query's top ``m``, and sorting them out one leaf at a
time would cost a partition per (query, leaf). Instead every query carries a *bound*: the
``m``-th best score among the rows of one leaf it has scanned, an upper bound of its final
``m``-th best. A leaf keeps only the rows at or under the bound, by one comparison per
row; a query that keeps more than ``m`` rows of one leaf lowers its bound to their
``m``-th best. The survivors of each query are ranked by ``topk`` keys at the end. Queries
probing many leaves scan their *seed* leaf (``leaves[:, 0]``, the nearest one after
routing) first, in a pass of its own, so that their bound starts tight. The bound only
prunes rows that cannot be chosen, so the result is the exact top ``m`` (ties to the
lower row), whatever the order of the leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from .._types import F32, I64, U64, Mask
from ..core.metrics import Metric
from ..core.parts import Part, leaf_sizes
from ..core.topk import FMAX, NO_KEY, best_keys, clamp_scores, keys_of

__all__ = [
    "LeafScorer",
    "VectorScorer",
    "VectorSelector",
    "candidate_width",
    "mostly_apart",
    "select_by_runs",
    "select_candidates",
    "smallest_with",
]


#: Scores held at once per block of queries (one leaf's rows times the block's queries).
_SCORE_BLOCK = 1 << 22
#: Queries probing at least this many leaves get a seed pass (see the module docstring).
_SEED_MIN_LEAVES = 8


class LeafScorer(Protocol):
    """Scores some slots of one part for the queries that probe their leaf."""

    def score(self, q: F32, leaf: int, part: Part, a: int, b: int) -> tuple[F32, F32 | None]:
        """``(nq, b - a)`` float32 scores of slots ``a:b`` of ``part`` (all in ``leaf``) and
        their error bounds (same shape), or ``None`` for none known."""
        ...


def candidate_width(m: int, n_slots: int, max_leaf_rows: int) -> int:
    """Columns of a candidate matrix: ``m``, or fewer when ``n_slots`` probed leaves of at
    most ``max_leaf_rows`` rows each cannot hold ``m`` rows."""
    return min(m, n_slots * max(1, min(m, max_leaf_rows)))


def mostly_apart(leaves: I64, n_leaves: int, shared: int) -> bool:
    """Whether the batch's probed leaves are shared by fewer than ``shared`` queries on
    average (``leaves`` ``(nq, L)``, ``-1`` padded)."""
    if leaves.shape[0] < shared:
        return True
    probed = leaves[leaves >= 0]
    present = np.zeros(n_leaves, dtype=bool)
    present[probed] = True
    return probed.shape[0] < shared * max(int(present.sum()), 1)


def select_candidates(
    scorer: LeafScorer,
    parts: Sequence[Part],
    queries: F32,
    leaves: I64,
    m: int,
    row_ok: Mask | None = None,
) -> tuple[U64, F32]:
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
    leaves : (nq, L) int64 leaf numbers per query, ``-1`` padded; column 0, when valid,
        is the query's seed leaf (any leaf gives the same result; the nearest prunes most)
    m : candidates wanted per query
    row_ok : (R,) bool over storage rows, or ``None`` for all

    Returns
    -------
    keys : (nq, m') uint64 ``topk`` keys (score, row), ``NO_KEY`` where fewer exist,
        unsorted; ``m' = min(m, L * max leaf size)``
    radius : (nq, m') float32 error bounds of the scores (``inf`` where none is known)
    """
    nq, n_slots = leaves.shape
    max_leaf_rows = int(leaf_sizes(parts).max(initial=0))
    keep = candidate_width(m, n_slots, max_leaf_rows)
    keys = np.full((nq, keep), NO_KEY, dtype=np.uint64)
    radius = np.zeros((nq, keep), dtype=np.float32)
    block = max(1, _SCORE_BLOCK // max(1, max_leaf_rows))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        keys[start:stop], radius[start:stop] = _select_block(
            scorer, parts, queries[start:stop], leaves[start:stop], keep, row_ok
        )
    return keys, radius


def select_by_runs(
    scorer: LeafScorer,
    parts: Sequence[Part],
    queries: F32,
    leaves: I64,
    m: int,
    row_ok: Mask | None = None,
) -> tuple[U64, F32]:
    """:func:`select_candidates` one query at a time, for exact scorers that ignore the leaf.

    A query's leaves that lie next to each other in a part are scored as one run of slots
    (siblings are stored side by side), so a query probing many leaves costs a few large
    products instead of one small one per leaf. For single queries and small batches, where
    grouping by leaf would leave one query per group. Same result as
    :func:`select_candidates` (radii ``inf``: the rerank recomputes the distances
    batch-independently, so the candidates are not pruned on these BLAS scores).
    """
    nq, n_slots = leaves.shape
    max_leaf_rows = int(leaf_sizes(parts).max(initial=0))
    keep = candidate_width(m, n_slots, max_leaf_rows)
    keys = np.full((nq, keep), NO_KEY, dtype=np.uint64)
    for i in range(nq):
        mine = np.unique(leaves[i][leaves[i] >= 0])
        blocks: list[F32] = []
        row_blocks: list[I64] = []
        for part in parts:
            a, b = part.offsets[mine], part.offsets[mine + 1]
            a, b = a[b > a], b[b > a]
            if a.shape[0] == 0:
                continue
            joined = np.flatnonzero(a[1:] == b[:-1])  # run j continues into run j + 1
            starts = np.delete(a, joined + 1).tolist()
            stops = np.delete(b, joined).tolist()
            for first, stop in zip(starts, stops, strict=True):
                blocks.append(scorer.score(queries[i : i + 1], -1, part, first, stop)[0][0])
                row_blocks.append(part.row_range(first, stop))
        if not blocks:
            continue
        est = np.concatenate(blocks)[None, :]
        best = best_keys(est, np.concatenate(row_blocks), keep, row_ok)
        keys[i, : best.shape[1]] = best
    return keys, np.full(keys.shape, np.inf, dtype=np.float32)


def _select_block(
    scorer: LeafScorer, parts: Sequence[Part], q: F32, leaves: I64, m: int, row_ok: Mask | None
) -> tuple[U64, F32]:
    nq = leaves.shape[0]
    pool = _Pool(nq)
    bound = np.full(nq, FMAX, dtype=np.float32)
    qi, slot = np.nonzero(leaves >= 0)
    if qi.shape[0] >= _SEED_MIN_LEAVES * nq:
        # Seeds first, alone: each sets its query's bound from the nearest leaf. (With few
        # leaves per query this pass would only double the per-leaf overhead.)
        first = slot == 0
        passes = [(qi[first], leaves[qi[first], 0]), (qi[~first], leaves[qi[~first], slot[~first]])]
    else:
        passes = [(qi, leaves[qi, slot])]
    for query_of_pair, leaf_of_pair in passes:
        for leaf, gq in _groups(leaf_of_pair, query_of_pair):
            est, radius, rows = _scores(scorer, parts, q[gq], leaf, row_ok)
            pool.add_best(gq, est, radius, rows, bound, m)
    return pool.best(m)


def _groups(leaf: I64, query: I64) -> Iterator[tuple[int, I64]]:
    """``(leaf, queries)`` for every distinct value of ``leaf`` ``(P,)``, queries ``(P,)``."""
    order = np.argsort(leaf, kind="stable")
    leaf, query = leaf[order], query[order]
    cuts = np.flatnonzero(np.diff(leaf)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [leaf.shape[0]]])
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        if b > a:
            yield int(leaf[a]), query[a:b]


def _scores(
    scorer: LeafScorer, parts: Sequence[Part], q: F32, leaf: int, row_ok: Mask | None
) -> tuple[F32, F32 | None, I64]:
    """Scores ``(g, s)`` of every slot of ``leaf`` over ``parts``, their radii (``(g, s)`` or
    ``None`` where no scorer gave one) and their rows ``(s,)``.

    Non-finite scores (float32 overflow of huge vectors) are clamped to +-``FMAX`` so that
    they stay ordered; rows without ``row_ok`` score ``inf``, above every real score.
    """
    blocks: list[F32] = []
    radii: list[F32 | None] = []
    row_blocks: list[I64] = []
    for part in parts:
        a, b = int(part.offsets[leaf]), int(part.offsets[leaf + 1])
        if a == b:
            continue
        est, radius = scorer.score(q, leaf, part, a, b)
        blocks.append(est)
        radii.append(radius)
        row_blocks.append(part.row_range(a, b))
    if not blocks:
        empty = np.empty((q.shape[0], 0), dtype=np.float32)
        return empty, None, np.empty(0, dtype=np.int64)
    est = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    radius = None
    if any(r is not None for r in radii):
        full = [
            np.full_like(e, np.inf) if r is None else r for e, r in zip(blocks, radii, strict=True)
        ]
        radius = full[0] if len(full) == 1 else np.concatenate(full, axis=1)
    rows = row_blocks[0] if len(row_blocks) == 1 else np.concatenate(row_blocks)
    clamp_scores(est)
    if row_ok is not None:
        bad = ~row_ok[rows]
        if bad.any():
            est[:, bad] = np.inf
    return est, radius, rows


class _Pool:
    """Candidates gathered for a block of queries: (query, score, radius, row) entries."""

    def __init__(self, nq: int) -> None:
        self.nq = nq
        self.query: list[I64] = []
        self.score: list[F32] = []
        self.radius: list[F32] = []
        self.row: list[I64] = []

    def add_best(
        self, gq: I64, est: F32, radius: F32 | None, rows: I64, bound: F32, m: int
    ) -> None:
        """Keep the entries of ``est`` ``(g, s)`` (queries ``gq``, radii ``radius`` or
        ``None`` for ``inf``) that may still make their query's top ``m``, lowering the queries'
        ``bound`` ``(nq,)`` on the way.

        An entry is kept when it is at or under its query's bound (``inf`` entries, excluded
        rows, never are: bounds are at most ``FMAX``). A query with more than ``m`` entries
        kept here gets the ``m``-th best of them as its new bound first.
        """
        s = est.shape[1]
        if s == 0:
            return
        mine = bound[gq]
        flat = np.flatnonzero(est <= mine[:, None])
        line = flat // s
        crowded = np.flatnonzero(np.bincount(line, minlength=est.shape[0]) > m)
        if crowded.shape[0]:
            kth = np.partition(est[crowded], m - 1, axis=1)[:, m - 1]
            mine[crowded] = np.minimum(mine[crowded], kth)
            bound[gq[crowded]] = mine[crowded]
            kept = est.reshape(-1)[flat] <= mine[line]
            flat, line = flat[kept], line[kept]
        self.query.append(gq[line])
        self.score.append(est.reshape(-1)[flat])
        if radius is None:
            self.radius.append(np.full(flat.shape[0], np.inf, dtype=np.float32))
        else:
            self.radius.append(radius.reshape(-1)[flat])
        self.row.append(rows[flat - line * s])

    def best(self, m: int) -> tuple[U64, F32]:
        """The ``m`` best entries of each query by key: keys ``(nq, m)`` uint64 (``NO_KEY``
        padded) and their radii ``(nq, m)`` float32."""
        out = np.full((self.nq, m), NO_KEY, dtype=np.uint64)
        out_radius = np.zeros((self.nq, m), dtype=np.float32)
        if not self.query:
            return out, out_radius
        query = np.concatenate(self.query)
        if query.shape[0] == 0:
            return out, out_radius
        keys = keys_of(np.concatenate(self.score), np.concatenate(self.row))
        order = np.argsort(query, kind="stable")
        query, keys = query[order], keys[order]
        radius = np.concatenate(self.radius)[order]
        counts = np.bincount(query, minlength=self.nq)
        position = np.arange(query.shape[0]) - (np.cumsum(counts) - counts)[query]
        # Dense (queries x survivors) blocks, the few queries with many survivors apart, so
        # that one loose bound does not widen every row.
        wide = counts > 8 * m
        line = np.empty(self.nq, dtype=np.int64)
        for members in (~wide, wide):
            group = np.flatnonzero(members & (counts > 0))
            if group.shape[0] == 0:
                continue
            line[group] = np.arange(group.shape[0])
            sel = np.flatnonzero(members[query])
            width = int(counts[group].max())
            dense = np.full((group.shape[0], width), NO_KEY, dtype=np.uint64)
            dense_radius = np.zeros((group.shape[0], width), dtype=np.float32)
            dense[line[query[sel]], position[sel]] = keys[sel]
            dense_radius[line[query[sel]], position[sel]] = radius[sel]
            picked, picked_radius = smallest_with(dense, dense_radius, m)
            out[group, : picked.shape[1]] = picked
            out_radius[group, : picked.shape[1]] = picked_radius
        return out, out_radius


def smallest_with(keys: U64, values: F32, m: int) -> tuple[U64, F32]:
    """:func:`~vectordb.core.topk.smallest` of ``keys`` ``(g, n)``, with the ``values``
    ``(g, n)`` that go with the keys kept."""
    if keys.shape[1] <= m:
        return keys, values
    pick = np.argpartition(keys, m - 1, axis=1)[:, :m]
    return np.take_along_axis(keys, pick, axis=1), np.take_along_axis(values, pick, axis=1)


class VectorScorer:
    """Exact distances from a leaf's full vectors, for low dimensions where 1-bit codes
    cannot rank (GloVe-50: recall@10 0.42 by codes, probes=4 of the earlier beam).

    A leaf's rows are contiguous in storage after a build, an open or a compaction, so in
    mmap mode this usually reads whole pages in order.
    """

    def __init__(
        self, take: Callable[[I64], F32], slice_: Callable[[int, int], F32], metric: Metric
    ) -> None:
        self.take = take
        self.slice = slice_
        self.metric = metric

    def score(self, q: F32, leaf: int, part: Part, a: int, b: int) -> tuple[F32, None]:
        """``(nq, b - a)`` float32 scores of slots ``a:b`` for prepared queries ``q`` (and
        no radius: see :func:`select_by_runs`).

        Scores rank the rows *of one query*: each row of the result is the distance (l2),
        or the distance less ``1`` (cosine), which saves a pass.
        """
        if part.rows is None:
            x = self.slice(a, b)
        else:
            rows = part.rows[a:b]
            first, last = int(rows[0]), int(rows[-1])
            contiguous = last - first == b - a - 1 and bool((np.diff(rows) == 1).all())
            x = self.slice(first, last + 1) if contiguous else self.take(rows)
        # A BLAS product, 5-10x faster than einsum here. Its rounding depends on the batch
        # size, but these scores only pick candidates: the rerank recomputes their distances
        # batch-independently, so only a tie at the last candidate's score could differ.
        if self.metric is Metric.L2:
            # Around a point of the block: far from zero, |x|^2 - 2 <x, q> would cancel
            # away the float32 digits that tell near rows apart.
            centre = x[:1]
            xc, qc = x - centre, q - centre
            scores = (np.float32(-2.0) * qc) @ xc.T
            scores += np.einsum("nd,nd->n", xc, xc)[None, :]
            scores += np.einsum("qd,qd->q", qc, qc)[:, None]
            return scores, None
        return (-q) @ x.T, None


#: Grouping by leaf pays off once leaves are shared by this many queries on average.
_BY_LEAF_MIN_QUERIES = 4


class VectorSelector:
    """``leaf_scan="vectors"``: candidates by exact distances on the full vectors (CPU)."""

    def __init__(self, scorer: VectorScorer, parts: Sequence[Part]) -> None:
        self.scorer = scorer
        self.parts = tuple(parts)

    def select(
        self, queries: F32, leaves: I64, m: int, row_ok: Mask | None = None
    ) -> tuple[U64, F32]:
        """Keys and radii ``(nq, m')`` (see :func:`select_candidates`): grouped by leaf when
        leaves are shared by several queries of the batch, else query by query."""
        if mostly_apart(leaves, self.parts[0].offsets.shape[0] - 1, _BY_LEAF_MIN_QUERIES):
            return select_by_runs(self.scorer, self.parts, queries, leaves, m, row_ok)
        return select_candidates(self.scorer, self.parts, queries, leaves, m, row_ok)
