"""The CPU backend: RaBitQ estimates with NumPy (AND + ``np.bitwise_count`` over the query's
bit planes, see ``core.codes``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask
from ..core.codes import CodeTable, estimate, pair_terms, plane_dots, radius
from ..core.parts import Part, leaf_sizes
from ..core.query_codes import quantize_queries
from ..core.topk import NO_KEY, candidate_keys
from ..search.candidates import candidate_width, mostly_apart, select_candidates, smallest_with
from ..search.pipeline import HostSearcher, SearchInputs

__all__ = ["NumpyBackend", "NumpyCodeSelector"]


#: Leaf by leaf pays off once leaves are shared by this many queries on average.
_FLAT_MAX_QUERIES_PER_LEAF = 4
#: Probed slots per block of the pair-by-pair path (bounds its temporaries).
_FLAT_ROWS = 1 << 18


class _BatchScorer:
    """Scores codes for one batch of rotated queries, quantised once (``LeafScorer``: the
    "queries" it is handed are indices into the batch)."""

    def __init__(self, table: CodeTable, rotated: F32) -> None:
        self.table = table
        self.rotated = rotated
        self.codes = quantize_queries(rotated - table.origin, table.code_bits)

    def score(self, qi: I64, leaf: int, part: Part, a: int, b: int) -> tuple[F32, F32]:
        """Estimates and radii ``(g, b - a)`` float32 of slots ``a:b`` for queries ``qi``."""
        if part.codes is None or part.factors is None:
            raise TypeError("this part holds no codes")
        qc = self.codes
        pair = pair_terms(self.table, self.rotated[qi], np.full(qi.shape[0], leaf, np.int64))
        factors = part.factors[:, None, a:b]
        with np.errstate(over="ignore", invalid="ignore"):
            est = estimate(
                plane_dots(qc.planes[qi], part.codes[:, a:b]),
                factors,
                qc.lo[qi, None],
                qc.delta[qi, None],
                qc.total[qi, None],
                pair.p[:, None],
            )
            bound = radius(factors, pair.r_q[:, None], qc.slack[qi, None])
        return est, bound


class NumpyCodeSelector:
    """Picks candidates from binary codes on the CPU, leaf by leaf (see
    :mod:`vectordb.search.candidates`)."""

    def __init__(self, table: CodeTable, parts: Sequence[Part]) -> None:
        self.table = table
        self.parts = tuple(parts)
        self.sizes = leaf_sizes(self.parts)  # parts never change: a write makes a new selector

    def select(
        self, rotated_queries: F32, leaves: I64, m: int, row_ok: Mask | None = None
    ) -> tuple[U64, F32]:
        """Keys and radii ``(nq, m')``: see
        :func:`~vectordb.search.candidates.select_candidates`.

        Batches whose queries mostly probe different leaves (single queries, small batches
        on many leaves) are scored pair by pair in one pass instead of leaf by leaf: the
        per-leaf loop would pay ~20 NumPy calls for one or two queries per leaf. Both ways
        compute the same estimates and pick the same rows.
        """
        scorer = _BatchScorer(self.table, rotated_queries)
        if mostly_apart(leaves, self.sizes.shape[0], _FLAT_MAX_QUERIES_PER_LEAF):
            return self._select_flat(scorer, leaves, m, row_ok)
        qi = np.arange(leaves.shape[0], dtype=np.int64)
        return select_candidates(scorer, self.parts, qi, leaves, m, row_ok)  # type: ignore[arg-type]

    def _select_flat(
        self, scorer: _BatchScorer, leaves: I64, m: int, row_ok: Mask | None
    ) -> tuple[U64, F32]:
        nq, n_slots = leaves.shape
        sizes = self.sizes
        keep = candidate_width(m, n_slots, int(sizes.max(initial=0)))
        out = np.full((nq, keep), NO_KEY, dtype=np.uint64)
        out_radius = np.zeros((nq, keep), dtype=np.float32)
        # Blocks of queries holding about _FLAT_ROWS probed slots each.
        per_query = np.where(leaves >= 0, sizes[np.maximum(leaves, 0)], 0).sum(axis=1)
        blocks = [np.arange(nq)]
        if per_query.sum() > _FLAT_ROWS:
            cuts = np.searchsorted(
                np.cumsum(per_query), np.arange(_FLAT_ROWS, per_query.sum(), _FLAT_ROWS)
            )
            blocks = np.split(np.arange(nq), np.unique(cuts[(cuts > 0) & (cuts < nq)]))
        for rows in blocks:
            keys, bounds = self._flat_keys(scorer, rows, leaves[rows], row_ok)
            found, found_radius = smallest_with(keys, bounds, keep)
            out[rows, : found.shape[1]] = found  # fewer columns if fewer rows were probed
            out_radius[rows, : found.shape[1]] = found_radius
        return out, out_radius

    def _flat_keys(
        self, scorer: _BatchScorer, batch: I64, leaves: I64, row_ok: Mask | None
    ) -> tuple[U64, F32]:
        """Keys and radii of every probed slot, ``(nq, n)`` with ``NO_KEY`` padding, for
        the queries ``batch`` of the scorer's batch."""
        table, qc = self.table, scorer.codes
        nq = leaves.shape[0]
        qi, slot = np.nonzero(leaves >= 0)  # pairs, grouped by query
        leaf = leaves[qi, slot]
        pairs = pair_terms(table, scorer.rotated[batch[qi]], leaf)
        blocks = [np.full((nq, 0), NO_KEY, dtype=np.uint64)]
        radii = [np.zeros((nq, 0), dtype=np.float32)]
        for part in self.parts:
            if part.codes is None or part.factors is None:
                raise TypeError("this part holds no codes")
            first = part.offsets[leaf]
            lens = part.offsets[leaf + 1] - first
            total = int(lens.sum())
            if total == 0:
                continue
            pair = np.repeat(np.arange(leaf.shape[0]), lens)
            slots = np.arange(total) - np.repeat(np.cumsum(lens) - lens - first, lens)
            query = qi[pair]
            # A lone query's terms broadcast (the same float32 steps as gathered ones).
            of_slot = batch[query] if nq > 1 else batch[:1]
            t = _flat_plane_dots(qc.planes, of_slot, part.codes, slots)
            factors = part.factors[:, slots]
            with np.errstate(over="ignore", invalid="ignore"):
                est = estimate(
                    t, factors, qc.lo[of_slot], qc.delta[of_slot], qc.total[of_slot], pairs.p[pair]
                )
                bound = radius(factors, pairs.r_q[pair], qc.slack[of_slot])
            rows = slots if part.rows is None else part.rows[slots]
            keys = candidate_keys(est, rows, row_ok)
            if nq == 1:  # one query: its row is every pair's
                blocks.append(keys[None, :])
                radii.append(bound[None, :])
                continue
            counts = np.bincount(query, minlength=nq)
            position = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            width = int(counts.max())
            dense = np.full((nq, width), NO_KEY, dtype=np.uint64)
            dense[query, position] = keys
            dense_radius = np.zeros((nq, width), dtype=np.float32)
            dense_radius[query, position] = bound
            blocks.append(dense)
            radii.append(dense_radius)
        return np.concatenate(blocks, axis=1), np.concatenate(radii, axis=1)


def _flat_plane_dots(planes: U64, query: I64, codes: U64, slots: I64) -> npt.NDArray[np.uint32]:
    """``plane_dots`` pair by pair: ``T`` ``(n,)`` of query ``query[i]`` (``query`` ``(n,)``,
    or ``(1,)`` for one query throughout) with the code in slot ``slots[i]`` ``(n,)`` of
    ``codes`` ``(code_bits * w, s)``."""
    n_planes, w = planes.shape[1], planes.shape[2]
    code_bits = codes.shape[0] // w
    # A lone query's planes broadcast; several queries' are gathered per slot.
    mine = planes[query[0], :, :, None] if query.shape[0] == 1 or planes.shape[0] == 1 else None
    out = np.zeros(slots.shape[0], dtype=np.uint32)
    for bit in range(code_bits - 1, -1, -1):
        acc = np.zeros((n_planes, slots.shape[0]), dtype=np.uint32)
        # Word by word over 1-D gathers: 2x faster than an (n, w) block summed along its
        # short axis.
        for word in range(w):
            code = codes[bit * w + word][slots]
            if mine is not None:
                acc += np.bitwise_count(code[None, :] & mine[:, word])
            else:
                for j in range(n_planes):
                    acc[j] += np.bitwise_count(code & planes[query, j, word])
        out <<= 1
        for j in range(n_planes - 1, -1, -1):
            out += acc[j] << j
    return out


class NumpyBackend:
    """NumPy on the CPU: always available."""

    name = "numpy"
    plane_dots = staticmethod(plane_dots)

    def searcher(
        self, table: CodeTable, parts: Sequence[Part], inputs: SearchInputs
    ) -> HostSearcher:
        """Every stage on the CPU, candidates from the codes of ``parts`` (nothing to
        copy)."""
        return HostSearcher(inputs, NumpyCodeSelector(table, parts))
