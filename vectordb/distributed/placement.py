"""Which shard holds a vector, and which shards a query is sent to (pure array code).

* ``hash``: shard ``splitmix64(id) % shards``. splitmix64 (Steele, Lea, Flood 2014; the
  seeding step of xoroshiro) is a fixed bijection of 64-bit integers with good avalanche,
  so consecutive ids spread evenly and the answer never depends on the process (Python's
  ``hash`` is salted for str and the identity for small ints).
* ``kmeans``: shard = nearest centroid (squared L2, on the vectors as the index stores them:
  unit length for cosine) of a coarse k-means; a query can then be routed to the ``m``
  shards whose centroids are nearest it (:func:`route`).
"""

from __future__ import annotations

import numpy as np

from .._types import F32, I64
from ..core.kmeans import SAMPLE_PER_CENTROID, assign, kmeans

__all__ = ["assign_shards", "hash_shards", "route", "sample_size", "splitmix64", "train_centroids"]

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: I64) -> np.ndarray:
    """``(n,)`` int64 ids -> ``(n,)`` uint64 splitmix64 outputs (wrapping arithmetic)."""
    z = ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def hash_shards(ids: I64, shards: int) -> I64:
    """``(n,)`` int64 ids -> ``(n,)`` int64 shard numbers in ``[0, shards)``."""
    return (splitmix64(ids) % np.uint64(shards)).astype(np.int64)


def train_centroids(sample: F32, shards: int, *, seed: int, max_iterations: int = 20) -> F32:
    """``(shards, d)`` float32 centroids of a k-means over ``sample`` ``(m, d)`` (prepared
    vectors). With fewer distinct rows than shards, some centroids repeat (their shards
    stay empty)."""
    rng = np.random.default_rng([seed, 0x5A4D])
    centroids, _ = kmeans(sample, shards, max_iterations=max_iterations, rng=rng)
    if centroids.shape[0] < shards:  # fewer rows than shards: pad with copies
        extra = np.repeat(centroids[:1], shards - centroids.shape[0], axis=0)
        centroids = np.concatenate([centroids, extra])
    return np.ascontiguousarray(centroids, dtype=np.float32)


def sample_size(shards: int) -> int:
    """Rows :func:`train_centroids` wants: as many as k-means trains on at most."""
    return SAMPLE_PER_CENTROID * shards


def assign_shards(x: F32, centroids: F32) -> I64:
    """``(n, d)`` prepared vectors -> ``(n,)`` int64 nearest-centroid shard numbers."""
    return assign(np.ascontiguousarray(x, dtype=np.float32), centroids)


def route(queries: F32, centroids: F32, m: int) -> I64:
    """The ``m`` shards whose centroids are nearest each query.

    Parameters
    ----------
    queries : (nq, d) float32, prepared (unit length for cosine)
    centroids : (shards, d) float32
    m : int in [1, shards]

    Returns
    -------
    (nq, m) int64 shard numbers, nearest first (ties to the lower number).
    """
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    scores = c_sq[None, :] - 2.0 * (queries @ centroids.T)
    order = np.argsort(scores, axis=1, kind="stable")
    return np.ascontiguousarray(order[:, :m], dtype=np.int64)
