"""The libraries measured beside vectordb, each behind the same small interface.

Every runner builds once, then answers ``search(queries, k, **knob)`` for each point of its
sweep. A library that is not installed raises ``ImportError`` at construction; the caller
skips it. Thread counts are pinned by the caller through the environment and here through
each library's own setting.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import vectordb as vdb

__all__ = ["RUNNERS", "Runner"]

F32 = npt.NDArray[np.float32]


def _normalise(x: F32) -> F32:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


class Runner:
    """One library: ``setup``, then for each of its ``builds``: ``build``, the ``points``
    of its sweep in each of its ``modes``, and ``drop``."""

    name = ""
    modes: tuple[str, ...] = ("ram",)

    def __init__(self, metric: str, threads: int, quick: bool) -> None:
        self.metric, self.threads, self.quick = metric, threads, quick

    def setup(self) -> None:
        """Import the library (its code is not the index's memory)."""

    def builds(self, dim: int) -> list[dict[str, Any]]:
        """Build parameters to sweep for ``dim``-d data; ``{}`` is the library's defaults."""
        return [{}]

    def build(self, train: F32, **params: Any) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        """Free the index."""
        self.index: Any = None

    def points(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        raise NotImplementedError

    def search_one(self, query: F32, k: int, point: dict[str, Any]) -> Any:
        return self.search_batch(query[None, :], k, point)

    def set_mode(self, mode: str) -> Iterator[None]:
        """Switch to ``mode`` (a generator: setup before yield, teardown after)."""
        yield

    def index_bytes(self) -> int:
        return 0

    def before_cold_query(self) -> None:
        """Evict cached pages before a cold query (mmap modes only)."""


class VectorDB(Runner):
    name = "vectordb"
    modes = ("ram", "mmap-warm", "mmap-cold")

    def builds(self, dim: int) -> list[dict[str, Any]]:
        # A wider tree: measured better at high recall with codes (fashion-mnist, synthetic:
        # 16) and with exact leaf scans (glove-50: 32).
        if self.quick:
            return [{}]
        return [{}, {"branching_factor": 16 if dim >= 128 else 32}]

    def build(self, train: F32, **params: Any) -> None:
        self.index = vdb.ClusteredIndex.build(train, metric=self.metric, seed=0, **params)
        self._tmp = tempfile.TemporaryDirectory(prefix="vectordb-bench-")

    def drop(self) -> None:
        self.index.close()
        self.index = None
        self._tmp.cleanup()

    def points(self) -> list[dict[str, Any]]:
        if self.index.leaf_scan == "vectors":
            # Probed leaves are ranked exactly: only probes matter, candidates = k.
            probes = [8, 32, 64, 128, 256] if self.quick else [8, 16, 32, 48, 64, 96, 128, 192, 256]
            return [{"probes": p, "rerank_factor": 1} for p in probes]
        if self.quick:
            grid = [(1, 2), (2, 3), (3, 3), (4, 3), (4, 5), (8, 5), (16, 10)]
        else:
            grid = [
                (1, 2),
                (2, 3),
                (2, 5),
                (3, 3),
                (3, 5),
                (4, 3),
                (4, 5),
                (6, 3),
                (6, 5),
                (8, 5),
                (8, 10),
                (12, 10),
                (16, 10),
                (32, 20),
            ]
        return [{"probes": p, "rerank_factor": r} for p, r in grid]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        return self.index.search_batch(queries, k, threads=self.threads, **point)[0]

    def search_one(self, query: F32, k: int, point: dict[str, Any]) -> Any:
        return self.index.search(query, k, **point)

    def set_mode(self, mode: str) -> Iterator[None]:
        if mode != "ram" and not self.index.is_using_mmap:
            self.index.use_mmap_storage(Path(self._tmp.name) / "vectors.bin")
        yield

    def index_bytes(self) -> int:
        return self.index.memory_usage_bytes()

    def before_cold_query(self) -> None:
        self.index.drop_cache()


class FaissFlat(Runner):
    name = "faiss-flat"

    def setup(self) -> None:
        import faiss  # type: ignore[import-not-found]  # noqa: F401

    def build(self, train: F32, **params: Any) -> None:
        import faiss

        faiss.omp_set_num_threads(self.threads)
        if self.metric == "cosine":
            train = _normalise(train)
            self.index = faiss.IndexFlatIP(train.shape[1])
        else:
            self.index = faiss.IndexFlatL2(train.shape[1])
        self.index.add(np.ascontiguousarray(train))

    def points(self) -> list[dict[str, Any]]:
        return [{}]

    def _q(self, q: F32) -> F32:
        return _normalise(q) if self.metric == "cosine" else np.ascontiguousarray(q)

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        return self.index.search(self._q(queries), k)[1]

    def index_bytes(self) -> int:
        return int(self.index.ntotal * self.index.d * 4)


class FaissIVF(FaissFlat):
    name = "faiss-ivfflat"

    def build(self, train: F32, **params: Any) -> None:
        import faiss

        faiss.omp_set_num_threads(self.threads)
        d = train.shape[1]
        if self.metric == "cosine":
            train = _normalise(train)
        self.nlist = int(4 * math.sqrt(train.shape[0]))
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, metric)
        train = np.ascontiguousarray(train)
        self.index.train(train)
        self.index.add(train)
        self._quantizer = quantizer

    def drop(self) -> None:
        self.index = None
        self._quantizer = None

    def points(self) -> list[dict[str, Any]]:
        probes = [1, 2, 4, 8, 16, 32, 64] if self.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
        return [{"nprobe": p} for p in probes if p <= self.nlist]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self.index.nprobe = point["nprobe"]
        return self.index.search(self._q(queries), k)[1]

    def index_bytes(self) -> int:
        return int(self.index.ntotal * (self.index.d * 4 + 8) + self.nlist * self.index.d * 4)


class Hnswlib(Runner):
    name = "hnswlib"

    def setup(self) -> None:
        import hnswlib  # type: ignore[import-not-found]  # noqa: F401

    def build(self, train: F32, **params: Any) -> None:
        import hnswlib

        space = "cosine" if self.metric == "cosine" else "l2"
        self.index = hnswlib.Index(space=space, dim=train.shape[1])
        self.index.init_index(max_elements=train.shape[0], M=16, ef_construction=200, random_seed=0)
        self.index.set_num_threads(self.threads)
        self.index.add_items(train, np.arange(train.shape[0]))
        self.n, self.d = train.shape

    def points(self) -> list[dict[str, Any]]:
        efs = [10, 20, 40, 80, 160] if self.quick else [10, 20, 40, 80, 120, 200, 400, 800]
        return [{"ef": ef} for ef in efs]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self.index.set_ef(max(point["ef"], k))
        return self.index.knn_query(queries, k=k)[0].astype(np.int64)

    def index_bytes(self) -> int:
        return int(self.n * (self.d * 4 + 16 * 2 * 4 + 8 + 4))


class USearch(Runner):
    name = "usearch"

    def setup(self) -> None:
        import usearch.index  # type: ignore[import-not-found]  # noqa: F401

    def build(self, train: F32, **params: Any) -> None:
        from usearch.index import Index

        self.index = Index(
            ndim=train.shape[1], metric="cos" if self.metric == "cosine" else "l2sq", dtype="f32"
        )
        self.index.add(np.arange(train.shape[0]), train, threads=self.threads)

    def points(self) -> list[dict[str, Any]]:
        exps = [16, 32, 64, 128, 256] if self.quick else [16, 24, 32, 64, 128, 256, 512]
        return [{"expansion": e} for e in exps]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self.index.expansion_search = point["expansion"]
        res = self.index.search(queries, k, threads=self.threads)
        return np.asarray(res.keys, dtype=np.int64).reshape(queries.shape[0], -1)

    def index_bytes(self) -> int:
        return int(self.index.memory_usage)


RUNNERS: dict[str, type[Runner]] = {
    r.name: r for r in (VectorDB, FaissFlat, FaissIVF, Hnswlib, USearch)
}
