"""``AsyncEngine``: the index behind an asyncio face, on an executor of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .._types import F32, I64
from .._validation import as_query_matrix, positive_int
from ..errors import EngineClosedError, InvalidParameterError
from ..index.clustered import ClusteredIndex
from ..storage.filters import Filter
from .batcher import MicroBatcher
from .keys import BatchKey
from .lifecycle import EngineState, Lifecycle, close_unclaimed
from .queries import Queries
from .stats import EngineStats, StatsRecorder
from .waiting import check_timeout, finish, within
from .warming import warm_steps
from .writes import AddGroups, start_write

__all__ = ["AsyncEngine", "EngineState"]

T = TypeVar("T")

_WARM_CHUNK = 16 << 20


class AsyncEngine(Queries):
    """Serve a :class:`ClusteredIndex` to many coroutines at once.

    Concurrent :meth:`search` calls are gathered into batches (up to ``max_batch_size``
    queries, waiting at most ``max_wait`` seconds for companions) and run as one
    ``search_batch`` on the engine's own thread pool, so NumPy work and page faults on the
    memory-mapped vectors never block the event loop (a lone query on an index in RAM runs
    on the loop, see ``inline``). The engine belongs to the event loop
    it is first used in; a call from another loop raises ``InvalidParameterError``.

    Parameters
    ----------
    index : ClusteredIndex
        The index to serve.
    max_workers : int
        Threads of the engine's executor, and batches run at once.
    max_batch_size : int
        Most queries in one batch.
    max_wait : float
        Seconds a batch waits for companions after its first query (a lone query is
        delayed by at most this), in [0, 1].
    max_pending : int
        Most queries queued for batching; beyond it :meth:`search` waits or raises, as
        ``overload`` says.
    overload : {"wait", "raise"}
        With ``max_pending`` queries queued, a new :meth:`search` waits for room
        (``"wait"``) or raises ``EngineOverloadedError`` (``"raise"``).
    inline : bool or None
        Where a lone query runs: one made while the engine is idle, with one query, no
        filter and no ``timeout``. ``None`` (default): on the event loop itself when the
        index is in RAM on a CPU backend (it skips the hop to a thread and back, as costly
        as the search), else on the executor; ``True``: on the loop whatever the storage;
        ``False``: always on the executor. The first lone query, and the 64 after one that
        took over 1 ms, go to the executor (docs/async.md).
    owns_index : bool
        Close the index (unmap its file) when the engine closes; set by :meth:`open`.

    Notes
    -----
    Use ``async with`` or call :meth:`aclose`; an engine garbage-collected while open emits a
    ``ResourceWarning``. From synchronous code, once the engine's loop has ended,
    :meth:`close` releases it.

    Cancelling or timing out any call never leaves another caller waiting, and every
    error the engine raises itself is a ``VectorDBError`` (besides ``CancelledError`` and
    ``asyncio.TimeoutError``). A search whose batch has not started is dropped from it; a
    write (``add``, ``upsert``, ``delete``, ``compact``) whose caller is cancelled after
    it began still completes, and the next write starts only after it. A call racing
    :meth:`aclose` either completes (it had begun) or raises ``EngineClosedError``.

    If a batch raises ``KeyboardInterrupt`` or ``SystemExit`` in an executor thread (a
    callable filter may), its callers get a ``VectorDBError`` caused by it, and the
    interruption itself is then re-raised on the event loop, which stops it as asyncio
    does for any task; the engine still works if the loop is run again.
    """

    def __init__(
        self,
        index: ClusteredIndex,
        *,
        max_workers: int = 2,
        max_batch_size: int = 256,
        max_wait: float = 0.001,
        max_pending: int = 4096,
        overload: str = "wait",
        inline: bool | None = None,
        owns_index: bool = False,
    ) -> None:
        if not isinstance(index, ClusteredIndex):
            raise InvalidParameterError(
                f"index must be a ClusteredIndex, got {type(index).__name__}"
            )
        self._max_workers = positive_int("max_workers", max_workers)
        self._max_batch_size = positive_int("max_batch_size", max_batch_size)
        self._max_pending = positive_int("max_pending", max_pending)
        seconds = isinstance(max_wait, (int, float)) and not isinstance(max_wait, bool)
        if not seconds or not 0 <= max_wait <= 1:
            raise InvalidParameterError(f"max_wait must be seconds in [0, 1], got {max_wait!r}")
        self._max_wait = float(max_wait)
        if overload not in ("wait", "raise"):
            raise InvalidParameterError(f"overload must be 'wait' or 'raise', got {overload!r}")
        self._overload = overload
        if inline is not None and not isinstance(inline, bool):
            raise InvalidParameterError(f"inline must be True, False or None, got {inline!r}")
        self._inline = inline
        self._index = index
        self._owns_index = owns_index
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="vectordb"
        )
        self._stats = StatsRecorder()
        self._batcher: MicroBatcher | None = None
        self._write_lock = asyncio.Lock()  # bound to a loop at its first contended use
        self._adds = AddGroups(index, lambda: self._write_lock, self._start)
        self._life = Lifecycle()
        self._closing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        backend: str = "auto",
        readonly: bool = False,
        durability: str = "fsync",
        **options: Any,
    ) -> AsyncEngine:
        """Open a saved index without blocking the loop, and serve it.

        The whole ``ClusteredIndex.open`` (its arguments; files checked, loaded or mapped,
        the log replayed) runs on an executor thread. ``options`` are the constructor's
        (``max_workers``, ...). The engine owns the index: closing the engine closes it."""
        load = functools.partial(
            ClusteredIndex.open,
            Path(path),
            mmap=mmap,
            verify=verify,
            backend=backend,
            progress=False,
            readonly=readonly,
            durability=durability,
        )
        return await cls._serve(load, options)

    @classmethod
    async def create(
        cls, path: str | os.PathLike[str], *, dim: int, metric: str = "l2", **build_options: Any
    ) -> AsyncEngine:
        """``ClusteredIndex.create`` (an empty, durable index) on an executor thread, served
        with the constructor's defaults (wrap ``create``'s index in ``AsyncEngine`` for others)."""
        make = functools.partial(
            ClusteredIndex.create, path, dim=dim, metric=metric, **build_options
        )
        return await cls._serve(make, {})

    @classmethod
    async def _serve(cls, load: Callable[[], ClusteredIndex], options: Any) -> AsyncEngine:
        # The engine's own executor needs the index first; a one-thread one opens it.
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            opening = asyncio.get_running_loop().run_in_executor(executor, load)
            try:
                index = await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(close_unclaimed)  # nobody will use that index
                raise
        finally:
            executor.shutdown(wait=False)
        try:
            return cls(index, owns_index=True, **options)
        except BaseException:
            index.close()
            raise

    async def __aenter__(self) -> AsyncEngine:
        self._life.check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def state(self) -> EngineState:
        return self._life.state

    @property
    def index(self) -> ClusteredIndex:
        """The served index. Calling it directly from the loop blocks the loop."""
        return self._index

    async def aclose(self) -> None:
        """Finish every queued and running query and every write or read already begun,
        then shut the executor down (and close the index if the engine owns it).

        New calls raise ``EngineClosedError`` from the moment it starts; callers still
        waiting for room in the queue (``overload="wait"``) get it too. Idempotent;
        concurrent calls all wait for the same close, and cancelling one of them (or its
        timeout) stops only its wait, never the close. Called from another event loop than
        the engine's once that one has stopped, it closes as :meth:`close` does.
        """
        if self._life.state is EngineState.CLOSED:
            return
        loop, mine = asyncio.get_running_loop(), self._life.loop
        if mine is not None and mine is not loop:
            if mine.is_running():
                raise InvalidParameterError(
                    "the engine's event loop runs in another thread: close it from there"
                )
            self.close()
            return
        if self._closing is None:
            self._life.state = EngineState.CLOSING
            self._closing = loop.create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self._batcher is not None:
                await self._batcher.close()
            await self._life.idle()
            async with self._write_lock:  # writes begun by a caller that left, a save
                pass
            # Reads by id still on the executor finish before the index may close.
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        finally:
            self._executor.shutdown(wait=False)
            if self._owns_index:
                self._index.close()
            self._life.state = EngineState.CLOSED

    def close(self) -> None:
        """Close from synchronous code, once the event loop that used the engine is not
        running (it ended, or is between runs; else ``InvalidParameterError``): nothing can
        be waiting then. Later calls raise ``EngineClosedError``; idempotent. From a running
        loop use ``await aclose()``, which finishes queued work."""
        if self._life.state is EngineState.CLOSED:
            return
        if self._life.loop is not None and self._life.loop.is_running():
            raise InvalidParameterError("the engine's loop is running: 'await engine.aclose()'")
        if self._batcher is not None:
            self._batcher.abandon()
        self._executor.shutdown(wait=False)
        if self._owns_index:
            self._index.close()
        self._life.state = EngineState.CLOSED

    def __del__(self) -> None:
        life = getattr(self, "_life", None)
        if life is not None and life.state is not EngineState.CLOSED:
            warnings.warn(
                f"{self!r} was not closed; use 'async with' or 'await engine.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )
            self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"<AsyncEngine {self._life.state.value} {self._index!r}>"

    # ------------------------------------------------------------------ search
    async def search(
        self,
        query: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
        timeout: float | None = None,
    ) -> tuple[I64, F32]:
        """The ``k`` nearest neighbours of one query, batched with concurrent calls.

        Same parameters and results as :meth:`ClusteredIndex.search`. ``timeout`` (seconds
        >= 0, or ``None``) raises ``asyncio.TimeoutError``, counts in ``stats().cancelled``,
        and drops the query if its batch had not started. The query is checked on the loop
        (O(d)), so a bad one fails alone, not its batch. A dict ``filter`` is copied when
        the call is made.
        """
        self._life.check_open()
        q = as_query_matrix(query, self._index.dim, single=True)
        key = BatchKey.of(k, probes, rerank_factor, filter, target_recall)
        ids, dists = await self._submit(q, key, check_timeout(timeout))
        return ids[0], dists[0]

    async def search_batch(
        self,
        queries: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
        timeout: float | None = None,
    ) -> tuple[I64, F32]:
        """``search`` for each row of ``queries`` ``(nq, d)``: ``(nq, k)`` ids and distances."""
        self._life.check_open()
        q = as_query_matrix(queries, self._index.dim, single=False)
        key = BatchKey.of(k, probes, rerank_factor, filter, target_recall)
        return await self._submit(q, key, check_timeout(timeout))

    async def _submit(self, q: F32, key: BatchKey, timeout: float | None) -> tuple[I64, F32]:
        self._life.bind_loop()
        if self._batcher is None:
            self._batcher = MicroBatcher(
                self._run_batch,
                self._executor,
                max_batch_size=self._max_batch_size,
                max_wait=self._max_wait,
                max_pending=self._max_pending,
                overload=self._overload,
                max_concurrent=self._max_workers,
                stats=self._stats,
                may_run_here=self._may_run_here,
            )
        if timeout is None:
            return await self._batcher.submit(q, key)
        # Never on the loop: a search there could not be cut short at the timeout.
        return await within(timeout, self._batcher.submit(q, key, here=False))

    def _may_run_here(self, queries: F32, key: BatchKey) -> bool:
        """Whether a lone request may run on the loop (see ``inline``)."""
        if self._inline is False or queries.shape[0] != 1 or key.filter.value is not None:
            return False
        index = self._index
        return self._inline is True or not (index.is_using_mmap or index.backend == "cupy")

    def _run_batch(self, queries: F32, key: BatchKey) -> tuple[I64, F32]:
        return self._index.search_batch(
            queries,
            key.k,
            probes=key.probes,
            rerank_factor=key.rerank_factor,
            filter=key.filter.value,
            target_recall=key.target_recall,
        )

    # ------------------------------------------------------------------ writes
    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one write on the executor; writes run one at a time, searches go on.

        The write lock is held until the executor has finished the write, even if the
        caller is cancelled meanwhile (a thread cannot be stopped): writes never overlap."""
        with self._life.operation():
            lock = self._write_lock
            await lock.acquire()
            try:  # its wait for durability after the lock: see engine.writes
                done = start_write(
                    self._start, lock, partial(self._index.deferred, fn, *args, **kwargs)
                )
            except BaseException:
                lock.release()
                raise
            return await asyncio.shield(done)

    async def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """:meth:`ClusteredIndex.add` on the executor; searches see the index before or after
        it. Adds queued behind a write are written as one (group commit: ``engine.writes``)."""
        with self._life.operation():
            return await self._adds.add(vectors, ids, metadata)

    async def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """:meth:`ClusteredIndex.upsert` on the executor."""
        return await self._write(self._index.upsert, vectors, ids, metadata)

    async def delete(self, ids: Any, *, missing_ok: bool = False) -> int:
        """:meth:`ClusteredIndex.delete` on the executor."""
        return await self._write(self._index.delete, ids, missing_ok=missing_ok)

    async def compact(self) -> None:
        """:meth:`ClusteredIndex.compact` on the executor."""
        await self._write(self._index.compact, progress=False)

    async def refresh(self) -> int:
        """:meth:`ClusteredIndex.refresh` on the executor, in turn with the engine's writes:
        a read-only engine shows what the directory's writer made durable since; returns
        the writes applied."""
        return await self._write(self._index.refresh)

    async def get_metadata(self, id_: int) -> dict[str, Any] | None:
        """:meth:`ClusteredIndex.get_metadata` on the executor."""
        return await self.run(self._index.get_metadata, id_)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's executor, for other work on the index that may page in
        the mapped vectors or take a while; :meth:`aclose` waits for it (``EngineClosedError``
        once closed)."""
        with self._life.operation():
            return await self._call(fn, *args)

    async def ids_matching(self, filter: Filter) -> I64:
        """:meth:`ClusteredIndex.ids_matching` on the executor."""
        return await self.run(self._index.ids_matching, filter)

    async def get_vectors(self, ids: Any) -> F32:
        """:meth:`ClusteredIndex.get_vectors` on the executor (reads may page in)."""
        return await self.run(self._index.get_vectors, ids)

    def stats(self) -> EngineStats:
        """Queries served, batches run, mean batch size, queue depth, p50/p99 latency."""
        batcher = self._batcher
        return self._stats.snapshot(
            queue_depth=batcher.queue_depth if batcher else 0,
            in_flight=batcher.in_flight if batcher else 0,
        )

    # ------------------------------------------------------------------ files
    def _start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # the executor was shut down: the engine closed
            raise EngineClosedError(f"the engine is {self._life.state.value}") from exc

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._start(fn, *args)

    async def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """``index.save(path)`` (with no ``path``: a checkpoint of the bound directory)
        without blocking the loop: the whole save (files, manifest,
        the atomic swap) runs as one job on the executor, with no write in between.

        Cancelled (or timed out), the save stops at its next step and removes what it
        wrote, or, if its swap had begun, completes first; either way the parent's lock is
        released before ``CancelledError`` is raised, and ``path`` holds the old index or
        the new one. :meth:`aclose` waits for a save under way.
        """
        with self._life.operation():
            async with self._write_lock:  # a consistent snapshot: no write during the save
                await self._save(None if path is None else Path(path))

    async def _save(self, path: Path | None) -> None:
        job = self._index.save_job(path)
        running = self._start(job.run)
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            # A thread cannot be stopped: ask the job to, and wait until it has ended (it
            # removes what it wrote, or finishes its swap); the caller gets its cancel.
            job.stop()
            await finish(running)
            raise

    async def warm(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Page the mapped vector file into the page cache; return bytes read (0 in RAM): the
        steps of ``ClusteredIndex.warmer``, each awaited on the executor, ``progress(done,
        total)`` on the loop after each chunk (:func:`~vectordb.engine.warming.warm_steps`)."""
        with self._life.operation():
            return await warm_steps(self._index.warmer(), self._call, progress)
