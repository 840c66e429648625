"""Saving and opening an index directory.

Layout of a saved index (format version 2; version 1 lacks the manifest checksum)::

    my_index/
      manifest.json     format, version, dim, metric, n, build parameters, the size and
                        CRC32 of every other file, and its own checksum (the CRC32 of its
                        canonical JSON without it; see ``reader.sign_manifest``)
      centroids.npy     (n_nodes, bits) float32     tree node centroids, rotated
      children.npy      (n_nodes, branching) int64  child node ids, -1 padded
      leaf_of_node.npy  (n_nodes,) int64            leaf number, -1 for inner nodes
      leaf_offsets.npy  (n_leaves + 1,) int64       storage rows of each leaf
      codes.npy         (words, n) uint64           word-major residual sign codes  } only with
      norms.npy         (n,) float32                residual norms                  } leaf_scan
      dots.npy          (n,) float32                <residual, centroid> (ip only)  } "codes"
      ids.npy           (n,) int64                  id of every storage row
      perm.npy          (bits,) int64               rotation: permutation  } only when built
      blocks.npy        (bits/64, 64, 64) float32   rotation: blocks       } with rotate=True
      vectors.bin       raw little-endian float32, n * dim * 4 bytes, storage order

All ``.npy`` files are read with ``allow_pickle=False`` after their header was checked
against the manifest, so a damaged file cannot trigger a huge allocation.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .._progress import log, progress_bar
from .._types import I64
from ..core.parts import Part
from ..errors import InvalidIndexFileError, StorageError
from ..index.update import compacted
from .dirswap import (
    check_replaceable,
    install_dir,
    lock_dir,
    remove_leftovers,
    unlock,
)
from .dirswap import (
    recover_missing as _recover_missing,
)
from .files import _NEW_FILE_MODE, crc32_file, fsync_dir, storage_error
from .load import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    METADATA,
    VECTORS,
    parse_manifest,
    sign_manifest,
)
from .load import manifest_path as _manifest_path
from .load import open_index as _open_index
from .metadata import MetadataStore
from .vectors import Storage, write_rows

if TYPE_CHECKING:
    from ..backends import Backend
    from ..core.tree import Tree
    from ..index.clustered import ClusteredIndex

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "SaveJob",
    "manifest_path",
    "open_index",
    "parse_manifest",
    "recover_missing",
    "save_index",
]

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


def _arrays(index: ClusteredIndex, tree: Tree, base: Part, ids: I64) -> dict[str, npt.NDArray[Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {
        "centroids.npy": tree.centroids,
        "children.npy": tree.children,
        "leaf_of_node.npy": tree.leaf_of_node,
        "leaf_offsets.npy": base.offsets,
        "ids.npy": ids,
    }
    if base.codes is not None and base.norms is not None:
        arrays["codes.npy"] = base.codes
        arrays["norms.npy"] = base.norms
    if base.dots is not None:
        arrays["dots.npy"] = base.dots
    if index._quantizer.perm is not None and index._quantizer.blocks is not None:
        arrays["perm.npy"] = index._quantizer.perm
        arrays["blocks.npy"] = index._quantizer.blocks
    return arrays


def _complete_index(directory: Path) -> bool:
    """Whether ``directory`` holds a whole saved index: a valid manifest, and every file it
    lists present with its recorded size and CRC32 (reads every file once)."""
    try:
        with open(directory / MANIFEST, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
        files: dict[str, dict[str, int]] = parse_manifest(raw, directory / MANIFEST)["files"]
        return VECTORS in files and all(
            not (directory / name).is_symlink()
            and (directory / name).is_file()
            and (directory / name).stat().st_size == entry["size"]
            and crc32_file(directory / name) == entry["crc32"]
            for name, entry in files.items()
        )
    except (OSError, InvalidIndexFileError):
        return False


class SaveJob:
    """One save of ``index`` to ``path``, built on the caller's thread, :meth:`run` on any.

    :meth:`run` takes one consistent state of the index, then writes every file into a
    temporary directory beside ``path`` (under the parent's lock) and swaps it in; on any
    failure the temporary directory is removed and the lock released before it raises.
    :meth:`stop` (from any thread) makes a run that has not begun its swap remove what it
    wrote and raise; once the swap has begun, the run completes. :func:`save_index` runs
    one on the caller's thread; the async engine runs one on its executor.
    """

    def __init__(
        self,
        index: ClusteredIndex,
        path: Path,
        progress: bool | None = False,
        *,
        stoppable: bool = True,
    ) -> None:
        """``stoppable=False``: :meth:`stop` is never called (waits for the lock in the
        kernel instead of polling)."""
        self.index = index
        self._stoppable = stoppable
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
            index = self.index
            # One consistent state, taken now: writes may go on while the files are written.
            # Taken before the parent's lock: a save on another thread holds the write lock
            # while it waits for the parent's.
            with index._write_lock:
                state = index._state
                tree, base, order = compacted(state.tree, state.base, state.delta, state.row_ok)
                metadata = index._metadata.copy()
            ids = state.row_id[order]
            self.n = int(order.shape[0])
            lock = self._lock_parent()
            try:
                remove_leftovers(self.parent, self.path.name, _complete_index)
                tmp = self.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
                tmp.mkdir()
                try:
                    files = self._write_data(tmp, tree, base, order, ids, state.storage, metadata)
                    self._check_stop()
                    manifest = sign_manifest(
                        {
                            "format": FORMAT_NAME,
                            "format_version": FORMAT_VERSION,
                            "dim": index.dim,
                            "metric": index.metric.value,
                            "n": self.n,
                            "n_nodes": tree.n_nodes,
                            "n_leaves": tree.n_leaves,
                            "params": index.params,
                            "files": files,
                        }
                    )
                    with open(tmp / MANIFEST, "wb") as fh:
                        fh.write(manifest)
                        fh.flush()
                        os.fsync(fh.fileno())
                    if os.name == "posix":
                        # Read-only, so that copying a backup over a live index (which
                        # truncates the mapped file in place: SIGBUS in every reader) fails;
                        # `cp -f` and directory swaps make new files and stay safe.
                        for name in (*files, MANIFEST):
                            os.chmod(tmp / name, _NEW_FILE_MODE & ~0o222)
                    fsync_dir(tmp)
                    self._check_stop()
                    # From here on the run completes: the new index or the old one stays.
                    install_dir(tmp, self.path, self.parent)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)  # after install_dir: the old one
                    raise
            finally:
                unlock(lock)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(exc, getattr(exc, "filename", None) or self.path) from exc

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

    def _write_data(
        self,
        tmp: Path,
        tree: Tree,
        base: Part,
        order: I64,
        ids: I64,
        storage: Storage,
        metadata: MetadataStore,
    ) -> dict[str, dict[str, int]]:
        """Write and fsync every array, the vector file and the metadata into ``tmp``;
        return each file's size and CRC32."""
        index = self.index
        arrays = _arrays(index, tree, base, ids)
        files: dict[str, dict[str, int]] = {}
        total = sum(int(a.nbytes) for a in arrays.values()) + order.shape[0] * index.dim * 4

        with progress_bar(total, "saving", unit="B", progress=self.progress) as bar:

            def done(n: int) -> None:
                bar.update(n)
                self._check_stop()

            for name, arr in arrays.items():
                files[name] = _write_file(tmp, name, arr)
                done(int(arr.nbytes))
            crc = write_rows(storage.take, order, index.dim, tmp / VECTORS, done)
        files[VECTORS] = {"size": (tmp / VECTORS).stat().st_size, "crc32": crc}
        meta = tmp / METADATA
        metadata.save(meta)
        files[METADATA] = {"size": meta.stat().st_size, "crc32": crc32_file(meta)}
        return files


def save_index(index: ClusteredIndex, path: Path, progress: bool | None = False) -> None:
    """Write ``index`` to the directory ``path`` atomically. See the module docstring."""
    job = SaveJob(index, path, progress, stoppable=False)
    job.run()
    log.info("saved %d vectors to %s", job.n, job.path)


def recover_missing(directory: Path) -> None:
    """If ``directory`` is missing but a save into its parent crashed between its two
    renames, rename the copy it left back (see the module docstring and
    :func:`._dirswap.recover_missing`)."""
    _recover_missing(Path(directory), _complete_index, "index")


def manifest_path(directory: Path) -> Path:
    """``directory/manifest.json``, after :func:`recover_missing` and checking that
    ``directory`` is a directory."""
    recover_missing(directory)
    return _manifest_path(directory)


def open_index(
    cls: type[ClusteredIndex],
    directory: Path,
    *,
    mmap: bool,
    verify: bool,
    backend: Backend,
    manifest: dict[str, Any] | None = None,
    progress: bool | None = False,
) -> ClusteredIndex:
    """:func:`recover_missing`, then open the saved index (``reader.open_index``)."""
    recover_missing(directory)
    return _open_index(
        cls,
        directory,
        mmap=mmap,
        verify=verify,
        backend=backend,
        manifest=manifest,
        progress=progress,
    )
