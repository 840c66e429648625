"""Saving and opening an index directory.

Layout of a saved index (format version 1)::

    my_index/
      manifest.json     format, version, dim, metric, n, build parameters, and the size and
                        CRC32 of every other file
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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ._files import crc32_file, fsync_dir, storage_error
from .codes import BLOCK, CodeTable, Quantizer, cos_table, words_for
from .errors import InvalidIndexFileError, StorageError
from .living import compacted
from .metadata import MetadataStore
from .metrics import Metric
from .parts import Part
from .storage import InMemoryStorage, MmapStorage, write_rows
from .tree import Tree

I64 = npt.NDArray[np.int64]

if TYPE_CHECKING:
    from .backends import Backend
    from .index import ClusteredIndex

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

FORMAT_NAME = "vectordb.ClusteredIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.bin"
METADATA = "metadata.sqlite"
MAX_MANIFEST_BYTES = 1 << 20


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


def _arrays(index: ClusteredIndex, base: Part, ids: I64) -> dict[str, npt.NDArray[Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {
        "centroids.npy": index._tree.centroids,
        "children.npy": index._tree.children,
        "leaf_of_node.npy": index._tree.leaf_of_node,
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

    def __init__(self, index: ClusteredIndex, path: Path) -> None:
        path = Path(path)
        if path.is_symlink():  # replace what the link points to, and keep the link
            path = path.resolve()
        if path.exists() and not (
            path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST).is_file())
        ):
            raise StorageError(
                errno.EEXIST,
                "exists and is not a vectordb index directory; refusing to replace it",
                str(path),
            )
        self.index = index
        # One consistent state, taken now: writes may go on while the files are written.
        state = index._state
        self.base, self.order = compacted(state.base, state.delta, state.row_ok)
        self.ids = state.row_id[self.order]
        self.storage = state.storage
        self.metadata = index._metadata.copy()
        self.path = path
        self.parent = path.parent if str(path.parent) else Path(".")
        self.tmp = self.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.files: dict[str, dict[str, int]] = {}
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise storage_error(exc, self.tmp) from exc

    @property
    def manifest_path(self) -> Path:
        return self.tmp / MANIFEST

    def write_data(self) -> None:
        """Write and fsync every array and the vector file into the temporary directory."""
        for name, arr in _arrays(self.index, self.base, self.ids).items():
            self.files[name] = _write_file(self.tmp, name, arr)
        index = self.index
        crc = write_rows(self.storage.take, self.order, index.dim, self.tmp / VECTORS)
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
            "n_nodes": index._tree.n_nodes,
            "n_leaves": index.n_leaves,
            "params": index.params,
            "files": self.files,
        }
        return json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")

    def commit(self) -> None:
        """fsync the temporary directory and swap it in for the target."""
        fsync_dir(self.tmp)
        _install(self.tmp, self.path, self.parent)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def error(self, exc: BaseException) -> BaseException:
        """The exception to raise for ``exc``: ``OSError``s become ``StorageError``s."""
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            return storage_error(exc, getattr(exc, "filename", None) or self.path)
        return exc


def save_index(index: ClusteredIndex, path: Path) -> None:
    """Write ``index`` to the directory ``path`` atomically. See the module docstring."""
    job = SaveJob(index, path)
    try:
        job.write_data()
        with open(job.manifest_path, "wb") as fh:
            fh.write(job.manifest_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        job.commit()
    except BaseException as exc:
        job.abort()
        err = job.error(exc)
        if err is exc:
            raise
        raise err from exc


def _renameat2_exchange() -> Any:
    """libc's ``renameat2`` when it exists (glibc >= 2.28), else ``None``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _install(tmp: Path, path: Path, parent: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``path``; the old one is removed."""
    if not path.exists():
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    exchange = _renameat2_exchange()
    if (
        exchange is not None
        and exchange(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE)
        == 0
    ):
        old = tmp  # tmp now holds the old index
    else:
        old = parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
        os.rename(tmp, path)
    # The new index is complete and in place from here on. Should the fsync below fail, the
    # error is raised (the switch may not be durable yet), but the old copy goes regardless.
    try:
        fsync_dir(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- open


def _bad(path: Path, problem: str) -> InvalidIndexFileError:
    return InvalidIndexFileError(f"{path}: {problem}")


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = manifest_path(directory)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _bad(path, "missing; this directory is not a saved vectordb index") from None
    except OSError as exc:
        raise storage_error(exc, path) from exc
    return parse_manifest(raw, path)


def manifest_path(directory: Path) -> Path:
    """``directory/manifest.json``, after checking that ``directory`` is a directory."""
    if not directory.is_dir():
        raise InvalidIndexFileError(f"{directory}: not a directory (expected a saved index)")
    return directory / MANIFEST


def parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """Validate the manifest's bytes (read from ``path``, at most ``MAX_MANIFEST_BYTES + 1``)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _bad(path, f"larger than {MAX_MANIFEST_BYTES} bytes; not a vectordb manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _bad(path, f"expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise _bad(path, f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _bad(
            path,
            f"format_version is {version!r}, expected {FORMAT_VERSION} "
            "(saved by another version of vectordb?)",
        )
    for key in ("dim", "n", "n_nodes", "n_leaves"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(path, f"{key!r} must be a positive integer, found {value!r}")
    try:
        manifest["metric"] = Metric(manifest.get("metric"))
    except ValueError:
        raise _bad(path, f"unknown metric {manifest.get('metric')!r}") from None
    params = manifest.get("params")
    if not isinstance(params, dict):
        raise _bad(path, "'params' must be an object")
    bf = params.get("branching_factor")
    if isinstance(bf, bool) or not isinstance(bf, int) or bf < 2:
        raise _bad(path, f"params.branching_factor must be an integer >= 2, found {bf!r}")
    if not isinstance(params.get("rotate"), bool):
        raise _bad(path, f"params.rotate must be true or false, found {params.get('rotate')!r}")
    if params.get("leaf_scan") not in ("codes", "vectors"):
        raise _bad(
            path,
            f"params.leaf_scan must be 'codes' or 'vectors', found {params.get('leaf_scan')!r}",
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _bad(path, "'files' must be an object")
    for name, entry in files.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(f), int) and not isinstance(entry.get(f), bool) and entry[f] >= 0
            for f in ("size", "crc32")
        )
        if not ok:
            raise _bad(path, f"files[{name!r}] must have non-negative integer 'size' and 'crc32'")
    return manifest


def _check_file(directory: Path, name: str, files: dict[str, Any], verify: bool) -> Path:
    path = directory / name
    if name not in files:
        raise _bad(directory / MANIFEST, f"does not list {name}")
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "missing (or not a regular file)")
    size = path.stat().st_size
    if size != files[name]["size"]:
        raise _bad(path, f"size is {size} bytes, expected {files[name]['size']}")
    if verify:
        crc = crc32_file(path)
        if crc != files[name]["crc32"]:
            raise _bad(path, f"CRC32 is {crc:#010x}, expected {files[name]['crc32']:#010x}")
    return path


def _load_npy(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Load an ``.npy`` whose header must declare exactly ``dtype`` and ``shape``."""
    try:
        with open(path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(fh)
                else:
                    header = np.lib.format.read_array_header_2_0(fh)
            except ValueError as exc:
                raise _bad(path, f"not a valid .npy file ({exc})") from None
            found_shape, fortran, found_dtype = header
            if found_dtype != dtype or tuple(found_shape) != shape or fortran:
                raise _bad(
                    path,
                    f"holds {found_dtype}{list(found_shape)}"
                    f"{' (Fortran order)' if fortran else ''}, expected {dtype}{list(shape)}",
                )
            arr = np.fromfile(fh, dtype=dtype, count=int(np.prod(shape)))
    except OSError as exc:
        raise storage_error(exc, path) from exc
    if arr.size != int(np.prod(shape)):
        raise _bad(path, f"truncated: {arr.size} values, expected {int(np.prod(shape))}")
    return arr.reshape(shape)


def open_index(
    cls: type[ClusteredIndex],
    directory: Path,
    *,
    mmap: bool,
    verify: bool,
    backend: Backend,
    manifest: dict[str, Any] | None = None,
) -> ClusteredIndex:
    """Open a saved index. See ``ClusteredIndex.open``. ``manifest``: already parsed."""
    if manifest is None:
        manifest = _read_manifest(directory)
    files = manifest["files"]
    dim, n = manifest["dim"], manifest["n"]
    n_nodes, n_leaves = manifest["n_nodes"], manifest["n_leaves"]
    metric: Metric = manifest["metric"]
    params = manifest["params"]
    bf = params["branching_factor"]
    bits = words_for(dim) * 64 if params["rotate"] else dim
    expected: dict[str, tuple[type, tuple[int, ...]]] = {
        "centroids.npy": (np.float32, (n_nodes, bits)),
        "children.npy": (np.int64, (n_nodes, bf)),
        "leaf_of_node.npy": (np.int64, (n_nodes,)),
        "leaf_offsets.npy": (np.int64, (n_leaves + 1,)),
        "ids.npy": (np.int64, (n,)),
    }
    codes = params["leaf_scan"] == "codes"
    if codes:
        expected["codes.npy"] = (np.uint64, (words_for(bits), n))
        expected["norms.npy"] = (np.float32, (n,))
    if codes and metric is Metric.IP:
        expected["dots.npy"] = (np.float32, (n,))
    if params["rotate"]:
        expected["perm.npy"] = (np.int64, (bits,))
        expected["blocks.npy"] = (np.float32, (bits // BLOCK, BLOCK, BLOCK))
    arrays = {
        name: _load_npy(_check_file(directory, name, files, verify), np.dtype(dt), shape)
        for name, (dt, shape) in expected.items()
    }
    _check_structure(directory, arrays, n, n_nodes, n_leaves)
    vec_path = _check_file(directory, VECTORS, files, verify)
    if files[VECTORS]["size"] != n * dim * 4:
        raise _bad(vec_path, f"size is {files[VECTORS]['size']} bytes, expected {n * dim * 4}")

    tree = Tree(
        centroids=arrays["centroids.npy"],
        children=arrays["children.npy"],
        leaf_of_node=arrays["leaf_of_node.npy"],
    )
    quantizer = Quantizer(dim, arrays.get("perm.npy"), arrays.get("blocks.npy"))
    table = (
        CodeTable(
            centroids=tree.centroids,
            leaf_nodes=tree.leaf_nodes,
            cos_lut=cos_table(quantizer.bits),
            metric=metric,
        )
        if codes
        else None
    )
    base = Part(
        offsets=arrays["leaf_offsets.npy"],
        rows=None,
        codes=arrays.get("codes.npy"),
        norms=arrays.get("norms.npy"),
        dots=arrays.get("dots.npy"),
    )
    ids = arrays["ids.npy"]
    if np.unique(ids).shape[0] != n or (ids < 0).any():
        raise _bad(directory / "ids.npy", "ids must be distinct and >= 0")
    metadata = None
    if METADATA in files:
        metadata = MetadataStore.load(_check_file(directory, METADATA, files, verify))
    storage: InMemoryStorage | MmapStorage
    if mmap:
        storage = MmapStorage(vec_path, n, dim)
    else:
        try:
            vectors = np.fromfile(vec_path, dtype="<f4").astype(np.float32, copy=False)
        except OSError as exc:
            raise storage_error(exc, vec_path) from exc
        storage = InMemoryStorage(vectors.reshape(n, dim))
    return cls(
        tree=tree,
        table=table,
        base=base,
        quantizer=quantizer,
        ids=ids,
        storage=storage,
        metric=metric,
        params=params,
        backend=backend,
        metadata=metadata,
    )


def _check_structure(
    directory: Path, arrays: dict[str, npt.NDArray[Any]], n: int, n_nodes: int, n_leaves: int
) -> None:
    """Cheap consistency checks so that a damaged tree cannot index out of bounds."""
    offsets = arrays["leaf_offsets.npy"]
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise _bad(directory / "leaf_offsets.npy", f"must rise from 0 to n={n}")
    children = arrays["children.npy"]
    if ((children < -1) | (children >= n_nodes)).any():
        raise _bad(directory / "children.npy", f"node ids must lie in [-1, {n_nodes})")
    leaf_of_node = arrays["leaf_of_node.npy"]
    leaves = np.sort(leaf_of_node[leaf_of_node >= 0])
    if not np.array_equal(leaves, np.arange(n_leaves)):
        raise _bad(
            directory / "leaf_of_node.npy", f"must number leaves 0..{n_leaves - 1} once each"
        )
    is_leaf = leaf_of_node >= 0
    has_children = (children >= 0).any(axis=1)
    if (is_leaf & has_children).any() or (~is_leaf & ~has_children).any():
        raise _bad(directory / "children.npy", "leaves must have no children, inner nodes some")
    perm = arrays.get("perm.npy")
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
        raise _bad(directory / "perm.npy", "is not a permutation")
    if not np.isfinite(arrays["centroids.npy"]).all():
        raise _bad(directory / "centroids.npy", "contains NaN or infinite values")
    if "norms.npy" in arrays and not np.isfinite(arrays["norms.npy"]).all():
        raise _bad(directory / "norms.npy", "contains NaN or infinite values")
