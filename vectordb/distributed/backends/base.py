"""The protocol between the sharded engine and wherever a shard replica runs.

A backend starts replicas (each a :class:`~vectordb.distributed.server.ShardServer`
somewhere) and hands arrays to them; a replica runs one server method with a time limit.
A replica that is gone (its process died, it was killed, its node left) raises
:class:`ReplicaDied`; errors raised by the server itself (bad filter, unknown id) are
raised as they are, never retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Backend", "Replica", "ReplicaDied"]


class ReplicaDied(Exception):
    """Internal: the replica is gone; the engine retries elsewhere and restarts it."""


class Replica(Protocol):
    """One running replica of one shard."""

    @property
    def handle(self) -> Any:
        """The Ray actor handle (or, in process, the ``ShardServer``)."""

    async def call(self, method: str, *args: Any, timeout: float) -> Any:
        """``await server.<method>(*args)``, at most ``timeout`` seconds
        (``asyncio.TimeoutError``, the remote call cancelled); ``ReplicaDied`` if gone.
        Cancelling the caller cancels the remote call."""
        ...

    async def kill(self) -> None:
        """Stop the replica now, without waiting for its work (never raises)."""
        ...


class Backend(Protocol):
    """Starts replicas and ships arrays to them."""

    name: str

    def put(self, value: Any) -> Any:
        """``value`` as an argument for many calls (Ray: one ``ray.put``)."""
        ...

    async def start(
        self,
        path: str,
        *,
        writer: bool,
        options: dict[str, Any],
        timeout: float,
        actor_options: Mapping[str, Any] | None = None,
    ) -> tuple[Replica, Any]:
        """Start a replica serving ``path`` and wait (at most ``timeout`` seconds) until it
        has opened it; returns it with its ``ShardServer.start()`` info. ``actor_options``:
        this replica's own placement options (Ray ``.options()``), over the backend's."""
        ...
