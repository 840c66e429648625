"""``ClusteredIndex.query``: hits that carry their documents, by vector, text or both.

A vector query ranks by the index's ``search`` (``Hit.score = -distance``); a text query
by BM25 over the index's ``text_field`` (:mod:`vectordb.storage.fulltext`; ``Hit.score``
the BM25 score, ``distance`` ``None``); a hybrid query (both) runs each side for
:func:`depth` ``(k) = max(4 * k, 50)`` results, so that the fusion sees each side's top
candidates beyond its own top ``k``, and fuses them (:mod:`vectordb.core.fusion`):
``fusion="weighted"`` (default) with ``alpha`` in ``[0, 1]`` (the vector side's weight,
default 0.5), or ``fusion="rrf"`` (reciprocal rank, constant 60). Weighted is the default
because it ranked better than RRF on every labelled set measured, by recall@10 and by
MRR@10 (``bench/results/2026-12-02-retrieval``: Debian packages, the Python glossary alone
and among 110,000 sentences). A hybrid hit's ``distance`` is its
vector distance when the vector side found it, else ``None``. A ``filter`` restricts
both sides. The documents of all the hits of a call (a batch too) are read in one query
of the metadata store. Fewer than ``k`` hits when fewer match (no padding).

:class:`Querying` gives ``ClusteredIndex`` these methods, and :meth:`Querying.index_text`,
which turns text search on for an index built without ``text_field``.
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._types import F32, F64, I64
from .._validation import MAX_K, as_query_matrix, check_k, check_text_field
from ..core.fusion import rrf, weighted
from ..errors import InvalidParameterError
from ..storage.filters import Filter, check_filter
from ..storage.metadata import MetadataStore
from .hit import Hit

__all__ = [
    "DEFAULT_FUSION",
    "DEPTH_FACTOR",
    "MIN_DEPTH",
    "Querying",
    "check_texts",
    "depth",
    "finish_query",
    "hits_of",
    "query_options",
    "run_query",
    "text_hits",
    "vector_depth",
]

#: How a hybrid query fuses its two lists unless told (see the module docstring).
DEFAULT_FUSION = "weighted"
#: A hybrid query fetches ``max(DEPTH_FACTOR * k, MIN_DEPTH)`` results of each side.
DEPTH_FACTOR = 4
MIN_DEPTH = 50
_SEARCH = ("probes", "rerank_factor", "target_recall")
#: One side's ranking: ids ``(m,)`` int64, scores ``(m,)`` float64 (higher better) and the
#: vector distances ``(m,)`` float32 (``None`` for text).
Ranked = tuple[I64, F64, F32 | None]


def depth(k: int) -> int:
    """Results fetched from each side of a hybrid query of ``k`` (at most ``MAX_K``)."""
    return min(max(DEPTH_FACTOR * k, MIN_DEPTH), MAX_K)


def query_options(params: Mapping[str, Any]) -> tuple[str, float, list[Any]]:
    """``(fusion, alpha, [probes, rerank_factor, target_recall])`` of ``query``'s keyword
    parameters, checked (those of ``search`` are checked by it)."""
    unknown = sorted(set(params) - {"fusion", "alpha", *_SEARCH})
    if unknown:
        raise InvalidParameterError(f"unknown query parameters: {unknown}")
    fusion = params.get("fusion", DEFAULT_FUSION)
    if fusion not in ("rrf", "weighted"):
        raise InvalidParameterError(f"fusion must be 'rrf' or 'weighted', got {fusion!r}")
    alpha = params.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= float(alpha) <= 1:
        raise InvalidParameterError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return str(fusion), float(alpha), [params.get(name) for name in _SEARCH]


def text_hits(
    metadata: MetadataStore, texts: Any, n: int, filt: Filter | None
) -> list[tuple[I64, F64]]:
    """The ``n`` best BM25 matches of each of ``texts`` (a sequence of ``str``); a callable
    filter is run once for them all."""
    check_texts(texts)
    ids = metadata.matching(filt) if callable(filt) else None
    return [metadata.text_search(t, n, None if ids is not None else filt, ids=ids) for t in texts]


def check_texts(texts: Any, rows: int | None = None) -> None:
    """``InvalidParameterError`` unless ``texts`` is a sequence of texts (as many as
    ``rows`` query vectors, if given)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidParameterError("texts must be a list of str")
    if rows is not None and len(texts) != rows:
        raise InvalidParameterError(f"got {rows} vectors but {len(texts)} texts")


def _fused(vector: Ranked | None, text: Ranked | None, k: int, how: str, alpha: float) -> Ranked:
    if vector is None or text is None:
        side = vector if vector is not None else text
        if side is None:
            raise InvalidParameterError("query needs a vector, a text or both")
        return side[0][:k], side[1][:k], None if side[2] is None else side[2][:k]
    if how == "rrf":
        ids, scores = rrf([vector[0], text[0]], k)
    else:
        ids, scores = weighted((vector[0], vector[1]), (text[0], text[1]), alpha, k)
    dist = vector[2] if vector[2] is not None else np.full(vector[0].shape, np.nan, np.float32)
    where = {id_: d for id_, d in zip(vector[0].tolist(), dist.tolist(), strict=True)}
    dists = np.array([where.get(i, np.nan) for i in ids.tolist()], dtype=np.float32)
    return ids, scores, dists


def hits_of(
    metadata: MetadataStore,
    vectors: tuple[I64, F32] | None,
    texts: list[tuple[I64, F64]] | None,
    k: int,
    fusion: str = DEFAULT_FUSION,
    alpha: float = 0.5,
) -> list[list[Hit]]:
    """One list of hits per query, best first: from ``vectors`` (``search_batch``'s
    ``(nq, n)`` ids and distances, padded with ``-1``), ``texts`` (one ``text_search`` per
    query) or both (fused), cut to ``k``; the documents read in one query."""
    nq = vectors[0].shape[0] if vectors is not None else len(texts or ())
    if vectors is not None and texts is not None and len(texts) != nq:
        raise InvalidParameterError(f"got {nq} vectors but {len(texts)} texts")
    ranked: list[Ranked] = []
    for i in range(nq):
        v: Ranked | None = None
        if vectors is not None:
            keep = vectors[0][i] >= 0
            d = vectors[1][i][keep]
            v = (vectors[0][i][keep], 0.0 - d.astype(np.float64), d)
        t: Ranked | None = None if texts is None else (*texts[i], None)
        ranked.append(_fused(v, t, k, fusion, alpha))
    docs = iter(metadata.get_many([i for r in ranked for i in r[0].tolist()]))
    out: list[list[Hit]] = []
    for ids, scores, ds in ranked:
        dists = [None] * len(ids) if ds is None else [None if x != x else x for x in ds.tolist()]
        out.append(
            [
                Hit(id_, d, score, next(docs))
                for id_, score, d in zip(ids.tolist(), scores.tolist(), dists, strict=True)
            ]
        )
    return out


def run_query(
    searcher: Callable[..., Callable[[F32], tuple[I64, F32]]],
    metadata: MetadataStore,
    q: F32 | None,
    texts: Any,
    k: Any,
    filt: Any,
    params: Mapping[str, Any],
) -> list[list[Hit]]:
    """``query_batch`` of an index: ``searcher(k, probes, rerank_factor, filter,
    target_recall)`` its search of query rows ``q`` ``(nq, d)`` float32, ``metadata`` its
    documents; ``texts`` a list of ``str`` (or ``None``)."""
    fusion, alpha, options = query_options(params)
    k, filt = check_k(k), check_filter(filt)
    if q is None and texts is None:
        raise InvalidParameterError("query needs a vector, a text or both")
    if texts is not None:
        check_texts(texts, None if q is None else q.shape[0])
    n = vector_depth(k, texts is not None)
    if q is None:  # the search parameters checked all the same (no filter: no matching)
        searcher(n, *options[:2], None, options[2])
        found = None
    else:
        found = searcher(n, *options[:2], filt, options[2])(q)
    return finish_query(metadata, found, texts, k, filt, fusion, alpha)


def vector_depth(k: int, with_text: bool) -> int:
    """How many results the vector side of a query of ``k`` fetches."""
    return depth(k) if with_text else k


def finish_query(
    metadata: MetadataStore,
    found: tuple[I64, F32] | None,
    texts: Any,
    k: int,
    filt: Filter | None,
    fusion: str = DEFAULT_FUSION,
    alpha: float = 0.5,
) -> list[list[Hit]]:
    """The hits of queries whose vector side is ``found`` (``search_batch``'s ``(nq, n)``
    arrays, ``n = vector_depth(k, ...)``; ``None``: no vector) and whose texts are
    ``texts`` (``None``: none): the text side run, fused, the documents read. ``k`` and
    ``filt`` checked."""
    n = vector_depth(k, found is not None and texts is not None)
    matched = None if texts is None else text_hits(metadata, texts, n, filt)
    return hits_of(metadata, found, matched, k, fusion, alpha)


class Querying:
    """``query``, ``query_batch`` and ``index_text`` of ``ClusteredIndex``."""

    _params: dict[str, Any]
    _metadata: MetadataStore
    _write_lock: threading.RLock

    if TYPE_CHECKING:

        @property
        def dim(self) -> int: ...

        def __contains__(self, id_: object) -> bool: ...

        def _searcher(
            self, k: Any, probes: Any, rerank_factor: Any, filt: Any, target: Any
        ) -> Callable[[F32], tuple[I64, F32]]: ...

    def query(
        self,
        vector: Any = None,
        text: Any = None,
        k: int = 10,
        filter: Filter | None = None,
        **search_params: Any,
    ) -> list[Hit]:
        """The ``k`` best :class:`~vectordb.Hit` s (id, distance, score, metadata), best first,
        for a ``vector`` ``(d,)``, a ``text`` (needs ``text_field``) or both (hybrid; scores
        and ``search_params``, e.g. ``fusion="rrf"``: :mod:`vectordb.index.query`)."""
        q = None if vector is None else as_query_matrix(vector, self.dim, single=True)
        texts = None if text is None else [text]
        found = run_query(self._searcher, self._metadata, q, texts, k, filter, search_params)
        return self._live(found)[0]

    def query_batch(
        self,
        vectors: Any = None,
        texts: Sequence[str] | None = None,
        k: int = 10,
        filter: Filter | None = None,
        **search_params: Any,
    ) -> list[list[Hit]]:
        """:meth:`query` for each row of ``vectors`` ``(nq, d)`` and/or each of ``texts``
        (as many), one metadata read for all."""
        q = None if vectors is None else as_query_matrix(vectors, self.dim, single=False)
        found = run_query(self._searcher, self._metadata, q, texts, k, filter, search_params)
        return self._live(found)

    def _finish_query(
        self, found: tuple[I64, F32] | None, texts: Any, k: int, filt: Filter | None, params: Any
    ) -> list[list[Hit]]:
        """:func:`finish_query` on this index's documents (for ``AsyncEngine.query``, whose
        vector side is its batched search); ``params``: :func:`query_options`'s."""
        return self._live(finish_query(self._metadata, found, texts, k, filt, *params))

    def _live(self, hits: list[list[Hit]]) -> list[list[Hit]]:
        """``hits`` without those deleted since their search (no document read, and no
        longer in the index): a hit always names a live vector."""
        if all(h.metadata is not None for one in hits for h in one):
            return hits
        return [[h for h in one if h.metadata is not None or h.id in self] for one in hits]

    @property
    def text_field(self) -> str | None:
        """The metadata field indexed for text queries (``None``: no text search)."""
        return self._metadata.text_field

    def index_text(self, field: str) -> None:
        """Index the string ``field`` of every document for ``query(text=...)``, as
        ``build(text_field=field)`` does: for an index built or saved without one.

        It takes about a second per 100,000 short documents (SQLite FTS5). Idempotent for
        the field already indexed; ``InvalidParameterError`` for another one (or a name
        that is not one of ASCII letters, digits and ``_``), ``BackendUnavailableError``
        without FTS5. The field joins the index's parameters, which the next ``save`` or
        checkpoint writes; until then a reopened index has no text search, so a program
        that opens an index made without it calls this after every ``open``.
        """
        checked = check_text_field(field)
        if checked is None:
            raise InvalidParameterError("index_text needs a field name, got None")
        with self._write_lock:
            current = self._metadata.text_field
            if current is not None and current != checked:
                raise InvalidParameterError(
                    f"the index already searches the text of {current!r}; one field per index"
                )
            self._metadata.enable_text(checked)
            self._params["text_field"] = checked
