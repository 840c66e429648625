"""The state a search reads: parts, ids, tombstones, storage, and the selector over them.

A write never changes a published state; it publishes a new one. So a search that took the
state at its start sees the index before or after any write, never half of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._types import F32, I64, Mask
from ..backends import CodeSelector
from ..core.codes import CodeTable, Quantizer, cos_table
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import Tree
from ..search.candidates import leaf_sizes, mostly_apart, select_by_runs, select_candidates
from ..search.pipeline import Stages, host_search
from ..search.rerank import VectorScorer
from ..storage.idmap import IdMap
from ..storage.vectors import InMemoryStorage, MmapStorage

__all__ = ["IndexState", "VectorSelector", "build_part", "code_table", "ids_of"]


def build_part(
    x: F32,
    tree: Tree,
    leaf_offsets: I64,
    quantizer: Quantizer,
    metric: Metric,
    codes: bool,
    on_rows: Callable[[int], None] | None = None,
) -> Part:
    """The base part of storage-ordered ``x`` ``(n, d)``: codes, residual norms (and ip
    offsets), leaf by leaf. ``tree.centroids`` must already be rotated ``(n_nodes, bits)``.
    ``on_rows(n)`` is called as every leaf's ``n`` rows are coded (progress)."""
    n = x.shape[0]
    rows = None  # slot i is storage row i
    if not codes:
        return Part(offsets=leaf_offsets, rows=rows)
    words = np.empty((quantizer.words, n), dtype=np.uint64)
    norms = np.empty(n, dtype=np.float32)
    dots = np.empty(n, dtype=np.float32) if metric is Metric.IP else None
    for leaf, node in enumerate(tree.leaf_nodes):
        a, b = int(leaf_offsets[leaf]), int(leaf_offsets[leaf + 1])
        centre = tree.centroids[node]
        residual = quantizer.rotate(x[a:b]) - centre
        norms[a:b] = np.sqrt(np.einsum("nd,nd->n", residual, residual))
        if dots is not None:
            dots[a:b] = np.einsum("nd,d->n", residual, centre)
        words[:, a:b] = quantizer.encode(residual)
        if on_rows is not None:
            on_rows(b - a)
    return Part(offsets=leaf_offsets, rows=rows, codes=words, norms=norms, dots=dots)


@dataclass(frozen=True)
class IndexState:
    """One consistent state: a search takes it whole, a write publishes a new one.

    ``row_id``/``row_ok`` are over storage rows (``row_ok`` is ``None`` while nothing was
    deleted); ``live_sizes`` counts live rows per leaf.
    """

    tree: Tree
    table: CodeTable | None
    base: Part
    delta: Part
    row_id: I64
    row_ok: Mask | None
    idmap: IdMap
    storage: InMemoryStorage | MmapStorage
    live_sizes: I64
    selector: CodeSelector

    @property
    def parts(self) -> tuple[Part, Part]:
        return self.base, self.delta

    @property
    def nbytes(self) -> int:
        """Process memory of this state: tree, code table, parts, ids, tombstones and the
        vectors when in RAM (memory-mapped vectors count 0)."""
        return (
            self.tree.nbytes
            + (self.table.nbytes if self.table is not None else 0)
            + self.base.nbytes
            + self.delta.nbytes
            + int(self.row_id.nbytes)
            + (int(self.row_ok.nbytes) if self.row_ok is not None else 0)
            + self.idmap.nbytes
            + self.storage.ram_bytes
        )

    def live_rows_of(self, ids: I64) -> I64:
        """Sorted storage rows ``(m,)`` int64 of those ``ids`` that are in the index."""
        rows = self.idmap.rows(ids)
        return np.sort(rows[rows >= 0])

    def only(self, rows: I64) -> tuple[Mask, I64]:
        """A row mask ``(n_rows,)`` bool true at ``rows`` alone, and the leaf sizes under it."""
        row_ok = np.zeros(self.row_id.shape[0], dtype=bool)
        row_ok[rows] = True
        return row_ok, leaf_sizes(self.parts, row_ok)


def code_table(tree: Tree, quantizer: Quantizer, metric: Metric) -> CodeTable:
    return CodeTable(
        centroids=tree.centroids,
        leaf_nodes=tree.leaf_nodes,
        cos_lut=cos_table(quantizer.bits),
        metric=metric,
    )


def ids_of(st: IndexState, rows: I64) -> I64:
    """Ids ``(...)`` int64 of storage ``rows``, ``-1`` where a row is ``-1``."""
    out = np.full(rows.shape, -1, dtype=np.int64)
    found = rows >= 0
    out[found] = st.row_id[rows[found]]
    return out


#: Grouping by leaf pays off once leaves are shared by this many queries on average.
_BY_LEAF_MIN_QUERIES = 4


class VectorSelector:
    """``leaf_scan="vectors"``: candidates by exact distances on the full vectors (CPU)."""

    def __init__(self, scorer: VectorScorer, parts: tuple[Part, Part], stages: Stages) -> None:
        self.scorer = scorer
        self.parts = parts
        self.stages = stages

    def search(
        self, q: F32, k: int, probes: int, m: int, row_ok: Mask | None, sizes: I64, need: int
    ) -> tuple[I64, F32]:
        """Every stage on the CPU: see ``stages.host_search``."""
        return host_search(self.stages, self, q, k, probes, m, row_ok, sizes, need)

    def select(self, queries: F32, leaves: I64, m: int, row_ok: Mask | None = None) -> I64:
        """``(nq, m')`` int64 rows (see ``leafscan.select_candidates``): grouped by leaf
        when leaves are shared by several queries of the batch, else query by query."""
        if mostly_apart(leaves, self.parts[0].offsets.shape[0] - 1, _BY_LEAF_MIN_QUERIES):
            return select_by_runs(self.scorer, self.parts, queries, leaves, m, row_ok)
        return select_candidates(self.scorer, self.parts, queries, leaves, m, row_ok)
