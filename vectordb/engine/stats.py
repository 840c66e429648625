"""Counters and a latency window for ``AsyncEngine.stats()``. No asyncio, no threads."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["EngineStats", "StatsRecorder"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's work since it was created.

    Attributes
    ----------
    queries : int
        Queries answered (a ``search_batch`` of n counts n). Every search the engine
        accepted (not refused at once as closed or overloaded) counts exactly once, in
        ``queries``, ``cancelled`` or ``failed``, when its caller gets its outcome.
    batches : int
        Searches run: jobs on the executor, and lone queries run on the loop.
    mean_batch_size : float
        Queries per search run.
    queue_depth : int
        Queries waiting to be batched right now.
    in_flight : int
        Jobs running right now.
    cancelled : int
        Queries whose caller was cancelled or timed out (``timeout=``) before it had its
        answer: while waiting for room, queued, or running.
    failed : int
        Queries answered with an exception (their batch's, or ``EngineClosedError``).
    p50_ms, p99_ms : float
        Latency from the call to the answer, over the last ``window`` queries (``nan``
        before the first).
    """

    queries: int
    batches: int
    mean_batch_size: float
    queue_depth: int
    in_flight: int
    cancelled: int
    failed: int
    p50_ms: float
    p99_ms: float


class StatsRecorder:
    """Mutable counters behind :class:`EngineStats`; used from the event loop only."""

    def __init__(self, window: int = 10_000) -> None:
        self.queries = 0
        self.batches = 0
        self.batched_queries = 0
        self.cancelled = 0
        self.failed = 0
        self._latencies: deque[float] = deque(maxlen=window)

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.batched_queries += size

    def record_answer(self, n: int, seconds: float) -> None:
        self.queries += n
        self._latencies.append(seconds)

    def snapshot(self, queue_depth: int, in_flight: int) -> EngineStats:
        if self._latencies:
            p50, p99 = np.percentile(np.fromiter(self._latencies, dtype=np.float64), [50, 99])
        else:
            p50 = p99 = float("nan")
        return EngineStats(
            queries=self.queries,
            batches=self.batches,
            mean_batch_size=self.batched_queries / self.batches if self.batches else 0.0,
            queue_depth=queue_depth,
            in_flight=in_flight,
            cancelled=self.cancelled,
            failed=self.failed,
            p50_ms=float(p50) * 1e3,
            p99_ms=float(p99) * 1e3,
        )
