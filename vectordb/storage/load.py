"""Opening a saved index: the manifest, then every file checked before it is used.

The layout is described in :mod:`vectordb.storage.save`. An open reads one version of the
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
import json
import math
import os
import stat
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .._progress import progress_bar
from .._validation import MAX_BRANCHING, MAX_ITERATIONS
from ..core.codes import BLOCK, CodeTable, Quantizer, cos_table, words_for
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import Tree
from ..errors import InvalidIndexFileError, StorageError
from .dirswap import leftovers
from .files import crc32_of, names_file, storage_error
from .metadata import MetadataStore
from .vectors import InMemoryStorage, MmapStorage

if TYPE_CHECKING:
    from ..backends import Backend
    from ..index.clustered import ClusteredIndex

__all__ = ["OPEN_ATTEMPTS", "manifest_path", "open_index", "parse_manifest", "sign_manifest"]

FORMAT_NAME = "vectordb.ClusteredIndex"
#: Version 2 adds the manifest's own checksum; version 1 directories still open.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
VECTORS = "vectors.bin"
METADATA = "metadata.sqlite"
MAX_MANIFEST_BYTES = 1 << 20


#: Every file an index directory may hold; a manifest naming another is rejected.
KNOWN_FILES = frozenset(
    {
        "centroids.npy",
        "children.npy",
        "leaf_of_node.npy",
        "leaf_offsets.npy",
        "codes.npy",
        "norms.npy",
        "dots.npy",
        "ids.npy",
        "perm.npy",
        "blocks.npy",
        VECTORS,
        METADATA,
    }
)
#: Integer build parameters and their valid ranges.
_INT_PARAMS = {
    "branching_factor": (2, MAX_BRANCHING),
    "max_leaf_size": (1, None),
    "max_iterations": (1, MAX_ITERATIONS),
    "seed": (0, None),
    "leaf_target": (1, None),
}
#: Parameters every manifest has had since format version 1.
_REQUIRED_PARAMS = frozenset({"branching_factor"})


def _bad(path: Path, problem: str) -> InvalidIndexFileError:
    return InvalidIndexFileError(f"{path}: {problem}")


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
    except RecursionError:
        raise _bad(path, "nested too deeply; not a vectordb manifest") from None
    if not isinstance(manifest, dict):
        raise _bad(path, f"expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise _bad(path, f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _bad(
            path,
            f"format_version is {version!r}, expected one of {READABLE_VERSIONS} "
            "(saved by another version of vectordb?)",
        )
    _check_manifest_checksum(raw, manifest, version, path)
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
    for key, (low, high) in _INT_PARAMS.items():
        value = params.get(key)
        if value is None and key not in _REQUIRED_PARAMS:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            limits = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise _bad(path, f"params.{key} must be an integer {limits}, found {value!r}")
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
        if name not in KNOWN_FILES:
            # Also keeps names such as "../x" or "/etc/passwd" from ever becoming paths.
            raise _bad(path, f"lists an unknown file {name!r}")
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(f), int) and not isinstance(entry.get(f), bool) and entry[f] >= 0
            for f in ("size", "crc32")
        )
        if not ok:
            raise _bad(path, f"files[{name!r}] must have non-negative integer 'size' and 'crc32'")
    return manifest


def sign_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of ``manifest`` as saved: canonical JSON with its CRC32 as ``checksum``.

    The checksum covers the canonical JSON of everything else; the file must be exactly
    the canonical JSON of the whole, so that a changed byte anywhere (whitespace
    included) is caught.
    """
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    crc = zlib.crc32(_canonical(body))
    return _canonical({**body, "checksum": crc})


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")


def _check_manifest_checksum(
    raw: bytes, manifest: dict[str, Any], version: int, path: Path
) -> None:
    """Version 2 manifests carry the CRC32 of their content (see :func:`sign_manifest`)."""
    checksum = manifest.get("checksum")
    if version == 1:
        if "checksum" in manifest:
            raise _bad(path, "a version 1 manifest has no checksum: damaged")
        return
    if isinstance(checksum, bool) or not isinstance(checksum, int):
        raise _bad(path, f"'checksum' must be an integer, found {checksum!r}")
    if sign_manifest(manifest) != raw:
        raise _bad(path, "checksum mismatch: the manifest was changed or damaged")


#: How many times an open starts again when another process replaced the directory under
#: it; then it gives up with ``StorageError`` (``errno.EAGAIN``).
OPEN_ATTEMPTS = 8
_CHUNK = 8 << 20
_MISSING = "missing (or not a regular file)"
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Refuse a symlink put in place after the lstat; never block on a FIFO.
_O_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_O_FILE |= getattr(os, "O_BINARY", 0)
_DIR_FD = {os.open, os.stat} <= os.supports_dir_fd and os.stat in os.supports_follow_symlinks
#: Arrays whose valid content never holds two equal zero elements (distinct ids; node 0 is
#: never a child; leaf numbers and a permutation each appear once), so a hole in one is
#: damage: a sparse file cannot declare millions of elements without holding them on disk.
_NO_ZERO_RUNS = frozenset({"ids.npy", "children.npy", "leaf_of_node.npy", "perm.npy"})


class _Changed(Exception):
    """The directory changed while it was being opened: start again."""


class _DirMissing(InvalidIndexFileError):
    """Nothing at the index's path (as opposed to something that is not a directory)."""


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _IndexDir:
    """An index directory opened once; its files are opened through that handle.

    Where the OS lacks ``dir_fd`` (Windows), files are opened by path; each is still
    opened once, checked on its descriptor and read from it.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory
        self._fd: int | None = None
        self._files: list[io.FileIO] = []
        not_dir = f"{directory}: not a directory (expected a saved index)"
        try:
            if _DIR_FD:
                self._fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY)
                st = os.fstat(self._fd)
            else:
                st = os.stat(directory)
        except FileNotFoundError:
            raise _DirMissing(not_dir) from None
        except NotADirectoryError:
            raise InvalidIndexFileError(not_dir) from None
        except OSError as exc:
            raise storage_error(exc, directory) from exc
        if not stat.S_ISDIR(st.st_mode):
            self.close()
            raise InvalidIndexFileError(not_dir)
        self._identity = _identity(st)

    def __enter__(self) -> _IndexDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened through this handle, and the handle."""
        files, self._files = self._files, []
        for fh in files:
            fh.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def open(self, name: str, *, missing: str = _MISSING, irregular: str = _MISSING) -> io.FileIO:
        """``name`` opened for reading (unbuffered). ``InvalidIndexFileError`` when it is
        missing (``missing``) or not a regular file (``irregular``): a symlink, a FIFO, a
        device, a directory."""
        path = self.path / name
        try:
            if self._fd is not None:
                st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            else:
                st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise _bad(path, irregular)
            fd = os.open(name if self._fd is not None else path, _O_FILE, dir_fd=self._fd)
        except FileNotFoundError:
            raise _bad(path, missing) from None
        except OSError as exc:
            raise storage_error(exc, path) from exc
        fh = io.FileIO(fd, "rb")
        self._files.append(fh)
        if _identity(os.fstat(fd)) != _identity(st):
            raise _Changed(f"{path} was replaced while being opened")
        return fh

    def replaced(self) -> bool:
        """Whether the directory's path no longer names the directory opened (another
        process swapped a new version in, or removed it)."""
        try:
            return _identity(os.stat(self.path)) != self._identity
        except OSError:
            return True

    def read_manifest(self) -> bytes:
        """The manifest's bytes (at most ``MAX_MANIFEST_BYTES + 1``)."""
        fh = self.open(
            MANIFEST,
            missing="missing; this directory is not a saved vectordb index",
            irregular="not a regular file",
        )
        try:
            return _read_upto(fh, MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise storage_error(exc, self.path / MANIFEST) from exc


def _read_upto(fh: io.FileIO, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fh``'s position (fewer only at the end of the file)."""
    parts: list[bytes] = []
    left = limit
    while left > 0 and (chunk := fh.read(min(left, _CHUNK))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _expected_arrays(manifest: dict[str, Any]) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Every ``.npy`` file the manifest implies: name -> (dtype, shape)."""
    dim, n = manifest["dim"], manifest["n"]
    n_nodes, n_leaves = manifest["n_nodes"], manifest["n_leaves"]
    params = manifest["params"]
    bits = words_for(dim) * 64 if params["rotate"] else dim
    expected: dict[str, tuple[type, tuple[int, ...]]] = {
        "leaf_offsets.npy": (np.int64, (n_leaves + 1,)),
        "children.npy": (np.int64, (n_nodes, params["branching_factor"])),
        "leaf_of_node.npy": (np.int64, (n_nodes,)),
        "centroids.npy": (np.float32, (n_nodes, bits)),
        "ids.npy": (np.int64, (n,)),
    }
    if params["leaf_scan"] == "codes":
        expected["codes.npy"] = (np.uint64, (words_for(bits), n))
        expected["norms.npy"] = (np.float32, (n,))
        if manifest["metric"] is Metric.IP:
            expected["dots.npy"] = (np.float32, (n,))
    if params["rotate"]:
        expected["perm.npy"] = (np.int64, (bits,))
        expected["blocks.npy"] = (np.float32, (bits // BLOCK, BLOCK, BLOCK))
    return {name: (np.dtype(dt), shape) for name, (dt, shape) in expected.items()}


def _check_size(fh: io.FileIO, path: Path, expected: int) -> None:
    size = os.fstat(fh.fileno()).st_size
    if size != expected:
        raise _bad(path, f"size is {size} bytes, expected {expected}")


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
            raise _bad(path, f"not a valid .npy file ({type(exc).__name__}: {exc})") from None
        found_shape, fortran, found_dtype = header
        if found_dtype != dtype or tuple(found_shape) != shape or fortran:
            raise _bad(
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
        raise _bad(path, f"{what}: {size} bytes, expected {expected_size}")
    return offset


def _check_no_holes(fh: io.FileIO, path: Path, start: int, itemsize: int) -> None:
    """Refuse a file with a hole (a range the file system stores no data for: zeros)
    after ``start`` long enough to hold two whole elements of ``itemsize`` bytes.

    Only for files whose valid content never holds two zero elements (``_NO_ZERO_RUNS``);
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
                raise _bad(
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
        raise _bad(path, f"truncated: {arr.size} values, expected {count}")
    return arr.reshape(shape)


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
    """Open a saved index. See ``ClusteredIndex.open``.

    ``manifest``: the caller's parsed copy (the async engine reads it with aiofiles). The
    open reads the manifest again through its directory handle and uses that one, so that
    manifest and files are of one version even when the directory was replaced after the
    caller read it.

    Raises ``StorageError`` with ``errno.EAGAIN`` when the directory was replaced under the
    open ``OPEN_ATTEMPTS`` times in a row (another process saving without pause): retry.
    """
    del manifest  # see above: only the copy read through the handle is consistent
    last: BaseException | None = None
    for attempt in range(OPEN_ATTEMPTS):
        if attempt:
            time.sleep(min(0.05, 0.001 * 2**attempt))  # let a save in progress finish
        try:
            handle = _IndexDir(directory)
        except _DirMissing as exc:
            if not _between_renames(directory):
                raise InvalidIndexFileError(str(exc)) from None
            last = exc
            continue
        with handle:
            try:
                return _open_version(cls, handle, mmap, verify, backend, progress)
            except _Changed as exc:
                last = exc
            except (InvalidIndexFileError, StorageError) as exc:
                # A file gone or odd because the directory was swapped and removed under
                # us is no damage: the new version is complete. Start again.
                if not handle.replaced():
                    raise
                last = exc
    if isinstance(last, _DirMissing) and not os.path.lexists(directory):
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
    ``_dirswap.install_dir``) and then the new one in."""
    if os.path.lexists(directory):
        return True  # back already
    try:
        return bool(leftovers(directory.parent, directory.name)[1])
    except OSError:
        return False


def _open_version(
    cls: type[ClusteredIndex],
    handle: _IndexDir,
    mmap: bool,
    verify: bool,
    backend: Backend,
    progress: bool | None,
) -> ClusteredIndex:
    """Open the version of the index that ``handle`` holds (one attempt)."""
    directory = handle.path
    raw = handle.read_manifest()
    manifest = parse_manifest(raw, directory / MANIFEST)
    files = manifest["files"]
    dim, n = manifest["dim"], manifest["n"]
    n_nodes, n_leaves = manifest["n_nodes"], manifest["n_leaves"]
    metric: Metric = manifest["metric"]
    params = manifest["params"]
    expected = _expected_arrays(manifest)
    names = [*expected, VECTORS] + ([METADATA] if METADATA in files else [])

    # Every cheap fact first, for every file, before anything is read or allocated: a
    # file's size (on the descriptor read later) against the manifest, each header's
    # shape against the manifest's counts, the vector file against n x dim.
    for name in names:
        if name not in files:
            raise _bad(directory / MANIFEST, f"does not list {name}")
    opened = {name: handle.open(name) for name in names}
    for name in names:
        _check_size(opened[name], directory / name, files[name]["size"])
    offsets = {
        name: _read_header(opened[name], directory / name, dtype, shape)
        for name, (dtype, shape) in expected.items()
    }
    vec_path = directory / VECTORS
    if files[VECTORS]["size"] != n * dim * 4:
        raise _bad(vec_path, f"size is {files[VECTORS]['size']} bytes, expected {n * dim * 4}")
    for name in _NO_ZERO_RUNS & expected.keys():
        _check_no_holes(opened[name], directory / name, offsets[name], expected[name][0].itemsize)
    if verify:
        total = sum(files[name]["size"] for name in names)
        with progress_bar(total, "verifying", unit="B", progress=progress) as bar:
            for name in names:
                crc = _crc32(opened[name], directory / name, bar.update)
                if crc != files[name]["crc32"]:
                    raise _bad(
                        directory / name,
                        f"CRC32 is {crc:#010x}, expected {files[name]['crc32']:#010x}",
                    )

    arrays = {
        name: _load(opened[name], directory / name, offsets[name], dtype, shape)
        for name, (dtype, shape) in expected.items()
    }
    _check_structure(directory, arrays, n, n_nodes, n_leaves)
    ids = arrays["ids.npy"]
    if np.unique(ids).shape[0] != n or (ids < 0).any():
        raise _bad(directory / "ids.npy", "ids must be distinct and >= 0")
    # SQLite opens its file by path, which may name another version by now: the inode
    # check in _load_metadata catches that and the open starts again.
    metadata = _load_metadata(handle, opened[METADATA], ids) if METADATA in files else None
    if handle.read_manifest() != raw:
        raise _Changed(f"{directory / MANIFEST} changed while the index was being opened")

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
        if params["leaf_scan"] == "codes"
        else None
    )
    base = Part(
        offsets=arrays["leaf_offsets.npy"],
        rows=None,
        codes=arrays.get("codes.npy"),
        norms=arrays.get("norms.npy"),
        dots=arrays.get("dots.npy"),
    )
    vectors_fh = opened[VECTORS]
    storage: InMemoryStorage | MmapStorage
    if mmap:
        # Mapped from the descriptor checked above: the same file, whatever the path
        # names by now.
        storage = MmapStorage(vec_path, n, dim, fd=vectors_fh.fileno())
    else:
        vectors = _load(vectors_fh, vec_path, 0, np.dtype("<f4"), (n, dim))
        storage = InMemoryStorage(vectors.astype(np.float32, copy=False))
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


def _load_metadata(handle: _IndexDir, fh: io.FileIO, ids: npt.NDArray[np.int64]) -> MetadataStore:
    """Load ``metadata.sqlite``: SQLite opens it by path, so the path must name the file
    opened through the handle before and after (an installed directory is never
    installed again, and the open descriptor keeps the file's inode from being reused)."""
    path = handle.path / METADATA

    def still_ours() -> bool:
        return names_file(path, fh.fileno())

    if not still_ours():
        raise _Changed(f"{path} was replaced while the index was being opened")
    try:
        store = MetadataStore.load(path, ids=ids)
    except InvalidIndexFileError:
        if not still_ours():
            raise _Changed(f"{path} was replaced while the index was being opened") from None
        raise
    if not still_ours():
        raise _Changed(f"{path} was replaced while the index was being opened")
    return store


def _check_tree(file: Path, children: npt.NDArray[Any], n_nodes: int) -> None:
    """A tree rooted at node 0: every other node the child of exactly one node, and all
    reachable from the root. Without it a damaged file could make routing loop forever
    (a child pointing back up) or visit a leaf twice."""
    kids = children[children >= 0]
    if not np.array_equal(np.sort(kids), np.arange(1, n_nodes)):
        raise _bad(file, "every node but the root must be the child of exactly one node")
    reached, level = 1, np.zeros(1, dtype=np.int64)
    while level.shape[0]:  # visits each node once: every node has one parent, the root none
        level = children[level].ravel()
        level = level[level >= 0]
        reached += level.shape[0]
    if reached != n_nodes:
        raise _bad(file, f"{n_nodes - reached} nodes are not reachable from the root (a cycle)")


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
    _check_tree(directory / "children.npy", children, n_nodes)
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
