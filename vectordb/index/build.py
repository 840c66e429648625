"""Building an index: checks, the tree, the rotation, the codes, as one ``IndexData``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._progress import log, progress_bar
from .._types import F32, I64
from .._validation import as_matrix
from ..core.codes import FACTORS, Quantizer, encode_residuals, origin_of
from ..core.metrics import Metric, prepare
from ..core.parts import Part
from ..core.tree import Tree, build_tree, refine_leaves
from ..errors import InvalidParameterError, InvalidVectorsError
from ..storage.idmap import check_new_ids
from ..storage.metadata import MetadataStore, encode_documents
from ..storage.snapshot import IndexData
from ..storage.vectors import InMemoryStorage

__all__ = [
    "AUTO_LOW_DIM_CODE_BITS",
    "AUTO_ONE_BIT_MIN_DIM",
    "MAX_DIM",
    "REFINE_PASSES",
    "build_data",
    "build_part",
    "empty_data",
    "resolve_ranking",
]

#: Hamming distances are accumulated in uint16.
MAX_DIM = 65535
#: ``code_bits="auto"``: 1 bit a coordinate from this dimension up, else
#: ``AUTO_LOW_DIM_CODE_BITS``. Measured at the calibrated defaults, one thread: below 128 d
#: 4-bit codes reached the recall@10 of exact leaf scans on the full vectors (0.976-0.997)
#: 1.35-5.4x faster in batches and 3.2-4.5x one by one (glove-50, synthetic 16, 32, 96 d),
#: where 1-bit codes lost recall; at 384 d 2-bit codes halved the reranked candidates but
#: searched 1.6x slower than 1-bit (pydocs-minilm). Below 128 d, 2 bits searched up to 1.3x
#: faster than 4 with the vectors warm (glove-50 at 300k) but reranked twice the rows (94.5
#: against 45.8 a query), each a read of the vector file in mmap mode: 4 reads the least.
AUTO_ONE_BIT_MIN_DIM = 128
AUTO_LOW_DIM_CODE_BITS = 4
#: Lloyd passes over all leaves after the tree is split (``core.tree.refine_leaves``).
REFINE_PASSES = 8


def resolve_ranking(params: Mapping[str, Any], dim: int) -> tuple[str, int]:
    """``leaf_scan`` and ``code_bits`` of ``params`` with ``"auto"`` decided for
    ``dim``-d vectors: codes, of ``AUTO_LOW_DIM_CODE_BITS`` below ``AUTO_ONE_BIT_MIN_DIM``
    dimensions and 1 bit from there up."""
    leaf_scan = "codes" if params["leaf_scan"] == "auto" else str(params["leaf_scan"])
    code_bits = params["code_bits"]
    if code_bits == "auto":
        code_bits = AUTO_LOW_DIM_CODE_BITS if dim < AUTO_ONE_BIT_MIN_DIM else 1
    return leaf_scan, int(code_bits)


def build_part(
    x: F32,
    tree: Tree,
    leaf_offsets: I64,
    quantizer: Quantizer,
    metric: Metric,
    codes: bool,
    on_rows: Callable[[int], None] | None = None,
) -> Part:
    """The base part of storage-ordered ``x`` ``(n, d)``: codes and their factors, leaf by
    leaf. ``tree.centroids`` must already be rotated ``(n_nodes, bits)``.
    ``on_rows(n)`` is called as every leaf's ``n`` rows are coded (progress)."""
    n = x.shape[0]
    if not codes:
        return Part(offsets=leaf_offsets, rows=None)
    words = np.empty((quantizer.code_rows, n), dtype=np.uint64)
    factors = np.empty((FACTORS, n), dtype=np.float32)
    for leaf, node in enumerate(tree.leaf_nodes):
        a, b = int(leaf_offsets[leaf]), int(leaf_offsets[leaf + 1])
        rotated = quantizer.rotate(x[a:b])
        words[:, a:b], factors[:, a:b] = encode_residuals(
            quantizer, rotated, tree.centroids[node], metric, origin_of(tree)
        )
        if on_rows is not None:
            on_rows(b - a)
    return Part(offsets=leaf_offsets, rows=None, codes=words, factors=factors)


def build_data(
    vectors: Any,
    ids: Any,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    metric: Metric,
    params: dict[str, Any],
    progress: bool | None,
) -> IndexData:
    """The index ``ClusteredIndex.build`` makes (see it for the arguments); ``params``
    from ``_validation.build_params``."""
    started = time.perf_counter()
    params = dict(params)
    rotate, leaf_scan = params["rotate"], params["leaf_scan"]
    x = as_matrix(vectors, "vectors")
    if x.shape[1] > MAX_DIM:
        raise InvalidVectorsError(f"dimension {x.shape[1]} exceeds the maximum {MAX_DIM}")
    n = x.shape[0]
    user_ids = np.arange(n, dtype=np.int64) if ids is None else check_new_ids(ids, n)
    docs = encode_documents(metadata, n)
    x = prepare(x, metric, copy=False)
    leaf_scan, code_bits = resolve_ranking(params, x.shape[1])
    if leaf_scan == "vectors":
        rotate, code_bits = False, 1  # the rotation only serves the codes

    with progress_bar(n, "clustering", unit="vec", progress=progress) as bar:
        tree, order, leaf_offsets = build_tree(
            x,
            branching_factor=params["branching_factor"],
            max_leaf_size=params["max_leaf_size"],
            max_iterations=params["max_iterations"],
            seed=int(params["seed"]),
            on_leaf=bar.update,
        )
    tree, order, leaf_offsets = refine_leaves(
        x, tree, order, leaf_offsets, REFINE_PASSES, int(params["seed"])
    )
    stored = np.ascontiguousarray(x[order])
    quantizer = Quantizer.create(
        x.shape[1],
        rotate=rotate,
        rng=np.random.default_rng([int(params["seed"]), 2**32 - 1]),
        code_bits=code_bits,
    )
    tree = dataclasses.replace(tree, centroids=quantizer.rotate(tree.centroids))
    codes = leaf_scan == "codes"
    with progress_bar(n if codes else 0, "coding", unit="vec", progress=progress) as bar:
        base = build_part(stored, tree, leaf_offsets, quantizer, metric, codes, bar.update)
    store = MetadataStore()
    if docs is not None:
        store.put(user_ids, docs)
    params.update(
        rotate=rotate,
        leaf_scan=leaf_scan,
        code_bits=code_bits,
        leaf_target=max(1, round(n / (leaf_offsets.shape[0] - 1))),
    )
    log.info(
        "built an index of %d x %d vectors (%s, %d leaves, leaf_scan=%s, code_bits=%d) in %.1f s",
        n,
        x.shape[1],
        metric.value,
        tree.n_leaves,
        leaf_scan,
        code_bits,
        time.perf_counter() - started,
    )
    return IndexData(
        tree=tree,
        base=base,
        quantizer=quantizer,
        ids=user_ids[order],
        storage=InMemoryStorage(stored),
        rows=None,
        metric=metric,
        params=params,
        metadata=store,
    )


def empty_data(dim: int, metric: Metric, params: dict[str, Any]) -> IndexData:
    """An index of no vectors, for ``dim``-d ones (``ClusteredIndex.create``): a tree of
    one leaf (centred on zero), the rotation and code width a build would pick, empty
    codes, ids and storage. Adds route to that leaf, and split it (and later ones) as they
    pass twice a build's typical leaf size (``index.split.splitter_for``): the tree grows
    with the data."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidParameterError(f"dim must be an int in [1, {MAX_DIM}], got {dim!r}")
    params = dict(params)
    rotate = params["rotate"]
    leaf_scan, code_bits = resolve_ranking(params, dim)
    if leaf_scan == "vectors":
        rotate, code_bits = False, 1
    tree, _, _ = build_tree(  # one row: one leaf, in the layout of every other tree
        np.zeros((1, dim), dtype=np.float32),
        branching_factor=params["branching_factor"],
        max_leaf_size=params["max_leaf_size"],
        max_iterations=params["max_iterations"],
        seed=int(params["seed"]),
    )
    quantizer = Quantizer.create(
        dim,
        rotate=rotate,
        rng=np.random.default_rng([int(params["seed"]), 2**32 - 1]),
        code_bits=code_bits,
    )
    tree = dataclasses.replace(tree, centroids=quantizer.rotate(tree.centroids))
    stored = np.empty((0, dim), dtype=np.float32)
    offsets = np.zeros(2, dtype=np.int64)
    base = build_part(stored, tree, offsets, quantizer, metric, leaf_scan == "codes")
    # A build's leaves hold about a third of max_leaf_size: the splits aim at that.
    params.update(rotate=rotate, leaf_scan=leaf_scan, code_bits=code_bits, leaf_target=1)
    return IndexData(
        tree=tree,
        base=base,
        quantizer=quantizer,
        ids=np.empty(0, dtype=np.int64),
        storage=InMemoryStorage(stored),
        rows=None,
        metric=metric,
        params=params,
        metadata=MetadataStore(),
    )
