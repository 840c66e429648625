"""Loading a saved index: the manifest, then every file checked before it is used.

The layout is described in :mod:`vectordb.storage.format`. An open reads one version of the
directory: it opens the directory once and every file relative to that handle
(``dir_fd``), so a save that swaps a new directory in meanwhile cannot mix two versions;
an open that finds its directory replaced under it starts again, a few times
(:data:`OPEN_ATTEMPTS`). Nothing is loaded, mapped or allocated before every file's size,
every ``.npy`` header and the vector file's size agree with the manifest and so with each
other.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._progress import progress_bar
from .._types import F32, I64
from ..core.codes import FACTORS, Quantizer, code_factors, origin_of
from ..core.parts import Part
from ..core.tree import Tree
from ..errors import InvalidIndexFileError, StorageError
from .dirhandle import DirHandle, DirMissing, FileReplaced, read_upto
from .dirswap import leftovers
from .dirswap import recover_missing as _recover_missing
from .files import crc32_file, crc32_of, names_file, storage_error
from .format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    METADATA,
    NO_ZERO_RUNS,
    VECTORS,
    bad_file,
    expected_arrays,
    parse_manifest,
)
from .memory import reading_in_order
from .metadata import MetadataStore
from .snapshot import IndexData
from .vectors import InMemoryStorage, MmapStorage, VectorStore

log = logging.getLogger("vectordb")

__all__ = ["OPEN_ATTEMPTS", "is_complete", "load_index", "manifest_path", "recover_missing"]

#: How many times an open starts again when another process replaced the directory under
#: it; then it gives up with ``StorageError`` (``errno.EAGAIN``).
OPEN_ATTEMPTS = 8


def _read_manifest(handle: DirHandle) -> bytes:
    """The manifest's bytes through ``handle`` (at most ``MAX_MANIFEST_BYTES + 1``)."""
    fh = handle.open(
        MANIFEST,
        missing="missing; this directory is not a saved vectordb index",
        irregular="not a regular file",
    )
    try:
        return read_upto(fh, MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise storage_error(exc, handle.path / MANIFEST) from exc


def _check_size(fh: io.FileIO, path: Path, expected: int) -> None:
    size = os.fstat(fh.fileno()).st_size
    if size != expected:
        raise bad_file(path, f"size is {size} bytes, expected {expected}")


def _read_header(fh: io.FileIO, path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    """Check that the ``.npy`` header declares exactly ``dtype`` and ``shape`` (C order)
    and that the file holds exactly that much data; return where the data starts."""
    try:
        try:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fh)
            else:
                header = np.lib.format.read_array_header_2_0(fh)
        except OSError:
            raise
        except Exception as exc:
            # NumPy parses the header with ast.literal_eval: damaged bytes raise
            # ValueError, SyntaxError, tokenize errors, and more.
            raise bad_file(path, f"not a valid .npy file ({type(exc).__name__}: {exc})") from None
        found_shape, fortran, found_dtype = header
        if found_dtype != dtype or tuple(found_shape) != shape or fortran:
            raise bad_file(
                path,
                f"holds {found_dtype}{list(found_shape)}"
                f"{' (Fortran order)' if fortran else ''}, expected {dtype}{list(shape)}",
            )
        offset = fh.tell()
        expected_size = offset + math.prod(shape) * dtype.itemsize
        size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise storage_error(exc, path) from exc
    if size != expected_size:
        what = "truncated" if size < expected_size else "longer than its header says"
        raise bad_file(path, f"{what}: {size} bytes, expected {expected_size}")
    return offset


def _check_no_holes(fh: io.FileIO, path: Path, start: int, itemsize: int) -> None:
    """Refuse a file with a hole (a range the file system stores no data for: zeros)
    after ``start`` long enough to hold two whole elements of ``itemsize`` bytes.

    Only for files whose valid content never holds two zero elements (``NO_ZERO_RUNS``);
    a no-op where the OS cannot report holes.
    """
    seek_hole, seek_data = getattr(os, "SEEK_HOLE", None), getattr(os, "SEEK_DATA", None)
    if seek_hole is None or seek_data is None:
        return
    fd = fh.fileno()
    end = os.fstat(fd).st_size
    pos = start
    try:
        while pos < end:
            hole = os.lseek(fd, pos, seek_hole)
            if hole >= end:
                return
            try:
                data = min(os.lseek(fd, hole, seek_data), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after the hole
                    raise
                data = end
            if data - hole >= 3 * itemsize:
                raise bad_file(
                    path,
                    f"sparse: bytes {hole}..{data} are a hole (zeros that were never "
                    "written), which no valid file of this kind holds",
                )
            pos = data
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return  # this file system cannot say
        raise storage_error(exc, path) from exc


def _crc32(fh: io.FileIO, path: Path, on_bytes: Callable[[int], None] | None) -> int:
    """CRC32 of the whole file, read from its descriptor."""
    try:
        return crc32_of(fh, on_bytes)
    except OSError as exc:
        raise storage_error(exc, path) from exc


def _load(
    fh: io.FileIO, path: Path, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> npt.NDArray[Any]:
    """The array at ``offset`` of ``fh`` (header and size checked by :func:`_read_header`)."""
    count = math.prod(shape)
    try:
        fh.seek(offset)
        arr = np.fromfile(fh, dtype=dtype, count=count)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    if arr.size != count:
        raise bad_file(path, f"truncated: {arr.size} values, expected {count}")
    return arr.reshape(shape)


def load_index(
    directory: Path,
    *,
    mmap: bool,
    verify: bool,
    progress: bool | None = False,
    recover: bool = True,
) -> IndexData:
    """Read the index saved in ``directory`` (see ``ClusteredIndex.open`` for the
    arguments); ``recover``: after :func:`recover_missing`.

    Raises ``StorageError`` with ``errno.EAGAIN`` when the directory was replaced under the
    load ``OPEN_ATTEMPTS`` times in a row (another process saving without pause): retry.
    """
    if recover:
        recover_missing(directory)
    last: BaseException | None = None
    for attempt in range(OPEN_ATTEMPTS):
        if attempt:
            time.sleep(min(0.05, 0.001 * 2**attempt))  # let a save in progress finish
        try:
            handle = DirHandle(directory)
        except DirMissing as exc:
            if not _between_renames(directory):
                raise InvalidIndexFileError(str(exc)) from None
            last = exc
            continue
        with handle:
            try:
                return _load_version(handle, mmap, verify, progress)
            except FileReplaced as exc:
                last = exc
            except (InvalidIndexFileError, StorageError) as exc:
                # A file gone or odd because the directory was swapped and removed under
                # us is no damage: the new version is complete. Start again.
                if not handle.replaced():
                    raise
                last = exc
    if isinstance(last, DirMissing) and not os.path.lexists(directory):
        # Nothing there after all (a crashed save's leftovers, at most).
        raise InvalidIndexFileError(str(last)) from None
    raise StorageError(
        errno.EAGAIN,
        f"the index was replaced by another process {OPEN_ATTEMPTS} times while being "
        f"opened (last: {last}); try again",
        str(directory),
    ) from last


def _between_renames(directory: Path) -> bool:
    """Whether ``directory``, found missing, may be missing only for a moment: where the OS
    cannot exchange two directories, a save renames the old one away (``.NAME.old-*``, see
    ``dirswap.install_dir``) and then the new one in."""
    if os.path.lexists(directory):
        return True  # back already
    try:
        return bool(leftovers(directory.parent, directory.name)[1])
    except OSError:
        return False


def _load_version(handle: DirHandle, mmap: bool, verify: bool, progress: bool | None) -> IndexData:
    """Read the version of the index that ``handle`` holds (one attempt): every cheap
    check first, for every file, before anything is read or allocated."""
    directory = handle.path
    raw = _read_manifest(handle)
    manifest = parse_manifest(raw, directory / MANIFEST)
    files = manifest["files"]
    expected = expected_arrays(manifest)
    names = [*expected, VECTORS] + ([METADATA] if METADATA in files else [])
    for name in names:
        if name not in files:
            raise bad_file(directory / MANIFEST, f"does not list {name}")
    opened = {name: handle.open(name) for name in names}
    offsets = _check_files(directory, manifest, expected, opened)
    if verify:
        _verify(directory, files, opened, progress)
    arrays = {
        name: _load(opened[name], directory / name, offsets[name], dtype, shape)
        for name, (dtype, shape) in expected.items()
    }
    _check_structure(directory, arrays, manifest["n"], manifest["n_nodes"], manifest["n_leaves"])
    ids = arrays["ids.npy"]
    if np.unique(ids).shape[0] != manifest["n"] or (ids < 0).any():
        raise bad_file(directory / "ids.npy", "ids must be distinct and >= 0")
    # SQLite opens its file by path, which may name another version by now: the inode
    # check in _load_metadata catches that and the load starts again.
    metadata = _load_metadata(handle, opened[METADATA], ids) if METADATA in files else None
    if _read_manifest(handle) != raw:
        raise FileReplaced(f"{directory / MANIFEST} changed while the index was being opened")
    storage = _vector_store(directory / VECTORS, opened[VECTORS], manifest, mmap)
    return _data_of(manifest, arrays, storage, metadata)


def _check_files(
    directory: Path,
    manifest: dict[str, Any],
    expected: dict[str, tuple[np.dtype[Any], tuple[int, ...]]],
    opened: dict[str, io.FileIO],
) -> dict[str, int]:
    """Sizes (on the descriptors read later) against the manifest, each header's shape
    against the manifest's counts, the vector file against ``n x dim``, no holes where
    none can be (``expected``: :func:`.format.expected_arrays` of the manifest); returns
    where each array's data starts."""
    files = manifest["files"]
    for name, fh in opened.items():
        _check_size(fh, directory / name, files[name]["size"])
    offsets = {
        name: _read_header(opened[name], directory / name, dtype, shape)
        for name, (dtype, shape) in expected.items()
    }
    n, dim = manifest["n"], manifest["dim"]
    if files[VECTORS]["size"] != n * dim * 4:
        raise bad_file(
            directory / VECTORS, f"size is {files[VECTORS]['size']} bytes, expected {n * dim * 4}"
        )
    for name in NO_ZERO_RUNS & expected.keys():
        _check_no_holes(opened[name], directory / name, offsets[name], expected[name][0].itemsize)
    return offsets


def _verify(
    directory: Path,
    files: dict[str, dict[str, int]],
    opened: dict[str, io.FileIO],
    progress: bool | None,
) -> None:
    """Every opened file's CRC32 against the manifest (reads each once)."""
    total = sum(files[name]["size"] for name in opened)
    with progress_bar(total, "verifying", unit="B", progress=progress) as bar:
        for name, fh in opened.items():
            crc = _crc32(fh, directory / name, bar.update)
            if crc != files[name]["crc32"]:
                raise bad_file(
                    directory / name,
                    f"CRC32 is {crc:#010x}, expected {files[name]['crc32']:#010x}",
                )


def _vector_store(path: Path, fh: io.FileIO, manifest: dict[str, Any], mmap: bool) -> VectorStore:
    """The vectors of the checked file ``fh``: mapped from its descriptor (the same file,
    whatever ``path`` names by now), or read into RAM."""
    n, dim = manifest["n"], manifest["dim"]
    if mmap:
        return MmapStorage(path, n, dim, fd=fh.fileno())
    vectors = _load(fh, path, 0, np.dtype("<f4"), (n, dim))
    return InMemoryStorage(vectors.astype(np.float32, copy=False))


def _data_of(
    manifest: dict[str, Any],
    arrays: dict[str, npt.NDArray[Any]],
    storage: VectorStore,
    metadata: MetadataStore | None,
) -> IndexData:
    """The checked arrays as one :class:`IndexData`."""
    tree = Tree(
        centroids=arrays["centroids.npy"],
        children=arrays["children.npy"],
        leaf_of_node=arrays["leaf_of_node.npy"],
    )
    quantizer = Quantizer(
        manifest["dim"],
        arrays.get("perm.npy"),
        arrays.get("blocks.npy"),
        manifest["params"].get("code_bits", 1),
    )
    codes = arrays.get("codes.npy")
    factors = arrays.get("factors.npy")
    if codes is not None and factors is None:
        factors = _factors_from_vectors(
            tree, arrays["leaf_offsets.npy"], quantizer, storage, manifest
        )
    base = Part(offsets=arrays["leaf_offsets.npy"], rows=None, codes=codes, factors=factors)
    return IndexData(
        tree=tree,
        base=base,
        quantizer=quantizer,
        ids=arrays["ids.npy"],
        storage=storage,
        rows=None,
        metric=manifest["metric"],
        params=manifest["params"],
        metadata=metadata,
    )


def _factors_from_vectors(
    tree: Tree, offsets: I64, quantizer: Quantizer, storage: VectorStore, manifest: dict[str, Any]
) -> F32:
    """The ``(FACTORS, n)`` float32 code factors of a format 1 or 2 directory, which kept
    only residual norms: computed from the stored vectors leaf by leaf (one read of the
    vector file; a save writes them, and the next open reads them instead)."""
    log.info(
        "index of format version %d: computing its code factors from the vectors (save it "
        "again to store them)",
        manifest["format_version"],
    )
    n = int(offsets[-1])
    factors = np.empty((FACTORS, n), dtype=np.float32)
    with reading_in_order(storage):
        for leaf, node in enumerate(tree.leaf_nodes):
            a, b = int(offsets[leaf]), int(offsets[leaf + 1])
            if a < b:
                centre = tree.centroids[node]
                residual = quantizer.rotate(storage.slice(a, b)) - centre
                factors[:, a:b] = code_factors(
                    residual, centre, manifest["metric"], origin_of(tree)
                )
    return factors


def _load_metadata(handle: DirHandle, fh: io.FileIO, ids: I64) -> MetadataStore:
    """Load ``metadata.sqlite``: SQLite opens it by path, so the path must name the file
    opened through the handle before and after (an installed directory is never
    installed again, and the open descriptor keeps the file's inode from being reused)."""
    path = handle.path / METADATA

    def still_ours() -> bool:
        return names_file(path, fh.fileno())

    if not still_ours():
        raise FileReplaced(f"{path} was replaced while the index was being opened")
    try:
        store = MetadataStore.load(path, ids=ids)
    except InvalidIndexFileError:
        if not still_ours():
            raise FileReplaced(f"{path} was replaced while the index was being opened") from None
        raise
    if not still_ours():
        raise FileReplaced(f"{path} was replaced while the index was being opened")
    return store


def _check_tree(file: Path, children: npt.NDArray[Any], n_nodes: int) -> None:
    """A tree rooted at node 0: every other node the child of exactly one node, and all
    reachable from the root. Without it a damaged file could make routing loop forever
    (a child pointing back up) or visit a leaf twice."""
    kids = children[children >= 0]
    if not np.array_equal(np.sort(kids), np.arange(1, n_nodes)):
        raise bad_file(file, "every node but the root must be the child of exactly one node")
    reached, level = 1, np.zeros(1, dtype=np.int64)
    while level.shape[0]:  # visits each node once: every node has one parent, the root none
        level = children[level].ravel()
        level = level[level >= 0]
        reached += level.shape[0]
    if reached != n_nodes:
        raise bad_file(file, f"{n_nodes - reached} nodes are not reachable from the root (a cycle)")


def _check_structure(
    directory: Path, arrays: dict[str, npt.NDArray[Any]], n: int, n_nodes: int, n_leaves: int
) -> None:
    """Cheap consistency checks so that a damaged tree cannot index out of bounds."""
    offsets = arrays["leaf_offsets.npy"]
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise bad_file(directory / "leaf_offsets.npy", f"must rise from 0 to n={n}")
    children = arrays["children.npy"]
    if ((children < -1) | (children >= n_nodes)).any():
        raise bad_file(directory / "children.npy", f"node ids must lie in [-1, {n_nodes})")
    _check_tree(directory / "children.npy", children, n_nodes)
    leaf_of_node = arrays["leaf_of_node.npy"]
    leaves = np.sort(leaf_of_node[leaf_of_node >= 0])
    if not np.array_equal(leaves, np.arange(n_leaves)):
        raise bad_file(
            directory / "leaf_of_node.npy", f"must number leaves 0..{n_leaves - 1} once each"
        )
    is_leaf = leaf_of_node >= 0
    has_children = (children >= 0).any(axis=1)
    if (is_leaf & has_children).any() or (~is_leaf & ~has_children).any():
        raise bad_file(directory / "children.npy", "leaves must have no children, inner nodes some")
    perm = arrays.get("perm.npy")
    if perm is not None and not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
        raise bad_file(directory / "perm.npy", "is not a permutation")
    if not np.isfinite(arrays["centroids.npy"]).all():
        raise bad_file(directory / "centroids.npy", "contains NaN or infinite values")
    if "norms.npy" in arrays and not np.isfinite(arrays["norms.npy"]).all():
        raise bad_file(directory / "norms.npy", "contains NaN or infinite values")
    factors = arrays.get("factors.npy")
    # A factor may overflow to inf for vectors near MAX_NORM; NaN never comes of a build.
    if factors is not None and (np.isnan(factors).any() or (factors[3] < 0).any()):
        raise bad_file(directory / "factors.npy", "contains NaN or a negative error bound")


def is_complete(directory: Path) -> bool:
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


def recover_missing(directory: Path) -> None:
    """If ``directory`` is missing but a save into its parent crashed between its two
    renames, rename the copy it left back (see :mod:`vectordb.storage.save` and
    :func:`.dirswap.recover_missing`)."""
    _recover_missing(Path(directory), is_complete, "index")


def manifest_path(directory: Path) -> Path:
    """``directory/manifest.json``, after :func:`recover_missing` and checking that
    ``directory`` is a directory."""
    recover_missing(directory)
    if not directory.is_dir():
        raise InvalidIndexFileError(f"{directory}: not a directory (expected a saved index)")
    return directory / MANIFEST
