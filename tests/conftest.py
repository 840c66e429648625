"""Shared data sets, indexes and an independent float64 brute-force oracle.

The oracle never calls into ``vectordb``: distances are recomputed here in float64 from
the raw vectors, so a bug in the library's own distance kernels cannot hide itself.

Ties: a returned id counts as a correct neighbour when its true distance is at most the
k-th smallest true distance plus a small float32 slack, so equal (or float32-equal)
distances may be returned in any order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import vectordb as vdb

METRICS = ("l2", "cosine", "ip")

#: Relative and absolute slack for comparing float32 distances with float64 ones.
RTOL = 1e-4
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _cpu_backend_unless_asked(monkeypatch):
    """The suite checks the CPU path's guarantees (results independent of the batch, bit
    for bit); with ``backend="auto"`` a GPU machine would run the CuPy path instead.
    ``test_backends.py`` names its backends. ``VECTORDB_BACKEND`` set by hand wins."""
    if not os.environ.get("VECTORDB_BACKEND"):
        monkeypatch.setenv("VECTORDB_BACKEND", "numpy")


# --------------------------------------------------------------------------- oracle


def slack(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """How far a float32 distance may stray from the float64 one."""
    return ATOL + RTOL * np.abs(np.asarray(values, dtype=np.float64))


def exact_distances(
    vectors: npt.ArrayLike, queries: npt.ArrayLike, metric: str
) -> npt.NDArray[np.float64]:
    """All true distances ``(nq, n)`` in float64: l2 squared, cosine ``1 - cos``, ip ``-dot``."""
    x = np.asarray(vectors, dtype=np.float64)
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    dots = q @ x.T
    if metric == "l2":
        sq = (q * q).sum(axis=1)[:, None] + (x * x).sum(axis=1)[None, :] - 2.0 * dots
        return np.maximum(sq, 0.0)
    if metric == "cosine":
        return 1.0 - dots
    if metric == "ip":
        return -dots
    raise AssertionError(f"unknown metric {metric!r}")


def kth_distance(true: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.float64]:
    """The k-th smallest true distance of every query (the last one if n < k)."""
    k = min(k, true.shape[1])
    return np.partition(true, k - 1, axis=1)[:, k - 1]


def recall(ids: npt.NDArray[np.int64], true: npt.NDArray[np.float64], k: int) -> float:
    """Tie-tolerant recall@k of ``ids`` ``(nq, k)`` against true distances ``(nq, n)``."""
    ids = np.atleast_2d(ids)
    limit = kth_distance(true, k)
    limit = limit + slack(limit)
    hits = 0
    for row, found in enumerate(ids):
        found = np.unique(found[found >= 0])
        hits += int(np.count_nonzero(true[row, found] <= limit[row]))
    return hits / (min(k, true.shape[1]) * ids.shape[0])


def assert_exact_answer(
    ids: npt.NDArray[np.int64],
    dists: npt.NDArray[np.float32],
    true: npt.NDArray[np.float64],
    k: int,
) -> None:
    """``ids``/``dists`` ``(nq, k)`` are a correct k-NN answer (ties in any order)."""
    ids, dists = np.atleast_2d(ids), np.atleast_2d(dists)
    n = true.shape[1]
    found = min(k, n)
    assert ids.shape == dists.shape == (true.shape[0], k)
    # Padding only where fewer than k vectors exist.
    assert (ids[:, :found] >= 0).all()
    assert (ids[:, found:] == -1).all()
    assert np.isposinf(dists[:, found:]).all()
    expected = np.sort(true, axis=1)[:, :found]
    for row in range(true.shape[0]):
        got = ids[row, :found]
        assert np.unique(got).size == found, f"query {row}: duplicate ids {got}"
        limit = expected[row, -1] + slack(expected[row, -1])
        assert (true[row, got] <= limit).all(), (
            f"query {row}: {got} are not all among the {k} nearest"
        )
    np.testing.assert_allclose(dists[:, :found], expected, rtol=RTOL, atol=ATOL)


def exact_params(index: vdb.ClusteredIndex, k: int) -> dict[str, int]:
    """Search parameters under which the index must scan everything and rerank exactly.

    Nodes at one depth of the tree own disjoint sets of leaves, so no level has more than
    ``n_leaves`` nodes and ``probes=n_leaves`` keeps every node; ``k * rerank_factor >= n``
    reranks every vector.
    """
    return {"probes": index.n_leaves, "rerank_factor": math.ceil(len(index) / k)}


class Oracle:
    """The brute-force helpers, handed to tests as the ``oracle`` fixture."""

    distances = staticmethod(exact_distances)
    recall = staticmethod(recall)
    assert_exact = staticmethod(assert_exact_answer)
    exact_params = staticmethod(exact_params)
    slack = staticmethod(slack)
    RTOL = RTOL
    ATOL = ATOL


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    """Each metric name in turn (tests may parametrize ``metric`` themselves instead)."""
    return str(request.param)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """Indexed vectors and held-out queries from the same distribution (float32)."""

    name: str
    vectors: npt.NDArray[np.float32]
    queries: npt.NDArray[np.float32]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _split(name: str, data: npt.NDArray[np.float32], n_queries: int) -> Dataset:
    data.setflags(write=False)  # shared by many tests: nobody may change it
    return Dataset(name, data[:-n_queries], data[-n_queries:])


@pytest.fixture(scope="session")
def clustered() -> Dataset:
    """10,000 embedding-like vectors of dimension 128, 200 queries."""
    return _split("clustered", vdb.make_clustered(10_200, 128, seed=0), 200)


@pytest.fixture(scope="session")
def small() -> Dataset:
    """2,000 embedding-like vectors of dimension 32, 50 queries: for quick functional tests."""
    return _split("small", vdb.make_clustered(2_050, 32, seed=11), 50)


@pytest.fixture(scope="session")
def gaussian() -> Dataset:
    """4,000 isotropic Gaussian vectors of dimension 32, 50 queries: no cluster structure."""
    rng = np.random.default_rng(12345)
    return _split("gaussian", rng.standard_normal((4_050, 32)).astype(np.float32), 50)


@pytest.fixture(scope="session")
def shared_index() -> Callable[..., vdb.ClusteredIndex]:
    """Build (once per session) an index over a data set; callers must not modify it.

    Tests that change an index (``use_mmap_storage``, ``close``) build their own.
    """
    cache: dict[tuple[Any, ...], vdb.ClusteredIndex] = {}

    def get(data: Dataset, metric: str = "l2", **params: Any) -> vdb.ClusteredIndex:
        # Codes unless a test asks otherwise (as "auto" picks; 4 bits a coordinate below 128
        # dimensions, 1 above); tests/test_leaf_scan.py covers both ways and the bits.
        params.setdefault("leaf_scan", "codes")
        key = (data.name, metric, tuple(sorted(params.items())))
        if key not in cache:
            cache[key] = vdb.ClusteredIndex.build(data.vectors, metric=metric, **params)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def truth() -> Callable[[Dataset, str], npt.NDArray[np.float64]]:
    """True distances ``(nq, n)`` from a data set's queries to its vectors, cached."""
    cache: dict[tuple[str, str], npt.NDArray[np.float64]] = {}

    def get(data: Dataset, metric: str) -> npt.NDArray[np.float64]:
        if (data.name, metric) not in cache:
            cache[data.name, metric] = exact_distances(data.vectors, data.queries, metric)
        return cache[data.name, metric]

    return get


@pytest.fixture(scope="session")
def saved_index(tmp_path_factory: pytest.TempPathFactory, small: Dataset) -> Path:
    """A saved l2 index (with rotation files) over ``small``. Copy it before changing it."""
    path = tmp_path_factory.mktemp("saved") / "index"
    vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200).save(path)
    return path
