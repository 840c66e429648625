"""Array type aliases used across the package, for annotations that state dtypes.

Shapes are given in each docstring; these name the dtype only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["F32", "F64", "I64", "U64", "Mask"]

#: float32 array: vectors, distances, scores, norms.
F32 = npt.NDArray[np.float32]
#: float64 array: text-search and fused scores.
F64 = npt.NDArray[np.float64]
#: int64 array: ids, storage rows, leaf and node numbers.
I64 = npt.NDArray[np.int64]
#: uint64 array: packed binary codes, top-k keys.
U64 = npt.NDArray[np.uint64]
#: bool array: row masks (live, filtered).
Mask = npt.NDArray[np.bool_]
