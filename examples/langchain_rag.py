"""Retrieval for a RAG chain with LangChain on vectordb, offline.

    pip install 'vectordb-embedded[langchain]'
    python examples/langchain_rag.py

Stores a few passages with metadata, retrieves context for a question (plain, filtered,
MMR, async), builds the prompt a chat model would get, then saves and reopens the store.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding

from vectordb.integrations.langchain import VectorDBStore

PASSAGES = [
    ("vectordb keeps 1-bit codes in RAM and reranks on memory-mapped vectors.", "vectordb"),
    ("An AsyncEngine batches concurrent searches on its own threads.", "vectordb"),
    ("Metadata filters select vectors by their JSON metadata.", "vectordb"),
    ("LangChain retrievers return documents for a question.", "langchain"),
    ("A prompt template puts retrieved context before the question.", "langchain"),
]


def main() -> None:
    # A deterministic stand-in that needs no network: it ranks texts at random (identical
    # texts aside). A real model goes here, e.g. langchain_openai.OpenAIEmbeddings() or
    # langchain_huggingface.HuggingFaceEmbeddings(model_name="all-MiniLM-L6-v2").
    embeddings = DeterministicFakeEmbedding(size=64)
    docs = [Document(page_content=text, metadata={"topic": topic}) for text, topic in PASSAGES]
    store = VectorDBStore.from_documents(docs, embeddings)

    question = "How does vectordb search many requests at once?"
    retriever = store.as_retriever(search_kwargs={"k": 2, "filter": {"topic": "vectordb"}})
    context = "\n".join(f"- {d.page_content}" for d in retriever.invoke(question))
    print(f"Answer from the context.\nContext:\n{context}\nQuestion: {question}\n")

    for doc, score in store.similarity_search_with_relevance_scores(question, k=3):
        print(f"{score:.2f}  [{doc.metadata['topic']}] {doc.page_content}")
    diverse = store.max_marginal_relevance_search(question, k=3, fetch_k=5)
    print("MMR:", [d.page_content[:30] for d in diverse])
    # Keywords count too: BM25 over the texts, fused with the vector ranking.
    hybrid = store.as_retriever(search_type="hybrid", search_kwargs={"k": 2})
    print("hybrid:", [d.page_content[:30] for d in hybrid.invoke("prompt template")])

    async def ask() -> None:  # async twins run on vectordb's AsyncEngine
        found = await asyncio.gather(*(store.asimilarity_search(t, k=1) for t, _ in PASSAGES))
        print("async:", [f[0].page_content[:30] for f in found])

    asyncio.run(ask())
    with tempfile.TemporaryDirectory() as tmp:
        store.save(Path(tmp) / "store")
        reopened = VectorDBStore.load(Path(tmp) / "store", embeddings)
        print("reopened:", reopened.similarity_search(PASSAGES[2][0], k=1)[0].page_content)
        reopened.close()
    store.close()  # its engine too, now that the loop that used it has ended


if __name__ == "__main__":
    main()
