"""Batch keys: which concurrent searches may share one batch.

Two searches batch together only when they ask the same ``k``, ``probes``,
``rerank_factor`` and filter; a dict filter is compared by value, as copied when the call
was made, a callable by identity.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._validation import check_k, positive_int
from ..errors import InvalidParameterError
from ..index.calibrate import check_target
from ..storage.filters import Filter, check_filter

__all__ = ["BatchKey", "FilterKey"]


class FilterKey:
    """A filter as part of a batch key: two keys are equal only for the same filter.

    A dict filter is copied when the call is made, into plain dicts, lists and exact
    builtin scalars: equal dict filters batch together, a caller changing its dict later
    changes nothing, and filters that could select differently never share a key. A
    callable is its own key, by identity (two lambdas never batch together); the key holds
    it, so its ``id`` cannot be reused meanwhile.
    """

    __slots__ = ("_hash", "_identity", "value")

    def __init__(self, filt: Filter | None) -> None:
        self.value: Filter | None
        self._identity: Hashable
        if filt is None:
            self.value, self._identity = None, None
        elif callable(filt):
            self.value, self._identity = filt, ("callable", id(filt))
        else:
            plain = _plain(filt)
            self.value, self._identity = plain, _frozen(plain)
        self._hash = hash(self._identity)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilterKey) and self._identity == other._identity


def _plain(value: Any) -> Any:
    """A validated dict filter (or part of one) rebuilt from plain dicts, lists and exact
    builtin scalars, which select exactly as the original does."""
    if isinstance(value, Mapping):
        return {str.__str__(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


def _frozen(value: Any) -> Hashable:
    """A hashable twin of a :func:`_plain` filter, equal only for equal types and values."""
    if isinstance(value, dict):
        return ("dict", frozenset((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_frozen(v) for v in value))
    if type(value) is float:
        return ("float", value.hex())
    if value is None or type(value) in (str, int, bool):
        return (type(value).__name__, value)
    return ("object", id(value))


@dataclass(frozen=True)
class BatchKey:
    """The search parameters of a batch: one key, one ``search_batch`` call."""

    @classmethod
    def of(
        cls, k: Any, probes: Any, rerank_factor: Any, filt: Any, target_recall: Any = None
    ) -> BatchKey:
        """The key of a call's parameters, checked (``InvalidParameterError``); ``None``
        leaves a parameter to the index (see ``ClusteredIndex.search``)."""
        if probes is rerank_factor is filt is target_recall is None and type(k) is int:
            return _plain_key(k)  # the common call, its key made once per k
        if probes is not None and target_recall is not None:
            raise InvalidParameterError("give probes or target_recall, not both")
        return cls(
            check_k(k),
            None if probes is None else positive_int("probes", probes),
            None if rerank_factor is None else positive_int("rerank_factor", rerank_factor),
            FilterKey(check_filter(filt)),
            None if target_recall is None else check_target(target_recall),
        )

    k: int
    probes: int | None
    rerank_factor: int | None
    filter: FilterKey
    target_recall: float | None = None


@functools.lru_cache(maxsize=64)
def _plain_key(k: int) -> BatchKey:
    """The key of a call that leaves every parameter but ``k`` to the index (checked)."""
    return BatchKey(check_k(k), None, None, FilterKey(None), None)
