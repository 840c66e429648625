"""Exact, tie-free top-m selection through 64-bit keys.

A candidate's key is its float32 score, mapped to a uint32 that sorts in the same order,
in the high half and its storage row in the low half. The m smallest keys are the m best
candidates, ties broken by the lower row. Every backend selects by these keys, so NumPy
and CuPy pick the same candidates from the same scores, whatever order they scan in.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["FMAX", "NO_KEY", "candidate_keys", "keys_of", "rows_of", "smallest"]

U64 = npt.NDArray[np.uint64]
#: Key of an empty slot: larger than any real candidate's.
NO_KEY = np.uint64(np.iinfo(np.uint64).max)
#: Largest float32: stands in for overflowed scores.
FMAX = float(np.finfo(np.float32).max)
_ROW_MASK = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)


def keys_of(scores: npt.NDArray[np.float32], rows: npt.NDArray[np.integer]) -> U64:
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


def rows_of(keys: U64) -> npt.NDArray[np.int64]:
    """Storage rows of ``keys``; ``-1`` for empty slots."""
    rows = (keys & _ROW_MASK).astype(np.int64)
    rows[keys == NO_KEY] = -1
    return rows


def candidate_keys(
    scores: npt.NDArray[np.float32],
    rows: npt.NDArray[np.integer],
    row_ok: npt.NDArray[np.bool_] | None = None,
) -> U64:
    """Keys of scanned candidates: ``scores`` ``(..., m)`` at storage ``rows`` ``(m,)``.

    Non-finite scores (float32 overflow of huge vectors) are clamped in place so that they
    stay ordered and apart from padding; rows without ``row_ok`` (deleted or filtered out)
    get ``NO_KEY``.
    """
    if not np.isfinite(scores).all():
        np.nan_to_num(scores, copy=False, nan=FMAX, posinf=FMAX, neginf=-FMAX)
    keys = keys_of(scores, rows)
    if row_ok is not None:
        keys[..., ~row_ok[rows]] = NO_KEY
    return keys
