"""The async engines of a text store: one :class:`~vectordb.AsyncEngine` per event loop."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ..engine import AsyncEngine
from ..errors import InvalidParameterError
from ..index.clustered import ClusteredIndex

__all__ = ["LoopEngines"]

T = TypeVar("T")
Loop = asyncio.AbstractEventLoop


def _close_engines(engines: dict[Loop, AsyncEngine], lock: Any, closed_only: bool = False) -> None:
    """Close the engines of closed loops (``closed_only``), or of all loops not running.

    The engine of a running loop would refuse a synchronous close; a loop merely between
    two ``run_until_complete`` calls (of another thread, maybe) still owns its engine.
    """
    with lock:
        idle = [lp for lp in engines if lp.is_closed() or not (closed_only or lp.is_running())]
        closing = [engines.pop(lp) for lp in idle]
    for engine in closing:
        engine.close()


class LoopEngines:
    """Engines over one index, one per event loop (an engine belongs to its loop), made on
    first use. Engines of closed loops are closed when found; the others by :meth:`close`,
    :meth:`aclose`, or when this object is collected."""

    def __init__(self) -> None:
        self.engines: dict[Loop, AsyncEngine] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_engines, self.engines, self._lock)

    def get(self, index: ClusteredIndex) -> AsyncEngine:
        """The running loop's engine over ``index``."""
        loop = asyncio.get_running_loop()
        _close_engines(self.engines, self._lock, closed_only=True)
        with self._lock:
            engine = self.engines.get(loop)
            if engine is None:
                engine = self.engines[loop] = AsyncEngine(index)
        return engine

    async def call(self, index: ClusteredIndex, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the executor of the running loop's engine: reads there are
        waited for by ``aclose`` before the index closes."""
        return await self.get(index).run(fn, *args)

    def close(self) -> None:
        """Close every engine; ``InvalidParameterError`` if a loop of one is running."""
        with self._lock:
            if any(loop.is_running() for loop in self.engines):
                raise InvalidParameterError("an engine's loop runs: use 'await store.aclose()'")
        _close_engines(self.engines, self._lock)

    async def aclose(self) -> None:
        """Close the running loop's engine once its queued work is done."""
        with self._lock:
            engine = self.engines.pop(asyncio.get_running_loop(), None)
        if engine is not None:
            await engine.aclose()
