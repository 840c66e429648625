"""Beyond one machine: a sharded index served by Ray actors (or in process), behind the
same ``await search`` as :class:`~vectordb.AsyncEngine`.

>>> from vectordb.distributed import ShardedEngine, build_shards  # doctest: +SKIP
>>> build_shards(vectors, "my_sharded", shards=4, metric="cosine")  # doctest: +SKIP
>>> async with await ShardedEngine.open("my_sharded", replicas=2) as engine:  # doctest: +SKIP
...     ids, dists = await engine.search(query, k=10)

Ray (``pip install 'vectordb-embedded[ray]'``) is imported only when a Ray backend is opened;
``address="local-threads"`` needs none. See ``docs/distributed.md``.
"""

from __future__ import annotations

from ..errors import ShardUnavailableError
from .build import build_shards
from .engine import ShardedEngine
from .layout import ShardLayout, read_layout
from .merge import merge_topk
from .result import SearchResult

__all__ = [
    "SearchResult",
    "ShardLayout",
    "ShardUnavailableError",
    "ShardedEngine",
    "build_shards",
    "merge_topk",
    "read_layout",
]
