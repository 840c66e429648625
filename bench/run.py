"""Recall@10 versus queries per second, vectordb beside its peers, on real data.

    python bench/run.py --dataset pydocs-minilm --quick
    python bench/run.py --dataset all --threads 1 2

Each (data set, library, thread count) runs in its own worker process, so that process
memory and thread settings belong to that library alone. Per sweep point it records
recall@10, QPS one query at a time, QPS batched, build time, index bytes, and the worker's
anonymous vs file-backed RSS (``RssAnon``/``RssFile`` in ``/proc/self/status``:
memory-mapped pages count as file-backed). vectordb is measured in RAM, mmap warm and mmap
cold (page cache dropped before every query). Writes ``results.json``, ``results.md`` and
one ``<dataset>.png`` per data set to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# pydocs-minilm (sentence embeddings, what chatbot and RAG backends search) is the headline.
QUICK_SETS = ["pydocs-minilm", "fashion-mnist", "glove-50", "synthetic-100k"]
ALL_SETS = [*QUICK_SETS, "synthetic-1m"]
K = 10


def _rss() -> dict[str, int]:
    out = {"rss_anon": 0, "rss_file": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                out["rss_anon"] = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                out["rss_file"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), for every library
    alike, so that RSS shows what each index holds rather than what its build freed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _recall(found: Any, truth: Any) -> float:
    import numpy as np

    hits = [
        len(set(f[f >= 0].tolist()) & set(t[:K].tolist()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) / K


def worker(args: argparse.Namespace) -> None:
    """Measure one library on one data set; print one JSON object per line.

    Memory: the baseline is taken once the interpreter, NumPy, the library, the queries and
    the ground truth are loaded (the base vectors are memory-mapped from the data cache, and
    their pages are dropped after every build), so ``rss_anon - rss_anon_base`` is what the
    library's index holds. The heap is trimmed before every reading, for every library.
    """
    import numpy as np
    from datasets import load
    from peers import RUNNERS

    data = load(args.dataset, max_queries=1000 if args.quick else None)
    train, queries, truth, metric = data.train, data.queries, data.truth, data.metric
    n, dim = train.shape
    runner = RUNNERS[args.library](metric, args.threads, args.quick)
    runner.setup()
    gc.collect()
    _trim_heap()
    base_rss = _rss()
    n_single = min(len(queries), 200 if args.quick else 1000)
    n_cold = min(n_single, 50 if args.quick else 200)
    for build in runner.builds(int(dim)):
        t0 = time.perf_counter()
        runner.build(train, **build)
        build_s = time.perf_counter() - t0
        _drop_pages(train)
        gc.collect()
        for mode in runner.modes:
            switch = runner.set_mode(mode)
            next(switch)
            for point in runner.points():
                row = _measure(runner, mode, point, queries, truth, n_single, n_cold)
                _trim_heap()
                rss = _rss()
                row.update(
                    dataset=args.dataset,
                    library=runner.name,
                    mode=mode,
                    threads=args.threads,
                    build=build,
                    params=point,
                    recall=_recall(np.asarray(row.pop("found")), truth),
                    build_s=build_s,
                    index_bytes=runner.index_bytes(),
                    n=int(n),
                    dim=int(dim),
                    rss_anon_base=base_rss["rss_anon"],
                    rss_anon_index=rss["rss_anon"] - base_rss["rss_anon"],
                    **rss,
                )
                print(json.dumps(row), flush=True)
            next(switch, None)
        runner.drop()
        gc.collect()


def _drop_pages(array: Any) -> None:
    """Unmap-in-effect the pages of a memory-mapped array (they stay in the page cache)."""
    import mmap

    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def _measure(
    runner: Any,
    mode: str,
    point: dict[str, Any],
    queries: Any,
    truth: Any,
    n_single: int,
    n_cold: int,
) -> dict[str, Any]:
    """Time one sweep point: batched (median of 3, 1 when cold) and one query at a time."""
    import numpy as np

    runner.search_batch(queries[:50], K, point)  # warm-up
    if mode == "mmap-warm":
        runner.search_batch(queries, K, point)  # page in what this point reads
    batch_times = []
    found = None
    for _ in range(1 if mode == "mmap-cold" else 3):
        if mode == "mmap-cold":
            runner.before_cold_query()
        t = time.perf_counter()
        found = runner.search_batch(queries, K, point)
        batch_times.append(time.perf_counter() - t)
        if batch_times[-1] > 2.0:  # slow points: one timing is precise enough
            break
    batch_s = float(np.median(batch_times))
    times = []
    for q in queries[: n_cold if mode == "mmap-cold" else n_single]:
        if mode == "mmap-cold":
            runner.before_cold_query()
        t = time.perf_counter()
        runner.search_one(q, K, point)
        times.append(time.perf_counter() - t)
    return {
        "found": found,
        "qps_batch": len(queries) / batch_s,
        "qps_single": 1.0 / float(np.median(times)),
        "latency_p50_ms": float(np.median(times)) * 1e3,
        "latency_p99_ms": float(np.percentile(times, 99)) * 1e3,
    }


def machine() -> dict[str, Any]:
    import numpy as np

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import vectordb as vdb

    usable = vdb.available_backends()
    # What "auto" picks on this machine (the order of available_backends, best last).
    backend = usable[-1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "backend": backend,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", disable=None)  # None: silent when not a terminal


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    from datasets import DatasetUnavailable, load
    from peers import RUNNERS

    if args.dataset == "all":
        sets = QUICK_SETS if args.quick else ALL_SETS
    else:
        sets = args.dataset.split(",")
    libs = args.libs.split(",") if args.libs else list(RUNNERS)
    jobs = []
    for name in sets:
        try:
            load(name)  # fetch data and cache ground truth once, outside the timed workers
        except DatasetUnavailable as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        for threads in args.threads:
            for lib in libs:
                jobs.append((name, lib, threads))
    rows: list[dict[str, Any]] = []
    bar = _bar(len(jobs))
    for name, lib, threads in jobs:
        if bar is not None:
            bar.set_description(f"{name} {lib} t={threads}")
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            lib,
            "--dataset",
            name,
            "--threads",
            str(threads),
        ] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        got = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            print(f"skipping {lib} on {name}: {last[0]}", file=sys.stderr)
        rows.extend(got)
        if bar is not None:
            bar.update(1)
        else:
            print(f"done {name} {lib} threads={threads}: {len(got)} points", file=sys.stderr)
    if bar is not None:
        bar.close()
    return rows


TARGETS = (0.90, 0.95, 0.99)


def _fmt_params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items()) or "defaults"


def _series_name(r: dict[str, Any]) -> str:
    build = _fmt_params(r.get("build") or {})
    return f"{r['library']} / {r['mode']}" + ("" if build == "defaults" else f" ({build})")


def qps_at(points: list[tuple[float, float]], target: float) -> float | None:
    """QPS at recall ``target`` on the upper frontier of ``(recall, qps)`` points, linear
    between the two frontier points around it; ``None`` if no point reaches it."""
    frontier: list[tuple[float, float]] = []
    for recall, qps in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not frontier or qps > frontier[-1][1]:
            frontier.append((recall, qps))
    above = [p for p in frontier if p[0] >= target]
    if not above:
        return None
    r2, q2 = min(above, key=lambda p: p[0])
    below = [p for p in frontier if p[0] < target]
    if not below or r2 == target:
        return q2
    r1, q1 = max(below, key=lambda p: p[0])
    return q2 + (q1 - q2) * (r2 - target) / (r2 - r1)


def _best(
    sel: list[dict[str, Any]],
    library: str,
    modes: tuple[str, ...],
    target: float,
    field: str = "qps_batch",
) -> tuple[float | None, str]:
    """Best interpolated QPS at ``target`` over the builds of ``library`` in ``modes``."""
    best: tuple[float | None, str] = (None, "")
    for name in dict.fromkeys(_series_name(r) for r in sel):
        pts = [
            (r["recall"], r[field])
            for r in sel
            if _series_name(r) == name and r["library"] == library and r["mode"] in modes
        ]
        q = qps_at(pts, target) if pts else None
        if q is not None and (best[0] is None or q > best[0]):
            best = (q, name)
    return best


def _index_mb(sel: list[dict[str, Any]], series: str) -> float | None:
    vals = [r["rss_anon_index"] for r in sel if _series_name(r) == series]
    return max(vals) / 1e6 if vals else None


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    out = [
        f"# vectordb benchmark\n\nMachine: {info['cpu']}, {info['cores']} cores; "
        f"Python {info['python']}, NumPy {info['numpy']}; vectordb backend "
        f"{info.get('backend', 'numpy')}; {info['date']}.\n\n"
        "QPS at a recall: linear between the two points of a library's best curve around it. "
        "Index RSS: anonymous memory of the worker over its baseline (interpreter, library, "
        "queries and ground truth loaded; base vectors memory-mapped and not counted), heap "
        "trimmed, the most over the sweep. File RSS: mapped file pages (the vector file in "
        "vectordb's mmap modes).\n"
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for threads in sorted({r["threads"] for r in rows if r["dataset"] == name}):
            sel = [r for r in rows if r["dataset"] == name and r["threads"] == threads]
            n, dim = sel[0]["n"], sel[0]["dim"]
            out.append(f"\n## {name} ({n:,} x {dim}), {threads} thread(s)\n")
            out.extend(_summary(sel))
            out.append("\nAll points:\n")
            out.append(
                "| library / mode (build) | params | recall@10 | QPS batch | QPS single "
                "| p50 ms | build s | index MB | index RSS MB | file RSS MB |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for r in sel:
                out.append(
                    f"| {_series_name(r)} | {_fmt_params(r['params'])} "
                    f"| {r['recall']:.3f} | {r['qps_batch']:,.0f} | {r['qps_single']:,.0f} "
                    f"| {r['latency_p50_ms']:.3f} | {r['build_s']:.1f} "
                    f"| {r['index_bytes'] / 1e6:.1f} | {r['rss_anon_index'] / 1e6:.1f} "
                    f"| {r['rss_file'] / 1e6:.0f} |"
                )
    return "\n".join(out) + "\n"


def _summary(sel: list[dict[str, Any]]) -> list[str]:
    out = ["Batched QPS at a recall@10 of:\n", "| library / mode (build) | 0.90 | 0.95 | 0.99 |"]
    out.append("|---|---|---|---|")
    for name in dict.fromkeys(_series_name(r) for r in sel):
        pts = [(r["recall"], r["qps_batch"]) for r in sel if _series_name(r) == name]
        cells = [qps_at(pts, t) for t in TARGETS]
        out.append(f"| {name} | " + " | ".join(f"{c:,.0f}" if c else "-" for c in cells) + " |")
    libs = {r["library"] for r in sel}
    if "vectordb" not in libs:
        return out
    out.append("\nvectordb at its defaults (`search(q, 10)`: calibrated probes, bounded rerank):\n")
    out.append("| mode (build) | recall@10 | QPS batch | QPS single |")
    out.append("|---|---|---|---|")
    for r in sel:
        if r["library"] == "vectordb" and not r["params"]:
            out.append(
                f"| {_series_name(r)} | {r['recall']:.3f} | {r['qps_batch']:,.0f} "
                f"| {r['qps_single']:,.0f} |"
            )
    out.append("\nvectordb against its peers (best build; ratio > 1: vectordb ahead):\n")
    out.append("| measure | 0.90 | 0.95 | 0.99 |")
    out.append("|---|---|---|---|")
    for lib in ("faiss-ivfflat", "faiss-ivfrabitq", "hnswlib", "scann", "usearch"):
        if lib not in libs:
            continue
        for modes, field, label in (
            (("ram",), "qps_batch", "batched QPS, RAM"),
            (("mmap-warm",), "qps_batch", "batched QPS, mmap warm"),
            (("ram",), "qps_single", "one-at-a-time QPS, RAM"),
        ):
            cells = []
            for t in TARGETS:
                mine, _ = _best(sel, "vectordb", modes, t, field)
                theirs, _ = _best(sel, lib, ("ram",), t, field)
                cells.append(
                    f"{mine:,.0f} / {theirs:,.0f} = {mine / theirs:.2f}x"
                    if mine and theirs
                    else "-"
                )
            out.append(f"| {label} vs {lib} | " + " | ".join(cells) + " |")
    out.append("\nIndex memory (anonymous RSS over the baseline, MB; the most over the sweep):\n")
    out.append("| library / mode (build) | index RSS MB | vectordb / mmap-warm (defaults) / this |")
    out.append("|---|---|---|")
    mine = _index_mb(sel, "vectordb / mmap-warm")
    for series in dict.fromkeys(_series_name(r) for r in sel):
        theirs = _index_mb(sel, series)
        if theirs is None:
            continue
        ratio = f"{100 * mine / theirs:.0f}%" if mine is not None and theirs > 0 else "-"
        out.append(f"| {series} | {theirs:.1f} | {ratio} |")
    return out


def plot(rows: list[dict[str, Any]], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return
    for name in dict.fromkeys(r["dataset"] for r in rows):
        threads = min(r["threads"] for r in rows if r["dataset"] == name)
        sel = [r for r in rows if r["dataset"] == name and r["threads"] == threads]
        fig, ax = plt.subplots(figsize=(7, 5))
        for series in dict.fromkeys(_series_name(r) for r in sel):
            pts = sorted((r["recall"], r["qps_batch"]) for r in sel if _series_name(r) == series)
            style = "-o" if series.startswith("vectordb") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=series, ms=4)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries per second, batched (log)")
        ax.set_title(f"{name}, {threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="pydocs-minilm, fashion-mnist, glove-50, synthetic-100k, synthetic-1m, several "
        "joined by commas, or all",
    )
    parser.add_argument("--quick", action="store_true", help="fewer queries and sweep points")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--libs",
        help="comma-separated subset of: vectordb, faiss-flat, faiss-ivfflat, faiss-ivfrabitq, "
        "scann, hnswlib, usearch",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured (data set, library, threads) rows of --out's results",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.library, args.threads = args.worker, args.threads[0]
        worker(args)
        return
    info = machine()
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "results.json"
    if args.merge and previous.is_file():
        measured = {(r["dataset"], r["library"], r["threads"]) for r in rows}
        kept = [
            r
            for r in json.loads(previous.read_text())["rows"]
            if (r["dataset"], r["library"], r["threads"]) not in measured
        ]
        rows = kept + rows
    (args.out / "results.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    md = markdown(rows, info)
    (args.out / "results.md").write_text(md)
    plot(rows, args.out)
    print(md)
    print(f"wrote {args.out}/results.json, results.md and plots", file=sys.stderr)


if __name__ == "__main__":
    main()
