"""What keeps filtered and text queries cheap, checked against the uncached, unpruned paths.

Dict filters' matches are cached (``vectordb.storage.filtercache``) until the documents
change: answers equal a brute force in Python after every kind of write, a rolled-back
write, a readonly index's refresh, and while a writer and searching threads run at once.
Text queries leave out common words (``vectordb.storage.commonwords``): they never return
a document that holds none of the query's words, and rank as the full query does where the
words left out are common.
"""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage import commonwords
from vectordb.storage.filtercache import FilterCache, filter_key
from vectordb.storage.fulltext import match_query
from vectordb.storage.metadata import MetadataStore

FILTERS = [
    {"g": 1},
    {"g": {"$in": [0, 2]}},
    {"g": {"$in": [0, 2]}, "i": {"$lt": 100}},
    {"i": {"$gte": 50, "$lt": 60}},
    {"missing": None},
    {"g": {"$nin": [1]}},
]


def brute(docs: dict[int, dict], filt: dict) -> list[int]:
    def ok(d: dict) -> bool:
        for field, cond in filt.items():
            v = d.get(field)
            if not isinstance(cond, dict):
                if v != cond:
                    return False
                continue
            for op, want in cond.items():
                if op == "$nin":
                    held = v not in want
                elif op == "$in":
                    held = v in want
                elif op == "$lt":
                    held = v is not None and v < want
                else:
                    held = v is not None and v >= want
                if not held:
                    return False
        return True

    return sorted(i for i, d in docs.items() if ok(d))


def store_of(docs: dict[int, dict]) -> MetadataStore:
    store = MetadataStore()
    ids = np.array(sorted(docs), dtype=np.int64)
    store.put(ids, MetadataStore.encode([docs[i] for i in ids]))
    return store


def docs_of(n: int) -> dict[int, dict]:
    return {i: {"g": i % 3, "i": i} for i in range(n)}


def test_cached_matches_equal_brute_force_and_are_read_only():
    docs = docs_of(300)
    store = store_of(docs)
    for filt in FILTERS:
        first = store.matching(filt)
        again = store.matching(filt)
        assert again is first  # cached
        assert sorted(first.tolist()) == brute(docs, filt)
        with pytest.raises(ValueError):
            first[0] = -1


def test_a_write_between_two_queries_invalidates():
    docs = docs_of(300)
    store = store_of(docs)
    for filt in FILTERS:
        store.matching(filt)
    version = store.version
    docs[5] = {"g": 1, "i": 5}  # changed
    store.put(np.array([5]), MetadataStore.encode([docs[5]]))
    del docs[7]
    store.delete(np.array([7]))
    docs[400] = {"g": 2, "i": 55}
    store.put(np.array([400]), MetadataStore.encode([docs[400]]))
    store.put(np.array([8]), [None])  # cleared
    del docs[8]
    assert store.version == version + 4
    for filt in FILTERS:
        assert sorted(store.matching(filt).tolist()) == brute(docs, filt)
    store.delete(np.array([12345]))  # no change: the cache stays
    kept = store.matching(FILTERS[0])
    assert store.matching(FILTERS[0]) is kept


def test_a_rolled_back_write_keeps_the_cache_right():
    docs = docs_of(100)
    store = store_of(docs)
    store.enable_text("text")
    cached = store.matching({"g": 1})
    with pytest.raises(ValueError):  # ids and documents of different lengths: rolled back
        store.put(np.array([1, 2]), MetadataStore.encode([{"g": 0}]))
    assert store.matching({"g": 1}) is cached
    assert sorted(cached.tolist()) == brute(docs, {"g": 1})


def test_equal_filters_share_one_entry_and_the_cache_is_bounded():
    store = store_of(docs_of(50))
    a = store.matching({"g": {"$in": [True, 2]}})
    assert store.matching({"g": {"$in": [1, 2]}}) is a  # bool is 1 in SQLite, as compiled
    assert store.matching({"g": {"$in": ["1", 2]}}) is not a  # a string is not
    cache = FilterCache(max_entries=2, max_bytes=100)
    for i in range(4):
        cache.put(filter_key("x", [i]), 0, np.arange(5, dtype=np.int64))
    assert len(cache) == 2 and cache.nbytes == 80
    assert cache.get(filter_key("x", [0]), 0) is None
    assert cache.get(filter_key("x", [3]), 0) is not None
    cache.put(filter_key("big", []), 0, np.arange(20, dtype=np.int64))  # > max_bytes
    assert cache.get(filter_key("big", []), 0) is None
    assert cache.get(filter_key("x", [3]), 1) is None and len(cache) == 0  # newer version


def test_callable_filters_are_not_cached():
    docs = docs_of(60)
    store = store_of(docs)
    flag = {"g": 1}
    pick = lambda d: d["g"] == flag["g"]  # noqa: E731
    assert sorted(store.matching(pick).tolist()) == brute(docs, {"g": 1})
    flag["g"] = 2  # the same callable now means another thing
    assert sorted(store.matching(pick).tolist()) == brute(docs, {"g": 2})


def test_filtered_search_sees_every_write(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    docs = docs_of(400)
    index = vdb.ClusteredIndex.build(x, metadata=[docs[i] for i in range(400)], max_leaf_size=50)
    filt = {"g": 1}

    def check() -> None:
        assert index.ids_matching(filt).tolist() == brute(docs, filt)
        ids, _ = index.search(x[0], 400, filter=filt, rerank_factor=1, probes=10_000)
        assert sorted(ids[ids >= 0].tolist()) == brute(docs, filt)

    check()
    docs[3] = {"g": 1, "i": 3}
    index.upsert(x[3:4], ids=[3], metadata=[docs[3]])
    check()
    index.delete([4])
    del docs[4]
    check()
    docs[500] = {"g": 1, "i": 500}
    index.add(x[5:6], ids=[500], metadata=[docs[500]])
    check()


def test_a_readonly_index_refreshed_sees_the_writers_changes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    docs = docs_of(200)
    vdb.ClusteredIndex.build(x, metadata=[docs[i] for i in range(200)]).save(tmp_path / "ix")
    filt = {"g": 0}
    with (
        vdb.ClusteredIndex.open(tmp_path / "ix") as writer,
        vdb.ClusteredIndex.open(tmp_path / "ix", readonly=True) as reader,
    ):
        assert reader.ids_matching(filt).tolist() == brute(docs, filt)
        docs[1] = {"g": 0, "i": 1}
        writer.upsert(x[1:2], ids=[1], metadata=[docs[1]])  # logged
        assert reader.refresh() == 1
        assert reader.ids_matching(filt).tolist() == brute(docs, filt)
        docs[2] = {"g": 0, "i": 2}
        writer.upsert(x[2:3], ids=[2], metadata=[docs[2]])
        writer.checkpoint()  # read in full: a new store
        reader.refresh()
        assert reader.ids_matching(filt).tolist() == brute(docs, filt)


def test_searching_threads_beside_a_writer_see_whole_writes():
    n = 500
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    index = vdb.ClusteredIndex.build(x, metadata=[{"v": 0} for _ in range(n)], max_leaf_size=50)
    ids = np.arange(n)
    stop = threading.Event()
    bad: list[str] = []

    def search() -> None:
        while not stop.is_set():
            for v in range(4):
                got = index.ids_matching({"v": v}).size  # one put changes all: all or none
                found, _ = index.search(x[0], 5, filter={"v": v})
                hits = int((found >= 0).sum())
                if got not in (0, n) or hits not in (0, 5):
                    bad.append(f"v={v}: {got} matches, {hits} hits")

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for step in range(1, 40):
            index.upsert(x, ids=ids, metadata=[{"v": step % 4}] * n)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, bad[:3]
    assert index.ids_matching({"v": 39 % 4}).size == n
    assert index.ids_matching({"v": 1}).size == (n if 39 % 4 == 1 else 0)


# --------------------------------------------------------------------------- text


def full_bm25(texts: list[str], query: str) -> list[tuple[int, float]]:
    """The unpruned ranking: every word of the query, on a plain FTS5 table."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='porter unicode61')")
    db.executemany("INSERT INTO t (rowid, body) VALUES (?, ?)", list(enumerate(texts)))
    rows = db.execute(
        "SELECT rowid, bm25(t) FROM t WHERE t MATCH ? ORDER BY bm25(t), rowid",
        (match_query(query),),
    ).fetchall()
    return [(r, -s) for r, s in rows]


@pytest.fixture
def pruning(monkeypatch):
    monkeypatch.setattr(commonwords, "MIN_COMMON_DOCS", 100)  # a small corpus, pruned


def text_corpus(n: int = 400, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    rare = [f"rare{i}" for i in range(40)]
    common = ["is", "a", "for", "of"]
    out = []
    for _ in range(n):
        # every word common is in more than half the documents: BM25 clamps its IDF to ~0
        words = ["The", "libraries"]
        words += list(rng.choice(common, 3, replace=False))
        words += list(rng.choice(rare, int(rng.integers(1, 3))))
        out.append(" ".join(rng.permutation(words)))
    return out


def text_store(texts: list[str]) -> MetadataStore:
    store = store_of({i: {"text": t} for i, t in enumerate(texts)})
    store.enable_text("text")
    return store


def test_common_words_left_out_rank_as_the_full_query(pruning):
    texts = text_corpus()
    store = text_store(texts)
    for query in ["the rare3 library", "The LIBRARIES rare7 rare11", "rare5 the"]:
        ids, scores = store.text_search(query, 10)
        full = full_bm25(texts, query)
        np.testing.assert_allclose(scores, [s for _, s in full[:10]], rtol=1e-4)
        # ties in BM25 come in any order: the same documents above the last score
        last = scores[-1] * (1 + 1e-4)
        assert {i for i, s in zip(ids, scores, strict=True) if s > last} == {
            i for i, s in full if s > last
        }


def test_common_words_rank_what_the_rare_words_find(pruning):
    rng = np.random.default_rng(8)
    texts = []
    for i in range(600):  # "alpha" in ~30%, "beta" in ~25% (1 or 2 times): common, not clamped
        words = [f"w{int(x)}" for x in rng.integers(0, 3000, 5)]
        words += ["alpha"] * (rng.random() < 0.3)
        words += ["beta"] * (int(rng.integers(1, 3)) if rng.random() < 0.25 else 0)
        words += [f"rare{i % 40}"] if i % 3 == 0 else []
        texts.append(" ".join(rng.permutation(words)))
    store = text_store(texts)
    kinds = set()
    for query in ["alpha rare3", "beta alpha rare7 rare11", "rare5 beta"]:
        ids, scores = store.text_search(query, 50)
        rare = {w for w in query.split() if w.startswith("rare")}
        full = [(i, sc) for i, sc in full_bm25(texts, query) if rare & set(texts[i].split())]
        assert sorted(ids.tolist()) == sorted(i for i, _ in full[:50])
        want = dict(full)
        np.testing.assert_allclose(scores, [want[i] for i in ids.tolist()], rtol=1e-6)
        assert list(scores) == sorted(scores, reverse=True)
        kinds |= {bool({"alpha", "beta"} & set(texts[i].split())) for i in ids.tolist()}
    assert kinds == {True, False}  # found with a common word and without one


def test_pruned_text_never_returns_a_document_without_a_query_word(pruning):
    texts = text_corpus()
    store = text_store(texts)
    for query in ["the is a rare1", "of for rare39 zzz", "is a for of"]:
        ids, _ = store.text_search(query, 1000)
        words = {w.lower() for w in query.split()}
        assert ids.size
        for i in ids.tolist():
            assert words & {w.lower() for w in texts[i].split()}, (query, texts[i])


def test_a_query_of_common_words_only_searches_the_rarest(pruning):
    texts = text_corpus()
    store = text_store(texts)
    ids, _ = store.text_search("the is of", 1000)  # "the" in all, "is" and "of" in fewer
    df = {w: sum(w in t.split() for t in texts) for w in ("is", "of")}
    rarest = min(df, key=df.__getitem__)
    assert sorted(ids.tolist()) == [i for i, t in enumerate(texts) if rarest in t.split()]


def test_stems_are_the_index_tokenizers(pruning):
    texts = ["running dogs"] * 150 + ["ran cats"] * 5  # "running" -> "run", in 150 of 155
    store = text_store(texts)
    ids, _ = store.text_search("Runs CAT", 100)  # "run" common: only "cat" is searched
    assert sorted(ids.tolist()) == list(range(150, 155))
    ids, _ = store.text_search("runner_runs", 100)  # one phrase of two tokens: rarest "runner"
    assert ids.size == 0
    assert store.text_search("the", 5)[0].size == 0  # in no document


def test_small_indexes_are_never_pruned():
    texts = text_corpus(200)
    store = text_store(texts)  # fewer than MIN_COMMON_DOCS documents
    ids, _ = store.text_search("the is rare2", 500)
    assert sorted(ids.tolist()) == sorted(i for i, _ in full_bm25(texts, "the is rare2"))


@pytest.mark.parametrize("g", [{"$in": [0, 2]}, 1])
def test_repeated_filtered_searches_equal_the_uncached_path(g):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    docs = docs_of(3000)
    index = vdb.ClusteredIndex.build(x, metadata=[docs[i] for i in range(3000)], max_leaf_size=100)
    want = {"$in": lambda v: v in g["$in"]} if isinstance(g, dict) else None
    uncached = (lambda d: want["$in"](d["g"])) if want else (lambda d: d["g"] == g)
    for q in x[:5]:
        first = index.search(q, 10, filter={"g": g})
        again = index.search(q, 10, filter={"g": g})  # cached matches, remembered rows
        called = index.search(q, 10, filter=uncached)  # a callable: never cached
        for got in (again, called):
            np.testing.assert_array_equal(got[0], first[0])
            np.testing.assert_array_equal(got[1], first[1])
