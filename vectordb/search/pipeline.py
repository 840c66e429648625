"""The search pipeline after validation: rotate, route, select candidates, rerank.

::

    prepared queries --rotate--> route (tree) --> probed leaves, nearest first
        --> candidates (codes or full vectors of those leaves) --> those within their error
        bound of the k-th (topk.within_bound) --> rerank (exact) --> top k

:class:`HostSearcher` runs the stages on the CPU with any :class:`CandidateSelector` (the
NumPy backend's codes, or :class:`~vectordb.search.candidates.VectorSelector`); the CuPy
backend runs the same stages on its device. Both take one :class:`SearchRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .._types import F32, I64, U64, Mask
from ..core.codes import Quantizer
from ..core.metrics import Metric
from ..core.topk import within_bound
from ..core.tree import Tree
from ..storage.vectors import VectorStore
from .rerank import rerank
from .route import nearest_first, route_for

__all__ = ["CandidateSelector", "HostSearcher", "SearchInputs", "SearchRequest", "Searcher"]


@dataclass(frozen=True, eq=False)
class SearchRequest:
    """What one search asks, after validation.

    Attributes
    ----------
    k : results per query
    probes : leaves searched per query (see ``route.route``)
    candidates : rows per query the candidate stage passes to the rerank (``k *
        rerank_factor``)
    need : rows a query's leaves must hold before the beam stops widening
    row_ok : (R,) bool over storage rows (live, and matching the filter), or ``None``
        for all
    live_sizes : (n_leaves,) int64 rows per leaf under ``row_ok``
    bounded : rerank only the candidates inside the estimates' error bound of the k-th
        (``core.topk.within_bound``); else all ``candidates``
    """

    k: int
    probes: int
    candidates: int
    need: int
    row_ok: Mask | None
    live_sizes: I64
    bounded: bool = False


@dataclass(frozen=True)
class SearchInputs:
    """What the stages read besides the codes: one state's tree and full vectors (in RAM
    or memory-mapped), and the index's rotation and metric."""

    quantizer: Quantizer
    tree: Tree
    storage: VectorStore
    metric: Metric


class CandidateSelector(Protocol):
    """Picks candidates from the probed leaves on the CPU (codes or full vectors)."""

    def select(
        self, rotated_queries: F32, leaves: I64, m: int, row_ok: Mask | None = None
    ) -> tuple[U64, F32]:
        """The m best by (estimate, row) among rows with ``row_ok`` (``(R,)`` bool over
        storage rows; ``None``: all): their ``topk`` keys ``(nq, m')`` uint64 (``NO_KEY``
        padded) and the error bounds of their estimates ``(nq, m')`` float32."""
        ...


class Searcher(Protocol):
    """Searches one state of an index: every stage, wherever the backend runs them."""

    def search(self, q: F32, request: SearchRequest) -> tuple[I64, F32]:
        """Storage rows ``(nq, k)`` int64 (``-1`` padded) and distances ``(nq, k)``
        float32 (ascending, ``inf`` padded) for prepared queries ``q`` ``(nq, d)``."""
        ...

    def rerank(self, q: F32, rows: I64, k: int) -> tuple[I64, F32]:
        """The last stage alone: the ``k`` best of candidate storage ``rows`` ``(nq, m)``
        (``-1`` for none) by exact distance, as :meth:`search` measures them (a filter
        with few matches is answered so)."""
        ...


class HostSearcher:
    """Every stage on the CPU, candidates from ``selector``. A backend with stages of its
    own (compiled ones) overrides :meth:`route`, :meth:`cut` or :meth:`rerank`."""

    def __init__(self, inputs: SearchInputs, selector: CandidateSelector) -> None:
        self.inputs = inputs
        self.selector = selector

    def search(self, q: F32, request: SearchRequest) -> tuple[I64, F32]:
        """See :class:`Searcher`."""
        return self.search_rotated(q, self.inputs.quantizer.rotate(q), request)

    def search_rotated(self, q: F32, rotated: F32, request: SearchRequest) -> tuple[I64, F32]:
        """:meth:`search` of prepared queries ``q`` ``(nq, d)`` already rotated
        (``rotated`` ``(nq, D)`` float32), stage by stage."""
        leaves = self.route(rotated, request)
        keys, radius = self.selector.select(rotated, leaves, request.candidates, request.row_ok)
        rows = self.cut(keys, radius, request.k if request.bounded else keys.shape[1])
        return self.rerank(q, rows, request.k)

    def route(self, rotated: F32, request: SearchRequest) -> I64:
        """Probed leaves ``(nq, L)`` int64 of rotated queries, ``-1`` padded, each row's
        nearest in column 0 (the seed of the candidate stage's pruning)."""
        inputs = self.inputs
        leaves = route_for(
            inputs.tree, rotated, request.probes, request.need, request.live_sizes, inputs.metric
        )
        return nearest_first(inputs.tree, rotated, leaves, inputs.metric)

    def cut(self, keys: U64, radius: F32, k: int) -> I64:
        """``core.topk.within_bound``: the candidates' rows the rerank must check."""
        return within_bound(keys, radius, k)

    def rerank(self, q: F32, rows: I64, k: int) -> tuple[I64, F32]:
        """``search.rerank.rerank`` of prepared queries ``q`` against candidate ``rows``."""
        return rerank(q, rows, k, self.inputs.storage.take, self.inputs.metric)
