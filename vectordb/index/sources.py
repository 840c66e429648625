"""Vectors read block by block for a build that must not hold them all: an array, a
memory-mapped ``.npy``, or an iterable of ``(m, d)`` batches (spilled to a file on the way,
since a build reads its input more than once).

Every block is checked and prepared for the metric as it is read (``_validation.as_matrix``,
``core.metrics.prepare``), so a bad row is reported with its row number in the whole input.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._types import F32, I64
from .._validation import as_matrix
from ..core.metrics import Metric, prepare
from ..errors import InvalidVectorsError

__all__ = ["FileRows", "VectorSource"]


class VectorSource:
    """``n`` rows of ``dim`` float32, read in blocks of at most ``rows_per_block`` rows.

    Build one with :meth:`of`; the rows come out prepared for ``metric``.
    """

    def __init__(self, rows: Any, metric: Metric, rows_per_block: int) -> None:
        """``rows``: a 2-D array (NumPy, memory-mapped or not) of real numbers."""
        if getattr(rows, "ndim", None) != 2:
            raise InvalidVectorsError(
                f"vectors must be a 2-D array of shape (n, dim), got shape "
                f"{getattr(rows, 'shape', None)}"
            )
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            raise InvalidVectorsError(f"vectors are empty (shape {rows.shape})")
        self._rows = rows
        self.metric = metric
        self.n, self.dim = int(rows.shape[0]), int(rows.shape[1])
        self.rows_per_block = max(1, rows_per_block)

    @classmethod
    def of(cls, vectors: Any, metric: Metric, block_bytes: int, spill: Path) -> VectorSource:
        """A source over ``vectors``: an array (or anything ``np.asarray`` makes 2-D without
        copying a memmap), or an iterable of 2-D batches, written to the file ``spill``
        (float32, row after row) as they come. ``block_bytes``: the most each block takes."""
        rows_listed = isinstance(vectors, (list, tuple)) and len(vectors) > 0
        if rows_listed and np.ndim(vectors[0]) == 1:  # a list of rows, as a build in RAM takes
            vectors = np.asarray(vectors)
        if isinstance(vectors, np.ndarray) or hasattr(vectors, "__array__"):
            rows: Any = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
            dim = rows.shape[1] if rows.ndim == 2 else 1
            if isinstance(rows, np.memmap) and FileRows.fits(rows):
                rows = FileRows(Path(str(rows.filename)), int(rows.offset), rows.dtype, rows.shape)
            return cls(rows, metric, block_bytes // max(1, 4 * dim))
        if not isinstance(vectors, Iterable) or isinstance(vectors, (str, bytes)):
            raise InvalidVectorsError(
                "vectors must be an array, a memory-mapped .npy, or an iterable of (m, d) "
                f"batches, got {type(vectors).__name__}"
            )
        n, dim = _spill(vectors, spill)
        if n == 0:
            raise InvalidVectorsError("vectors are empty: the iterable gave no rows")
        spilled = FileRows(spill, 0, np.dtype("<f4"), (n, dim))
        return cls(spilled, metric, block_bytes // (4 * dim))

    def blocks(self) -> Iterator[tuple[int, F32]]:
        """``(start, rows)``: every block in order, ``(m, dim)`` float32 prepared."""
        for start in range(0, self.n, self.rows_per_block):
            yield start, self.block(start, min(self.n, start + self.rows_per_block))

    def block(self, start: int, stop: int) -> F32:
        """Rows ``start:stop``, checked and prepared (``(stop - start, dim)`` float32)."""
        return self._prepared(self._rows[start:stop], np.arange(start, stop))

    def take(self, rows: I64) -> F32:
        """Rows ``rows`` (ascending ``(m,)`` int64), checked and prepared."""
        return self._prepared(self._rows[rows], rows)

    def _prepared(self, raw: Any, rows: I64) -> F32:
        """``raw`` checked and prepared for the metric. A non-finite value or a zero row
        (cosine) is reported at its row of the input (``rows``: each one's), not of the
        block; other errors are ``as_matrix``'s and ``prepare``'s. (The checks are theirs:
        only a block they refuse is looked at again, for its row numbers.)"""
        try:
            x = as_matrix(raw, "vectors", self.dim)
        except InvalidVectorsError:
            _finite(np.asarray(raw), rows)
            raise
        try:
            return prepare(x, self.metric, copy=False)
        except InvalidVectorsError:
            zero = np.flatnonzero(~x.any(axis=1))
            if self.metric is Metric.COSINE and zero.shape[0]:
                raise InvalidVectorsError(
                    f"row {int(rows[zero[0]])} is a zero vector, which has no direction for "
                    "the cosine metric"
                ) from None
            raise


class FileRows:
    """The rows of a C-ordered 2-D array in a file, read with ``pread`` (never mapped, so a
    pass over them leaves nothing resident in the process: only in the page cache, which
    the OS reclaims). Indexed like the array: a slice, or ascending row numbers."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]):
        self.path, self.offset, self.dtype = path, offset, dtype
        self.shape = (int(shape[0]), int(shape[1]))
        self.ndim = 2
        self._row = self.shape[1] * dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self._fd)

    @staticmethod
    def fits(rows: np.memmap[Any, Any]) -> bool:
        """Whether the memmap ``rows`` is a whole C-ordered 2-D array of numbers in its file."""
        return (
            rows.ndim == 2
            and rows.flags.c_contiguous
            and rows.dtype.kind in "fiu"
            and getattr(rows, "filename", None) is not None
            and rows.base is not None
            and isinstance(rows.base, mmap.mmap)
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray[Any, Any]:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            return self._read(start, max(start, stop))
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((rows.shape[0], self.shape[1]), dtype=self.dtype)
        for i, row in enumerate(rows):  # the sample: scattered single rows
            out[i] = self._read(int(row), int(row) + 1)[0]
        return out

    def _read(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        want = (stop - start) * self._row
        data = bytearray(want)
        view, got = memoryview(data), 0
        while got < want:
            n = os.preadv(self._fd, [view[got:]], self.offset + start * self._row + got)
            if n == 0:
                raise InvalidVectorsError(f"{self.path}: shorter than its {self.shape[0]} rows")
            got += n
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.shape[1])


def _finite(x: Any, rows: I64) -> None:
    """``InvalidVectorsError`` naming the input row of the first NaN or infinity of ``x``
    (after conversion to float32, as ``as_matrix`` converts), if it has one."""
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        return  # as_matrix says what is wrong
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(x.astype(np.float32, copy=False))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise InvalidVectorsError(
            f"vectors contain NaN or infinite values, or values too large for float32 (first "
            f"at row {int(rows[row])}, column {col}); clean or clip them first"
        )


def _spill(batches: Iterable[Any], path: Path) -> tuple[int, int]:
    """Write every batch of ``batches`` to ``path`` as float32 rows; ``(rows, dim)``."""
    n, dim = 0, None
    with open(path, "wb") as fh:
        for i, batch in enumerate(batches):
            x = as_matrix(batch, f"batch {i} of vectors", dim)
            dim = x.shape[1]
            fh.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
            n += x.shape[0]
        fh.flush()
        os.fsync(fh.fileno())
    return n, int(dim or 1)
