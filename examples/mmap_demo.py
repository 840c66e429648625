"""Memory-mapped vectors: RAM saved, and what it costs in latency.

Builds a ClusteredIndex over 100,000 x 768 synthetic embeddings, measures single-query
latency with the vectors in RAM, moves them to a memory-mapped file, and measures again
with the file's pages evicted before every query (cold) and resident (warm). Prints recall@10
against brute force, memory held by the index, and the latency ratios.

    python examples/mmap_demo.py [--n 100000] [--dim 768] [--queries 300]
"""

from __future__ import annotations

import os

# One BLAS thread: the latencies below are for one query on one core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import vectordb as vdb  # noqa: E402


def brute_force_top_k(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact squared-L2 top-k ids, ``(nq, k)``, in blocks of queries."""
    x_sq = np.einsum("nd,nd->n", x, x)
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], 100):
        d = x_sq[None, :] - 2.0 * (q[s : s + 100] @ x.T)
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1)
        out[s : s + 100] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def median_ms(index: vdb.ClusteredIndex, queries: np.ndarray, before=None) -> float:
    times = []
    for q in queries:
        if before is not None:
            before()
        t0 = time.perf_counter()
        index.search(q, k=10, probes=4, rerank_factor=5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=300, help="timed queries per mode")
    args = parser.parse_args()

    data = vdb.make_clustered(args.n + 1000, args.dim, seed=0)
    vectors, queries = data[: args.n], data[args.n :]
    print(f"data: {args.n:,} x {args.dim} float32 ({vectors.nbytes / 1e6:.0f} MB), seeded")

    t0 = time.perf_counter()
    index = vdb.ClusteredIndex.build(vectors, branching_factor=10, max_leaf_size=1000, seed=0)
    build_s = time.perf_counter() - t0
    print(f"build: {build_s:.1f} s  ({index})")

    truth = brute_force_top_k(vectors, queries, 10)
    ids, _ = index.search_batch(queries, k=10, probes=4, rerank_factor=5)
    recall = recall_at_k(ids, truth)
    print(f"recall@10 (probes=4, rerank_factor=5, {len(queries)} queries): {recall:.3f}")

    timed = queries[: args.queries]
    median_ms(index, timed[:20])  # warm-up
    ram_bytes = index.memory_usage_bytes()
    ram_ms = median_ms(index, timed)
    print(f"in-memory: {ram_bytes / 1e6:.1f} MB held, median latency {ram_ms:.3f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.bin"
        index.use_mmap_storage(path)
        mmap_bytes = index.memory_usage_bytes()
        ids_mmap, _ = index.search_batch(queries, k=10, probes=4, rerank_factor=5)
        same = bool(np.array_equal(ids, ids_mmap))
        cold_ms = median_ms(index, timed, before=index.drop_cache)
        median_ms(index, timed)  # page the touched rows back in
        warm_ms = median_ms(index, timed)
        saved = 1.0 - mmap_bytes / ram_bytes
        print(
            f"mmap:      {mmap_bytes / 1e6:.1f} MB held ({saved:.1%} less), "
            f"results identical to in-memory: {same}"
        )
        print(f"mmap cold: median latency {cold_ms:.3f} ms  ({cold_ms / ram_ms:.2f}x in-memory)")
        print(f"mmap warm: median latency {warm_ms:.3f} ms  ({warm_ms / ram_ms:.2f}x in-memory)")
        index.close()


if __name__ == "__main__":
    main()
