"""The query side of the RaBitQ estimate (``core.codes``): a rotated query, less the
index's origin, quantised to ``QUERY_BITS`` bits a coordinate as bit planes, with the terms
the estimate and its error bound take of it.

``q_i ~ lo + delta * u_i`` with ``u_i`` in ``0..2**QUERY_BITS - 1``, from each query's own
smallest and largest coordinate, so a query quantises the same alone or in a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._types import F32, U64
from .codes import level_norm_bound, level_scale, pack_signs

__all__ = ["QUERY_BITS", "QueryCodes", "quantize_queries", "query_levels", "slack_per_step"]

#: Bits a coordinate of the rotated query is quantised to. 4 bits ranked as well as exact
#: float queries on pydocs-minilm, fashion-mnist and synthetic data (recall of the probed
#: leaves' true top 10 within 40 candidates: 0.996 vs 0.996, 0.999 vs 1.0, 1.0 vs 1.0).
QUERY_BITS = 4


@dataclass(frozen=True)
class QueryCodes:
    """Rotated queries quantised to ``QUERY_BITS`` bits a coordinate, as bit planes.

    Attributes
    ----------
    planes : (nq, QUERY_BITS, w) uint64, plane ``j`` holds bit ``j`` of every ``u_i``
    lo : (nq,) float32, the value of ``u_i = 0``
    delta : (nq,) float32, the step between levels
    total : (nq,) float32, ``L sum_i u_i`` (``L`` of the codes it scores)
    slack : (nq,) float32, ``delta * slack_per_step(D, code_bits)``: times a vector's
        ``M``, what rounding the query to its levels adds to the estimate's error bound
    """

    planes: U64
    lo: F32
    delta: F32
    total: F32
    slack: F32


def query_levels(q: Any, xp: Any = np, code_bits: int = 1) -> tuple[Any, Any, Any, Any, Any]:
    """The levels of rotated queries less the origin, ``q`` ``(nq, D)`` float32: ``u``
    ``(nq, D)`` uint8 in ``0..2**QUERY_BITS - 1``, and ``lo``, ``delta``, ``total``,
    ``slack`` ``(nq,)`` float32 (see :class:`QueryCodes`), for codes of ``code_bits``.
    ``xp`` is the array module (NumPy, or CuPy for device arrays): both backends quantise
    with these float32 steps.

    Row by row (min, max and rounding of its own values), so a query quantises the same alone
    or in a batch.
    """
    levels = (1 << QUERY_BITS) - 1
    lo = q.min(axis=1)
    delta = (q.max(axis=1) - lo) / xp.float32(levels)
    delta = xp.where(delta > 0, delta, xp.float32(1.0)).astype(xp.float32)
    u = xp.rint((q - lo[:, None]) / delta[:, None])
    u = xp.clip(u, 0, levels).astype(xp.uint8)
    # An integer below 2^24 times a small one: exact in float32, as the kernels take it.
    total = (u.sum(axis=1, dtype=xp.int64) * level_scale(code_bits)).astype(xp.float32)
    # Rounding errs by at most delta / 2 a coordinate, uniformly: sum_i y_i err_i has a
    # standard deviation of delta |y| / sqrt(12). One such sigma added to the code's EPS0
    # sigmas bounds EPS0 sigmas of the two errors together (they are independent) while
    # the rounding's is at most the code's.
    slack = delta * xp.float32(slack_per_step(q.shape[1], code_bits))
    return u, lo.astype(xp.float32), delta, total, slack


def slack_per_step(dim: int, code_bits: int = 1) -> float:
    """A bound on ``|y| / sqrt(12)``, the standard deviation of ``sum_i y_i err_i`` over
    ``D`` coordinates rounded to steps of 1 (``QueryCodes.slack`` is ``delta`` times it):
    ``sqrt(D / 12)`` with one bit, where ``|y| = sqrt(D)``; ``codes.level_norm_bound`` times
    that with more."""
    return math.sqrt(dim / 12.0) * level_norm_bound(code_bits)


def quantize_queries(q: F32, code_bits: int = 1) -> QueryCodes:
    """:class:`QueryCodes` of rotated queries less the origin, ``q`` ``(nq, D)`` float32,
    for codes of ``code_bits`` (see :func:`query_levels`)."""
    u, lo, delta, total, slack = query_levels(q, np, code_bits)
    planes = np.stack([pack_signs((u >> j) & 1) for j in range(QUERY_BITS)], axis=1)
    return QueryCodes(planes, lo, delta, total, slack)
