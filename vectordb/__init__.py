"""vectordb: an embedded vector search engine that keeps its RAM small.

>>> import numpy as np, vectordb as vdb
>>> x = vdb.make_clustered(2000, 64, seed=1)
>>> index = vdb.ClusteredIndex.build(x, max_leaf_size=200)
>>> ids, dists = index.search(x[7], k=3)
>>> int(ids[0])
7
"""

from __future__ import annotations

from .backends import available_backends
from .core.metrics import Metric
from .engine import AsyncEngine, EngineState, EngineStats
from .errors import (
    AlreadyUsingMmapError,
    BackendUnavailableError,
    DimensionMismatchError,
    DuplicateIdError,
    EngineClosedError,
    EngineOverloadedError,
    IndexClosedError,
    IndexLockedError,
    InvalidIndexFileError,
    InvalidParameterError,
    InvalidVectorsError,
    ReadOnlyIndexError,
    ShardUnavailableError,
    StorageError,
    UnknownIdError,
    VectorDBError,
)
from .index.clustered import ClusteredIndex
from .index.hit import Hit
from .synthetic import make_clustered

__version__ = "0.1.0"

__all__ = [
    "AlreadyUsingMmapError",
    "AsyncEngine",
    "BackendUnavailableError",
    "ClusteredIndex",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EngineClosedError",
    "EngineOverloadedError",
    "EngineState",
    "EngineStats",
    "Hit",
    "IndexClosedError",
    "IndexLockedError",
    "InvalidIndexFileError",
    "InvalidParameterError",
    "InvalidVectorsError",
    "Metric",
    "ReadOnlyIndexError",
    "ShardUnavailableError",
    "StorageError",
    "UnknownIdError",
    "VectorDBError",
    "__version__",
    "available_backends",
    "make_clustered",
]
