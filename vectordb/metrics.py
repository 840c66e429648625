"""Metric names and exact distance kernels.

Distances are always "smaller is better":

========  =================================  ===========================
metric    distance                           stored vectors
========  =================================  ===========================
l2        squared Euclidean ``|x - q|^2``    as given
cosine    ``1 - cos(x, q)``                  normalised to unit length
ip        ``-<x, q>``                        as given
========  =================================  ===========================
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidParameterError, InvalidVectorsError

__all__ = ["Metric", "distances", "pairwise_distances", "parse_metric", "prepare"]

F32 = npt.NDArray[np.float32]


class Metric(str, enum.Enum):
    """Distance used by an index. Accepts the strings ``"l2"``, ``"cosine"``, ``"ip"``."""

    L2 = "l2"
    COSINE = "cosine"
    IP = "ip"

    def __str__(self) -> str:
        return self.value


def parse_metric(metric: Any) -> Metric:
    """Return the ``Metric`` named by ``metric`` (a ``Metric`` or its case-insensitive name)."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return Metric(metric.lower())
        except ValueError:
            pass
    names = ", ".join(repr(m.value) for m in Metric)
    raise InvalidParameterError(f"unknown metric {metric!r}; use one of {names}")


def prepare(x: F32, metric: Metric, *, copy: bool = True) -> F32:
    """Return ``x`` (shape ``(n, d)``, float32) as the index stores it for ``metric``.

    Cosine rows are divided by their norm; a zero row has no direction and is rejected.
    """
    if metric is not Metric.COSINE:
        return x.copy() if copy else x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise InvalidVectorsError(
            f"row {row} is a zero vector, which has no direction for the cosine metric"
        )
    return (x / norms).astype(np.float32, copy=False)


def distances(q: F32, x: F32, metric: Metric) -> F32:
    """Exact distances between queries and their own candidate rows.

    Parameters
    ----------
    q : (nq, d) float32, prepared queries.
    x : (nq, m, d) float32, prepared candidate vectors of each query.

    Returns
    -------
    (nq, m) float32 distances.
    """
    if metric is Metric.L2:
        diff = x - q[:, None, :]
        return np.einsum("qmd,qmd->qm", diff, diff)
    dots = np.einsum("qmd,qd->qm", x, q)
    if metric is Metric.COSINE:
        return np.float32(1.0) - dots
    return -dots


def pairwise_distances(q: F32, x: F32, metric: Metric) -> F32:
    """All distances between prepared queries ``(nq, d)`` and rows ``(n, d)``: ``(nq, n)`` float32.

    Brute force by matrix product, for ground truth and small exact scans. For L2 the result
    is clipped at 0 (the expansion ``|x|^2 - 2<x,q> + |q|^2`` can go slightly negative).
    """
    dots = q @ x.T
    if metric is Metric.L2:
        sq = np.einsum("nd,nd->n", x, x)[None, :] + np.einsum("qd,qd->q", q, q)[:, None]
        return np.maximum(sq - 2.0 * dots, 0.0).astype(np.float32, copy=False)
    if metric is Metric.COSINE:
        return (np.float32(1.0) - dots).astype(np.float32, copy=False)
    return (-dots).astype(np.float32, copy=False)
