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

``save`` writes a complete new directory under a temporary name (every file fsynced), then
swaps it in with one atomic ``renameat2(RENAME_EXCHANGE)`` where the OS offers it (Linux),
else with two renames; a crash leaves the old index or the new one.

Saves into one parent directory take turns: each holds an exclusive ``flock`` on that
directory from start to end, across processes. So the temporary (``.NAME.tmp-*``) and
replaced (``.NAME.old-*``) directories a save finds beside its target can only be left
over from a save that crashed, and it removes them.
"""

from __future__ import annotations

import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ._dirswap import check_replaceable, install_dir, lock_dir, remove_leftovers, unlock
from ._files import crc32_file, fsync_dir, storage_error
from ._progress import log, progress_bar
from .errors import StorageError
from .living import compacted
from .parts import Part
from .reader import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    METADATA,
    VECTORS,
    manifest_path,
    open_index,
    parse_manifest,
    sign_manifest,
)
from .storage import write_rows

I64 = npt.NDArray[np.int64]


if TYPE_CHECKING:
    from .index import ClusteredIndex
    from .tree import Tree

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "SaveJob",
    "manifest_path",
    "open_index",
    "parse_manifest",
    "save_index",
]


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


class SaveJob:
    """One save, in steps, so that the async engine can run each where it belongs.

    ``start`` -> ``write_data`` -> ``manifest_bytes`` written to ``manifest_path`` and fsynced
    -> ``commit``; on any failure ``abort``. :func:`save_index` runs them in order.
    """

    def __init__(self, index: ClusteredIndex, path: Path, progress: bool | None = False) -> None:
        path = Path(path)
        self.progress = progress
        if path.is_symlink():  # replace what the link points to, and keep the link
            path = path.resolve()
        check_replaceable(path, MANIFEST, "a vectordb index directory")
        self.index = index
        self.parent = path.parent if str(path.parent) else Path(".")
        self._lock = lock_dir(self.parent)
        try:
            remove_leftovers(self.parent, path.name)
        except BaseException:
            self._release()
            raise
        # One consistent state, taken now: writes may go on while the files are written.
        state = index._state
        self.tree, self.base, self.order = compacted(
            state.tree, state.base, state.delta, state.row_ok
        )
        self.ids = state.row_id[self.order]
        self.storage = state.storage
        self.metadata = index._metadata.copy()
        self.path = path
        self.tmp = self.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.files: dict[str, dict[str, int]] = {}
        try:
            self.tmp.mkdir()
        except OSError as exc:
            self._release()
            raise storage_error(exc, self.tmp) from exc

    @property
    def manifest_path(self) -> Path:
        return self.tmp / MANIFEST

    def write_data(self) -> None:
        """Write and fsync every array and the vector file into the temporary directory."""
        arrays = _arrays(self.index, self.tree, self.base, self.ids)
        index = self.index
        total = sum(int(a.nbytes) for a in arrays.values()) + self.order.shape[0] * index.dim * 4
        with progress_bar(total, "saving", unit="B", progress=self.progress) as bar:
            for name, arr in arrays.items():
                self.files[name] = _write_file(self.tmp, name, arr)
                bar.update(int(arr.nbytes))
            crc = write_rows(
                self.storage.take, self.order, index.dim, self.tmp / VECTORS, bar.update
            )
        self.files[VECTORS] = {"size": (self.tmp / VECTORS).stat().st_size, "crc32": crc}
        meta = self.tmp / METADATA
        self.metadata.save(meta)
        self.files[METADATA] = {"size": meta.stat().st_size, "crc32": crc32_file(meta)}

    def manifest_bytes(self) -> bytes:
        index = self.index
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dim": index.dim,
            "metric": index.metric.value,
            "n": int(self.order.shape[0]),
            "n_nodes": self.tree.n_nodes,
            "n_leaves": self.tree.n_leaves,
            "params": index.params,
            "files": self.files,
        }
        return sign_manifest(manifest)

    def commit(self) -> None:
        """fsync the temporary directory and swap it in for the target."""
        try:
            fsync_dir(self.tmp)
            install_dir(self.tmp, self.path, self.parent)
        finally:
            self._release()

    def abort(self) -> None:
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        """Release the parent's lock (once; later calls do nothing)."""
        fd, self._lock = self._lock, None
        unlock(fd)

    def error(self, exc: BaseException) -> BaseException:
        """The exception to raise for ``exc``: ``OSError``s become ``StorageError``s."""
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            return storage_error(exc, getattr(exc, "filename", None) or self.path)
        return exc


def save_index(index: ClusteredIndex, path: Path, progress: bool | None = False) -> None:
    """Write ``index`` to the directory ``path`` atomically. See the module docstring."""
    job = SaveJob(index, path, progress)
    try:
        job.write_data()
        with open(job.manifest_path, "wb") as fh:
            fh.write(job.manifest_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        job.commit()
        log.info("saved %d vectors to %s", job.order.shape[0], job.path)
    except BaseException as exc:
        job.abort()
        err = job.error(exc)
        if err is exc:
            raise
        raise err from exc
