"""Array steps of a living index: place new vectors, fold the delta in, compact.

Pure functions over ``Part``s and the tree; the index calls them under its write lock and
publishes their results as one new state.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .codes import Quantizer
from .metrics import Metric
from .parts import Part, concat_by_leaf, merge_threshold
from .tree import Tree

__all__ = ["add_to_parts", "assign_leaves", "compacted", "encode_part"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]


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


def add_to_parts(
    base: Part, delta: Part, new: Part, new_leaves: I64, row_ok: B | None, max_leaf_size: int
) -> tuple[Part, Part]:
    """New ``(base, delta)`` with ``new`` (rows on ``new_leaves``) added.

    The delta is re-sorted by leaf (cost: the delta's size); when it outgrows
    ``merge_threshold`` it is folded into the base, dropping rows without ``row_ok``.
    """
    delta = concat_by_leaf([delta, new], [delta.leaf_of_slot, new_leaves])
    if delta.size <= merge_threshold(base.size, max_leaf_size):
        return base, delta
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    empty = Part.empty(
        base.offsets.shape[0] - 1,
        None if base.codes is None else base.codes.shape[0],
        base.dots is not None,
    )
    return merged, empty


def compacted(base: Part, delta: Part, row_ok: B | None) -> tuple[Part, I64]:
    """The live slots of both parts as one part, leaf by leaf, with rows renumbered.

    Returns the part (its ``rows`` are ``0..n_live-1``) and ``order``: the old storage row
    of each new row, i.e. the vectors to write, in that order.
    """
    keep = None if row_ok is None else [row_ok[base.all_rows], row_ok[delta.all_rows]]
    merged = concat_by_leaf([base, delta], [base.leaf_of_slot, delta.leaf_of_slot], keep)
    order = merged.all_rows
    renumbered = Part(
        offsets=merged.offsets,
        rows=None,
        codes=merged.codes,
        norms=merged.norms,
        dots=merged.dots,
    )
    return renumbered, order
