"""The CPU backend: Hamming distances with NumPy (XOR + ``np.bitwise_count``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask
from ..core.codes import CodeTable, estimate, estimate_broadcast, query_side
from ..core.parts import Part, leaf_sizes
from ..core.topk import NO_KEY, candidate_keys, rows_of, smallest
from ..search.candidates import candidate_width, mostly_apart, select_candidates
from ..search.pipeline import HostSearcher, SearchInputs

__all__ = ["NumpyBackend", "NumpyCodeSelector", "hamming"]


#: Leaf by leaf pays off once leaves are shared by this many queries on average.
_FLAT_MAX_QUERIES_PER_LEAF = 4
#: Probed slots per block of the pair-by-pair path (bounds its temporaries).
_FLAT_ROWS = 1 << 18

#: Below this many (query, code) pairs one broadcast XOR beats a loop over words: the loop
#: costs ~3 NumPy calls per word, which dominates small blocks (measured on x86-64, w=12).
_ONE_SHOT_PAIRS = 16384


def hamming(queries: U64, codes: U64) -> npt.NDArray[np.uint16]:
    """Hamming distances between every query and every code.

    Parameters
    ----------
    queries : (nq, w) uint64, row-major query codes
    codes : (w, m) uint64, word-major codes (each row one word of every code); may be a
        column slice of a larger array

    Returns
    -------
    (nq, m) uint16 distances (at most 64 * w, so w <= 1024).
    """
    if queries.shape[0] * codes.shape[1] <= _ONE_SHOT_PAIRS:
        x = np.bitwise_count(queries[:, :, None] ^ codes[None, :, :])
        return x.sum(axis=1, dtype=np.uint16)
    # One contiguous word row at a time keeps temporaries at (nq, m) for large blocks.
    acc = np.bitwise_count(queries[:, 0, None] ^ codes[0][None, :]).astype(np.uint16)
    for j in range(1, codes.shape[0]):
        acc += np.bitwise_count(queries[:, j, None] ^ codes[j][None, :])
    return acc


class NumpyCodeSelector:
    """Picks candidates from binary codes on the CPU, leaf by leaf (see
    :mod:`vectordb.search.candidates`)."""

    def __init__(self, table: CodeTable, parts: Sequence[Part]) -> None:
        self.table = table
        self.parts = tuple(parts)
        self.sizes = leaf_sizes(self.parts)  # parts never change: a write makes a new selector

    def score(self, q: F32, leaf: int, part: Part, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 estimates of slots ``a:b`` for rotated queries ``q``."""
        table = self.table
        if part.codes is None or part.norms is None:
            raise TypeError("this part holds no codes")
        side = query_side(table, q, np.full(q.shape[0], leaf, dtype=np.int64))
        dots = part.dots[a:b] if part.dots is not None else None
        with np.errstate(over="ignore", invalid="ignore"):
            return estimate(
                hamming(side.codes, part.codes[:, a:b]),
                part.norms[a:b],
                side.r_q,
                table.cos_lut,
                table.metric,
                dots,
                side.c_q,
            )

    def select(self, rotated_queries: F32, leaves: I64, m: int, row_ok: Mask | None = None) -> I64:
        """``(nq, m')`` int64 rows: see :func:`~vectordb.search.candidates.select_candidates`.

        Batches whose queries mostly probe different leaves (single queries, small batches
        on many leaves) are scored pair by pair in one pass instead of leaf by leaf: the
        per-leaf loop would pay ~20 NumPy calls for one or two queries per leaf. Both ways
        compute the same estimates and pick the same rows.
        """
        if mostly_apart(leaves, self.sizes.shape[0], _FLAT_MAX_QUERIES_PER_LEAF):
            return self._select_flat(rotated_queries, leaves, m, row_ok)
        return select_candidates(self, self.parts, rotated_queries, leaves, m, row_ok)

    def _select_flat(self, q: F32, leaves: I64, m: int, row_ok: Mask | None) -> I64:
        nq, n_slots = leaves.shape
        sizes = self.sizes
        keep = candidate_width(m, n_slots, int(sizes.max(initial=0)))
        out = np.full((nq, keep), -1, dtype=np.int64)
        # Blocks of queries holding about _FLAT_ROWS probed slots each.
        per_query = np.where(leaves >= 0, sizes[np.maximum(leaves, 0)], 0).sum(axis=1)
        blocks = [np.arange(nq)]
        if per_query.sum() > _FLAT_ROWS:
            cuts = np.searchsorted(
                np.cumsum(per_query), np.arange(_FLAT_ROWS, per_query.sum(), _FLAT_ROWS)
            )
            blocks = np.split(np.arange(nq), np.unique(cuts[(cuts > 0) & (cuts < nq)]))
        for rows in blocks:
            keys = self._flat_keys(q[rows], leaves[rows], row_ok)
            found = rows_of(smallest(keys, keep))  # fewer columns if fewer rows were probed
            out[rows, : found.shape[1]] = found
        return out

    def _flat_keys(self, q: F32, leaves: I64, row_ok: Mask | None) -> U64:
        """Keys of every probed slot, ``(nq, n)`` with ``NO_KEY`` padding."""
        table = self.table
        nq = leaves.shape[0]
        qi, slot = np.nonzero(leaves >= 0)  # pairs, grouped by query
        leaf = leaves[qi, slot]
        side = query_side(table, q[qi], leaf)
        blocks = [np.full((nq, 0), NO_KEY, dtype=np.uint64)]
        for part in self.parts:
            if part.codes is None or part.norms is None:
                raise TypeError("this part holds no codes")
            first = part.offsets[leaf]
            lens = part.offsets[leaf + 1] - first
            total = int(lens.sum())
            if total == 0:
                continue
            pair = np.repeat(np.arange(leaf.shape[0]), lens)
            slots = np.arange(total) - np.repeat(np.cumsum(lens) - lens - first, lens)
            # Word by word over 1-D gathers: 2x faster than an (n, w) block summed along
            # its short axis.
            h = np.zeros(total, dtype=np.uint16)
            for j in range(part.codes.shape[0]):
                h += np.bitwise_count(part.codes[j][slots] ^ side.codes[pair, j])
            with np.errstate(over="ignore", invalid="ignore"):
                est = estimate_broadcast(
                    h,
                    part.norms[slots],
                    side.r_q[pair],
                    table.cos_lut,
                    table.metric,
                    None if part.dots is None else part.dots[slots],
                    None if side.c_q is None else side.c_q[pair],
                )
            rows = slots if part.rows is None else part.rows[slots]
            keys = candidate_keys(est, rows, row_ok)
            query = qi[pair]
            counts = np.bincount(query, minlength=nq)
            position = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            dense = np.full((nq, int(counts.max())), NO_KEY, dtype=np.uint64)
            dense[query, position] = keys
            blocks.append(dense)
        return np.concatenate(blocks, axis=1)


class NumpyBackend:
    """NumPy on the CPU: always available."""

    name = "numpy"
    hamming = staticmethod(hamming)

    def searcher(
        self, table: CodeTable, parts: Sequence[Part], inputs: SearchInputs
    ) -> HostSearcher:
        """Every stage on the CPU, candidates from the codes of ``parts`` (nothing to
        copy)."""
        return HostSearcher(inputs, NumpyCodeSelector(table, parts))
