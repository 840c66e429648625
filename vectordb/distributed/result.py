"""The answer of a sharded search that may be partial."""

from __future__ import annotations

from dataclasses import dataclass

from .._types import F32, I64

__all__ = ["SearchResult"]


@dataclass(frozen=True)
class SearchResult:
    """What ``ShardedEngine.search(..., return_partial=True)`` returns.

    ``ids``: ``(k,)`` int64 (``(nq, k)`` from ``search_batch``), ``distances`` float32 of
    the same shape, as ``search`` returns them. ``missing``: the shards that were asked and
    did not answer (ascending; empty when the answer is complete). Each caller gets its own
    object, so concurrent callers never see each other's flag.
    """

    ids: I64
    distances: F32
    missing: tuple[int, ...] = ()

    @property
    def partial(self) -> bool:
        """Whether some shard asked for this answer did not give one."""
        return bool(self.missing)
