"""The compiled CPU backend: the code scan of :mod:`.numba_kernels` and the stages of
:mod:`.numba_stages` (routing a few queries, the error-bound cut, the rerank's choice) in the
NumPy searcher's pipeline.

Candidates are chosen in one compiled pass per part over each query's probed leaves (no
per-leaf Python loop, no temporaries the size of the probed codes), with NumPy's float32
steps; the rerank's gathers and distances are NumPy's own. So both backends pick the same
candidates and return the same results (but for the pair terms' rare rounding, see
:mod:`.numba_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask
from ..core.codes import QUERY_BITS, CodeTable, QueryCodes, slack_per_step, words_for
from ..core.codes import plane_dots as core_plane_dots
from ..core.metrics import Metric
from ..core.parts import Part, leaf_sizes
from ..core.topk import NO_KEY, rows_of
from ..search.candidates import candidate_width
from ..search.pipeline import HostSearcher, SearchInputs, SearchRequest
from ..search.rerank import candidate_distances, rerank_blocks
from ..search.route import FLAT_MAX_LEAVES, route, route_for
from . import numba_kernels, numba_stages

__all__ = [
    "NumbaBackend",
    "NumbaCodeSelector",
    "NumbaSearcher",
    "plane_dots",
    "probe",
    "quantize",
]

_NO_ROWS = np.empty(0, dtype=np.int64)
_ALL_OK = np.empty(0, dtype=np.bool_)


class NumbaCodeSelector:
    """Picks candidates from binary codes with the compiled scan (see
    :func:`.numba_kernels.scan_codes`)."""

    def __init__(self, table: CodeTable, parts: Sequence[Part]) -> None:
        self.table = table
        self.parts = tuple(p for p in parts if p.size > 0)
        for part in self.parts:
            if part.codes is None or part.factors is None:
                raise TypeError("this part holds no codes")
        self.longest = int(leaf_sizes(parts).max(initial=0))

    def select(
        self, rotated_queries: F32, leaves: I64, m: int, row_ok: Mask | None = None
    ) -> tuple[U64, F32]:
        """Keys and radii ``(nq, m')``: see
        :func:`~vectordb.search.candidates.select_candidates` (the same candidates)."""
        nq, n_slots = leaves.shape
        keep = candidate_width(m, n_slots, self.longest)
        heap = np.full((nq, keep), NO_KEY, dtype=np.uint64)
        heap_radius = np.zeros((nq, keep), dtype=np.float32)
        if nq == 0 or keep == 0 or not self.parts:
            return heap, heap_radius
        qc = quantize(rotated_queries, self.table.origin)
        p, r_q = self._pair_terms(rotated_queries, leaves)
        ok = _ALL_OK if row_ok is None else np.ascontiguousarray(row_ok)
        for part in self.parts:
            numba_kernels.scan_codes(
                qc.planes,
                qc.lo,
                qc.delta,
                qc.total,
                qc.slack,
                p,
                r_q,
                leaves,
                part.offsets,
                part.codes,
                part.factors,
                _NO_ROWS if part.rows is None else part.rows,
                ok,
                self.longest,
                heap,
                heap_radius,
            )
        return heap, heap_radius

    def _pair_terms(self, rotated: F32, leaves: I64) -> tuple[F32, F32]:
        """``p`` and ``r_q`` ``(nq, L)`` float32 of every probed (query, leaf) pair (0 where
        ``leaves`` is ``-1``): ``core.codes.pair_terms``, compiled."""
        p = np.empty(leaves.shape, dtype=np.float32)
        r_q = np.empty(leaves.shape, dtype=np.float32)
        table = self.table
        numba_kernels.pair_terms(
            rotated, table.centroids, table.leaf_nodes, leaves, table.metric is Metric.IP, p, r_q
        )
        return p, r_q


def quantize(rotated: F32, origin: F32) -> QueryCodes:
    """``core.codes.quantize_queries(rotated - origin)``, compiled: ``rotated`` ``(nq, D)``
    float32, ``origin`` ``(D,)`` float32."""
    nq, dim = rotated.shape
    planes = np.empty((nq, QUERY_BITS, words_for(dim)), dtype=np.uint64)
    terms = np.empty((4, nq), dtype=np.float32)
    slack = np.float32(slack_per_step(dim))
    numba_kernels.quantize(rotated, origin, (1 << QUERY_BITS) - 1, slack, planes, terms)
    return QueryCodes(planes, terms[0], terms[1], terms[2], terms[3])


def plane_dots(planes: U64, codes: U64) -> npt.NDArray[np.unsignedinteger]:
    """``core.codes.plane_dots``, compiled: ``(nq, QUERY_BITS, w)`` planes x ``(w, m)``
    codes -> ``(nq, m)`` uint32."""
    if planes.shape[1] != QUERY_BITS:
        raise ValueError(f"expected {QUERY_BITS} bit planes, got {planes.shape[1]}")
    out = np.empty((planes.shape[0], codes.shape[1]), dtype=np.uint32)
    numba_kernels.plane_dots(planes, codes, out)
    return out


#: Queries up to which routing scores leaves with the compiled kernel (more share one
#: BLAS product, which is faster).
_KERNEL_ROUTE_MAX_QUERIES = 8


class NumbaSearcher(HostSearcher):
    """:class:`~vectordb.search.pipeline.HostSearcher` with compiled stages: routing of
    small batches, the candidate scan, the error-bound cut and the rerank's choice. The
    same results as the NumPy backend's searcher, bit for bit: routing picks the same leaves
    (its fast scores are trusted only where the rounding cannot change the choice), the
    other stages run NumPy's float32 steps (but for the pair terms' rare rounding, see
    ``numba_kernels``), and the rerank's distances are NumPy's."""

    def __init__(self, inputs: SearchInputs, selector: NumbaCodeSelector) -> None:
        super().__init__(inputs, selector)
        tree = inputs.tree
        self._flat = tree.n_leaves <= FLAT_MAX_LEAVES and tree.leaf_of_node[0] < 0
        self._ip = inputs.metric is Metric.IP

    def _route(self, q: F32, probes: int) -> I64:
        """``route.route`` of a few queries on a flat tree, compiled: the same leaves."""
        tree, metric = self.inputs.tree, self.inputs.metric
        nq, keep = q.shape[0], min(probes, tree.n_leaves)
        if not self._flat or keep == tree.n_leaves:
            return route(tree, q, probes, metric)
        leaves = np.empty((nq, keep), dtype=np.int64)
        unsure = np.empty(nq, dtype=np.bool_)
        numba_stages.route_flat(
            q,
            tree.leaf_centroids,
            tree.leaf_sq_norms,
            self._ip,
            tree.max_centroid_norm,
            leaves,
            unsure,
        )
        if unsure.any():  # a near tie at the last place: settled by the exact scores
            leaves[unsure] = route(tree, q[unsure], probes, metric)
        return leaves

    def route(self, rotated: F32, request: SearchRequest) -> I64:
        """Probed leaves: a few queries by the compiled router and with no seed leaf first
        (the heap scan needs none); a batch as the NumPy searcher routes it (one BLAS
        product, and a seed that pays for itself in pruning)."""
        if rotated.shape[0] > _KERNEL_ROUTE_MAX_QUERIES:
            return super().route(rotated, request)
        inputs = self.inputs
        return route_for(
            inputs.tree,
            rotated,
            request.probes,
            request.need,
            request.live_sizes,
            inputs.metric,
            self._route,
        )

    def cut(self, keys: U64, radius: F32, k: int) -> I64:
        """``core.topk.within_bound``, compiled."""
        if keys.shape[1] <= k:
            return rows_of(keys)
        rows = np.empty(keys.shape, dtype=np.int64)
        numba_stages.within_bound(keys, radius, k, rows)
        return rows

    def rerank(self, q: F32, rows: I64, k: int) -> tuple[I64, F32]:
        """``search.rerank.rerank``, its choice compiled."""
        return _rerank(q, rows, k, self.inputs.storage.take, self.inputs.metric)


def _rerank(
    q: F32, rows: I64, k: int, take: Callable[[I64], F32], metric: Metric
) -> tuple[I64, F32]:
    """``search.rerank.rerank``: NumPy's gathers and distances, the choice compiled."""
    nq, d = q.shape
    out_rows = np.empty((nq, k), dtype=np.int64)
    out_dist = np.empty((nq, k), dtype=np.float32)
    width = int((rows >= 0).sum(axis=1).max(initial=0))
    if width == 0:
        out_rows.fill(-1)
        out_dist.fill(np.inf)
        return out_rows, out_dist
    if width < rows.shape[1]:  # candidates pruned by their bounds: read only the others
        packed = np.empty((nq, width), dtype=np.int64)
        numba_stages.compact_rows(rows, packed)
        rows = packed
    for start, stop in rerank_blocks(nq, width, d):
        r = rows[start:stop]
        dist = candidate_distances(q[start:stop], r, take, metric)
        numba_stages.best_rows(dist, r, k, out_rows[start:stop], out_dist[start:stop])
    return out_rows, out_dist


def probe() -> str | None:
    """Run a test kernel against NumPy: ``None`` when it compiles (or loads from the cache)
    and agrees, else why not (a numba that imports may still fail to compile, e.g. the
    popcount intrinsic on an llvmlite without it)."""
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 1 << 62, (2, QUERY_BITS, 3), dtype=np.int64).astype(np.uint64)
    codes = rng.integers(0, 1 << 62, (3, 5), dtype=np.int64).astype(np.uint64)
    try:
        got = plane_dots(planes, codes)
    except Exception as exc:
        return f"numba's test kernel failed ({type(exc).__name__}: {exc})"
    if not np.array_equal(got, core_plane_dots(planes, codes)):
        return "numba's test kernel gave wrong results"
    return None


class NumbaBackend:
    """numba-compiled code scan on the CPU."""

    name = "numba"
    plane_dots = staticmethod(plane_dots)

    def searcher(
        self, table: CodeTable, parts: Sequence[Part], inputs: SearchInputs
    ) -> NumbaSearcher:
        """Every stage on the CPU, the compiled ones over the codes of ``parts``."""
        return NumbaSearcher(inputs, NumbaCodeSelector(table, parts))
