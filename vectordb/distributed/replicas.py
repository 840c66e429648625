"""``ShardGroup``: the replicas of one shard, failover and restarts, every wait bounded.

Replica 0 is the shard's writer (it opens the directory for writing: one writer per index
directory); the others open it ``readonly=True`` and are told to ``refresh()`` after each
write, before the write returns. A read goes to the next live replica (round robin); a
replica that dies (``ReplicaDied``) or does not answer within its share of the time left
is killed and restarted in the background (at most ``max_restarts`` times per replica
slot), and the read tries another one. The whole request, retries and waits for a restart
included, takes at most ``shard_timeout`` seconds; then ``ShardUnavailableError``.

Writes are not retried once sent (an ``add`` may have been applied before the replica
died): they raise ``ShardUnavailableError``; a write that finds the writer dead waits for
its restart (within ``shard_timeout``) before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardUnavailableError
from .backends.base import Backend, Replica, ReplicaDied

__all__ = ["ShardGroup"]


@dataclass
class _Slot:
    number: int
    writer: bool
    replica: Replica | None = None
    restarts: int = 0
    restarting: asyncio.Task[None] | None = None
    last_error: str = "not started"
    pid: int = field(default=-1)
    actor_options: dict[str, Any] = field(default_factory=dict)  # this replica's own


class ShardGroup:
    """The replicas of shard ``shard`` serving the directory ``path``."""

    def __init__(
        self,
        shard: int,
        path: str,
        backend: Backend,
        *,
        replicas: int,
        max_restarts: int,
        timeout: float,
        options: dict[str, Any],
        actor_options: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """``actor_options[i]``: replica ``i``'s own backend options (Ray ``.options()``)."""
        self.shard = shard
        self._path, self._backend, self._options = path, backend, options
        self._timeout, self._max_restarts = timeout, max_restarts
        own = list(actor_options) if actor_options is not None else [{}] * replicas
        if len(own) != replicas:
            raise ValueError(f"{len(own)} actor_options for {replicas} replicas")
        self._slots = [_Slot(i, writer=i == 0, actor_options=dict(own[i])) for i in range(replicas)]
        self._next = 0
        self._closed = False
        self._writes = 0  # writes the writer has acknowledged (see _start_slot)
        self._tasks: set[asyncio.Task[None]] = set()
        self.info: Any = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> Any:
        """Start every replica (at once); returns the writer's ``ShardServer.start`` info."""
        results = await asyncio.gather(
            *(self._start_slot(s) for s in self._slots), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                await self.close()
                raise r
        return self.info

    async def _start_slot(self, slot: _Slot) -> None:
        seen = self._writes
        try:
            replica, info = await self._backend.start(
                self._path,
                writer=slot.writer,
                options=self._options,
                timeout=self._timeout,
                actor_options=slot.actor_options,
            )
        except (ReplicaDied, asyncio.TimeoutError) as exc:
            why = f"replica {slot.number} did not start: {exc!r}"
            raise ShardUnavailableError(self.shard, why) from exc
        try:
            # A reader that opened while a write was being acknowledged may have missed it.
            while not slot.writer and seen != self._writes:
                seen = self._writes
                await replica.call("refresh", timeout=self._timeout)
        except BaseException as exc:
            await replica.kill()
            if isinstance(exc, (ReplicaDied, asyncio.TimeoutError)):
                raise ShardUnavailableError(self.shard, f"refresh after start: {exc!r}") from exc
            raise
        if self._closed:  # closed while it started: nobody will close it
            await replica.kill()
            return
        slot.replica, slot.pid = replica, int(info[4])
        if slot.writer or self.info is None:
            self.info = info

    def handles(self) -> list[Any]:
        """The live replicas' handles (Ray actor handles), writer first."""
        return [s.replica.handle for s in self._slots if s.replica is not None]

    async def close(self) -> None:
        """Close every replica (bounded by ``shard_timeout``) and kill it; idempotent."""
        self._closed = True
        for slot in self._slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
                with contextlib.suppress(BaseException):
                    await slot.restarting
        live = [s for s in self._slots if s.replica is not None]
        await asyncio.gather(*(self._close_slot(s) for s in live), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _close_slot(self, slot: _Slot) -> None:
        replica, slot.replica = slot.replica, None
        if replica is None:
            return
        try:
            with contextlib.suppress(Exception):
                await replica.call("close", timeout=self._timeout)
        finally:
            await replica.kill()

    # ------------------------------------------------------------------ failures
    def _failed(self, slot: _Slot, replica: Replica, why: str) -> None:
        """``replica`` of ``slot`` died or hung: drop it, restart it if restarts are left."""
        if slot.replica is not replica:
            return  # already replaced
        slot.replica, slot.last_error = None, why
        task = asyncio.get_running_loop().create_task(replica.kill())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._closed or slot.restarts >= self._max_restarts:
            return
        slot.restarts += 1
        slot.restarting = asyncio.get_running_loop().create_task(self._restart(slot))

    async def _restart(self, slot: _Slot) -> None:
        try:
            await self._start_slot(slot)
        except Exception as exc:  # out of restarts now, or try again on the next failure
            slot.last_error = f"restart failed: {exc}"
        finally:
            slot.restarting = None

    def _unavailable(self, why: str) -> ShardUnavailableError:
        errors = "; ".join(f"replica {s.number}: {s.last_error}" for s in self._slots)
        used = sum(s.restarts for s in self._slots)
        return ShardUnavailableError(self.shard, f"{why} ({used} restarts used; {errors})")

    async def _await_restart(self, slots: list[_Slot], deadline: float) -> bool:
        """Wait for one of ``slots``' restarts to end; False if none is under way."""
        pending = [s.restarting for s in slots if s.restarting is not None]
        if not pending:
            return False
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        return True

    # ------------------------------------------------------------------ calls
    async def read(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on some live replica, failing over (see the module docstring)."""
        deadline = time.monotonic() + self._timeout
        while True:
            if self._closed:
                raise self._unavailable("the engine is closing")
            live = [s for s in self._slots if s.replica is not None]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._unavailable(f"no answer within shard_timeout={self._timeout}s")
            if not live:
                if not await self._await_restart(self._slots, deadline):
                    raise self._unavailable("no replica left")
                continue
            self._next = (self._next + 1) % len(live)
            slot = live[self._next]
            replica = slot.replica
            if replica is None:  # pragma: no cover - listed as live just above
                continue
            try:
                # A hung replica gets its share of the time left, so that another can answer.
                return await replica.call(method, *args, timeout=remaining / len(live))
            except ReplicaDied as exc:
                self._failed(slot, replica, f"died: {exc}")
            except asyncio.TimeoutError:
                self._failed(slot, replica, f"no answer in {remaining / len(live):.3g}s")

    async def write(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the writer, then ``refresh`` on every reader."""
        deadline = time.monotonic() + self._timeout
        writer = self._slots[0]
        while writer.replica is None:
            if self._closed or not await self._await_restart([writer], deadline):
                raise self._unavailable("the writer is gone")
            if time.monotonic() >= deadline:
                raise self._unavailable(f"the writer did not restart in {self._timeout}s")
        replica = writer.replica
        try:
            result = await replica.call(method, *args, timeout=deadline - time.monotonic())
        except ReplicaDied as exc:
            self._failed(writer, replica, f"died: {exc}")
            raise self._unavailable(f"the writer died during {method}; it may be applied") from exc
        except asyncio.TimeoutError as exc:
            self._failed(writer, replica, "no answer")
            raise self._unavailable(f"{method} timed out; it may be applied") from exc
        self._writes += 1
        await self._refresh_readers(deadline)
        return result

    async def _refresh_readers(self, deadline: float) -> None:
        readers = [s for s in self._slots[1:] if s.replica is not None]

        async def one(slot: _Slot, replica: Replica) -> None:
            try:
                await replica.call("refresh", timeout=max(deadline - time.monotonic(), 0.0))
            except (ReplicaDied, asyncio.TimeoutError) as exc:
                # A restarted reader opens the directory afresh, the write included.
                self._failed(slot, replica, f"refresh failed: {exc!r}")

        await asyncio.gather(*(one(s, s.replica) for s in readers if s.replica is not None))
