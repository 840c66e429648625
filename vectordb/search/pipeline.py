"""The search stages after validation, on the host: rotate, route, select, rerank.

Shared by the CPU selectors (:class:`vectordb.backends.NumpyCodeSelector` and
:class:`vectordb.index.state.VectorSelector`); the CuPy backend runs the same stages on its
device instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .._types import F32, I64, Mask
from ..core.codes import Quantizer
from ..core.metrics import Metric
from ..core.tree import Tree
from ..storage.vectors import InMemoryStorage, MmapStorage
from .rerank import rerank

__all__ = ["CandidateSelector", "Stages", "host_search"]


class CandidateSelector(Protocol):
    """Picks candidates from the probed leaves on the CPU (codes or full vectors)."""

    def select(self, rotated_queries: F32, leaves: I64, m: int, row_ok: Mask | None = None) -> I64:
        """``(nq, m')`` int64 storage rows (``-1`` padded): the m best by (estimate, row),
        among rows with ``row_ok`` (``(R,)`` bool over storage rows; ``None``: all)."""
        ...


@dataclass(frozen=True)
class Stages:
    """What a search reads besides the codes: one state's tree and storage, and the
    index's rotation and metric."""

    quantizer: Quantizer
    tree: Tree
    storage: InMemoryStorage | MmapStorage
    metric: Metric


def host_search(
    stages: Stages,
    selector: CandidateSelector,
    q: F32,
    k: int,
    probes: int,
    m: int,
    row_ok: Mask | None,
    sizes: I64,
    need: int,
) -> tuple[I64, F32]:
    """Storage rows ``(nq, k)`` int64 and distances ``(nq, k)`` float32 of the ``k`` best
    of ``m`` candidates per prepared query ``q`` ``(nq, d)``.

    ``probes``, ``row_ok`` and ``sizes`` (live rows per leaf under ``row_ok``) go to
    routing and selection; ``need`` is the number of rows a query's leaves must hold
    before the beam stops widening.
    """
    rotated = stages.quantizer.rotate(q)
    leaves = stages.tree.route_for(rotated, probes, need, sizes, stages.metric)
    leaves = stages.tree.nearest_first(rotated, leaves, stages.metric)
    rows = selector.select(rotated, leaves, m, row_ok)
    return rerank(q, rows, k, stages.storage.take, stages.metric)
