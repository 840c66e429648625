"""Opening a saved index: the manifest, then every file checked before it is used.

The layout is described in :mod:`vectordb.persist`. Nothing is mapped or allocated from a
file before its size, and for ``.npy`` files its header, matched the manifest.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._files import crc32_file, storage_error
from ._progress import progress_bar
from ._validation import MAX_BRANCHING, MAX_ITERATIONS
from .codes import BLOCK, CodeTable, Quantizer, cos_table, words_for
from .errors import InvalidIndexFileError
from .metadata import MetadataStore
from .metrics import Metric
from .parts import Part
from .storage import InMemoryStorage, MmapStorage
from .tree import Tree

if TYPE_CHECKING:
    from .backends import Backend
    from .index import ClusteredIndex

__all__ = ["manifest_path", "open_index", "parse_manifest", "sign_manifest"]

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


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = manifest_path(directory)
    if path.exists() and (path.is_symlink() or not path.is_file()):
        raise _bad(path, "not a regular file")
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


def _check_file(
    directory: Path,
    name: str,
    files: dict[str, Any],
    verify: bool,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    path = directory / name
    if name not in files:
        raise _bad(directory / MANIFEST, f"does not list {name}")
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "missing (or not a regular file)")
    size = path.stat().st_size
    if size != files[name]["size"]:
        raise _bad(path, f"size is {size} bytes, expected {files[name]['size']}")
    if verify:
        crc = crc32_file(path, on_bytes)
        if crc != files[name]["crc32"]:
            raise _bad(path, f"CRC32 is {crc:#010x}, expected {files[name]['crc32']:#010x}")
    return path


def _load_npy(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Load an ``.npy`` whose header must declare exactly ``dtype`` and ``shape``."""
    try:
        with open(path, "rb") as fh:
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
            count = math.prod(shape)
            # Sizes are checked before anything is allocated: a header that declares more
            # than the file holds must not become a giant allocation.
            expected_size = fh.tell() + count * dtype.itemsize
            size = os.fstat(fh.fileno()).st_size
            if size != expected_size:
                what = "truncated" if size < expected_size else "longer than its header says"
                raise _bad(path, f"{what}: {size} bytes, expected {expected_size}")
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
    """Open a saved index. See ``ClusteredIndex.open``. ``manifest``: already parsed."""
    if manifest is None:
        manifest = _read_manifest(directory)
    files = manifest["files"]
    total = sum(entry["size"] for entry in files.values())
    with progress_bar(total, "verifying", unit="B", progress=progress if verify else False) as bar:
        return _open_checked(cls, directory, manifest, mmap, verify, backend, bar.update)


def _open_checked(
    cls: type[ClusteredIndex],
    directory: Path,
    manifest: dict[str, Any],
    mmap: bool,
    verify: bool,
    backend: Backend,
    on_bytes: Callable[[int], None],
) -> ClusteredIndex:
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
        name: _load_npy(_check_file(directory, name, files, verify, on_bytes), np.dtype(dt), shape)
        for name, (dt, shape) in expected.items()
    }
    _check_structure(directory, arrays, n, n_nodes, n_leaves)
    vec_path = _check_file(directory, VECTORS, files, verify, on_bytes)
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
        metadata = MetadataStore.load(_check_file(directory, METADATA, files, verify, on_bytes))
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
