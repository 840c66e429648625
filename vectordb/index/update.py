"""Array steps of a living index: place new vectors, fold the delta in, compact.

Pure functions over ``Part``s and the tree; the index calls them under its write lock and
publishes their results as one new state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._types import F32, I64, Mask
from ..core.codes import Quantizer
from ..core.kmeans import kmeans
from ..core.metrics import Metric
from ..core.parts import Part, concat_by_leaf, merge_threshold
from ..core.tree import Tree

__all__ = [
    "Splitter",
    "add_to_parts",
    "assign_leaves",
    "compacted",
    "encode_part",
    "split_big_leaves",
]


def assign_leaves(tree: Tree, rotated: F32, metric: Metric) -> I64:
    """The nearest leaf of each rotated vector ``(n, bits)``: ``(n,)`` int64 (greedy descent)."""
    leaves = tree.route(rotated, 1, metric)
    first = np.argmax(leaves >= 0, axis=1)
    return leaves[np.arange(leaves.shape[0]), first]


def encode_part(
    tree: Tree,
    quantizer: Quantizer,
    rotated: F32,
    leaves: I64,
    rows: I64,
    metric: Metric,
    with_codes: bool,
) -> Part:
    """A part (in input order, offsets unset) holding the codes of new rows.

    ``rotated`` ``(n, bits)``: the rows' prepared and rotated vectors; ``leaves``: their
    leaves. The same arithmetic as at build, row by row.
    """
    n_leaves = tree.n_leaves
    if not with_codes:
        return Part(offsets=np.zeros(n_leaves + 1, np.int64), rows=rows)
    centres = tree.centroids[tree.leaf_nodes[leaves]]
    residual = rotated - centres
    dots = np.einsum("nd,nd->n", residual, centres) if metric is Metric.IP else None
    return Part(
        offsets=np.zeros(n_leaves + 1, np.int64),
        rows=rows,
        codes=quantizer.encode(residual),
        norms=np.sqrt(np.einsum("nd,nd->n", residual, residual)),
        dots=dots,
    )


@dataclass(frozen=True)
class Splitter:
    """What splitting a leaf needs: the tree's space, k-means settings, the vectors."""

    quantizer: Quantizer
    metric: Metric
    take: Callable[[I64], F32]
    max_leaf_size: int
    split_above: int
    branching_factor: int
    max_iterations: int
    seed: int


def add_to_parts(
    tree: Tree,
    base: Part,
    delta: Part,
    new: Part,
    new_leaves: I64,
    row_ok: Mask | None,
    splitter: Splitter,
) -> tuple[Tree, Part, Part]:
    """New ``(tree, base, delta)`` with ``new`` (rows on ``new_leaves``) added.

    The delta is re-sorted by leaf (cost: the delta's size). When it outgrows
    ``merge_threshold``, or a leaf grows past ``split_above``, the delta is folded
    into the base (dropping rows without ``row_ok``) and such leaves are split.
    """
    delta = concat_by_leaf([delta, new], [delta.leaf_of_slot, new_leaves])
    sizes = np.diff(base.offsets) + np.diff(delta.offsets)
    big = bool((sizes > splitter.split_above).any())
    if not big and delta.size <= merge_threshold(base.size, splitter.max_leaf_size):
        return tree, base, delta
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    tree, merged = split_big_leaves(tree, merged, splitter)
    return tree, merged, _empty_like(merged, tree.n_leaves)


def _empty_like(part: Part, n_leaves: int) -> Part:
    words = None if part.codes is None else part.codes.shape[0]
    return Part.empty(n_leaves, words, part.dots is not None)


def split_big_leaves(tree: Tree, part: Part, splitter: Splitter) -> tuple[Tree, Part]:
    """Split every leaf of ``part`` (leaf-sorted) holding over ``split_above`` slots.

    Each such leaf becomes an inner node whose children come from k-means on its vectors
    (in the rotated space, like the tree), and its slots are re-coded against their new
    leaf's centroid. Only those leaves are touched: no global rebuild. Leaves k-means
    cannot split (identical vectors) stay as they are.
    """
    sizes = np.diff(part.offsets)
    big = np.flatnonzero(sizes > splitter.split_above)
    if big.size == 0:
        return tree, part
    centroids = [tree.centroids]
    children = [tree.children.copy()]
    leaf_of_node = [tree.leaf_of_node.copy()]
    n_nodes, n_leaves = tree.n_nodes, tree.n_leaves
    slot_leaf = part.leaf_of_slot
    codes = None if part.codes is None else part.codes.copy()
    norms = None if part.norms is None else part.norms.copy()
    dots = None if part.dots is None else part.dots.copy()
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
        if codes is not None and norms is not None:
            residual = rotated - means[local]
            codes[:, a:b] = splitter.quantizer.encode(residual)
            norms[a:b] = np.sqrt(np.einsum("nd,nd->n", residual, residual))
            if dots is not None:
                dots[a:b] = np.einsum("nd,nd->n", residual, means[local])
        n_nodes += len(groups)
        n_leaves += len(groups) - 1
    new_tree = Tree(
        centroids=np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32),
        children=np.concatenate(children),
        leaf_of_node=np.concatenate(leaf_of_node),
    )
    recoded = Part(offsets=part.offsets, rows=part.all_rows, codes=codes, norms=norms, dots=dots)
    return new_tree, concat_by_leaf([recoded], [slot_leaf], n_leaves=n_leaves)


def compacted(
    tree: Tree, base: Part, delta: Part, row_ok: Mask | None, splitter: Splitter | None = None
) -> tuple[Tree, Part, I64]:
    """The live slots of both parts as one part, leaf by leaf, with rows renumbered.

    With a ``splitter``, oversized leaves are split first. Returns the tree, the part (its
    rows are ``0..n_live-1``) and ``order``: the old storage row of each new row, i.e. the
    vectors to write, in that order.
    """
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    if splitter is not None:
        tree, merged = split_big_leaves(tree, merged, splitter)
    order = merged.all_rows
    renumbered = Part(
        offsets=merged.offsets,
        rows=None,
        codes=merged.codes,
        norms=merged.norms,
        dots=merged.dots,
    )
    return tree, renumbered, order
