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
