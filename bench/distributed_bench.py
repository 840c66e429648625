"""Sharded search on a local Ray cluster versus one index (vectordb.distributed).

    python bench/distributed_bench.py --data /work/shared/data/pydocs-debian-minilm \\
        --out bench/results/2026-12-02-distributed [--repeats 3] [--num-cpus 2]

On the data set's base vectors (cosine), with its exact ground truth:

1. recall@10 of hash-sharded indexes (1, 2, 4, 8 shards) versus one index at the same
   total work (the single index probes P leaves; each of S shards, built with the same
   leaf size so it has about 1/S of the leaves, probes ceil(P/S)), and at each index's
   calibrated defaults;
2. kmeans placement, 8 shards, ``route`` 1, 2, 4, 8: recall@10 and the fraction of shards
   a query touches;
3. latency p50 of one query at a time and QPS of 256 concurrent callers, ShardedEngine on
   Ray (1, 2, 4, 8 shards, one replica each) versus AsyncEngine on the same data;
4. failover: one shard, two replicas; SIGKILL the replica that serves, and time from the
   kill to the first answer (served by the other), and to the replica's restart.

Every figure is the median of ``--repeats`` runs. Writes results.json under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import vectordb as vdb
from vectordb.distributed import ShardedEngine, build_shards, read_layout

K = 10
LEAF = 250


def recall_at_k(ids: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    hits = sum(
        len(set(row[:k].tolist()) & set(g[:k].tolist())) for row, g in zip(ids, gt, strict=True)
    )
    return hits / (k * ids.shape[0])


async def sequential_p50(search: Any, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        await search(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def concurrent_qps(search: Any, queries: np.ndarray, callers: int = 256) -> float:
    sem = asyncio.Semaphore(callers)

    async def one(q: np.ndarray) -> None:
        async with sem:
            await search(q)

    t = time.perf_counter()
    await asyncio.gather(*(one(q) for q in queries))
    return queries.shape[0] / (time.perf_counter() - t)


def med(values: list[float]) -> float:
    return float(statistics.median(values))


async def bench_recall(
    work: Path, x: np.ndarray, queries: np.ndarray, gt: np.ndarray, repeats: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"hash": {}, "kmeans": {}}
    single = vdb.ClusteredIndex.build(x, metric="cosine", max_leaf_size=LEAF, progress=False)
    out["single"] = {
        "leaves": single.n_leaves,
        "default": recall_at_k(single.search_batch(queries, K)[0], gt),
    }
    for p in (8, 16, 32, 64):
        out["single"][f"probes={p}"] = recall_at_k(single.search_batch(queries, K, p)[0], gt)
    for s in (1, 2, 4, 8):
        path = work / f"hash-{s}"
        build_shards(x, path, shards=s, metric="cosine", max_leaf_size=LEAF, progress=False)
        row: dict[str, Any] = {}
        async with await ShardedEngine.open(path, address="local-threads") as e:
            row["default"] = recall_at_k((await e.search_batch(queries, K))[0], gt)
            for p in (8, 16, 32, 64):
                ids, _ = await e.search_batch(queries, K, probes=max(1, math.ceil(p / s)))
                row[f"probes={p}"] = recall_at_k(ids, gt)
        out["hash"][s] = row
    path = work / "kmeans-8"
    build_shards(
        x, path, shards=8, metric="cosine", placement="kmeans", max_leaf_size=LEAF, progress=False
    )
    layout = read_layout(path)
    out["kmeans_counts"] = list(layout.counts)
    async with await ShardedEngine.open(path, address="local-threads") as e:
        for m in (1, 2, 4, 8):
            ids, _ = await e.search_batch(queries, K, route=m)
            out["kmeans"][m] = {"recall": recall_at_k(ids, gt), "shards_touched": m / 8}
    return out


async def bench_speed(
    work: Path, x: np.ndarray, queries: np.ndarray, repeats: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lone, many = queries[:200], np.concatenate([queries] * 2)
    path = work / "single"
    vdb.ClusteredIndex.build(
        x, metric="cosine", max_leaf_size=LEAF, progress=False, path=path
    ).close()
    async with await vdb.AsyncEngine.open(path, max_workers=2) as engine:
        await engine.search(queries[0], K)
        p50 = [await sequential_p50(lambda q: engine.search(q, K), lone) for _ in range(repeats)]
        qps = [await concurrent_qps(lambda q: engine.search(q, K), many) for _ in range(repeats)]
    out["async_engine"] = {"p50_ms": med(p50), "qps_256": med(qps)}
    for s in (1, 2, 4, 8):
        async with await ShardedEngine.open(work / f"hash-{s}", shard_timeout=120) as e:
            await e.search_batch(queries[:64], K)  # every actor compiled / loaded its kernels
            p50 = [await sequential_p50(lambda q: e.search(q, K), lone) for _ in range(repeats)]
            qps = [await concurrent_qps(lambda q: e.search(q, K), many) for _ in range(repeats)]
        out[f"ray_{s}"] = {"p50_ms": med(p50), "qps_256": med(qps)}
    return out


async def bench_failover(work: Path, queries: np.ndarray, repeats: int) -> dict[str, Any]:
    first, restart = [], []
    async with await ShardedEngine.open(
        work / "hash-1", replicas=2, shard_timeout=60, max_restarts=repeats + 1
    ) as e:
        await e.search_batch(queries[:64], K)
        for r in range(repeats):
            handles = e.actors()[0]
            pids = [await h.ping.remote() for h in handles]
            victim = pids[r % 2]
            os.kill(victim, signal.SIGKILL)
            t = time.perf_counter()
            await e.search(queries[r], K)
            one = time.perf_counter() - t
            await e.search(queries[r + 1], K)
            # Round robin: one of the two went to the victim, and was answered by the other.
            first.append(max(one, time.perf_counter() - t - one))
            while len(e.actors()[0]) < 2:
                await asyncio.sleep(0.01)
            restart.append(time.perf_counter() - t)
            await e.search_batch(queries[:64], K)
    return {"first_answer_ms": med(first) * 1e3, "restart_s": med(restart)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/pydocs-debian-minilm"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    x = np.load(args.data / "base.npy").astype(np.float32)
    queries = np.load(args.data / "queries.npy").astype(np.float32)
    gt = np.load(args.data / "gt.npy")
    results: dict[str, Any] = {"n": int(x.shape[0]), "dim": int(x.shape[1]), "k": K}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        results["recall"] = await bench_recall(work, x, queries, gt, args.repeats)
        results["build_and_recall_s"] = time.perf_counter() - t
        print(json.dumps(results["recall"], indent=1), flush=True)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
        try:
            results["speed"] = await bench_speed(work, x, queries, args.repeats)
            print(json.dumps(results["speed"], indent=1), flush=True)
            results["failover"] = await bench_failover(work, queries, args.repeats)
            print(json.dumps(results["failover"], indent=1), flush=True)
        finally:
            ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
