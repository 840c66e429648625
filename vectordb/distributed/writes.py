"""Writes and reads by id of a sharded index: which shard owns an id, one writer a shard.

* ``hash`` placement: an id lives in shard ``splitmix64(id) % shards``, whatever its vector.
* ``kmeans`` placement: a new vector goes to the shard of its nearest centroid; an id is
  found by asking every shard (``contains``), and an ``upsert`` that moves an id to
  another shard deletes it from the old one first (with its metadata: give the metadata
  again), so no search ever sees it twice.

Writes are serialised (one at a time for the whole engine) and checked before anything is
sent (dimension, ids taken or unknown), so a bad write changes nothing. A write that spans
shards is applied shard by shard, each part atomic and durable on its shard; if a shard
becomes unavailable meanwhile (``ShardUnavailableError``), the other shards' parts stay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._types import F32, I64
from .._validation import as_matrix
from ..core.metrics import prepare
from ..errors import DuplicateIdError, InvalidParameterError, UnknownIdError
from ..storage.idmap import as_ids, check_new_ids
from ..storage.metadata import encode_documents
from .layout import ShardLayout
from .placement import assign_shards, hash_shards
from .replicas import ShardGroup

__all__ = ["ShardWriter"]

Documents = Sequence[Mapping[str, Any] | None] | None


async def _all(calls: list[Any]) -> list[Any]:
    """Await every call (so none is left running), then raise the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


class ShardWriter:
    """The writes and reads by id of one :class:`ShardedEngine` (see the module docstring)."""

    def __init__(self, groups: list[ShardGroup], layout: ShardLayout, next_id: int) -> None:
        self._groups, self._layout = groups, layout
        self._next_id = next_id
        self.lock = asyncio.Lock()

    def owners(self, x: F32, ids: I64) -> I64:
        """``(n,)`` shard numbers of new rows ``x`` ``(n, d)`` (as given) with ``ids``."""
        if self._layout.centroids is None:
            return hash_shards(ids, self._layout.shards)
        return assign_shards(prepare(x, self._layout.metric), self._layout.centroids)

    async def locate(self, ids: I64) -> I64:
        """``(n,)`` the shard holding each id now, ``-1`` where none does."""
        where = np.full(ids.shape[0], -1, dtype=np.int64)
        if ids.size == 0:
            return where
        if self._layout.centroids is None:
            home = hash_shards(ids, self._layout.shards)
            asked = [(s, np.flatnonzero(home == s)) for s in np.unique(home).tolist()]
        else:
            asked = [(s, np.arange(ids.shape[0])) for s in range(self._layout.shards)]
        found = await _all([self._groups[s].read("contains", ids[rows]) for s, rows in asked])
        for (s, rows), mask in zip(asked, found, strict=True):
            hit = rows[np.asarray(mask, dtype=bool)]
            where[hit[where[hit] < 0]] = s
        return where

    def _docs(self, metadata: Documents, n: int) -> list[Mapping[str, Any] | None] | None:
        """``metadata`` checked as a shard would (before any shard is written to)."""
        if encode_documents(metadata, n) is None or metadata is None:
            return None
        return list(metadata)

    async def _send(
        self, method: str, owners: I64, x: F32, ids: I64, docs: list[Any] | None
    ) -> None:
        calls = []
        for s in np.unique(owners).tolist():
            rows = np.flatnonzero(owners == s)
            part = None if docs is None else [docs[int(i)] for i in rows]
            calls.append(self._groups[s].write(method, x[rows], ids[rows], part))
        await _all(calls)

    async def add(self, vectors: Any, ids: Any, metadata: Documents) -> I64:
        x = as_matrix(vectors, "vectors", self._layout.dim)
        n = x.shape[0]
        docs = self._docs(metadata, n)
        async with self.lock:
            if ids is None:
                new = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            else:
                new = check_new_ids(ids, n)
            where = await self.locate(new)
            if (where >= 0).any():
                i = int(np.flatnonzero(where >= 0)[0])
                raise DuplicateIdError(f"id {int(new[i])} is already in shard {int(where[i])}")
            prepare(x, self._layout.metric)  # a zero row with cosine fails here, not half-way
            await self._send("add", self.owners(x, new), x, new, docs)
            self._next_id = max(self._next_id, int(new.max()) + 1)
            return new

    async def upsert(self, vectors: Any, ids: Any, metadata: Documents) -> I64:
        if ids is None:
            raise InvalidParameterError("upsert needs ids")
        x = as_matrix(vectors, "vectors", self._layout.dim)
        docs = self._docs(metadata, x.shape[0])
        async with self.lock:
            new = check_new_ids(ids, x.shape[0])
            owners = self.owners(x, new)
            if self._layout.centroids is not None:
                where = await self.locate(new)
                moved = (where >= 0) & (where != owners)
                await _all(
                    [
                        self._groups[s].write("delete", new[moved & (where == s)])
                        for s in np.unique(where[moved]).tolist()
                    ]
                )
            await self._send("upsert", owners, x, new, docs)
            self._next_id = max(self._next_id, int(new.max()) + 1)
            return new

    async def delete(self, ids: Any, missing_ok: bool) -> int:
        wanted = np.unique(as_ids(ids))
        async with self.lock:
            where = await self.locate(wanted)
            if not missing_ok and (where < 0).any():
                raise UnknownIdError(f"id {int(wanted[where < 0][0])} is not in the index")
            shards = np.unique(where[where >= 0]).tolist()
            counts = await _all(
                [self._groups[s].write("delete", wanted[where == s]) for s in shards]
            )
            return int(sum(counts))

    async def get_vectors(self, ids: Any) -> F32:
        wanted = as_ids(ids)
        out = np.empty((wanted.shape[0], self._layout.dim), dtype=np.float32)
        if wanted.size == 0:
            return out
        where = await self.locate(wanted)
        if (where < 0).any():
            raise UnknownIdError(f"id {int(wanted[where < 0][0])} is not in the index")
        shards = np.unique(where).tolist()
        found = await _all(
            [self._groups[s].read("get_vectors", wanted[where == s]) for s in shards]
        )
        for s, rows in zip(shards, found, strict=True):
            out[where == s] = rows
        return out

    async def get_metadata(self, id_: int) -> dict[str, Any] | None:
        wanted = as_ids(id_, "id")
        if wanted.shape[0] != 1:
            raise InvalidParameterError("get_metadata takes one id")
        where = await self.locate(wanted)
        if where[0] < 0:
            raise UnknownIdError(f"id {int(wanted[0])} is not in the index")
        result: dict[str, Any] | None = await self._groups[int(where[0])].read(
            "get_metadata", int(wanted[0])
        )
        return result
