"""``Gatherer``: concurrent searches gathered on the caller's side into one fan-out.

Searches with the same key (``k``, ``probes``, ``rerank_factor``, filter, target recall,
route) that arrive within ``max_wait`` seconds of the first (or in the same pass of the
event loop with ``max_wait=0``), up to ``max_batch_size`` queries, become one batch: one
array shipped once (one ``ray.put``) and one call per shard. A caller that is cancelled
leaves its batch; a batch whose callers have all left is cancelled, and with it the
remote calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import numpy as np

from .._types import F32

__all__ = ["Gatherer"]

R = TypeVar("R")


class _Batch:
    __slots__ = ("futures", "launched", "queries", "rows", "task")

    def __init__(self) -> None:
        self.queries: list[F32] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.rows = 0
        self.launched = False
        self.task: asyncio.Task[None] | None = None


class Gatherer(Generic[R]):
    """Gather ``submit(queries, key)`` calls into ``run(all_queries, key)`` calls.

    ``run`` returns one result for the batch; ``split(result, start, stop)`` cuts out the
    rows of one caller.
    """

    def __init__(
        self,
        run: Callable[[F32, Hashable], Awaitable[R]],
        split: Callable[[R, int, int], Any],
        *,
        max_batch_size: int,
        max_wait: float,
    ) -> None:
        self._run, self._split = run, split
        self._max_batch_size, self._max_wait = max_batch_size, max_wait
        self._open: dict[Hashable, _Batch] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, queries: F32, key: Hashable) -> Any:
        """The rows of the batch result that answer ``queries`` ``(m, d)``."""
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None or batch.rows + queries.shape[0] > self._max_batch_size:
            if batch is not None:
                self._launch(key, batch)
            batch = self._open[key] = _Batch()
            if self._max_wait > 0:
                loop.call_later(self._max_wait, self._launch, key, batch)
            else:
                loop.call_soon(self._launch, key, batch)
        start = batch.rows
        future: asyncio.Future[Any] = loop.create_future()
        batch.queries.append(queries)
        batch.futures.append(future)
        batch.rows += queries.shape[0]
        try:
            result = await future
        except asyncio.CancelledError:
            task = batch.task
            if task is not None and all(f.cancelled() for f in batch.futures):
                task.cancel()  # nobody waits for this batch any more: stop its calls
            raise
        return self._split(result, start, start + queries.shape[0])

    def _launch(self, key: Hashable, batch: _Batch) -> None:
        if batch.launched:
            return
        batch.launched = True
        if self._open.get(key) is batch:
            del self._open[key]
        if all(f.cancelled() for f in batch.futures):
            return  # every caller left before it started
        batch.task = asyncio.get_running_loop().create_task(self._go(key, batch))
        self._running.add(batch.task)
        batch.task.add_done_callback(self._running.discard)

    async def _go(self, key: Hashable, batch: _Batch) -> None:
        queries = batch.queries[0] if len(batch.queries) == 1 else np.concatenate(batch.queries)
        try:
            result = await self._run(queries, key)
        except asyncio.CancelledError:
            for f in batch.futures:
                f.cancel()
            raise
        except BaseException as exc:
            for f in batch.futures:
                if not f.done():
                    f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for f in batch.futures:
            if not f.done():
                f.set_result(result)

    async def drain(self) -> None:
        """Launch every open batch and wait for every running one."""
        for key, batch in list(self._open.items()):
            self._launch(key, batch)
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
