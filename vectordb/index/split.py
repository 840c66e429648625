"""Splitting grown leaves: in place when the whole index is rewritten, or into the delta.

A leaf past ``split_above`` live vectors becomes an inner node whose children come from
k-means on its vectors (in the rotated space, like the tree). Two ways:

* :func:`split_big_leaves`, when the parts are rewritten anyway (a fold of the delta into
  the main layout, a compaction): every slot is re-coded against its new leaf;
* :func:`split_in_delta`, between folds, which leaves the main layout's arrays as they are
  (their bytes, and a checkpoint's files of them, stay the same): the child that takes the
  leaf's number keeps its centroid, so the codes of the vectors staying there hold; the
  vectors that go to the other children are appended to storage again as new rows, coded
  in the delta, and their old rows become tombstones (:class:`Moved`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._types import F32, I64, Mask
from ..core.codes import Quantizer, encode_residuals, origin_of
from ..core.kmeans import kmeans
from ..core.metrics import Metric
from ..core.parts import Part, concat_by_leaf
from ..core.tree import Tree
from .state import IndexState

__all__ = [
    "Moved",
    "Splitter",
    "split_big_leaves",
    "split_in_delta",
    "split_limits",
    "splitter_for",
]


@dataclass(frozen=True)
class Splitter:
    """What splitting a leaf needs: the tree's space, k-means settings, the vectors."""

    quantizer: Quantizer
    metric: Metric
    take: Callable[[I64], F32]
    #: Appends prepared vectors ``(m, d)`` to the store; returns the first new row.
    append: Callable[[F32], int]
    max_leaf_size: int
    split_above: int
    branching_factor: int
    max_iterations: int
    seed: int


def splitter_for(st: IndexState, params: dict[str, Any]) -> Splitter:
    """The splitter of an index with build parameters ``params``, reading ``st``'s vectors."""
    most = int(params["max_leaf_size"])
    built = int(params.get("leaf_target", most))
    return Splitter(
        quantizer=st.quantizer,
        metric=st.metric,
        take=st.storage.take,
        append=st.storage.append,
        max_leaf_size=most,
        # Twice the leaf size the build made (at most 2 * max_leaf_size): k-means splits
        # leave leaves far below max_leaf_size, and letting them all double before a
        # split halves the share of the index that `probes` leaves cover. At least a
        # third of max_leaf_size (about what large builds make): an index built from a
        # handful of vectors and grown by adds must not split into leaves of two.
        split_above=2 * min(most, max(built, most // 3, 1)),
        branching_factor=params["branching_factor"],
        max_iterations=params["max_iterations"],
        seed=params["seed"],
    )


def split_limits(base: Part, splitter: Splitter) -> I64:
    """(n_leaves,) int64: the size past which each leaf splits. ``split_above``, or for a
    leaf that held more at the last fold or build (its slots in the main layout), twice
    that, up to ``max_leaf_size``: a build's leaves past ``split_above`` (a refined tree
    holds some) split once adds grew them to ``max_leaf_size``, not all at the first add,
    and no leaf grows past what a build allows."""
    doubled = 2 * np.diff(base.offsets)
    most = max(splitter.split_above, splitter.max_leaf_size)
    return np.clip(doubled, splitter.split_above, most)


def split_big_leaves(
    tree: Tree, part: Part, splitter: Splitter, limits: I64 | None = None
) -> tuple[Tree, Part]:
    """Split every leaf of ``part`` (leaf-sorted) holding over ``limits`` ``(n_leaves,)``
    int64 slots (``None``: ``split_above``).

    Each such leaf becomes an inner node whose children come from k-means on its vectors
    (in the rotated space, like the tree), and its slots are re-coded against their new
    leaf's centroid. Only those leaves are touched: no global rebuild. Leaves k-means
    cannot split (identical vectors) stay as they are.
    """
    sizes = np.diff(part.offsets)
    big = np.flatnonzero(sizes > (splitter.split_above if limits is None else limits))
    if big.size == 0:
        return tree, part
    centroids = [tree.centroids]
    children = [tree.children.copy()]
    leaf_of_node = [tree.leaf_of_node.copy()]
    n_nodes, n_leaves = tree.n_nodes, tree.n_leaves
    slot_leaf = part.leaf_of_slot
    codes = None if part.codes is None else part.codes.copy()
    factors = None if part.factors is None else part.factors.copy()
    leaf_nodes = tree.leaf_nodes
    for leaf in big:
        a, b = int(part.offsets[leaf]), int(part.offsets[leaf + 1])
        node = int(leaf_nodes[leaf])
        rotated = splitter.quantizer.rotate(splitter.take(part.row_range(a, b)))
        rng = np.random.default_rng([splitter.seed, node, n_nodes])
        # Children about the size leaves were built at (split_above / 2), not a full fan-out
        # of tiny leaves that `probes` would then cover too little of.
        k = min(splitter.branching_factor, max(2, -(-(b - a) * 2 // splitter.split_above)))
        _, labels = kmeans(rotated, k, max_iterations=splitter.max_iterations, rng=rng)
        groups = [j for j in range(k) if (labels == j).any()]
        if len(groups) < 2:
            continue
        means = np.stack([rotated[labels == j].mean(axis=0) for j in groups]).astype(np.float32)
        new_nodes = np.arange(n_nodes, n_nodes + len(groups))
        new_leaves = np.concatenate([[leaf], np.arange(n_leaves, n_leaves + len(groups) - 1)])
        children[0][node, : len(groups)] = new_nodes
        leaf_of_node[0][node] = -1
        centroids.append(means)
        children.append(np.full((len(groups), tree.children.shape[1]), -1, dtype=np.int64))
        leaf_of_node.append(new_leaves.astype(np.int64))
        index_of = np.full(k, -1, dtype=np.int64)
        index_of[groups] = np.arange(len(groups))
        local = index_of[labels]
        slot_leaf = slot_leaf.copy()
        slot_leaf[a:b] = new_leaves[local]
        if codes is not None and factors is not None:
            codes[:, a:b], factors[:, a:b] = encode_residuals(
                splitter.quantizer, rotated, means[local], splitter.metric, origin_of(tree)
            )
        n_nodes += len(groups)
        n_leaves += len(groups) - 1
    new_tree = Tree(
        centroids=np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32),
        children=np.concatenate(children),
        leaf_of_node=np.concatenate(leaf_of_node),
    )
    recoded = Part(offsets=part.offsets, rows=part.all_rows, codes=codes, factors=factors)
    return new_tree, concat_by_leaf([recoded], [slot_leaf], n_leaves=n_leaves)


@dataclass(frozen=True)
class Moved:
    """Vectors a split moved to new storage rows: ``old`` (m,) int64, the rows that are
    tombstones now, and ``new`` (m,) int64, the rows their copies were appended as."""

    old: I64
    new: I64


def _children(
    rotated: F32, splitter: Splitter, node: int, n_nodes: int
) -> tuple[list[int], F32, I64] | None:
    """k-means children of a leaf's rotated vectors ``(m, bits)``: the groups used, their
    means ``(g, bits)`` float32 and every vector's group ``(m,)`` (``None``: no split)."""
    rng = np.random.default_rng([splitter.seed, node, n_nodes])
    # Children about the size leaves were built at (split_above / 2), not a full fan-out
    # of tiny leaves that `probes` would then cover too little of.
    m = rotated.shape[0]
    k = min(splitter.branching_factor, max(2, -(-m * 2 // splitter.split_above)))
    _, labels = kmeans(rotated, k, max_iterations=splitter.max_iterations, rng=rng)
    groups = [j for j in range(k) if (labels == j).any()]
    if len(groups) < 2:
        return None
    means = np.stack([rotated[labels == j].mean(axis=0) for j in groups]).astype(np.float32)
    index_of = np.full(k, -1, dtype=np.int64)
    index_of[groups] = np.arange(len(groups))
    return groups, means, index_of[labels]


def split_in_delta(
    tree: Tree,
    base: Part,
    delta: Part,
    live_sizes: I64,
    row_ok: Mask | None,
    splitter: Splitter,
) -> tuple[Tree, Part, Part, Moved | None]:
    """Split every leaf with more live vectors (``live_sizes`` ``(n_leaves,)`` int64) than
    its :func:`split_limits` without changing the base's codes, factors or rows (see the
    module docstring). Returns the tree, the base (its offsets extended over the new
    leaves, its arrays the same objects), the delta, and the moved rows (``None``: no
    leaf split). Appends the moved vectors through ``splitter.append``."""
    big = np.flatnonzero(live_sizes > split_limits(base, splitter))
    if big.size == 0:
        return tree, base, delta, None
    centroids, children = [tree.centroids], [tree.children.copy()]
    leaf_of_node = [tree.leaf_of_node.copy()]
    n_nodes, n_leaves, leaf_nodes = tree.n_nodes, tree.n_leaves, tree.leaf_nodes
    delta_leaf = delta.leaf_of_slot
    keep = np.ones(delta.size, dtype=bool)  # delta slots that stay as they are
    added: list[tuple[I64, I64, F32, I64]] = []  # per leaf: rows, leaves, rotated, moved
    for leaf in big:
        node = int(leaf_nodes[leaf])
        rb = base.row_range(int(base.offsets[leaf]), int(base.offsets[leaf + 1]))
        rd = delta.row_range(int(delta.offsets[leaf]), int(delta.offsets[leaf + 1]))
        if row_ok is not None:
            rb, rd = rb[row_ok[rb]], rd[row_ok[rd]]
        rows = np.concatenate([rb, rd])
        rotated = splitter.quantizer.rotate(splitter.take(rows))
        found = _children(rotated, splitter, node, n_nodes)
        if found is None:
            continue
        groups, means, local = found
        # The child nearest the old centroid keeps it, and the leaf's number: the base's
        # codes of the vectors it keeps are residuals to that centroid.
        stay = int(np.argmin(((means - tree.centroids[node]) ** 2).sum(axis=1)))
        means[stay] = tree.centroids[node]
        numbers = np.empty(len(groups), dtype=np.int64)
        numbers[stay] = leaf
        numbers[np.arange(len(groups)) != stay] = np.arange(n_leaves, n_leaves + len(groups) - 1)
        children[0][node, : len(groups)] = np.arange(n_nodes, n_nodes + len(groups))
        leaf_of_node[0][node] = -1
        centroids.append(means)
        children.append(np.full((len(groups), tree.children.shape[1]), -1, dtype=np.int64))
        leaf_of_node.append(numbers)
        keep[delta_leaf == leaf] = False
        leaving = np.flatnonzero(local[: rb.shape[0]] != stay)
        redone = np.concatenate([leaving, np.arange(rb.shape[0], rows.shape[0])])
        added.append((rows[redone], numbers[local[redone]], rotated[redone], rb[leaving]))
        n_nodes += len(groups)
        n_leaves += len(groups) - 1
    if not added:
        return tree, base, delta, None
    new_tree = Tree(
        centroids=np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32),
        children=np.concatenate(children),
        leaf_of_node=np.concatenate(leaf_of_node),
    )
    old = np.concatenate([a[3] for a in added])
    first = splitter.append(splitter.take(old)) if old.size else 0
    moved = Moved(old=old, new=np.arange(first, first + old.shape[0], dtype=np.int64))
    parts, labels, done = [delta], [delta_leaf], 0
    for rows, leaves, rotated, gone in added:
        rows = rows.copy()
        rows[: gone.shape[0]] = moved.new[done : done + gone.shape[0]]  # the moved come first
        done += gone.shape[0]
        part = Part(offsets=np.zeros(1, dtype=np.int64), rows=rows)
        if delta.codes is not None:
            centres = new_tree.centroids[new_tree.leaf_nodes[leaves]]
            codes, factors = encode_residuals(
                splitter.quantizer, rotated, centres, splitter.metric, origin_of(tree)
            )
            part = Part(offsets=part.offsets, rows=rows, codes=codes, factors=factors)
        parts.append(part)
        labels.append(leaves)
    masks = [keep, *(np.ones(p.size, dtype=bool) for p in parts[1:])]
    new_delta = concat_by_leaf(parts, labels, masks, n_leaves=n_leaves)
    grown = np.full(n_leaves - tree.n_leaves, base.offsets[-1], dtype=np.int64)
    new_base = Part(np.concatenate([base.offsets, grown]), base.rows, base.codes, base.factors)
    return new_tree, new_base, new_delta, moved if old.size else None
