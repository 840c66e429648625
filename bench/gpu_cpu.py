"""GPU (CuPy) versus CPU (NumPy) backends, side by side on the same index and queries.

    python bench/gpu_cpu.py [--sizes 100000 1000000] [--dim 768] [--kernel-codes 10000000]

1. The scoring kernel alone (``plane_dots``: the query's 4 bit planes against every code)
   over ``--kernel-codes`` random codes: codes scanned per second, and GB/s of code words
   read (each query reads every code once).
2. End to end, for each size: one index (vectors memory-mapped and warm), both backends,
   batched QPS and recall@10 at batch sizes 1, 64, 256, 1024 and 10,000, and the time
   of each GPU stage for batches of 64 and 1,024.

Without a usable CuPy only the NumPy columns are filled. Figures are medians of 3 runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import vectordb as vdb
from vectordb import backends
from vectordb.core.codes import plane_dots
from vectordb.core.query_codes import QUERY_BITS

BATCHES = (1, 64, 256, 1024, 10_000)


def timed(fn: Any, repeats: int = 3, sync: Any = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    if sync:
        sync()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def kernel_bench(n: int, words: int, cupy: Any, gpu_queries: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**63, size=(words, n), dtype=np.int64).view(np.uint64)
    out = []
    for name, nq in (("numpy", 4), ("cupy", gpu_queries)):
        if name == "cupy" and cupy is None:
            continue
        planes = rng.integers(0, 2**63, size=(nq, QUERY_BITS, words), dtype=np.int64)
        planes = planes.view(np.uint64)
        if name == "numpy":
            seconds = timed(functools.partial(plane_dots, planes, codes))
        else:
            gpu = backends.resolve_backend("cupy")
            dq, dc = cupy.asarray(planes), cupy.asarray(codes)
            kernel = functools.partial(gpu.plane_dots_device, dq, dc)
            seconds = timed(kernel, sync=cupy.cuda.Device().synchronize)
        out.append(
            {
                "backend": name,
                "codes": n,
                "queries": nq,
                "codes_per_s": n * nq / seconds,
                "gb_per_s": n * nq * words * 8 / seconds / 1e9,
            }
        )
    return out


def truth(x: np.ndarray, q: np.ndarray, cupy: Any, k: int = 10) -> np.ndarray:
    """Exact cosine top-k, on the GPU when there is one."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), 1000):
        if cupy is not None:
            sims = cupy.asarray(qn[s : s + 1000]) @ cupy.asarray(xn).T
            out[s : s + 1000] = cupy.argsort(-sims, axis=1)[:, :k].get()
        else:
            sims = qn[s : s + 1000] @ xn.T
            part = np.argpartition(-sims, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
            out[s : s + 1000] = np.take_along_axis(part, order, axis=1)
    return out


def device_stages(index: Any, queries: np.ndarray, cupy: Any) -> dict[str, float]:
    """Milliseconds per stage of the CuPy search of ``queries``, each synchronised."""
    from vectordb.backends import device_search as ds
    from vectordb.core.metrics import prepare

    sel = index._state.searcher
    st = index._state
    metric = index.metric
    sync = cupy.cuda.Device().synchronize
    q = prepare(queries, metric)
    perm, blocks_t, bits = sel._rotation
    dq = cupy.asarray(q)
    rotated = ds.rotate(cupy, dq, perm, blocks_t, bits)
    sizes = cupy.asarray(st.live_sizes)
    leaves, _ = sel._route(rotated, 4, 10, sizes)
    cand = sel._candidates(rotated, leaves, 50, None)
    steps = {
        "upload queries": lambda: cupy.asarray(q),
        "rotate": lambda: ds.rotate(cupy, dq, perm, blocks_t, bits),
        "route": lambda: sel._route(rotated, 4, 10, sizes),
        "query codes": lambda: ds.query_terms(cupy, rotated, leaves, sel._tree, sel.words, metric),
        "score + sort": lambda: sel._candidates(rotated, leaves, 50, None),
        "rerank": lambda: sel._rerank(dq, cand, 10),
        "whole search": lambda: index.search_batch(queries, 10),
    }
    return {name: 1e3 * timed(fn, repeats=5, sync=sync) for name, fn in steps.items()}


def end_to_end(n: int, dim: int, cupy: Any, n_queries: int) -> list[dict[str, Any]]:
    data = vdb.make_clustered(n + n_queries, dim, seed=0)
    x, queries = data[:n], data[n:]
    t = time.perf_counter()
    index = vdb.ClusteredIndex.build(x, metric="cosine", backend="numpy")
    build_s = time.perf_counter() - t
    gt = truth(x, queries, cupy)
    del data, x
    tmp = tempfile.TemporaryDirectory()
    index.use_mmap_storage(Path(tmp.name) / "vectors.bin")
    index.search_batch(queries, 10)  # warm the pages both backends will read
    rows = []
    for name in ("numpy", "cupy"):
        if name == "cupy" and cupy is None:
            continue
        t = time.perf_counter()
        index.use_backend(name)  # the cupy backend copies codes and vectors to the device
        switch_s = time.perf_counter() - t
        for batch in BATCHES:
            count = min(len(queries), max(batch, 256 if batch == 1 else batch * 4))
            sel = queries[:count]

            def run(sel: np.ndarray = sel, batch: int = batch) -> np.ndarray:
                return np.concatenate(
                    [
                        index.search_batch(sel[s : s + batch], 10)[0]
                        for s in range(0, len(sel), batch)
                    ]
                )

            seconds = timed(run)
            ids = run()
            recall = float(
                np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt[:count], strict=True)])
            )
            rows.append(
                {
                    "backend": name,
                    "n": n,
                    "dim": dim,
                    "batch": batch,
                    "qps": count / seconds,
                    "recall": recall,
                    "build_s": build_s,
                    "use_backend_s": switch_s,
                }
            )
        if name == "cupy" and index._state.searcher.vectors_on_device:
            for size in (64, 1024):
                stages = device_stages(index, queries[:size], cupy)
                rows[-1][f"stages_ms_{size}"] = stages
                shown = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                print(f"n={n:,}, batch {size:,}, cupy stages (ms): {shown}")
    # A write publishes a new state: the cost of keeping the device copy in sync. Last,
    # since the added vectors would change the ground truth.
    for row in [r for r in rows if r["batch"] == BATCHES[-1]]:
        index.use_backend(row["backend"])
        extra = queries[:100]
        row["add_100_ms"] = 1e3 * timed(lambda extra=extra: index.add(extra), repeats=5)
        print(
            f"n={n:,}, {row['backend']}: use_backend {row['use_backend_s']:.2f} s, "
            f"add(100 vectors) {row['add_100_ms']:.2f} ms"
        )
    index.close()
    tmp.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument(
        "--kernel",
        default="10000000x64,1000000x1024",
        help="code counts x GPU query batch for the kernel alone, comma-separated",
    )
    parser.add_argument("--backend", choices=["both", "numpy", "cupy"], default="both")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cupy, reason = backends._probe_cupy()
    if args.backend == "numpy":
        cupy, reason = None, "--backend numpy"
    elif args.backend == "cupy" and cupy is None:
        raise SystemExit(f"--backend cupy: {reason}")
    device = "none"
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    else:
        print(f"cupy unavailable ({reason}): NumPy only")
    words = (args.dim + 63) // 64
    kernel = []
    for spec in args.kernel.split(","):
        n_codes, gpu_queries = (int(v) for v in spec.split("x"))
        kernel += kernel_bench(n_codes, words, cupy, gpu_queries)
    print(f"device: {device}\n\nScoring kernel alone (plane dots), codes of {words * 64} bits\n")
    print("| backend | codes | queries | codes scanned / s | GB/s of codes read |")
    print("|---|---|---|---|---|")
    for r in kernel:
        print(
            f"| {r['backend']} | {r['codes']:,} | {r['queries']} | {r['codes_per_s']:.3g} "
            f"| {r['gb_per_s']:.1f} |"
        )
    e2e = []
    for n in args.sizes:
        e2e += end_to_end(n, args.dim, cupy, args.queries)
    print("\nEnd to end, cosine, k=10, probes=4, rerank_factor=5, vectors memory-mapped (warm)\n")
    print("| n | batch | numpy QPS | cupy QPS | cupy / numpy | recall@10 numpy | recall@10 cupy |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for batch in BATCHES:
            cpu = next(
                r for r in e2e if r["n"] == n and r["batch"] == batch and r["backend"] == "numpy"
            )
            gpu = next(
                (r for r in e2e if r["n"] == n and r["batch"] == batch and r["backend"] == "cupy"),
                None,
            )
            print(
                f"| {n:,} | {batch:,} | {cpu['qps']:,.0f} | "
                + (f"{gpu['qps']:,.0f} | {gpu['qps'] / cpu['qps']:.2f}x | " if gpu else "- | - | ")
                + f"{cpu['recall']:.3f} | "
                + (f"{gpu['recall']:.3f} |" if gpu else "- |")
            )
    if args.out:
        args.out.write_text(
            json.dumps({"device": device, "kernel": kernel, "end_to_end": e2e}, indent=1)
        )


if __name__ == "__main__":
    main()
