"""The compiled CPU backend: the code scan of :mod:`.numba_kernels` and the stages of
:mod:`.numba_stages` (routing a few queries, the error-bound cut, the rerank) in the NumPy
searcher's pipeline.

Candidates are chosen in one compiled pass per part over each query's probed leaves (no
per-leaf Python loop, no temporaries the size of the probed codes), with NumPy's float32
steps: both backends pick the same candidates (but for the pair terms' rare rounding, see
:mod:`.numba_kernels`). The rerank reads the candidates' rows where they lie and rounds each
exact distance once from a float64 sum (``numba_stages.rerank_rows``), where NumPy sums in
float32: the same neighbours up to ties within that rounding, and the same results for a
query alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask
from ..core.codes import CodeTable, level_scale, words_for
from ..core.codes import plane_dots as core_plane_dots
from ..core.metrics import Metric
from ..core.parts import Part, leaf_sizes
from ..core.query_codes import QUERY_BITS, QueryCodes, slack_per_step
from ..core.topk import NO_KEY, rows_of
from ..search.candidates import candidate_width
from ..search.pipeline import HostSearcher, SearchInputs, SearchRequest
from ..search.route import FLAT_MAX_LEAVES, route, route_for
from ..storage.vectors import VectorStore
from . import numba_kernels, numba_lone, numba_stages

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
        qc = quantize(rotated_queries, self.table.origin, self.table.code_bits)
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


#: The query quantiser's top level.
_TOP_LEVEL = (1 << QUERY_BITS) - 1


def quantize(rotated: F32, origin: F32, code_bits: int = 1) -> QueryCodes:
    """``core.query_codes.quantize_queries(rotated - origin, code_bits)``, compiled: ``rotated``
    ``(nq, D)`` float32, ``origin`` ``(D,)`` float32."""
    nq, dim = rotated.shape
    planes = np.empty((nq, QUERY_BITS, words_for(dim)), dtype=np.uint64)
    terms = np.empty((4, nq), dtype=np.float32)
    slack = np.float32(slack_per_step(dim, code_bits))
    scale = level_scale(code_bits)
    numba_kernels.quantize(rotated, origin, _TOP_LEVEL, scale, slack, planes, terms)
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
    small batches, the candidate scan, the error-bound cut and the rerank. The NumPy
    backend's candidates: routing picks the same leaves (its fast scores are trusted only
    where the rounding cannot change the choice), the scan and the cut run NumPy's float32
    steps (but for the pair terms' rare rounding, see ``numba_kernels``); the rerank's
    distances are rounded once from float64 sums (see the module docstring)."""

    selector: NumbaCodeSelector

    def __init__(self, inputs: SearchInputs, selector: NumbaCodeSelector) -> None:
        super().__init__(inputs, selector)
        tree = inputs.tree
        self._flat = tree.n_leaves <= FLAT_MAX_LEAVES and tree.leaf_of_node[0] < 0
        self._ip = inputs.metric is Metric.IP
        self._no_sizes = np.zeros(tree.n_leaves, dtype=np.int64)
        dim = selector.table.centroids.shape[1]
        self._words = words_for(dim)
        self._code_bits = selector.table.code_bits
        self._slack = np.float32(slack_per_step(dim, self._code_bits))

    def search(self, q: F32, request: SearchRequest) -> tuple[I64, F32]:
        """A few queries in one compiled call where it can (``numba_lone.search_lone``: the
        stages' results without the Python between them), else stage by stage."""
        rotated = self.inputs.quantizer.rotate(q)
        if q.shape[0] <= _KERNEL_ROUTE_MAX_QUERIES:
            found = self._search_lone(q, rotated, request)
            if found is not None:
                return found
        return self.search_rotated(q, rotated, request)

    def _search_lone(self, q: F32, rotated: F32, request: SearchRequest) -> tuple[I64, F32] | None:
        """``numba_lone.search_lone`` on a flat tree with one part of codes; ``None``
        where the stages must run instead."""
        inputs, selector = self.inputs, self.selector
        tree = inputs.tree
        probes = request.probes
        if not self._flat or probes >= tree.n_leaves or len(selector.parts) != 1:
            return None
        width = candidate_width(request.candidates, probes, selector.longest)
        if width == 0:
            return None
        part, table = selector.parts[0], selector.table
        nq, k = q.shape[0], request.k
        leaves = np.empty((nq, probes), dtype=np.int64)
        out_rows = np.empty((nq, k), dtype=np.int64)
        out_dist = np.empty((nq, k), dtype=np.float32)
        first, second = inputs.storage.row_arrays()
        args = (
            q,
            rotated,
            tree.leaf_centroids,
            tree.leaf_sq_norms,
            self._ip,
            tree.max_centroid_norm,
            request.live_sizes,
            request.need,
            table.origin,
            _TOP_LEVEL,
            level_scale(self._code_bits),
            self._slack,
            self._words,
            table.centroids,
            table.leaf_nodes,
            part.offsets,
            part.codes,
            part.factors,
            _NO_ROWS if part.rows is None else part.rows,
            _ALL_OK if request.row_ok is None else np.ascontiguousarray(request.row_ok),
            selector.longest,
            width,
            k if request.bounded else 0,
            first,
            second,
            _METRIC_CODES[inputs.metric],
        )
        done = numba_lone.search_lone(*args, False, leaves, out_rows, out_dist)
        if done == numba_lone.UNSURE:  # a near tie at the last place: the exact scores decide
            leaves = route(tree, rotated, probes, inputs.metric)
            done = numba_lone.search_lone(*args, True, leaves, out_rows, out_dist)
        return (out_rows, out_dist) if done == numba_lone.DONE else None

    def _route(self, q: F32, probes: int) -> I64:
        """``route.route`` of a few queries on a flat tree, compiled: the same leaves."""
        tree, metric = self.inputs.tree, self.inputs.metric
        if not self._flat or probes >= tree.n_leaves:
            return route(tree, q, probes, metric)
        leaves, _, unsure = self._route_flat(q, probes, self._no_sizes)
        if unsure.any():  # a near tie at the last place: settled by the exact scores
            leaves[unsure] = route(tree, q[unsure], probes, metric)
        return leaves

    def _route_flat(self, q: F32, keep: int, sizes: I64) -> tuple[I64, I64, Mask]:
        """``numba_stages.route_flat``: leaves ``(nq, keep)``, the rows they hold by
        ``sizes`` ``(nq,)`` and which queries' leaves are ``unsure`` ``(nq,)``."""
        tree = self.inputs.tree
        nq = q.shape[0]
        leaves = np.empty((nq, keep), dtype=np.int64)
        held = np.empty(nq, dtype=np.int64)
        unsure = np.empty(nq, dtype=np.bool_)
        numba_stages.route_flat(
            q,
            tree.leaf_centroids,
            tree.leaf_sq_norms,
            self._ip,
            tree.max_centroid_norm,
            sizes,
            leaves,
            held,
            unsure,
        )
        return leaves, held, unsure

    def route(self, rotated: F32, request: SearchRequest) -> I64:
        """Probed leaves: a few queries by the compiled router and with no seed leaf first
        (the heap scan needs none); a batch as the NumPy searcher routes it (one BLAS
        product, and a seed that pays for itself in pruning)."""
        if rotated.shape[0] > _KERNEL_ROUTE_MAX_QUERIES:
            return super().route(rotated, request)
        inputs = self.inputs
        if self._flat and request.probes < inputs.tree.n_leaves:
            leaves, held, unsure = self._route_flat(rotated, request.probes, request.live_sizes)
            if not unsure.any() and int(held.min()) >= request.need:
                return leaves
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
        """``search.rerank.rerank``, compiled (``numba_stages.rerank_rows``)."""
        return _rerank(q, rows, k, self.inputs.storage, self.inputs.metric)


_METRIC_CODES = {
    Metric.L2: numba_stages.L2,
    Metric.COSINE: numba_stages.COSINE,
    Metric.IP: numba_stages.IP,
}


def _rerank(q: F32, rows: I64, k: int, storage: VectorStore, metric: Metric) -> tuple[I64, F32]:
    """Rows ``(nq, k)`` int64 and distances ``(nq, k)`` float32 of prepared queries ``q``
    ``(nq, d)`` against candidate ``rows`` ``(nq, m)`` (``-1`` for none), read where they
    lie in ``storage``."""
    nq = q.shape[0]
    out_rows = np.empty((nq, k), dtype=np.int64)
    out_dist = np.empty((nq, k), dtype=np.float32)
    first, second = storage.row_arrays()
    numba_stages.rerank_rows(
        q, np.ascontiguousarray(rows), first, second, _METRIC_CODES[metric], out_rows, out_dist
    )
    return out_rows, out_dist


def probe() -> str | None:
    """Run test kernels against NumPy: ``None`` when they compile (or load from the cache)
    and agree, else why not (a numba that imports may still fail to compile, e.g. the
    popcount or prefetch intrinsic on an llvmlite without it)."""
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 1 << 62, (2, QUERY_BITS, 3), dtype=np.int64).astype(np.uint64)
    codes = rng.integers(0, 1 << 62, (3, 5), dtype=np.int64).astype(np.uint64)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    rows = np.array([[4, -1, 0, 2]], dtype=np.int64)
    try:
        got = plane_dots(planes, codes)
        found = np.empty((1, 2), dtype=np.int64)
        dist = np.empty((1, 2), dtype=np.float32)
        numba_stages.rerank_rows(x[1:2], rows, x[:3], x[3:], numba_stages.L2, found, dist)
    except Exception as exc:
        return f"numba's test kernels failed ({type(exc).__name__}: {exc})"
    exact = ((x[[4, 0, 2]].astype(np.float64) - x[1].astype(np.float64)) ** 2).sum(axis=1)
    best = np.argsort(exact)[:2]
    if not (
        np.array_equal(got, core_plane_dots(planes, codes))
        and np.array_equal(found[0], np.array([4, 0, 2])[best])
        and np.array_equal(dist[0], exact[best].astype(np.float32))
    ):
        return "numba's test kernels gave wrong results"
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
