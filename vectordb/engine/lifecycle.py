"""Where an engine is in its life: open, closing, closed; its event loop; its calls under way."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator
from typing import Any

from ..errors import EngineClosedError, InvalidParameterError

__all__ = ["EngineState", "Lifecycle", "close_unclaimed"]


class EngineState(enum.Enum):
    """Lifecycle of an :class:`~vectordb.engine.core.AsyncEngine`."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Lifecycle:
    """An engine's state, the loop it belongs to (the first that uses it), and the count of
    calls under way that a close waits for. Used from the loop's thread only."""

    def __init__(self) -> None:
        self.state = EngineState.OPEN
        self.loop: asyncio.AbstractEventLoop | None = None
        self._active = 0
        self._idle: asyncio.Event | None = None

    def check_open(self) -> None:
        """``EngineClosedError`` unless the engine is open."""
        if self.state is not EngineState.OPEN:
            raise EngineClosedError(f"the engine is {self.state.value}")

    def bind_loop(self) -> None:
        """Belong to the running loop, or ``InvalidParameterError`` if bound to another."""
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        elif loop is not self.loop:
            raise InvalidParameterError(
                "this engine belongs to another event loop (the first one that used it); "
                "create one engine per event loop"
            )

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """One call other than a search, from its first step to its last: refused unless
        the engine is open, and waited for by :meth:`idle`."""
        self.check_open()
        self.bind_loop()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no :meth:`operation` is under way."""
        while self._active:
            self._idle = asyncio.Event()
            await self._idle.wait()


def close_unclaimed(opening: asyncio.Future[Any]) -> None:
    """Close an index (anything with ``close()``) opened for a caller that was cancelled
    meanwhile: ``opening``'s done callback."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
