"""LlamaIndex adapter: :class:`VectorDBVectorStore`, a ``BasePydanticVectorStore``.

Install with ``pip install 'vectordb-embedded[llamaindex]'``::

    from llama_index.core import StorageContext, VectorStoreIndex
    from vectordb.integrations.llamaindex import VectorDBVectorStore

    store = VectorDBVectorStore()
    context = StorageContext.from_defaults(vector_store=store)
    index = VectorStoreIndex.from_documents(documents, storage_context=context)
    index.as_retriever(similarity_top_k=3).retrieve("question")
    context.persist("storage")  # the store goes to storage/default__vector_store.vectordb
    store = VectorDBVectorStore.from_persist_dir("storage")

Nodes keep their ids; their text and metadata are stored with the vector (the store
``stores_text``), the metadata at top level so that ``MetadataFilters`` apply. Query
similarities are "higher is closer": the cosine for ``metric="cosine"``, the dot product
for ``"ip"``, ``1 - euclidean / sqrt(2)`` for ``"l2"``.

Query modes: ``DEFAULT`` (by embedding), ``TEXT_SEARCH`` and ``SPARSE`` (BM25 over the
nodes' texts, SQLite FTS5; ``query_str``, ``sparse_top_k`` or ``similarity_top_k``
results) and ``HYBRID`` (both, fused with ``alpha`` as the vector side's weight,
LlamaIndex's convention, 0.5 when unset; ``vector_store_kwargs={"fusion": "rrf"}`` for
reciprocal rank; ``hybrid_top_k`` or ``similarity_top_k`` results)::

    index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=5).retrieve("GIL")

By text or hybrid, the similarities are the scores that ranked the nodes (BM25 or fused,
higher is better; see :class:`vectordb.Hit`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.metrics import Metric
from ..errors import InvalidParameterError
from ..index.clustered import ClusteredIndex
from ._store import ID_KEY, Record, TextIndex

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.schema import BaseNode, MetadataMode
    from llama_index.core.vector_stores.types import (
        BasePydanticVectorStore,
        FilterCondition,
        FilterOperator,
        MetadataFilters,
        VectorStoreQuery,
        VectorStoreQueryMode,
        VectorStoreQueryResult,
    )
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vectordb.integrations.llamaindex needs llama-index-core: "
        "pip install 'vectordb-embedded[llamaindex]'"
    ) from exc

__all__ = ["VectorDBVectorStore", "to_vectordb_filter"]

_KIND = "llamaindex"
#: The query modes served by text alone (no embedding), and all those served.
_TEXT_ONLY = frozenset({VectorStoreQueryMode.TEXT_SEARCH, VectorStoreQueryMode.SPARSE})
_MODES = _TEXT_ONLY | {VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.HYBRID}
#: Where LlamaIndex keeps a node's source document id (``node_to_metadata_dict``).
_REF_DOC_KEY = "ref_doc_id"
_OPERATORS = {
    FilterOperator.EQ: "$eq",
    FilterOperator.NE: "$ne",
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
    FilterOperator.NIN: "$nin",
}


def _collect(filters: MetadataFilters, out: dict[str, dict[str, Any]]) -> None:
    condition = filters.condition or FilterCondition.AND
    if condition is not FilterCondition.AND and (
        condition is FilterCondition.NOT or len(filters.filters) > 1
    ):
        raise InvalidParameterError(
            f"MetadataFilters with condition {condition.value!r} are not supported: "
            "vectordb combines conditions with AND only"
        )
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            _collect(item, out)
            continue
        op = _OPERATORS.get(item.operator)
        if op is None:
            names = ", ".join(o.value for o in _OPERATORS)
            raise InvalidParameterError(
                f"filter operator {item.operator.value!r} on {item.key!r} is not supported; "
                f"use one of {names}"
            )
        _add(out, item.key, op, item.value)


def _add(out: dict[str, dict[str, Any]], key: str, op: str, value: Any) -> None:
    conditions = out.setdefault(key, {})
    if op in conditions:
        raise InvalidParameterError(f"two {op!r} conditions on {key!r}")
    conditions[op] = value


def to_vectordb_filter(
    filters: MetadataFilters | None,
    *,
    node_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """LlamaIndex filters (and id restrictions) as a vectordb dict filter.

    ``==``, ``!=``, ``>``, ``>=``, ``<``, ``<=``, ``in``, ``nin``, combined with AND (nested
    AND groups too); OR, NOT and other operators raise ``InvalidParameterError``. As in
    SQL, a node without the key matches no condition on it, ``!=`` and ``nin`` included.
    Empty ``node_ids`` or ``doc_ids`` restrict nothing.
    """
    conditions: dict[str, dict[str, Any]] = {}
    if filters is not None:
        _collect(filters, conditions)
    for key, values in ((ID_KEY, node_ids), (_REF_DOC_KEY, doc_ids)):
        if values:  # [] restricts nothing: as_retriever() passes node_ids=[] to text stores
            _add(conditions, key, "$in", list(values))
    out: dict[str, Any] = {}
    for key, cond in conditions.items():
        if "$eq" in cond and len(cond) == 1:
            out[key] = cond["$eq"]
            continue
        if "$eq" in cond:
            if "$in" in cond:
                raise InvalidParameterError(f"'==' and 'in' conditions on {key!r} together")
            cond["$in"] = [cond.pop("$eq")]
        out[key] = cond
    return out or None


def _node(record: Record) -> BaseNode:
    return metadata_dict_to_node(record.stored, text=record.text)


def _store_dir(persist_path: str | os.PathLike[str]) -> Path:
    """LlamaIndex names a vector store's file ``..._vector_store.json``; vectordb saves a
    directory, named with ``.vectordb`` instead."""
    path = Path(persist_path)
    return path.with_suffix(".vectordb") if path.suffix == ".json" else path


def _local(fs: Any) -> None:
    """Refuse an fsspec filesystem other than the local one."""
    protocol = getattr(fs, "protocol", "file")
    if fs is not None and "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
        raise InvalidParameterError(
            f"VectorDBVectorStore persists to the local disk only, not to {type(fs).__name__}"
        )


class VectorDBVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store on a :class:`vectordb.ClusteredIndex`.

    Parameters
    ----------
    metric : {"cosine", "l2", "ip"}
        vectordb's distance: ``1 - cos``, squared Euclidean, ``-dot``.
    probes, rerank_factor : int, >= 1, optional
        Search defaults; ``query`` also takes them as keyword arguments (a retriever's
        ``vector_store_kwargs``).
    **build_options
        Passed to :meth:`ClusteredIndex.build` when the first nodes arrive
        (``max_leaf_size``, ``branching_factor``, ``seed``, ``backend``, ...).
    """

    stores_text: bool = True
    flat_metadata: bool = False

    _core: TextIndex = PrivateAttr()

    def __init__(
        self,
        *,
        metric: str | Metric = "cosine",
        probes: int | None = None,
        rerank_factor: int | None = None,
        **build_options: Any,
    ) -> None:
        super().__init__(stores_text=True)
        self._core = TextIndex(_KIND, metric, probes, rerank_factor, build_options)

    @classmethod
    def class_name(cls) -> str:
        return "VectorDBVectorStore"

    @property
    def client(self) -> ClusteredIndex | None:
        """The vectordb index (``None`` until the first nodes are added)."""
        return self._core.index

    # ------------------------------------------------------------------ writes
    def _rows(self, nodes: Sequence[BaseNode]) -> dict[str, Any]:
        return {
            "vectors": [node.get_embedding() for node in nodes],
            "texts": [node.get_content(metadata_mode=MetadataMode.NONE) for node in nodes],
            "ids": [node.node_id for node in nodes],
            "metadatas": [
                node_to_metadata_dict(node, remove_text=True, flat_metadata=self.flat_metadata)
                for node in nodes
            ],
        }

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Add nodes with their embeddings (a node id already stored is replaced)."""
        if not nodes:
            return []
        rows = self._rows(nodes)
        return self._core.upsert(rows.pop("vectors"), **rows)

    async def async_add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """:meth:`add` through the async engine."""
        if not nodes:
            return []
        rows = self._rows(nodes)
        return await self._core.aupsert(rows.pop("vectors"), **rows)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        self._core.delete(None, {_REF_DOC_KEY: ref_doc_id})

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """:meth:`delete` through the async engine."""
        await self._core.adelete(None, {_REF_DOC_KEY: ref_doc_id})

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete the nodes with these ids (``None``: all) that match ``filters``."""
        self._core.delete(node_ids, to_vectordb_filter(filters))

    async def adelete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """:meth:`delete_nodes` through the async engine."""
        await self._core.adelete(node_ids, to_vectordb_filter(filters))

    def clear(self) -> None:
        """Delete every node."""
        self._core.delete(None)

    async def aclear(self) -> None:
        """:meth:`clear` through the async engine."""
        await self._core.adelete(None)

    # ------------------------------------------------------------------ reads
    def get_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """The nodes with these ids (all when ``None``) matching ``filters``."""
        return [_node(r) for r in self._core.get(node_ids, to_vectordb_filter(filters))]

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """:meth:`get_nodes` through the async engine."""
        return [_node(r) for r in await self._core.aget(node_ids, to_vectordb_filter(filters))]

    def _query_args(
        self, query: VectorStoreQuery, kwargs: dict[str, Any]
    ) -> tuple[Any, str | None, int, dict[str, Any]]:
        """The embedding, text, k and options of the store's query for ``query``."""
        mode = query.mode
        if mode not in _MODES:
            raise InvalidParameterError(
                f"query mode {mode.value!r} is not supported; use one of"
                f" {sorted(m.value for m in _MODES)}"
            )
        vector, text, k = query.query_embedding, query.query_str, query.similarity_top_k
        if mode is VectorStoreQueryMode.DEFAULT:
            text = None
        elif mode is VectorStoreQueryMode.HYBRID:
            k = query.hybrid_top_k or k
        else:
            vector, k = None, query.sparse_top_k or k
        if mode is not VectorStoreQueryMode.DEFAULT and not text:
            raise InvalidParameterError(f"a {mode.value!r} query needs its query_str")
        if mode not in _TEXT_ONLY and vector is None:
            raise InvalidParameterError(f"a {mode.value!r} query needs its query_embedding")
        options: dict[str, Any] = {
            "filter": to_vectordb_filter(
                query.filters, node_ids=query.node_ids, doc_ids=query.doc_ids
            )
        }
        if mode is VectorStoreQueryMode.HYBRID and query.alpha is not None:
            options["alpha"] = query.alpha
        return vector, text, k, options | kwargs

    def _result(self, records: list[Record], by_vector: bool) -> VectorStoreQueryResult:
        return VectorStoreQueryResult(
            nodes=[_node(r) for r in records],
            similarities=[
                self._core.similarity(r.distance) if by_vector else r.score for r in records
            ],
            ids=[r.id for r in records],
        )

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The best nodes for ``query`` (see the module docstring for its modes) that match
        ``filters`` (and ``node_ids``, ``doc_ids``), best first. ``kwargs``: ``probes``,
        ``rerank_factor``, ``fusion``, ``alpha`` (a retriever's ``vector_store_kwargs``)."""
        vector, text, k, options = self._query_args(query, kwargs)
        return self._result(self._core.query(vector, text, k, **options), text is None)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """:meth:`query` through the async engine (batched with concurrent queries)."""
        vector, text, k, options = self._query_args(query, kwargs)
        return self._result(await self._core.aquery(vector, text, k, **options), text is None)

    # ------------------------------------------------------------------ files
    def persist(self, persist_path: str, fs: Any = None) -> None:
        """Save to the directory ``persist_path`` (``.json`` replaced by ``.vectordb``, as
        ``StorageContext.persist`` passes ``<dir>/default__vector_store.json``)."""
        _local(fs)
        self._core.save(_store_dir(persist_path))

    @classmethod
    def from_persist_path(
        cls,
        persist_path: str | os.PathLike[str],
        fs: Any = None,
        *,
        mmap: bool = True,
    ) -> VectorDBVectorStore:
        """Open a store saved by :meth:`persist`; ``mmap``: map the vectors from the file."""
        _local(fs)
        store = cls()
        store._core = TextIndex.load(_store_dir(persist_path), kind=_KIND, mmap=mmap)
        return store

    @classmethod
    def from_persist_dir(
        cls,
        persist_dir: str | os.PathLike[str],
        namespace: str = "default",
        fs: Any = None,
        *,
        mmap: bool = True,
    ) -> VectorDBVectorStore:
        """Open the store that ``StorageContext.persist(persist_dir)`` saved."""
        path = Path(persist_dir) / f"{namespace}__vector_store.json"
        return cls.from_persist_path(path, fs, mmap=mmap)

    def close(self) -> None:
        """Close the async engines and unmap the index; from a running loop use
        :meth:`aclose`."""
        self._core.close()

    async def aclose(self) -> None:
        """Close from the running event loop (its engine finishes queued work first)."""
        await self._core.aclose()
