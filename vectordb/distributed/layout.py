"""The directory of a sharded index: shard directories and the top manifest.

::

    my_sharded/
        shards.json        the manifest (this module): format, version, shards, placement,
                           dim, metric, rows per shard at build, the centroids' checksum
        centroids.npy      (placement="kmeans") (shards, dim) float32 shard centroids
        shard-0000/        an ordinary vectordb index directory (ClusteredIndex.open)
        shard-0001/
        ...

Every file here is written atomically (:func:`vectordb.storage.files.atomic_write`); the
manifest is written last, so a directory without one is no sharded index. Reading trusts
nothing: a manifest that is too large, not JSON, of another format or version, with a
field of the wrong type or range, or a centroid file of the wrong shape, dtype, checksum
or with non-finite values raises ``InvalidIndexFileError`` naming the file.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._types import F32
from ..core.metrics import Metric, parse_metric
from ..errors import InvalidIndexFileError, InvalidParameterError
from ..storage.files import atomic_write

__all__ = [
    "CENTROIDS",
    "FORMAT",
    "MANIFEST",
    "MAX_SHARDS",
    "PLACEMENTS",
    "VERSION",
    "ShardLayout",
    "read_layout",
    "shard_dir",
    "write_layout",
]

MANIFEST = "shards.json"
CENTROIDS = "centroids.npy"
FORMAT = "vectordb-sharded"
VERSION = 1
PLACEMENTS = ("hash", "kmeans")
#: Shard directories are named with four digits; more shards than this is a hostile file.
MAX_SHARDS = 4096
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_DIM = 65536


def shard_dir(root: Path, shard: int) -> Path:
    """The directory of shard ``shard`` (``shard-0007``) under ``root``."""
    return root / f"shard-{shard:04d}"


@dataclass(frozen=True)
class ShardLayout:
    """What the manifest says of a sharded index.

    ``counts``: rows each shard got at build (later writes change them; informative).
    ``centroids``: ``(shards, dim)`` float32 for ``placement="kmeans"``, else ``None``.
    """

    shards: int
    placement: str
    dim: int
    metric: Metric
    counts: tuple[int, ...]
    centroids: F32 | None = None

    def check(self) -> None:
        """``InvalidParameterError`` if the fields disagree with each other."""
        if not 1 <= self.shards <= MAX_SHARDS:
            raise InvalidParameterError(f"shards must be in [1, {MAX_SHARDS}], got {self.shards}")
        if self.placement not in PLACEMENTS:
            raise InvalidParameterError(f"placement must be one of {PLACEMENTS}")
        if len(self.counts) != self.shards:
            raise InvalidParameterError("one count per shard")
        if (self.placement == "kmeans") != (self.centroids is not None):
            raise InvalidParameterError("centroids go with placement='kmeans', and only with it")
        if self.centroids is not None and self.centroids.shape != (self.shards, self.dim):
            raise InvalidParameterError(
                f"centroids must be ({self.shards}, {self.dim}), got {self.centroids.shape}"
            )


def _npy_bytes(centroids: F32) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(centroids, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def write_layout(root: Path, layout: ShardLayout) -> None:
    """Write ``centroids.npy`` (kmeans) and then ``shards.json`` into ``root``, each
    atomically (temporary name, fsync, rename, fsync of the directory)."""
    layout.check()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "shards": layout.shards,
        "placement": layout.placement,
        "hash": "splitmix64" if layout.placement == "hash" else None,
        "dim": layout.dim,
        "metric": layout.metric.value,
        "counts": list(layout.counts),
        "centroids": None,
    }
    if layout.centroids is not None:
        data = _npy_bytes(layout.centroids)
        with atomic_write(root / CENTROIDS) as fh:
            fh.write(data)
        manifest["centroids"] = {"file": CENTROIDS, "crc32": zlib.crc32(data)}
    with atomic_write(root / MANIFEST) as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))


def _bad(path: Path, why: str) -> InvalidIndexFileError:
    return InvalidIndexFileError(f"{path}: {why}")


def _int_field(m: dict[str, Any], name: str, lo: int, hi: int, path: Path) -> int:
    value = m.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(path, f"{name!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise _bad(path.parent, "not a directory")
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "missing or not a regular file; this is not a sharded vectordb index")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise _bad(path, f"cannot be read: {exc}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise _bad(path, f"larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise _bad(path, "not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _bad(path, f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise _bad(path, f"unknown version {manifest.get('version')!r} (this reads {VERSION})")
    return manifest


def _read_centroids(root: Path, entry: Any, shards: int, dim: int) -> F32:
    manifest = root / MANIFEST
    if (
        not isinstance(entry, dict)
        or entry.get("file") != CENTROIDS
        or type(entry.get("crc32")) is not int
    ):
        raise _bad(manifest, f"'centroids' must name {CENTROIDS!r} with its crc32")
    path = root / CENTROIDS
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "missing or not a regular file")
    limit = 4096 + 4 * shards * dim
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise _bad(path, f"cannot be read: {exc}") from None
    if len(data) > limit:
        raise _bad(path, f"larger than a ({shards}, {dim}) float32 array")
    if zlib.crc32(data) != entry["crc32"]:
        raise _bad(path, f"CRC32 is {zlib.crc32(data):#010x}, expected {entry['crc32']:#010x}")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(path, f"not a .npy array: {exc}") from None
    if arr.dtype != np.dtype("<f4") or arr.shape != (shards, dim):
        raise _bad(path, f"expected ({shards}, {dim}) float32, got {arr.shape} {arr.dtype}")
    if not np.isfinite(arr).all():
        raise _bad(path, "non-finite centroids")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_layout(root: Path) -> ShardLayout:
    """The layout of the sharded index in ``root``, every field checked, every shard
    directory present (``InvalidIndexFileError`` otherwise; see the module docstring)."""
    root = Path(root)
    path = root / MANIFEST
    m = _read_manifest(path)
    shards = _int_field(m, "shards", 1, MAX_SHARDS, path)
    dim = _int_field(m, "dim", 1, _MAX_DIM, path)
    placement = m.get("placement")
    if placement not in PLACEMENTS:
        raise _bad(path, f"'placement' must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "hash" and m.get("hash") != "splitmix64":
        raise _bad(path, f"unknown hash {m.get('hash')!r} (this knows 'splitmix64')")
    try:
        metric = parse_metric(m.get("metric"))
    except InvalidParameterError:
        raise _bad(path, f"unknown metric {m.get('metric')!r}") from None
    counts = m.get("counts")
    if (
        not isinstance(counts, list)
        or len(counts) != shards
        or not all(type(c) is int and 0 <= c < 2**63 for c in counts)
    ):
        raise _bad(path, f"'counts' must be {shards} integers >= 0")
    centroids = None
    if placement == "kmeans":
        centroids = _read_centroids(root, m.get("centroids"), shards, dim)
    elif m.get("centroids") is not None:
        raise _bad(path, "'centroids' with placement='hash'")
    for s in range(shards):
        d = shard_dir(root, s)
        if d.is_symlink() or not d.is_dir():
            raise _bad(d, "missing: every shard listed in the manifest must be a directory")
    return ShardLayout(shards, str(placement), dim, metric, tuple(counts), centroids)
