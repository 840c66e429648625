"""Saving an index directory: one :class:`SaveJob` writes an ``IndexData`` atomically.

The files are those of :mod:`vectordb.storage.format`.

``save`` writes a complete new directory under a temporary name (every file fsynced, the
manifest last), then swaps it in with one atomic ``renameat2(RENAME_EXCHANGE)`` where the
OS offers it (Linux), else with two renames; a crash leaves the old index or the new one.

Saves into one parent directory take turns: each holds an exclusive ``flock`` on that
directory from start to end, across processes. So the temporary (``.NAME.tmp-*``) and
replaced (``.NAME.old-*``) directories a save finds beside its target can only be left
over from a save that crashed, and it removes them; except when ``NAME`` itself is missing
(a crash between the two renames): then the complete one (the new version if its files
all match its manifest, else the old) is renamed back to ``NAME`` first. An open of a
missing ``NAME`` does the same (:func:`recover_missing`).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .._progress import log, progress_bar
from ..errors import StorageError, VectorDBError
from .dirswap import check_replaceable, install_dir, lock_dir, remove_leftovers, unlock
from .files import _NEW_FILE_MODE, crc32_file, fsync_dir, storage_error
from .format import (
    BASE_FILES,
    LIVING_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    METADATA,
    ROTATION_FILES,
    TAIL,
    TREE_FILES,
    VECTORS,
    arrays_of,
    living_arrays_of,
    living_manifest_of,
    manifest_of,
    parse_manifest,
)
from .load import is_complete
from .memory import reading_in_order
from .rowfile import extend_rows, write_rows
from .snapshot import IndexData, LivingData, Reuse
from .wal import LOG, WriteLog
from .writer import carry_writer, lock_writer, release_writer

__all__ = ["SaveJob"]

#: How often a save asked to stop looks again at a parent directory locked by another save.
_LOCK_POLL = 0.02


class _Stopped(Exception):
    """The save was asked to stop (its caller was cancelled) before its swap began."""


class _CrcWriter:
    """File wrapper that keeps the CRC32 of everything written through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.crc = 0

    def write(self, data: bytes | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self._fh.write(data)


def _write_file(directory: Path, name: str, arr: npt.NDArray[Any]) -> dict[str, int]:
    """Write ``arr`` as ``directory/name`` (.npy), fsync it; return its size and CRC32."""
    path = directory / name
    with open(path, "wb") as fh:
        writer = _CrcWriter(fh)
        np.lib.format.write_array(writer, np.ascontiguousarray(arr), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "crc32": writer.crc}


class SaveJob:
    """One save to ``path`` of what ``snapshot()`` returns, built on the caller's thread,
    :meth:`run` on any.

    :meth:`run` takes the snapshot (one consistent state of the index: writes may go on
    while the files are written), then writes every file into a temporary directory beside
    ``path`` (under the parent's lock) and swaps it in; on any failure the temporary
    directory is removed and the lock released before it raises. :meth:`stop` (from any
    thread) makes a run that has not begun its swap remove what it wrote and raise; once
    the swap has begun, the run completes. ``ClusteredIndex.save`` runs one on the caller's
    thread; the async engine runs one on its executor.
    """

    def __init__(
        self,
        snapshot: Callable[[], IndexData | LivingData],
        path: Path,
        progress: bool | None = False,
        *,
        stoppable: bool = True,
        vectors_file: tuple[Path, int] | None = None,
        log_seq: int | None = None,
        writer_fd: int | None = None,
    ) -> None:
        """``stoppable=False``: :meth:`stop` is never called (waits for the lock in the
        kernel instead of polling). ``vectors_file``: ``(file, crc32)`` of a finished,
        fsynced vector file on the same file system, the snapshot's rows in storage order,
        moved into the new directory instead of written (a build on disk). ``log_seq``:
        the new directory's empty write-ahead log goes on from that sequence number (a
        checkpoint of a bound index: the last logged write its snapshot holds; see
        :mod:`vectordb.storage.wal`); ``None``: no log. ``writer_fd``: the directory's
        writer lock (:mod:`vectordb.storage.writer`), held by the caller; without it the
        run takes the lock of an existing directory (a save is a write: ``IndexLockedError``
        if another writer holds it). Either way the lock carries over to the new directory."""
        self._log_seq = log_seq
        self._writer_fd = writer_fd
        self._snapshot = snapshot
        self._stoppable = stoppable
        self._vectors_file = vectors_file
        self.path = Path(path)
        self.parent = self.path.parent
        self.progress = progress
        self.n = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the run to give up (thread-safe); it does unless its swap has begun."""
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped(f"the save to {self.path} was stopped")

    def run(self) -> None:
        """Save; raises ``StorageError`` for OS errors (nothing of this save left behind)."""
        try:
            self._check_stop()
            if self.path.is_symlink():  # replace what the link points to, and keep the link
                self.path = self.path.resolve()
                self.parent = self.path.parent
            check_replaceable(self.path, MANIFEST, "a vectordb index directory")
            self._run_locked()
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(exc, getattr(exc, "filename", None) or self.path) from exc
        log.info("saved %d vectors to %s", self.n, self.path)

    def _run_locked(self) -> None:
        # Taken before the parent's lock: a save on another thread holds the index's
        # write lock while it waits for the parent's.
        data = self._snapshot()
        self.n = data.n
        lock = self._lock_parent()
        taken = None
        try:
            remove_leftovers(self.parent, self.path.name, is_complete)
            # Under the parent's lock, so that no other save installs a directory between
            # this look and the swap; never waited for (the writer may wait for the
            # parent's lock in turn): a held lock is IndexLockedError at once.
            if self._writer_fd is None and (self.path / MANIFEST).is_file():
                taken = lock_writer(self.path)
            self._write_and_install(data, self._writer_fd if taken is None else taken)
        finally:
            release_writer(taken)
            unlock(lock)

    def _write_and_install(self, data: IndexData | LivingData, writer: int | None) -> None:
        """Write every file into a new temporary directory, then swap it in for ``path``."""
        tmp = self.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            if isinstance(data, LivingData):
                files, tail_rows = self._write_living(tmp, data)
                manifest = living_manifest_of(data, files, tail_rows)
            else:
                files = self._write_data(tmp, data)
                manifest = manifest_of(data, files)
            if self._log_seq is not None:
                WriteLog.create(tmp / LOG, self._log_seq)
            carry_writer(writer, self.path, tmp)
            self._check_stop()
            with open(tmp / MANIFEST, "wb") as fh:
                fh.write(manifest)
                fh.flush()
                os.fsync(fh.fileno())
            if os.name == "posix":
                # Read-only, so that copying a backup over a live index (which truncates
                # the mapped file in place: SIGBUS in every reader) fails; `cp -f` and
                # directory swaps make new files and stay safe. Not the tail: the next
                # checkpoint appends to it (past the rows this one lists).
                for name in (*files, MANIFEST):
                    if name != TAIL:
                        os.chmod(tmp / name, _NEW_FILE_MODE & ~0o222)
            fsync_dir(tmp)
            self._check_stop()
            # From here on the run completes: the new index or the old one stays.
            install_dir(tmp, self.path, self.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # after install_dir: the old one
            raise

    def _lock_parent(self) -> int | None:
        """The parent's lock; while another save holds it, wait (giving up on :meth:`stop`)."""
        if not self._stoppable:
            return lock_dir(self.parent)
        while True:
            try:
                return lock_dir(self.parent, wait=False)
            except BlockingIOError:
                if self._stop.wait(_LOCK_POLL):
                    self._check_stop()

    def _write_data(self, tmp: Path, data: IndexData) -> dict[str, dict[str, int]]:
        """Write and fsync every array, the vector file and the metadata into ``tmp``;
        return each file's size and CRC32."""
        arrays = arrays_of(data)
        rows = data.rows if data.rows is not None else np.arange(data.n, dtype=np.int64)
        files: dict[str, dict[str, int]] = {}
        total = sum(int(a.nbytes) for a in arrays.values()) + data.n * data.dim * 4

        with progress_bar(total, "saving", unit="B", progress=self.progress) as bar:

            def done(n: int) -> None:
                bar.update(n)
                self._check_stop()

            for name, arr in arrays.items():
                files[name] = _write_file(tmp, name, arr)
                done(int(arr.nbytes))
            moved = self._vectors_file
            if moved is not None and bool((rows == np.arange(data.n)).all()):
                os.rename(moved[0], tmp / VECTORS)
                crc = moved[1]
                done(data.n * data.dim * 4)
            else:
                with reading_in_order(data.storage):
                    crc = write_rows(data.storage.take, rows, data.dim, tmp / VECTORS, done)
        files[VECTORS] = {"size": (tmp / VECTORS).stat().st_size, "crc32": crc}
        if data.metadata is not None:
            meta = tmp / METADATA
            data.metadata.save(meta)
            files[METADATA] = {"size": meta.stat().st_size, "crc32": crc32_file(meta)}
        return files

    def _write_living(self, tmp: Path, data: LivingData) -> tuple[dict[str, dict[str, int]], int]:
        """Write a checkpoint (format version 5) of ``data`` into ``tmp``: every file its
        directory already holds unchanged (``data.reuse``) is hard-linked from there, rows
        past those on disk are appended to the tail. Returns each file's size and CRC32,
        and the rows in the tail."""
        held = _held(data.reuse, self.path)
        reused = set() if held is None else _unchanged(data.reuse, held)
        arrays = living_arrays_of(data)
        row = data.dim * 4
        files: dict[str, dict[str, int]] = {}
        total = sum(int(a.nbytes) for n, a in arrays.items() if n not in reused)
        total += (data.rows - (held.rows if held is not None else 0)) * row
        with progress_bar(total, "checkpoint", unit="B", progress=self.progress) as bar:

            def done(n: int) -> None:
                bar.update(n)
                self._check_stop()

            for name, arr in arrays.items():
                if name in reused:
                    os.link(self.path / name, tmp / name)
                    files[name] = held.files[name]  # type: ignore[union-attr]
                else:
                    files[name] = _write_file(tmp, name, arr)
                    done(int(arr.nbytes))
            if held is None:
                with reading_in_order(data.storage):
                    order = np.arange(data.rows, dtype=np.int64)
                    crc = write_rows(data.storage.take, order, data.dim, tmp / VECTORS, done)
                files[VECTORS] = {"size": data.rows * row, "crc32": crc}
                tail_rows = 0
            else:
                os.link(self.path / VECTORS, tmp / VECTORS)
                files[VECTORS] = held.files[VECTORS]
                tail_rows = data.rows - held.first_tail
                if tail_rows:
                    files[TAIL] = self._extend_tail(tmp, data, held, done)
            if METADATA in reused:
                os.link(self.path / METADATA, tmp / METADATA)
                files[METADATA] = held.files[METADATA]  # type: ignore[union-attr]
            elif data.metadata is not None:
                meta = tmp / METADATA
                data.metadata.save(meta)
                files[METADATA] = {"size": meta.stat().st_size, "crc32": crc32_file(meta)}
        return files, tail_rows

    def _extend_tail(
        self, tmp: Path, data: LivingData, held: _Held, done: Callable[[int], None]
    ) -> dict[str, int]:
        """The tail with the rows past those on disk appended (in place: the version it
        replaces lists only its first rows; see ``rowfile.extend_rows``), linked into
        ``tmp``; returns its manifest entry."""
        row = data.dim * 4
        new = np.arange(held.rows, data.rows, dtype=np.int64)
        if TAIL in held.files:
            kept = (held.files[TAIL]["size"], held.files[TAIL]["crc32"])
            crc = extend_rows(data.storage.take, new, data.dim, self.path / TAIL, kept, done)
            os.link(self.path / TAIL, tmp / TAIL)
        else:
            crc = extend_rows(data.storage.take, new, data.dim, tmp / TAIL, None, done)
        return {"size": (data.rows - held.first_tail) * row, "crc32": crc}


class _Held:
    """What the directory a checkpoint replaces holds, read from its manifest: the file
    entries, the storage rows on disk, the first row in the tail, the format version."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.files: dict[str, dict[str, int]] = manifest["files"]
        self.version: int = manifest["format_version"]
        if self.version == LIVING_VERSION:
            self.rows: int = manifest["rows"]
            self.first_tail: int = manifest["rows"] - manifest["tail_rows"]
        else:
            self.rows = self.first_tail = manifest["n"]


def _held(reuse: Reuse | None, path: Path) -> _Held | None:
    """What ``path`` holds, if ``reuse`` says its rows are the snapshot's first rows and
    its manifest agrees (``None``: write everything)."""
    if reuse is None or reuse.directory != path:
        return None
    try:
        with open(path / MANIFEST, "rb") as fh:
            held = _Held(parse_manifest(fh.read(MAX_MANIFEST_BYTES + 1), path / MANIFEST))
    except (OSError, VectorDBError):
        return None
    if held.rows != reuse.rows or held.version < 3 or VECTORS not in held.files:
        return None
    return held


def _unchanged(reuse: Reuse | None, held: _Held) -> set[str]:
    """Names of the files to link from the directory: those ``reuse`` says hold what the
    snapshot holds (the base part only from a version that has factors)."""
    names: set[str] = set()
    if reuse is None:
        return names
    if reuse.rotation:
        names |= ROTATION_FILES
    if reuse.tree:
        names |= TREE_FILES
    if reuse.base:
        names |= BASE_FILES if held.version == LIVING_VERSION else BASE_FILES - {"slot_rows.npy"}
    if reuse.offsets:
        names.add("leaf_offsets.npy")
    if reuse.metadata:
        names.add(METADATA)
    return names & held.files.keys()
