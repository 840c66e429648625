"""Routing recall: how much of the true top-10 the probed leaves hold, against what they cost.

    python bench/routing.py --dataset pydocs-minilm
    python bench/routing.py --dataset glove-50 --nlist 1024 2048 --out /tmp/routing-glove

For each query, *routing recall* is the fraction of its true top-10 (the data set's exact
ground truth) that lie inside the leaves (vectordb) or inverted lists (faiss IVF) the query
probes, and *vectors scanned* is the number of vectors those leaves hold: the work a search
at that routing knob does before any code or rerank (which can only lose more). Both are
averaged over the queries, for each value of the routing knob (vectordb's ``probes``, faiss's
``nprobe``), which gives one curve per library: the higher and further left, the better the
routing.

vectordb is measured through its internals, as its search routes: the index is built with
``ClusteredIndex.build(x, metric=..., backend="numpy")``, queries are prepared for the metric
and rotated by the index's quantizer, and ``vectordb.search.route.route(tree, rotated,
probes, metric)`` gives the probed leaves, so the tool measures whatever routing that
function does now. faiss is an ``IndexIVFFlat`` (``nlist`` lists, default ``4 sqrt(n)``
rounded to a power of two: 1,024 for 110,000 vectors) on the same (normalised, for cosine)
vectors; its probed lists are ``index.quantizer.search(q, nprobe)``, their sizes
``invlists.list_size``.

Prints a Markdown table; writes ``routing.json``, ``routing.md`` and ``<dataset>-routing.png``
(routing recall against vectors scanned, both libraries) to ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROBES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
TARGETS = (0.90, 0.95, 0.98, 0.99)
K = 10


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _curve(
    probed: Any, sizes: Any, where: Any, truth: Any, knob: int, seconds: float
) -> dict[str, Any]:
    """One point: ``probed`` (nq, L) partition numbers (-1 padded), ``sizes`` vectors per
    partition, ``where`` the partition of every id, ``truth`` (nq, K) true neighbours."""
    import numpy as np

    nq = probed.shape[0]
    mask = np.zeros((nq, sizes.shape[0] + 1), dtype=bool)  # last column: the -1 padding
    mask[np.arange(nq)[:, None], np.where(probed >= 0, probed, sizes.shape[0])] = True
    mask = mask[:, :-1]
    found = mask[np.arange(nq)[:, None], where[truth]]
    per_query = found.mean(axis=1)
    return {
        "knob": int(knob),
        "recall": float(per_query.mean()),
        "recall_p10": float(np.percentile(per_query, 10)),
        "scanned": float((mask @ sizes.astype(np.float64)).mean()),
        "partitions": float(mask.sum(axis=1).mean()),
        "route_ms_per_query": 1e3 * seconds / nq,
    }


def vectordb_curve(
    data: Any, probes: list[int], build: dict[str, Any], truth: Any
) -> dict[str, Any]:
    import numpy as np

    import vectordb as vdb
    from vectordb.core.metrics import prepare
    from vectordb.search.route import route

    t0 = time.perf_counter()
    index = vdb.ClusteredIndex.build(data.train, metric=data.metric, backend="numpy", **build)
    build_s = time.perf_counter() - t0
    st = index._state
    n = data.train.shape[0]
    n_leaves = st.tree.n_leaves
    sizes = np.zeros(n_leaves, dtype=np.int64)
    where = np.full(n, -1, dtype=np.int64)  # leaf of every id
    for part in st.parts:  # the base after a build; a delta only after writes
        offsets = part.offsets
        counts = np.diff(offsets)
        rows = part.rows if part.rows is not None else np.arange(offsets[-1], dtype=np.int64)
        if rows.shape[0] == 0:
            continue
        ids = st.row_id[rows]
        where[ids] = np.repeat(np.arange(n_leaves, dtype=np.int64), counts)
        sizes += counts
    if (where < 0).any():
        raise RuntimeError("some ids of the build input are in no leaf")
    rotated = st.quantizer.rotate(prepare(np.ascontiguousarray(data.queries), st.metric))
    points = []
    for p in probes:
        t = time.perf_counter()
        leaves = route(st.tree, rotated, p, st.metric)
        points.append(_curve(leaves, sizes, where, truth, p, time.perf_counter() - t))
    index.close()
    return {
        "library": "vectordb",
        "knob": "probes",
        "build": build,
        "partitions": int(n_leaves),
        "partition_sizes": _size_stats(sizes),
        "build_s": build_s,
        "points": points,
    }


def faiss_curve(data: Any, probes: list[int], nlist: int, truth: Any) -> dict[str, Any]:
    import faiss  # type: ignore[import-not-found]
    import numpy as np

    x = np.ascontiguousarray(data.train, dtype=np.float32)
    q = np.ascontiguousarray(data.queries, dtype=np.float32)
    d = x.shape[1]
    if data.metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        quantizer, metric = faiss.IndexFlatIP(d), faiss.METRIC_INNER_PRODUCT
    else:
        quantizer, metric = faiss.IndexFlatL2(d), faiss.METRIC_L2
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    index.train(x)
    index.add(x)
    build_s = time.perf_counter() - t0
    invlists = faiss.extract_index_ivf(index).invlists
    sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
    where = np.full(x.shape[0], -1, dtype=np.int64)  # list of every id
    for i in range(nlist):
        if sizes[i]:
            where[faiss.rev_swig_ptr(invlists.get_ids(i), int(sizes[i])).copy()] = i
    if (where < 0).any():
        raise RuntimeError("some ids are in no inverted list")
    points = []
    for p in probes:
        if p > nlist:
            continue
        t = time.perf_counter()
        lists = index.quantizer.search(q, p)[1]
        points.append(_curve(lists, sizes, where, truth, p, time.perf_counter() - t))
    return {
        "library": "faiss-ivf",
        "knob": "nprobe",
        "build": {"nlist": nlist},
        "partitions": nlist,
        "partition_sizes": _size_stats(sizes),
        "build_s": build_s,
        "points": points,
    }


def _size_stats(sizes: Any) -> dict[str, float]:
    import numpy as np

    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
    }


def scanned_at(points: list[dict[str, Any]], target: float) -> float | None:
    """Vectors scanned to reach routing recall ``target``: linear between the two points of
    the curve around it (ordered by the knob); ``None`` if no point reaches it."""
    pts = sorted(points, key=lambda p: p["scanned"])
    for i, p in enumerate(pts):
        if p["recall"] >= target:
            if i == 0 or p["recall"] == target:
                return float(p["scanned"])
            a = pts[i - 1]
            if p["recall"] <= a["recall"]:
                return float(p["scanned"])
            frac = (target - a["recall"]) / (p["recall"] - a["recall"])
            return float(a["scanned"] + frac * (p["scanned"] - a["scanned"]))
    return None


def _label(series: dict[str, Any]) -> str:
    build = " ".join(f"{k}={v}" for k, v in series["build"].items())
    return f"{series['library']} ({build}, {series['partitions']:,} partitions)".replace("(, ", "(")


def markdown(result: dict[str, Any]) -> str:
    out = [
        f"# Routing recall: {result['dataset']} ({result['n']:,} x {result['dim']}, "
        f"{result['metric']}), {result['nq']:,} queries\n",
        "Routing recall@10: fraction of the true top-10 inside the probed partitions "
        "(mean over queries; p10: the 10th percentile query). Scanned: vectors those "
        "partitions hold, per query. Route ms: routing a batch of all queries, per query.\n",
    ]
    for s in result["series"]:
        sz = s["partition_sizes"]
        out.append(
            f"\n## {_label(s)}\n\nPartition sizes: min {sz['min']:,}, median "
            f"{sz['median']:,.0f}, max {sz['max']:,}; build {s['build_s']:.1f} s.\n"
        )
        out.append(
            f"| {s['knob']} | partitions probed | vectors scanned | routing recall@10 | p10 "
            "| route ms/query |"
        )
        out.append("|---|---|---|---|---|---|")
        for p in s["points"]:
            out.append(
                f"| {p['knob']} | {p['partitions']:.1f} | {p['scanned']:,.0f} "
                f"| {p['recall']:.4f} | {p['recall_p10']:.2f} | {p['route_ms_per_query']:.3f} |"
            )
    out.append("\n## Vectors scanned per query to reach a routing recall@10\n")
    out.append("| series | " + " | ".join(f"{t:.2f}" for t in TARGETS) + " |")
    out.append("|---|" + "---|" * len(TARGETS))
    for s in result["series"]:
        cells = [scanned_at(s["points"], t) for t in TARGETS]
        out.append(
            f"| {_label(s)} | " + " | ".join(f"{c:,.0f}" if c else "-" for c in cells) + " |"
        )
    mine = [s for s in result["series"] if s["library"] == "vectordb"]
    theirs = [s for s in result["series"] if s["library"] != "vectordb"]
    if mine and theirs:
        out.append("\nvectordb's vectors scanned over faiss IVF's (< 1: vectordb scans fewer):\n")
        out.append("| vectordb vs | " + " | ".join(f"{t:.2f}" for t in TARGETS) + " |")
        out.append("|---|" + "---|" * len(TARGETS))
        for m in mine:
            for t_series in theirs:
                cells = []
                for t in TARGETS:
                    a, b = scanned_at(m["points"], t), scanned_at(t_series["points"], t)
                    cells.append(f"{a / b:.2f}x" if a and b else "-")
                out.append(f"| {_label(m)} vs {_label(t_series)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for s in result["series"]:
        xs = [p["scanned"] for p in s["points"]]
        ys = [p["recall"] for p in s["points"]]
        style = "-o" if s["library"] == "vectordb" else "--s"
        ax.plot(xs, ys, style, label=_label(s), ms=4)
        for p in s["points"]:
            ax.annotate(str(p["knob"]), (p["scanned"], p["recall"]), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("vectors scanned per query (sum of the probed partitions' sizes, log)")
    ax.set_ylabel("routing recall@10 (true top-10 inside the probed partitions)")
    ax.set_title(f"{result['dataset']}: routing recall (labels: probes / nprobe)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pydocs-minilm", help="a name from bench/datasets.py")
    parser.add_argument("--probes", type=int, nargs="+", default=PROBES, help="knob values")
    parser.add_argument(
        "--nlist",
        type=int,
        nargs="+",
        help="faiss IVF list counts (default: 4 sqrt(n) rounded to a power of two)",
    )
    parser.add_argument(
        "--vdb-build",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ClusteredIndex.build parameter, e.g. branching_factor=16 (repeatable)",
    )
    parser.add_argument("--libs", default="vectordb,faiss-ivf", help="vectordb, faiss-ivf")
    parser.add_argument("--max-queries", type=int, help="a seeded subset of the queries")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest" / "routing")
    args = parser.parse_args()
    # Before NumPy loads: its BLAS reads these once.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    from datasets import load

    data = load(args.dataset, max_queries=args.max_queries)
    n, dim = data.train.shape
    truth = np.ascontiguousarray(data.truth[:, :K])
    libs = args.libs.split(",")
    build = dict(
        {"seed": 0}, **{k: _value(v) for k, v in (b.split("=", 1) for b in args.vdb_build)}
    )
    nlists = args.nlist or [2 ** round(math.log2(4 * math.sqrt(n)))]
    series = []
    if "vectordb" in libs:
        series.append(vectordb_curve(data, sorted(set(args.probes)), build, truth))
        print(f"vectordb done ({series[-1]['build_s']:.1f} s build)", file=sys.stderr)
    if "faiss-ivf" in libs:
        try:
            import faiss
        except ImportError:
            print("faiss not installed: no faiss IVF curve", file=sys.stderr)
        else:
            faiss.omp_set_num_threads(args.threads)
            for nlist in nlists:
                series.append(faiss_curve(data, sorted(set(args.probes)), nlist, truth))
                print(f"faiss IVF{nlist} done", file=sys.stderr)
    result = {
        "dataset": args.dataset,
        "n": int(n),
        "dim": int(dim),
        "metric": data.metric,
        "nq": int(truth.shape[0]),
        "k": K,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "series": series,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "routing.md").write_text(md)
    png = args.out / f"{args.dataset}-routing.png"
    wrote = plot(result, png)
    print(md)
    print(
        f"wrote {args.out}/routing.json, routing.md" + (f", {png.name}" if wrote else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
