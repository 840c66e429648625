"""``build_shards``: build a sharded index directory, one shard at a time.

Memory: beyond the input (which may be a memory-mapped ``.npy``: rows are read where they
are needed), the build holds the ids ``(n,)`` int64, one shard number per row (2 or 4
bytes), and one shard's rows (float32) with that shard's build, never two shards at once.
The shards are built into a temporary directory beside ``path``, which is renamed to
``path`` once the manifest is written: a build that stops leaves nothing at ``path``.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64
from .._validation import as_matrix
from ..core.metrics import Metric, parse_metric, prepare
from ..errors import InvalidParameterError, InvalidVectorsError, StorageError
from ..index.clustered import ClusteredIndex
from ..storage.files import fsync_dir, storage_error
from ..storage.idmap import check_new_ids
from .layout import MAX_SHARDS, PLACEMENTS, ShardLayout, shard_dir, write_layout
from .placement import assign_shards, hash_shards, sample_size, train_centroids

__all__ = ["build_shards"]

#: Rows read from the input at once while assigning shards.
_CHUNK = 65536
#: Keyword arguments of ClusteredIndex.build that build_shards sets itself.
_OWN = {"vectors", "ids", "metadata", "metric", "progress", "path"}


def _build_options(options: Mapping[str, Any]) -> dict[str, Any]:
    known = set(inspect.signature(ClusteredIndex.build).parameters) - _OWN
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidParameterError(f"unknown build options: {unknown}; known: {sorted(known)}")
    return dict(options)


def _input(vectors: Any) -> np.ndarray:
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidVectorsError(
            f"vectors must be a non-empty 2-D array of shape (n, dim), got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidVectorsError(f"vectors must be real numbers, got dtype {arr.dtype}")
    return arr


def _chunk(vectors: np.ndarray, start: int, metric: Metric) -> F32:
    raw = as_matrix(np.asarray(vectors[start : start + _CHUNK]), "vectors")
    return prepare(raw, metric, copy=False)


def _placement(
    vectors: np.ndarray, ids: I64, shards: int, placement: str, metric: Metric, seed: int
) -> tuple[np.ndarray, F32 | None]:
    """One shard number per row, and the kmeans centroids (or ``None``)."""
    n = vectors.shape[0]
    labels = np.empty(n, dtype=np.uint16 if shards <= 65535 else np.int32)
    if placement == "hash":
        for start in range(0, n, _CHUNK):  # also checks every row (finite, right norms)
            _chunk(vectors, start, metric)
            labels[start : start + _CHUNK] = hash_shards(ids[start : start + _CHUNK], shards)
        return labels, None
    rng = np.random.default_rng([seed, 0x5348])
    m = min(n, sample_size(shards))
    rows = np.arange(n) if m == n else np.sort(rng.choice(n, m, replace=False))
    sample = prepare(as_matrix(np.asarray(vectors[rows]), "vectors"), metric, copy=False)
    centroids = train_centroids(sample, shards, seed=seed)
    del sample
    for start in range(0, n, _CHUNK):
        labels[start : start + _CHUNK] = assign_shards(_chunk(vectors, start, metric), centroids)
    return labels, centroids


def _one_shard(
    target: Path,
    vectors: np.ndarray,
    rows: I64,
    ids: I64,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    metric: Metric,
    options: dict[str, Any],
) -> None:
    if rows.size == 0:  # kmeans may leave a shard empty: an empty, growable index
        allowed = {k: v for k, v in options.items() if k != "memory_limit"}
        ClusteredIndex.create(target, dim=vectors.shape[1], metric=metric, **allowed).close()
        return
    x = as_matrix(np.asarray(vectors[rows]), "vectors")
    docs = None if metadata is None else [metadata[int(i)] for i in rows]
    ClusteredIndex.build(
        x, ids=ids[rows], metadata=docs, metric=metric, path=target, progress=False, **options
    ).close()


def build_shards(
    vectors: Any,
    path: str | os.PathLike[str],
    *,
    shards: int,
    ids: Any = None,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
    metric: str | Metric = "l2",
    placement: str = "hash",
    seed: int = 0,
    progress: bool | None = None,
    **build_options: Any,
) -> ShardLayout:
    """Build a sharded index of ``shards`` ordinary index directories under ``path``.

    Parameters
    ----------
    vectors : array_like of shape (n, d)
        Real numbers, finite; a memory-mapped ``.npy`` (``np.load(..., mmap_mode="r")``)
        is read shard by shard.
    path : directory to create (``StorageError`` with ``EEXIST`` if it exists)
    shards : int in [1, 4096]
    ids : n distinct integers >= 0, optional (default ``0..n-1``)
    metadata : n dicts (or None), optional
    metric : {"l2", "cosine", "ip"}
    placement : {"hash", "kmeans"}
        ``hash``: by a stable hash of the id, even shard sizes. ``kmeans``: by the nearest
        of ``shards`` k-means centroids, so that a search can be routed to a few shards.
    seed : int >= 0, for the kmeans placement (builds pass their own ``seed`` option)
    progress : bool, optional; a bar on a terminal (needs tqdm)
    build_options : those of ``ClusteredIndex.build`` (``max_leaf_size``, ``memory_limit``,
        ``code_bits``, ``backend``, ...), for every shard

    Returns
    -------
    The :class:`ShardLayout` written. ``InvalidParameterError`` for a bad ``shards``,
    ``placement`` or option, ``DuplicateIdError`` for repeated ids, ``InvalidVectorsError``
    for bad vectors; nothing is left at ``path`` then.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise InvalidParameterError(
            f"shards must be an integer in [1, {MAX_SHARDS}], got {shards!r}"
        )
    if placement not in PLACEMENTS:
        raise InvalidParameterError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidParameterError(f"seed must be an integer >= 0, got {seed!r}")
    options = _build_options(build_options)
    metric = parse_metric(metric)
    arr = _input(vectors)
    n, dim = int(arr.shape[0]), int(arr.shape[1])
    user_ids = np.arange(n, dtype=np.int64) if ids is None else check_new_ids(ids, n)
    if metadata is not None and len(metadata) != n:
        raise InvalidParameterError(f"metadata has {len(metadata)} entries for {n} vectors")
    root = Path(path)
    if root.exists() or root.is_symlink():
        raise StorageError(errno.EEXIST, "exists: build a sharded index into a new path", str(root))
    labels, centroids = _placement(arr, user_ids, shards, placement, metric, seed)
    work = root.parent / f".{root.name}.building-{os.getpid()}"
    try:
        work.mkdir(parents=True)
    except OSError as exc:
        raise storage_error(exc, work) from exc
    counts = []
    try:
        with progress_bar(n, "building shards", unit="vectors", progress=progress) as bar:
            for s in range(shards):
                rows = np.flatnonzero(labels == s).astype(np.int64)
                _one_shard(shard_dir(work, s), arr, rows, user_ids, metadata, metric, options)
                counts.append(int(rows.size))
                bar.update(int(rows.size))
        layout = ShardLayout(shards, placement, dim, metric, tuple(counts), centroids)
        write_layout(work, layout)
        try:
            os.rename(work, root)
            fsync_dir(root.parent)
        except OSError as exc:
            raise storage_error(exc, root) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
        raise
    return layout
