"""Builds larger than RAM: a build on disk in bounded memory against the build in RAM, and
searches with the page cache smaller than the vector file.

    python bench/ondisk.py --n 1000000 --dim 384 --work /tmp/ondisk [--memory-limit 1G]
        [--cgroup-mb 600] [--peers faiss-ivfflat hnswlib]
        [--out bench/results/DATE-ondisk/ondisk.json]

1. ``vectordb.make_clustered`` data (``n + 1000`` rows, the last 1,000 the queries; past a
   million rows, a million at a time, each with clusters of its own, the queries from the
   first) written to ``WORK/x.npy`` unless there, and its exact top-10 (cosine) by brute
   force;
2. each build in a fresh process, from the ``.npy`` memory-mapped: ``path=`` with
   ``memory_limit``, and in RAM followed by ``save`` (the way before). Peak anonymous and
   file-backed RSS sampled every 50 ms, ``ru_maxrss``, build time;
3. each index opened (mmap) in a fresh process, warmed: recall@10 at the defaults, batched
   and one-at-a-time QPS; then, where a memory cgroup (v1) can be made, the on-disk index
   in a process limited to ``--cgroup-mb`` (page cache included), from a dropped cache.
   ``--skip-ram-build``: the build on disk only (for inputs the build in RAM cannot hold);
4. ``--peers faiss-ivfflat hnswlib``: each built in RAM from the same ``.npy`` in a fresh
   process (built on two threads, searched on one, as above), its peak RSS, and at the
   first point of its sweep with recall@10 >= 0.95, batched and one-at-a-time QPS.

Prints one JSON object per measurement; ``--out`` keeps them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_BUILD = r"""
import json, resource, sys, threading, time
import numpy as np
import vectordb as vdb
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
peak = {"RssAnon": 0, "RssFile": 0}
def status():
    found = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon:", "RssFile:")):
            found[line.split(":")[0]] = int(line.split()[1]) / 1024
    return found
def watch():
    while True:
        for key, value in status().items():
            peak[key] = max(peak[key], value)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
x = np.load(src, mmap_mode="r")
t = time.perf_counter()
if mode == "ram":
    index = vdb.ClusteredIndex.build(x, metric="cosine")
    index.save(out)
    index.close()
    index = vdb.ClusteredIndex.open(out)
else:
    index = vdb.ClusteredIndex.build(x, metric="cosine", path=out, memory_limit=int(mode))
seconds = time.perf_counter() - t
print(json.dumps({
    "build": "in RAM, then save" if mode == "ram" else f"path=, memory_limit={int(mode) >> 20} MiB",
    "n": len(index), "dim": index.dim, "leaves": index.n_leaves, "build_s": round(seconds, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "peak_anon_mb": round(peak["RssAnon"]), "peak_file_mb": round(peak["RssFile"]),
    "index_ram_mb": round(index.memory_usage_bytes() / 1e6, 1),
}))
"""

_SERVE = r"""
import json, sys, time
import numpy as np
import vectordb as vdb
work, name, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"
q = np.load(f"{work}/q.npy"); truth = np.load(f"{work}/truth.npy")
index = vdb.ClusteredIndex.open(f"{work}/{name}")
index.warm() if warm else index.drop_cache()
def recall(ids):
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
t = time.perf_counter()
ids, _ = index.search_batch(q, 10)
batch = len(q) / (time.perf_counter() - t)
t = time.perf_counter()
for v in q[:300]:
    index.search(v, 10)
single = 300 / (time.perf_counter() - t)
status = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status")
          if l.startswith(("RssAnon:", "RssFile:"))}
print(json.dumps({"index": name, "cache": "warm" if warm else sys.argv[4],
                  "recall_at_defaults": round(recall(ids), 4), "qps_batch": round(batch),
                  "qps_single": round(single), "rss_anon_mb": status["RssAnon"],
                  "rss_file_mb": status["RssFile"]}))
"""

_PEER = r"""
import json, resource, sys, threading, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from peers import RUNNERS
name, work = sys.argv[1], sys.argv[2]
peak = {"RssAnon": 0}
def watch():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["RssAnon"] = max(peak["RssAnon"], int(line.split()[1]) / 1024)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
q = np.load(f"{work}/q.npy"); truth = np.load(f"{work}/truth.npy")
runner = RUNNERS[name]("cosine", 2, True)  # two threads to build, as vectordb's BLAS has
runner.setup()
t = time.perf_counter()
runner.build(np.array(np.load(f"{work}/x.npy", mmap_mode="r")))
build = time.perf_counter() - t
if name.startswith("faiss"):  # and one to search, as vectordb's search_batch
    import faiss; faiss.omp_set_num_threads(1)
else:
    runner.index.set_num_threads(1)
row = {"peer": name, "built": "in RAM", "build_s": round(build, 1),
       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
       "peak_anon_mb": round(peak["RssAnon"]), "index_ram_mb": round(runner.index_bytes() / 1e6, 1)}
for point in runner.points():  # the first point of the sweep at recall >= 0.95
    t = time.perf_counter()
    ids = runner.search_batch(q, 10, point)
    batch = len(q) / (time.perf_counter() - t)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    if recall >= 0.95:
        t = time.perf_counter()
        for v in q[:300]:
            runner.search_batch(v[None], 10, point)
        single = 300 / (time.perf_counter() - t)
        row.update(point=point, recall=round(recall, 4), qps_batch=round(batch),
                   qps_single=round(single))
        break
print(json.dumps(row))
"""


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.upper().rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _prepare(work: Path, n: int, dim: int) -> None:
    import numpy as np

    import vectordb as vdb

    if (work / "x.npy").exists() and np.load(work / "x.npy", mmap_mode="r").shape == (n, dim):
        return
    if n <= _CHUNK:
        x = vdb.make_clustered(n + 1000, dim, seed=7)
        np.save(work / "x.npy", x[:n])
        q = x[n:]
    else:  # a million rows at a time (each its own clusters), written to a mapped .npy
        x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for s in range(0, n, _CHUNK):
            rows = min(_CHUNK, n - s)
            part = vdb.make_clustered(rows + (1000 if s == 0 else 0), dim, seed=7 + s // _CHUNK)
            x[s : s + rows] = part[:rows]
            if s == 0:
                q = part[rows:]
        x.flush()
    np.save(work / "q.npy", q)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((len(q), 10), -np.inf)
    best_i = np.zeros((len(q), 10), dtype=np.int64)
    for s in range(0, n, 100_000):  # by blocks: the whole score matrix would be n * 4 KB
        block = x[s : min(n, s + 100_000)]
        scores = np.concatenate(
            [best_s, qn @ (block / np.linalg.norm(block, axis=1)[:, None]).T], 1
        )
        rows = np.concatenate(
            [best_i, np.broadcast_to(np.arange(s, s + len(block)), (len(q), len(block)))], 1
        )
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
    np.save(work / "truth.npy", best_i)


#: Rows generated at once for large ``--n``.
_CHUNK = 1_000_000


def _cgroup(mb: int) -> Path | None:
    """A v1 memory cgroup of ``mb`` MiB under this process's own, or ``None``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        own = next(x.split(":", 2)[2] for x in lines if "memory" in x.split(":")[1].split(","))
        group = Path("/sys/fs/cgroup/memory") / own.strip().lstrip("/") / f"vectordb-bench-{mb}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(mb << 20))
        return group
    except (OSError, StopIteration):
        return None


def _run(code: str, *args: str, cgroup: Path | None = None) -> dict[str, object]:
    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=enter,
    )
    row: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vectordb-ondisk"))
    parser.add_argument("--memory-limit", default="1G")
    parser.add_argument("--cgroup-mb", type=int, default=600)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--skip-ram-build", action="store_true", help="only the build on disk (inputs past RAM)"
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=[],
        help="libraries of bench/peers.py built in RAM beside (e.g. faiss-ivfflat hnswlib)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    _prepare(args.work, args.n, args.dim)
    rows = []
    builds = [(str(_size(args.memory_limit)), "ondisk"), ("ram", "inram")]
    builds = builds[:1] if args.skip_ram_build else builds
    for mode, name in builds:
        subprocess.run(["rm", "-rf", str(args.work / name)], check=True)
        rows.append(_run(_BUILD, mode, str(args.work / "x.npy"), str(args.work / name)))
    for _, name in builds:
        rows.append(_run(_SERVE, str(args.work), name, "warm"))
    for peer in args.peers:
        rows.append(_run(_PEER, peer, str(args.work), str(Path(__file__).resolve().parent)))
    group = _cgroup(args.cgroup_mb)
    if group is not None:
        label = f"cold, cgroup of {args.cgroup_mb} MiB (page cache included)"
        try:
            rows.append(_run(_SERVE, str(args.work), "ondisk", "cold", label, cgroup=group))
        except subprocess.CalledProcessError as exc:  # e.g. killed: the index's RAM is more
            rows.append({"index": "ondisk", "cache": label, "error": f"exit {exc.returncode}"})
            print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
