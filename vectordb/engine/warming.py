"""The steps of ``AsyncEngine.warm``: a mapped file's warmer run step by step elsewhere."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..storage.vectors import Warmer

__all__ = ["warm_steps"]


async def warm_steps(
    warmer: Warmer | None,
    call: Callable[[Callable[[], Any]], Awaitable[Any]],
    progress: Callable[[int, int], None] | None,
) -> int:
    """Run ``warmer``'s kernel hint, then its chunks, each awaited through ``call`` (the
    engine's executor); ``progress(done, total)`` after each chunk. Returns bytes read
    (0 without a warmer: vectors in RAM)."""
    if warmer is None:
        return 0
    # Closed on the loop: instant for a regular file, and a cancellation (even a
    # second one) cannot skip it.
    with warmer:
        await call(warmer.advise)
        while await call(warmer.step):
            if progress is not None:
                progress(warmer.done, warmer.total)
    return warmer.done
