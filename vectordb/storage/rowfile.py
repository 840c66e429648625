"""Writing vector files: raw little-endian float32 rows, ``dim * 4`` bytes each, no header.

Two ways, each returning the CRC32 the manifest records:

* :func:`write_rows` writes a whole file atomically (temporary name, fsync, rename): a
  save's ``vectors.bin``, a compaction's new file;
* :func:`extend_rows` appends rows to a file that a checkpoint already lists with fewer
  rows (the ``vectors.tail.bin`` of :mod:`vectordb.storage.living`): the bytes it lists
  are never touched, so the checkpoint that lists them stays whole while the next one is
  written; what lies past them belongs to no checkpoint until one lists it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._types import F32, I64
from .files import _NEW_FILE_MODE, atomic_write, storage_error
from .scratch import lock_scratch

__all__ = ["extend_rows", "write_rows", "write_vectors"]

_WRITE_BYTES = 8 << 20


def _chunks(take: Callable[[I64], F32], order: I64, dim: int) -> list[I64]:
    rows = max(1, _WRITE_BYTES // max(1, dim * 4))
    return [order[start : start + rows] for start in range(0, order.shape[0], rows)]


def write_rows(
    take: Callable[[I64], F32],
    order: I64,
    dim: int,
    path: Path,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write rows ``order`` ``(m,)`` int64 (read through ``take``, ``(m', dim)`` float32 a
    chunk) to ``path`` atomically; return the CRC32. ``on_bytes(n)`` after every chunk of
    ``n`` bytes written."""
    crc = 0
    with atomic_write(path) as fh:
        # Held until the file is complete: `vectordb verify` tells a compaction still
        # writing (its temporary file is named like the working file) from a dead one's.
        lock_scratch(fh.fileno())
        for chunk_rows in _chunks(take, order, dim):
            chunk = np.ascontiguousarray(take(chunk_rows), dtype="<f4").tobytes()
            crc = zlib.crc32(chunk, crc)
            fh.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return crc


def write_vectors(vectors: F32, path: Path, on_bytes: Callable[[int], None] | None = None) -> int:
    """Write ``vectors`` ``(n, d)`` float32 to ``path`` atomically; return the file's CRC32."""
    order = np.arange(vectors.shape[0], dtype=np.int64)
    return write_rows(lambda r: vectors[r[0] : r[-1] + 1], order, vectors.shape[1], path, on_bytes)


def extend_rows(
    take: Callable[[I64], F32],
    order: I64,
    dim: int,
    path: Path,
    kept: tuple[int, int] | None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write rows ``order`` ``(m,)`` int64 (through ``take``) after the first ``kept[0]``
    bytes of ``path`` (CRC32 ``kept[1]``), or into a new file ``path`` when ``kept`` is
    ``None``; fsync it. Returns the CRC32 of the file's first ``kept[0] + m * dim * 4``
    bytes, which is all a checkpoint may list: bytes past them, left by a write that
    crashed, are overwritten here or ignored."""
    start, crc = kept if kept is not None else (0, 0)
    flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if kept is None else 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), _NEW_FILE_MODE)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        if kept is not None and os.fstat(fd).st_size < start:
            raise storage_error(OSError(5, "shorter than its checkpoint lists"), path)
        pos = start
        for chunk_rows in _chunks(take, order, dim):
            chunk = memoryview(np.ascontiguousarray(take(chunk_rows), dtype="<f4").tobytes())
            crc = zlib.crc32(chunk, crc)
            while chunk:
                written = os.pwrite(fd, chunk, pos)
                pos, chunk = pos + written, chunk[written:]
            if on_bytes is not None:
                on_bytes(len(chunk_rows) * dim * 4)
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    finally:
        os.close(fd)
    return crc
