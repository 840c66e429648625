"""A living index on 100k x 384: inserts, deletes, compaction, filtered search.

    python bench/living_bench.py [--n 100000] [--dim 384] [--batch 1000]

Reports insert throughput (vectors/s) in RAM and in mmap mode (half the data built, half
added in batches); batched search QPS and recall@10 with 30% of the vectors deleted versus
after ``compact()``; and a filter matching 1% of the vectors versus no filter. Recall is
against brute force over the live (and, for the filter, matching) vectors.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import vectordb as vdb


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact cosine top-k ids among rows ``ids`` of ``x``."""
    xn = x[ids] / np.linalg.norm(x[ids], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    return ids[np.argsort(-sims, axis=1)[:, :k]]


def qps_recall(index: vdb.ClusteredIndex, q: np.ndarray, truth: np.ndarray, **kw: object):
    index.search_batch(q[:50], 10, **kw)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        ids, _ = index.search_batch(q, 10, **kw)
        runs.append(time.perf_counter() - t)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    return len(q) / statistics.median(runs), float(rec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=1_000)
    args = parser.parse_args()
    data = vdb.make_clustered(args.n + args.queries, args.dim, seed=0)
    x, q = data[: args.n], data[args.n :]
    half = args.n // 2
    print(f"{args.n:,} x {args.dim}, cosine, k=10, default search parameters\n")
    print("| step | figure |")
    print("|---|---|")
    for mode in ("RAM", "mmap"):
        with tempfile.TemporaryDirectory() as tmp:
            index = vdb.ClusteredIndex.build(x[:half], metric="cosine")
            if mode == "mmap":
                index.use_mmap_storage(Path(tmp) / "vectors.bin")
            t = time.perf_counter()
            for start in range(half, args.n, args.batch):
                stop = min(args.n, start + args.batch)
                index.add(x[start:stop], ids=np.arange(start, stop))
            rate = (args.n - half) / (time.perf_counter() - t)
            print(f"| insert, {mode}, batches of {args.batch:,} | {rate:,.0f} vectors/s |")
            if mode == "RAM":
                single = time.perf_counter()
                for i in range(200):
                    index.upsert(x[i : i + 1], ids=[i])
                per = (time.perf_counter() - single) / 200 * 1e3
                print(f"| upsert one vector, {mode} | {per:.2f} ms each |")
                grown = index
            else:
                index.close()

    index = grown
    all_ids = np.arange(args.n)
    truth = brute(x, all_ids, q)
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, all {args.n:,} live (grown by adds) | {qps:,.0f} QPS, recall {rec:.3f} |")
    rng = np.random.default_rng(1)
    gone = rng.choice(args.n, size=int(0.3 * args.n), replace=False)
    index.delete(gone)
    live = np.setdiff1d(all_ids, gone)
    truth = brute(x, live, q)
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, 30% deleted | {qps:,.0f} QPS, recall {rec:.3f} |")
    t = time.perf_counter()
    index.compact()
    print(f"| compact() | {time.perf_counter() - t:.2f} s |")
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, after compact() | {qps:,.0f} QPS, recall {rec:.3f} |")

    meta = [{"tenant": int(i % 100)} for i in range(args.n)]
    tagged = vdb.ClusteredIndex.build(x, metadata=meta, metric="cosine")
    truth = brute(x, all_ids, q)
    qps, rec = qps_recall(tagged, q, truth)
    print(f"| search, no filter | {qps:,.0f} QPS, recall {rec:.3f} |")
    truth = brute(x, np.arange(7, args.n, 100), q)
    qps, rec = qps_recall(tagged, q, truth, filter={"tenant": 7})
    print(f"| search, filter matching 1% | {qps:,.0f} QPS, recall {rec:.3f} |")
    truth = brute(x, np.flatnonzero(np.arange(args.n) % 100 < 10), q)
    qps, rec = qps_recall(tagged, q, truth, filter={"tenant": {"$lt": 10}})
    print(f"| search, filter matching 10% | {qps:,.0f} QPS, recall {rec:.3f} |")


if __name__ == "__main__":
    main()
