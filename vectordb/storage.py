"""Full-precision vector stores: in RAM, or in a memory-mapped file.

The vector file format is raw little-endian float32, row-major, ``n * dim * 4`` bytes, no
header. Stores are append-only: rows never move or change once written, so a search that
read ``n`` rows can go on while more are appended.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._files import atomic_write, storage_error
from .errors import IndexClosedError, InvalidIndexFileError

__all__ = ["InMemoryStorage", "MmapStorage", "Storage", "write_rows", "write_vectors"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_WRITE_BYTES = 8 << 20
_WARM_BYTES = 16 << 20


def write_rows(
    take: Callable[[I64], F32],
    order: I64,
    dim: int,
    path: Path,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write rows ``order`` (read through ``take``) to ``path`` atomically; return the CRC32.

    ``on_bytes(n)`` is called after every chunk of ``n`` bytes written.
    """
    rows = max(1, _WRITE_BYTES // max(1, dim * 4))
    crc = 0
    with atomic_write(path) as fh:
        for start in range(0, order.shape[0], rows):
            chunk = np.ascontiguousarray(take(order[start : start + rows]), dtype="<f4").tobytes()
            crc = zlib.crc32(chunk, crc)
            fh.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return crc


def write_vectors(vectors: F32, path: Path, on_bytes: Callable[[int], None] | None = None) -> int:
    """Write ``vectors`` ``(n, d)`` float32 to ``path`` atomically; return the file's CRC32."""
    order = np.arange(vectors.shape[0], dtype=np.int64)
    return write_rows(lambda r: vectors[r[0] : r[-1] + 1], order, vectors.shape[1], path, on_bytes)


class InMemoryStorage:
    """Vectors held in process memory, in one growable ``(capacity, d)`` float32 array."""

    is_mmap = False
    path: Path | None = None

    def __init__(self, vectors: F32) -> None:
        self._buf = vectors
        self._n = int(vectors.shape[0])

    @property
    def n(self) -> int:
        return self._n

    @property
    def vectors(self) -> F32:
        """(n, d) float32 view, read-only use."""
        return self._buf[: self._n]

    @property
    def ram_bytes(self) -> int:
        return int(self._buf.nbytes)

    def take(self, rows: I64) -> F32:
        """Rows ``(m,)`` int64 -> ``(m, d)`` float32 copy."""
        return self._buf[rows]

    def slice(self, a: int, b: int) -> F32:
        """Rows ``a:b`` as ``(b - a, d)`` float32 (a view)."""
        return self._buf[a:b]

    def append(self, x: F32) -> int:
        """Append rows ``(m, d)``; return the row number of the first."""
        first, m = self._n, x.shape[0]
        if first + m > self._buf.shape[0]:
            grown = np.empty((max(2 * self._buf.shape[0], first + m), x.shape[1]), np.float32)
            grown[:first] = self._buf[:first]
            self._buf = grown  # readers holding the old array still see their rows
        self._buf[first : first + m] = x
        self._n = first + m
        return first

    def close(self) -> None:
        """Nothing to release; vectors stay usable."""

    def discard(self) -> None:
        """Nothing to remove."""


class MmapStorage:
    """Vectors in a read-only memory-mapped file; the OS pages them in on demand.

    Only pages that searches touch occupy RAM, and they are page cache: shared between
    processes mapping the same file, and reclaimable under memory pressure. Appended rows go
    to a second file beside the first (``.<name>.append-<id>``), so a saved index's own
    vector file is never modified; ``save`` writes both into the new index, ``close``
    removes the append file.
    """

    is_mmap = True

    def __init__(self, path: Path, n: int, dim: int, *, owned: bool = False) -> None:
        """Map ``path`` (``n`` rows of ``dim`` float32). ``owned``: a working file of the
        index's own, removed by :meth:`close`."""
        self.path = Path(path)
        self.dim = dim
        self._owned = owned
        self._n_base = n
        expected = n * dim * 4
        try:
            with open(self.path, "rb") as fh:
                found = os.fstat(fh.fileno()).st_size
                if found != expected:
                    raise InvalidIndexFileError(
                        f"{self.path}: size is {found} bytes, expected {expected} "
                        f"(n={n} x dim={dim} x 4 bytes of float32)"
                    )
                self._mmap: mmap.mmap | None = (
                    mmap.mmap(fh.fileno(), expected, access=mmap.ACCESS_READ) if expected else None
                )
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        base = np.frombuffer(self._mmap, dtype="<f4") if self._mmap else np.empty(0, "<f4")
        self._base: F32 | None = base.reshape(n, dim)
        self._closed = False
        self._append_path: Path | None = None
        self._append: F32 = np.empty((0, dim), np.float32)

    @property
    def n(self) -> int:
        return self._n_base + int(self._append.shape[0])

    @property
    def vectors(self) -> F32:
        """(n, d) float32 view of the mapped file (rows appended since open excluded)."""
        if self._base is None:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        return self._base

    @property
    def ram_bytes(self) -> int:
        """0: mapped pages belong to the page cache, not to the process's own memory."""
        return 0

    def take(self, rows: I64) -> F32:
        """Rows ``(m,)`` int64 -> ``(m, d)`` float32 copy."""
        base = self.vectors
        # Sorting the rows first (file order) measured no faster, warm or cold.
        if rows.shape[0] == 0 or int(rows.max()) < self._n_base:
            return base[rows]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        split = int(np.searchsorted(sorted_rows, self._n_base))
        out[order[:split]] = base[sorted_rows[:split]]
        if split < rows.shape[0]:
            out[order[split:]] = self._append[sorted_rows[split:] - self._n_base]
        return out

    def slice(self, a: int, b: int) -> F32:
        """Rows ``a:b`` as ``(b - a, d)`` float32 (a view when in one file)."""
        base, nb = self.vectors, self._n_base
        if b <= nb:
            return base[a:b]
        if a >= nb:
            return self._append[a - nb : b - nb]
        return np.concatenate([base[a:], self._append[: b - nb]])

    def append(self, x: F32) -> int:
        """Append rows ``(m, d)`` to the append file and remap it; return the first row."""
        first = self.n
        if self._closed:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        if self._append_path is None:
            self._append_path = (
                self.path.parent / f".{self.path.name}.append-{uuid.uuid4().hex[:12]}"
            )
        try:
            with open(self._append_path, "a+b") as fh:
                fh.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
                fh.flush()
                size = fh.tell()
                mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise storage_error(exc, self._append_path) from exc
        # Searches still holding the old mapping keep it alive until they finish.
        self._append = np.frombuffer(mapped, dtype="<f4").reshape(-1, self.dim)
        return first

    def advise(self, advice: int) -> None:
        """Pass an ``mmap.MADV_*`` hint for the whole mapping (no-op where unsupported)."""
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(advice)

    def warm(self, on_bytes: Callable[[int], None] | None = None) -> int:
        """Read the mapped file once, sequentially, so its pages are in the page cache.

        Hints the kernel (``MADV_WILLNEED``) first; ``on_bytes(n)`` after every chunk.
        Returns the bytes read.
        """
        if self._closed:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        if hasattr(mmap, "MADV_WILLNEED"):
            self.advise(mmap.MADV_WILLNEED)
        done = 0
        try:
            with open(self.path, "rb", buffering=0) as fh:
                while chunk := fh.read(_WARM_BYTES):
                    done += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        return done

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

    def discard(self) -> None:
        """Remove the files this store created (append file, owned file); keep the mapping
        for searches still reading it (Linux keeps unlinked mapped files alive)."""
        for path in (self._append_path, self.path if self._owned else None):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
        self._append_path = None
        self._owned = False

    def close(self) -> None:
        """Unmap the file and remove the append file. Later access raises
        ``IndexClosedError``; idempotent."""
        self._closed = True
        self._base = None
        self._append = np.empty((0, self.dim), np.float32)
        if self._mmap is not None:
            # Views handed out earlier may still point into the mapping (BufferError); it is
            # then unmapped when the last of them is garbage collected.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        self.discard()


Storage = InMemoryStorage | MmapStorage
