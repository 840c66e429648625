"""Seeded synthetic data that behaves like sentence embeddings, for demos, tests and benchmarks.

Real embeddings are clustered (topics) and have a low intrinsic dimension: they vary along
far fewer directions than they have coordinates. Isotropic Gaussian blobs have neither
property (every neighbour is almost equally far away), so they make a poor test of an ANN
index. Here points are drawn around cluster centres in a ``latent_dim``-dimensional space,
lifted to ``dim`` coordinates by a fixed random linear map, given a per-dimension offset,
and blurred by a little isotropic noise.
"""

from __future__ import annotations

import numpy as np

from ._types import F32

__all__ = ["make_clustered"]


def make_clustered(
    n: int,
    dim: int,
    *,
    n_clusters: int | None = None,
    latent_dim: int = 48,
    noise: float = 0.05,
    seed: int = 0,
) -> F32:
    """``n`` clustered vectors of dimension ``dim``, as an ``(n, dim)`` float32 array.

    Parameters
    ----------
    n, dim : int
        Shape of the result.
    n_clusters : int, optional
        Number of topics; default ``max(1, n // 500)``.
    latent_dim : int
        Intrinsic dimension of the data.
    noise : float
        Standard deviation of the isotropic noise, relative to the signal's.
    seed : int
        The same seed gives the same array.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 500) if n_clusters is None else n_clusters
    latent_dim = min(latent_dim, dim)
    centres = rng.standard_normal((n_clusters, latent_dim)).astype(np.float32)
    lift = (rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)).astype(np.float32)
    offset = rng.uniform(-1.0, 1.0, dim).astype(np.float32)
    spread = rng.uniform(0.3, 0.7, n_clusters).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    block = 65536
    for start in range(0, n, block):
        m = min(block, n - start)
        label = rng.integers(n_clusters, size=m)
        latent = (
            centres[label]
            + rng.standard_normal((m, latent_dim)).astype(np.float32) * spread[label, None]
        )
        out[start : start + m] = latent @ lift + offset
        out[start : start + m] += rng.standard_normal((m, dim)).astype(np.float32) * noise
    return out
