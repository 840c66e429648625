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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .kmeans import kmeans
from .metrics import Metric

__all__ = ["Tree", "build_tree"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

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

    def route(self, queries: F32, probes: int, metric: Metric) -> I64:
        """Leaves to search for each query, by a beam search over the tree.

        At every level the ``probes`` best nodes of the frontier (by full-precision distance to
        their centroids) are kept; kept leaves are final candidates, kept inner nodes are
        expanded. A level that mixes leaves and inner nodes therefore loses neither.

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
        c_sq = self.centroid_sq_norms
        frontier = np.broadcast_to(self.children[0], (nq, self.children.shape[1]))
        found: list[I64] = []
        while frontier.shape[1] and (frontier >= 0).any():
            scores = self._node_scores(queries, frontier, c_sq, metric)
            keep = min(probes, frontier.shape[1])
            if keep < frontier.shape[1]:
                pick = np.argpartition(scores, keep - 1, axis=1)[:, :keep]
                frontier = np.take_along_axis(frontier, pick, axis=1)
            valid = frontier >= 0
            node = np.where(valid, frontier, 0)
            leaf = np.where(valid, self.leaf_of_node[node], -1)
            found.append(leaf)
            inner = valid & (leaf < 0)
            nxt = np.where(inner[:, :, None], self.children[node], -1).reshape(nq, -1)
            frontier = nxt[:, (nxt >= 0).any(axis=0)]
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

    def _node_scores(self, q: F32, nodes: I64, c_sq: F32, metric: Metric) -> F32:
        """(nq, f) float32 routing scores of ``nodes`` (``-1`` -> inf), smaller is better."""
        nq, f = nodes.shape
        d = q.shape[1]
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


def _count(leaves: I64, sizes: I64) -> I64:
    return np.where(leaves >= 0, sizes[np.maximum(leaves, 0)], 0).sum(axis=1)


def build_tree(
    x: F32,
    *,
    branching_factor: int,
    max_leaf_size: int,
    max_iterations: int,
    seed: int,
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
            continue
        rng = np.random.default_rng([seed, node])
        cents, labels = kmeans(x[rows], branching_factor, max_iterations=max_iterations, rng=rng)
        groups = [rows[labels == j] for j in range(cents.shape[0])]
        nonempty = [j for j, g in enumerate(groups) if g.shape[0]]
        if len(nonempty) < 2:
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
