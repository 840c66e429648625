"""examples/chatbot_backend.py, driven in-process through an ASGI client."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chatbot_backend.py"


@pytest.fixture(scope="module")
def chatbot():
    spec = importlib.util.spec_from_file_location("chatbot_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chatbot_backend"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["chatbot_backend"]


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.asyncio
async def test_search_finds_the_memory_that_answers(chatbot):
    memories = chatbot.sample_memories(3000, seed=1)
    memories[1234] = "Zoe keeps her spare keys under the blue flowerpot"
    app = chatbot.create_app(memories)
    async with app.router.lifespan_context(app), await _client(app) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["memories"] == 3000
        got = await client.get("/search", params={"q": "where are Zoe's spare keys", "k": 3})
        assert got.status_code == 200
        results = got.json()["results"]
        assert len(results) == 3
        assert results[0]["id"] == 1234 and "flowerpot" in results[0]["text"]
        assert [r["distance"] for r in results] == sorted(r["distance"] for r in results)
        posted = await client.post("/search", json={"text": "spare keys flowerpot", "k": 1})
        assert posted.json()["results"][0]["id"] == 1234


@pytest.mark.asyncio
async def test_concurrent_requests_are_batched_and_match_direct_search(chatbot):
    memories = chatbot.sample_memories(2000, seed=2)
    embed = chatbot.HashingEmbedder()
    app = chatbot.create_app(memories, engine_options={"max_wait": 0.02})
    questions = [f"who is travelling to Oslo on {d}" for d in ("Monday", "Friday")] * 20
    import asyncio

    async with app.router.lifespan_context(app), await _client(app) as client:
        replies = await asyncio.gather(
            *(client.get("/search", params={"q": q, "k": 5}) for q in questions)
        )
        stats = (await client.get("/health")).json()
    assert stats["queries"] == len(questions) and stats["mean_batch_size"] > 1
    import vectordb as vdb

    index = vdb.ClusteredIndex.build(embed(memories), metric="cosine", max_leaf_size=500)
    for q, reply in zip(questions, replies, strict=True):
        want, _ = index.search(embed([q])[0], 5)
        assert [r["id"] for r in reply.json()["results"]] == want.tolist()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("get", {"params": {"k": 3}}, "'q'"),
        ("get", {"params": {"q": "x", "k": "many"}}, "integer"),
        ("get", {"params": {"q": "x", "k": 0}}, "between"),
        ("post", {"content": b"not json"}, "JSON"),
        ("post", {"json": [1, 2]}, "object"),
    ],
)
async def test_bad_requests_get_400(chatbot, method, kwargs, message):
    app = chatbot.create_app(chatbot.sample_memories(200))
    async with app.router.lifespan_context(app), await _client(app) as client:
        reply = await getattr(client, method)("/search", **kwargs)
    assert reply.status_code == 400 and message in reply.json()["error"]


def test_hashing_embedder_is_deterministic_and_unit_length(chatbot):
    embed = chatbot.HashingEmbedder(64)
    a = embed(["Hello world", "", "hello WORLD"])
    assert a.shape == (3, 64) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a[0], a[2])


@pytest.mark.asyncio
async def test_memories_added_over_http_survive_a_restart(chatbot, tmp_path):
    path = tmp_path / "memories"
    app = chatbot.create_app(chatbot.sample_memories(300, seed=3), path=path)
    async with app.router.lifespan_context(app), await _client(app) as client:
        added = await client.post("/memories", json={"text": "Zoe parks on level three"})
        assert added.status_code == 201 and added.json()["ids"] == [300]
        many = await client.post("/memories", json={"texts": ["Yuri likes opera", "Xia runs"]})
        assert many.json()["ids"] == [301, 302]
        bad = await client.post("/memories", json={"text": ""})
        assert bad.status_code == 400
    # A new server on the same directory: the adds were durable when the requests returned.
    again = chatbot.create_app(path=path)
    async with again.router.lifespan_context(again), await _client(again) as client:
        assert (await client.get("/health")).json()["memories"] == 303
        got = await client.get("/search", params={"q": "where does Zoe park", "k": 1})
        assert got.json()["results"][0]["text"] == "Zoe parks on level three"


@pytest.mark.asyncio
async def test_a_server_may_start_with_no_memories_at_all(chatbot, tmp_path):
    app = chatbot.create_app(path=tmp_path / "fresh")
    async with app.router.lifespan_context(app), await _client(app) as client:
        assert (await client.get("/health")).json()["memories"] == 0
        assert (await client.get("/search", params={"q": "anything"})).json()["results"] == []
        await client.post("/memories", json={"text": "Ivo is vegetarian"})
        got = await client.get("/search", params={"q": "is Ivo vegetarian", "k": 1})
        assert got.json()["results"][0]["text"] == "Ivo is vegetarian"
    with pytest.raises(ValueError, match="give memories"):
        chatbot.create_app()  # neither: nothing to serve
