"""``Warmer``: one sequential read of a store's vectors, in steps, to fill the page cache."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._types import F32
from .files import storage_error

__all__ = ["Warmer"]


class Warmer:
    """One sequential read of a store's mapped file, then of the rows mapped past it (a
    checkpoint's tail, or the rows added since the open), in steps, to fill the page cache.

    ``MmapStorage.warm`` runs the steps in a row; the async engine awaits each on its
    executor. Made on any thread without disk access from ``fd`` (a duplicate of the
    mapped file's descriptor, which the warmer closes: the file the store reads, whatever
    ``path`` names by now), ``past`` (the rows ``(m, d)`` float32 mapped past the file, as
    they are now: a later append maps a new array, this one stays valid while referenced)
    and ``advise`` (the store's ``madvise`` of its whole mapping); close it. ``total``
    counts the bytes of both.
    """

    #: Bytes read per :meth:`step`.
    CHUNK = 16 << 20

    def __init__(self, path: Path, fd: int, past: F32, advise: Callable[[int], None]) -> None:
        self.path, self._fd, self._advise = path, fd, advise
        try:
            self._file_bytes = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, path) from exc
        self._past = past.reshape(-1).view(np.uint8)
        self.total = self._file_bytes + self._past.size
        self.done = 0

    def advise(self) -> None:
        """Hint the kernel to read the whole mapping ahead (``MADV_WILLNEED``)."""
        if hasattr(mmap, "MADV_WILLNEED"):
            self._advise(mmap.MADV_WILLNEED)

    def step(self) -> int:
        """Read the next chunk; return its size (0 once everything was read)."""
        if self.done < self._file_bytes:
            try:
                # pread: a descriptor's duplicates share one offset; concurrent warms don't.
                n = len(os.pread(self._fd, self.CHUNK, self.done))
            except OSError as exc:
                raise storage_error(exc, self.path) from exc
            if n:
                self.done += n
                return n
            self._file_bytes = self.done  # shorter than it was: on to the rows past it
            self.total = self.done + self._past.size
        at = self.done - self._file_bytes
        chunk = self._past[at : at + self.CHUNK]
        # Reading every page of a mapped chunk faults it in (a copy, dropped at once).
        chunk.tobytes()
        self.done += int(chunk.size)
        return int(chunk.size)

    def close(self) -> None:
        """Close the descriptor (instant for a regular file); idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Warmer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
