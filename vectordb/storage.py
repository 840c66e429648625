"""Full-precision vector stores: in RAM, or in a memory-mapped file.

The vector file format is raw little-endian float32, row-major, ``n * dim * 4`` bytes, no
header. Rows are in the index's storage order (leaf by leaf); the index keeps the id of
every row.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._files import atomic_write, storage_error
from .errors import IndexClosedError, InvalidIndexFileError

__all__ = ["InMemoryStorage", "MmapStorage", "Storage", "write_vectors"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_ROWS_PER_WRITE_BYTES = 8 << 20


def write_vectors(vectors: F32, path: Path) -> int:
    """Write ``vectors`` ``(n, d)`` float32 to ``path`` atomically; return the file's CRC32."""
    rows = max(1, _ROWS_PER_WRITE_BYTES // max(1, vectors.shape[1] * 4))
    crc = 0
    with atomic_write(path) as fh:
        for start in range(0, vectors.shape[0], rows):
            chunk = np.ascontiguousarray(vectors[start : start + rows], dtype="<f4").tobytes()
            crc = zlib.crc32(chunk, crc)
            fh.write(chunk)
    return crc


class InMemoryStorage:
    """Vectors held in process memory as one ``(n, d)`` float32 array."""

    is_mmap = False
    path: Path | None = None

    def __init__(self, vectors: F32) -> None:
        self._vectors = vectors

    @property
    def vectors(self) -> F32:
        """(n, d) float32, read-only use."""
        return self._vectors

    @property
    def ram_bytes(self) -> int:
        return int(self._vectors.nbytes)

    def take(self, rows: I64) -> F32:
        """Rows ``(m,)`` int64 -> ``(m, d)`` float32 copy."""
        return self._vectors[rows]

    def close(self) -> None:
        """Nothing to release; vectors stay usable."""


class MmapStorage:
    """Vectors in a read-only memory-mapped file; the OS pages them in on demand.

    Only pages that searches touch occupy RAM, and they are page cache: shared between
    processes mapping the same file, and reclaimable under memory pressure.
    """

    is_mmap = True

    def __init__(self, path: Path, n: int, dim: int) -> None:
        self.path = Path(path)
        expected = n * dim * 4
        try:
            with open(self.path, "rb") as fh:
                found = os.fstat(fh.fileno()).st_size
                if found != expected:
                    raise InvalidIndexFileError(
                        f"{self.path}: size is {found} bytes, expected {expected} "
                        f"(n={n} x dim={dim} x 4 bytes of float32)"
                    )
                self._mmap: mmap.mmap | None = mmap.mmap(
                    fh.fileno(), expected, access=mmap.ACCESS_READ
                )
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        self._vectors: F32 | None = np.frombuffer(self._mmap, dtype="<f4").reshape(n, dim)

    @property
    def vectors(self) -> F32:
        """(n, d) float32 view of the mapping (read-only)."""
        if self._vectors is None:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        return self._vectors

    @property
    def ram_bytes(self) -> int:
        """0: mapped pages belong to the page cache, not to the process's own memory."""
        return 0

    def take(self, rows: I64) -> F32:
        """Rows ``(m,)`` int64 -> ``(m, d)`` float32 copy, read in ascending file order."""
        vectors = self.vectors
        if rows.shape[0] < 2:
            return vectors[rows]
        order = np.argsort(rows, kind="stable")
        out = np.empty((rows.shape[0], vectors.shape[1]), dtype=np.float32)
        out[order] = vectors[rows[order]]
        return out

    def advise(self, advice: int) -> None:
        """Pass an ``mmap.MADV_*`` hint for the whole mapping (no-op where unsupported)."""
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(advice)

    def drop_cache(self) -> None:
        """Evict the file's pages from this mapping and from the OS page cache.

        For measuring cold reads: the next accesses go to the disk again. Dirty or
        otherwise pinned pages may stay; a no-op where the OS lacks the calls.
        """
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
        if hasattr(os, "posix_fadvise"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Unmap the file. Later access raises ``IndexClosedError``; idempotent."""
        self._vectors = None
        if self._mmap is not None:
            # Views handed out earlier may still point into the mapping (BufferError); it is
            # then unmapped when the last of them is garbage collected.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None


Storage = InMemoryStorage | MmapStorage
