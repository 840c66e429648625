"""The LangChain adapter: LangChain's own standard suite, then answers checked against a
float64 brute force over the same deterministic fake embeddings."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from langchain_tests.integration_tests import VectorStoreIntegrationTests

import vectordb as vdb
from vectordb.integrations.langchain import VectorDBStore

DIM = 16
N = 240


# Strict asyncio mode needs the mark on the async tests, which the suite defines without
# it; marking the class reaches them, but also the sync ones, which pytest-asyncio then runs
# as usual, with a warning that says just that.
@pytest.mark.asyncio
@pytest.mark.filterwarnings(
    "ignore:The test <Function .*> is marked with '@pytest.mark.asyncio' but it is"
    " not an async function:pytest.PytestWarning"
)
class TestStandardSuite(VectorStoreIntegrationTests):
    """LangChain's published suite, sync and async, unchanged."""

    @pytest.fixture
    def vectorstore(self) -> Iterator[VectorDBStore]:
        store = VectorDBStore(self.get_embeddings())
        try:
            yield store
        finally:
            store.close()


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def embedding():
    return DeterministicFakeEmbedding(size=DIM)


@pytest.fixture(scope="module")
def corpus(embedding):
    texts = [f"passage {i} about topic {i % 7}" for i in range(N)]
    metadatas = [{"i": i, "group": i % 3, "tag": "even" if i % 2 == 0 else "odd"} for i in range(N)]
    ids = [f"id-{i}" for i in range(N)]
    vectors = np.asarray(embedding.embed_documents(texts))
    return texts, metadatas, ids, vectors


@pytest.fixture
def make_store(embedding, corpus):
    """A store holding the corpus; small leaves so that searches cross the tree."""
    made = []

    def make(metric="cosine", **options):
        texts, metadatas, ids, _ = corpus
        store = VectorDBStore(embedding, metric=metric, max_leaf_size=24, **options)
        store.add_texts(texts, metadatas, ids=ids)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def exact(store, k):
    """Search options under which the index scans everything and reranks exactly."""
    index = store.index
    return {"probes": index.n_leaves, "rerank_factor": math.ceil(len(index) / k)}


def brute(oracle, corpus, embedding, query, metric, k, keep=None):
    """The ``k`` nearest ``(id, distance)`` pairs in float64, among rows ``keep``."""
    _, _, ids, vectors = corpus
    true = oracle.distances(vectors, [embedding.embed_query(query)], metric)[0]
    rows = np.arange(len(ids)) if keep is None else np.asarray(keep)
    order = rows[np.argsort(true[rows], kind="stable")][:k]
    return [ids[r] for r in order], true[order]


def assert_same(found, want_ids, want_dists, oracle):
    """``found`` (doc, distance) pairs are the brute-force answer (ties in any order)."""
    got_ids = [doc.id for doc, _ in found]
    got = np.array([d for _, d in found])
    assert len(got_ids) == len(want_ids)
    np.testing.assert_allclose(got, want_dists, rtol=oracle.RTOL, atol=oracle.ATOL)
    slack = oracle.slack(want_dists)
    for gid, wid, dist, s in zip(got_ids, want_ids, want_dists, slack, strict=True):
        # The same id, unless the neighbour is tied with the next one.
        assert gid == wid or np.isclose(dist, want_dists, atol=s).sum() > 1


QUERIES = ["passage 3 about topic 3", "something else entirely", "topic 5"]


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("query", QUERIES)
def test_search_equals_brute_force(make_store, corpus, embedding, oracle, metric, query):
    store = make_store(metric)
    found = store.similarity_search_with_score(query, k=10, **exact(store, 10))
    assert_same(found, *brute(oracle, corpus, embedding, query, metric, 10), oracle)
    texts, metadatas, ids, _ = corpus
    for doc, _ in found:
        i = ids.index(doc.id)
        assert doc.page_content == texts[i] and doc.metadata == metadatas[i]
    vector = embedding.embed_query(query)
    by_vector = store.similarity_search_by_vector(vector, k=10, **exact(store, 10))
    assert [d.id for d in by_vector] == [d.id for d, _ in found]


def test_default_store_is_exact_below_a_leaf(corpus, embedding, oracle):
    texts, metadatas, ids, _ = corpus
    store = VectorDBStore.from_texts(texts, embedding, metadatas, ids=ids)  # default params
    assert store.index.n_leaves == 1  # max_leaf_size 1000: one leaf, scanned exactly
    for q in range(20):
        query = f"query number {q}"
        found = store.similarity_search_with_score(query, k=10)
        assert_same(found, *brute(oracle, corpus, embedding, query, "cosine", 10), oracle)


def test_k_larger_than_store(embedding):
    store = VectorDBStore.from_texts(["a", "b", "c"], embedding, ids=["1", "2", "3"])
    assert sorted(d.id for d in store.similarity_search("a", k=50)) == ["1", "2", "3"]
    assert store.similarity_search("a", k=1)[0].id == "1"
    with pytest.raises(vdb.InvalidParameterError, match="k must be"):
        store.similarity_search("a", k=0)


@pytest.mark.parametrize(
    "filt, keep",
    [
        ({"group": 1}, lambda m: m["group"] == 1),
        (
            {"tag": "odd", "i": {"$gte": 100, "$lt": 180}},
            lambda m: m["tag"] == "odd" and 100 <= m["i"] < 180,
        ),
        (
            {"group": {"$in": [0, 2]}, "i": {"$ne": 3}},
            lambda m: m["group"] in (0, 2) and m["i"] != 3,
        ),
        ({"group": {"$nin": [0]}, "i": {"$lte": 30}}, lambda m: m["group"] != 0 and m["i"] <= 30),
        (lambda m: m["i"] % 10 == 4, lambda m: m["i"] % 10 == 4),
    ],
)
def test_filters_equal_brute_force_over_matches(make_store, corpus, embedding, oracle, filt, keep):
    store = make_store()
    _, metadatas, _, _ = corpus
    rows = [r for r, m in enumerate(metadatas) if keep(m)]
    query = "passage 17 about topic 3"
    found = store.similarity_search_with_score(query, k=8, filter=filt)
    assert all(keep(doc.metadata) for doc, _ in found)
    assert_same(found, *brute(oracle, corpus, embedding, query, "cosine", 8, rows), oracle)


def test_callable_filter_sees_only_user_metadata(make_store):
    store = make_store()
    seen = []
    store.similarity_search("x", k=2, filter=lambda m: seen.append(m) or True)
    assert seen and all(set(m) == {"i", "group", "tag"} for m in seen)


def test_relevance_scores(make_store, corpus, embedding, oracle, metric):
    store = make_store(metric)
    query = "passage 8 about topic 1"
    want_ids, want = brute(oracle, corpus, embedding, query, metric, 6)
    found = store.similarity_search_with_relevance_scores(query, k=6, **exact(store, 6))
    expected = {
        "cosine": 1 - want,
        "ip": -want,
        "l2": 1 - np.sqrt(np.maximum(want, 0)) / math.sqrt(2),
    }[metric]
    assert [d.id for d, _ in found] == want_ids
    np.testing.assert_allclose([s for _, s in found], np.clip(expected, 0, 1), atol=1e-4)
    fn = store._select_relevance_score_fn()
    formula = {
        "cosine": lambda d: 1 - d,
        "ip": lambda d: -d,
        "l2": lambda d: 1 - math.sqrt(max(d, 0)) / math.sqrt(2),
    }[metric]
    for d in (-1e6, -2.0, -1.0, -0.3, 0.0, 0.3, 0.5, 1.0, 1.7, 2.0, 4.0, 1e6):
        assert fn(d) == pytest.approx(min(1.0, max(0.0, formula(d))))
    # Identical unit vectors are fully relevant, opposite ones not at all.
    identical, opposite = {"cosine": (0.0, 2.0), "ip": (-1.0, 1.0), "l2": (0.0, 4.0)}[metric]
    assert fn(identical) == 1.0 and fn(opposite) == 0.0
    # Unit vectors at cosine 0.75: cosine distance 0.25, ip -0.75, squared l2 0.5.
    at_075 = {"cosine": (0.25, 0.75), "ip": (-0.75, 0.75), "l2": (0.5, 0.5)}[metric]
    assert fn(at_075[0]) == pytest.approx(at_075[1])


def test_mmr_equals_langchain_mmr_on_brute_force(make_store, corpus, embedding, oracle):
    store = make_store()
    query = "a question on topic 5"  # not a stored text: MMR scores would tie
    _, _, ids, vectors = corpus
    want_ids, _ = brute(oracle, corpus, embedding, query, "cosine", 20)
    rows = [ids.index(i) for i in want_ids]
    q = np.asarray(embedding.embed_query(query))
    for lam in (0.0, 0.5, 1.0):
        picked = maximal_marginal_relevance(q, vectors[rows].tolist(), lambda_mult=lam, k=5)
        got = store.max_marginal_relevance_search(
            query, k=5, fetch_k=20, lambda_mult=lam, **exact(store, 20)
        )
        assert [d.id for d in got] == [want_ids[p] for p in picked]
    assert [d.id for d in got] == want_ids[:5]  # lambda 1: plain similarity order
    assert store.max_marginal_relevance_search(query, k=3, filter={"group": 2}) != []
    assert all(
        d.metadata["group"] == 2
        for d in store.max_marginal_relevance_search(query, k=3, filter={"group": 2})
    )


def test_retriever(make_store, corpus, embedding, oracle):
    store = make_store()
    query = "passage 9 about topic 2"
    want_ids, want = brute(oracle, corpus, embedding, query, "cosine", 4)
    docs = store.as_retriever(search_kwargs={"k": 4}).invoke(query)
    assert [d.id for d in docs] == want_ids
    docs = store.as_retriever(search_kwargs={"k": 3, "filter": {"tag": "even"}}).invoke(query)
    assert len(docs) == 3 and all(d.metadata["tag"] == "even" for d in docs)
    _, _, ids, vectors = corpus
    query = "a question on topic 2"  # not a stored text: MMR scores would tie
    near, _ = brute(oracle, corpus, embedding, query, "cosine", 20)
    picked = maximal_marginal_relevance(
        np.asarray(embedding.embed_query(query)),
        vectors[[ids.index(i) for i in near]].tolist(),
        lambda_mult=0.5,  # the retriever's default, with fetch_k 20
        k=4,
    )
    mmr = store.as_retriever(search_type="mmr", search_kwargs={"k": 4, **exact(store, 20)})
    docs = mmr.invoke(query)
    assert [d.id for d in docs] == [near[p] for p in picked] != near[:4]
    query = "passage 9 about topic 2"
    threshold = float(1 - want[1]) - 1e-6  # the two nearest, by cosine
    retriever = store.as_retriever(
        search_type="similarity_score_threshold",
        search_kwargs={"k": 10, "score_threshold": threshold},
    )
    assert [d.id for d in retriever.invoke(query)] == want_ids[:2]


# --------------------------------------------------------------------------- async


@pytest.mark.asyncio
async def test_async_twins_equal_sync(make_store, corpus, embedding):
    store = make_store()
    queries = [f"question {q}" for q in range(30)]
    want = [store.similarity_search_with_score(q, k=5) for q in queries]
    got = await asyncio.gather(*(store.asimilarity_search_with_score(q, k=5) for q in queries))
    for w, g in zip(want, got, strict=True):
        assert [d for d, _ in w] == [d for d, _ in g]
        np.testing.assert_allclose([s for _, s in w], [s for _, s in g], rtol=1e-6)
    q = queries[0]
    assert await store.asimilarity_search(q, k=5) == [d for d, _ in want[0]]
    vector = embedding.embed_query(q)
    assert await store.asimilarity_search_by_vector(vector, k=5) == [d for d, _ in want[0]]
    filt = {"group": 2}
    assert await store.asimilarity_search(q, k=5, filter=filt) == store.similarity_search(
        q, k=5, filter=filt
    )
    assert await store.amax_marginal_relevance_search(
        q, k=4, fetch_k=12
    ) == store.max_marginal_relevance_search(q, k=4, fetch_k=12)
    assert await store.asimilarity_search_with_relevance_scores(
        q, k=3
    ) == store.similarity_search_with_relevance_scores(q, k=3)
    assert await store.as_retriever(search_kwargs={"k": 3}).ainvoke(q) == [
        d for d, _ in want[0][:3]
    ]
    engine = store._core._engines[asyncio.get_running_loop()]
    assert engine.stats().queries >= 30
    await store.aclose()


@pytest.mark.asyncio
async def test_async_writes(embedding):
    store = await VectorDBStore.afrom_texts(
        ["alpha", "beta"], embedding, metadatas=[{"n": 1}, {"n": 2}], ids=["a", "b"]
    )
    assert [d.id for d in await store.aget_by_ids(["b", "zz", "a"])] == ["b", "a"]
    await asyncio.gather(*(store.aadd_texts([f"t{i}"], ids=[f"t{i}"]) for i in range(20)))
    assert len(store.index) == 22
    await store.aadd_documents([Document(page_content="alpha two", metadata={"n": 9}, id="a")])
    (doc,) = await store.aget_by_ids(["a"])
    assert doc.page_content == "alpha two" and doc.metadata == {"n": 9}
    assert await store.adelete(["a", "missing"]) is True
    assert await store.aget_by_ids(["a"]) == []
    assert len(store.index) == 21
    await store.adelete()
    assert await store.asimilarity_search("beta") == []
    await store.aclose()


@pytest.mark.asyncio
async def test_first_async_adds_race_to_build(embedding):
    store = VectorDBStore(embedding)
    await asyncio.gather(*(store.aadd_texts([f"x{i}"], ids=[f"x{i}"]) for i in range(10)))
    assert sorted(store.index.ids.tolist()) == list(range(10))
    assert len(await store.asimilarity_search("x3", k=20)) == 10
    await store.aclose()


def test_engine_per_event_loop(make_store):
    store = make_store()

    async def ask():
        return await store.asimilarity_search("passage 1", k=3)

    first = asyncio.run(ask())
    old = next(iter(store._core._engines.values()))
    assert asyncio.run(ask()) == first  # a new loop: a new engine, the old one closed
    assert old.state is vdb.EngineState.CLOSED
    assert len(store._core._engines) == 1
    store.close()
    assert not store._core._engines


@pytest.mark.asyncio
async def test_close_from_running_loop(make_store):
    store = make_store()
    await store.asimilarity_search("passage", k=1)
    with pytest.raises(vdb.InvalidParameterError, match="aclose"):
        store.close()
    await store.aclose()
    assert not store._core._engines


# --------------------------------------------------------------------------- writes


def test_ids_upsert_delete_get(embedding):
    store = VectorDBStore(embedding)
    assert store.similarity_search("a") == [] and store.get_by_ids(["a"]) == []
    assert store.delete(["nothing"]) is True
    ids = store.add_texts(["one", "two", "three"], [{"n": 1}, {"n": 2}, {"n": 3}])
    assert len(set(ids)) == 3 and all(len(i) == 36 for i in ids)  # uuid4 strings
    store.add_texts(["two, again"], [{"n": 22}], ids=[ids[1]])
    assert len(store.index) == 3
    (doc,) = store.get_by_ids([ids[1]])
    assert doc == Document(id=ids[1], page_content="two, again", metadata={"n": 22})
    top = store.similarity_search_with_score("two, again", k=1)[0]
    assert top[0].id == ids[1] and top[1] == pytest.approx(0, abs=1e-5)
    assert [d.id for d in store.get_by_ids([ids[2], "x", ids[0]])] == [ids[2], ids[0]]
    store.delete([ids[0], "x"])
    assert sorted(d.id for d in store.similarity_search("one", k=5)) == sorted(ids[1:])
    store.add_texts(["one"], ids=[ids[0]])  # a deleted id comes back
    assert store.get_by_ids([ids[0]])[0].metadata == {}
    store.delete()
    assert len(store.index) == 0 and store.similarity_search("one") == []
    store.add_texts(["fresh"], ids=["f"])
    assert [d.id for d in store.similarity_search("fresh")] == ["f"]


def test_bad_input_is_refused_and_leaves_no_trace(embedding):
    store = VectorDBStore(embedding)
    store.add_texts(["ok"], ids=["ok"])
    cases = [
        (lambda: store.add_texts(["a", "b"], ids=["x"]), vdb.InvalidParameterError, "ids"),
        (
            lambda: store.add_texts(["a"], [{"n": 1}, {"n": 2}]),
            vdb.InvalidParameterError,
            "metadata",
        ),
        (lambda: store.add_texts(["a", "b"], ids=["x", "x"]), vdb.InvalidParameterError, "twice"),
        (lambda: store.add_texts(["a"], [{"_text": 1}]), vdb.InvalidParameterError, "reserved"),
        (
            lambda: store.add_texts(["a"], [{"when": object()}], ids=["new"]),
            vdb.InvalidParameterError,
            "JSON",
        ),
        (lambda: store.add_texts(["a"], ids=[3]), vdb.InvalidParameterError, "strings"),
        (lambda: store.add_texts(["a"], color="red"), vdb.InvalidParameterError, "color"),
        (lambda: store.similarity_search("a", fetch_k=3), vdb.InvalidParameterError, "fetch_k"),
        (
            lambda: store.similarity_search("a", filter={"n": {"$like": 1}}),
            vdb.InvalidParameterError,
            "operator",
        ),
        (lambda: store.delete(["ok"], cascade=True), vdb.InvalidParameterError, "cascade"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
    wide = VectorDBStore(DeterministicFakeEmbedding(size=DIM + 1))
    wide._core = store._core
    with pytest.raises(vdb.DimensionMismatchError):
        wide.add_texts(["wider"], ids=["wide"])
    assert [d.id for d in store.similarity_search("a", k=10)] == ["ok"]
    assert store.get_by_ids(["new", "wide", "x"]) == []
    assert store._core._ids.ints == {"ok": 0}
    with pytest.raises(vdb.InvalidParameterError, match="build options"):
        VectorDBStore(embedding, max_leaf=3)
    with pytest.raises(vdb.InvalidParameterError, match="max_leaf_size"):
        VectorDBStore(embedding, max_leaf_size=0)
    with pytest.raises(vdb.InvalidParameterError, match="metric"):
        VectorDBStore(embedding, metric="manhattan")


def test_from_documents_and_repr(embedding):
    docs = [Document(page_content="x", metadata={"k": 1}, id="d1"), Document(page_content="y")]
    store = VectorDBStore.from_documents(docs, embedding, metric="ip")
    assert store.get_by_ids(["d1"]) == [docs[0]]
    assert len(store.index) == 2 and store.index.metric == "ip"
    assert repr(store) == "VectorDBStore(n=2, metric='ip', retrieval_mode='vector')"
    assert store.embeddings is embedding


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(make_store, embedding, tmp_path, mmap):
    store = make_store("l2", probes=7)
    store.delete(["id-5"])
    query = "passage 12 about topic 5"
    want = store.similarity_search_with_score(query, k=10, filter={"group": 0})
    store.save(tmp_path / "store")
    back = VectorDBStore.load(tmp_path / "store", embedding, mmap=mmap)
    assert back.index.is_using_mmap is mmap
    assert back.index.metric == "l2" and back._core.probes == 7
    assert back.similarity_search_with_score(query, k=10, filter={"group": 0}) == want
    assert back.get_by_ids(["id-5", "id-6"])[0].metadata == {"i": 6, "group": 0, "tag": "even"}
    assert len(back.get_by_ids(["id-5", "id-6"])) == 1
    back.add_texts(["new text"], [{"new": True}], ids=["new"])  # fresh int, no collision
    back.add_texts(["replaced"], ids=["id-7"])
    assert len(back.index) == len(store.index) + 1
    assert back.get_by_ids(["id-8"])[0].page_content == "passage 8 about topic 1"
    assert back.get_by_ids(["id-7"])[0].page_content == "replaced"
    back.save(tmp_path / "store")  # over the mapped original: a checkpoint
    again = VectorDBStore.load(tmp_path / "store", embedding)
    assert again.get_by_ids(["new"])[0].metadata == {"new": True}
    back.close()
    again.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_loaded_stores_writes_survive_a_kill_without_a_save(make_store, embedding, tmp_path):
    make_store("cosine").save(tmp_path / "store")
    empty = VectorDBStore(embedding)
    empty.save(tmp_path / "empty")
    pid = os.fork()
    if pid == 0:  # the child writes, then dies without saving or closing
        try:
            store = VectorDBStore.load(tmp_path / "store", embedding)
            store.add_texts(["kept"], [{"k": 1}], ids=["k1"])
            store.delete(["id-3"])
            fresh = VectorDBStore.load(tmp_path / "empty", embedding)
            fresh.add_texts(["first"], ids=["f1"])  # builds the index: saved at once
            fresh.add_texts(["second"], ids=["f2"])
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    back = VectorDBStore.load(tmp_path / "store", embedding)
    assert back.get_by_ids(["k1"])[0].metadata == {"k": 1} and not back.get_by_ids(["id-3"])
    fresh = VectorDBStore.load(tmp_path / "empty", embedding)
    assert [d.page_content for d in fresh.get_by_ids(["f1", "f2"])] == ["first", "second"]
    back.close()
    fresh.close()


def test_save_load_empty_and_errors(embedding, tmp_path):
    store = VectorDBStore(embedding, metric="ip", max_leaf_size=50)
    store.save(tmp_path / "empty")
    back = VectorDBStore.load(tmp_path / "empty", embedding)
    assert back.index is None and back.similarity_search("a") == []
    back.add_texts(["a"])  # the first write builds the index, saved there at once
    assert back.index.metric == "ip" and back.index.params["max_leaf_size"] == 50
    assert back.index.path == tmp_path / "empty" / "index"
    back.save(tmp_path / "empty")
    with pytest.raises(vdb.IndexLockedError):  # back writes there: no lost update
        store.save(tmp_path / "empty")
    back.close()
    store.save(tmp_path / "empty")  # an empty store replaces a saved one
    assert VectorDBStore.load(tmp_path / "empty", embedding).index is None
    with pytest.raises(vdb.InvalidIndexFileError, match="not a saved vectordb text store"):
        VectorDBStore.load(tmp_path / "nowhere", embedding)
    from vectordb.integrations.llamaindex import VectorDBVectorStore

    VectorDBVectorStore().persist(str(tmp_path / "llama"))
    with pytest.raises(vdb.InvalidIndexFileError, match="'llamaindex' adapter"):
        VectorDBStore.load(tmp_path / "llama", embedding)
    (tmp_path / "file").write_text("x")
    with pytest.raises(vdb.StorageError):
        store.save(tmp_path / "file")


# --------------------------------------------------------------------------- imports


def test_frameworks_load_only_when_used_and_missing_ones_name_the_extra():
    code = """
        import sys
        import vectordb, vectordb.integrations
        print(sorted(m for m in sys.modules if m.startswith(("langchain", "llama_index"))))
        sys.modules["langchain_core"] = None  # as if not installed
        try:
            import vectordb.integrations.langchain
        except ImportError as exc:
            print(exc)
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    loaded, message = out.stdout.strip().split("\n")
    assert loaded == "[]"
    assert "pip install 'vectordb-embedded[langchain]'" in message


def test_example_runs_offline():
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).parent.parent / "examples" / "langchain_rag.py"
    out = subprocess.run(
        [sys.executable, "-W", "error", str(example)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "reopened:" in out.stdout and "async:" in out.stdout


# --------------------------------------------------------------------------- races


def assert_consistent(store):
    """The string <-> int maps know every live id under its own string id, and a search
    over everything returns each document once."""
    core, index = store._core, store.index
    for i in index.ids.tolist():
        sid = index.get_metadata(i)["_sid"]
        assert core._ids.ints[sid] == i and core._ids.sids[i] == sid
    found = [d.id for d in store.similarity_search("x", k=max(len(index), 1))]
    assert len(found) == len(set(found)) == len(index)
    assert sorted(d.id for d in store.get_by_ids(found)) == sorted(found)


@pytest.mark.asyncio
async def test_delete_racing_an_upsert_of_the_same_id(embedding, tmp_path):
    store = VectorDBStore(embedding)
    store.add_texts(["a", "b", "c"], ids=["a", "b", "c"])
    vectors = embedding.embed_documents(["a2"])
    # The upsert takes its int while the delete is on the engine's executor.
    await asyncio.gather(store.adelete(["a"]), store._core.aupsert(vectors, ["a2"], ids=["a"]))
    assert_consistent(store)
    assert [d.page_content for d in store.get_by_ids(["a"])] in ([], ["a2"])
    store.add_texts(["a3"], ids=["a"])
    assert_consistent(store)
    assert sorted(d.id for d in store.similarity_search("a3", k=10)) == ["a", "b", "c"]
    assert [d.page_content for d in store.get_by_ids(["a", "b"])] == ["a3", "b"]
    await store.aclose()
    store.save(tmp_path / "s")
    back = VectorDBStore.load(tmp_path / "s", embedding)
    assert sorted(d.id for d in back.similarity_search("a3", k=10)) == ["a", "b", "c"]
    back.close()


def test_deleted_ids_are_forgotten_once_they_outnumber_live_ones():
    from vectordb.integrations._store import TextIndex

    core = TextIndex("t", build_options={"max_leaf_size": 2000})
    n = 1100
    vectors = np.random.default_rng(0).standard_normal((n, 8))
    core.upsert(vectors, [f"t{i}" for i in range(n)], ids=[f"t{i}" for i in range(n)])
    core.delete([f"t{i}" for i in range(n - 10)])
    assert len(core._ids.ints) == len(core._ids.sids) == 10
    core.upsert(vectors[:1], ["back"], ids=["t0"])  # a forgotten id comes back: a new int
    assert core._ids.ints["t0"] == n and sorted(r.id for r in core.get()) == sorted(
        ["t0", *(f"t{i}" for i in range(n - 10, n))]
    )
    core.close()


async def until(event):
    while not event.is_set():
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_cancelled_add_leaves_the_maps_consistent(embedding, monkeypatch):
    import threading
    import time

    store = VectorDBStore(embedding)
    store.add_texts(["a", "b", "c"], ids=["a", "b", "c"])
    index, upsert = store.index, store.index.upsert
    started, done = threading.Event(), threading.Event()

    def slow_upsert(*args, **kwargs):
        started.set()
        time.sleep(0.2)
        try:
            return upsert(*args, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(index, "upsert", slow_upsert)
    vectors = embedding.embed_documents(["new"])
    task = asyncio.create_task(store._core.aupsert(vectors, ["new"], ids=["n"]))
    await until(started)  # the write is on the executor
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(done)  # the write itself was not cancelled
    await asyncio.sleep(0.05)
    assert [d.page_content for d in store.get_by_ids(["n"])] == ["new"]
    assert_consistent(store)
    await store.aclose()


@pytest.mark.asyncio
async def test_first_build_does_not_block_the_loop(embedding, monkeypatch):
    import threading
    import time

    build, building = vdb.ClusteredIndex.build.__func__, threading.Event()

    def slow_build(cls, *args, **kwargs):
        building.set()
        time.sleep(0.8)
        return build(cls, *args, **kwargs)

    store = VectorDBStore(embedding)
    monkeypatch.setattr(vdb.ClusteredIndex, "build", classmethod(slow_build))
    gaps = []

    async def beat():
        last = time.perf_counter()
        while store.index is None:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def second():
        await until(building)
        await store._core.aupsert(embedding.embed_documents(["y"]), ["y"], ids=["y"])

    first = store._core.aupsert(embedding.embed_documents(["x"]), ["x"], ids=["x"])
    await asyncio.gather(beat(), first, second())
    assert max(gaps) < 0.4  # the loop kept turning while the build ran
    assert sorted(d.id for d in await store.asimilarity_search("x", k=5)) == ["x", "y"]
    await store.aclose()


@pytest.mark.parametrize("run", ["sync", "async"])
def test_mmr_racing_a_delete(make_store, embedding, monkeypatch, run):
    store = make_store()
    query = embedding.embed_query("a question on topic 5")
    order = [d.id for d in store.similarity_search_by_vector(query, k=20)]
    index, get_metadata_many = store.index, store.index.get_metadata_many
    first = store._core._ids.ints[order[0]]

    def read_then_delete(ids, **kwargs):
        docs = get_metadata_many(ids, **kwargs)
        if first in ids.tolist():  # the delete lands between the search and the vector read
            store._core.delete([order[0]])
        return docs

    monkeypatch.setattr(index, "get_metadata_many", read_then_delete)
    args = (query, 5, 20, 1.0)  # lambda 1: plain similarity order
    if run == "sync":
        got = store.max_marginal_relevance_search_by_vector(*args)
    else:

        async def mmr():
            try:
                return await store.amax_marginal_relevance_search_by_vector(*args)
            finally:
                await store.aclose()

        got = asyncio.run(mmr())
    assert [d.id for d in got] == order[1:6]
    for doc in got:
        assert doc.page_content == store.get_by_ids([doc.id])[0].page_content


@pytest.mark.asyncio
async def test_async_results_read_metadata_in_one_executor_call(make_store):
    store = make_store()
    await store.asimilarity_search("passage", k=1)  # the engine exists
    engine = store._core._engines[asyncio.get_running_loop()]
    submit, calls = engine._executor.submit, []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return submit(*args, **kwargs)

    engine._executor.submit = counted
    assert len(await store.asimilarity_search("passage", k=10)) == 10
    assert len(calls) <= 2  # the batch's search, then the records
    await store.aclose()


def test_engines_of_loops_that_still_exist_are_kept(make_store):
    store = make_store()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.asimilarity_search("passage", k=1))
        engine = store._core._engines[loop]
        asyncio.run(store.asimilarity_search("passage", k=1))  # another loop, same thread
        assert engine.state is vdb.EngineState.OPEN
        loop.run_until_complete(store.asimilarity_search("passage", k=1))
        assert store._core._engines[loop] is engine
    finally:
        loop.close()
    asyncio.run(store.asimilarity_search("passage", k=1))
    assert engine.state is vdb.EngineState.CLOSED and loop not in store._core._engines
    store.close()


def test_a_string_is_not_a_list_of_ids(embedding):
    store = VectorDBStore(embedding)
    store.add_texts(["x", "y"], ids=["a", "ab"])
    for call in (store.delete, store.get_by_ids):
        with pytest.raises(vdb.InvalidParameterError, match="not a str"):
            call("ab")

    async def twins():
        for call in (store.adelete, store.aget_by_ids):
            with pytest.raises(vdb.InvalidParameterError, match="not a str"):
                await call("ab")
        await store.aclose()

    asyncio.run(twins())
    assert sorted(d.id for d in store.get_by_ids(["a", "ab"])) == ["a", "ab"]


# --------------------------------------------------------------------------- indexing API


def test_langchain_indexing_api(embedding):
    from langchain_core.indexing import InMemoryRecordManager, index

    store = VectorDBStore(embedding)
    records = InMemoryRecordManager("vectordb")
    records.create_schema()
    docs = [Document(page_content=f"doc {i}", metadata={"source": f"s{i % 2}"}) for i in range(4)]

    def stored():
        return sorted(d.page_content for d in store.similarity_search("doc", k=20))

    def run(docs, cleanup):
        out = index(
            docs, records, store, cleanup=cleanup, source_id_key="source", key_encoder="sha256"
        )
        return out["num_added"], out["num_skipped"], out["num_deleted"]

    assert run(docs, "full") == (4, 0, 0)
    assert run(docs, "full") == (0, 4, 0)
    assert run(docs[:2], "full") == (0, 2, 2)
    assert stored() == ["doc 0", "doc 1"]
    changed = [Document(page_content="doc 0, new", metadata={"source": "s0"})]
    assert run(changed, "incremental") == (1, 0, 1)
    assert stored() == ["doc 0, new", "doc 1"]
    assert len(store.index) == 2


@pytest.mark.asyncio
async def test_langchain_async_indexing_api(embedding):
    from langchain_core.indexing import InMemoryRecordManager, aindex

    store = VectorDBStore(embedding)
    records = InMemoryRecordManager("vectordb")
    await records.acreate_schema()
    docs = [Document(page_content=f"doc {i}", metadata={"source": f"s{i}"}) for i in range(3)]
    options = {"cleanup": "full", "source_id_key": "source", "key_encoder": "sha256"}
    out = await aindex(docs, records, store, **options)
    assert (out["num_added"], out["num_deleted"]) == (3, 0)
    out = await aindex(docs[1:], records, store, **options)
    assert (out["num_skipped"], out["num_deleted"]) == (2, 1)
    found = await store.asimilarity_search("doc", k=10)
    assert sorted(d.page_content for d in found) == ["doc 1", "doc 2"]
    await store.aclose()


# --------------------------------------------------------------------------- saved files


def saved(store, path):
    store.save(path)
    return json.loads((path / "store.json").read_text())


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda info: info.pop("probes"), "probes"),
        (lambda info: info.pop("has_index"), "has_index"),
        (lambda info: info.update(probes="4"), "probes"),
        (lambda info: info.update(build_options=[]), "build_options"),
        (lambda info: info.update(metric="manhattan"), "metric"),
        (lambda info: info.update(metric="l2"), "metric"),  # the index's own is cosine
        (lambda info: info.update(has_index=False), "index"),
    ],
)
def test_load_checks_store_json(embedding, tmp_path, change, words):
    store = VectorDBStore.from_texts(["a", "b"], embedding)
    info = saved(store, tmp_path / "s")
    change(info)
    (tmp_path / "s" / "store.json").write_text(json.dumps(info))
    with pytest.raises(vdb.InvalidIndexFileError, match=words):
        VectorDBStore.load(tmp_path / "s", embedding)


def test_load_refuses_a_string_id_twice(embedding, tmp_path):
    store = VectorDBStore.from_texts(["a", "b"], embedding, ids=["a", "b"])
    store.index.upsert(store.index.get_vectors([1]), [1], [{"_text": "b", "_sid": "a"}])
    store.save(tmp_path / "s")
    with pytest.raises(vdb.InvalidIndexFileError, match=r"'a'.*twice"):
        VectorDBStore.load(tmp_path / "s", embedding)


def test_a_failed_save_leaves_the_saved_store(embedding, tmp_path, monkeypatch):
    old = VectorDBStore.from_texts(["old"], embedding, ids=["o"], metric="ip")
    old.save(tmp_path / "s")
    new = VectorDBStore.from_texts(["new"], embedding, ids=["n"])
    dumps = json.dumps

    def full_disk(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == "vectordb-text-store":
            raise OSError(28, "No space left on device")
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", full_disk)
    with pytest.raises(vdb.StorageError, match="No space"):
        new.save(tmp_path / "s")
    monkeypatch.undo()
    back = VectorDBStore.load(tmp_path / "s", embedding)
    assert back.index.metric == "ip" and [d.id for d in back.similarity_search("x")] == ["o"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(vdb.StorageError, match="not a saved"):
        new.save(tmp_path / "other")  # a directory of something else is not replaced
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
