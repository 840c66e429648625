"""Merge the shards' top-k answers into the global top-k (pure array code).

Every shard returns its own exact-distance top ``k`` (padded with id ``-1`` and distance
``+inf``, as the index pads), so the global top ``k`` is among the ``shards * k``
candidates: sort them by distance, ties by id (so the answer does not depend on which
shard answered first), padding after every real result, and keep ``k``.
"""

from __future__ import annotations

import numpy as np

from .._types import F32, I64

__all__ = ["merge_topk", "padding"]


def padding(nq: int, k: int) -> tuple[I64, F32]:
    """An empty answer: ``(nq, k)`` ids ``-1`` and distances ``+inf``."""
    return np.full((nq, k), -1, dtype=np.int64), np.full((nq, k), np.inf, dtype=np.float32)


def merge_topk(ids: I64, dists: F32, k: int) -> tuple[I64, F32]:
    """The ``k`` best of each row of the shards' answers.

    Parameters
    ----------
    ids : (shards, nq, k_s) int64, ``-1`` for padding
    dists : (shards, nq, k_s) float32, ``+inf`` for padding
    k : int >= 1; may exceed ``shards * k_s`` (the rest is padding)

    Returns
    -------
    ids : (nq, k) int64, distances : (nq, k) float32 ascending; equal distances in
    ascending id order, padding last. Ids are assumed distinct across shards (each id
    lives in one shard).
    """
    shards, nq, ks = ids.shape
    flat_ids = np.transpose(ids, (1, 0, 2)).reshape(nq, shards * ks)
    flat_d = np.transpose(dists, (1, 0, 2)).reshape(nq, shards * ks)
    pad = flat_ids < 0
    # lexsort: the last key is the primary one.
    order = np.lexsort((flat_ids, flat_d, pad), axis=-1)[:, :k]
    out_ids = np.take_along_axis(flat_ids, order, axis=1)
    out_d = np.take_along_axis(flat_d, order, axis=1).astype(np.float32, copy=False)
    out_pad = np.take_along_axis(pad, order, axis=1)
    out_ids = np.where(out_pad, np.int64(-1), out_ids)
    out_d = np.where(out_pad, np.float32(np.inf), out_d)
    if out_ids.shape[1] < k:
        more_ids, more_d = padding(nq, k - out_ids.shape[1])
        out_ids = np.concatenate([out_ids, more_ids], axis=1)
        out_d = np.concatenate([out_d, more_d], axis=1)
    return np.ascontiguousarray(out_ids), np.ascontiguousarray(out_d, dtype=np.float32)
