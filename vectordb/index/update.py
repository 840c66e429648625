"""The writes of a living index as steps over its state: add, delete, split, compact.

Pure functions: each takes the published ``IndexState`` (and what the write brings) and
returns the new one, without publishing it; the index runs them under its write lock and
publishes the result. Only the vector store is touched on the way (``append`` before an
add, a new store for a compaction), and rows it holds that no state references are
invisible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64, Mask
from ..core.codes import Quantizer, encode_residuals, origin_of
from ..core.kmeans import kmeans
from ..core.metrics import Metric
from ..core.parts import Part, concat_by_leaf, merge_threshold
from ..core.tree import Tree
from ..errors import DuplicateIdError, InvalidParameterError
from ..search.route import nearest_leaf
from ..storage.idmap import MAX_ID, IdMap, check_new_ids
from ..storage.metadata import MetadataStore
from ..storage.snapshot import IndexData
from ..storage.vectors import compacted_store
from .state import IndexState

__all__ = [
    "Splitter",
    "add_to_parts",
    "added",
    "compacted",
    "compacted_state",
    "deleted",
    "encode_part",
    "snapshot",
    "split_big_leaves",
    "splitter_for",
]


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
    offsets = np.zeros(tree.n_leaves + 1, np.int64)
    if not with_codes:
        return Part(offsets=offsets, rows=rows)
    centres = tree.centroids[tree.leaf_nodes[leaves]]
    codes, factors = encode_residuals(quantizer, rotated, centres, metric, origin_of(tree))
    return Part(offsets=offsets, rows=rows, codes=codes, factors=factors)


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
    return tree, merged, merged.empty_like(tree.n_leaves)


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


def compacted(
    tree: Tree, base: Part, delta: Part, row_ok: Mask | None, splitter: Splitter | None = None
) -> tuple[Tree, Part, I64]:
    """The live slots of both parts as one part, leaf by leaf, with rows renumbered.

    With a ``splitter``, oversized leaves are split first. Returns the tree, the part (its
    rows are ``0..n_live-1``) and ``order``: the old storage row of each new row, i.e. the
    vectors to write, in that order.
    """
    if splitter is None and delta.size == 0 and (row_ok is None or row_ok[base.all_rows].all()):
        # Nothing to fold in or leave out (a fresh build, a save with no writes since):
        # the base as it is, its arrays shared, not copied. A copy would hold a second
        # set of codes (1.3 GB at 10M x 768) for the length of the save.
        shared = Part(offsets=base.offsets, rows=None, codes=base.codes, factors=base.factors)
        return tree, shared, base.all_rows
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    if splitter is not None:
        tree, merged = split_big_leaves(tree, merged, splitter)
    order = merged.all_rows
    renumbered = Part(
        offsets=merged.offsets,
        rows=None,
        codes=merged.codes,
        factors=merged.factors,
    )
    return tree, renumbered, order


def splitter_for(st: IndexState, params: dict[str, Any]) -> Splitter:
    """The splitter of an index with build parameters ``params``, reading ``st``'s vectors."""
    most = int(params["max_leaf_size"])
    built = int(params.get("leaf_target", most))
    return Splitter(
        quantizer=st.quantizer,
        metric=st.metric,
        take=st.storage.take,
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


def added(
    st: IndexState, x: F32, rotated: F32, ids: Any, replace: bool, params: dict[str, Any]
) -> tuple[IndexState, I64]:
    """``st`` with prepared vectors ``x`` ``(n, d)`` (``rotated`` ``(n, bits)``) added
    under ``ids`` (``None``: the next free ones), and those ids ``(n,)`` int64.

    ``replace``: ids already present are replaced (their old rows become tombstones);
    else they raise ``DuplicateIdError``. The vectors are appended to the store (rows
    that no state references until the result is published).
    """
    n = x.shape[0]
    new_ids = _new_ids(st, ids, n)
    old_rows = st.idmap.rows(new_ids)
    if not replace and (old_rows >= 0).any():
        taken = new_ids[old_rows >= 0][:5].tolist()
        raise DuplicateIdError(f"ids already in the index: {taken}; use upsert()")
    leaves = nearest_leaf(st.tree, rotated, st.metric)
    first = st.storage.append(x)
    rows = np.arange(first, first + n, dtype=np.int64)
    part = encode_part(
        st.tree, st.quantizer, rotated, leaves, rows, st.metric, st.table is not None
    )
    replaced = old_rows[old_rows >= 0]
    row_ok = st.row_ok
    if row_ok is not None or replaced.size:
        row_ok = (
            np.ones(first + n, dtype=bool)
            if row_ok is None
            else np.concatenate([row_ok, np.ones(first + n - row_ok.shape[0], dtype=bool)])
        )
        row_ok[replaced] = False
    splitter = splitter_for(st, params)
    tree, base, delta = add_to_parts(st.tree, st.base, st.delta, part, leaves, row_ok, splitter)
    row_id = np.concatenate([st.row_id, np.full(first - st.row_id.shape[0], -1, np.int64), new_ids])
    new_state = st.replace(
        tree=tree,
        table=st.table_for(tree),
        base=base,
        delta=delta,
        row_id=row_id,
        row_ok=row_ok,
        idmap=st.idmap.without(new_ids[old_rows >= 0]).with_added(row_id, rows),
        next_id=max(st.next_id, int(new_ids.max()) + 1),
    )
    return new_state, new_ids


def _new_ids(st: IndexState, ids: Any, n: int) -> I64:
    """The ids of ``n`` new vectors: ``ids`` checked, or the next ``n`` free ones."""
    if ids is not None:
        return check_new_ids(ids, n)
    if st.next_id > MAX_ID - n + 1:
        raise InvalidParameterError(
            f"cannot assign {n} ids: the next free id is {st.next_id} and ids must"
            f" stay <= 2**63 - 1 ({MAX_ID}); pass ids= explicitly"
        )
    return np.arange(st.next_id, st.next_id + n, dtype=np.int64)


def deleted(st: IndexState, rows: I64) -> IndexState:
    """``st`` without the vectors at storage ``rows`` (distinct, live)."""
    row_ok = np.ones(st.row_id.shape[0], bool) if st.row_ok is None else st.row_ok.copy()
    row_ok[rows] = False
    return st.replace(row_ok=row_ok, idmap=st.idmap.without(st.row_id[rows]))


def compacted_state(
    st: IndexState, params: dict[str, Any], progress: bool | None = False
) -> IndexState:
    """``st`` compacted: live rows only, leaf by leaf, in a new vector store (see
    :func:`compacted` and ``vectors.compacted_store``), oversized leaves split.
    ``progress``: a bar for the file written in mmap mode."""
    tree, base, order = compacted(st.tree, st.base, st.delta, st.row_ok, splitter_for(st, params))
    dim = st.quantizer.dim
    size = order.shape[0] * dim * 4 if st.storage.is_mmap else 0
    with progress_bar(size, "compacting", unit="B", progress=progress) as bar:
        storage = compacted_store(st.storage, order, dim, bar.update)
    row_id = st.row_id[order]
    return st.replace(
        tree=tree,
        table=st.table_for(tree),
        base=base,
        delta=base.empty_like(tree.n_leaves),
        row_id=row_id,
        row_ok=None,
        idmap=IdMap.from_rows(row_id, np.arange(row_id.shape[0], dtype=np.int64)),
        storage=storage,
    )


def snapshot(st: IndexState, params: dict[str, Any], metadata: MetadataStore) -> IndexData:
    """``st`` as one compact :class:`IndexData` (deleted rows left out, added ones folded
    in; the vectors stay where they are, listed by ``rows``), for a save."""
    tree, base, order = compacted(st.tree, st.base, st.delta, st.row_ok)
    return IndexData(
        tree=tree,
        base=base,
        quantizer=st.quantizer,
        ids=st.row_id[order],
        storage=st.storage,
        rows=order,
        metric=st.metric,
        params=dict(params),
        metadata=metadata,
    )
