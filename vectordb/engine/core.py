"""``AsyncEngine``: the index behind an asyncio face, on an executor of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import json
import mmap
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiofiles
import numpy as np
import numpy.typing as npt

from .._files import storage_error
from .._validation import as_query_matrix, check_k, positive_int
from ..backends import resolve_backend
from ..errors import EngineClosedError, InvalidIndexFileError, InvalidParameterError
from ..index import ClusteredIndex
from ..metadata import Filter, check_filter
from ..persist import MAX_MANIFEST_BYTES, SaveJob, manifest_path, open_index, parse_manifest
from .batcher import MicroBatcher
from .stats import EngineStats, StatsRecorder

__all__ = ["AsyncEngine", "EngineState"]

T = TypeVar("T")
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

_WARM_CHUNK = 16 << 20


@dataclass(frozen=True)
class _FilterKey:
    """A filter as part of a batch key: equal dict filters batch together."""

    value: Filter | None

    def _identity(self) -> Any:
        if self.value is None or callable(self.value):
            return id(self.value) if self.value is not None else None
        return json.dumps(self.value, sort_keys=True, default=repr)

    def __hash__(self) -> int:
        return hash(self._identity())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FilterKey) and self._identity() == other._identity()


@dataclass(frozen=True)
class _Key:
    k: int
    probes: int
    rerank_factor: int
    filter: _FilterKey


class EngineState(enum.Enum):
    """Lifecycle of an :class:`AsyncEngine`."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class AsyncEngine:
    """Serve a :class:`ClusteredIndex` to many coroutines at once.

    Concurrent :meth:`search` calls are gathered into batches (up to ``max_batch_size``
    queries, waiting at most ``max_wait`` seconds for companions) and run as one
    ``search_batch`` on the engine's own thread pool, so NumPy work and page faults on the
    memory-mapped vectors never block the event loop. The engine belongs to the event loop
    it is first used in.

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
    owns_index : bool
        Close the index (unmap its file) when the engine closes; set by :meth:`open`.

    Notes
    -----
    Use ``async with`` or call :meth:`aclose`; an engine garbage-collected while open emits a
    ``ResourceWarning``. From synchronous code, once the engine's loop has ended,
    :meth:`close` releases it.
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
        owns_index: bool = False,
    ) -> None:
        if not isinstance(index, ClusteredIndex):
            raise InvalidParameterError(
                f"index must be a ClusteredIndex, got {type(index).__name__}"
            )
        self._max_workers = positive_int("max_workers", max_workers)
        self._max_batch_size = positive_int("max_batch_size", max_batch_size)
        self._max_pending = positive_int("max_pending", max_pending)
        if (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, (int, float))
            or not (0 <= max_wait <= 1)
        ):
            raise InvalidParameterError(f"max_wait must be seconds in [0, 1], got {max_wait!r}")
        self._max_wait = float(max_wait)
        if overload not in ("wait", "raise"):
            raise InvalidParameterError(f"overload must be 'wait' or 'raise', got {overload!r}")
        self._overload = overload
        self._index = index
        self._owns_index = owns_index
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="vectordb"
        )
        self._stats = StatsRecorder()
        self._batcher: MicroBatcher | None = None
        self._write_lock: asyncio.Lock | None = None
        self._state = EngineState.OPEN
        self._closed: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        backend: str = "auto",
        **options: Any,
    ) -> AsyncEngine:
        """Open a saved index without blocking the loop, and serve it.

        The manifest is read with aiofiles and every array on the engine's executor.
        ``options`` are the constructor's (``max_workers``, ``max_batch_size``, ...). The
        engine owns the index: closing the engine unmaps it.
        """
        directory = Path(path)
        # The engine's own executor needs the index first; a one-thread one opens it.
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()
        try:
            manifest_file = await loop.run_in_executor(executor, manifest_path, directory)
            try:
                async with aiofiles.open(manifest_file, "rb", executor=executor) as fh:
                    raw = await fh.read(MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:
                raise InvalidIndexFileError(
                    f"{manifest_file}: missing; this directory is not a saved vectordb index"
                ) from None
            except OSError as exc:
                raise storage_error(exc, manifest_file) from exc
            manifest = parse_manifest(raw, manifest_file)
            chosen = resolve_backend(backend)
            index = await loop.run_in_executor(
                executor,
                lambda: open_index(
                    ClusteredIndex,
                    directory,
                    mmap=mmap,
                    verify=verify,
                    backend=chosen,
                    manifest=manifest,
                ),
            )
        finally:
            executor.shutdown(wait=False)
        try:
            return cls(index, owns_index=True, **options)
        except BaseException:
            index.close()
            raise

    async def __aenter__(self) -> AsyncEngine:
        self._check_open()
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
        return self._state

    @property
    def index(self) -> ClusteredIndex:
        """The served index. Calling it directly from the loop blocks the loop."""
        return self._index

    async def aclose(self) -> None:
        """Finish every queued and running query and every running write or read, then shut
        the executor down.

        Later calls raise ``EngineClosedError``. Idempotent; concurrent calls all wait for
        the same close.
        """
        if self._state is EngineState.CLOSED:
            return
        if self._state is EngineState.CLOSING and self._closed is not None:
            await self._closed.wait()
            return
        self._state = EngineState.CLOSING
        self._closed = asyncio.Event()
        try:
            if self._batcher is not None:
                await self._batcher.close()
            # Writes and reads by id still on the executor finish before the index may close.
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        finally:
            self._executor.shutdown(wait=False)
            if self._owns_index:
                self._index.close()
            self._state = EngineState.CLOSED
            self._closed.set()

    def close(self) -> None:
        """Close from synchronous code, once the event loop that used the engine is not
        running (it ended, or is between runs): nothing can be waiting then. Later calls
        raise ``EngineClosedError``; idempotent. From a running loop use
        ``await aclose()``, which finishes queued work.

        Raises ``InvalidParameterError`` if the engine's loop is running.
        """
        if self._state is EngineState.CLOSED:
            return
        batcher = self._batcher
        if batcher is not None and batcher.loop.is_running():
            raise InvalidParameterError(
                "the engine's event loop is running: use 'await engine.aclose()'"
            )
        if batcher is not None:
            batcher.abandon()
        self._executor.shutdown(wait=False)
        if self._owns_index:
            self._index.close()
        self._state = EngineState.CLOSED

    def __del__(self) -> None:
        if getattr(self, "_state", EngineState.CLOSED) is not EngineState.CLOSED:
            warnings.warn(
                f"{self!r} was not closed; use 'async with' or 'await engine.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )
            self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"<AsyncEngine {self._state.value} {self._index!r}>"

    def _check_open(self) -> None:
        if self._state is not EngineState.OPEN:
            raise EngineClosedError(f"the engine is {self._state.value}")

    # ------------------------------------------------------------------ search
    async def search(
        self,
        query: Any,
        k: int = 10,
        *,
        probes: int = 4,
        rerank_factor: int = 5,
        filter: Filter | None = None,
        timeout: float | None = None,
    ) -> tuple[I64, F32]:
        """The ``k`` nearest neighbours of one query, batched with concurrent calls.

        Same parameters and results as :meth:`ClusteredIndex.search`. ``timeout`` (seconds)
        raises ``asyncio.TimeoutError``; the query is dropped if its batch had not started.
        The query is checked on the loop (O(d)), so a bad one fails alone, not its batch.
        """
        self._check_open()
        q = as_query_matrix(query, self._index.dim, single=True)
        key = self._key(k, probes, rerank_factor, filter)
        ids, dists = await self._submit(q, key, timeout)
        return ids[0], dists[0]

    async def search_batch(
        self,
        queries: Any,
        k: int = 10,
        *,
        probes: int = 4,
        rerank_factor: int = 5,
        filter: Filter | None = None,
        timeout: float | None = None,
    ) -> tuple[I64, F32]:
        """``search`` for each row of ``queries`` ``(nq, d)``: ``(nq, k)`` ids and distances."""
        self._check_open()
        q = as_query_matrix(queries, self._index.dim, single=False)
        key = self._key(k, probes, rerank_factor, filter)
        return await self._submit(q, key, timeout)

    @staticmethod
    def _key(k: Any, probes: Any, rerank_factor: Any, filt: Any) -> _Key:
        return _Key(
            check_k(k),
            positive_int("probes", probes),
            positive_int("rerank_factor", rerank_factor),
            _FilterKey(check_filter(filt)),
        )

    async def _submit(self, q: F32, key: _Key, timeout: float | None) -> tuple[I64, F32]:
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
            )
        if timeout is None:
            return await self._batcher.submit(q, key)
        return await asyncio.wait_for(self._batcher.submit(q, key), timeout)

    def _run_batch(self, queries: F32, key: _Key) -> tuple[I64, F32]:
        return self._index.search_batch(
            queries,
            key.k,
            probes=key.probes,
            rerank_factor=key.rerank_factor,
            filter=key.filter.value,
        )

    # ------------------------------------------------------------------ writes
    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one write on the executor; writes run one at a time, searches go on."""
        self._check_open()
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            return await self._call(functools.partial(fn, *args, **kwargs))

    async def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """:meth:`ClusteredIndex.add` on the executor. Searches meanwhile see the index
        before or after the add, never half of it."""
        return await self._write(self._index.add, vectors, ids, metadata)

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

    async def get_metadata(self, id_: int) -> dict[str, Any] | None:
        """:meth:`ClusteredIndex.get_metadata` on the executor."""
        return await self.run(self._index.get_metadata, id_)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's executor, for other work on the index that may page
        in the mapped vectors or take a while; :meth:`aclose` waits for it. Raises
        ``EngineClosedError`` once the engine is closed."""
        self._check_open()
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
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def save(self, path: str | os.PathLike[str]) -> None:
        """``index.save(path)`` without blocking the loop: arrays and the vector file on the
        executor, the manifest through aiofiles; the same atomic swap."""
        self._check_open()
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:  # a consistent snapshot: no write between its steps
            await self._save(Path(path))

    async def _save(self, path: Path) -> None:
        job = await self._call(SaveJob, self._index, path)
        try:
            await self._call(job.write_data)
            async with aiofiles.open(job.manifest_path, "wb", executor=self._executor) as fh:
                await fh.write(job.manifest_bytes())
                await fh.flush()
                await self._call(os.fsync, fh.fileno())
            await self._call(job.commit)
        except BaseException as exc:
            await asyncio.shield(self._call(job.abort))
            err = job.error(exc)
            if err is exc:
                raise
            raise err from exc

    async def warm(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Page the memory-mapped vector file into the page cache; return bytes read.

        Hints the kernel (``MADV_WILLNEED``) and reads the file sequentially in 16 MiB
        chunks on the executor. ``progress(done, total)`` is called on the loop after each
        chunk. A no-op (returns 0) when the vectors are in RAM.
        """
        self._check_open()
        path = self._index.mmap_path
        if path is None:
            return 0
        storage = self._index._storage
        if hasattr(mmap, "MADV_WILLNEED") and hasattr(storage, "advise"):
            await self._call(storage.advise, mmap.MADV_WILLNEED)
        total = await self._call(os.path.getsize, path)
        done = 0
        fd = await self._call(os.open, path, os.O_RDONLY)
        try:
            while done < total:
                chunk = await self._call(os.pread, fd, _WARM_CHUNK, done)
                if not chunk:
                    break
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        except OSError as exc:
            raise storage_error(exc, path) from exc
        finally:
            await self._call(os.close, fd)
        return done
