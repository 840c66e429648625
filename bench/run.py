"""Recall@10 versus queries per second, vectordb beside its peers, on real data.

    python bench/run.py --dataset fashion-mnist --quick
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

QUICK_SETS = ["fashion-mnist", "glove-50", "synthetic-100k"]
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
    """Measure one library on one data set; print one JSON object per line."""
    import numpy as np
    from datasets import load
    from peers import RUNNERS

    base_rss = _rss()  # the interpreter, NumPy and the library, before any data
    data = load(args.dataset, max_queries=1000 if args.quick else None)
    queries, truth, metric = data.queries, data.truth, data.metric
    n, dim = data.train.shape
    runner = RUNNERS[args.library](metric, args.threads, args.quick)
    t0 = time.perf_counter()
    runner.build(data.train)
    build_s = time.perf_counter() - t0
    del data  # RSS below is the index's (and the queries'), not the training set's
    gc.collect()
    _trim_heap()
    n_single = min(len(queries), 200 if args.quick else 1000)
    n_cold = min(n_single, 50 if args.quick else 200)
    for mode in runner.modes:
        switch = runner.set_mode(mode)
        next(switch)
        for point in runner.points():
            runner.search_batch(queries[:50], K, point)  # warm-up
            if mode == "mmap-warm":
                runner.search_batch(queries, K, point)  # page in what this point reads
            batch_times = []
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
            row = {
                "dataset": args.dataset,
                "library": runner.name,
                "mode": mode,
                "threads": args.threads,
                "params": point,
                "recall": _recall(np.asarray(found), truth),
                "qps_batch": len(queries) / batch_s,
                "qps_single": 1.0 / float(np.median(times)),
                "latency_p50_ms": float(np.median(times)) * 1e3,
                "latency_p99_ms": float(np.percentile(times, 99)) * 1e3,
                "build_s": build_s,
                "index_bytes": runner.index_bytes(),
                "n": int(n),
                "dim": int(dim),
                **_rss(),
                "rss_anon_base": base_rss["rss_anon"],
            }
            print(json.dumps(row), flush=True)
        next(switch, None)


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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
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

    sets = (QUICK_SETS if args.quick else ALL_SETS) if args.dataset == "all" else [args.dataset]
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


def _fmt_params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items()) or "-"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    out = [
        f"# vectordb benchmark\n\nMachine: {info['cpu']}, {info['cores']} cores; "
        f"Python {info['python']}, NumPy {info['numpy']}; {info['date']}.\n"
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for threads in sorted({r["threads"] for r in rows if r["dataset"] == name}):
            sel = [r for r in rows if r["dataset"] == name and r["threads"] == threads]
            n, dim = sel[0]["n"], sel[0]["dim"]
            out.append(f"\n## {name} ({n:,} x {dim}), {threads} thread(s)\n")
            out.append(
                "| library | mode | params | recall@10 | QPS batch | QPS single | p50 ms "
                "| build s | index MB | RSS anon MB (over baseline) | RSS file MB |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in sel:
                over = r["rss_anon"] - r.get("rss_anon_base", 0)
                out.append(
                    f"| {r['library']} | {r['mode']} | {_fmt_params(r['params'])} "
                    f"| {r['recall']:.3f} | {r['qps_batch']:,.0f} | {r['qps_single']:,.0f} "
                    f"| {r['latency_p50_ms']:.3f} | {r['build_s']:.1f} "
                    f"| {r['index_bytes'] / 1e6:.1f} | {r['rss_anon'] / 1e6:.0f} "
                    f"({over / 1e6:.0f}) | {r['rss_file'] / 1e6:.0f} |"
                )
            out.append("\nBest batched QPS at a recall@10 of at least:\n")
            out.append("| library / mode | >= 0.90 | >= 0.95 | >= 0.99 |")
            out.append("|---|---|---|---|")
            for lib, mode in dict.fromkeys((r["library"], r["mode"]) for r in sel):
                cells = []
                for target in (0.90, 0.95, 0.99):
                    ok = [
                        r
                        for r in sel
                        if r["library"] == lib and r["mode"] == mode and r["recall"] >= target
                    ]
                    best = max(ok, key=lambda r: r["qps_batch"], default=None)
                    cells.append(
                        f"{best['qps_batch']:,.0f} ({_fmt_params(best['params'])})" if best else "-"
                    )
                out.append(f"| {lib} / {mode} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


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
        for lib, mode in dict.fromkeys((r["library"], r["mode"]) for r in sel):
            pts = sorted(
                (r["recall"], r["qps_batch"])
                for r in sel
                if r["library"] == lib and r["mode"] == mode
            )
            style = "-o" if lib == "vectordb" else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{lib} ({mode})", ms=4)
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
        help="fashion-mnist, glove-50, synthetic-100k, synthetic-1m or all",
    )
    parser.add_argument("--quick", action="store_true", help="fewer queries and sweep points")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--libs",
        help="comma-separated subset of: vectordb, faiss-flat, faiss-ivfflat, hnswlib, usearch",
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
