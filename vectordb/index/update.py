"""The writes of a living index as steps over its state: add, delete, split, compact.

Pure functions: each takes the published ``IndexState`` (and what the write brings) and
returns the new one, without publishing it; the index runs them under its write lock and
publishes the result. Only the vector store is touched on the way (``append`` before an
add, a new store for a compaction), and rows it holds that no state references are
invisible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64, Mask
from ..core.codes import Quantizer, encode_residuals, origin_of
from ..core.metrics import Metric
from ..core.parts import Part, concat_by_leaf, merge_threshold
from ..core.tree import Tree
from ..errors import DuplicateIdError, InvalidParameterError
from ..search.route import nearest_leaf
from ..storage.idmap import MAX_ID, IdMap, check_new_ids
from ..storage.metadata import MetadataStore
from ..storage.snapshot import IndexData
from ..storage.vectors import compacted_store
from .split import (
    Moved,
    Splitter,
    split_big_leaves,
    split_in_delta,
    split_limits,
    splitter_for,
)
from .state import IndexState

__all__ = [
    "AUTO_COMPACT_MIN_DEAD",
    "add_to_parts",
    "added",
    "compacted",
    "compacted_state",
    "deleted",
    "encode_part",
    "snapshot",
    "wasteful",
]

#: The fewest dead rows that make storage :func:`wasteful`.
AUTO_COMPACT_MIN_DEAD = 4096


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


def add_to_parts(
    tree: Tree,
    base: Part,
    delta: Part,
    new: Part,
    new_leaves: I64,
    live_sizes: I64,
    row_ok: Mask | None,
    splitter: Splitter,
) -> tuple[Tree, Part, Part, Moved | None]:
    """New ``(tree, base, delta)`` with ``new`` (rows on ``new_leaves``) added, and the
    rows a split moved (``live_sizes``: live vectors per leaf before the add).

    The delta is re-sorted by leaf (cost: the delta's size). When it outgrows
    ``merge_threshold``, it is folded into the base (dropping rows without ``row_ok``) and
    leaves past their ``split.split_limits`` are split there; else such leaves are split
    into the delta (``split.split_in_delta``: the base's arrays stay as they are).
    """
    delta = concat_by_leaf([delta, new], [delta.leaf_of_slot, new_leaves])
    if delta.size <= merge_threshold(base.size, splitter.max_leaf_size):
        sizes = live_sizes + np.bincount(new_leaves, minlength=live_sizes.shape[0])
        return split_in_delta(tree, base, delta, sizes, row_ok, splitter)
    limits = split_limits(base, splitter)
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    tree, merged = split_big_leaves(tree, merged, splitter, limits)
    return tree, merged, merged.empty_like(tree.n_leaves), None


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
    tree, base, delta, moved = add_to_parts(
        st.tree, st.base, st.delta, part, leaves, st.live_sizes, row_ok, splitter
    )
    row_id = np.concatenate([st.row_id, np.full(first - st.row_id.shape[0], -1, np.int64), new_ids])
    idmap = st.idmap.without(new_ids[old_rows >= 0]).with_added(row_id, rows)
    if moved is not None:  # a split moved vectors to new rows: the old ones are tombstones
        gap = np.full(int(moved.new[0]) - row_id.shape[0], -1, np.int64)
        moved_ids = row_id[moved.old]
        row_id = np.concatenate([row_id, gap, moved_ids])
        ok = np.ones(row_id.shape[0], dtype=bool)
        if row_ok is not None:
            ok[: row_ok.shape[0]] = row_ok
        ok[moved.old] = False
        row_ok = ok
        idmap = idmap.without(moved_ids).with_added(row_id, moved.new)
    new_state = st.replace(
        tree=tree,
        table=st.table_for(tree),
        base=base,
        delta=delta,
        row_id=row_id,
        row_ok=row_ok,
        idmap=idmap,
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


def wasteful(st: IndexState) -> bool:
    """Whether storage holds as many dead rows (deleted, replaced, or moved by a split) as
    live ones, and at least :data:`AUTO_COMPACT_MIN_DEAD`: what a write compacts
    (``ClusteredIndex.auto_compact``), so that storage stays within twice the live vectors
    (plus that many), at a cost of O(1) rows rewritten per row written."""
    live = len(st.idmap)
    return st.storage.n - live >= max(live, AUTO_COMPACT_MIN_DEAD)


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
