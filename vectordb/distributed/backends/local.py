"""In-process shards: each replica a ``ShardServer`` (an ``AsyncEngine``) in this process.

Runs the same sharding, routing, merge and failover as Ray does, with no Ray: for tests,
and for one machine with several index directories. :meth:`LocalReplica.kill` plays a
replica's death (its calls then raise ``ReplicaDied``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from ..server import ShardServer
from .base import ReplicaDied

__all__ = ["LocalBackend", "LocalReplica"]


class LocalReplica:
    """A ``ShardServer`` in this process."""

    def __init__(self, server: ShardServer) -> None:
        self._server = server
        self._dead = False

    @property
    def handle(self) -> LocalReplica:
        """The replica itself (``engine.actors()`` in process): ``kill()`` plays its death."""
        return self

    @property
    def server(self) -> ShardServer:
        return self._server

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        if self._dead:
            raise ReplicaDied("the replica was killed")
        try:
            result = await asyncio.wait_for(getattr(self._server, method)(*args), timeout)
        except Exception as exc:
            if self._dead:  # killed while the call ran (its engine closed under it)
                raise ReplicaDied("the replica was killed") from exc
            raise
        if self._dead:
            raise ReplicaDied("the replica was killed")
        return result

    async def kill(self) -> None:
        """Mark the replica dead (its calls raise ``ReplicaDied``) and close its engine."""
        if not self._dead:
            self._dead = True
            with contextlib.suppress(Exception):
                await self._server.close()


class LocalBackend:
    """Replicas as ``ShardServer`` objects in this process (``address="local-threads"``)."""

    name = "local-threads"

    def put(self, value: Any) -> Any:
        return value

    async def start(
        self,
        path: str,
        *,
        writer: bool,
        options: dict[str, Any],
        timeout: float,
        actor_options: Mapping[str, Any] | None = None,  # placement: nothing to place here
    ) -> tuple[LocalReplica, Any]:
        server = ShardServer(path, writer=writer, **options)
        try:
            info = await asyncio.wait_for(server.start(), timeout)
        except BaseException:
            await server.close()
            raise
        return LocalReplica(server), info
