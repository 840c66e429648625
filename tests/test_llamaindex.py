"""The LlamaIndex adapter: end to end through ``VectorStoreIndex``, and answers checked
against a float64 brute force over the same deterministic embeddings."""

from __future__ import annotations

import asyncio
import hashlib
import math
import operator
import os
import signal

import numpy as np
import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.embeddings import BaseEmbedding, MockEmbedding
from llama_index.core.schema import MetadataMode, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

import vectordb as vdb
from vectordb.integrations.llamaindex import VectorDBVectorStore, to_vectordb_filter

DIM = 16
N = 200
GENRES = ("sci-fi", "drama", "comedy", "horror")


class HashEmbedding(BaseEmbedding):
    """A deterministic embedding: a normal vector seeded by the text's SHA-256.
    (``MockEmbedding`` gives every text the same vector: nothing to rank.)"""

    dim: int = DIM

    def vector(self, text: str) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self.vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self.vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self.vector(query)


@pytest.fixture(scope="module")
def embed():
    return HashEmbedding()


def meta(i):
    return {"year": 1950 + i % 70, "genre": GENRES[i % 4], "rating": round((i * 37 % 100) / 10, 1)}


@pytest.fixture(scope="module")
def corpus(embed):
    texts = [f"film {i}: a story about {GENRES[i % 4]} number {i}" for i in range(N)]
    vectors = np.asarray([embed.vector(t) for t in texts])
    return texts, [meta(i) for i in range(N)], vectors


def make_nodes(corpus):
    texts, metas, vectors = corpus
    return [
        TextNode(
            id_=f"n{i}",
            text=texts[i],
            metadata=metas[i],
            embedding=vectors[i].tolist(),
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc{i % 20}")},
        )
        for i in range(N)
    ]


@pytest.fixture
def store(corpus):
    store = VectorDBVectorStore(max_leaf_size=20)
    store.add(make_nodes(corpus))
    yield store
    store.close()


def exact(store, k):
    """Query options under which the index scans everything and reranks exactly."""
    index = store.client
    return {"probes": index.n_leaves, "rerank_factor": math.ceil(len(index) / k)}


def brute(oracle, corpus, query_vector, k, keep=None, metric="cosine"):
    _, _, vectors = corpus
    true = oracle.distances(vectors, [query_vector], metric)[0]
    rows = np.arange(N) if keep is None else np.asarray(keep, dtype=np.int64)
    order = rows[np.argsort(true[rows], kind="stable")][:k]
    return [f"n{r}" for r in order], true[order]


def assert_result(result, want_ids, want_dists, similarity, oracle):
    assert result.ids == want_ids
    assert [n.node_id for n in result.nodes] == want_ids
    np.testing.assert_allclose(result.similarities, similarity(want_dists), atol=1e-4)


# --------------------------------------------------------------------------- end to end


def test_vector_store_index_end_to_end(embed, oracle):
    docs = [
        Document(
            text=f"document {i} tells of {GENRES[i % 4]} and number {i * 7}",
            id_=f"doc{i}",
            metadata={"genre": GENRES[i % 4], "i": i},
            excluded_embed_metadata_keys=["genre", "i"],  # embed the text alone
        )
        for i in range(60)
    ]
    store = VectorDBVectorStore(max_leaf_size=10)
    context = StorageContext.from_defaults(vector_store=store)
    index = VectorStoreIndex.from_documents(docs, storage_context=context, embed_model=embed)
    assert len(store.client) == 60 and store.stores_text
    vectors = np.asarray([embed.vector(d.text) for d in docs])
    for query in ("a tale of drama", "number 91", "comedy"):
        true = oracle.distances(vectors, [embed.vector(query)], "cosine")[0]
        want = np.argsort(true, kind="stable")[:5]
        params = {"vector_store_kwargs": exact(store, 5)}
        got = index.as_retriever(similarity_top_k=5, embed_model=embed, **params).retrieve(query)
        assert [n.node.ref_doc_id for n in got] == [f"doc{i}" for i in want]
        assert [n.node.get_content() for n in got] == [docs[i].text for i in want]
        np.testing.assert_allclose([n.score for n in got], 1 - true[want], atol=1e-4)
        assert got[0].node.metadata == docs[want[0]].metadata
    # Retrieval with defaults, filters and async.
    got = index.as_retriever(similarity_top_k=3, embed_model=embed).retrieve("comedy")
    assert len(got) == 3
    filters = MetadataFilters(filters=[MetadataFilter(key="genre", value="drama")])
    got = index.as_retriever(similarity_top_k=4, embed_model=embed, filters=filters).retrieve("x")
    assert len(got) == 4 and all(n.node.metadata["genre"] == "drama" for n in got)
    sync = index.as_retriever(similarity_top_k=5, embed_model=embed).retrieve("number 91")
    got = asyncio.run(
        index.as_retriever(similarity_top_k=5, embed_model=embed).aretrieve("number 91")
    )
    assert [n.node.node_id for n in got] == [n.node.node_id for n in sync]
    index.delete_ref_doc("doc3")
    assert len(store.client) == 59
    assert all(
        n.node.ref_doc_id != "doc3"
        for n in index.as_retriever(similarity_top_k=60, embed_model=embed).retrieve("x")
    )
    index.insert(Document(text="a late arrival", id_="late"))
    top = index.as_retriever(similarity_top_k=1, embed_model=embed).retrieve("a late arrival")
    assert top[0].node.ref_doc_id == "late" and top[0].score == pytest.approx(1, abs=1e-5)
    store.close()


def test_persist_and_reload(embed, tmp_path):
    docs = [Document(text=f"text number {i}", id_=f"d{i}", metadata={"i": i}) for i in range(30)]
    store = VectorDBVectorStore(metric="ip")
    context = StorageContext.from_defaults(vector_store=store)
    index = VectorStoreIndex.from_documents(docs, storage_context=context, embed_model=embed)
    want = index.as_retriever(similarity_top_k=4, embed_model=embed).retrieve("text number 7")
    context.persist(tmp_path)
    assert (tmp_path / "default__vector_store.vectordb" / "store.json").is_file()
    for mmap in (True, False):
        loaded = VectorDBVectorStore.from_persist_dir(tmp_path, mmap=mmap)
        assert loaded.client.is_using_mmap is mmap and loaded.client.metric == "ip"
        back = load_index_from_storage(
            StorageContext.from_defaults(vector_store=loaded, persist_dir=tmp_path),
            embed_model=embed,
        )
        got = back.as_retriever(similarity_top_k=4, embed_model=embed).retrieve("text number 7")
        assert [(n.node.node_id, n.node.get_content(), n.node.metadata) for n in got] == [
            (n.node.node_id, n.node.get_content(), n.node.metadata) for n in want
        ]
        np.testing.assert_allclose([n.score for n in got], [n.score for n in want], rtol=1e-6)
        back.delete_ref_doc("d7")  # writes work on a reopened store
        assert all(
            n.node.ref_doc_id != "d7"
            for n in back.as_retriever(embed_model=embed).retrieve("text number 7")
        )
        loaded.close()
    path = str(tmp_path / "direct")
    store.persist(path)
    assert len(VectorDBVectorStore.from_persist_path(path, mmap=False).client) == 30
    with pytest.raises(vdb.InvalidIndexFileError):
        VectorDBVectorStore.from_persist_dir(tmp_path / "nowhere")

    class Remote:
        protocol = ("s3", "s3a")

    with pytest.raises(vdb.InvalidParameterError, match="local disk"):
        store.persist(path, fs=Remote())
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_persisted_stores_writes_survive_a_kill_without_persist(embed, tmp_path):
    docs = [Document(text=f"text number {i}", id_=f"d{i}") for i in range(20)]
    store = VectorDBVectorStore(metric="cosine")
    context = StorageContext.from_defaults(vector_store=store)
    VectorStoreIndex.from_documents(docs, storage_context=context, embed_model=embed)
    path = str(tmp_path / "vs")
    store.persist(path)
    store.close()
    pid = os.fork()
    if pid == 0:  # the child writes, then dies without persisting or closing
        try:
            loaded = VectorDBVectorStore.from_persist_path(path)
            node = TextNode(text="late", id_="late", embedding=embed.get_text_embedding("late"))
            loaded.add([node])
            loaded.delete("d3")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    back = VectorDBVectorStore.from_persist_path(path)
    assert len(back.client) == 20  # one added, one document deleted
    found = back.query(
        VectorStoreQuery(query_embedding=embed.get_text_embedding("late"), similarity_top_k=1)
    )
    assert found.ids == ["late"]
    back.close()


# --------------------------------------------------------------------------- query


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_query_equals_brute_force(corpus, oracle, embed, metric):
    store = VectorDBVectorStore(metric=metric, max_leaf_size=20)
    store.add(make_nodes(corpus))
    similarity = {
        "cosine": lambda d: 1 - d,
        "ip": lambda d: -d,
        "l2": lambda d: 1 - np.sqrt(np.maximum(d, 0)) / math.sqrt(2),
    }[metric]
    texts, metas, _ = corpus
    for q in range(5):
        vector = embed.vector(f"query {q}")
        result = store.query(
            VectorStoreQuery(query_embedding=vector, similarity_top_k=7), **exact(store, 7)
        )
        assert_result(result, *brute(oracle, corpus, vector, 7, metric=metric), similarity, oracle)
        node = result.nodes[0]
        i = int(node.node_id[1:])
        assert node.get_content() == texts[i] and node.metadata == metas[i]
        assert node.ref_doc_id == f"doc{i % 20}" and node.embedding is None
    store.close()


OPS = {
    FilterOperator.EQ: operator.eq,
    FilterOperator.NE: operator.ne,
    FilterOperator.GT: operator.gt,
    FilterOperator.GTE: operator.ge,
    FilterOperator.LT: operator.lt,
    FilterOperator.LTE: operator.le,
    FilterOperator.IN: lambda a, b: a in b,
    FilterOperator.NIN: lambda a, b: a not in b,
}

CASES = [
    [("genre", FilterOperator.EQ, "drama")],
    [("genre", FilterOperator.NE, "drama"), ("year", FilterOperator.GT, 1990)],
    [("year", FilterOperator.GTE, 1960), ("year", FilterOperator.LTE, 1970)],
    [("rating", FilterOperator.LT, 2.5), ("genre", FilterOperator.IN, ["comedy", "horror"])],
    [("genre", FilterOperator.NIN, ["sci-fi", "drama"]), ("rating", FilterOperator.GTE, 5.0)],
    [("year", FilterOperator.EQ, 1999), ("year", FilterOperator.GT, 1990)],
    [("genre", FilterOperator.EQ, "nothing")],
    [("year", FilterOperator.GT, 1951), ("rating", FilterOperator.LTE, 9.8)],
    [("year", FilterOperator.LT, 2019), ("rating", FilterOperator.GT, 0.0)],
]


@pytest.mark.parametrize("case", CASES)
def test_filters_equal_brute_force_over_matches(store, corpus, oracle, embed, case):
    _, metas, _ = corpus
    keep = [i for i in range(N) if all(OPS[op](metas[i][k], v) for k, op, v in case)]
    filters = [MetadataFilter(key=k, operator=op, value=v) for k, op, v in case]
    # The same conditions, flat and as nested AND groups.
    nested = MetadataFilters(filters=[MetadataFilters(filters=[f]) for f in filters])
    for form in (MetadataFilters(filters=filters), nested):
        vector = embed.vector("what to watch")
        query = VectorStoreQuery(query_embedding=vector, similarity_top_k=6, filters=form)
        result = store.query(query)
        assert all(OPS[op](n.metadata[k], v) for n in result.nodes for k, op, v in case)
        want = brute(oracle, corpus, vector, 6, keep)
        assert_result(result, *want, lambda d: 1 - d, oracle)
        everything = store.query(VectorStoreQuery(vector, similarity_top_k=N, filters=form))
        assert sorted(everything.ids) == sorted(f"n{i}" for i in keep)
        assert sorted(n.node_id for n in store.get_nodes(filters=form)) == sorted(everything.ids)


def test_node_and_doc_id_restrictions(store, corpus, oracle, embed):
    vector = embed.vector("restricted")
    some = [f"n{i}" for i in range(0, N, 3)]
    result = store.query(
        VectorStoreQuery(query_embedding=vector, similarity_top_k=5, node_ids=some)
    )
    assert_result(
        result, *brute(oracle, corpus, vector, 5, range(0, N, 3)), lambda d: 1 - d, oracle
    )
    docs = ["doc1", "doc2"]
    keep = [i for i in range(N) if i % 20 in (1, 2)]
    filters = MetadataFilters(filters=[MetadataFilter(key="genre", value="drama")])
    query = VectorStoreQuery(
        query_embedding=vector, similarity_top_k=50, doc_ids=docs, filters=filters
    )
    got = store.query(query)
    want = brute(oracle, corpus, vector, 50, [i for i in keep if i % 4 == 1])
    assert_result(got, *want, lambda d: 1 - d, oracle)
    # as_retriever() passes node_ids=[] to stores that keep text: no restriction.
    result = store.query(VectorStoreQuery(query_embedding=vector, similarity_top_k=5, node_ids=[]))
    assert len(result.ids) == 5


def test_unsupported_filters_and_queries_are_refused(store, embed):
    vector = embed.vector("q")
    f1 = MetadataFilter(key="genre", value="drama")
    f2 = MetadataFilter(key="year", value=1990, operator=FilterOperator.GT)
    cases = [
        (MetadataFilters(filters=[f1, f2], condition=FilterCondition.OR), "'or'"),
        (MetadataFilters(filters=[f1], condition=FilterCondition.NOT), "'not'"),
        (
            MetadataFilters(
                filters=[
                    MetadataFilter(key="genre", value="dra", operator=FilterOperator.TEXT_MATCH)
                ]
            ),
            "text_match",
        ),
        (
            MetadataFilters(
                filters=[MetadataFilter(key="tags", value="x", operator=FilterOperator.CONTAINS)]
            ),
            "contains",
        ),
        (MetadataFilters(filters=[f2, f2]), "two '\\$gt' conditions on 'year'"),
        (
            MetadataFilters(
                filters=[MetadataFilter(key="genre", value="drama", operator=FilterOperator.IN)]
            ),
            "needs a list",
        ),
    ]
    for filters, words in cases:
        with pytest.raises(vdb.InvalidParameterError, match=words):
            store.query(VectorStoreQuery(query_embedding=vector, filters=filters))
    # OR of a single condition is that condition.
    single = MetadataFilters(filters=[f1], condition=FilterCondition.OR)
    assert to_vectordb_filter(single) == {"genre": "drama"}
    with pytest.raises(vdb.InvalidParameterError, match="mode 'mmr'"):
        store.query(VectorStoreQuery(query_embedding=vector, mode=VectorStoreQueryMode.MMR))
    with pytest.raises(vdb.InvalidParameterError, match="query_embedding"):
        store.query(VectorStoreQuery(query_str="no vector"))
    with pytest.raises(vdb.InvalidParameterError, match="fetch_k"):
        store.query(VectorStoreQuery(query_embedding=vector), fetch_k=3)
    with pytest.raises(vdb.DimensionMismatchError):
        store.query(VectorStoreQuery(query_embedding=[1.0, 2.0]))


# --------------------------------------------------------------------------- writes


def test_nodes_get_delete_upsert_clear(store, corpus):
    _, _, vectors = corpus
    assert [n.node_id for n in store.get_nodes(["n5", "zz", "n2"])] == ["n5", "n2"]
    assert store.get_nodes([]) == []
    assert len(store.get_nodes()) == N
    drama = MetadataFilters(filters=[MetadataFilter(key="genre", value="drama")])
    got = store.get_nodes(filters=drama)
    assert sorted(n.node_id for n in got) == sorted(f"n{i}" for i in range(N) if i % 4 == 1)
    assert [n.node_id for n in store.get_nodes(["n1", "n2", "n5"], filters=drama)] == ["n1", "n5"]
    store.delete_nodes(["n1", "n2"], filters=drama)  # n2 is not drama: kept
    assert store.get_nodes(["n1", "n2"])[0].node_id == "n2" and len(store.client) == N - 1
    store.delete_nodes(filters=drama)
    assert store.get_nodes(filters=drama) == [] and len(store.client) == N - N // 4
    store.delete("doc0")  # ref_doc_id: nodes 0, 20, 40, ... (those left)
    assert all(n.ref_doc_id != "doc0" for n in store.get_nodes())
    left = len(store.client)
    store.delete_nodes(["n3"])
    assert len(store.client) == left - 1
    store.delete_nodes([])
    assert len(store.client) == left - 1
    replacement = TextNode(
        id_="n6", text="replaced", metadata={"new": 1}, embedding=vectors[0].tolist()
    )
    store.add([replacement])
    (node,) = store.get_nodes(["n6"])
    assert node.get_content() == "replaced" and node.metadata == {"new": 1}
    assert len(store.client) == left - 1
    store.clear()
    assert len(store.client) == 0 and store.get_nodes() == []
    store.add(make_nodes(corpus)[:3])
    assert len(store.get_nodes()) == 3


def test_a_string_is_not_a_list_of_node_ids(embed):
    store = VectorDBVectorStore()
    store.add([TextNode(id_=i, text=i, embedding=embed.vector(i)) for i in ("a", "b", "ab")])
    for call in (store.delete_nodes, store.get_nodes):
        with pytest.raises(vdb.InvalidParameterError, match="not a str"):
            call("ab")

    async def twins():
        for call in (store.adelete_nodes, store.aget_nodes):
            with pytest.raises(vdb.InvalidParameterError, match="not a str"):
                await call("ab")
        await store.aclose()

    asyncio.run(twins())
    assert sorted(n.node_id for n in store.get_nodes()) == ["a", "ab", "b"]


def test_bad_nodes_are_refused(embed):
    store = VectorDBVectorStore()
    with pytest.raises(ValueError, match="embedding"):
        store.add([TextNode(id_="x", text="no embedding")])
    store.add([TextNode(id_="a", text="a", embedding=embed.vector("a"))])
    with pytest.raises(vdb.DimensionMismatchError):
        store.add([TextNode(id_="b", text="b", embedding=[1.0, 2.0])])
    with pytest.raises(vdb.InvalidParameterError, match="reserved"):
        store.add(
            [TextNode(id_="c", text="c", metadata={"_sid": "x"}, embedding=embed.vector("c"))]
        )
    assert [n.node_id for n in store.get_nodes()] == ["a"]
    assert store.add([]) == []
    with pytest.raises(vdb.InvalidParameterError, match="build options"):
        VectorDBVectorStore(leaves=3)


def test_empty_store(embed):
    store = VectorDBVectorStore()
    result = store.query(VectorStoreQuery(query_embedding=embed.vector("q"), similarity_top_k=3))
    assert result.ids == [] and result.nodes == [] and result.similarities == []
    assert store.get_nodes() == [] and store.client is None
    store.delete("nothing")
    store.delete_nodes(["nothing"])
    assert VectorDBVectorStore.class_name() == "VectorDBVectorStore"


def test_mock_embedding_round_trip():
    # LlamaIndex's own fake model: one vector for every text, so every node ties.
    store = VectorDBVectorStore()
    index = VectorStoreIndex.from_documents(
        [Document(text=f"t{i}", id_=f"d{i}") for i in range(5)],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=MockEmbedding(embed_dim=8),
    )
    got = index.as_retriever(similarity_top_k=10, embed_model=MockEmbedding(embed_dim=8)).retrieve(
        "t0"
    )
    assert sorted(n.node.ref_doc_id for n in got) == [f"d{i}" for i in range(5)]
    assert all(n.score == pytest.approx(1.0, abs=1e-5) for n in got)


# --------------------------------------------------------------------------- async


@pytest.mark.asyncio
async def test_async_twins(corpus, embed, oracle):
    store = VectorDBVectorStore(max_leaf_size=20)
    nodes = make_nodes(corpus)
    await asyncio.gather(*(store.async_add(nodes[i : i + 20]) for i in range(0, N, 20)))
    assert len(store.client) == N
    vectors = [embed.vector(f"async {q}") for q in range(25)]
    queries = [VectorStoreQuery(query_embedding=v, similarity_top_k=5) for v in vectors]
    got = await asyncio.gather(*(store.aquery(q) for q in queries))
    for q, result in zip(queries, got, strict=True):
        want = store.query(q)
        assert result.ids == want.ids
        np.testing.assert_allclose(result.similarities, want.similarities, rtol=1e-6)
    engine = store._core._engines[asyncio.get_running_loop()]
    assert engine.stats().queries >= 25
    drama = MetadataFilters(filters=[MetadataFilter(key="genre", value="drama")])
    assert [n.node_id for n in await store.aget_nodes(filters=drama)] == [
        n.node_id for n in store.get_nodes(filters=drama)
    ]
    assert [n.node_id for n in await store.aget_nodes(["n4", "n9"])] == ["n4", "n9"]
    await store.adelete("doc1")
    assert len(store.client) == N - N // 20
    await store.adelete_nodes(filters=drama)
    assert await store.aget_nodes(filters=drama) == []
    await store.adelete_nodes(["n0"])
    assert await store.aget_nodes(["n0"]) == []
    await store.aclear()
    assert (await store.aquery(queries[0])).ids == []
    await store.aclose()


@pytest.mark.asyncio
async def test_first_async_add_builds(embed):
    store = VectorDBVectorStore()
    nodes = [TextNode(id_=f"x{i}", text=f"x{i}", embedding=embed.vector(f"x{i}")) for i in range(8)]
    await asyncio.gather(*(store.async_add([n]) for n in nodes))
    result = await store.aquery(
        VectorStoreQuery(query_embedding=embed.vector("x3"), similarity_top_k=1)
    )
    assert result.ids == ["x3"]
    got = await store.aget_nodes([n.node_id for n in nodes])
    assert [n.node_id for n in got] == [f"x{i}" for i in range(8)]
    assert [n.get_content(metadata_mode=MetadataMode.NONE) for n in got] == [
        f"x{i}" for i in range(8)
    ]
    assert sorted(store.client.ids.tolist()) == list(range(8))
    await store.aclose()


# --------------------------------------------------------------------------- imports


def test_frameworks_load_only_when_used():
    import subprocess
    import sys

    code = (
        "import sys; import vectordb, vectordb.integrations; "
        "print([m for m in sys.modules if m.startswith(('llama_index', 'langchain'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = (
        "import sys; sys.modules['llama_index'] = None\n"
        "try:\n    import vectordb.integrations.llamaindex\n"
        "except ImportError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'vectordb-embedded[llamaindex]'" in out.stdout


def test_example_runs_offline():
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).parent.parent / "examples" / "llamaindex_rag.py"
    out = subprocess.run(
        [sys.executable, "-W", "error", str(example)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "reopened:" in out.stdout and "async:" in out.stdout
