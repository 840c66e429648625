"""Cold searches with the page cache smaller than the vector file: the mapping's readahead.

    python bench/ondisk.py --n 1000000 --dim 384 --work /tmp/od2     # the index and queries
    python bench/readahead.py --work /tmp/od2 [--cgroup-mb 600] [--reps 3]

In a fresh process inside a memory cgroup (v1) of ``--cgroup-mb`` MiB (page cache
included), the on-disk index of ``bench/ondisk.py`` is opened (mmap), its cache dropped,
and 1,000 queries are searched batched, then (cache dropped again) 300 one at a time,
with the mapping advised ``MADV_NORMAL`` (the kernel's readahead) or ``MADV_RANDOM``
(vectordb's default since 2026-12-02), alternating, ``--reps`` times. Prints one JSON
object per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ondisk import _cgroup

_RUN = r"""
import json, mmap, sys, time
import numpy as np
import vectordb as vdb
work, advice = sys.argv[1], getattr(mmap, sys.argv[2])
q = np.load(f"{work}/q.npy"); truth = np.load(f"{work}/truth.npy")
index = vdb.ClusteredIndex.open(f"{work}/ondisk", readonly=True)
storage = index._state.storage  # the mapping's advice, set for this experiment
def cold():
    index.drop_cache()
    storage.advise(advice)
cold()
t = time.perf_counter()
ids, _ = index.search_batch(q, 10)
batch = len(q) / (time.perf_counter() - t)
cold()
t = time.perf_counter()
for v in q[:300]:
    index.search(v, 10)
single = 300 / (time.perf_counter() - t)
recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
print(json.dumps({"advice": sys.argv[2], "qps_batch": round(batch), "qps_single": round(single),
                  "recall": round(recall, 4)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cgroup-mb", type=int, default=600)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    group = _cgroup(args.cgroup_mb)
    if group is None:
        sys.exit("no memory cgroup (v1) can be made here")

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    for _ in range(args.reps):
        for advice in ("MADV_NORMAL", "MADV_RANDOM"):
            done = subprocess.run(
                [sys.executable, "-c", _RUN, str(args.work), advice],
                capture_output=True,
                text=True,
                check=True,
                preexec_fn=enter,
            )
            print(json.dumps(json.loads(done.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
