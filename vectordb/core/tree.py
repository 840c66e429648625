"""Hierarchical k-means tree: its arrays, and building it (routing: ``search.route``).

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

__all__ = ["Tree", "build_tree"]


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
    def children_or_none(self) -> I64:
        """``children`` with one more row of ``-1`` (at index ``n_nodes``) for "no node"."""
        none = np.full((1, self.children.shape[1]), -1, dtype=np.int64)
        return np.concatenate([self.children, none])

    @functools.cached_property
    def leaf_nodes_cached(self) -> I64:
        """:attr:`leaf_nodes`, computed once."""
        return self.leaf_nodes


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
