"""Waiting in asyncio without losing work: timeouts that cancel only the waiter's own
call, and waits that outlast cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import math
import numbers
from collections.abc import Awaitable
from typing import Any, TypeVar

from ..errors import InvalidParameterError

__all__ = ["check_timeout", "finish", "within"]

T = TypeVar("T")


def check_timeout(timeout: Any) -> float | None:
    """``timeout`` as seconds >= 0, ``None`` (also for infinity) for none."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise InvalidParameterError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


async def within(timeout: float, awaitable: Awaitable[T]) -> T:
    """``await awaitable`` in this task, raising ``asyncio.TimeoutError`` after ``timeout``
    seconds. Unlike ``asyncio.wait_for`` before Python 3.12 it runs no task of its own, so
    the awaited call always starts and sees its own cancellation (and counts it)."""
    task = asyncio.current_task()
    if task is None:  # not run by an asyncio task: nothing of ours to cancel
        return await asyncio.wait_for(awaitable, timeout)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    loop = asyncio.get_running_loop()
    # A zero timeout expires before the call's first wait ends, even one a step long (a
    # lone search run on the loop), as asyncio.timeout(0) does.
    handle = loop.call_soon(expire) if timeout <= 0 else loop.call_later(timeout, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired:
            raise
        uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
        if uncancel is not None and uncancel() > 0:
            raise  # cancelled from outside as well: that wins
        raise asyncio.TimeoutError(f"no answer within {timeout} s") from None
    finally:
        handle.cancel()


async def finish(fut: asyncio.Future[Any]) -> None:
    """Wait for ``fut`` to end, whatever its outcome and however often the waiter is
    cancelled meanwhile (the cancel is the caller's to raise afterwards)."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([fut])
    if not fut.cancelled():
        fut.exception()  # retrieved, so that asyncio does not log it
