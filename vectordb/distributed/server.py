"""``ShardServer``: one replica of one shard, an ``AsyncEngine`` over its directory.

The same class runs in this process (the ``local-threads`` backend) and inside a Ray actor
(``backends.ray_actors`` wraps it with ``ray.remote``): every method is a coroutine taking
and returning plain arrays, so it works as an async actor as it is. Its constructor only
records the arguments; :meth:`start` opens the index (on the engine's executor).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._types import F32, I64
from ..engine.core import AsyncEngine
from ..errors import EngineClosedError

__all__ = ["ShardInfo", "ShardServer"]

#: What :meth:`ShardServer.start` and :meth:`ShardServer.info` return:
#: ``(live vectors, largest live id or -1, dim, metric name, process id)``.
ShardInfo = tuple[int, int, int, str, int]


class ShardServer:
    """Serve the index directory ``path``; ``writer=False`` opens it ``readonly=True``.

    ``backend``, ``mmap``, ``max_workers``: those of ``AsyncEngine.open``. The index
    directory admits one writer; readers see its durable writes after :meth:`refresh`.
    """

    def __init__(
        self,
        path: str,
        *,
        writer: bool,
        backend: str = "auto",
        mmap: bool = True,
        max_workers: int = 1,
    ) -> None:
        self._path = path
        self._writer = writer
        self._options: dict[str, Any] = {
            "backend": backend,
            "mmap": mmap,
            "max_workers": max_workers,
        }
        self._engine: AsyncEngine | None = None

    async def start(self) -> ShardInfo:
        """Open the index; idempotent. Returns :meth:`info`."""
        if self._engine is None:
            self._engine = await AsyncEngine.open(
                self._path, readonly=not self._writer, **self._options
            )
        return await self.info()

    def _open(self) -> AsyncEngine:
        if self._engine is None:
            raise EngineClosedError(f"the shard server of {self._path} is not started")
        return self._engine

    async def info(self) -> ShardInfo:
        """``(count, largest id or -1, dim, metric, pid)`` of the served index."""
        engine = self._open()
        index = engine.index
        ids = await engine.run(lambda: index.ids)
        top = int(ids[-1]) if ids.size else -1
        return (int(ids.size), top, index.dim, index.metric.value, os.getpid())

    async def search(
        self,
        queries: F32,
        rows: I64 | None,
        k: int,
        probes: int | None,
        rerank_factor: int | None,
        filt: Any,
        target_recall: float | None,
    ) -> tuple[I64, F32]:
        """``search_batch`` of ``queries[rows]`` (all of them when ``rows`` is ``None``):
        ``(m, k)`` int64 ids and float32 distances."""
        q = queries if rows is None else queries[rows]
        return await self._open().search_batch(
            q, k, probes, rerank_factor, filter=filt, target_recall=target_recall
        )

    async def add(
        self, vectors: F32, ids: I64, metadata: Sequence[Mapping[str, Any] | None] | None
    ) -> I64:
        return await self._open().add(vectors, ids, metadata)

    async def upsert(
        self, vectors: F32, ids: I64, metadata: Sequence[Mapping[str, Any] | None] | None
    ) -> I64:
        return await self._open().upsert(vectors, ids, metadata)

    async def delete(self, ids: I64) -> int:
        return await self._open().delete(ids, missing_ok=True)

    async def contains(self, ids: I64) -> np.ndarray:
        """``(n,)`` bool: whether each id is live here."""
        engine = self._open()
        return await engine.run(engine.index.contains, ids)

    async def get_vectors(self, ids: I64) -> F32:
        return await self._open().get_vectors(ids)

    async def get_metadata(self, id_: int) -> dict[str, Any] | None:
        return await self._open().get_metadata(id_)

    async def save(self, path: str | None) -> None:
        """A checkpoint (``None``) or a copy into the directory ``path``."""
        await self._open().save(path)

    async def refresh(self) -> int:
        """Catch up with the writer's durable writes (0 for the writer itself)."""
        return await self._open().refresh()

    async def ping(self) -> int:
        """The process id: cheap, and a liveness check."""
        return os.getpid()

    async def close(self) -> None:
        """Close the engine and its index; idempotent."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()
