"""Seeded, subsampled k-means: k-means++ initialisation, Lloyd iterations, empty-cluster repair.

Pure array code with no knowledge of trees or storage. Deterministic for a given ``rng`` state.
"""

from __future__ import annotations

import numpy as np

from .._types import F32, I64

__all__ = ["assign", "kmeans", "repair_empty"]


#: Like FAISS: at most this many training points per centroid.
SAMPLE_PER_CENTROID = 256
#: Rows per block when assigning many points, to bound temporary memory.
_BLOCK = 65536


def assign(x: F32, centroids: F32) -> I64:
    """Index of the nearest centroid (squared L2) for each row.

    Parameters
    ----------
    x : (n, d) float32
    centroids : (k, d) float32

    Returns
    -------
    (n,) int64 labels in ``[0, k)``; ties go to the lower index.
    """
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    labels = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], _BLOCK):
        block = x[start : start + _BLOCK]
        scores = c_sq[None, :] - 2.0 * (block @ centroids.T)
        labels[start : start + _BLOCK] = np.argmin(scores, axis=1)
    return labels


def _kmeans_pp(x: F32, k: int, rng: np.random.Generator) -> F32:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(n)]
    d2 = np.einsum("nd,nd->n", x - centres[0], x - centres[0])
    for i in range(1, k):
        # In float64: near the largest norms accepted, a float32 sum of squared distances
        # overflows (and then no probability is left to draw from).
        total = float(d2.sum(dtype=np.float64))
        if total <= 0.0:  # all remaining points coincide with chosen centres
            centres[i] = x[rng.integers(n)]
        else:
            centres[i] = x[rng.choice(n, p=d2.astype(np.float64) / total)]
        diff = x - centres[i]
        d2 = np.minimum(d2, np.einsum("nd,nd->n", diff, diff))
    return centres


def repair_empty(centroids: F32, counts: I64, rng: np.random.Generator) -> None:
    """Split the largest clusters into the empty ones, in place (FAISS's strategy)."""
    eps = np.float32(1.0 / 1024)
    for empty in np.flatnonzero(counts == 0):
        big = int(np.argmax(counts))
        if counts[big] <= 1:
            return
        noise = rng.standard_normal(centroids.shape[1], dtype=np.float32) * eps
        scale = np.abs(centroids[big]) + eps
        centroids[empty] = centroids[big] + noise * scale
        centroids[big] = centroids[big] - noise * scale
        counts[empty] = counts[big] // 2
        counts[big] -= counts[empty]


def kmeans(x: F32, k: int, *, max_iterations: int, rng: np.random.Generator) -> tuple[F32, I64]:
    """Cluster ``x`` into at most ``k`` groups.

    Trains on a random subsample of ``SAMPLE_PER_CENTROID * k`` rows when ``x`` is larger,
    then assigns every row.

    Parameters
    ----------
    x : (n, d) float32, n >= 1
    k : number of clusters, 1 <= k
    max_iterations : Lloyd iterations at most (stops early when assignments settle)
    rng : source of all randomness

    Returns
    -------
    centroids : (k, d) float32
    labels : (n,) int64, the nearest centroid of each row. Clusters may be empty when ``x``
        has fewer than ``k`` distinct rows.
    """
    n = x.shape[0]
    k = min(k, n)
    sample_size = SAMPLE_PER_CENTROID * k
    train = x if n <= sample_size else x[np.sort(rng.choice(n, sample_size, replace=False))]
    centroids = _kmeans_pp(train, k, rng)
    labels = assign(train, centroids)
    for _ in range(max_iterations):
        counts = np.bincount(labels, minlength=k).astype(np.int64)
        onehot = np.zeros((k, train.shape[0]), dtype=np.float32)
        onehot[labels, np.arange(train.shape[0])] = 1.0
        sums = onehot @ train
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        if not nonempty.all():
            repair_empty(centroids, counts, rng)
        new_labels = assign(train, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, (labels if train is x else assign(x, centroids))
