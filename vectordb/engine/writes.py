"""Writes on the engine's executor, and group commit of concurrent adds.

A write runs on the executor while the engine's write lock is held; its wait for
durability (the log's fsync, see ``ClusteredIndex.deferred``) runs after the lock is let
go, so the next write appends meanwhile and one fsync covers several (:func:`start_write`).

Sixty-four coroutines each adding one vector would still run sixty-four writes one after
another, each with its executor hop, its index update and its fsync. So adds that queue
while a write runs are written together (:class:`AddGroups`): one ``index.add`` of all
their rows (one log record, one fsync), each caller given its own ids back. A group
whose merged add raises is written again one add at a time, so that each error reaches
its own caller and the other adds still happen (a write that raises changes nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np

from .._types import F32, I64
from .._validation import as_matrix
from ..errors import VectorDBError
from ..index.clustered import ClusteredIndex
from ..storage.idmap import as_ids
from ..storage.metadata import encode_documents

__all__ = ["MAX_GROUP_ROWS", "AddGroups", "PendingAdd", "start_write", "take_group", "write_group"]

T = TypeVar("T")
#: Most rows written as one group.
MAX_GROUP_ROWS = 65_536
Start = Callable[[Callable[[], Any]], "asyncio.Future[Any]"]


def start_write(
    start: Start, lock: asyncio.Lock, job: Callable[[], tuple[T, Callable[[], None] | None]]
) -> asyncio.Future[T]:
    """Run ``job`` (a write returning ``(result, commit)``) with ``start`` (the engine's
    executor), ``lock`` held by the caller; as it ends, queue its ``commit``, then release
    the lock (an ``aclose`` waiting for the lock finds the commit queued before it shuts the
    executor down). Returns the future of ``result``, set once ``commit`` has returned.
    If ``start`` raises, the lock is the caller's to release."""
    out: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    running = start(job)

    def finished(done: asyncio.Future[Any]) -> None:
        try:
            if done.cancelled():
                out.cancel()
                return
            error = done.exception()
            if error is not None:
                out.set_exception(error)
                return
            result, commit = done.result()
            if commit is None:  # nothing to wait for (not logged, or not "fsync")
                out.set_result(result)
                return
            try:
                committing = start(commit)
            except BaseException as exc:
                out.set_exception(exc)
                return
            committing.add_done_callback(partial(_committed, out, result))
        finally:
            lock.release()

    running.add_done_callback(finished)
    return out


def _committed(out: asyncio.Future[T], result: T, done: asyncio.Future[Any]) -> None:
    if out.done():
        return
    if done.cancelled():
        out.cancel()
    elif done.exception() is not None:
        out.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        out.set_result(result)


@dataclass(eq=False)
class PendingAdd:
    """One caller's add: its rows ``x`` ``(n, d)`` float32, ``ids`` ``(n,)`` int64 or
    ``None``, ``metadata``, and the ``future`` of its ids. ``taken``: in a group."""

    x: F32
    ids: I64 | None
    metadata: Sequence[Mapping[str, Any] | None] | None
    future: asyncio.Future[I64]
    taken: bool = field(default=False)


def take_group(pending: list[PendingAdd]) -> list[PendingAdd]:
    """Remove and return the longest run at the head of ``pending`` (at least one) whose
    adds all give ids or all leave them to the index (assigned ids cannot collide with
    given ones then), of at most :data:`MAX_GROUP_ROWS` rows."""
    given = pending[0].ids is not None
    rows = 0
    count = 0
    for item in pending:
        if (item.ids is not None) != given or (count and rows + len(item.x) > MAX_GROUP_ROWS):
            break
        rows += len(item.x)
        count += 1
    group = pending[:count]
    del pending[:count]
    for item in group:
        item.taken = True
    return group


def write_group(index: ClusteredIndex, group: list[PendingAdd]) -> list[I64 | VectorDBError]:
    """On the executor: the group as one ``index.add`` (its ids split back by caller), or,
    if that raises a ``VectorDBError``, each add alone (its ids, or its error)."""
    if len(group) > 1:
        x = np.concatenate([p.x for p in group])
        ids = None
        if group[0].ids is not None:
            ids = np.concatenate([p.ids for p in group if p.ids is not None])
        metadata = None
        if any(p.metadata is not None for p in group):
            metadata = [d for p in group for d in (p.metadata or [None] * len(p.x))]
        try:
            new_ids = index.add(x, ids=ids, metadata=metadata)
        except VectorDBError:
            pass  # someone's add is bad: each alone, so that only it fails
        else:
            bounds = np.cumsum([len(p.x) for p in group])[:-1]
            return list(np.split(new_ids, bounds))
    results: list[I64 | VectorDBError] = []
    for p in group:
        try:
            results.append(index.add(p.x, ids=p.ids, metadata=p.metadata))
        except VectorDBError as exc:
            results.append(exc)
    return results


class AddGroups:
    """The engine's adds, gathered into groups while a write runs (see the module
    docstring). ``lock()``: the engine's write lock; ``start``: its executor."""

    def __init__(self, index: ClusteredIndex, lock: Callable[[], asyncio.Lock], start: Start):
        self._index, self._lock, self._start = index, lock, start
        self._pending: list[PendingAdd] = []

    async def add(self, vectors: Any, ids: Any, metadata: Any) -> I64:
        """One caller's add: checked here (its own errors raise before it queues), then
        written in the next group; returns its ids once durable."""
        x = as_matrix(vectors, "vectors", self._index.dim)
        encode_documents(metadata, x.shape[0])
        item = PendingAdd(x, None if ids is None else as_ids(ids), metadata, _future())
        self._pending.append(item)
        lock = self._lock()
        try:
            await lock.acquire()
        except asyncio.CancelledError:
            if not item.taken:
                self._pending.remove(item)
            raise
        if item.taken:  # written (or being written) by an earlier caller's group
            lock.release()
        else:
            group = take_group(self._pending)  # FIFO: this caller's add leads it
            try:
                done = start_write(
                    self._start,
                    lock,
                    partial(self._index.deferred, write_group, self._index, group),
                )
            except BaseException as exc:
                lock.release()
                for p in group:
                    p.future.set_exception(exc)
                raise
            done.add_done_callback(partial(_hand_out, group))
        return await asyncio.shield(item.future)


def _future() -> asyncio.Future[I64]:
    return asyncio.get_running_loop().create_future()


def _hand_out(group: list[PendingAdd], done: asyncio.Future[list[I64 | VectorDBError]]) -> None:
    """Each caller of ``group`` its own ids or error (all of them the group's error)."""
    if done.cancelled() or done.exception() is not None:
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        for p in group:
            if not p.future.done():
                p.future.set_exception(error)  # type: ignore[arg-type]
        return
    for p, result in zip(group, done.result(), strict=True):
        if p.future.done():
            continue
        if isinstance(result, BaseException):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)
