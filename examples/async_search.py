"""Thousands of concurrent ``await engine.search`` calls, as a busy chatbot backend makes.

    python examples/async_search.py [--n 100000] [--dim 384] [--callers 2000]

Builds an index over synthetic embeddings, memory-maps its vectors, saves it, opens it with
``AsyncEngine.open``, then fires ``--callers`` concurrent searches and prints throughput,
latency and how the engine batched them.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

import vectordb as vdb


async def run(args: argparse.Namespace) -> None:
    data = vdb.make_clustered(args.n + args.callers, args.dim, seed=0)
    vectors, queries = data[: args.n], data[args.n :]
    with tempfile.TemporaryDirectory() as tmp:
        vdb.ClusteredIndex.build(vectors, metric="cosine").save(Path(tmp) / "index")
        async with await vdb.AsyncEngine.open(Path(tmp) / "index", mmap=True) as engine:
            warmed = await engine.warm()
            print(f"opened {engine.index!r}; paged in {warmed / 1e6:.0f} MB")
            latencies: list[float] = []

            async def ask(q: np.ndarray) -> None:
                t = time.perf_counter()
                await engine.search(q, k=10)
                latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(ask(q) for q in queries))
            seconds = time.perf_counter() - t0
            stats = engine.stats()
    lat = np.array(latencies) * 1e3
    print(
        f"{args.callers} concurrent searches in {seconds:.2f} s: {args.callers / seconds:,.0f} QPS"
    )
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"latency per call: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"engine: {stats.batches} batches, {stats.mean_batch_size:.1f} queries per batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--callers", type=int, default=2000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
