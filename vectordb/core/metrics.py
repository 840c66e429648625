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

from .._types import F32
from ..errors import InvalidParameterError, InvalidVectorsError

__all__ = ["Metric", "distances", "pairwise_distances", "parse_metric", "prepare"]


class Metric(str, enum.Enum):
    """Distance used by an index. Accepts the strings ``"l2"``, ``"cosine"``, ``"ip"``."""

    L2 = "l2"
    COSINE = "cosine"
    IP = "ip"

    @classmethod
    def _missing_(cls, value: object) -> Metric | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None

    def __str__(self) -> str:
        return self.value


def parse_metric(metric: Any) -> Metric:
    """Return the ``Metric`` named by ``metric`` (a ``Metric`` or its case-insensitive name)."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return Metric(metric)
        except ValueError:
            pass
    names = ", ".join(repr(m.value) for m in Metric)
    raise InvalidParameterError(f"unknown metric {metric!r}; use one of {names}")


#: Longest vector accepted for l2 and ip: twice its length, squared, still fits in float32.
MAX_NORM = float(np.sqrt(np.finfo(np.float32).max) / 2)


def _check_norms(x: F32) -> None:
    if float(np.abs(x).max()) * np.sqrt(x.shape[1]) <= MAX_NORM:
        return
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms > MAX_NORM).any():
        row = int(np.flatnonzero(norms > MAX_NORM)[0])
        raise InvalidVectorsError(
            f"row {row} has length {norms[row]:.3g}; the l2 and ip metrics accept lengths up "
            f"to {MAX_NORM:.3g} (float32 distances would overflow). Scale the data down, or "
            "use the cosine metric if only directions matter"
        )


def prepare(x: F32, metric: Metric, *, copy: bool = True) -> F32:
    """Return ``x`` (shape ``(n, d)``, float32) as the index stores it for ``metric``.

    Cosine rows are divided by their norm; a zero row has no direction and is rejected.
    For l2 and ip, rows longer than ``MAX_NORM`` are rejected: their squared distances would
    overflow float32.
    """
    if metric is not Metric.COSINE:
        _check_norms(x)
        return x.copy() if copy else x
    # Scale by the largest magnitude first: float32 squares overflow above ~1e19 and
    # underflow below ~1e-19, and either would turn a real direction into garbage.
    scale = np.abs(x).max(axis=1, keepdims=True)
    if not scale.all():
        row = int(np.flatnonzero(scale[:, 0] == 0)[0])
        raise InvalidVectorsError(
            f"row {row} is a zero vector, which has no direction for the cosine metric"
        )
    scaled = np.divide(x, scale, dtype=np.float32)
    norms = np.sqrt(np.einsum("nd,nd->n", scaled, scaled))[:, None]
    scaled /= norms  # in place: one copy of the input at peak, not two
    return scaled


def distances(q: F32, x: F32, metric: Metric, *, overwrite_x: bool = False) -> F32:
    """Exact distances between queries and their own candidate rows.

    Parameters
    ----------
    q : (nq, d) float32, prepared queries.
    x : (nq, m, d) float32, prepared candidate vectors of each query.
    overwrite_x : ``x`` may be used as scratch space (saves a temporary as large as ``x``).

    Returns
    -------
    (nq, m) float32 distances.
    """
    if metric is Metric.L2:
        diff = np.subtract(x, q[:, None, :], out=x if overwrite_x else None)
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
