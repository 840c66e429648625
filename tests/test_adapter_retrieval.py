"""Text (BM25) and hybrid retrieval through the LangChain and LlamaIndex adapters: their
answers equal the core index's ``query`` over the same texts, hybrid equals the fusion of
an exact vector list and the text list, filters apply, and bad modes are refused."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import (
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

import vectordb as vdb
from vectordb.core.fusion import rrf
from vectordb.index.query import depth
from vectordb.integrations.langchain import VectorDBStore
from vectordb.integrations.llamaindex import VectorDBVectorStore

DIM = 16
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
N = 300


def texts_of(n: int = N) -> list[str]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=4, replace=True).tolist()
        out.append(f"note {i} " + " ".join(words) + (" zebra crossing" if i % 50 == 7 else ""))
    return out


@pytest.fixture(scope="module")
def embedding():
    return DeterministicFakeEmbedding(size=DIM)


@pytest.fixture
def store(embedding):
    texts = texts_of()
    made = VectorDBStore(embedding, max_leaf_size=32)
    made.add_texts(
        texts, [{"i": i, "even": i % 2 == 0} for i in range(N)], ids=[f"t{i}" for i in range(N)]
    )
    yield made
    made.close()


def exact(index, k):
    return {"probes": index.n_leaves, "rerank_factor": math.ceil(len(index) / k)}


def sids(hits):
    return [h.metadata["_sid"] for h in hits]


def test_text_mode_equals_the_index_bm25(store):
    for query in ["zebra", "alpha delta", "note 12 hotel"]:
        found = store.similarity_search_with_score(query, k=8, retrieval_mode="text")
        want = store.index.query(text=query, k=8)
        assert [d.id for d, _ in found] == sids(want)
        np.testing.assert_allclose([s for _, s in found], [h.score for h in want])
    top = store.similarity_search("zebra crossing", k=6, retrieval_mode="text")
    assert {d.id for d in top} == {f"t{i}" for i in range(7, N, 50)}  # the six with both words


def test_hybrid_is_the_fusion_of_exact_vector_and_text_lists(store, embedding):
    index, k = store.index, 10
    for query in ["zebra", "note 3 alpha", "golf hotel india"]:
        got = store.similarity_search_with_score(
            query, k=k, retrieval_mode="hybrid", fusion="rrf", **exact(index, depth(k))
        )
        x = index.get_vectors(index.ids)
        q = np.asarray(embedding.embed_query(query), dtype=np.float64)
        q /= np.linalg.norm(q)
        dist = 1 - x.astype(np.float64) @ q
        vector_side = index.ids[np.argsort(dist, kind="stable")[: depth(k)]]
        text_side = np.array([h.id for h in index.query(text=query, k=depth(k))], dtype=np.int64)
        ids, scores = rrf([vector_side, text_side], k)
        want = [index.get_metadata(int(i))["_sid"] for i in ids]
        assert [d.id for d, _ in got] == want
        np.testing.assert_allclose([s for _, s in got], scores)


def test_weighted_alpha_one_is_the_vector_order(store):
    k = 5
    by_vector = store.similarity_search("note 5 echo", k=k, **exact(store.index, depth(k)))
    weighted = store.similarity_search(
        "note 5 echo",
        k=k,
        retrieval_mode="hybrid",
        fusion="weighted",
        alpha=1.0,
        **exact(store.index, depth(k)),
    )
    assert [d.id for d in weighted] == [d.id for d in by_vector]


def test_filters_apply_to_text_and_hybrid(store):
    for mode in ("text", "hybrid"):
        got = store.similarity_search(
            "zebra alpha", k=20, retrieval_mode=mode, filter={"even": True}
        )
        assert got and all(d.metadata["even"] for d in got)
        odd = store.similarity_search(
            "zebra", k=20, retrieval_mode=mode, filter=lambda m: m["i"] % 2 == 1
        )
        assert odd and all(d.metadata["i"] % 2 == 1 for d in odd)
    # Every match of the text side passes the filter: the six zebra notes are odd ones.
    zebra = store.similarity_search("zebra", k=20, retrieval_mode="text", filter={"even": False})
    assert {d.id for d in zebra} == {f"t{i}" for i in range(7, N, 50)}


def test_store_mode_retrievers_search_and_async_twins(embedding):
    texts = texts_of()
    hybrid = VectorDBStore.from_texts(
        texts, embedding, ids=[f"t{i}" for i in range(N)], retrieval_mode="hybrid"
    )
    query = "zebra golf"
    want = [d.id for d in hybrid.similarity_search(query, k=5)]
    assert want == [d.id for d in hybrid.similarity_search(query, k=5, retrieval_mode="hybrid")]
    assert want == [d.id for d in hybrid.search(query, "hybrid", k=5)]
    assert want == [d.id for d in hybrid.as_retriever(search_kwargs={"k": 5}).invoke(query)]
    plain = hybrid.as_retriever(search_type="similarity", search_kwargs={"k": 5})
    assert want == [d.id for d in plain.invoke(query)]  # the store's mode
    text = hybrid.as_retriever(search_type="text", search_kwargs={"k": 5}).invoke(query)
    assert [d.id for d in text] == [d.id for d in hybrid.search(query, "text", k=5)]
    by_vector = hybrid.similarity_search(query, k=5, retrieval_mode="vector")
    assert want == [d.id for d in hybrid.search(query, "similarity", k=5)]  # the store's mode
    vector = embedding.embed_query(query)
    assert [d.id for d in by_vector] == [
        d.id for d in hybrid.similarity_search_by_vector(vector, k=5)
    ]

    async def twins():
        try:
            a = await hybrid.asimilarity_search(query, k=5)
            b = await hybrid.as_retriever(search_type="text", search_kwargs={"k": 5}).ainvoke(query)
            c = await hybrid.asearch(query, "hybrid", k=5)
            d = await hybrid.asimilarity_search(query, k=5, retrieval_mode="vector")
            return a, b, c, d
        finally:
            await hybrid.aclose()

    a, b, c, d = asyncio.run(twins())
    assert [x.id for x in a] == want == [x.id for x in c]
    assert [x.id for x in b] == [x.id for x in text]
    assert [x.id for x in d] == [x.id for x in by_vector]


def test_bad_modes_are_refused(store, embedding):
    with pytest.raises(vdb.InvalidParameterError, match="retrieval_mode"):
        VectorDBStore(embedding, retrieval_mode="keyword")
    with pytest.raises(vdb.InvalidParameterError, match="retrieval_mode"):
        store.similarity_search("x", retrieval_mode="sparse")
    with pytest.raises(vdb.InvalidParameterError, match="relevance scores"):
        store.similarity_search_with_relevance_scores("x", retrieval_mode="hybrid")
    with pytest.raises(vdb.InvalidParameterError, match="MMR"):
        store.max_marginal_relevance_search("x", retrieval_mode="text")
    with pytest.raises(vdb.InvalidParameterError, match="fusion"):
        store.similarity_search("x", retrieval_mode="hybrid", fusion="max")
    with pytest.raises(vdb.InvalidParameterError, match="alpha"):
        store.similarity_search("x", retrieval_mode="hybrid", fusion="weighted", alpha=2)
    with pytest.raises(ValueError, match="search_type"):
        store.as_retriever(search_type="keyword")
    with pytest.raises(vdb.InvalidParameterError, match="text_field"):
        VectorDBStore(embedding, text_field="title")
    assert VectorDBStore(embedding).similarity_search("x", retrieval_mode="text") == []


def test_writes_keep_text_search_in_step_and_survive_a_reload(store, embedding, tmp_path):
    store.add_texts(["a lone quokka"], ids=["q"])
    assert [d.id for d in store.similarity_search("quokka", k=3, retrieval_mode="text")] == ["q"]
    store.add_texts(["two quokkas now"], ids=["q"])  # replaced: the old words are gone
    assert store.similarity_search("lone", k=3, retrieval_mode="text") == []
    store.delete(["q"])
    assert store.similarity_search("quokka", k=3, retrieval_mode="text") == []
    store.add_texts(["a lone quokka"], ids=["q2"])
    store.save(tmp_path / "s")
    back = VectorDBStore.load(tmp_path / "s", embedding)
    try:
        back.add_texts(["quokka number two"], ids=["q3"])  # logged, after the save
        got = back.similarity_search("quokka", k=3, retrieval_mode="text")
        assert sorted(d.id for d in got) == ["q2", "q3"]
    finally:
        back.close()


def test_a_store_saved_without_text_search_gets_it_on_load(store, embedding, tmp_path):
    store.index._params.pop("text_field")  # as a store saved before text search was
    store.save(tmp_path / "old")
    raw = vdb.ClusteredIndex.open(tmp_path / "old" / "index", readonly=True)
    assert raw.text_field is None and "text_field" not in raw.params
    raw.close()
    back = VectorDBStore.load(tmp_path / "old", embedding)
    try:
        assert back.index.text_field == "_text"
        got = back.similarity_search("zebra", k=6, retrieval_mode="text")
        assert {d.id for d in got} == {f"t{i}" for i in range(7, N, 50)}
    finally:
        back.close()


# --------------------------------------------------------------------------- LlamaIndex


class FakeEmbedding(BaseEmbedding):
    """LangChain's deterministic fake embedding, for LlamaIndex."""

    def _vector(self, text: str) -> list[float]:
        return DeterministicFakeEmbedding(size=DIM).embed_query(text)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


@pytest.fixture
def llama():
    embed = FakeEmbedding()
    nodes = [
        TextNode(id_=f"n{i}", text=t, metadata={"i": i}, embedding=embed._vector(t))
        for i, t in enumerate(texts_of())
    ]
    made = VectorDBVectorStore(max_leaf_size=32)
    made.add(nodes)
    yield made, embed
    made.close()


def test_llamaindex_text_and_hybrid_modes_equal_the_index(llama):
    store, embed = llama
    index = store.client
    query = "zebra golf"
    vector = embed._vector(query)

    def hybrid_query(**fields):
        return VectorStoreQuery(
            query_embedding=vector, query_str=query, mode=VectorStoreQueryMode.HYBRID, **fields
        )

    text = store.query(
        VectorStoreQuery(query_str=query, mode=VectorStoreQueryMode.TEXT_SEARCH, similarity_top_k=5)
    )
    want = index.query(text=query, k=5)
    assert text.ids == sids(want)
    np.testing.assert_allclose(text.similarities, [h.score for h in want])
    sparse = store.query(
        VectorStoreQuery(
            query_str=query, mode=VectorStoreQueryMode.SPARSE, similarity_top_k=2, sparse_top_k=7
        )
    )
    assert sparse.ids == sids(index.query(text=query, k=7))
    hybrid = store.query(hybrid_query(similarity_top_k=4, hybrid_top_k=6))
    want = index.query(vector, text=query, k=6)
    assert hybrid.ids == sids(want)
    np.testing.assert_allclose(hybrid.similarities, [h.score for h in want])
    weighted = store.query(hybrid_query(similarity_top_k=6, alpha=0.3))
    assert weighted.ids == sids(index.query(vector, text=query, k=6, fusion="weighted", alpha=0.3))
    at_least = MetadataFilters(filters=[MetadataFilter(key="i", value=100, operator=">=")])
    filtered = store.query(hybrid_query(similarity_top_k=20, filters=at_least))
    assert filtered.ids and all(n.metadata["i"] >= 100 for n in filtered.nodes)
    asynced = asyncio.run(store.aquery(hybrid_query(similarity_top_k=6)))
    assert asynced.ids == sids(index.query(vector, text=query, k=6))


def test_llamaindex_retriever_hybrid_and_errors(llama):
    store, embed = llama
    context = StorageContext.from_defaults(vector_store=store)
    index = VectorStoreIndex.from_vector_store(store, storage_context=context, embed_model=embed)
    got = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=5).retrieve(
        "zebra crossing"
    )
    vector = embed._vector("zebra crossing")
    want = store.client.query(vector, text="zebra crossing", k=5)
    assert [n.node.node_id for n in got] == sids(want)
    text = index.as_retriever(vector_store_query_mode="text_search", similarity_top_k=6).retrieve(
        "zebra crossing"
    )
    assert {n.node.node_id for n in text} == {f"n{i}" for i in range(7, N, 50)}
    with pytest.raises(vdb.InvalidParameterError, match="query_str"):
        store.query(VectorStoreQuery(query_embedding=vector, mode=VectorStoreQueryMode.HYBRID))
    with pytest.raises(vdb.InvalidParameterError, match="query_embedding"):
        store.query(VectorStoreQuery(query_str="x", mode=VectorStoreQueryMode.HYBRID))
    with pytest.raises(vdb.InvalidParameterError, match="mode 'svm'"):
        store.query(VectorStoreQuery(query_embedding=vector, mode=VectorStoreQueryMode.SVM))


def test_fusion_options_are_checked_in_every_mode_and_relevance_scores_rank_by_vector(
    store, embedding
):
    for mode in ("vector", "text", "hybrid"):
        with pytest.raises(vdb.InvalidParameterError, match="fusion"):
            store.similarity_search("x", retrieval_mode=mode, fusion="bogus")
        with pytest.raises(vdb.InvalidParameterError, match="alpha"):
            store.similarity_search("x", retrieval_mode=mode, alpha="x")
    hybrid = VectorDBStore.from_texts(texts_of(50), embedding, retrieval_mode="hybrid")
    scored = hybrid.similarity_search_with_relevance_scores("note 3", k=3)
    by_vector = hybrid.similarity_search("note 3", k=3, retrieval_mode="vector")
    assert [d.id for d, _ in scored] == [d.id for d in by_vector]
    assert all(0 <= s <= 1 for _, s in scored)
    threshold = hybrid.as_retriever(
        search_type="similarity_score_threshold", search_kwargs={"score_threshold": 0.0, "k": 3}
    )
    assert [d.id for d in threshold.invoke("note 3")] == [d.id for d in by_vector]
    hybrid.close()
