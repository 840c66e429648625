"""Retrieval for a RAG query engine with LlamaIndex on vectordb, offline.

    pip install 'vectordb-embedded[llamaindex]'
    python examples/llamaindex_rag.py

Indexes a few documents into a VectorDBVectorStore through VectorStoreIndex, retrieves
context for a question (plain, filtered, async), persists the storage context and loads
the index back.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile

import numpy as np
from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

from vectordb.integrations.llamaindex import VectorDBVectorStore

TEXTS = [
    ("vectordb keeps 1-bit codes in RAM and reranks on memory-mapped vectors.", 2024),
    ("An AsyncEngine batches concurrent searches on its own threads.", 2025),
    ("Metadata filters select vectors by their JSON metadata.", 2025),
    ("A query engine sends retrieved nodes and the question to an LLM.", 2023),
]


class FakeEmbedding(BaseEmbedding):
    """A deterministic stand-in that needs no network: random vectors seeded by the text.

    A real model goes here instead, e.g. llama_index.embeddings.openai.OpenAIEmbedding() or
    llama_index.embeddings.huggingface.HuggingFaceEmbedding("BAAI/bge-small-en-v1.5").
    """

    def _vector(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(64).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def main() -> None:
    embed = FakeEmbedding()
    docs = [Document(text=text, metadata={"year": year}) for text, year in TEXTS]
    store = VectorDBVectorStore()
    context = StorageContext.from_defaults(vector_store=store)
    index = VectorStoreIndex.from_documents(docs, storage_context=context, embed_model=embed)

    question = "How does vectordb search many requests at once?"
    recent = MetadataFilters(filters=[MetadataFilter(key="year", value=2025, operator=">=")])
    retriever = index.as_retriever(similarity_top_k=2, filters=recent, embed_model=embed)
    for hit in retriever.retrieve(question):
        print(f"{hit.score:.2f}  [{hit.node.metadata['year']}] {hit.node.get_content()}")
    # Keywords count too: BM25 over the node texts, fused with the vector ranking.
    hybrid = index.as_retriever(
        vector_store_query_mode="hybrid", similarity_top_k=2, embed_model=embed
    )
    print("hybrid:", [h.node.get_content()[:30] for h in hybrid.retrieve("query engine LLM")])

    async def ask() -> None:  # aretrieve -> store.aquery, on vectordb's AsyncEngine
        hits = await index.as_retriever(similarity_top_k=1, embed_model=embed).aretrieve(question)
        print("async:", hits[0].node.get_content())

    asyncio.run(ask())
    with tempfile.TemporaryDirectory() as tmp:
        context.persist(tmp)  # the store goes to <tmp>/default__vector_store.vectordb
        reopened = VectorDBVectorStore.from_persist_dir(tmp)
        storage = StorageContext.from_defaults(vector_store=reopened, persist_dir=tmp)
        loaded = load_index_from_storage(storage, embed_model=embed)
        hit = loaded.as_retriever(similarity_top_k=1, embed_model=embed).retrieve(TEXTS[2][0])[0]
        print("reopened:", hit.node.get_content())
        reopened.close()
    store.close()  # its engine too, now that the loop that used it has ended


if __name__ == "__main__":
    main()
