"""``query`` / ``query_batch``: hits that carry their documents, by vector and by text.

Vector hits are compared with ``search`` (and brute force), text hits with a BM25 ranking
that SQLite computes directly on a table of its own; the documents of a whole answer are
read in one query of the metadata store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage.fulltext import MAX_QUERY_TOKENS, match_query
from vectordb.storage.metadata import MetadataStore

WORDS = "apple banana cherry delta echo falcon grape harbor island jungle kettle lemon".split()  # noqa: SIM905


def corpus(n: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    docs = [
        {"text": " ".join(rng.choice(WORDS, int(rng.integers(2, 8)))), "g": i % 3, "i": i}
        for i in range(n)
    ]
    return x, docs


@pytest.fixture(scope="module")
def built() -> tuple[vdb.ClusteredIndex, np.ndarray, list[dict]]:
    x, docs = corpus(600)
    index = vdb.ClusteredIndex.build(x, metadata=docs, text_field="text", max_leaf_size=60)
    return index, x, docs


def reference_bm25(docs: list[dict], query: str, k: int, keep=lambda d: True) -> list[int]:
    """SQLite's own BM25 over a plain FTS5 table holding the same texts."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='porter unicode61')")
    db.executemany("INSERT INTO t (rowid, body) VALUES (?, ?)", [(d["i"], d["text"]) for d in docs])
    rows = db.execute(
        "SELECT rowid, bm25(t) FROM t WHERE t MATCH ? ORDER BY bm25(t)", (match_query(query),)
    ).fetchall()
    return [r for r, _ in rows if keep(docs[r])][:k], {r: -s for r, s in rows}


def test_hit_is_a_small_immutable_record():
    hit = vdb.Hit(3, 0.5, -0.5, {"a": 1})
    assert not hasattr(hit, "__dict__")  # slots
    with pytest.raises(dataclasses.FrozenInstanceError):
        hit.id = 4  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(hit)] == ["id", "distance", "score", "metadata"]


def test_vector_query_is_search_with_the_documents(built):
    index, x, docs = built
    ids, dists = index.search(x[5], 10)
    hits = index.query(x[5], k=10)
    assert [h.id for h in hits] == ids.tolist()
    assert [h.distance for h in hits] == pytest.approx(dists.tolist())
    assert [h.score for h in hits] == pytest.approx((-dists).tolist())
    assert [h.metadata for h in hits] == [docs[i] for i in ids]
    assert hits[0].id == 5 and hits[0].score == 0.0


def test_text_query_ranks_like_sqlite_bm25(built):
    index, _, docs = built
    for q in ["apple", "banana kettle", "Lemons harbor ISLAND"]:
        hits = index.query(text=q, k=15)
        want, scores = reference_bm25(docs, q, 15)
        assert [h.score for h in hits] == pytest.approx([scores[i] for i in want])
        # ties in BM25 may come in any order: compare the scores, then the sets per score
        assert {h.id for h in hits if h.score > hits[-1].score} <= set(want)
        assert all(h.distance is None and h.metadata == docs[h.id] for h in hits)


def test_text_query_with_filters_only_returns_matching_ids(built):
    index, _, docs = built
    hits = index.query(text="apple cherry", k=20, filter={"g": 1})
    want, scores = reference_bm25(docs, "apple cherry", 20, keep=lambda d: d["g"] == 1)
    assert hits and all(h.metadata["g"] == 1 for h in hits)
    assert [h.score for h in hits] == pytest.approx([scores[i] for i in want])
    called = index.query(text="apple cherry", k=20, filter=lambda d: d["g"] == 1)
    assert [h.id for h in called] == [h.id for h in hits]


def test_hostile_text_is_words_not_syntax(built):
    index, _, _ = built
    for text in ['"', 'apple" OR', "NEAR(apple banana", "apple*", "-apple", "^x", "AND OR NOT"]:
        assert isinstance(index.query(text=text, k=5), list)
    assert index.query(text="  ()*:^ ", k=5) == []
    assert index.query(text="", k=5) == []
    huge = " ".join(["apple"] * 200_000 + [f"w{i}" for i in range(10_000)])
    assert index.query(text=huge, k=3)
    assert match_query(huge).count(" OR ") == MAX_QUERY_TOKENS - 1
    for bad in [b"apple", 3, None, ["apple"]]:
        with pytest.raises(vdb.InvalidParameterError):
            index.query_batch(texts=[bad], k=3)


def test_bad_arguments_raise_vectordb_errors(built):
    index, x, _ = built
    with pytest.raises(vdb.InvalidParameterError):
        index.query(k=3)
    with pytest.raises(vdb.InvalidParameterError):
        index.query(x[0], text=5)
    with pytest.raises(vdb.InvalidParameterError):
        index.query(x[0], k=3, fusion="max")
    with pytest.raises(vdb.InvalidParameterError):
        index.query(x[0], text="apple", alpha=1.5, fusion="weighted")
    with pytest.raises(vdb.InvalidParameterError):
        index.query(x[0], k=3, nprobe=3)
    with pytest.raises(vdb.InvalidParameterError):
        index.query_batch(x[:2], texts=["a"], k=3)
    plain = vdb.ClusteredIndex.build(x[:50])
    with pytest.raises(vdb.InvalidParameterError, match="text_field"):
        plain.query(text="apple")
    for field in ["", "a b", 'x"', "1a", 3]:
        with pytest.raises(vdb.InvalidParameterError):
            vdb.ClusteredIndex.build(x[:50], text_field=field)


def test_a_batch_reads_its_documents_in_one_round_trip(built, monkeypatch):
    index, x, docs = built
    calls = []
    real = MetadataStore.get_many
    monkeypatch.setattr(
        MetadataStore, "get_many", lambda self, ids: calls.append(1) or real(self, ids)
    )
    monkeypatch.setattr(MetadataStore, "get", lambda *a: pytest.fail("one document at a time"))
    out = index.query_batch(x[:7], texts=["apple"] * 7, k=10)
    assert len(calls) == 1 and len(out) == 7 and all(len(h) == 10 for h in out)
    assert all(h.metadata == docs[h.id] for hits in out for h in hits)


def test_get_many_keeps_order_and_missing_ids():
    store = MetadataStore()
    store.put(np.array([1, 2, 3]), ['{"a":1}', None, '{"a":3}'])
    assert store.get_many([3, 2, 99, 1, 3]) == [{"a": 3}, None, None, {"a": 1}, {"a": 3}]
    assert store.get_many([]) == []


def test_fewer_hits_than_k_when_fewer_match(built):
    index, x, _ = built
    assert len(index.query(x[0], k=10, filter={"i": 4})) == 1
    assert index.query(text="zebra", k=10) == []


def test_engine_query_and_query_batch(built):
    index, x, _ = built

    async def main():
        async with vdb.AsyncEngine(index) as engine:
            one = await engine.query(x[3], text="apple", k=5)
            many = await engine.query_batch(texts=["apple", "lemon"], k=5)
        return one, many

    one, many = asyncio.run(main())
    assert one == index.query(x[3], text="apple", k=5)
    assert many == index.query_batch(texts=["apple", "lemon"], k=5)
