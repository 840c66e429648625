"""LangChain adapter: :class:`VectorDBStore`, a ``langchain_core`` ``VectorStore``.

Install with ``pip install 'vectordb-embedded[langchain]'``::

    from vectordb.integrations.langchain import VectorDBStore

    store = VectorDBStore(embeddings)  # any langchain_core Embeddings
    store.add_texts(["cats purr", "dogs bark"], metadatas=[{"pet": "cat"}, {"pet": "dog"}])
    store.similarity_search("kitten", k=1, filter={"pet": "cat"})
    store.similarity_search("purr", k=1, retrieval_mode="hybrid")  # keywords + vectors
    store.as_retriever(search_type="mmr").invoke("pets")
    store.as_retriever(search_type="hybrid").invoke("barking dogs")
    store.save("my_store")
    store = VectorDBStore.load("my_store", embeddings)

Documents keep their string ids (a uuid4 when none is given) and their metadata (JSON
values, filterable with vectordb's dict filters or a callable on the metadata dict).
``similarity_search_with_score`` returns vectordb's distance (smaller is closer; see
:mod:`vectordb.core.metrics`); relevance scores are in [0, 1] (see
:meth:`VectorDBStore._select_relevance_score_fn`). Async methods are served by
:class:`vectordb.AsyncEngine`, which batches concurrent searches.

Retrieval modes (the store's ``retrieval_mode``, or any search's ``retrieval_mode=``, or a
retriever's ``search_type``): ``"vector"`` (nearest embeddings), ``"text"`` (BM25 over the
texts, SQLite FTS5; the query is not embedded) and ``"hybrid"`` (both lists fused, by
default weighted with ``alpha``, the vector side's weight, 0.5; ``fusion="rrf"`` for
reciprocal rank; see :mod:`vectordb.index.query`). With ``"text"`` and ``"hybrid"``,
``similarity_search_with_score`` returns the score that ranked a document (BM25 or
fused, higher is better) instead of a distance.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from ..core.metrics import Metric
from ..errors import InvalidParameterError
from ..index.clustered import ClusteredIndex
from ._store import Record, TextIndex

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore, VectorStoreRetriever
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vectordb.integrations.langchain needs langchain-core: "
        "pip install 'vectordb-embedded[langchain]'"
    ) from exc

__all__ = ["RETRIEVAL_MODES", "VectorDBRetriever", "VectorDBStore"]

_KIND = "langchain"
#: What ``retrieval_mode`` takes.
RETRIEVAL_MODES = ("vector", "text", "hybrid")


def _mode(mode: Any) -> str:
    if mode not in RETRIEVAL_MODES:
        raise InvalidParameterError(
            f"retrieval_mode must be one of {RETRIEVAL_MODES}, got {mode!r}"
        )
    return str(mode)


#: Arguments of LangChain's own callers that change nothing here: ``index()`` passes
#: ``batch_size`` to ``add_documents``, and the texts are written in one call anyway.
_IGNORED = frozenset({"batch_size"})


def _no_kwargs(kwargs: dict[str, Any], ignored: frozenset[str] = frozenset()) -> None:
    """An unknown argument is an error, not ignored."""
    unknown = sorted(set(kwargs) - ignored)
    if unknown:
        raise InvalidParameterError(f"unknown keyword arguments {unknown}")


def _document(record: Record) -> Document:
    return Document(id=record.id, page_content=record.text, metadata=record.metadata)


class VectorDBStore(VectorStore):
    """A LangChain vector store on a :class:`vectordb.ClusteredIndex`.

    Parameters
    ----------
    embedding : langchain_core Embeddings
        Embeds documents (``embed_documents``) and queries (``embed_query``; the
        ``a``-prefixed twins in async methods).
    metric : {"cosine", "l2", "ip"}
        vectordb's distance: ``1 - cos``, squared Euclidean, ``-dot``.
    probes, rerank_factor : int, >= 1, optional
        Search defaults; every search method also takes them as keyword arguments.
    retrieval_mode : {"vector", "text", "hybrid"}
        How ``similarity_search`` and its twins rank (see the module docstring); each
        takes ``retrieval_mode=`` too, and hybrid ones ``fusion=`` and ``alpha=``.
        Searches by vector, relevance scores (``similarity_score_threshold``) and MMR
        rank by vector, whatever the store's mode.
    **build_options
        Passed to :meth:`ClusteredIndex.build` when the first texts arrive
        (``max_leaf_size``, ``branching_factor``, ``seed``, ``backend``, ...).

    Notes
    -----
    Search methods take ``filter=``: a vectordb dict filter on metadata keys
    (``{"pet": "cat"}``, ``{"year": {"$gte": 2020}}``, ``$in``, ``$nin``, ``$ne``, ``$gt``,
    ``$lt``, ``$lte``), or a callable ``(metadata dict) -> bool``.
    """

    def __init__(
        self,
        embedding: Embeddings,
        *,
        metric: str | Metric = "cosine",
        probes: int | None = None,
        rerank_factor: int | None = None,
        retrieval_mode: str = "vector",
        **build_options: Any,
    ) -> None:
        self._embedding = embedding
        self.retrieval_mode = _mode(retrieval_mode)
        self._core = TextIndex(_KIND, metric, probes, rerank_factor, build_options)

    @property
    def embeddings(self) -> Embeddings:
        """The embedding model."""
        return self._embedding

    @property
    def index(self) -> ClusteredIndex | None:
        """The vectordb index (``None`` until the first texts are added)."""
        return self._core.index

    def __repr__(self) -> str:
        n = 0 if self.index is None else len(self.index)
        return (
            f"VectorDBStore(n={n}, metric={self._core.metric.value!r},"
            f" retrieval_mode={self.retrieval_mode!r})"
        )

    # ------------------------------------------------------------------ writes
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed ``texts`` and add them; an existing id is replaced. Returns the ids.

        ``metadatas``: one JSON-serialisable dict per text (keys ``_text`` and ``_sid``
        are reserved). ``ids``: one string (or None for a new uuid4) per text.
        ``batch_size`` (passed by ``langchain_core.indexing.index``) is accepted and
        ignored; other keyword arguments raise ``InvalidParameterError``.
        """
        _no_kwargs(kwargs, _IGNORED)
        texts = list(texts)
        if not texts:
            return []
        vectors = self._embedding.embed_documents(texts)
        return self._core.upsert(vectors, texts, ids=ids, metadatas=metadatas)

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """:meth:`add_texts` with ``aembed_documents`` and the async engine."""
        _no_kwargs(kwargs, _IGNORED)
        texts = list(texts)
        if not texts:
            return []
        vectors = await self._embedding.aembed_documents(texts)
        return await self._core.aupsert(vectors, texts, ids=ids, metadatas=metadatas)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete by id (unknown ids are ignored); ``ids=None`` deletes everything. A bare
        string as ``ids`` raises ``InvalidParameterError``."""
        _no_kwargs(kwargs)
        self._core.delete(ids)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """:meth:`delete` through the async engine."""
        _no_kwargs(kwargs)
        await self._core.adelete(ids)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents of ``ids`` that exist, in the order asked; never raises for
        unknown ids."""
        return [_document(r) for r in self._core.get(ids)]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """:meth:`get_by_ids` through the async engine."""
        return [_document(r) for r in await self._core.aget(ids)]

    # ------------------------------------------------------------------ search
    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` documents nearest to ``embedding`` with their vectordb distances
        (smaller is closer), closest first. Takes ``filter``, ``probes``, ``rerank_factor``."""
        records = self._core.search(embedding, k, **kwargs)
        return [(_document(r), r.distance) for r in records]

    async def asimilarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score_by_vector` through the async engine."""
        records = await self._core.asearch(embedding, k, **kwargs)
        return [(_document(r), r.distance) for r in records]

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` best documents for ``query``, best first, with their vectordb distances
        (smaller is closer) or, by text or hybrid, their scores (higher is better).

        Takes ``retrieval_mode`` (the store's by default), ``filter``, ``probes``,
        ``rerank_factor``, and for hybrid ``fusion`` and ``alpha``."""
        mode = _mode(kwargs.pop("retrieval_mode", self.retrieval_mode))
        if mode == "vector":
            vector = self._embedding.embed_query(query)
            return self.similarity_search_with_score_by_vector(vector, k, **kwargs)
        both = self._embedding.embed_query(query) if mode == "hybrid" else None
        return [(_document(r), r.score) for r in self._core.query(both, query, k, **kwargs)]

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score` with ``aembed_query`` and the engine."""
        mode = _mode(kwargs.pop("retrieval_mode", self.retrieval_mode))
        if mode == "vector":
            vector = await self._embedding.aembed_query(query)
            return await self.asimilarity_search_with_score_by_vector(vector, k, **kwargs)
        both = await self._embedding.aembed_query(query) if mode == "hybrid" else None
        records = await self._core.aquery(both, query, k, **kwargs)
        return [(_document(r), r.score) for r in records]

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        self._vector_only(kwargs, "relevance scores (in [0, 1])", "vector")
        return super()._similarity_search_with_relevance_scores(
            query, k, retrieval_mode="vector", **kwargs
        )

    async def _asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        self._vector_only(kwargs, "relevance scores (in [0, 1])", "vector")
        return await super()._asimilarity_search_with_relevance_scores(
            query, k, retrieval_mode="vector", **kwargs
        )

    def _vector_only(self, kwargs: dict[str, Any], what: str, default: str | None = None) -> None:
        """Take ``retrieval_mode`` out of ``kwargs``; ``InvalidParameterError`` unless it is
        ``"vector"`` (when absent: ``default``, else the store's)."""
        mode = _mode(kwargs.pop("retrieval_mode", default or self.retrieval_mode))
        if mode != "vector":
            raise InvalidParameterError(f"{what} rank by vector; got retrieval_mode={mode!r}")

    def search(self, query: str, search_type: str, **kwargs: Any) -> list[Document]:
        """``search_type``: LangChain's, and ``"hybrid"`` or ``"text"`` (a retrieval mode)."""
        if search_type in ("hybrid", "text"):
            return self.similarity_search(query, retrieval_mode=search_type, **kwargs)
        return super().search(query, search_type, **kwargs)

    async def asearch(self, query: str, search_type: str, **kwargs: Any) -> list[Document]:
        """:meth:`search` through the async engine."""
        if search_type in ("hybrid", "text"):
            return await self.asimilarity_search(query, retrieval_mode=search_type, **kwargs)
        return await super().asearch(query, search_type, **kwargs)

    def as_retriever(self, **kwargs: Any) -> VectorDBRetriever:
        """A :class:`VectorDBRetriever`: LangChain's ``search_type`` values and
        ``"hybrid"``, ``"text"``; ``search_kwargs`` go to the search (``k``, ``filter``,
        ``retrieval_mode``, ``fusion``, ...)."""
        tags = kwargs.pop("tags", None) or [*self._get_retriever_tags()]
        return VectorDBRetriever(vectorstore=self, tags=tags, **kwargs)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` documents nearest to ``query``, closest first."""
        return [d for d, _ in self.similarity_search_with_score(query, k, **kwargs)]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search` through the async engine."""
        return [d for d, _ in await self.asimilarity_search_with_score(query, k, **kwargs)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[Document]:
        """The ``k`` documents nearest to ``embedding``, closest first."""
        return [d for d, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    async def asimilarity_search_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[Document]:
        """:meth:`similarity_search_by_vector` through the async engine."""
        found = await self.asimilarity_search_with_score_by_vector(embedding, k, **kwargs)
        return [d for d, _ in found]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Distance -> relevance in [0, 1], 1 for identical vectors (clipped below at 0).

        cosine: ``cos``; ip: the dot product (the cosine for unit-length embeddings); l2
        (vectordb's is squared): LangChain's Euclidean ``1 - sqrt(distance) / sqrt(2)``.
        """
        core = self._core
        return lambda distance: min(1.0, max(0.0, core.similarity(distance)))

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """``k`` documents picked by maximal marginal relevance among the ``fetch_k``
        nearest (langchain_core's ``maximal_marginal_relevance`` on the stored vectors)."""
        self._vector_only(kwargs, "MMR searches", "vector")
        records, vectors = self._core.search_vectors(embedding, max(k, fetch_k), **kwargs)
        return self._mmr(embedding, records, vectors, k, lambda_mult)

    async def amax_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search_by_vector` through the async engine."""
        self._vector_only(kwargs, "MMR searches", "vector")
        records, vectors = await self._core.asearch_vectors(embedding, max(k, fetch_k), **kwargs)
        return self._mmr(embedding, records, vectors, k, lambda_mult)

    @staticmethod
    def _mmr(
        query: Sequence[float],
        records: list[Record],
        vectors: np.ndarray[Any, Any],
        k: int,
        lambda_mult: float,
    ) -> list[Document]:
        if not records:
            return []
        q = np.asarray(query, dtype=np.float32)
        chosen = maximal_marginal_relevance(q, vectors.tolist(), lambda_mult=lambda_mult, k=k)
        return [_document(records[i]) for i in chosen]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """Embed ``query``, then :meth:`max_marginal_relevance_search_by_vector`."""
        vector = self._embedding.embed_query(query)
        return self.max_marginal_relevance_search_by_vector(
            vector, k, fetch_k, lambda_mult, **kwargs
        )

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search` with ``aembed_query`` and the engine."""
        vector = await self._embedding.aembed_query(query)
        return await self.amax_marginal_relevance_search_by_vector(
            vector, k, fetch_k, lambda_mult, **kwargs
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> VectorDBStore:
        """A new store (``kwargs``: the constructor's) holding ``texts``."""
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    async def afrom_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> VectorDBStore:
        """:meth:`from_texts` with ``aembed_documents`` and the async engine."""
        store = cls(embedding, **kwargs)
        await store.aadd_texts(texts, metadatas, ids=ids)
        return store

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to the directory ``path`` (see :mod:`vectordb.integrations._persist`)."""
        self._core.save(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        embedding: Embeddings,
        *,
        mmap: bool = True,
        retrieval_mode: str = "vector",
    ) -> VectorDBStore:
        """Open a store saved by :meth:`save`; ``mmap``: map the vectors from the file.
        Its texts are indexed for text search (FTS5) as it opens: about a second per
        100,000 short texts."""
        store = cls(embedding, retrieval_mode=retrieval_mode)
        store._core = TextIndex.load(path, kind=_KIND, mmap=mmap)
        return store

    def close(self) -> None:
        """Close the async engines and unmap the index; from a running loop use
        :meth:`aclose`."""
        self._core.close()

    async def aclose(self) -> None:
        """Close from the running event loop (its engine finishes queued work first)."""
        await self._core.aclose()


class VectorDBRetriever(VectorStoreRetriever):
    """LangChain's ``VectorStoreRetriever`` with the ``search_type`` values ``"hybrid"``
    and ``"text"`` (retrieval modes of :class:`VectorDBStore`)."""

    allowed_search_types: ClassVar[Collection[str]] = (
        "similarity",
        "similarity_score_threshold",
        "mmr",
        "hybrid",
        "text",
    )

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        if self.search_type in ("hybrid", "text"):
            args = self.search_kwargs | kwargs | {"retrieval_mode": self.search_type}
            return self.vectorstore.similarity_search(query, **args)
        return super()._get_relevant_documents(query, run_manager=run_manager, **kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        if self.search_type in ("hybrid", "text"):
            args = self.search_kwargs | kwargs | {"retrieval_mode": self.search_type}
            return await self.vectorstore.asimilarity_search(query, **args)
        return await super()._aget_relevant_documents(query, run_manager=run_manager, **kwargs)
