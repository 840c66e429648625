"""The CPU backend: Hamming distances with NumPy (XOR + ``np.bitwise_count``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..codes import CodeTable, estimate, query_side
from ..leafscan import select_candidates
from ..parts import Part

__all__ = ["NumpyBackend", "NumpyCodeSelector"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]

#: Below this many (query, code) pairs one broadcast XOR beats a loop over words: the loop
#: costs ~3 NumPy calls per word, which dominates small blocks (measured on x86-64, w=12).
_ONE_SHOT_PAIRS = 16384


def hamming(queries: U64, codes: U64) -> npt.NDArray[np.uint16]:
    """Hamming distances between every query and every code.

    Parameters
    ----------
    queries : (nq, w) uint64, row-major query codes
    codes : (w, m) uint64, word-major codes (each row one word of every code); may be a
        column slice of a larger array

    Returns
    -------
    (nq, m) uint16 distances (at most 64 * w, so w <= 1024).
    """
    if queries.shape[0] * codes.shape[1] <= _ONE_SHOT_PAIRS:
        x = np.bitwise_count(queries[:, :, None] ^ codes[None, :, :])
        return x.sum(axis=1, dtype=np.uint16)
    # One contiguous word row at a time keeps temporaries at (nq, m) for large blocks.
    acc = np.bitwise_count(queries[:, 0, None] ^ codes[0][None, :]).astype(np.uint16)
    for j in range(1, codes.shape[0]):
        acc += np.bitwise_count(queries[:, j, None] ^ codes[j][None, :])
    return acc


class NumpyCodeSelector:
    """Picks candidates from binary codes on the CPU, leaf by leaf (see ``leafscan``)."""

    def __init__(self, table: CodeTable, parts: Sequence[Part]) -> None:
        self.table = table
        self.parts = tuple(parts)

    def score(self, q: F32, leaf: int, part: Part, a: int, b: int) -> F32:
        """``(nq, b - a)`` float32 estimates of slots ``a:b`` for rotated queries ``q``."""
        table = self.table
        if part.codes is None or part.norms is None:
            raise TypeError("this part holds no codes")
        side = query_side(table, q, np.full(q.shape[0], leaf, dtype=np.int64))
        dots = part.dots[a:b] if part.dots is not None else None
        with np.errstate(over="ignore", invalid="ignore"):
            return estimate(
                hamming(side.codes, part.codes[:, a:b]),
                part.norms[a:b],
                side.r_q,
                table.cos_lut,
                table.metric,
                dots,
                side.c_q,
            )

    def select(self, rotated_queries: F32, leaves: I64, m: int, row_ok: B | None = None) -> I64:
        """``(nq, m')`` int64 rows: see ``leafscan.select_candidates``."""
        return select_candidates(self, self.parts, rotated_queries, leaves, m, row_ok)


class NumpyBackend:
    """NumPy on the CPU: always available."""

    name = "numpy"
    hamming = staticmethod(hamming)

    def code_selector(self, table: CodeTable, parts: Sequence[Part]) -> NumpyCodeSelector:
        """A candidate selector over the codes of ``parts`` (nothing to copy on the CPU)."""
        return NumpyCodeSelector(table, parts)
