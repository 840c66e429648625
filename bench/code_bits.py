"""Bits a coordinate of a code against exact leaf scans: recall, speed, memory.

    OMP_NUM_THREADS=1 python bench/code_bits.py --dataset glove-50 --n 300000
    OMP_NUM_THREADS=1 python bench/code_bits.py --dataset synthetic-32 --n 200000

For each configuration (``leaf_scan="vectors"``, then codes of each ``--bits``) an index
is built over the first ``--n`` vectors and searched at its calibrated defaults: recall@10
against a brute force over those vectors, batched and one-at-a-time QPS (medians of 3),
the candidates reranked per query (batched search), the RAM held without the vectors, and
the build time. ``synthetic-D``: ``vectordb.make_clustered`` data of D dimensions (l2), the
queries held out of the same draw.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets

import vectordb as vdb
from vectordb.backends import numba_backend

K = 10


def load(name: str, n: int, nq: int) -> tuple[np.ndarray, np.ndarray, str]:
    if name.startswith("synthetic-"):
        x = vdb.make_clustered(n + nq, int(name.split("-")[1]), seed=1)
        return x[:n], x[n:], "l2"
    ds = datasets.load(name, max_queries=nq)
    return np.ascontiguousarray(ds.train[:n]), ds.queries[:nq], ds.metric


def truth(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Exact top-k rows (by blocks of queries)."""
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for s in range(0, len(q), 100):
        block = q[s : s + 100]
        d = (x * x).sum(axis=1)[None] - 2 * block @ x.T if metric == "l2" else -(block @ x.T)
        out.append(np.argpartition(d, K, axis=1)[:, :K])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="glove-50")
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--bits", default="1,2,3,4")
    args = parser.parse_args()
    x, q, metric = load(args.dataset, args.n, args.queries)
    true = truth(x, q, metric)
    reranked: list[float] = []
    original = numba_backend.NumbaSearcher.rerank

    def counting(self: Any, queries: Any, rows: Any, k: int) -> Any:
        reranked.append(float((rows >= 0).sum(axis=1).mean()))
        return original(self, queries, rows, k)

    numba_backend.NumbaSearcher.rerank = counting  # type: ignore[method-assign]
    configs: list[dict[str, Any]] = [{"leaf_scan": "vectors"}]
    configs += [{"leaf_scan": "codes", "code_bits": int(b)} for b in args.bits.split(",")]
    print(f"{args.dataset}, n={len(x):,}, d={x.shape[1]}, {len(q)} queries, one thread\n")
    header = (
        "| build | recall@10 | QPS batch | QPS single | reranked | RAM, no vectors MB | build s |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for config in configs:
        t0 = time.perf_counter()
        index = vdb.ClusteredIndex.build(x, metric=metric, **config)
        build_s = time.perf_counter() - t0
        index.search_batch(q[:20], K)
        batch, single = [], []
        for _ in range(3):
            reranked.clear()
            t0 = time.perf_counter()
            found, _ = index.search_batch(q, K)
            batch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for v in q[:300]:
                index.search(v, K)
            single.append(time.perf_counter() - t0)
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, true, strict=True)])
        ram = (index.memory_usage_bytes() - index.vector_ram_bytes) / 1e6
        label = ", ".join(f"{k}={v}" for k, v in config.items())
        rr = f"{np.mean(reranked):.1f}" if reranked else "-"
        print(
            f"| {label} | {recall:.3f} | {len(q) / np.median(batch):,.0f} | "
            f"{300 / np.median(single):,.0f} | {rr} | {ram:.1f} | {build_s:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
