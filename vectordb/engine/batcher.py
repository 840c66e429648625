"""Micro-batching: gather concurrent requests into batches, run them on an executor.

The shape follows vLLM's ``AsyncMicrobatchTokenizer``: wait for the first request, collect
more until ``max_batch_size`` rows or a ``max_wait`` window, run the batch on the executor,
scatter the results. Result setters skip futures that are already done (the caller was
cancelled or timed out), so one caller going away never disturbs the others.

Up to ``max_concurrent`` batches run at once (one per executor thread). A worker slot is
taken *before* a batch is collected, so under load queries pile up while the workers are
busy and the next batch is larger: batching adapts to the load with no tuning. Two more
adaptations: a query that arrives while no batch is running goes at once (nobody is around
to batch with, so waiting ``max_wait`` would only add latency), and a queue long enough for
several batches is shared among the free workers instead of filling one batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import EngineClosedError, EngineOverloadedError
from .stats import StatsRecorder

__all__ = ["MicroBatcher"]

#: Smallest batch a long queue is split into for several free workers.
_MIN_SPLIT = 32

F32 = npt.NDArray[np.float32]
Result = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]
#: Runs one batch in an executor thread: ``(queries (n, d), key) -> (ids, dists)``, ``(n, k)``.
RunBatch = Callable[[F32, Any], Result]


@dataclass(eq=False)
class _Request:
    queries: F32
    key: Hashable
    future: asyncio.Future[Result]
    started: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.queries.shape[0])


class MicroBatcher:
    """Batches requests for one event loop. Create it inside the loop that will use it."""

    def __init__(
        self,
        run: RunBatch,
        executor: concurrent.futures.Executor,
        *,
        max_batch_size: int,
        max_wait: float,
        max_pending: int,
        overload: str,
        max_concurrent: int,
        stats: StatsRecorder,
    ) -> None:
        self._run = run
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait
        self._max_pending = max_pending
        self._overload = overload
        self._stats = stats
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._space = asyncio.Condition()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._free_slots = max_concurrent
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._dispatcher = self._loop.create_task(self._dispatch_forever())

    @property
    def queue_depth(self) -> int:
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def submit(self, queries: F32, key: Hashable) -> Result:
        """Queue ``queries`` ``(n, d)`` for batching under ``key``; wait for their answer.

        Raises ``EngineOverloadedError`` (``overload="raise"``) or waits (``"wait"``) while
        more than ``max_pending`` rows are queued; ``EngineClosedError`` once closing.
        """
        rows = int(queries.shape[0])
        if self._closing:
            raise EngineClosedError("the engine is closed")
        if self._too_full(rows):
            if self._overload == "raise":
                raise EngineOverloadedError(
                    f"{self._queued_rows} queries are queued (max_pending={self._max_pending}); "
                    "retry later, or create the engine with overload='wait'"
                )
            async with self._space:
                await self._space.wait_for(lambda: self._closing or not self._too_full(rows))
            if self._closing:
                raise EngineClosedError("the engine closed while this call waited for room")
        request = _Request(queries, key, self._loop.create_future())
        self._queue.append(request)
        self._queued_rows += rows
        self._arrived.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The future was cancelled with its caller: not started means dropped from its
            # batch (skipped at collection); started means its result is discarded.
            self._stats.cancelled += rows
            raise

    def _too_full(self, rows: int) -> bool:
        # A request larger than max_pending is let in when nothing else waits, else it never would.
        return self._queued_rows > 0 and self._queued_rows + rows > self._max_pending

    async def close(self) -> None:
        """Refuse new requests, finish every queued and running one, stop the dispatcher."""
        self._closing = True
        async with self._space:
            self._space.notify_all()
        self._arrived.set()
        await self._dispatcher
        if self._in_flight:
            await asyncio.wait(self._in_flight)

    def abandon(self) -> None:
        """Stop the dispatcher without finishing anything; only while the loop is not
        running (it ended, or is between runs), when no caller can be waiting."""
        self._closing = True
        if not self._loop.is_closed():
            self._dispatcher.cancel()
            for task in self._in_flight:
                task.cancel()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    # ------------------------------------------------------------------ dispatcher
    async def _dispatch_forever(self) -> None:
        while True:
            await self._slots.acquire()
            self._free_slots -= 1
            batch = await self._collect()
            if not batch:
                self._release_slot()
                if self._closing and not self._queue:
                    return
                continue
            self._queued_rows -= sum(r.rows for r in batch)
            async with self._space:
                self._space.notify_all()
            job = self._loop.create_task(self._run_batch(batch))
            self._in_flight.add(job)
            job.add_done_callback(self._in_flight.discard)

    async def _collect(self) -> list[_Request]:
        """Wait for a first live request, then gather more for up to ``max_wait`` seconds."""
        while not self._queue:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Request] = []
        rows = 0
        # Nothing running: nobody to batch with, go now. Else wait up to max_wait.
        deadline = self._loop.time() + (self._max_wait if self._in_flight else 0.0)
        # Split a long queue among this worker and the other free ones, but never into
        # batches so small that their fixed cost dominates.
        share = -(-self._queued_rows // (self._free_slots + 1))
        limit = min(self._max_batch_size, max(share, _MIN_SPLIT))
        while rows < limit:
            if not self._queue:
                remaining = deadline - self._loop.time()
                if remaining <= 0 or self._closing:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            request = self._queue[0]
            if request.future.done():  # caller cancelled before its batch started
                self._queue.popleft()
                self._queued_rows -= request.rows
                continue
            if batch and rows + request.rows > limit:
                break
            self._queue.popleft()
            batch.append(request)
            rows += request.rows
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            groups: dict[Hashable, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.key, []).append(request)
            jobs = [
                (
                    key,
                    np.concatenate([r.queries for r in group])
                    if len(group) > 1
                    else group[0].queries,
                )
                for key, group in groups.items()
            ]
            self._stats.record_batch(sum(r.rows for r in batch))
            outcomes = await self._loop.run_in_executor(
                self._executor, _run_groups, self._run, jobs
            )
            for (key, _), outcome in zip(jobs, outcomes, strict=True):
                self._scatter(groups[key], outcome)
        except BaseException as exc:  # the executor itself failed (shut down, ...)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        self._free_slots += 1
        self._slots.release()

    def _scatter(self, group: list[_Request], outcome: Result | BaseException) -> None:
        now = time.perf_counter()
        start = 0
        for request in group:
            stop = start + request.rows
            if request.future.done():
                pass  # cancelled or timed out while running: the answer is dropped
            elif isinstance(outcome, BaseException):
                self._stats.failed += request.rows
                request.future.set_exception(outcome)
            else:
                ids, dists = outcome
                request.future.set_result((ids[start:stop], dists[start:stop]))
                self._stats.record_answer(request.rows, now - request.started)
            start = stop


def _run_groups(run: RunBatch, jobs: list[tuple[Hashable, F32]]) -> list[Result | BaseException]:
    """In an executor thread: run each group, keeping one group's failure to itself."""
    outcomes: list[Result | BaseException] = []
    for key, queries in jobs:
        try:
            outcomes.append(run(queries, key))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
