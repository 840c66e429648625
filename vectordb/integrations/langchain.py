"""LangChain adapter: :class:`VectorDBStore`, a ``langchain_core`` ``VectorStore``.

Install with ``pip install 'vectordb-embedded[langchain]'``::

    from vectordb.integrations.langchain import VectorDBStore

    store = VectorDBStore(embeddings)  # any langchain_core Embeddings
    store.add_texts(["cats purr", "dogs bark"], metadatas=[{"pet": "cat"}, {"pet": "dog"}])
    store.similarity_search("kitten", k=1, filter={"pet": "cat"})
    store.as_retriever(search_type="mmr").invoke("pets")
    store.save("my_store")
    store = VectorDBStore.load("my_store", embeddings)

Documents keep their string ids (a uuid4 when none is given) and their metadata (JSON
values, filterable with vectordb's dict filters or a callable on the metadata dict).
``similarity_search_with_score`` returns vectordb's distance (smaller is closer; see
:mod:`vectordb.core.metrics`); relevance scores are in [0, 1] (see
:meth:`VectorDBStore._select_relevance_score_fn`). Async methods are served by
:class:`vectordb.AsyncEngine`, which batches concurrent searches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..core.metrics import Metric
from ..errors import InvalidParameterError
from ..index.clustered import ClusteredIndex
from ._store import Record, TextIndex

try:
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vectordb.integrations.langchain needs langchain-core: "
        "pip install 'vectordb-embedded[langchain]'"
    ) from exc

__all__ = ["VectorDBStore"]

_KIND = "langchain"


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
        **build_options: Any,
    ) -> None:
        self._embedding = embedding
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
        return f"VectorDBStore(n={n}, metric={self._core.metric.value!r})"

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
        """Embed ``query``; the ``k`` nearest documents and their distances (smaller is
        closer)."""
        vector = self._embedding.embed_query(query)
        return self.similarity_search_with_score_by_vector(vector, k, **kwargs)

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score` with ``aembed_query`` and the engine."""
        vector = await self._embedding.aembed_query(query)
        return await self.asimilarity_search_with_score_by_vector(vector, k, **kwargs)

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
        cls, path: str | os.PathLike[str], embedding: Embeddings, *, mmap: bool = True
    ) -> VectorDBStore:
        """Open a store saved by :meth:`save`; ``mmap``: map the vectors from the file."""
        store = cls(embedding)
        store._core = TextIndex.load(path, kind=_KIND, mmap=mmap)
        return store

    def close(self) -> None:
        """Close the async engines and unmap the index; from a running loop use
        :meth:`aclose`."""
        self._core.close()

    async def aclose(self) -> None:
        """Close from the running event loop (its engine finishes queued work first)."""
        await self._core.aclose()
