"""Hierarchical k-means tree: build it, and route queries to leaves by beam search.

The tree is a handful of flat arrays (node 0 is the root, nodes numbered breadth-first):

==============  ======================  =============================================
array           shape, dtype            meaning
==============  ======================  =============================================
centroids       (n_nodes, d) float32    mean of the vectors under each node (the index
                                        stores them rotated, see ``codes.Quantizer``)
children        (n_nodes, B) int64      child node ids, ``-1`` padded (B = branching)
leaf_of_node    (n_nodes,) int64        leaf number of a leaf node, ``-1`` for inner ones
==============  ======================  =============================================

Leaves are numbered in the order their vectors are stored, so leaf ``l`` owns the storage
rows ``leaf_offsets[l]:leaf_offsets[l + 1]`` (kept by the index).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._types import F32, I64
from .kmeans import kmeans
from .metrics import Metric

__all__ = ["Tree", "build_tree"]


#: Bytes of gathered centroids per routing block; bounds temporary memory of batch routing.
_ROUTE_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class Tree:
    """The routing structure. See the module docstring for the arrays."""

    centroids: F32
    children: I64
    leaf_of_node: I64

    @property
    def n_nodes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def n_leaves(self) -> int:
        return int((self.leaf_of_node >= 0).sum())

    @property
    def leaf_nodes(self) -> I64:
        """(n_leaves,) int64: the node id of every leaf, in leaf order."""
        leaf_nodes = np.empty(self.n_leaves, dtype=np.int64)
        is_leaf = self.leaf_of_node >= 0
        leaf_nodes[self.leaf_of_node[is_leaf]] = np.flatnonzero(is_leaf)
        return leaf_nodes

    @functools.cached_property
    def centroid_sq_norms(self) -> F32:
        """(n_nodes,) float32 squared norms of the centroids, for L2 routing."""
        return np.einsum("nd,nd->n", self.centroids, self.centroids)

    @property
    def nbytes(self) -> int:
        arrays = (self.centroids, self.children, self.leaf_of_node, self.centroid_sq_norms)
        return sum(int(a.nbytes) for a in arrays)

    @functools.cached_property
    def max_centroid_norm(self) -> float:
        """Largest centroid norm, for the rounding bound of routing."""
        return float(np.sqrt(self.centroid_sq_norms.max(initial=0.0)))

    @functools.cached_property
    def _children_or_none(self) -> I64:
        """``children`` with one more row of ``-1`` (at index ``n_nodes``) for "no node"."""
        none = np.full((1, self.children.shape[1]), -1, dtype=np.int64)
        return np.concatenate([self.children, none])

    def route(self, queries: F32, probes: int, metric: Metric) -> I64:
        """Leaves to search for each query, by a beam search over the tree.

        At every level the ``probes`` best nodes of the frontier (by full-precision distance to
        their centroids) are kept; kept leaves are final candidates, kept inner nodes are
        expanded. A level that mixes leaves and inner nodes therefore loses neither.

        Scores come from one matrix product per level over the nodes the batch reaches
        (:func:`_approx_scores`); a query whose kept set the product's rounding could change
        is rescored exactly (:meth:`_exact_scores`), so a query is routed the same alone or
        in any batch.

        Parameters
        ----------
        queries : (nq, d') float32, prepared for ``metric``, in the same space as
            ``centroids`` (the index keeps both rotated)
        probes : nodes kept per level, >= 1

        Returns
        -------
        (nq, L) int64 leaf numbers, ``-1`` padded; each row lists distinct leaves.
        """
        nq = queries.shape[0]
        if self.leaf_of_node[0] >= 0:  # the root is the only leaf
            return np.zeros((nq, 1), dtype=np.int64)
        q_norms = np.sqrt(np.einsum("qd,qd->q", queries, queries))
        frontier = np.broadcast_to(self.children[0], (nq, self.children.shape[1]))
        found: list[I64] = []
        while frontier.shape[1] and (frontier >= 0).any():
            keep = min(probes, frontier.shape[1])
            if keep < frontier.shape[1]:
                frontier = self._keep_best(queries, q_norms, frontier, keep, metric)
            valid = frontier >= 0
            node = np.where(valid, frontier, 0)
            leaf = np.where(valid, self.leaf_of_node[node], -1)
            found.append(leaf)
            expand = np.where(valid & (leaf < 0), frontier, self.n_nodes)
            nxt = self._children_or_none[expand].reshape(nq, -1)
            used = np.flatnonzero((nxt >= 0).any(axis=0))
            frontier = nxt if used.shape[0] == nxt.shape[1] else nxt.take(used, axis=1)
        return np.concatenate(found, axis=1)

    def route_for(self, q: F32, probes: int, need: int, sizes: I64, metric: Metric) -> I64:
        """:meth:`route`, widening the beam (doubling ``probes``) for queries whose leaves
        hold fewer than ``need`` rows, by ``sizes`` ``(n_leaves,)`` rows per leaf."""
        leaves = self.route(q, probes, metric)
        short = _count(leaves, sizes) < need
        wider = probes
        while short.any() and wider < self.n_nodes:
            wider *= 2
            idx = np.flatnonzero(short)
            more = self.route(q[idx], wider, metric)
            if more.shape[1] > leaves.shape[1]:
                pad = np.full((leaves.shape[0], more.shape[1] - leaves.shape[1]), -1, np.int64)
                leaves = np.concatenate([leaves, pad], axis=1)
            leaves[idx] = -1
            leaves[idx, : more.shape[1]] = more
            short[idx] = _count(more, sizes) < need
        return leaves

    def nearest_first(self, q: F32, leaves: I64, metric: Metric) -> I64:
        """``leaves`` ``(nq, L)`` with each row's nearest leaf (by centroid) moved to column 0.

        Only an ordering hint for the scan (see ``leafscan``): near ties may go either way.
        """
        if leaves.shape[1] < 2:
            return leaves
        nodes = np.where(leaves >= 0, self.leaf_nodes_cached[np.maximum(leaves, 0)], -1)
        if q.shape[0] <= _EXACT_MAX_QUERIES:
            scores = self._exact_scores(q, nodes, metric)
        else:
            scores = _approx_scores(q, nodes, self.centroids, self.centroid_sq_norms, metric)
        best = np.argmin(scores, axis=1)
        out = leaves.copy()
        rows = np.arange(leaves.shape[0])
        out[rows, 0], out[rows, best] = leaves[rows, best], leaves[rows, 0]
        return out

    @functools.cached_property
    def leaf_nodes_cached(self) -> I64:
        """:attr:`leaf_nodes`, computed once."""
        return self.leaf_nodes

    def _keep_best(self, q: F32, q_norms: F32, nodes: I64, keep: int, metric: Metric) -> I64:
        """The ``keep`` best of ``nodes`` ``(nq, f)`` per query, ``(nq, keep)`` ascending ids.

        The same set as ranking by :meth:`_exact_scores`: a row is trusted to the fast
        scores only when its ``keep``-th and ``keep + 1``-th best stay apart by more than
        twice the rounding bound of both ways of computing them; other rows are rescored.
        """
        if q.shape[0] <= _EXACT_MAX_QUERIES:
            # Too few queries for a product to pay: the reference scores themselves.
            exact = self._exact_scores(q, nodes, metric)
            kept = np.take_along_axis(nodes, np.argpartition(exact, keep - 1, axis=1), axis=1)
            kept = kept[:, :keep]
            kept.sort(axis=1)
            return kept
        approx = _approx_scores(q, nodes, self.centroids, self.centroid_sq_norms, metric)
        # (Two separate selections: argpartition with two kth costs 3x one.)
        pick = np.argpartition(approx, keep - 1, axis=1)
        last_kept = np.take_along_axis(approx, pick[:, keep - 1 : keep], axis=1)[:, 0]
        first_dropped = np.partition(approx, keep, axis=1)[:, keep]
        bound = _rounding_bound(q_norms, self.max_centroid_norm, q.shape[1], metric)
        with np.errstate(invalid="ignore"):
            apart = last_kept + 2.0 * bound < first_dropped
        unsure = np.flatnonzero(np.isfinite(first_dropped) & ~apart)
        kept = np.take_along_axis(nodes, pick[:, :keep], axis=1)
        if unsure.shape[0]:
            exact = self._exact_scores(q[unsure], nodes[unsure], metric)
            redo = np.argpartition(exact, keep - 1, axis=1)[:, :keep]
            kept[unsure] = np.take_along_axis(nodes[unsure], redo, axis=1)
        # A canonical order, so that later levels see the same rows whichever way this
        # level was scored.
        kept.sort(axis=1)
        return kept

    def _exact_scores(self, q: F32, nodes: I64, metric: Metric) -> F32:
        """(nq, f) float32 reference routing scores of ``nodes`` (``-1`` -> inf), smaller is
        better: row by row the same arithmetic whatever the batch (no BLAS)."""
        nq, f = nodes.shape
        d = q.shape[1]
        c_sq = self.centroid_sq_norms
        safe = np.where(nodes >= 0, nodes, 0)
        out = np.empty((nq, f), dtype=np.float32)
        rows = max(1, _ROUTE_BLOCK_BYTES // max(1, f * d * 4))
        for start in range(0, nq, rows):
            sl = slice(start, start + rows)
            dots = np.einsum("qfd,qd->qf", self.centroids[safe[sl]], q[sl])
            # Inner-product indexes route by inner product, as FAISS's IVF does.
            out[sl] = -dots if metric is Metric.IP else c_sq[safe[sl]] - 2.0 * dots
        out[nodes < 0] = np.inf
        return out


#: Up to this many queries, routing scores each query's own nodes the reference way.
_EXACT_MAX_QUERIES = 4
#: float32 unit roundoff.
_U = float(np.finfo(np.float32).eps) / 2


def _approx_scores(q: F32, nodes: I64, centroids: F32, c_sq: F32, metric: Metric) -> F32:
    """(nq, f) float32 routing scores of ``nodes`` (``-1`` -> inf) by one BLAS product per
    block of queries against the nodes of the block.

    Within :func:`_rounding_bound` of :meth:`Tree._exact_scores`. Gathering every query's
    own centroids costs ``f * d`` float reads per query outside BLAS; the batch's distinct
    nodes are few next to ``nq * f`` once a batch has more than a handful of queries. A
    frontier's nodes usually share one depth, hence one range of (breadth-first) ids: the
    product then covers that range, and no distinct set is needed.
    """
    nq, f = nodes.shape
    out = np.empty((nq, f), dtype=np.float32)
    rows = max(1, _ROUTE_BLOCK_BYTES // (4 * centroids.shape[0]))
    for start in range(0, nq, rows):
        block = nodes[start : start + rows]
        valid = block >= 0
        if not valid.any():
            out[start : start + rows] = np.inf
            continue
        low, high = int(block[valid].min()), int(block.max()) + 1
        if 2 * (high - low) <= block.size:
            columns = np.arange(low, high)
            column_of = np.where(valid, block - low, high - low)
        else:
            present = np.zeros(centroids.shape[0] + 1, dtype=bool)
            present[block.ravel()] = True  # -1 marks the last entry, dropped below
            columns = np.flatnonzero(present[:-1])
            lookup = np.cumsum(present[:-1]) - 1
            column_of = np.where(valid, lookup[block], columns.shape[0])
        dots = q[start : start + rows] @ centroids[columns].T
        # One more column, of inf, for the padding.
        scores = np.empty((dots.shape[0], columns.shape[0] + 1), dtype=np.float32)
        scores[:, -1] = np.inf
        if metric is Metric.IP:
            np.negative(dots, out=scores[:, :-1])
        else:
            np.subtract(c_sq[columns][None, :], 2.0 * dots, out=scores[:, :-1])
        column_of += (np.arange(block.shape[0]) * scores.shape[1])[:, None]
        out[start : start + rows] = np.take(scores, column_of)
    return out


def _rounding_bound(q_norms: F32, c_max: float, d: int, metric: Metric) -> F32:
    """(nq,) float32: how far two float32 evaluations of a query's routing scores may differ.

    A float32 dot product over ``d`` terms, summed in any order, errs by at most
    ``gamma_d * sum|q_i c_i| <= gamma_d |q| |c|`` with ``gamma_d = d u / (1 - d u)``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1); the l2 score adds
    ``|c|^2 - 2 q.c`` with two more roundings. ``c_max`` bounds every ``|c|``. Doubled for
    the two evaluations, doubled again as a margin.
    """
    gamma = d * _U / (1.0 - d * _U)
    qc = q_norms * np.float32(c_max)
    if metric is Metric.IP:
        err = gamma * qc
    else:
        err = 2.0 * gamma * qc + 2.0 * _U * (c_max * c_max + 2.0 * qc)
    return (4.0 * err).astype(np.float32)


def _count(leaves: I64, sizes: I64) -> I64:
    return np.where(leaves >= 0, sizes[np.maximum(leaves, 0)], 0).sum(axis=1)


def build_tree(
    x: F32,
    *,
    branching_factor: int,
    max_leaf_size: int,
    max_iterations: int,
    seed: int,
    on_leaf: Callable[[int], None] | None = None,
) -> tuple[Tree, I64, I64]:
    """Split ``x`` recursively with k-means until every leaf holds <= ``max_leaf_size`` rows.

    A node whose rows k-means cannot split (all identical) stays a leaf even if larger.

    Parameters
    ----------
    x : (n, d) float32, prepared vectors
    branching_factor : children per inner node, >= 2
    max_leaf_size : largest leaf, >= 1
    max_iterations : Lloyd iterations per split
    seed : every node's k-means draws from ``default_rng([seed, node_id])``
    on_leaf : called with the size of every leaf as it is settled (progress)

    Returns
    -------
    tree : the routing structure
    order : (n,) int64, row numbers of ``x`` in storage order (leaf by leaf)
    leaf_offsets : (n_leaves + 1,) int64, leaf ``l`` owns ``order[off[l]:off[l+1]]``
    """
    centroids: list[F32] = [x.mean(axis=0)]
    members: list[I64] = [np.arange(x.shape[0], dtype=np.int64)]
    child_lists: list[list[int]] = [[]]
    queue: deque[int] = deque([0])
    while queue:
        node = queue.popleft()
        rows = members[node]
        if rows.shape[0] <= max_leaf_size:
            if on_leaf is not None:
                on_leaf(rows.shape[0])
            continue
        rng = np.random.default_rng([seed, node])
        cents, labels = kmeans(x[rows], branching_factor, max_iterations=max_iterations, rng=rng)
        groups = [rows[labels == j] for j in range(cents.shape[0])]
        nonempty = [j for j, g in enumerate(groups) if g.shape[0]]
        if len(nonempty) < 2:
            if on_leaf is not None:
                on_leaf(rows.shape[0])
            continue
        for j in nonempty:
            child = len(centroids)
            # The exact mean of the members, not k-means' last estimate from a subsample.
            centroids.append(x[groups[j]].mean(axis=0))
            members.append(groups[j])
            child_lists.append([])
            child_lists[node].append(child)
            queue.append(child)

    n_nodes = len(centroids)
    children = np.full((n_nodes, branching_factor), -1, dtype=np.int64)
    leaf_of_node = np.full(n_nodes, -1, dtype=np.int64)
    order_parts: list[I64] = []
    for node, kids in enumerate(child_lists):
        children[node, : len(kids)] = kids
        if not kids:
            leaf_of_node[node] = len(order_parts)
            order_parts.append(members[node])
    sizes = np.array([p.shape[0] for p in order_parts], dtype=np.int64)
    leaf_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    tree = Tree(
        centroids=np.ascontiguousarray(np.stack(centroids), dtype=np.float32),
        children=children,
        leaf_of_node=leaf_of_node,
    )
    return tree, np.concatenate(order_parts), leaf_offsets
