"""An index grown by adds: pydocs-debian-minilm from 20,000 to 110,000 vectors.

    python bench/growth_bench.py [--data /work/shared/data/pydocs-debian-minilm] [--start 20000]

Builds on the first ``start`` vectors (shuffled, seed 0), adds the rest in batches of
1,000, and reports adds/s, recall@10 at the default search parameters against brute force
(500 of the data set's queries), the tree's leaves, the storage rows the index holds for
its live vectors (a split's moved vectors are stored again until ``compact()``), and the
recall after ``compact()``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import vectordb as vdb


def recall(index: vdb.ClusteredIndex, q: np.ndarray, truth: np.ndarray) -> float:
    ids, _ = index.search_batch(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/pydocs-debian-minilm"))
    parser.add_argument("--start", type=int, default=20_000)
    args = parser.parse_args()
    x = np.load(args.data / "base.npy").astype(np.float32)
    q = np.load(args.data / "queries.npy").astype(np.float32)[:500]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x = x[np.random.default_rng(0).permutation(len(x))]
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    index = vdb.ClusteredIndex.build(x[: args.start], metric="cosine", progress=False)
    t = time.perf_counter()
    for s in range(args.start, len(x), 1000):
        index.add(x[s : s + 1000], ids=np.arange(s, min(s + 1000, len(x))))
    rate = (len(x) - args.start) / (time.perf_counter() - t)
    state = index._state  # the tree and storage rows: no public accessor reports them
    got = recall(index, q, truth)
    print(
        f"{args.start:,} -> {len(x):,}: adds {rate:,.0f}/s, recall@10 {got:.3f},"
        f" leaves {state.tree.n_leaves}, storage rows {state.row_id.shape[0]:,}"
    )
    index.compact()
    print(f"after compact(): recall@10 {recall(index, q, truth):.3f}")


if __name__ == "__main__":
    main()
