"""Micro-batching: gather concurrent requests into batches, run them on an executor.

The shape follows vLLM's ``AsyncMicrobatchTokenizer``: wait for the first request, collect
more until ``max_batch_size`` rows or a ``max_wait`` window, run the batch on the executor,
scatter the results. Result setters skip futures that are already done (the caller was
cancelled or timed out), so one caller going away never disturbs the others.

Up to ``max_concurrent`` batches run at once (one per executor thread). A worker slot is
taken *before* a batch is collected, so under load queries pile up while the workers are
busy and the next batch is larger: batching adapts to the load with no tuning. Three more
adaptations: a query that arrives while no batch is running goes at once (nobody is around
to batch with, so waiting ``max_wait`` would only add latency), and so does a batch once
every call under way is in it or in a running job (16 callers looping on 2 workers got
1.17-1.19x where they had 1.07-1.14x of calling the index directly); and a queue long
enough for several batches is shared among the free workers instead of filling one batch.

A lone request on an idle batcher (nothing queued or running) may run on the event loop
itself, where the engine allows it (``may_run_here``): after one pass of the loop, so that
requests made at the same moment find it and are batched with it instead, it runs there if
none came. A thread hop costs more than a small search (about 0.1 ms each, measured on a
2-core VM), and the loop is blocked for no longer than the search takes; one that took more
than ``_HERE_BUDGET`` sends the next ``_HERE_COOLDOWN`` lone requests to the executor, and
the first lone request always goes there (its search may compile kernels, once).

No caller is left waiting: a caller cancelled while queued gives its room back at once
(callers waiting for room are woken), and if the dispatcher itself ever stops, every
queued caller gets ``EngineClosedError``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import functools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._types import F32, I64
from ..errors import EngineClosedError, EngineOverloadedError, VectorDBError
from .stats import StatsRecorder

__all__ = ["MicroBatcher"]

#: Smallest batch a long queue is split into for several free workers.
_MIN_SPLIT = 32
#: Dropped requests left in the queue before it is swept (bounds the queue's memory when
#: callers keep cancelling while every worker is busy).
_SWEEP_MIN = 64

#: Seconds a search run on the loop may take before lone requests go to the executor for a
#: while (``_HERE_COOLDOWN`` of them).
_HERE_BUDGET = 0.001
_HERE_COOLDOWN = 64

Result = tuple[I64, F32]
#: Runs one batch in an executor thread: ``(queries (n, d), key) -> (ids, dists)``, ``(n, k)``.
RunBatch = Callable[[F32, Any], Result]


class _Where(enum.Enum):
    QUEUED = "queued"  # in the queue, its rows counted in ``queued_rows``
    TAKEN = "taken"  # collected into a batch
    DROPPED = "dropped"  # its caller left while it was queued; skipped by the collector


@dataclass(eq=False)
class _Request:
    queries: F32
    key: Hashable
    future: asyncio.Future[Result]
    rows: int
    started: float = field(default_factory=time.perf_counter)
    where: _Where = _Where.QUEUED


def _interrupted(exc: BaseException) -> VectorDBError:
    """What a caller gets when its batch ended with a ``BaseException`` that is not an
    ``Exception`` (``KeyboardInterrupt``, ``SystemExit``, ...): a plain ``VectorDBError``
    caused by it, so that the interruption itself reaches the loop only once."""
    err = VectorDBError(f"the batch was interrupted by {type(exc).__name__}")
    err.__cause__ = exc
    return err


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
        may_run_here: Callable[[F32, Any], bool] | None = None,
    ) -> None:
        self._run = run
        self._may_run_here = may_run_here
        #: The lone request now looking for companions before it runs on the loop.
        self._lone: object | None = None
        #: Calls under way in :meth:`submit`, and those of them whose requests are in jobs
        #: running now: when every other call is in a job, nobody is left to wait for.
        self._callers = 0
        self._running_callers = 0
        # The first lone request goes to the executor: it may compile the search's kernels
        # (seconds, once), which must not happen on the loop.
        self._here_cooldown = 1
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait
        self._max_pending = max_pending
        self._overload = overload
        self._stats = stats
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._dropped_in_queue = 0
        self._arrived = asyncio.Event()
        self._room_waiters: list[asyncio.Future[None]] = []
        self._slots = asyncio.Semaphore(max_concurrent)
        self._free_slots = max_concurrent
        self._in_flight: set[asyncio.Task[None]] = set()
        self._collecting: list[_Request] = []  # taken from the queue, not yet in a job
        self._closing = False
        self._stopped: str | None = None
        self._loop = asyncio.get_running_loop()
        self._dispatcher = self._loop.create_task(self._dispatch_forever())
        self._dispatcher.add_done_callback(self._dispatcher_done)

    @property
    def queue_depth(self) -> int:
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def submit(self, queries: F32, key: Hashable, *, here: bool = True) -> Result:
        """Queue ``queries`` ``(n, d)`` for batching under ``key``; wait for their answer.
        ``here``: a lone request may run on the loop (see the module docstring).

        Raises ``EngineOverloadedError`` (``overload="raise"``) or waits (``"wait"``) while
        more than ``max_pending`` rows are queued; ``EngineClosedError`` once closing.
        A call that gets past those checks ends as exactly one of the statistics' answered
        queries, ``cancelled`` (``CancelledError``, which is how a timeout reaches it) or
        ``failed`` (any other exception).
        """
        rows = int(queries.shape[0])
        self._refuse_if_closing()
        if self._too_full(rows) and self._overload == "raise":
            raise EngineOverloadedError(
                f"{self._queued_rows} queries are queued (max_pending={self._max_pending}); "
                "retry later, or create the engine with overload='wait'"
            )
        request: _Request | None = None
        self._callers += 1
        try:
            if here and self._here_allowed(queries, key):
                started = time.perf_counter()
                result = await self._run_here(queries, key)
                if result is not None:
                    self._stats.record_answer(rows, time.perf_counter() - started)
                    return result
            while self._too_full(rows) and not self._closing:
                waiter = self._loop.create_future()
                self._room_waiters.append(waiter)
                await waiter
            self._refuse_if_closing("the engine closed while this call waited for room")
            request = _Request(queries, key, self._loop.create_future(), rows)
            self._queue.append(request)
            self._queued_rows += rows
            self._arrived.set()
            result = await request.future
        except asyncio.CancelledError:
            if request is not None:
                self._left_in_queue(request)
            self._stats.cancelled += rows
            raise
        except BaseException:
            self._stats.failed += rows
            raise
        finally:
            self._callers -= 1
        self._stats.record_answer(rows, time.perf_counter() - request.started)
        return result

    def _idle(self) -> bool:
        """Nothing queued, collected, running or about to run on the loop."""
        # A job that has answered is done before its done callback leaves _in_flight, and
        # its callers may run (and ask again) in between.
        return (
            self._lone is None
            and self._live_head() is None
            and not self._collecting
            and all(job.done() for job in self._in_flight)
        )

    def _here_allowed(self, queries: F32, key: Hashable) -> bool:
        if self._may_run_here is None or not self._idle():
            return False
        if not self._may_run_here(queries, key):
            return False
        if self._here_cooldown > 0:
            self._here_cooldown -= 1
            return False
        return True

    async def _run_here(self, queries: F32, key: Hashable) -> Result | None:
        """Run a lone request on the loop, unless others arrive during one pass of the
        loop (``None``: queue it with them)."""
        token = object()
        self._lone = token
        try:
            await asyncio.sleep(0)
        finally:
            self._lone = None
        if self._closing or not self._idle():
            return None
        self._stats.record_batch(int(queries.shape[0]))
        started = time.perf_counter()
        result = self._run(queries, key)
        if time.perf_counter() - started > _HERE_BUDGET:
            self._here_cooldown = _HERE_COOLDOWN
        return result

    def _refuse_if_closing(self, message: str = "the engine is closed") -> None:
        if self._stopped is not None:
            raise EngineClosedError(self._stopped)
        if self._closing:
            raise EngineClosedError(message)

    def _too_full(self, rows: int) -> bool:
        # A request larger than max_pending is let in when nothing else waits, else it never would.
        return self._queued_rows > 0 and self._queued_rows + rows > self._max_pending

    def _made_room(self) -> None:
        """Wake every caller waiting for room; each checks again whether it fits."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _give_back(self, request: _Request) -> bool:
        """Its caller left while it was queued: give its rows back now. False if it was
        already taken into a batch or given back."""
        if request.where is not _Where.QUEUED:
            return False
        request.where = _Where.DROPPED
        self._queued_rows -= request.rows
        self._made_room()
        return True

    def _left_in_queue(self, request: _Request) -> None:
        """A caller cancelled while queued: its request stays in the queue, skipped, until
        the collector reaches it or a sweep removes it."""
        if not self._give_back(request):
            return
        self._dropped_in_queue += 1
        if self._dropped_in_queue >= _SWEEP_MIN and 2 * self._dropped_in_queue > len(self._queue):
            live = [r for r in self._queue if r.where is _Where.QUEUED]
            self._queue.clear()
            self._queue.extend(live)
            self._dropped_in_queue = 0

    async def close(self) -> None:
        """Refuse new requests, finish every queued and running one, stop the dispatcher.

        Callers still waiting for room get ``EngineClosedError``."""
        self._closing = True
        self._made_room()
        self._arrived.set()
        await asyncio.wait([self._dispatcher])
        if self._in_flight:
            await asyncio.wait(self._in_flight)

    def abandon(self) -> None:
        """Stop the dispatcher without finishing anything; only while the loop is not
        running (it ended, or is between runs). Should the loop run again, queued callers
        get ``EngineClosedError``."""
        self._closing = True
        if not self._loop.is_closed():
            self._dispatcher.cancel()
            for task in self._in_flight:
                task.cancel()

    # ------------------------------------------------------------------ dispatcher
    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        """The dispatcher ended: normally (closed, queue empty), or cancelled (its loop
        ended) or broken, when nothing will collect the queue again: fail what is queued
        and refuse the rest, so that no caller waits forever."""
        self._closing = True
        if task.cancelled():
            self._stopped = "the engine's event loop ended (its dispatcher was cancelled)"
        elif task.exception() is not None:
            self._stopped = f"the engine's dispatcher failed: {task.exception()!r}"
        else:
            self._stopped = "the engine is closed"
        queued, self._dropped_in_queue = list(self._queue), 0
        self._queue.clear()
        for request in queued:
            if self._give_back(request) and not request.future.done():
                request.future.set_exception(EngineClosedError(self._stopped))
        _fail_left(self._collecting, EngineClosedError(self._stopped))
        self._collecting = []
        self._made_room()

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
            job = self._loop.create_task(self._run_batch(batch))
            self._collecting = []
            self._in_flight.add(job)
            self._running_callers += len(batch)
            job.add_done_callback(functools.partial(self._job_done, batch))

    def _job_done(self, batch: list[_Request], job: asyncio.Task[None]) -> None:
        self._in_flight.discard(job)
        self._running_callers -= len(batch)
        if not job.cancelled():
            job.exception()  # retrieved: its callers already have it (or it reached the loop)
        # A job cancelled before it started never ran its own handler.
        _fail_left(batch, EngineClosedError("the engine was closed while this query ran"))

    def _live_head(self) -> _Request | None:
        """The first queued request whose caller still waits (dropping dead ones ahead of
        it), or ``None``."""
        while self._queue:
            head = self._queue[0]
            if head.where is _Where.QUEUED and not head.future.done():
                return head
            self._queue.popleft()
            if head.where is _Where.DROPPED:
                self._dropped_in_queue -= 1
            else:  # cancelled, and its caller has not run its handler yet
                self._give_back(head)
        return None

    def _take_head(self) -> _Request:
        request = self._queue.popleft()
        request.where = _Where.TAKEN
        self._queued_rows -= request.rows
        self._made_room()
        return request

    async def _collect(self) -> list[_Request]:
        """Wait for a first live request, then gather more for up to ``max_wait`` seconds."""
        while self._live_head() is None:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        batch = self._collecting = []
        rows = 0
        # Nothing running: nobody to batch with, go now. Else wait up to max_wait.
        deadline = self._loop.time() + (self._max_wait if self._in_flight else 0.0)
        # Split a long queue among this worker and the other free ones, but never into
        # batches so small that their fixed cost dominates.
        share = -(-self._queued_rows // (self._free_slots + 1))
        limit = min(self._max_batch_size, max(share, _MIN_SPLIT))
        while rows < limit:
            head = self._live_head()
            if head is None:
                remaining = deadline - self._loop.time()
                if remaining <= 0 or self._closing or self._all_callers_in(batch):
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            if batch and rows + head.rows > limit:
                break
            batch.append(self._take_head())
            rows += head.rows
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            live = [r for r in batch if not r.future.done()]  # callers that left meanwhile
            if not live:
                return
            groups: dict[Hashable, list[_Request]] = {}
            for request in live:
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
            self._stats.record_batch(sum(r.rows for r in live))
            try:
                running = self._loop.run_in_executor(self._executor, _run_groups, self._run, jobs)
            except RuntimeError as exc:  # the executor was shut down (sync close)
                raise EngineClosedError("the engine is closed") from exc
            outcomes = await running
            interruption: BaseException | None = None
            for (key, _), outcome in zip(jobs, outcomes, strict=True):
                self._scatter(groups[key], outcome)
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    interruption = outcome
            if interruption is not None:
                raise interruption
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # abandoned by a sync close
                err: BaseException = EngineClosedError("the engine was closed")
            elif isinstance(exc, Exception):
                err = exc
            else:
                err = _interrupted(exc)
            _fail_left(batch, err)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._release_slot()

    def _all_callers_in(self, batch: list[_Request]) -> bool:
        """Every call under way is in ``batch`` or in a running job: no companion can come
        but from a new call (waiting ``max_wait`` for one would only add latency)."""
        return self._callers <= len(batch) + self._running_callers

    def _release_slot(self) -> None:
        self._free_slots += 1
        self._slots.release()

    def _scatter(self, group: list[_Request], outcome: Result | BaseException) -> None:
        start = 0
        for request in group:
            stop = start + request.rows
            if request.future.done():
                pass  # cancelled or timed out while running: the answer is dropped
            elif isinstance(outcome, Exception):
                request.future.set_exception(outcome)
            elif isinstance(outcome, BaseException):
                request.future.set_exception(_interrupted(outcome))
            else:
                ids, dists = outcome
                request.future.set_result((ids[start:stop], dists[start:stop]))
            start = stop


def _fail_left(requests: list[_Request], err: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(err)


def _run_groups(run: RunBatch, jobs: list[tuple[Hashable, F32]]) -> list[Result | BaseException]:
    """In an executor thread: run each group, keeping one group's failure to itself.

    A ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
    ``SystemExit``) stops the batch: that group and the ones not yet run get it."""
    outcomes: list[Result | BaseException] = []
    for key, queries in jobs:
        try:
            outcomes.append(run(queries, key))
        except Exception as exc:
            outcomes.append(exc)
        except BaseException as exc:
            outcomes += [exc] * (len(jobs) - len(outcomes))
            break
    return outcomes
