"""``ShardedEngine``: a sharded index behind the same ``await search`` as ``AsyncEngine``."""

from __future__ import annotations

import asyncio
import errno
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast, overload

import numpy as np

from .._types import F32, I64
from .._validation import as_query_matrix, positive_int
from ..engine.keys import BatchKey
from ..engine.waiting import check_timeout
from ..errors import (
    EngineClosedError,
    InvalidIndexFileError,
    InvalidParameterError,
    StorageError,
)
from ..storage.filters import Filter
from .backends.base import Backend
from .backends.local import LocalBackend
from .batching import Gatherer
from .fanout import Answer, check_route, cut, fan_out
from .layout import ShardLayout, read_layout, shard_dir, write_layout
from .replicas import ShardGroup
from .result import SearchResult
from .writes import ShardWriter

__all__ = ["ShardedEngine"]

LOCAL = "local-threads"


def _backend(
    address: str | None,
    actor_options: Mapping[str, Any] | None,
    replica_options: Callable[[int, int], Mapping[str, Any]] | None = None,
) -> Backend:
    if address == LOCAL:
        if actor_options or replica_options is not None:
            raise InvalidParameterError(
                "actor_options and replica_options are for Ray actors, not local-threads"
            )
        return LocalBackend()
    if address is not None and not isinstance(address, str):
        raise InvalidParameterError(f"address must be a str or None, got {address!r}")
    from .backends.ray_actors import RayBackend  # imports ray: only when asked for

    return RayBackend(address, dict(actor_options or {}))


def _per_replica(
    replica_options: Callable[[int, int], Mapping[str, Any]] | None, shards: int, replicas: int
) -> list[list[dict[str, Any]]]:
    """``replica_options(shard, replica)`` for every replica, checked (``{}`` without it)."""
    if replica_options is not None and not callable(replica_options):
        raise InvalidParameterError(
            f"replica_options must be a callable (shard, replica) -> dict, got {replica_options!r}"
        )
    table = [[replica_options(s, r) if replica_options else {} for r in range(replicas)]
             for s in range(shards)]  # fmt: skip
    for s, row in enumerate(table):
        for r, got in enumerate(row):
            if not isinstance(got, Mapping):
                raise InvalidParameterError(
                    f"replica_options({s}, {r}) must return a mapping of Ray options, got {got!r}"
                )
    return [[dict(got) for got in row] for row in table]


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidParameterError(f"{name} must be seconds > 0, got {value!r}")
    if math.isinf(value):
        raise InvalidParameterError(f"{name} must be finite: a remote wait must end")
    return float(value)


class ShardedEngine:
    """Search a sharded index (``build_shards``) whose shards are served by replicas: Ray
    actors, or ``AsyncEngine`` objects in this process (``address="local-threads"``).

    Make one with :meth:`open`. Concurrent :meth:`search` calls are gathered into batches
    on the caller's side and sent to every shard at once (or, with ``route=m``, to the
    ``m`` shards nearest each query); the shards' top-k are merged on their exact
    distances, ties by id, padding (id ``-1``, distance ``inf``) last. See
    ``docs/distributed.md`` for writes, replicas and faults.
    """

    def __init__(
        self,
        layout: ShardLayout,
        groups: list[ShardGroup],
        backend: Backend,
        *,
        route: int | None,
        allow_partial: bool,
        max_batch_size: int,
        max_wait: float,
    ) -> None:
        """Internal: use :meth:`open`."""
        self._layout, self._groups, self._backend = layout, groups, backend
        self._route, self._allow_partial = route, allow_partial
        top = max((int(g.info[1]) for g in groups), default=-1)
        self._writer = ShardWriter(groups, layout, top + 1)
        self._gatherer: Gatherer[Answer] = Gatherer(
            self._run_batch, cut, max_batch_size=max_batch_size, max_wait=max_wait
        )
        self._closing: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        replicas: int = 1,
        address: str | None = None,
        route: int | None = None,
        shard_timeout: float = 30.0,
        allow_partial: bool = False,
        max_restarts: int = 3,
        backend: str = "auto",
        mmap: bool = True,
        max_workers: int = 1,
        max_batch_size: int = 256,
        max_wait: float = 0.0005,
        actor_options: Mapping[str, Any] | None = None,
        replica_options: Callable[[int, int], Mapping[str, Any]] | None = None,
    ) -> ShardedEngine:
        """Open the sharded index in ``path`` and start ``replicas`` replicas per shard.

        Parameters
        ----------
        replicas : int >= 1
            Replicas of every shard; replica 0 is the shard's writer, the others open it
            ``readonly=True`` and refresh after each write.
        address : str or None
            ``None`` or a Ray address (``"auto"``, ``"ray://host:10001"``, ``"local"``): one
            Ray actor per replica (connects with ``ray.init`` unless Ray is initialised).
            ``"local-threads"``: replicas in this process, no Ray.
        route : int in [1, shards], optional
            Send each query to its ``route`` nearest shards only (``placement="kmeans"``;
            ``InvalidParameterError`` with hash placement). Default: every shard.
        shard_timeout : float seconds > 0
            Bound on every request to a shard, failover and restart waits included.
        allow_partial : bool
            Let ``search(..., return_partial=True)`` answer without an unavailable shard.
        max_restarts : int >= 0
            Restarts per replica after it died or hung.
        backend, mmap, max_workers : passed to every shard's ``AsyncEngine.open``.
        max_batch_size, max_wait : the caller-side batching (queries, seconds >= 0).
        actor_options : Ray ``.options()`` for the actors (``num_cpus``, ``resources``,
            ``scheduling_strategy``, ...).
        replica_options : callable ``(shard, replica) -> dict``, optional
            Ray ``.options()`` for one replica (replica 0 is the writer), merged over
            ``actor_options``; a restarted replica gets the same. For placement, e.g. one
            shard's replicas on different nodes (``resources``, or
            ``NodeAffinitySchedulingStrategy(node_id, soft=True)``).

        ``InvalidIndexFileError`` for a damaged manifest or shards that disagree with it,
        ``ShardUnavailableError`` if a shard's replicas do not start within ``shard_timeout``,
        ``BackendUnavailableError`` when Ray is asked for and not installed.
        """
        replicas = positive_int("replicas", replicas)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise InvalidParameterError(
                f"max_restarts must be an integer >= 0, got {max_restarts!r}"
            )
        timeout = _seconds("shard_timeout", shard_timeout)
        if not isinstance(allow_partial, bool):
            raise InvalidParameterError(f"allow_partial must be a bool, got {allow_partial!r}")
        max_batch_size = positive_int("max_batch_size", max_batch_size)
        if (
            isinstance(max_wait, bool)
            or not isinstance(max_wait, (int, float))
            or not 0 <= max_wait <= 1
        ):
            raise InvalidParameterError(f"max_wait must be seconds in [0, 1], got {max_wait!r}")
        root = Path(path)
        layout = await asyncio.to_thread(read_layout, root)
        route = check_route(layout, route)
        per_replica = _per_replica(replica_options, layout.shards, replicas)
        chosen = _backend(address, actor_options, replica_options)
        options = {"backend": backend, "mmap": mmap, "max_workers": max_workers}
        groups = [
            ShardGroup(
                s,
                str(shard_dir(root, s)),
                chosen,
                replicas=replicas,
                max_restarts=max_restarts,
                timeout=timeout,
                options=options,
                actor_options=per_replica[s],
            )
            for s in range(layout.shards)
        ]
        try:
            await _start_all(groups)
            for g in groups:
                _, _, dim, metric, _ = g.info
                if dim != layout.dim or metric != layout.metric.value:
                    raise InvalidIndexFileError(
                        f"{shard_dir(root, g.shard)}: dim {dim}, metric {metric!r}; the "
                        f"manifest says dim {layout.dim}, metric {layout.metric.value!r}"
                    )
        except BaseException:
            await asyncio.gather(*(g.close() for g in groups), return_exceptions=True)
            raise
        return cls(
            layout,
            groups,
            chosen,
            route=route,
            allow_partial=allow_partial,
            max_batch_size=max_batch_size,
            max_wait=float(max_wait),
        )

    async def __aenter__(self) -> ShardedEngine:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed or self._closing is not None:
            raise EngineClosedError("the sharded engine is closed")

    async def aclose(self) -> None:
        """Finish the searches under way, then close every replica and kill its actor.
        Idempotent; concurrent calls wait for the same close."""
        if self._closed:
            return
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            await self._gatherer.drain()
            async with self._writer.lock:
                pass
        finally:
            await asyncio.gather(*(g.close() for g in self._groups), return_exceptions=True)
            self._closed = True

    @property
    def layout(self) -> ShardLayout:
        """The manifest: shards, placement, dim, metric (and the kmeans centroids)."""
        return self._layout

    @property
    def dim(self) -> int:
        return self._layout.dim

    @property
    def backend_name(self) -> str:
        """``"ray"`` or ``"local-threads"``."""
        return self._backend.name

    def actors(self) -> list[list[Any]]:
        """Per shard, its live replicas' handles (Ray ``ActorHandle``; in process, the
        ``LocalReplica``), the writer first."""
        return [g.handles() for g in self._groups]

    # ------------------------------------------------------------------ search
    @overload
    async def search(
        self,
        query: Any,
        k: int = ...,
        probes: int | None = ...,
        rerank_factor: int | None = ...,
        *,
        filter: Filter | None = ...,
        target_recall: float | None = ...,
        route: int | None = ...,
        timeout: float | None = ...,
        return_partial: Literal[False] = ...,
    ) -> tuple[I64, F32]: ...
    @overload
    async def search(
        self,
        query: Any,
        k: int = ...,
        probes: int | None = ...,
        rerank_factor: int | None = ...,
        *,
        filter: Filter | None = ...,
        target_recall: float | None = ...,
        route: int | None = ...,
        timeout: float | None = ...,
        return_partial: Literal[True],
    ) -> SearchResult: ...
    async def search(
        self,
        query: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
        route: int | None = None,
        timeout: float | None = None,
        return_partial: bool = False,
    ) -> tuple[I64, F32] | SearchResult:
        """The ``k`` nearest neighbours of one query ``(d,)`` over every shard (or the
        ``route`` nearest): ``(k,)`` int64 ids and float32 distances, as
        ``AsyncEngine.search``; ``probes`` etc. apply in every shard, the filter before
        each shard's top-k. ``timeout``: seconds for the whole call
        (``asyncio.TimeoutError``; the remote calls are cancelled). ``return_partial=True``:
        a :class:`SearchResult`, which with ``allow_partial=True`` may lack unavailable
        shards (``result.missing``); otherwise such a shard raises
        ``ShardUnavailableError``."""
        q = as_query_matrix(query, self._layout.dim, single=True)
        found = await self._search(
            q, k, probes, rerank_factor, filter, target_recall, route, timeout
        )
        return self._result(found, return_partial, single=True)

    @overload
    async def search_batch(
        self,
        queries: Any,
        k: int = ...,
        probes: int | None = ...,
        rerank_factor: int | None = ...,
        *,
        filter: Filter | None = ...,
        target_recall: float | None = ...,
        route: int | None = ...,
        timeout: float | None = ...,
        return_partial: Literal[False] = ...,
    ) -> tuple[I64, F32]: ...
    @overload
    async def search_batch(
        self,
        queries: Any,
        k: int = ...,
        probes: int | None = ...,
        rerank_factor: int | None = ...,
        *,
        filter: Filter | None = ...,
        target_recall: float | None = ...,
        route: int | None = ...,
        timeout: float | None = ...,
        return_partial: Literal[True],
    ) -> SearchResult: ...
    async def search_batch(
        self,
        queries: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
        route: int | None = None,
        timeout: float | None = None,
        return_partial: bool = False,
    ) -> tuple[I64, F32] | SearchResult:
        """:meth:`search` for each row of ``queries`` ``(nq, d)``: ``(nq, k)`` each."""
        q = as_query_matrix(queries, self._layout.dim, single=False)
        found = await self._search(
            q, k, probes, rerank_factor, filter, target_recall, route, timeout
        )
        return self._result(found, return_partial, single=False)

    async def _search(
        self,
        q: F32,
        k: Any,
        probes: Any,
        rerank_factor: Any,
        filt: Any,
        target_recall: Any,
        route: Any,
        timeout: Any,
    ) -> Answer:
        self._check_open()
        key = (
            BatchKey.of(k, probes, rerank_factor, filt, target_recall),
            self._route if route is None else check_route(self._layout, route),
        )
        wait = check_timeout(timeout)
        if wait is None:
            answer: Answer = await self._gatherer.submit(q, key)
        else:
            answer = await asyncio.wait_for(self._gatherer.submit(q, key), wait)
        return answer

    def _result(
        self, answer: Answer, return_partial: bool, *, single: bool
    ) -> tuple[I64, F32] | SearchResult:
        missing = tuple(int(s) for s in np.flatnonzero(answer.missing.any(axis=0)))
        if missing and not (self._allow_partial and return_partial):
            raise answer.errors[missing[0]]
        ids, dists = (answer.ids[0], answer.dists[0]) if single else (answer.ids, answer.dists)
        if return_partial:
            return SearchResult(ids, dists, missing)
        return ids, dists

    async def _run_batch(self, queries: F32, key: Hashable) -> Answer:
        bk, m = cast("tuple[BatchKey, int | None]", key)
        return await fan_out(
            self._groups, self._backend, self._layout, queries, bk, m, self._allow_partial
        )

    # ------------------------------------------------------------------ writes
    async def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """Add vectors ``(n, d)``; each goes to the shard that owns it. Returns their ids
        ``(n,)`` int64 (default: after the largest id in any shard). ``DuplicateIdError``
        if an id is in any shard; nothing is written then."""
        self._check_open()
        return await self._writer.add(vectors, ids, metadata)

    async def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """Add or replace vectors by id (see ``docs/distributed.md`` for kmeans placement)."""
        self._check_open()
        return await self._writer.upsert(vectors, ids, metadata)

    async def delete(self, ids: Any, *, missing_ok: bool = False) -> int:
        """Delete by id; returns how many. ``UnknownIdError`` (nothing deleted) for an id no
        shard has, unless ``missing_ok``."""
        self._check_open()
        return await self._writer.delete(ids, missing_ok)

    async def get_vectors(self, ids: Any) -> F32:
        """The stored vectors of ``ids`` ``(n,)``: ``(n, d)`` float32, in order."""
        self._check_open()
        return await self._writer.get_vectors(ids)

    async def get_metadata(self, id_: int) -> dict[str, Any] | None:
        """The metadata of one id (``UnknownIdError`` if no shard has it)."""
        self._check_open()
        return await self._writer.get_metadata(id_)

    async def count(self) -> int:
        """Live vectors over all shards."""
        self._check_open()
        infos = await asyncio.gather(*(g.read("info") for g in self._groups))
        return sum(int(i[0]) for i in infos)

    async def save(self, path: str | os.PathLike[str] | None = None) -> None:
        """A checkpoint of every shard (no ``path``), or a copy of the sharded index into
        the new directory ``path`` (each shard's writer saves its shard there, then the
        manifest is written). The shards are saved one after another, no write between."""
        self._check_open()
        async with self._writer.lock:
            if path is None:
                for g in self._groups:
                    await g.write("save", None)
                return
            root = Path(path)
            if root.exists():
                raise StorageError(
                    errno.EEXIST, "exists: save a sharded index to a new path", str(root)
                )
            await asyncio.to_thread(root.mkdir, parents=True)
            for g in self._groups:
                await g.write("save", str(shard_dir(root, g.shard)))
            await asyncio.to_thread(write_layout, root, self._layout)


async def _start_all(groups: list[ShardGroup]) -> None:
    results = await asyncio.gather(*(g.start() for g in groups), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
