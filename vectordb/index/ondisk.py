"""A build in bounded memory, straight into an index directory (``ClusteredIndex.build``
with ``path=``), for inputs larger than RAM.

Each step is a pass over the input, block by block (``sources.VectorSource``):

1. **sample**: rows drawn at random build the tree as a build in RAM does
   (``core.tree.build_tree`` and ``refine_leaves``), its leaves sized for the whole input;
2. **assign**: every row to its nearest leaf centroid (down the tree, keeping a few nodes
   a level, when the leaves are many), every leaf centroid then moved to the mean of its
   rows;
3. **write**: every row into a new vector file at its place in leaf order (a counting
   sort: a leaf's rows keep their input order), ids with them;
4. **code**: the vector file read back in order, leaf by leaf: rotation, codes, factors
   and the file's CRC32.

Then the index so made is calibrated and saved to ``path`` atomically, the vector file
moved into the new directory rather than copied. The work happens in ``.NAME.build-*``
beside ``path`` (removed on any error or interrupt, and by the next build to ``path``
when a killed process left one): nothing partial is ever at ``path``. Disk: the vectors
once (twice for an iterable input, which is first spilled to a file there).

Peak memory is about ``memory_limit`` (the sample, a block, the per-leaf sums) plus what
the index itself holds in RAM (tree, codes, factors, ids, metadata) and 4 bytes per row
of leaf labels.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from .._progress import log, progress_bar
from .._types import F32, I64
from ..core.codes import FACTORS, Quantizer, encode_residuals, origin_of
from ..core.kmeans import assign
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import (
    Tree,
    build_tree,
    label_sums,
    move_to_means,
    refine_leaves,
    with_leaf_means,
)
from ..errors import InvalidParameterError, InvalidVectorsError
from ..storage.dirswap import check_replaceable, lock_dir, unlock
from ..storage.format import MANIFEST
from ..storage.idmap import check_new_ids
from ..storage.metadata import MetadataStore, encode_documents
from ..storage.save import SaveJob
from ..storage.snapshot import IndexData
from ..storage.vectors import MmapStorage
from .build import MAX_DIM, REFINE_PASSES, resolve_ranking
from .sources import VectorSource

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "MIN_MEMORY_LIMIT",
    "BuildDir",
    "BuildInput",
    "build_into",
    "build_on_disk",
]

#: ``memory_limit`` when none is given, and the least accepted.
DEFAULT_MEMORY_LIMIT = 1 << 30
MIN_MEMORY_LIMIT = 64 << 20
#: Shares of ``memory_limit``: the sample the tree is built on (k-means takes a few
#: copies of it), and one block of input rows (read, prepared, sorted).
_SAMPLE_SHARE = 0.25
_BLOCK_SHARE = 0.1


class BuildDir:
    """``.NAME.build-<id>`` beside ``path``, locked (``flock``) while a build uses it."""

    def __init__(self, path: Path) -> None:
        self.parent = path.parent
        for stale in self.parent.glob(f".{path.name}.build-*"):  # left by a killed build
            try:
                unlock(lock_dir(stale, wait=False))
            except (BlockingIOError, OSError):
                continue  # another build's, running
            shutil.rmtree(stale, ignore_errors=True)
        self.path = self.parent / f".{path.name}.build-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        self._lock = lock_dir(self.path)

    def remove(self) -> None:
        unlock(self._lock)
        shutil.rmtree(self.path, ignore_errors=True)


class _Index(Protocol):
    def snapshot(self) -> IndexData: ...
    def close(self) -> None: ...


Index = TypeVar("Index", bound=_Index)


@dataclasses.dataclass(frozen=True)
class BuildInput:
    """What a build is given: the vectors, ``ids``, ``metadata`` and ``metric`` as
    ``ClusteredIndex.build`` takes them, and ``params`` from ``_validation.build_params``."""

    vectors: Any
    ids: Any
    metadata: Sequence[Mapping[str, Any] | None] | None
    metric: Metric
    params: dict[str, Any]


def build_into(
    make: Callable[[IndexData], Index],
    reopen: Callable[[Path], Index],
    given: BuildInput,
    path: Path,
    memory_limit: int | None,
    progress: bool | None,
) -> Index:
    """Build on disk (:func:`build_on_disk`), make the index of it (``make``, which
    calibrates), save it to ``path`` with the vector file moved in, and return
    ``reopen(path)``. Whatever stops it (an error, ``KeyboardInterrupt``) leaves nothing
    of it behind, and whatever was at ``path`` as it was."""
    limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidParameterError(f"memory_limit must be a number of bytes, got {limit!r}")
    path = Path(path)
    check_replaceable(path, MANIFEST, "a vectordb index directory")
    work = BuildDir(path)
    try:
        data, file, crc = build_on_disk(given, limit, work, progress)
        index = make(data)
        del data
        try:
            SaveJob(
                index.snapshot, path, progress, stoppable=False, vectors_file=(file, crc), log_seq=0
            ).run()
        finally:
            index.close()
            # Gone before the reopen reads the codes again: both sets at once would be
            # twice the index's RAM (2.6 GB at 10M x 768).
            del index
    finally:
        work.remove()
    return reopen(path)


def build_on_disk(
    given: BuildInput, memory_limit: int, work: BuildDir, progress: bool | None
) -> tuple[IndexData, Path, int]:
    """The index over ``given`` (see the module docstring) as :class:`IndexData` whose
    storage maps ``work/vectors.bin``; with that file's path and CRC32, for the save that
    moves it."""
    started = time.perf_counter()
    ids, metadata, metric = given.ids, given.metadata, given.metric
    if memory_limit < MIN_MEMORY_LIMIT:
        raise InvalidParameterError(
            f"memory_limit must be at least {MIN_MEMORY_LIMIT >> 20} MiB, got {memory_limit}"
        )
    source = VectorSource.of(
        given.vectors, metric, int(memory_limit * _BLOCK_SHARE), work.path / "spill.f32"
    )
    n, dim = source.n, source.dim
    if dim > MAX_DIM:
        raise InvalidVectorsError(f"dimension {dim} exceeds the maximum {MAX_DIM}")
    user_ids = np.arange(n, dtype=np.int64) if ids is None else check_new_ids(ids, n)
    if metadata is not None and len(metadata) != n:
        raise InvalidParameterError(f"metadata has {len(metadata)} entries for {n} vectors")
    params = dict(given.params)
    leaf_scan, code_bits = resolve_ranking(params, dim)
    if leaf_scan != "codes":
        raise InvalidParameterError("a build with path= ranks by codes: leaf_scan='codes'")
    seed = int(params["seed"])

    tree = _sample_tree(source, params, memory_limit, seed)
    labels, tree = _assign(source, tree, progress)
    counts = np.bincount(labels, minlength=tree.n_leaves).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    file = work.path / "vectors.bin"
    stored_ids, store = _write_sorted(source, labels, offsets, user_ids, metadata, file, progress)
    del labels
    quantizer = Quantizer.create(
        dim,
        rotate=params["rotate"],
        rng=np.random.default_rng([seed, 2**32 - 1]),
        code_bits=code_bits,
    )
    tree = dataclasses.replace(tree, centroids=quantizer.rotate(tree.centroids))
    base, crc = _code(file, n, dim, tree, offsets, quantizer, metric, source, progress)
    (work.path / "spill.f32").unlink(missing_ok=True)
    params.update(
        leaf_scan=leaf_scan,
        code_bits=code_bits,
        leaf_target=max(1, round(n / max(1, tree.n_leaves))),
    )
    log.info(
        "built an index of %d x %d vectors on disk (%s, %d leaves, code_bits=%d) in %.1f s",
        n,
        dim,
        metric.value,
        tree.n_leaves,
        code_bits,
        time.perf_counter() - started,
    )
    data = IndexData(
        tree=tree,
        base=base,
        quantizer=quantizer,
        ids=stored_ids,
        storage=MmapStorage(file, n, dim),
        rows=None,
        metric=metric,
        params=params,
        metadata=store,
    )
    return data, file, crc


def _sample_tree(source: VectorSource, params: dict[str, Any], limit: int, seed: int) -> Tree:
    """The tree of a random sample of the rows, leaves sized for all of them (unrotated)."""
    n, dim = source.n, source.dim
    m = min(n, max(1, int(limit * _SAMPLE_SHARE) // (4 * dim)))
    rows = np.sort(np.random.default_rng([seed, 5]).choice(n, m, replace=False)) if m < n else None
    sample = source.take(rows) if rows is not None else source.block(0, n)
    leaf = max(1, math.ceil(params["max_leaf_size"] * m / n))
    tree, order, offsets = build_tree(
        sample,
        branching_factor=params["branching_factor"],
        max_leaf_size=leaf,
        max_iterations=params["max_iterations"],
        seed=seed,
    )
    tree, _, _ = refine_leaves(sample, tree, order, offsets, REFINE_PASSES, seed)
    return tree


def _assign(
    source: VectorSource, tree: Tree, progress: bool | None
) -> tuple[npt.NDArray[np.int32], Tree]:
    """Every row's nearest leaf ``(n,)`` int32, and the tree with every leaf centroid at
    the mean of its rows (inner nodes at the mean of the rows below them)."""
    centres = np.ascontiguousarray(tree.centroids[tree.leaf_nodes])
    labels = np.empty(source.n, dtype=np.int32)
    sums = np.zeros((tree.n_leaves, source.dim), dtype=np.float64)
    counts = np.zeros(tree.n_leaves, dtype=np.int64)
    with progress_bar(source.n, "assigning", unit="vec", progress=progress) as bar:
        for start, x in source.blocks():
            got = _nearest_leaves(x, tree, centres)
            labels[start : start + x.shape[0]] = got
            block_sums, block_counts = label_sums(x, got, tree.n_leaves)
            sums += block_sums
            counts += block_counts
            bar.update(x.shape[0])
    move_to_means(centres, sums, counts)
    return labels, with_leaf_means(tree, centres, sums, counts)


#: Bytes of the scores of one chunk of rows against every leaf, while assigning.
_ASSIGN_BYTES = 32 << 20


def _nearest_leaves(x: F32, tree: Tree, centres: F32) -> I64:
    """The leaf of every row of ``x`` ``(m, d)``: ``(m,)`` int64. Up to ``_DESCEND_ABOVE``
    leaves, the nearest leaf centroid (squared l2), every leaf scored (BLAS) chunk by chunk;
    above, the tree's descent (:func:`_descend`), whose cost does not grow with the leaves.
    (The search's beam, ``route``, was 5x slower than the flat scores at 1M x 384 with 4,879
    leaves, for its exactness checks.)"""
    if centres.shape[0] > _DESCEND_ABOVE:
        return _descend(x, tree)
    out = np.empty(x.shape[0], dtype=np.int64)
    rows = max(64, _ASSIGN_BYTES // (4 * centres.shape[0]))
    for a in range(0, x.shape[0], rows):
        out[a : a + rows] = assign(x[a : a + rows], centres)
    return out


#: Nodes kept per level by the tree descent that assigns rows to leaves when the leaves are
#: too many to score them all (``_DESCEND_ABOVE``), and rows descended at once.
_BEAM = 4
_DESCEND_ABOVE = 2048
_DESCEND_ROWS = 256


def _descend(x: F32, tree: Tree) -> I64:
    """The leaf (number) each row of ``x`` ``(m, d)`` reaches down ``tree``, keeping the
    ``_BEAM`` nearest nodes (squared l2 to their centroids) at every level: ``(m,)`` int64.
    A leaf met above the deepest level stays a candidate as it is."""
    kids = tree.children_or_none
    is_leaf = np.append(tree.leaf_of_node >= 0, False)  # the extra row: "no node"
    sq = np.append(np.einsum("nd,nd->n", tree.centroids, tree.centroids), np.inf)
    none = tree.n_nodes
    out = np.empty(x.shape[0], dtype=np.int64)
    for a in range(0, x.shape[0], _DESCEND_ROWS):
        part = x[a : a + _DESCEND_ROWS]
        frontier = np.zeros((part.shape[0], 1), dtype=np.int64)
        while True:
            nodes = np.where(frontier < 0, none, frontier)
            stay = is_leaf[nodes] | (nodes == none)
            if stay.all():
                break
            # A leaf goes on as itself; an inner node as its children; "no node" as none.
            cand = np.where(stay[..., None], none, kids[nodes])
            cand[..., 0] = np.where(stay, nodes, cand[..., 0])
            cand = cand.reshape(part.shape[0], -1)
            cand[cand < 0] = none
            gathered = tree.centroids[np.minimum(cand, none - 1)]
            dist = sq[cand] - 2.0 * np.einsum("md,mcd->mc", part, gathered)
            width = min(_BEAM, cand.shape[1])
            best = np.argpartition(dist, width - 1, axis=1)[:, :width]
            picked = np.take_along_axis(cand, best, axis=1)
            frontier = np.where(np.isinf(np.take_along_axis(dist, best, axis=1)), -1, picked)
        nodes = np.where(frontier < 0, none, frontier)
        gathered = tree.centroids[np.minimum(nodes, none - 1)]
        dist = sq[nodes] - 2.0 * np.einsum("md,mcd->mc", part, gathered)
        out[a : a + part.shape[0]] = tree.leaf_of_node[
            nodes[np.arange(part.shape[0]), np.argmin(dist, axis=1)]
        ]
    return out


def _write_sorted(
    source: VectorSource,
    labels: Any,
    offsets: I64,
    user_ids: I64,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    file: Path,
    progress: bool | None,
) -> tuple[I64, MetadataStore]:
    """Write the rows to ``file`` in leaf order (float32, fsynced); the ids in that order
    ``(n,)`` int64, and the metadata store."""
    n, dim = source.n, source.dim
    row_bytes = 4 * dim
    cursor = offsets[:-1].copy()
    stored_ids = np.empty(n, dtype=np.int64)
    store = MetadataStore()
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, n * row_bytes)
        with progress_bar(n, "writing", unit="vec", progress=progress) as bar:
            for start, x in source.blocks():
                stop = start + x.shape[0]
                block_labels = np.asarray(labels[start:stop], dtype=np.int64)
                order = np.argsort(block_labels, kind="stable")
                sorted_labels = block_labels[order]
                leaves, first, sizes = np.unique(
                    sorted_labels, return_index=True, return_counts=True
                )
                rank = np.arange(order.shape[0]) - np.repeat(first, sizes)
                stored_ids[cursor[sorted_labels] + rank] = user_ids[start:stop][order]
                rows = x[order]
                for leaf, a, size in zip(leaves, first, sizes, strict=True):
                    _pwrite_all(fd, rows[a : a + size].tobytes(), int(cursor[leaf]) * row_bytes)
                cursor[leaves] += sizes
                if metadata is not None:
                    docs = encode_documents(metadata[start:stop], stop - start)
                    if docs is not None:
                        store.put(user_ids[start:stop], docs)
                bar.update(stop - start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return stored_ids, store


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``data`` at ``offset`` of ``fd``, all of it (a write may stop short)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _code(
    file: Path,
    n: int,
    dim: int,
    tree: Tree,
    offsets: I64,
    quantizer: Quantizer,
    metric: Metric,
    source: VectorSource,
    progress: bool | None,
) -> tuple[Part, int]:
    """Codes and factors of the rows of ``file`` leaf by leaf, and the file's CRC32."""
    codes = np.empty((quantizer.code_rows, n), dtype=np.uint64)
    factors = np.empty((FACTORS, n), dtype=np.float32)
    origin = origin_of(tree)
    crc = 0
    step = max(1, source.rows_per_block)
    with (
        open(file, "rb", buffering=0) as fh,
        progress_bar(n, "coding", unit="vec", progress=progress) as bar,
    ):
        leaf = 0
        while leaf < tree.n_leaves:
            last = leaf + 1  # whole leaves, up to a block's rows (a larger leaf alone)
            while last < tree.n_leaves and offsets[last + 1] - offsets[leaf] <= step:
                last += 1
            a, b = int(offsets[leaf]), int(offsets[last])
            raw = fh.read((b - a) * 4 * dim)
            crc = zlib.crc32(raw, crc)
            rows = np.frombuffer(raw, dtype="<f4").reshape(b - a, dim)
            rotated = quantizer.rotate(rows)
            for j in range(leaf, last):
                s, e = int(offsets[j]) - a, int(offsets[j + 1]) - a
                if s < e:
                    codes[:, a + s : a + e], factors[:, a + s : a + e] = encode_residuals(
                        quantizer,
                        rotated[s:e],
                        tree.centroids[tree.leaf_nodes[j]],
                        metric,
                        origin,
                    )
            bar.update(b - a)
            leaf = last
    return Part(offsets=offsets, rows=None, codes=codes, factors=factors), crc
