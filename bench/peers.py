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
from vectordb.index.build import AUTO_ONE_BIT_MIN_DIM

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
        # Below 128 d the defaults rank by 4-bit codes; exact leaf scans on the full vectors
        # (the earlier default there) are measured beside them.
        exact = [{"leaf_scan": "vectors"}] if dim < AUTO_ONE_BIT_MIN_DIM else []
        if self.quick:
            return [{}, *exact]
        # A wider tree: measured better at high recall with codes (fashion-mnist, synthetic:
        # 16) and with exact leaf scans (glove-50: 32).
        return [{}, {"branching_factor": 16 if dim >= 128 else 32}, *exact]

    def build(self, train: F32, **params: Any) -> None:
        self.index = vdb.ClusteredIndex.build(train, metric=self.metric, seed=0, **params)
        self._tmp = tempfile.TemporaryDirectory(prefix="vectordb-bench-")

    def drop(self) -> None:
        self.index.close()
        self.index = None
        self._tmp.cleanup()

    def points(self) -> list[dict[str, Any]]:
        # {} is the calibrated default (probes for target_recall 0.95, bounded rerank).
        if self.index.leaf_scan == "vectors":
            # Probed leaves are ranked exactly: only probes matter, candidates = k.
            probes = [8, 32, 64, 128, 256] if self.quick else [8, 16, 32, 48, 64, 96, 128, 192, 256]
            return [{}] + [{"probes": p, "rerank_factor": 1} for p in probes]
        # RaBitQ estimates with their error bound decide the rerank (rerank_factor left to
        # the index): only probes are swept. The wide end is for recall 0.99 on sentence
        # embeddings (pydocs-minilm: probes=256 gave 0.991 in-sample on 2026-12-01).
        if self.quick:
            probes = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256]
        else:
            probes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384]
        return [{}] + [{"probes": p} for p in probes]

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

    def _coarse(self, train: F32) -> tuple[F32, Any, Any]:
        """The training vectors (normalised for cosine), faiss's metric and a flat coarse
        quantizer; sets ``nlist = 4 sqrt(n)``."""
        import faiss

        faiss.omp_set_num_threads(self.threads)
        d = train.shape[1]
        if self.metric == "cosine":
            train = _normalise(train)
        self.nlist = int(4 * math.sqrt(train.shape[0]))
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        return np.ascontiguousarray(train), metric, quantizer

    def build(self, train: F32, **params: Any) -> None:
        import faiss

        train, metric, quantizer = self._coarse(train)
        self.index = faiss.IndexIVFFlat(quantizer, train.shape[1], self.nlist, metric)
        self.index.train(train)
        self.index.add(train)
        self._quantizer = quantizer

    def drop(self) -> None:
        self.index = None
        self._quantizer = None

    def points(self) -> list[dict[str, Any]]:
        # Far enough for recall 0.99 on every data set (glove-50 needs ~256 of 2,526 lists,
        # pydocs-minilm ~384 of 1,326).
        if self.quick:
            probes = [2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
        else:
            probes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
        return [{"nprobe": p} for p in probes if p <= self.nlist]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self.index.nprobe = point["nprobe"]
        return self.index.search(self._q(queries), k)[1]

    def index_bytes(self) -> int:
        return int(self.index.ntotal * (self.index.d * 4 + 8) + self.nlist * self.index.d * 4)


class FaissIVFRaBitQ(FaissIVF):
    """faiss ``IndexIVFRaBitQ`` (1-bit RaBitQ codes of the residuals, queries quantised to
    ``QB`` bits) inside ``IndexRefineFlat`` (the ``k * k_factor`` best by the code estimate
    are reranked on the exact float32 vectors). ``nlist = 4 sqrt(n)`` as for IVFFlat; the
    sweep is ``nprobe`` x ``k_factor``."""

    name = "faiss-ivfrabitq"
    #: Bits of the quantised query (faiss's default for IndexIVFRaBitQ; 0 = float queries).
    QB = 4

    def setup(self) -> None:
        import faiss

        if not hasattr(faiss, "IndexIVFRaBitQ"):
            raise ImportError(
                f"faiss {faiss.__version__} has no IndexIVFRaBitQ: faiss-cpu >= 1.11 needed"
            )

    def build(self, train: F32, **params: Any) -> None:
        import faiss

        train, metric, quantizer = self._coarse(train)
        ivf = faiss.IndexIVFRaBitQ(quantizer, train.shape[1], self.nlist, metric)
        ivf.qb = self.QB
        self.index = faiss.IndexRefineFlat(ivf)
        self.index.train(train)
        self.index.add(train)
        self._quantizer, self._ivf = quantizer, ivf

    def drop(self) -> None:
        self.index = None
        self._quantizer = self._ivf = None

    def points(self) -> list[dict[str, Any]]:
        # pydocs-minilm needs nprobe 384 of 1,326 lists and k_factor 8 for recall 0.99.
        if self.quick:
            probes, factors = [4, 8, 16, 32, 64, 128, 256, 384, 512], [2, 4, 8, 16]
        else:
            probes = [2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
            factors = [1, 2, 4, 8, 16]
        return [{"nprobe": p, "k_factor": f} for p in probes if p <= self.nlist for f in factors]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self._ivf.nprobe = point["nprobe"]
        self.index.k_factor = float(point["k_factor"])
        return self.index.search(self._q(queries), k)[1]

    def index_bytes(self) -> int:
        n, d = self.index.ntotal, self.index.d
        return int(n * (self._ivf.code_size + 8 + d * 4) + self.nlist * d * 4)


class ScaNN(Runner):
    """Google's ScaNN (``scann`` on PyPI, its pybind searcher: no TensorFlow): a k-means tree
    of ``leaves`` partitions (``sqrt(n)`` or ``2 sqrt(n)``; spherical for cosine), scored
    by asymmetric hashing (2 dimensions a block, 16 centres: 4 bits per 2 dimensions;
    anisotropic loss with threshold 0.2 for cosine, plain for l2, where the anisotropic
    loss, made for inner products, does not apply), then the ``reorder`` best rescored on
    float32 vectors. The sweep is ``leaves_to_search`` x ``reorder``."""

    name = "scann"
    AVQ_THRESHOLD = 0.2
    DIMS_PER_BLOCK = 2

    def setup(self) -> None:
        try:
            from scann.scann_ops.py import scann_ops_pybind  # type: ignore[import-not-found]
        except ImportError as exc:  # the message is what the runner's skip line shows
            raise ImportError(
                f"ScaNN unavailable: 'from scann.scann_ops.py import scann_ops_pybind' failed "
                f"({exc}); pip install scann (Linux wheels only)"
            ) from exc
        self._pybind = scann_ops_pybind

    def builds(self, dim: int) -> list[dict[str, Any]]:
        if self.quick:
            return [{"leaves": "2sqrt(n)"}]
        return [{"leaves": "sqrt(n)"}, {"leaves": "2sqrt(n)"}]

    def build(self, train: F32, **params: Any) -> None:
        factor = float(params.get("leaves", "2sqrt(n)").removesuffix("sqrt(n)") or 1)
        n, d = train.shape
        self.n, self.d = n, d
        self.num_leaves = max(2, round(factor * math.sqrt(n)))
        cosine = self.metric == "cosine"
        x = _normalise(train) if cosine else np.ascontiguousarray(train, dtype=np.float32)
        builder = (
            self._pybind.builder(x, 10, "dot_product" if cosine else "squared_l2")
            .set_n_training_threads(self.threads)
            .tree(
                num_leaves=self.num_leaves,
                num_leaves_to_search=max(1, self.num_leaves // 20),
                training_sample_size=min(n, 250_000),
                spherical=cosine,
            )
            .score_ah(
                self.DIMS_PER_BLOCK,
                anisotropic_quantization_threshold=self.AVQ_THRESHOLD if cosine else float("nan"),
            )
            .reorder(100)
        )
        self.index = builder.build()
        self.index.set_num_threads(self.threads)
        del x, builder

    def points(self) -> list[dict[str, Any]]:
        # Fractions of the leaves: pydocs-minilm needs ~30% (200 of 663) and a reorder of 50
        # for recall 0.99.
        if self.quick:
            fracs, reorders = [0.01, 0.02, 0.04, 0.08, 0.16, 0.3, 0.45], [20, 50, 150]
        else:
            fracs = [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.45]
            reorders = [20, 50, 100, 200, 400]
        leaves = sorted({max(1, round(f * self.num_leaves)) for f in fracs})
        return [{"leaves_to_search": lv, "reorder": r} for lv in leaves for r in reorders]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        q = _normalise(queries) if self.metric == "cosine" else np.ascontiguousarray(queries)
        search = (
            self.index.search_batched if self.threads == 1 else self.index.search_batched_parallel
        )
        found, _ = search(
            q,
            final_num_neighbors=k,
            pre_reorder_num_neighbors=max(point["reorder"], k),
            leaves_to_search=point["leaves_to_search"],
        )
        return np.asarray(found, dtype=np.int64)

    def search_one(self, query: F32, k: int, point: dict[str, Any]) -> Any:
        q = query / np.linalg.norm(query) if self.metric == "cosine" else query
        return self.index.search(
            np.ascontiguousarray(q, dtype=np.float32),
            final_num_neighbors=k,
            pre_reorder_num_neighbors=max(point["reorder"], k),
            leaves_to_search=point["leaves_to_search"],
        )

    def index_bytes(self) -> int:
        """An estimate: AH codes (4 bits per block), float32 reorder vectors, 4-byte
        datapoint ids, leaf centres."""
        code = math.ceil(self.d / self.DIMS_PER_BLOCK) / 2
        return int(self.n * (code + 4 * self.d + 4) + self.num_leaves * self.d * 4)


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
        # glove-50 needs ef ~400-800 for recall 0.99
        efs = (
            [10, 20, 40, 80, 160, 320, 640] if self.quick else [10, 20, 40, 80, 120, 200, 400, 800]
        )
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
        exps = [16, 32, 64, 128, 256, 512] if self.quick else [16, 24, 32, 64, 128, 256, 512, 1024]
        return [{"expansion": e} for e in exps]

    def search_batch(self, queries: F32, k: int, point: dict[str, Any]) -> npt.NDArray[np.int64]:
        self.index.expansion_search = point["expansion"]
        res = self.index.search(queries, k, threads=self.threads)
        return np.asarray(res.keys, dtype=np.int64).reshape(queries.shape[0], -1)

    def index_bytes(self) -> int:
        return int(self.index.memory_usage)


RUNNERS: dict[str, type[Runner]] = {
    r.name: r for r in (VectorDB, FaissFlat, FaissIVF, FaissIVFRaBitQ, ScaNN, Hnswlib, USearch)
}
