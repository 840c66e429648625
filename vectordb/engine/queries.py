"""``AsyncEngine.query`` and ``query_batch``: hits with their documents, whose vector side
is the engine's batched search.

A query with a vector runs that side as ``search`` (``search_batch``) does, gathered with
concurrent searches into one batch, fetched :func:`~vectordb.index.query.vector_depth`
deep; then the text side (BM25), the fusion and the one read of the documents run as one
call on the engine's executor. A text-only query is one call there. The answers equal
``ClusteredIndex.query``'s (``query_batch``'s) for the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from .._types import F32, I64
from .._validation import as_query_matrix, check_k
from ..errors import InvalidParameterError
from ..index.clustered import ClusteredIndex
from ..index.hit import Hit
from ..index.query import check_texts, query_options, vector_depth
from ..storage.filters import Filter, check_filter
from .lifecycle import Lifecycle

__all__ = ["Queries"]

T = TypeVar("T")


class Queries:
    """The query methods of ``AsyncEngine``."""

    _index: ClusteredIndex
    _life: Lifecycle

    if TYPE_CHECKING:

        async def search_batch(
            self,
            queries: Any,
            k: int = 10,
            probes: int | None = None,
            rerank_factor: int | None = None,
            *,
            filter: Filter | None = None,
            target_recall: float | None = None,
            timeout: float | None = None,
        ) -> tuple[I64, F32]: ...

        async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

        async def _call(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def query(
        self,
        vector: Any = None,
        text: Any = None,
        k: int = 10,
        filter: Filter | None = None,
        **params: Any,
    ) -> list[Hit]:
        """:meth:`ClusteredIndex.query`, the vector side batched with concurrent searches."""
        if vector is None:
            return await self.run(partial(self._index.query, None, text, k, filter, **params))
        if text is not None and not isinstance(text, str):
            raise InvalidParameterError(f"text must be a str, got {type(text).__name__}")
        rows = as_query_matrix(vector, self._index.dim, single=True)
        return (await self._query(rows, None if text is None else [text], k, filter, params))[0]

    async def query_batch(
        self,
        vectors: Any = None,
        texts: Sequence[str] | None = None,
        k: int = 10,
        filter: Filter | None = None,
        **params: Any,
    ) -> list[list[Hit]]:
        """:meth:`ClusteredIndex.query_batch`, the vector side one batch of the engine's."""
        if vectors is None:
            return await self.run(
                partial(self._index.query_batch, None, texts, k, filter, **params)
            )
        return await self._query(vectors, texts, k, filter, params)

    async def _query(
        self, vectors: Any, texts: Any, k: Any, filter: Any, params: dict[str, Any]
    ) -> list[list[Hit]]:
        fusion, alpha, (probes, rerank_factor, target) = query_options(params)
        k, filt = check_k(k), check_filter(filter)
        q = as_query_matrix(vectors, self._index.dim, single=False)
        if texts is not None:
            check_texts(texts, q.shape[0])
        # One operation from the search to the documents' read: a close waits for it all.
        with self._life.operation():
            ids, dists = await self.search_batch(
                q,
                vector_depth(k, texts is not None),
                probes,
                rerank_factor,
                filter=filt,
                target_recall=target,
            )
            return await self._call(
                self._index._finish_query, (ids, dists), texts, k, filt, (fusion, alpha)
            )
