"""Full-precision vector stores: in RAM, or in a memory-mapped file.

The vector file format is raw little-endian float32, row-major, ``n * dim * 4`` bytes, no
header. Stores are append-only: rows never move or change once written, so a search that
read ``n`` rows can go on while more are appended.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._progress import log
from .._types import F32, I64
from ..errors import IndexClosedError, InvalidIndexFileError, InvalidParameterError, StorageError
from .files import names_file, storage_error
from .memory import SEARCH_ADVICE, page_cache_room, reading_in_order
from .rowfile import write_rows, write_vectors
from .scratch import lock_scratch
from .warmer import Warmer

__all__ = [
    "InMemoryStorage",
    "MmapStorage",
    "VectorStore",
    "Warmer",
    "compacted_store",
    "mapped_copy",
]


def _no_rows(dim: int) -> F32:
    """An empty ``(0, dim)`` float32 array, read-only like the mapped rows it stands for
    (compiled readers then see one array type)."""
    rows = np.empty((0, dim), np.float32)
    rows.flags.writeable = False
    return rows


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

    def row_arrays(self) -> tuple[F32, F32]:
        """The rows where they lie, for readers that gather them themselves: row ``r`` is
        ``first[r]`` below ``len(first)``, else ``second[r - len(first)]`` (``(n1, d)`` and
        ``(n2, d)`` float32 views, read-only use). Here all rows are in ``first``."""
        return self._buf[: self._n], self._buf[:0]

    def slice(self, a: int, b: int) -> F32:
        """Rows ``a:b`` as ``(b - a, d)`` float32 (a view)."""
        return self._buf[a:b]

    def release(self, a: int, b: int) -> None:
        """Nothing to release in RAM (see ``MmapStorage.release``)."""

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
    removes the append file. The append file is created once and kept open: appends write
    through its descriptor, never by path, so a save onto the index's own directory (which
    removes the file's name with the old directory) loses none of its rows.

    The mapped file stays open by descriptor as well, until :meth:`close`: :meth:`warm`
    and :meth:`drop_cache` read through it, never by ``path``, which a save onto the
    index's own directory makes name the new file (or, after ``compact``, nothing).
    """

    is_mmap = True
    #: The append file, open for reading and writing from the first append to ``discard``.
    _append_file: io.FileIO | None = None
    #: Bytes of accepted rows in the append file.
    _append_bytes = 0

    def __init__(
        self,
        path: Path,
        n: int,
        dim: int,
        *,
        owned: bool = False,
        fd: int | None = None,
        tail: tuple[int, int] | None = None,
    ) -> None:
        """Map ``path`` (``n`` rows of ``dim`` float32). ``owned``: a working file of the
        index's own, removed by :meth:`close`, and ``flock``-ed while open (see
        :func:`.scratch.scratch_in_use`). ``fd``: an open descriptor of ``path`` to map instead of
        opening it again (the loader's, so that the file whose size is checked is the file
        mapped, whatever the path names by now); not closed here (a duplicate is kept).
        ``tail``: ``(descriptor, rows)`` of a checkpoint's ``vectors.tail.bin``, whose first
        ``rows`` rows are rows ``n..n+rows-1`` (mapped read-only: the file belongs to the
        checkpoint; the first :meth:`append` copies them into the append file).

        The size is checked with ``fstat`` on the descriptor mapped. Should the file be
        truncated in place while mapped, touching the lost pages raises ``SIGBUS`` (the
        OS kills the process): saved files are never modified, and a restore must swap
        whole directories, not copy over the files (see the README).
        """
        self.path = Path(path)
        self.dim = dim
        self._owned = owned
        self._n_base = n
        #: Guards ``_file`` between :meth:`mapped_fd` and :meth:`close` (other threads).
        self._file_lock = threading.Lock()
        try:
            file = io.FileIO(self.path if fd is None else os.dup(fd), "rb")
        except OSError as exc:
            raise storage_error(exc, self.path) from exc
        #: The mapped file, open until :meth:`close`, or until this store is collected
        #: (a store ``compact`` replaced is discarded, never closed: searches may still
        #: read it, and its mapping lives as long).
        self._file: io.FileIO | None = file
        self._release = weakref.finalize(self, file.close)
        try:
            if owned:
                lock_scratch(file.fileno())
            self._mmap: mmap.mmap | None = self._map(file.fileno(), n, dim)
        except BaseException as exc:
            self._release()
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise storage_error(exc, self.path) from exc
            raise
        base = np.frombuffer(self._mmap, dtype="<f4") if self._mmap else _no_rows(dim)
        self._base: F32 | None = base.reshape(n, dim)
        self._closed = False
        self._append_path: Path | None = None
        self._append: F32 = _no_rows(dim)
        if tail is not None and tail[1]:
            # Mapped from its own descriptor (mmap keeps a duplicate): a prefix of a file a
            # later checkpoint may extend, never change.
            mapped = mmap.mmap(tail[0], tail[1] * dim * 4, access=mmap.ACCESS_READ)
            if SEARCH_ADVICE is not None:
                mapped.madvise(SEARCH_ADVICE)
            self._append = np.frombuffer(mapped, dtype="<f4").reshape(-1, dim)

    def _map(self, fd: int, n: int, dim: int) -> mmap.mmap | None:
        """Map ``n * dim * 4`` bytes of ``fd`` read-only after checking its size there."""
        expected = n * dim * 4
        found = os.fstat(fd).st_size
        if found != expected:
            raise InvalidIndexFileError(
                f"{self.path}: size is {found} bytes, expected {expected} "
                f"(n={n} x dim={dim} x 4 bytes of float32)"
            )
        # mmap keeps a duplicate of the descriptor: the caller's may be closed at once.
        mapped = mmap.mmap(fd, expected, access=mmap.ACCESS_READ) if expected else None
        if mapped is not None and SEARCH_ADVICE is not None:
            mapped.madvise(SEARCH_ADVICE)  # scattered reads: see storage.memory
        return mapped

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

    def row_arrays(self) -> tuple[F32, F32]:
        """The rows where they lie (see :meth:`InMemoryStorage.row_arrays`): the mapped
        file's, then the append file's (read-only)."""
        return self.vectors, self._append

    def slice(self, a: int, b: int) -> F32:
        """Rows ``a:b`` as ``(b - a, d)`` float32 (a view when in one file)."""
        base, nb = self.vectors, self._n_base
        if b <= nb:
            return base[a:b]
        if a >= nb:
            return self._append[a - nb : b - nb]
        return np.concatenate([base[a:], self._append[: b - nb]])

    def append(self, x: F32) -> int:
        """Append rows ``(m, d)`` to the append file and remap it; return the first row.

        The file is created (never opened again by path) with an exclusive ``flock`` held
        while it is open, so that a leftover of a process that died can be told from the
        file of one still running (:func:`.scratch.scratch_in_use`).
        """
        first = self.n
        if self._closed:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        if x.shape[0] == 0:
            return first
        fh = self._append_file
        if fh is None or self._append_path is None:
            path = self.path.parent / f".{self.path.name}.append-{uuid.uuid4().hex[:12]}"
            try:
                fh = open(path, "x+b", buffering=0)  # noqa: SIM115 (open until discard)
            except OSError as exc:
                raise storage_error(exc, path) from exc
            lock_scratch(fh.fileno())
            self._append_path, self._append_file, self._append_bytes = path, fh, 0
        end = self._append_bytes
        # Rows mapped from a checkpoint's tail go first: one file holds every row past the
        # mapped file (a copy once per open that appends, linear in the tail).
        carried = self._append if end == 0 else self._append[:0]
        step = max(1, (8 << 20) // (4 * self.dim))
        try:
            fh.seek(end)
            for chunk in [*(carried[i : i + step] for i in range(0, len(carried), step)), x]:
                view = memoryview(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
                while view:
                    view = view[fh.write(view) :]
            size = end + 4 * self.dim * (len(carried) + x.shape[0])
            mapped = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
        except OSError as exc:
            # Drop a partial write: the file holds exactly the rows the index accepted.
            with contextlib.suppress(OSError):
                fh.truncate(end)
            raise storage_error(exc, self._append_path) from exc
        self._append_bytes = size
        # Searches still holding the old mapping keep it alive until they finish.
        self._append = np.frombuffer(mapped, dtype="<f4").reshape(-1, self.dim)
        return first

    def advise(self, advice: int) -> None:
        """Pass an ``mmap.MADV_*`` hint for the whole mapping (no-op where unsupported)."""
        if self._mmap is not None and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(advice)

    def mapped_fd(self) -> int:
        """A new descriptor of the mapped file (the caller closes it): the file this store
        reads, whatever ``path`` names by now. Thread-safe against :meth:`close`;
        ``IndexClosedError`` once closed, ``StorageError`` if the OS refuses a descriptor.
        """
        with self._file_lock:
            if self._file is None:
                raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
            try:
                return os.dup(self._file.fileno())
            except OSError as exc:
                raise storage_error(exc, self.path) from exc

    def warmer(self) -> Warmer:
        """A :class:`Warmer` of the mapped rows (``IndexClosedError`` once closed)."""
        if self._closed:
            raise IndexClosedError(f"the memory-mapped vectors of {self.path} were closed")
        room, size = page_cache_room(), self.n * self.dim * 4
        if room is not None and size > room:
            log.warning(
                "%s: %.1f GB of vectors, more than the %.1f GB the page cache can hold here: "
                "warming cannot keep them all, and searches will read from the disk",
                self.path,
                size / 1e9,
                room / 1e9,
            )
        return Warmer(self.path, self.mapped_fd(), self._append, self.advise)

    def warm(self, on_bytes: Callable[[int], None] | None = None) -> int:
        """Read the mapped file once, sequentially, then the rows mapped past it (a
        checkpoint's tail, rows added since the open), so their pages are in the page cache.

        The steps of a :class:`Warmer`, in a row; ``on_bytes(n)`` after every chunk.
        Returns the bytes read (the file's size plus ``4 * d`` per row past it).
        """
        with self.warmer() as warmer:
            warmer.advise()
            while n := warmer.step():
                if on_bytes is not None:
                    on_bytes(n)
            return warmer.done

    def release(self, a: int, b: int) -> None:
        """Unmap the pages of rows ``a:b`` from this process (``MADV_DONTNEED``) after a
        pass that read them once: they stay in the page cache, and the next access maps
        them again without a read; the process's resident memory does not keep the whole
        file after a brute force over it. A no-op where the OS lacks the call."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        row = 4 * self.dim
        lo = (max(0, a) * row // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = min(self._n_base, b) * row
        if hi > lo:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def drop_cache(self) -> None:
        """Evict the mapped file's pages from this mapping and from the OS page cache.

        For measuring cold reads: the next accesses go to the disk again. Dirty or
        otherwise pinned pages may stay; a no-op where the OS lacks the calls.
        """
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
        if hasattr(os, "posix_fadvise"):
            fd = self.mapped_fd()
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                raise storage_error(exc, self.path) from exc
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Remove the files this store created (append file, owned file); keep the mapping
        for searches still reading it (Linux keeps unlinked mapped files alive)."""
        fh, self._append_file = self._append_file, None
        if fh is not None:
            # Only while the name is still this file's: a save onto the index's directory
            # removed the name with the old directory; never remove another file.
            if self._append_path is not None and names_file(self._append_path, fh.fileno()):
                with contextlib.suppress(OSError):
                    self._append_path.unlink()
            fh.close()
        if self._owned:
            # Likewise: after a save onto the index's directory the name is gone.
            with self._file_lock:
                mine = self._file is not None and names_file(self.path, self._file.fileno())
            if mine:
                with contextlib.suppress(OSError):
                    self.path.unlink()
        self._append_path = None
        self._owned = False

    def close(self) -> None:
        """Unmap the file and remove the append file. Later access raises
        ``IndexClosedError``; idempotent."""
        self._closed = True
        self._base = None
        self._append = _no_rows(self.dim)
        if self._mmap is not None:
            # Views handed out earlier may still point into the mapping (BufferError); it is
            # then unmapped when the last of them is garbage collected.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        self.discard()
        with self._file_lock:
            self._file = None
            self._release()  # releases the flock of an owned file


#: Where an index keeps its full vectors.
VectorStore = InMemoryStorage | MmapStorage


def mapped_copy(
    vectors: F32, path: Path, on_bytes: Callable[[int], None] | None = None
) -> MmapStorage:
    """``vectors`` ``(n, d)`` float32 written to ``path`` atomically (see
    :func:`write_vectors`) and mapped from there. ``InvalidParameterError`` if ``path`` is
    a directory."""
    if path.is_dir():
        raise InvalidParameterError(f"{path} is a directory; pass a file path")
    write_vectors(vectors, path, on_bytes)
    return MmapStorage(path, vectors.shape[0], vectors.shape[1])


def compacted_store(
    old: VectorStore, order: I64, dim: int, on_bytes: Callable[[int], None] | None = None
) -> VectorStore:
    """The rows ``order`` ``(m,)`` int64 of ``old`` as rows ``0..m-1`` of a new store of the
    same kind: in RAM a copy; in mmap mode a new file beside the mapped one, written
    atomically (``on_bytes(n)`` after every chunk) and owned by the new store."""
    if isinstance(old, MmapStorage):
        path = old.path.parent / f".{old.path.name}.compact-{uuid.uuid4().hex[:12]}"
        with reading_in_order(old):
            write_rows(old.take, order, dim, path, on_bytes)
        return MmapStorage(path, order.shape[0], dim, owned=True)
    return InMemoryStorage(np.ascontiguousarray(old.take(order)))
