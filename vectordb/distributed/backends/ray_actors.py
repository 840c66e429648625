"""Shard replicas as Ray async actors (the only module that imports ``ray``, lazily).

Each replica is one actor running a ``ShardServer`` (an ``AsyncEngine`` in the actor's
event loop). Actors are started with Ray's own restarts and task retries off
(``max_restarts=0``, ``max_task_retries=0``): the sharded engine restarts replicas itself,
with every wait bounded by its ``shard_timeout``, since Ray's retries can wait forever for
a node that is gone (ray-project/ray#15045). Replicas are spread over nodes
(``scheduling_strategy="SPREAD"``) unless ``actor_options`` say otherwise; a replica's
own options (the engine's ``replica_options``) go over those.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping
from typing import Any

from ...errors import BackendUnavailableError, VectorDBError
from ..server import ShardServer
from .base import ReplicaDied

__all__ = ["RayBackend", "RayReplica", "ray_module"]


def ray_module() -> Any:
    """``import ray``, or ``BackendUnavailableError`` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Ray is not installed ({exc}); pip install 'vectordb-embedded[ray]', "
            "or use address='local-threads'"
        ) from None
    return ray


@functools.lru_cache(maxsize=1)
def _actor_class() -> Any:
    return ray_module().remote(ShardServer)


def _unwrap(exc: BaseException) -> BaseException:
    """What a failed remote call means here: ``ReplicaDied`` for a lost actor or worker,
    the server's own error (a ``VectorDBError``) as it was raised there, else ``exc``."""
    exceptions = ray_module().exceptions
    if isinstance(exc, exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, VectorDBError):
            return cause
        if isinstance(cause, (exceptions.RayActorError, exceptions.WorkerCrashedError)):
            return ReplicaDied(str(cause))
        return exc
    if isinstance(exc, exceptions.TaskCancelledError):
        return asyncio.CancelledError()
    if isinstance(exc, exceptions.RayError):  # actor died, unavailable, worker or node lost
        return ReplicaDied(f"{type(exc).__name__}: {exc}")
    return exc


async def _result(ref: Any) -> Any:
    return await ref


class RayReplica:
    """One actor; ``handle`` is its ``ray.actor.ActorHandle``."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @property
    def handle(self) -> Any:
        return self._actor

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        ray = ray_module()
        ref = getattr(self._actor, method).remote(*args)
        try:
            return await asyncio.wait_for(_result(ref), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(Exception):
                ray.cancel(ref)  # an async actor's task: its coroutine is cancelled there
            raise
        except Exception as exc:
            found = _unwrap(exc)
            if found is exc:
                raise
            raise found from exc

    async def kill(self) -> None:
        with contextlib.suppress(Exception):
            ray_module().kill(self._actor, no_restart=True)


class RayBackend:
    """Replicas as Ray actors on the cluster at ``address`` (``None``: the cluster this
    process is connected to, or a new local one; see ``ray.init``)."""

    name = "ray"

    def __init__(self, address: str | None, actor_options: dict[str, Any] | None) -> None:
        ray = ray_module()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self._options: dict[str, Any] = {
            "max_restarts": 0,
            "max_task_retries": 0,
            "scheduling_strategy": "SPREAD",
            "max_concurrency": 64,
        }
        self._options.update(actor_options or {})

    def put(self, value: Any) -> Any:
        return ray_module().put(value)

    async def start(
        self,
        path: str,
        *,
        writer: bool,
        options: dict[str, Any],
        timeout: float,
        actor_options: Mapping[str, Any] | None = None,
    ) -> tuple[RayReplica, Any]:
        ray_options = {**self._options, **(actor_options or {})}
        actor = _actor_class().options(**ray_options).remote(path, writer=writer, **options)
        replica = RayReplica(actor)
        try:
            info = await replica.call("start", timeout=timeout)
        except BaseException:
            await replica.kill()
            raise
        return replica, info
