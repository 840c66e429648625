"""Async engine throughput and event-loop lag, against calling the index directly.

    python bench/async_bench.py [--n 100000] [--dim 768] [--queries 2048] [--mmap]

In one run on one index: QPS of N concurrent ``await engine.search`` callers (N = 1, 16,
256) versus the same queries through ``index.search`` one by one; and the event loop's lag
(how late a 1 ms heartbeat wakes up: p99 and max) while the engine serves N = 256 callers,
versus calling ``index.search`` directly on the loop. Each figure is the median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import vectordb as vdb


class Heartbeat:
    """Sleeps 1 ms at a time and records how late each wake-up is."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.001)
            self.lags.append(loop.time() - t - 0.001)

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> dict[str, float]:
        lags = np.array(self.lags or [0.0]) * 1e3
        return {"lag_p99_ms": float(np.percentile(lags, 99)), "lag_max_ms": float(lags.max())}


async def direct(index: vdb.ClusteredIndex, queries: np.ndarray, k: int) -> dict[str, float]:
    """index.search on the loop itself, yielding between queries (the naive async app)."""
    beat = Heartbeat()
    task = asyncio.ensure_future(beat.run())
    await asyncio.sleep(0.01)
    t = time.perf_counter()
    for q in queries:
        index.search(q, k)
        await asyncio.sleep(0)
    seconds = time.perf_counter() - t
    beat.stop()
    await task
    return {"qps": len(queries) / seconds, **beat.summary()}


async def served(
    engine: vdb.AsyncEngine, queries: np.ndarray, k: int, callers: int
) -> dict[str, float]:
    """``callers`` coroutines share the queries, each awaiting engine.search in turn."""
    beat = Heartbeat()
    task = asyncio.ensure_future(beat.run())
    await asyncio.sleep(0.01)
    shares = np.array_split(np.arange(len(queries)), callers)

    async def caller(rows: np.ndarray) -> None:
        for i in rows:
            await engine.search(queries[i], k)

    t = time.perf_counter()
    await asyncio.gather(*(caller(rows) for rows in shares))
    seconds = time.perf_counter() - t
    beat.stop()
    await task
    return {"qps": len(queries) / seconds, **beat.summary()}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    data = vdb.make_clustered(args.n + args.queries, args.dim, seed=0)
    vectors, queries = data[: args.n], data[args.n :]
    index = vdb.ClusteredIndex.build(vectors, seed=0)
    tmp = tempfile.TemporaryDirectory()
    if args.mmap:
        index.use_mmap_storage(Path(tmp.name) / "vectors.bin")
    index.search_batch(queries, 10)  # warm pages and caches for both sides alike
    results: dict[str, object] = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "mmap": args.mmap,
        "max_workers": args.workers,
    }
    results["direct"] = median_of([await direct(index, queries, 10) for _ in range(args.repeats)])
    async with vdb.AsyncEngine(index, max_workers=args.workers) as engine:
        for callers in (1, 16, 256):
            runs = [await served(engine, queries, 10, callers) for _ in range(args.repeats)]
            results[f"engine_{callers}"] = median_of(runs)
        results["engine_stats"] = engine.stats().__dict__
    index.close()
    tmp.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mmap", action="store_true", help="vectors memory-mapped (warm)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    base = results["direct"]
    assert isinstance(base, dict)
    print(
        f"{args.n:,} x {args.dim}, {args.queries} queries, k=10, "
        f"{'mmap (warm)' if args.mmap else 'RAM'}, engine max_workers={args.workers}; "
        f"medians of {args.repeats} runs\n"
    )
    print("| how | QPS | vs index.search one by one | loop lag p99 ms | loop lag max ms |")
    print("|---|---|---|---|---|")
    rows = [("index.search on the loop, one by one", base)]
    rows += [(f"{c} concurrent await engine.search", results[f"engine_{c}"]) for c in (1, 16, 256)]
    for name, r in rows:
        assert isinstance(r, dict)
        print(
            f"| {name} | {r['qps']:,.0f} | {r['qps'] / base['qps']:.2f}x "
            f"| {r['lag_p99_ms']:.2f} | {r['lag_max_ms']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
