"""The state a search reads: parts, ids, tombstones, storage, and the searcher over them.

A write never changes a published state; it publishes a new one. So a search that took the
state at its start sees the index before or after any write, never half of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._types import F32, I64, Mask
from ..backends import Backend
from ..core.codes import CodeTable, Quantizer
from ..core.metrics import Metric
from ..core.parts import Part, leaf_sizes
from ..core.tree import Tree
from ..errors import UnknownIdError
from ..search.candidates import VectorScorer, VectorSelector
from ..search.pipeline import HostSearcher, Searcher, SearchInputs, SearchRequest
from ..storage.idmap import IdMap
from ..storage.snapshot import IndexData, LivingData
from ..storage.vectors import VectorStore

__all__ = ["BOUNDED_RERANK", "EXACT_FILTER_ROWS", "EXACT_RERANK", "IndexState"]

#: A filter matching at most this many vectors is answered by scoring them all exactly.
EXACT_FILTER_ROWS = 4096
#: Candidates kept per result when no ``rerank_factor`` is given (then pruned by the bound).
BOUNDED_RERANK = 10
#: The same for ``leaf_scan="vectors"``, whose scores are exact up to float32 rounding: the
#: rerank recomputes them batch-independently, and a second k keeps rows tied within
#: rounding at the k-th place (reranking 10 * k cost 45% of glove-50's batched QPS).
EXACT_RERANK = 2


@dataclass(frozen=True, eq=False)
class IndexState:
    """One consistent state: a search takes it whole, a write publishes a new one.

    ``row_id``/``row_ok`` are over storage rows (``row_ok`` is ``None`` while nothing was
    deleted); ``next_id`` is the first id ``add`` assigns without ids (past every id ever
    used, deleted ones included). ``live_sizes`` (live rows per leaf) and ``searcher`` are
    derived at construction; :meth:`replace` makes a new state with some fields changed.
    """

    quantizer: Quantizer
    metric: Metric
    backend: Backend
    tree: Tree
    table: CodeTable | None
    base: Part
    delta: Part
    row_id: I64
    row_ok: Mask | None
    idmap: IdMap
    storage: VectorStore
    next_id: int
    live_sizes: I64 = field(init=False)
    searcher: Searcher = field(init=False)
    #: The last read-only ``matching`` searched and what it gave: see :meth:`_filtered`.
    _memo: tuple[Any, ...] = field(init=False, default=(), repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: derived fields are set once, here
        set_(self, "live_sizes", leaf_sizes(self.parts, self.row_ok))
        inputs = SearchInputs(self.quantizer, self.tree, self.storage, self.metric)
        searcher: Searcher
        if self.table is not None:
            searcher = self.backend.searcher(self.table, self.parts, inputs)
        else:
            scorer = VectorScorer(self.storage.take, self.storage.slice, self.metric)
            searcher = HostSearcher(inputs, VectorSelector(scorer, self.parts))
        set_(self, "searcher", searcher)

    @classmethod
    def of(cls, data: IndexData | LivingData, backend: Backend) -> IndexState:
        """The first state of an index built or loaded as ``data``."""
        if isinstance(data, LivingData):
            return cls._living(data, backend)
        tree, base, ids = data.tree, data.base, data.ids
        has_codes = base.codes is not None
        return cls(
            quantizer=data.quantizer,
            metric=data.metric,
            backend=backend,
            tree=tree,
            table=(
                CodeTable.for_tree(tree, data.metric, data.quantizer.code_bits)
                if has_codes
                else None
            ),
            base=base,
            delta=base.empty_like(tree.n_leaves),
            row_id=ids,
            row_ok=None,
            idmap=IdMap.from_rows(ids, np.arange(ids.shape[0], dtype=np.int64)),
            storage=data.storage,
            next_id=int(ids.max(initial=-1)) + 1,
        )

    @classmethod
    def _living(cls, data: LivingData, backend: Backend) -> IndexState:
        """The state a checkpoint saved: its parts, its rows as they lie."""
        live = data.row_id >= 0
        rows = np.flatnonzero(live)
        codes = data.base.codes is not None
        return cls(
            quantizer=data.quantizer,
            metric=data.metric,
            backend=backend,
            tree=data.tree,
            table=(
                CodeTable.for_tree(data.tree, data.metric, data.quantizer.code_bits)
                if codes
                else None
            ),
            base=data.base,
            delta=data.delta,
            row_id=data.row_id,
            row_ok=None if bool(live.all()) else live,
            idmap=IdMap.from_rows(data.row_id, rows),
            storage=data.storage,
            next_id=data.next_id,
        )

    def replace(self, **changes: Any) -> IndexState:
        """This state with ``changes`` (field names), its derived fields made anew."""
        return dataclasses.replace(self, **changes)

    def table_for(self, tree: Tree) -> CodeTable | None:
        """The code table for ``tree`` (this state's own when the tree is unchanged)."""
        if tree is self.tree or self.table is None:
            return self.table
        return CodeTable.for_tree(tree, self.metric, self.quantizer.code_bits)

    @property
    def parts(self) -> tuple[Part, Part]:
        return self.base, self.delta

    @property
    def nbytes(self) -> int:
        """Process memory of this state: tree, code table, parts, ids, tombstones, rotation
        and the vectors when in RAM (memory-mapped vectors count 0)."""
        return (
            self.tree.nbytes
            + (self.table.nbytes if self.table is not None else 0)
            + self.base.nbytes
            + self.delta.nbytes
            + int(self.row_id.nbytes)
            + (int(self.row_ok.nbytes) if self.row_ok is not None else 0)
            + self.idmap.nbytes
            + self.storage.ram_bytes
            + self.quantizer.nbytes
        )

    def has(self, id_: int) -> bool:
        """Whether a live vector has the id ``id_``."""
        return bool(self.idmap.rows(np.array([id_], dtype=np.int64))[0] >= 0)

    def live_rows_of(self, ids: I64) -> I64:
        """Sorted storage rows ``(m,)`` int64 of those ``ids`` that are in the index."""
        rows = self.idmap.rows(ids)
        return np.sort(rows[rows >= 0])

    def rows_of(self, ids: I64, *, missing_ok: bool = False) -> I64:
        """Storage rows ``(n,)`` int64 of ``ids`` (``-1`` for absent ones, or
        ``UnknownIdError`` naming the first few unless ``missing_ok``)."""
        rows = self.idmap.rows(ids)
        if not missing_ok and (rows < 0).any():
            raise UnknownIdError(f"ids not in the index: {ids[rows < 0][:5].tolist()}")
        return rows

    def _filtered(self, matching: I64, masked: bool = False) -> tuple[I64, Any]:
        """Sorted live rows ``(m,)`` int64 of the ids ``matching``, and with ``masked``
        :meth:`only` of them (else ``None``), all read-only. The last answer is kept for a
        read-only ``matching``: a cached filter's matches, the same array for every
        search until the documents change, so repeated filtered searches skip this work."""
        memo = self._memo
        if memo and memo[0] is matching and (memo[2] is not None or not masked):
            return memo[1], memo[2]
        rows = memo[1] if memo and memo[0] is matching else self.live_rows_of(matching)
        rows.setflags(write=False)
        mask = None
        if masked:
            mask = self.only(rows)
            mask[0].setflags(write=False)
            mask[1].setflags(write=False)
        if not matching.flags.writeable:
            object.__setattr__(self, "_memo", (matching, rows, mask))  # one tuple: atomic
        return rows, mask

    def only(self, rows: I64) -> tuple[Mask, I64]:
        """A row mask ``(n_rows,)`` bool true at ``rows`` alone, and the leaf sizes under it."""
        row_ok = np.zeros(self.row_id.shape[0], dtype=bool)
        row_ok[rows] = True
        return row_ok, leaf_sizes(self.parts, row_ok)

    def ids_of(self, rows: I64) -> I64:
        """Ids ``(...)`` int64 of storage ``rows``, ``-1`` where a row is ``-1``."""
        if self.row_id.shape[0] == 0:
            return np.full(rows.shape, -1, dtype=np.int64)
        return np.where(rows >= 0, self.row_id[rows], np.int64(-1))  # row -1 reads the last

    def search(
        self, q: F32, k: int, probes: int, rerank_factor: int | None, matching: I64 | None
    ) -> tuple[I64, F32]:
        """Ids ``(nq, k)`` int64 and distances ``(nq, k)`` float32 of prepared queries
        ``q`` ``(nq, d)``, among the ids ``matching`` a filter (``None``: all live ones).
        ``rerank_factor`` ``None``: up to ``k * BOUNDED_RERANK`` candidates, those inside
        the error bound reranked (``core.topk.within_bound``); ``k * EXACT_RERANK`` with
        ``leaf_scan="vectors"``."""
        found, dists = self.search_rows(q, k, probes, rerank_factor, matching)
        return self.ids_of(found), dists

    def search_rows(
        self,
        q: F32,
        k: int,
        probes: int,
        rerank_factor: int | None,
        matching: I64 | None = None,
    ) -> tuple[I64, F32]:
        """:meth:`search`, answering storage rows (``-1`` padded) instead of ids.

        Few matches are scored exactly, like a brute force; otherwise the pipeline runs
        with the matches as its row mask, probing more leaves the fewer they are.
        """
        row_ok, sizes, allowed = self.row_ok, self.live_sizes, len(self.idmap)
        bounded = rerank_factor is None
        if rerank_factor is None:  # exact leaf scans need no bound: a second k guards ties
            rerank_factor = BOUNDED_RERANK if self.table is not None else EXACT_RERANK
        candidates = k * rerank_factor
        if matching is not None or allowed == 0:  # (an emptied index has no row to read)
            if matching is None:
                return self.searcher.rerank(q, np.empty((q.shape[0], 0), np.int64), k)
            rows = self._filtered(matching)[0]
            allowed = int(rows.shape[0])
            if allowed <= max(EXACT_FILTER_ROWS, candidates):
                cand = np.broadcast_to(rows, (q.shape[0], allowed))
                return self.searcher.rerank(q, np.ascontiguousarray(cand), k)
            row_ok, sizes = self._filtered(matching, masked=True)[1]
            # A selective filter leaves fewer matches per leaf: probe more leaves for them.
            probes = min(self.tree.n_nodes, probes * min(8, -(-len(self.idmap) // allowed)))
        request = SearchRequest(
            k=k,
            probes=probes,
            candidates=candidates,
            need=min(k, allowed),
            row_ok=row_ok,
            live_sizes=sizes,
            bounded=bounded,
        )
        return self.searcher.search(q, request)
