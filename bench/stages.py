"""Where a search's time goes, stage by stage: one query at a time, and a batch.

    OMP_NUM_THREADS=1 python bench/stages.py [--dataset pydocs-minilm] [--probes 48]
        [--index PATH] [--out FILE.md]

One query: ``index.search`` end to end, then each stage alone on the same queries (the
rotation, the one compiled call of the numba backend, and inside it routing, quantisation
and pair terms, the code scan, the bound cut, the rerank); "Python" is what is left of the
total (validation, preparation, ids). A batch: each stage over all the queries, per query.
Medians over the data set's queries (one query) or of 5 runs (batch). The index is built
with the defaults (or opened from ``--index``) on the numba backend, vectors in RAM.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets

import vectordb as vdb
from vectordb.backends import numba_kernels
from vectordb.backends.numba_backend import _rerank, quantize
from vectordb.core.metrics import prepare
from vectordb.core.topk import NO_KEY
from vectordb.search.candidates import candidate_width
from vectordb.search.pipeline import SearchRequest
from vectordb.search.route import nearest_first, route_for

K = 10


def median_us(fn: Callable[[int], Any], n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def per_query_us(fn: Callable[[], Any], nq: int, repeats: int = 5) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / nq * 1e6, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pydocs-minilm")
    parser.add_argument("--probes", type=int, default=48)
    parser.add_argument("--index", type=Path, help="a saved index of the data set")
    parser.add_argument("--out", type=Path, help="write the tables here too (Markdown)")
    args = parser.parse_args()
    ds = datasets.load(args.dataset, max_queries=1000)
    if args.index:
        index = vdb.ClusteredIndex.open(args.index, mmap=False, backend="numba")
    else:
        index = vdb.ClusteredIndex.build(ds.train, metric=ds.metric, backend="numba")
    st = index._state
    searcher, selector = st.searcher, st.searcher.selector
    probes, qs = args.probes, np.asarray(ds.queries, dtype=np.float32)
    if not searcher._flat or probes >= st.tree.n_leaves or len(selector.parts) != 1:
        raise SystemExit("the one-call path needs a flat tree, one part and probes < leaves")
    nq = len(qs)
    q = prepare(qs, st.metric)
    rotated = st.quantizer.rotate(q)
    request = SearchRequest(
        k=K,
        probes=probes,
        candidates=10 * K,
        need=K,
        row_ok=None,
        live_sizes=st.live_sizes,
        bounded=True,
    )
    for i in range(min(nq, 300)):  # warm caches and compiled kernels
        index.search(qs[i], K, probes)
    one = [slice(i, i + 1) for i in range(nq)]
    leaves = [searcher.route(rotated[s], request) for s in one]
    width = candidate_width(10 * K, probes, selector.longest)
    part = selector.parts[0]
    no_rows, all_ok = np.empty(0, np.int64), np.empty(0, np.bool_)

    def scan(i: int) -> None:
        s = one[i]
        qc = quantize(rotated[s], selector.table.origin, selector.table.code_bits)
        p, r_q = selector._pair_terms(rotated[s], leaves[i])
        heap = np.full((1, width), NO_KEY, np.uint64)
        radius = np.zeros((1, width), np.float32)
        rows = no_rows if part.rows is None else part.rows
        numba_kernels.scan_codes(
            *(qc.planes, qc.lo, qc.delta, qc.total, qc.slack, p, r_q, leaves[i]),
            *(part.offsets, part.codes, part.factors, rows, all_ok, selector.longest),
            heap,
            radius,
        )

    keys = [selector.select(rotated[s], leaves[i], 10 * K, None) for i, s in enumerate(one)]
    cands = [searcher.cut(kr[0], kr[1], K) for kr in keys]
    single = {
        "index.search, end to end": median_us(lambda i: index.search(qs[i], K, probes), nq),
        "rotation (NumPy)": median_us(lambda i: st.quantizer.rotate(q[one[i]]), nq),
        "the one compiled call": median_us(
            lambda i: searcher._search_lone(q[one[i]], rotated[one[i]], request), nq
        ),
        "  routing": median_us(
            lambda i: searcher._route_flat(rotated[one[i]], probes, st.live_sizes), nq
        ),
        "  quantisation, pair terms": median_us(
            lambda i: (
                quantize(rotated[one[i]], selector.table.origin, selector.table.code_bits),
                selector._pair_terms(rotated[one[i]], leaves[i]),
            ),
            nq,
        ),
        "  code scan": median_us(scan, nq),
        "  bound cut": median_us(lambda i: searcher.cut(keys[i][0], keys[i][1], K), nq),
        "  rerank": median_us(lambda i: _rerank(q[one[i]], cands[i], K, st.storage, st.metric), nq),
    }
    single["Python (validation, preparation, ids)"] = (
        single["index.search, end to end"]
        - single["rotation (NumPy)"]
        - single["the one compiled call"]
    )
    batch: dict[str, float] = {}
    batch["search_batch, end to end"], _ = per_query_us(
        lambda: index.search_batch(qs, K, probes), nq
    )
    batch["rotation"], _ = per_query_us(lambda: st.quantizer.rotate(q), nq)
    batch["routing"], routed = per_query_us(
        lambda: route_for(st.tree, rotated, probes, K, st.live_sizes, st.metric), nq
    )
    batch["nearest leaf first"], routed = per_query_us(
        lambda: nearest_first(st.tree, rotated, routed, st.metric), nq
    )
    batch["code scan (quantisation, pair terms, scan)"], (bkeys, bradius) = per_query_us(
        lambda: selector.select(rotated, routed, 10 * K, None), nq
    )
    batch["bound cut"], brows = per_query_us(lambda: searcher.cut(bkeys, bradius, K), nq)
    batch["rerank"], _ = per_query_us(lambda: _rerank(q, brows, K, st.storage, st.metric), nq)
    lines = [
        f"{args.dataset}, probes {probes}, k {K}, backend {index.backend}, vectors in RAM",
        "",
        "| one query at a time | us (median) |",
        "|---|---|",
        *(f"| {name} | {us:.1f} |" for name, us in single.items()),
        "",
        f"| a batch of {nq:,} | us per query (median of 5) |",
        "|---|---|",
        *(f"| {name} | {us:.1f} |" for name, us in batch.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
