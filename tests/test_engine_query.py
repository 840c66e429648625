"""``AsyncEngine.query`` / ``query_batch``: the vector side goes through the engine's
batched search, and the answers equal ``ClusteredIndex.query``'s."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import vectordb as vdb

WORDS = "apple banana cherry delta echo falcon grape harbor island jungle".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def built():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((800, 16)).astype(np.float32)
    docs = [{"text": " ".join(rng.choice(WORDS, 3)), "g": i % 3} for i in range(800)]
    index = vdb.ClusteredIndex.build(x, metadata=docs, text_field="text", max_leaf_size=60)
    return index, x


CASES = [
    {},
    {"text": "apple grape"},
    {"text": "harbor", "fusion": "weighted", "alpha": 0.3},
    {"filter": {"g": 1}},
    {"text": "echo delta", "filter": {"g": {"$in": [0, 2]}}, "probes": 3},
]


def test_concurrent_queries_are_batched_and_equal_the_index(built):
    index, x = built

    async def main():
        async with vdb.AsyncEngine(index, max_wait=0.05, inline=False) as engine:
            calls = [engine.query(x[i], k=7, **CASES[i % len(CASES)]) for i in range(40)]
            got = await asyncio.gather(*calls)
            return got, engine.stats()

    got, stats = asyncio.run(main())
    for i, hits in enumerate(got):
        assert hits == index.query(x[i], k=7, **CASES[i % len(CASES)])
    assert stats.queries == 40 and stats.batches < 40


def test_query_batch_equals_the_index(built):
    index, x = built
    texts = ["apple", "jungle island", "cherry"]

    async def main():
        async with vdb.AsyncEngine(index) as engine:
            both = await engine.query_batch(x[:3], texts, k=6, fusion="weighted")
            vectors = await engine.query_batch(x[:3], k=6, filter={"g": 2})
            text = await engine.query_batch(texts=texts, k=6)
            return both, vectors, text

    both, vectors, text = asyncio.run(main())
    assert both == index.query_batch(x[:3], texts, k=6, fusion="weighted")
    assert vectors == index.query_batch(x[:3], k=6, filter={"g": 2})
    assert text == index.query_batch(texts=texts, k=6)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda e, x: e.query(x[0], text=3), "text must be a str"),
        (lambda e, x: e.query(x[0], k=0), "k"),
        (lambda e, x: e.query(x[0], text="a", fusion="max"), "fusion"),
        (lambda e, x: e.query(x[0], nprobe=3), "unknown query parameters"),
        (lambda e, x: e.query_batch(x[:2], ["a"]), "2 vectors but 1 texts"),
        (lambda e, x: e.query_batch(x[:2], "ab"), "list of str"),
        (lambda e, x: e.query(None, None), "vector, a text or both"),
        (lambda e, x: e.query(x[0][:3]), "dimension"),
    ],
)
def test_bad_queries_raise_vectordb_errors(built, call, words):
    index, x = built

    async def main():
        async with vdb.AsyncEngine(index) as engine:
            with pytest.raises(vdb.VectorDBError, match=words):
                await call(engine, x)

    asyncio.run(main())


def test_a_close_waits_for_queries_in_flight(built):
    index, x = built

    async def main():
        engine = vdb.AsyncEngine(index, max_wait=0.05, inline=False)
        calls = [asyncio.ensure_future(engine.query(x[i], text="apple", k=5)) for i in range(4)]
        await asyncio.sleep(0)  # submitted: in the batcher's queue
        await engine.aclose()
        return await asyncio.gather(*calls)

    got = asyncio.run(main())
    assert got == [index.query(x[i], text="apple", k=5) for i in range(4)]


def test_a_hit_deleted_before_its_document_is_read_is_left_out(built, monkeypatch):
    _, x = built
    rng = np.random.default_rng(9)
    docs = [{"text": " ".join(rng.choice(WORDS, 3)), "g": i % 3} for i in range(300)]
    index = vdb.ClusteredIndex.build(x[:300], metadata=docs, text_field="text")
    want = index.query(x[7], text=docs[7]["text"], k=5)
    assert want[0].id == 7
    real = index._metadata.get_many

    def delete_then_read(ids):
        index.delete([7], missing_ok=True)  # lands between the search and the read
        return real(ids)

    monkeypatch.setattr(index._metadata, "get_many", delete_then_read)
    got = index.query(x[7], text=docs[7]["text"], k=5)
    assert [h.id for h in got] == [h.id for h in want[1:]]
    assert all(h.metadata is not None for h in got)


def test_a_callable_filter_runs_once_per_batch(built):
    index, x = built
    calls = []

    def keep(doc):
        calls.append(1)
        return doc["g"] == 1

    texts = ["apple", "grape", "harbor", "echo"]
    got = index.query_batch(x[:4], texts, k=5, filter=keep)
    assert all(h.metadata["g"] == 1 for hits in got for h in hits)
    assert len(calls) == 2 * len(index)  # the vector side's pass, and the text side's


def test_search_parameters_are_checked_for_text_queries_and_the_hybrid_depth_is_capped(built):
    index, x = built
    for bad in ({"probes": -5}, {"rerank_factor": "x"}, {"target_recall": 7}):
        with pytest.raises(vdb.InvalidParameterError):
            index.query(text="apple", **bad)
    big = 1 << 20  # MAX_K: the hybrid depth 4 * k is capped, not an error
    assert len(index.query(x[0], text="apple", k=big)) >= len(index.query(text="apple", k=big))
