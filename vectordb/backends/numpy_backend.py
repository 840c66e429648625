"""Hamming distances on the CPU with NumPy (XOR + ``np.bitwise_count``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["NumpyBackend"]

U64 = npt.NDArray[np.uint64]

#: Below this many (query, code) pairs one broadcast XOR beats a loop over words: the loop
#: costs ~3 NumPy calls per word, which dominates small blocks (measured on x86-64, w=12).
_ONE_SHOT_PAIRS = 16384


class NumpyBackend:
    """Scores query codes against word-major code blocks on the CPU."""

    name = "numpy"

    @staticmethod
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
