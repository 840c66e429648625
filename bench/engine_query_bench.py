"""``await engine.query`` from many coroutines at once: the vector side batched with
concurrent searches, beside each query run whole on the executor (as before it was).

On the 110,000 pydocs sentences (``/work/shared/data/pydocs-debian-minilm``, texts as
``text``), ``--callers`` coroutines each run ``--rounds`` queries (vector, hybrid), one
engine of ``--workers`` threads. Reports queries per second, medians of ``--repeats``
alternated runs, and checks that both ways answer the same.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/engine_query_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np

import vectordb as vdb

DATA = Path("/work/shared/data/pydocs-debian-minilm")


async def run(engine, index, queries, texts, callers, rounds, batched, hybrid):
    async def caller(c):
        out = []
        for r in range(rounds):
            i = (c * rounds + r) % len(queries)
            text = texts[i] if hybrid else None
            if batched:
                out.append(await engine.query(queries[i], text=text, k=10))
            else:
                out.append(await engine.run(partial(index.query, queries[i], text, 10)))
        return out

    t0 = time.perf_counter()
    got = await asyncio.gather(*(caller(c) for c in range(callers)))
    return callers * rounds / (time.perf_counter() - t0), got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    base = np.load(DATA / "base.npy").astype(np.float32)
    with open(DATA / "texts.jsonl") as fh:
        docs = [{"text": json.loads(line)} for line in fh]
    queries = np.load(DATA / "queries.npy").astype(np.float32)
    with open(DATA / "query_texts.jsonl") as fh:
        texts = [json.loads(line) for line in fh]
    index = vdb.ClusteredIndex.build(base, metadata=docs, metric="cosine", text_field="text")

    async def measure():
        rows = []
        async with vdb.AsyncEngine(index, max_workers=a.workers) as engine:
            for hybrid in (False, True):
                rates = {True: [], False: []}
                for _ in range(a.repeats):
                    for batched in (True, False):
                        qps, got = await run(
                            engine, index, queries, texts, a.callers, a.rounds, batched, hybrid
                        )
                        rates[batched].append(qps)
                        if batched:
                            want = got
                        elif [[h.id for h in x] for c in got for x in c] != [
                            [h.id for h in x] for c in want for x in c
                        ]:
                            raise SystemExit("batched and whole answers differ")
                b, w = statistics.median(rates[True]), statistics.median(rates[False])
                rows.append((("hybrid (weighted)" if hybrid else "vector"), b, w))
        return rows

    rows = asyncio.run(measure())
    print(
        f"{len(base)} pydocs sentences, {a.callers} coroutines x {a.rounds} queries, k=10,"
        f" {a.workers} engine threads; medians of {a.repeats} alternated runs"
    )
    print("\n| query | batched (engine.query) q/s | whole on the executor q/s | ratio |")
    print("|---|---|---|---|")
    for name, b, w in rows:
        print(f"| {name} | {b:.0f} | {w:.0f} | {b / w:.2f}x |")


if __name__ == "__main__":
    main()
