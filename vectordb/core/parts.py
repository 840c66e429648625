"""Which code slots belong to which leaf, and how adds and compaction rearrange them.

An index's codes live in two *parts*, each laid out leaf by leaf:

* ``base``: everything present at build, open or the last merge;
* ``delta``: what was added since, re-sorted by leaf at every add (it stays small: past
  ``merge_threshold`` slots it is merged into the base).

So every leaf owns at most two contiguous slot ranges, one per part, and an add costs time
proportional to the delta, not to the index. Parts are immutable; changes make new ones.
Slot ``s`` of a part holds the codes of storage row ``rows[s]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask
from .codes import FACTORS

__all__ = ["Part", "concat_by_leaf", "leaf_sizes", "merge_threshold"]


@dataclass(frozen=True)
class Part:
    """Slots of one part, leaf by leaf.

    Attributes
    ----------
    offsets : (n_leaves + 1,) int64, leaf ``l`` owns slots ``offsets[l]:offsets[l + 1]``
    rows : (s,) int64 storage row of every slot, or ``None`` when slot ``s`` is row ``s``
        (after a build, open or compaction: saves 8 bytes per vector)
    codes : (code_rows, s) uint64 word-major codes (``core.codes``), or ``None``
        (``leaf_scan="vectors"``)
    factors : (FACTORS, s) float32 per-vector factors of the estimate (``core.codes``), or
        ``None`` with the codes
    """

    offsets: I64
    rows: I64 | None
    codes: U64 | None = None
    factors: F32 | None = None

    @classmethod
    def empty(cls, n_leaves: int, words: int | None) -> Part:
        return cls(
            offsets=np.zeros(n_leaves + 1, dtype=np.int64),
            rows=np.empty(0, dtype=np.int64),
            codes=None if words is None else np.empty((words, 0), dtype=np.uint64),
            factors=None if words is None else np.empty((FACTORS, 0), dtype=np.float32),
        )

    def empty_like(self, n_leaves: int) -> Part:
        """An empty part over ``n_leaves`` leaves holding what this one holds (codes and
        their factors, or neither)."""
        words = None if self.codes is None else self.codes.shape[0]
        return Part.empty(n_leaves, words)

    @property
    def size(self) -> int:
        return int(self.offsets[-1] if self.rows is None else self.rows.shape[0])

    def row_range(self, a: int, b: int) -> I64:
        """Storage rows of slots ``a:b``."""
        return np.arange(a, b, dtype=np.int64) if self.rows is None else self.rows[a:b]

    @property
    def all_rows(self) -> I64:
        """(s,) int64 storage rows of all slots."""
        return self.row_range(0, self.size)

    @property
    def leaf_of_slot(self) -> I64:
        """(s,) int64 leaf of every slot."""
        return np.repeat(np.arange(self.offsets.shape[0] - 1), np.diff(self.offsets))

    @property
    def nbytes(self) -> int:
        arrays = (self.offsets, self.rows, self.codes, self.factors)
        return sum(int(a.nbytes) for a in arrays if a is not None)


def concat_by_leaf(
    parts: list[Part],
    leaves: list[I64],
    keep: list[Mask] | None = None,
    n_leaves: int | None = None,
) -> Part:
    """One part holding the slots of ``parts`` (with leaf labels ``leaves``), leaf by leaf.

    Within a leaf, slots keep the order of ``parts`` and of their slots. ``keep`` masks
    slots out (deleted rows). Cost: linear in the slots concatenated.
    """
    if n_leaves is None:
        n_leaves = parts[0].offsets.shape[0] - 1
    masks = keep if keep is not None else [np.ones(p.size, dtype=bool) for p in parts]
    leaf = np.concatenate([lf[m] for lf, m in zip(leaves, masks, strict=True)])
    order = np.argsort(leaf, kind="stable")

    def cat(arrays: list[npt.NDArray[Any]] | None, axis: int = 0) -> npt.NDArray[Any] | None:
        if arrays is None:
            return None
        picked = [a[..., m] if axis else a[m] for a, m in zip(arrays, masks, strict=True)]
        joined = np.concatenate(picked, axis=axis)
        return np.ascontiguousarray(joined[:, order] if axis else joined[order])

    with_codes = parts[0].codes is not None
    counts = np.bincount(leaf, minlength=n_leaves)
    return Part(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        rows=cat([p.all_rows for p in parts]),
        codes=cat([p.codes for p in parts], axis=1) if with_codes else None,  # type: ignore[misc]
        factors=cat([p.factors for p in parts], axis=1) if with_codes else None,  # type: ignore[misc]
    )


def leaf_sizes(parts: Sequence[Part], row_ok: Mask | None = None) -> I64:
    """(n_leaves,) int64 slots per leaf over ``parts``; only rows with ``row_ok`` if given."""
    total = np.zeros(parts[0].offsets.shape[0] - 1, dtype=np.int64)
    for part in parts:
        if row_ok is None:
            total += np.diff(part.offsets)
        elif part.size:
            ok = row_ok[part.all_rows].astype(np.int64)
            total += np.diff(np.concatenate([[0], np.cumsum(ok)])[part.offsets])
    return total


def merge_threshold(base_size: int, max_leaf_size: int) -> int:
    """Delta size past which an add merges the delta into the base.

    A delta of an eighth of the base keeps adds amortised O(1) per vector (each merge is
    linear in the index) while the second slot range per leaf stays short to scan.
    """
    return max(4 * max_leaf_size, base_size // 8)
