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
import threading
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
    LIVING_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    METADATA,
    NO_ZERO_RUNS,
    TAIL,
    VECTORS,
    bad_file,
    expected_arrays,
    parse_manifest,
)
from .memory import reading_in_order
from .metadata import MetadataStore
from .snapshot import IndexData, LivingData
from .structure import check_living, check_no_holes, check_structure
from .vectors import InMemoryStorage, MmapStorage, VectorStore

log = logging.getLogger("vectordb")

__all__ = ["OPEN_ATTEMPTS", "is_complete", "load_index", "manifest_path", "recover_missing"]

#: How many times an open starts again when another process replaced the directory under
#: it; then it gives up with ``StorageError`` (``errno.EAGAIN``).
OPEN_ATTEMPTS = 8
_HEADER_LOCK = threading.Lock()


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
    # A checkpoint's tail may be longer than the rows it lists (see storage.rowfile).
    if size != expected and not (path.name == TAIL and size > expected):
        raise bad_file(path, f"size is {size} bytes, expected {expected}")


def _read_header(fh: io.FileIO, path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    """Check that the ``.npy`` header declares exactly ``dtype`` and ``shape`` (C order)
    and that the file holds exactly that much data; return where the data starts."""
    try:
        try:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            # One parse at a time: NumPy parses the header with ast.literal_eval, and
            # CPython's AST recursion counter is not thread-safe (gh-106905): opens on
            # several threads at once raised "SystemError: AST constructor recursion
            # depth mismatch" (seen in CI, shards opened in parallel).
            with _HEADER_LOCK:
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


def _crc32(
    fh: io.FileIO, path: Path, on_bytes: Callable[[int], None] | None, size: int | None = None
) -> int:
    """CRC32 of the file's first ``size`` bytes (``None``: all), read from its descriptor."""
    try:
        return crc32_of(fh, on_bytes, size)
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
) -> IndexData | LivingData:
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


def _load_version(
    handle: DirHandle, mmap: bool, verify: bool, progress: bool | None
) -> IndexData | LivingData:
    """Read the version of the index that ``handle`` holds (one attempt): every cheap
    check first, for every file, before anything is read or allocated."""
    directory = handle.path
    raw = _read_manifest(handle)
    manifest = parse_manifest(raw, directory / MANIFEST)
    files = manifest["files"]
    expected = expected_arrays(manifest)
    living = manifest["format_version"] == LIVING_VERSION
    tail = [TAIL] if living and manifest["tail_rows"] else []
    names = [*expected, VECTORS, *tail] + ([METADATA] if METADATA in files else [])
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
    slots = manifest["base_slots"] if living else manifest["n"]
    check_structure(directory, arrays, slots, manifest["n_nodes"], manifest["n_leaves"])
    ids = arrays["ids.npy"]
    if living:
        check_living(directory, arrays, manifest)
        ids = ids[ids >= 0]
    elif np.unique(ids).shape[0] != manifest["n"] or (ids < 0).any():
        raise bad_file(directory / "ids.npy", "ids must be distinct and >= 0")
    # SQLite opens its file by path, which may name another version by now: the inode
    # check in _load_metadata catches that and the load starts again.
    metadata = _load_metadata(handle, opened[METADATA], ids) if METADATA in files else None
    if _read_manifest(handle) != raw:
        raise FileReplaced(f"{directory / MANIFEST} changed while the index was being opened")
    storage = _vector_store(directory, opened, manifest, mmap)
    if living:
        return _living_of(manifest, arrays, storage, metadata)
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
    rows, dim = _vector_rows(manifest), manifest["dim"]
    for name, n in zip((VECTORS, TAIL), rows, strict=True):
        if name in opened and files[name]["size"] != n * dim * 4:
            raise bad_file(
                directory / name,
                f"size is {files[name]['size']} bytes, expected {n * dim * 4} "
                f"({n} rows x dim={dim} x 4 bytes of float32)",
            )
    for name in NO_ZERO_RUNS & expected.keys():
        check_no_holes(opened[name], directory / name, offsets[name], expected[name][0].itemsize)
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
            crc = _crc32(fh, directory / name, bar.update, files[name]["size"])
            if crc != files[name]["crc32"]:
                raise bad_file(
                    directory / name,
                    f"CRC32 is {crc:#010x}, expected {files[name]['crc32']:#010x}",
                )


def _vector_rows(manifest: dict[str, Any]) -> tuple[int, int]:
    """Rows of ``vectors.bin`` and of ``vectors.tail.bin`` (0 but in version 5)."""
    if manifest["format_version"] != LIVING_VERSION:
        return manifest["n"], 0
    return manifest["rows"] - manifest["tail_rows"], manifest["tail_rows"]


def _vector_store(
    directory: Path, opened: dict[str, io.FileIO], manifest: dict[str, Any], mmap: bool
) -> VectorStore:
    """The vectors of the checked files: mapped from their descriptors (the same files,
    whatever the paths name by now), or read into RAM."""
    (n, tail), dim = _vector_rows(manifest), manifest["dim"]
    path, fh = directory / VECTORS, opened[VECTORS]
    if mmap:
        mapped_tail = (opened[TAIL].fileno(), tail) if tail else None
        return MmapStorage(path, n, dim, fd=fh.fileno(), tail=mapped_tail)
    parts = [_load(fh, path, 0, np.dtype("<f4"), (n, dim))]
    if tail:
        parts.append(_load(opened[TAIL], directory / TAIL, 0, np.dtype("<f4"), (tail, dim)))
    vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return InMemoryStorage(vectors.astype(np.float32, copy=False))


def _living_of(
    manifest: dict[str, Any],
    arrays: dict[str, npt.NDArray[Any]],
    storage: VectorStore,
    metadata: MetadataStore | None,
) -> LivingData:
    """The checked arrays of a version 5 directory as one :class:`LivingData`."""
    data = _data_of(manifest, arrays, storage, metadata)
    slot_rows: I64 | None = arrays["slot_rows.npy"]
    if np.array_equal(arrays["slot_rows.npy"], np.arange(data.base.size)):
        slot_rows = None  # slot s is row s: 8 bytes a vector of RAM saved
    delta = Part(
        offsets=arrays["delta_offsets.npy"],
        rows=arrays["delta_rows.npy"],
        codes=arrays.get("delta_codes.npy"),
        factors=arrays.get("delta_factors.npy"),
    )
    return LivingData(
        tree=data.tree,
        base=Part(data.base.offsets, slot_rows, data.base.codes, data.base.factors),
        delta=delta,
        quantizer=data.quantizer,
        row_id=arrays["ids.npy"],
        storage=storage,
        metric=data.metric,
        params=data.params,
        metadata=metadata,
        next_id=manifest["next_id"],
    )


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
            and _size_fits(name, (directory / name).stat().st_size, entry["size"])
            and crc32_file(directory / name, size=entry["size"]) == entry["crc32"]
            for name, entry in files.items()
        )
    except (OSError, InvalidIndexFileError):
        return False


def _size_fits(name: str, size: int, listed: int) -> bool:
    """Whether a file of ``size`` bytes can be the one the manifest lists at ``listed``."""
    return size == listed or (name == TAIL and size > listed)


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
