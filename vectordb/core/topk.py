"""Exact, tie-free top-m selection through 64-bit keys.

A candidate's key is its float32 score, mapped to a uint32 that sorts in the same order,
in the high half and its storage row in the low half. The m smallest keys are the m best
candidates, ties broken by the lower row. Every backend selects by these keys, so NumPy
and CuPy pick the same candidates from the same scores, whatever order they scan in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64, Mask

__all__ = [
    "FMAX",
    "NO_KEY",
    "best_keys",
    "candidate_keys",
    "clamp_scores",
    "keys_of",
    "rows_of",
    "scores_of",
    "smallest",
    "within_bound",
]

#: Key of an empty slot: larger than any real candidate's.
NO_KEY = np.uint64(np.iinfo(np.uint64).max)
#: Largest float32: stands in for overflowed scores.
FMAX = float(np.finfo(np.float32).max)
_ROW_MASK = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)


def keys_of(scores: F32, rows: npt.NDArray[np.integer]) -> U64:
    """Keys of ``scores`` (any shape, finite float32) at storage ``rows`` (broadcastable)."""
    # + 0.0 turns -0.0 into +0.0, so that the two zeros tie (and fall back on the row).
    bits = np.ascontiguousarray(scores + np.float32(0.0), dtype=np.float32).view(np.uint32)
    ordered = np.where(bits & _SIGN, ~bits, bits | _SIGN).astype(np.uint64)
    return (ordered << np.uint64(32)) | np.asarray(rows).astype(np.uint64)


def smallest(keys: U64, m: int) -> U64:
    """The ``min(m, n)`` smallest keys of each row of ``keys`` ``(nq, n)``, unsorted."""
    if keys.shape[1] <= m:
        return keys
    return np.partition(keys, m - 1, axis=1)[:, :m]


def rows_of(keys: U64, xp: Any = np) -> I64:
    """Storage rows of ``keys``; ``-1`` for empty slots. ``xp`` is the array module (NumPy,
    or CuPy for device arrays)."""
    rows = (keys & xp.uint64(0xFFFFFFFF)).astype(xp.int64)
    return xp.where(keys == xp.uint64(NO_KEY), -1, rows)


def scores_of(keys: U64, xp: Any = np) -> F32:
    """Scores ``(...)`` float32 of ``keys`` (the inverse of :func:`keys_of`); ``inf`` for
    empty slots. ``xp`` is the array module (NumPy, or CuPy for device arrays)."""
    ordered = (keys >> xp.uint64(32)).astype(xp.uint32)
    sign = xp.uint32(0x80000000)
    bits = xp.where(ordered & sign, ordered ^ sign, ~ordered)
    scores = bits.view(xp.float32)
    return xp.where(keys == xp.uint64(NO_KEY), xp.float32(xp.inf), scores)


def within_bound(keys: U64, radius: F32, k: int, xp: Any = np) -> I64:
    """The candidates that may be among the ``k`` nearest, given each estimate's error bound.

    A candidate whose lower bound (estimate less radius) exceeds the ``k``-th smallest upper
    bound (estimate plus radius) among its query's candidates cannot be in the top ``k``
    unless a bound fails; only the others need the exact rerank.

    Parameters
    ----------
    keys : (nq, m) uint64 candidate keys (estimate, row), ``NO_KEY`` for none
    radius : (nq, m) float32 error bounds of the estimates (0: exact scores), >= 0
    k : results wanted per query
    xp : the array module (NumPy, or CuPy for device arrays)

    Returns
    -------
    (nq, m) int64 storage rows, ``-1`` where none or pruned (same columns as ``keys``).
    """
    rows = rows_of(keys, xp)
    if keys.shape[1] <= k:
        return rows
    est = scores_of(keys, xp)
    with np.errstate(over="ignore", invalid="ignore"):
        upper = est + radius
        kth = xp.partition(upper, k - 1, axis=1)[:, k - 1 : k]
        # NaN (a bound of a huge vector) compares false: kept.
        return xp.where(est - radius > kth, -1, rows)


def clamp_scores(scores: F32) -> F32:
    """Clamp non-finite ``scores`` (any shape, float32; float32 overflow of huge vectors)
    in place to ``+-FMAX`` (NaN to ``FMAX``), so that they stay ordered and apart from
    padding; returns ``scores``."""
    # One float64 sum is finite exactly when every score is (and cheaper than isfinite).
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, no warning
        total = scores.sum(dtype=np.float64)
    if not np.isfinite(total):
        np.nan_to_num(scores, copy=False, nan=FMAX, posinf=FMAX, neginf=-FMAX)
    return scores


def candidate_keys(
    scores: F32,
    rows: npt.NDArray[np.integer],
    row_ok: Mask | None = None,
) -> U64:
    """Keys of scanned candidates: ``scores`` ``(..., m)`` at storage ``rows`` ``(m,)``.

    Non-finite scores (float32 overflow of huge vectors) are clamped in place so that they
    stay ordered and apart from padding; rows without ``row_ok`` (deleted or filtered out)
    get ``NO_KEY``.
    """
    clamp_scores(scores)
    keys = keys_of(scores, rows)
    if row_ok is not None:
        keys[..., ~row_ok[rows]] = NO_KEY
    return keys


def best_keys(
    scores: F32,
    rows: npt.NDArray[np.integer],
    m: int,
    row_ok: Mask | None = None,
) -> U64:
    """``smallest(candidate_keys(scores, rows, row_ok), m)``, keying only the winners.

    Parameters
    ----------
    scores : (g, s) float32, modified in place (non-finite values clamped, rows without
        ``row_ok`` set to inf)
    rows : (s,) storage rows of the columns
    m : keys wanted per row
    row_ok : (R,) bool over storage rows, or ``None`` for all

    Returns
    -------
    (g, min(m, s)) uint64 keys, unsorted; the same set as the reference expression.

    A float32 partition finds each row's ``m``-th best score; the columns at or below it
    are keyed. Only a row with more of them than ``m`` (a tie at the ``m``-th place) is keyed
    whole, so the choice between equal scores still falls to the lower row.
    """
    g, s = scores.shape
    if s <= m or g == 0:
        return smallest(candidate_keys(scores, rows, row_ok), m)
    clamp_scores(scores)
    bad = None
    if row_ok is not None:
        bad = ~row_ok[rows]
        if bad.any():
            scores[:, bad] = np.inf
        else:
            bad = None
    kth = np.partition(scores, m - 1, axis=1)[:, m - 1 : m]
    inside = np.flatnonzero(scores <= kth)  # at least m per row, in row order
    tied = None
    if inside.shape[0] > g * m:
        counts = np.bincount(inside // s, minlength=g)
        tied = np.flatnonzero(counts > m)
        inside = inside[counts[inside // s] == m]
    col = inside % s
    keys = np.empty((g, m), dtype=np.uint64)
    picked = keys_of(scores.reshape(-1)[inside], rows[col])
    if bad is not None:
        picked[bad[col]] = NO_KEY
    if tied is None:
        keys[:] = picked.reshape(g, m)
    else:
        keys[np.flatnonzero(counts == m)] = picked.reshape(-1, m)
        keys[tied] = smallest(candidate_keys(scores[tied], rows, row_ok), m)
    return keys
