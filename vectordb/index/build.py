"""Building an index: checks, the tree, the rotation, the codes; what ``ClusteredIndex``
is made of. Kept out of ``index.py`` to keep that module small."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._progress import log, progress_bar
from .._validation import as_matrix, build_params
from ..backends import resolve_backend
from ..core.codes import Quantizer
from ..core.metrics import Metric, parse_metric, prepare
from ..core.tree import build_tree
from ..errors import InvalidVectorsError
from ..storage.metadata import MetadataStore
from ..storage.vectors import InMemoryStorage
from .state import build_part, code_table
from .writes import check_new_ids, encode_metadata

__all__ = ["AUTO_CODES_MIN_DIM", "MAX_DIM", "build_components"]

#: Hamming distances are accumulated in uint16.
MAX_DIM = 65535
#: ``leaf_scan="auto"`` ranks by 1-bit codes from this dimension up, else by full vectors.
AUTO_CODES_MIN_DIM = 128


def build_components(
    vectors: Any,
    *,
    ids: Any,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    branching_factor: int,
    max_leaf_size: int,
    metric: str | Metric,
    max_iterations: int,
    seed: int,
    rotate: bool,
    leaf_scan: str,
    backend: str,
    progress: bool | None,
) -> dict[str, Any]:
    """Keyword arguments of ``ClusteredIndex(...)`` for ``ClusteredIndex.build`` (see it)."""
    started = time.perf_counter()
    metric = parse_metric(metric)
    chosen = resolve_backend(backend)
    params = build_params(branching_factor, max_leaf_size, max_iterations, seed, rotate, leaf_scan)
    x = as_matrix(vectors, "vectors")
    if x.shape[1] > MAX_DIM:
        raise InvalidVectorsError(f"dimension {x.shape[1]} exceeds the maximum {MAX_DIM}")
    n = x.shape[0]
    user_ids = np.arange(n, dtype=np.int64) if ids is None else check_new_ids(ids, n)
    docs = encode_metadata(metadata, n)
    x = prepare(x, metric, copy=False)
    if leaf_scan == "auto":
        leaf_scan = "vectors" if x.shape[1] < AUTO_CODES_MIN_DIM else "codes"
    if leaf_scan == "vectors":
        rotate = False  # the rotation only serves the codes

    with progress_bar(n, "clustering", unit="vec", progress=progress) as bar:
        tree, order, leaf_offsets = build_tree(
            x,
            branching_factor=params["branching_factor"],
            max_leaf_size=params["max_leaf_size"],
            max_iterations=params["max_iterations"],
            seed=int(params["seed"]),
            on_leaf=bar.update,
        )
    stored = np.ascontiguousarray(x[order])
    quantizer = Quantizer.create(
        x.shape[1], rotate=rotate, rng=np.random.default_rng([int(params["seed"]), 2**32 - 1])
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
        leaf_target=max(1, round(n / (leaf_offsets.shape[0] - 1))),
    )
    log.info(
        "built an index of %d x %d vectors (%s, %d leaves, leaf_scan=%s) in %.1f s",
        n,
        x.shape[1],
        metric.value,
        tree.n_leaves,
        leaf_scan,
        time.perf_counter() - started,
    )
    return {
        "tree": tree,
        "table": code_table(tree, quantizer, metric) if codes else None,
        "base": base,
        "quantizer": quantizer,
        "ids": user_ids[order],
        "storage": InMemoryStorage(stored),
        "metric": metric,
        "params": params,
        "backend": chosen,
        "metadata": store,
    }
