"""The index directory's format: file names, versions, the manifest, the arrays.

Layout of a saved index (format version 4; version 3 has 1-bit codes only, and an index of
1-bit codes is still saved as version 3; version 2 keeps ``norms.npy`` and, for ip,
``dots.npy`` in place of ``factors.npy``; version 1 also lacks the manifest checksum)::

    my_index/
      manifest.json     format, version, dim, metric, n, build parameters, the size and
                        CRC32 of every other file, and its own checksum (the CRC32 of its
                        canonical JSON without it; see :func:`sign_manifest`)
      centroids.npy     (n_nodes, bits) float32     tree node centroids, rotated
      children.npy      (n_nodes, branching) int64  child node ids, -1 padded
      leaf_of_node.npy  (n_nodes,) int64            leaf number, -1 for inner nodes
      leaf_offsets.npy  (n_leaves + 1,) int64       storage rows of each leaf
      codes.npy         (code_bits * words, n)      word-major residual codes,      } only with
                        uint64                      bit by bit (core.codes)         } leaf_scan
      factors.npy       (4, n) float32              the estimate's per-vector       } "codes"
                                                    factors (core.codes)            }
      ids.npy           (n,) int64                  id of every storage row
      perm.npy          (bits,) int64               rotation: permutation  } only when built
      blocks.npy        (bits/64, 64, 64) float32   rotation: blocks       } with rotate=True
      vectors.bin       raw little-endian float32, n * dim * 4 bytes, storage order

A checkpoint (``save()`` of an index onto its own directory) writes version 5, the index
as it lives, so that the next checkpoint rewrites only what changed (see
:mod:`vectordb.storage.save`): storage rows in the order they came (deleted ones kept),
``ids.npy`` over storage rows (``-1``: no live vector there), and besides the files
above, with ``rows`` storage rows, ``base_slots`` and ``delta_slots`` in the manifest::

      slot_rows.npy     (base_slots,) int64          storage row of every base slot
      delta_offsets.npy (n_leaves + 1,) int64        slots of each leaf in the delta part
      delta_rows.npy    (delta_slots,) int64         storage row of every delta slot
      delta_codes.npy   (code_bits * words, delta_slots) uint64   } with leaf_scan
      delta_factors.npy (4, delta_slots) float32                  } "codes"
      vectors.bin       the first rows - tail_rows rows
      vectors.tail.bin  the other tail_rows rows; the file may be longer (a later
                        checkpoint appends to it in place): its size and CRC32 in the
                        manifest are those of the rows it lists

All ``.npy`` files are read with ``allow_pickle=False`` after their header was checked
against the manifest, so a damaged file cannot trigger a huge allocation.

What a directory holds is decided here and only here: :func:`arrays_of` names the arrays a
save writes, :func:`expected_arrays` the dtypes and shapes a load accepts.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._validation import MAX_BRANCHING, MAX_CODE_BITS, MAX_ITERATIONS, check_text_field
from ..core.codes import BLOCK, FACTORS, Quantizer, words_for
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import Tree
from ..errors import InvalidIndexFileError, InvalidParameterError
from .snapshot import IndexData, LivingData

__all__ = [
    "BASE_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KNOWN_FILES",
    "LIVING_VERSION",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "METADATA",
    "NO_ZERO_RUNS",
    "READABLE_VERSIONS",
    "ROTATION_FILES",
    "TAIL",
    "TREE_FILES",
    "VECTORS",
    "arrays_of",
    "bad_file",
    "expected_arrays",
    "living_arrays_of",
    "living_manifest_of",
    "manifest_of",
    "parse_manifest",
    "sign_manifest",
]

FORMAT_NAME = "vectordb.ClusteredIndex"
#: Version 2 adds the manifest's own checksum, version 3 the RaBitQ factors, version 4 codes
#: of more than one bit a coordinate (``params.code_bits``); directories of versions 1 and 2
#: still open (their factors are computed from the vectors at open). An index of 1-bit codes
#: is still saved as version 3, which earlier releases open.
FORMAT_VERSION = 4
#: A checkpoint's layout (see the module docstring); older releases refuse it.
LIVING_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MANIFEST = "manifest.json"
VECTORS = "vectors.bin"
TAIL = "vectors.tail.bin"
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
        "factors.npy",
        "norms.npy",
        "dots.npy",
        "ids.npy",
        "perm.npy",
        "blocks.npy",
        "slot_rows.npy",
        "delta_offsets.npy",
        "delta_rows.npy",
        "delta_codes.npy",
        "delta_factors.npy",
        VECTORS,
        TAIL,
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
    "code_bits": (1, MAX_CODE_BITS),
}
#: Parameters every manifest has had since format version 1.
_REQUIRED_PARAMS = frozenset({"branching_factor"})


#: Arrays whose valid content never holds two equal zero elements (distinct ids; node 0 is
#: never a child; leaf numbers and a permutation each appear once), so a hole in one is
#: damage: a sparse file cannot declare millions of elements without holding them on disk.
NO_ZERO_RUNS = frozenset(
    {"ids.npy", "children.npy", "leaf_of_node.npy", "perm.npy", "slot_rows.npy", "delta_rows.npy"}
)
#: The files of the tree, of the rotation, and of the base part: a checkpoint links them
#: from the version it replaces when they did not change.
TREE_FILES = frozenset({"centroids.npy", "children.npy", "leaf_of_node.npy"})
ROTATION_FILES = frozenset({"perm.npy", "blocks.npy"})
BASE_FILES = frozenset({"codes.npy", "factors.npy", "slot_rows.npy"})
#: Counts a version 5 manifest adds (see the module docstring).
_LIVING_COUNTS = ("rows", "tail_rows", "base_slots", "delta_slots", "next_id")


def bad_file(path: Path, problem: str) -> InvalidIndexFileError:
    """The error for a damaged or foreign file at ``path``."""
    return InvalidIndexFileError(f"{path}: {problem}")


def parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """Validate the manifest's bytes (read from ``path``, at most ``MAX_MANIFEST_BYTES + 1``):
    JSON, format and version, checksum, counts, metric, parameters, file entries."""
    manifest = _json_object(raw, path)
    if manifest.get("format") != FORMAT_NAME:
        raise bad_file(path, f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise bad_file(
            path,
            f"format_version is {version!r}, expected one of {READABLE_VERSIONS} "
            "(saved by another version of vectordb?)",
        )
    _check_manifest_checksum(raw, manifest, version, path)
    for key in ("dim", "n", "n_nodes", "n_leaves"):
        value = manifest.get(key)
        least = 0 if key == "n" else 1  # an index whose every vector was deleted holds none
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise bad_file(path, f"{key!r} must be an integer >= {least}, found {value!r}")
    try:
        manifest["metric"] = Metric(manifest.get("metric"))
    except ValueError:
        raise bad_file(path, f"unknown metric {manifest.get('metric')!r}") from None
    if version == LIVING_VERSION:
        _check_living_counts(manifest, path)
    _check_params(manifest.get("params"), path)
    if version < FORMAT_VERSION and manifest["params"].get("code_bits", 1) != 1:
        bits = manifest["params"]["code_bits"]
        raise bad_file(path, f"params.code_bits is {bits}, but version {version} has 1-bit codes")
    _check_file_entries(manifest.get("files"), path)
    return manifest


def _check_living_counts(manifest: dict[str, Any], path: Path) -> None:
    """A version 5 manifest's counts: integers in range, consistent with each other."""
    for key in _LIVING_COUNTS:
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise bad_file(path, f"{key!r} must be an integer in [0, 2**63), found {value!r}")
    rows = manifest["rows"]
    if manifest["tail_rows"] > rows:
        raise bad_file(path, f"tail_rows is {manifest['tail_rows']}, more than rows={rows}")
    if manifest["base_slots"] + manifest["delta_slots"] > rows or manifest["n"] > rows:
        raise bad_file(path, f"more slots or vectors than rows={rows}")


def _json_object(raw: bytes, path: Path) -> dict[str, Any]:
    """``raw`` parsed as one JSON object of at most ``MAX_MANIFEST_BYTES``."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise bad_file(path, f"larger than {MAX_MANIFEST_BYTES} bytes; not a vectordb manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_file(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise bad_file(path, "nested too deeply; not a vectordb manifest") from None
    if not isinstance(manifest, dict):
        raise bad_file(path, f"expected a JSON object, found {type(manifest).__name__}")
    return manifest


def _check_params(params: Any, path: Path) -> None:
    """The manifest's build parameters: integers in range, ``rotate``, ``leaf_scan``."""
    if not isinstance(params, dict):
        raise bad_file(path, "'params' must be an object")
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
            raise bad_file(path, f"params.{key} must be an integer {limits}, found {value!r}")
    if not isinstance(params.get("rotate"), bool):
        raise bad_file(path, f"params.rotate must be true or false, found {params.get('rotate')!r}")
    if params.get("leaf_scan") not in ("codes", "vectors"):
        raise bad_file(
            path,
            f"params.leaf_scan must be 'codes' or 'vectors', found {params.get('leaf_scan')!r}",
        )
    target = params.get("target_recall")
    if target is not None and not _is_fraction(target, open_below=True):
        raise bad_file(path, f"params.target_recall must be a number in (0, 1], found {target!r}")
    try:
        check_text_field(params.get("text_field"))
    except InvalidParameterError as exc:
        raise bad_file(path, f"params.{exc}") from None
    _check_calibration(params.get("calibration"), path)


def _is_fraction(value: Any, *, open_below: bool = False) -> bool:
    """Whether ``value`` is a JSON number in ``[0, 1]`` (``(0, 1]`` with ``open_below``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (value > 0 if open_below else value >= 0) and value <= 1


#: Largest count a calibration may name (vectors, leaves, probes): far past any index, and
#: small enough that arithmetic on it stays exact in float64.
_MAX_COUNT = 1 << 48


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_COUNT


def _check_calibration(calibration: Any, path: Path) -> None:
    """``params.calibration`` (see ``index.calibrate``): absent, or ``k``, ``n`` and
    ``leaves`` (positive integers), and ``probes`` (rising positive integers) with a
    ``recall`` fraction each, at most 64 steps."""
    if calibration is None:
        return
    problem = "must be an object with k, probes, recall, n and leaves"
    if isinstance(calibration, dict) and set(calibration) == {
        "k",
        "probes",
        "recall",
        "n",
        "leaves",
    }:
        probes, recall = calibration["probes"], calibration["recall"]
        ints = isinstance(probes, list) and all(_is_positive_int(p) for p in probes)
        bad = [key for key in ("k", "n", "leaves") if not _is_positive_int(calibration[key])]
        if bad:
            problem = f"{bad[0]} must be an integer in [1, 2**48], found {calibration[bad[0]]!r}"
        elif not ints or not 1 <= len(probes) <= 64 or probes != sorted(set(probes)):
            problem = "probes must be 1 to 64 rising integers in [1, 2**48]"
        elif not isinstance(recall, list) or len(recall) != len(probes):
            problem = "recall must be a list as long as probes"
        elif not all(_is_fraction(r) for r in recall):
            problem = "recall must hold numbers in [0, 1]"
        else:
            return
    raise bad_file(path, f"params.calibration {problem}")


def _check_file_entries(files: Any, path: Path) -> None:
    """The manifest's ``files``: known names only, each with a size and a CRC32."""
    if not isinstance(files, dict):
        raise bad_file(path, "'files' must be an object")
    for name, entry in files.items():
        if name not in KNOWN_FILES:
            # Also keeps names such as "../x" or "/etc/passwd" from ever becoming paths.
            raise bad_file(path, f"lists an unknown file {name!r}")
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(f), int) and not isinstance(entry.get(f), bool) and entry[f] >= 0
            for f in ("size", "crc32")
        )
        if not ok:
            raise bad_file(
                path, f"files[{name!r}] must have non-negative integer 'size' and 'crc32'"
            )


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
            raise bad_file(path, "a version 1 manifest has no checksum: damaged")
        return
    if isinstance(checksum, bool) or not isinstance(checksum, int):
        raise bad_file(path, f"'checksum' must be an integer, found {checksum!r}")
    if sign_manifest(manifest) != raw:
        raise bad_file(path, "checksum mismatch: the manifest was changed or damaged")


def expected_arrays(manifest: dict[str, Any]) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Every ``.npy`` file the manifest implies: name -> (dtype, shape)."""
    dim, n = manifest["dim"], manifest["n"]
    n_nodes, n_leaves = manifest["n_nodes"], manifest["n_leaves"]
    params = manifest["params"]
    living = manifest["format_version"] == LIVING_VERSION
    slots = manifest["base_slots"] if living else n
    bits = words_for(dim) * 64 if params["rotate"] else dim
    expected: dict[str, tuple[type, tuple[int, ...]]] = {
        "leaf_offsets.npy": (np.int64, (n_leaves + 1,)),
        "children.npy": (np.int64, (n_nodes, params["branching_factor"])),
        "leaf_of_node.npy": (np.int64, (n_nodes,)),
        "centroids.npy": (np.float32, (n_nodes, bits)),
        "ids.npy": (np.int64, (manifest["rows"] if living else n,)),
    }
    words = params.get("code_bits", 1) * words_for(bits)
    codes = params["leaf_scan"] == "codes"
    if living:
        delta = manifest["delta_slots"]
        expected["slot_rows.npy"] = (np.int64, (slots,))
        expected["delta_offsets.npy"] = (np.int64, (n_leaves + 1,))
        expected["delta_rows.npy"] = (np.int64, (delta,))
        if codes:
            expected["delta_codes.npy"] = (np.uint64, (words, delta))
            expected["delta_factors.npy"] = (np.float32, (FACTORS, delta))
    if codes:
        expected["codes.npy"] = (np.uint64, (words, slots))
        if manifest["format_version"] >= 3:
            expected["factors.npy"] = (np.float32, (FACTORS, slots))
        else:
            expected["norms.npy"] = (np.float32, (n,))
            if manifest["metric"] is Metric.IP:
                expected["dots.npy"] = (np.float32, (n,))
    if params["rotate"]:
        expected["perm.npy"] = (np.int64, (bits,))
        expected["blocks.npy"] = (np.float32, (bits // BLOCK, BLOCK, BLOCK))
    return {name: (np.dtype(dt), shape) for name, (dt, shape) in expected.items()}


def _common_arrays(tree: Tree, base: Part, quantizer: Quantizer) -> dict[str, npt.NDArray[Any]]:
    """The tree's, the rotation's and the main layout's files, in both layouts."""
    arrays: dict[str, npt.NDArray[Any]] = {
        "centroids.npy": tree.centroids,
        "children.npy": tree.children,
        "leaf_of_node.npy": tree.leaf_of_node,
        "leaf_offsets.npy": base.offsets,
    }
    if base.codes is not None and base.factors is not None:
        arrays["codes.npy"] = base.codes
        arrays["factors.npy"] = base.factors
    if quantizer.perm is not None and quantizer.blocks is not None:
        arrays["perm.npy"] = quantizer.perm
        arrays["blocks.npy"] = quantizer.blocks
    return arrays


def arrays_of(data: IndexData) -> dict[str, npt.NDArray[Any]]:
    """The ``.npy`` files a save writes for ``data`` (compact: slot ``i`` is row ``i``):
    name -> array, as :func:`expected_arrays` expects them."""
    return {**_common_arrays(data.tree, data.base, data.quantizer), "ids.npy": data.ids}


def manifest_of(data: IndexData, files: dict[str, dict[str, int]]) -> bytes:
    """The signed manifest of ``data`` whose files have the sizes and CRC32s ``files``."""
    return sign_manifest(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if data.quantizer.code_bits > 1 else 3,
            "dim": data.dim,
            "metric": data.metric.value,
            "n": data.n,
            "n_nodes": data.tree.n_nodes,
            "n_leaves": data.tree.n_leaves,
            "params": dict(data.params),
            "files": files,
        }
    )


def living_arrays_of(data: LivingData) -> dict[str, npt.NDArray[Any]]:
    """The ``.npy`` files a checkpoint writes for ``data`` (format version 5): name ->
    array, as :func:`expected_arrays` expects them."""
    base, delta = data.base, data.delta
    arrays = _common_arrays(data.tree, base, data.quantizer)
    arrays["slot_rows.npy"] = base.all_rows
    arrays["delta_offsets.npy"] = delta.offsets
    arrays["delta_rows.npy"] = delta.all_rows
    arrays["ids.npy"] = data.row_id
    if delta.codes is not None and delta.factors is not None:
        arrays["delta_codes.npy"] = delta.codes
        arrays["delta_factors.npy"] = delta.factors
    return arrays


def living_manifest_of(data: LivingData, files: dict[str, dict[str, int]], tail_rows: int) -> bytes:
    """The signed version 5 manifest of ``data``, whose files have the sizes and CRC32s
    ``files`` and whose last ``tail_rows`` storage rows are in the tail file."""
    return sign_manifest(
        {
            "format": FORMAT_NAME,
            "format_version": LIVING_VERSION,
            "dim": data.dim,
            "metric": data.metric.value,
            "n": data.n,
            "rows": data.rows,
            "tail_rows": tail_rows,
            "base_slots": data.base.size,
            "delta_slots": data.delta.size,
            "next_id": data.next_id,
            "n_nodes": data.tree.n_nodes,
            "n_leaves": data.tree.n_leaves,
            "params": dict(data.params),
            "files": files,
        }
    )
