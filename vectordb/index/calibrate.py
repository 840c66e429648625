"""Calibrated search defaults: how many leaves a query probes to reach a target recall.

A build (and a compaction) searches a sample of the index's own vectors, each as a query
that leaves itself out, at a ladder of ``probes``, and measures recall@10 against their
exact neighbours by brute force. The curve is saved with the index (manifest
``params.calibration``); a search without ``probes`` takes the smallest ladder step whose
recall reaches its ``target_recall`` (default the build's, 0.95) plus ``MARGIN``. An index
saved before calibration existed is calibrated when opened (one brute-force pass over its
vectors); ``FALLBACK_PROBES`` is left for indexes too small to calibrate.

The other default is the rerank: without ``rerank_factor``, up to ``k * BOUNDED_RERANK``
candidates are kept and only those inside the estimator's error bound of the ``k``-th
(``core.topk.within_bound``) are reranked. An explicit ``rerank_factor`` reranks exactly
``k * rerank_factor`` candidates, unpruned (the seed's behaviour, and the exact mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._types import F32, I64
from .._validation import positive_int
from ..core.metrics import distances, pairwise_distances
from ..errors import InvalidParameterError
from ..storage.memory import reading_in_order
from .state import BOUNDED_RERANK, IndexState

__all__ = [
    "BOUNDED_RERANK",
    "DEFAULT_TARGET",
    "FALLBACK_PROBES",
    "LADDER",
    "MARGIN",
    "MIN_PROBES",
    "calibrate",
    "calibrate_into",
    "check_target",
    "probes_for",
    "settings",
]

#: Recall@10 a search without ``probes`` aims at, unless the build or the call says another.
DEFAULT_TARGET = 0.95
#: ``probes`` of an index without a calibration (saved by an earlier version).
FALLBACK_PROBES = 16
#: The ``probes`` measured (steps of about 1.5x), up to the number of leaves; a target between
#: two steps is interpolated (recall rises smoothly with log(probes)).
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
#: The index's own vectors, each leaving itself out, were up to 0.015 easier queries than
#: held-out ones (fashion-mnist 0.970 vs 0.954 at 4 probes, glove-50 0.969 vs 0.955 at 48;
#: pydocs-minilm and synthetic data the other way or even): the calibration aims that much
#: above the target.
MARGIN = 0.015
#: Never fewer leaves by default: calibration queries are the index's own vectors, and a
#: question asked of stored statements (a chatbot's) lies farther from all of them; on a
#: small index one leaf's luck decides it, and large ones calibrate to more anyway.
MIN_PROBES = 4
#: Recall is measured at this k (the common case; a larger k needs somewhat more probes).
CALIBRATION_K = 10
#: Sample queries: at most this many, fewer for huge indexes (brute force costs n * d each).
_MAX_QUERIES = 200
_MIN_QUERIES = 50
_BRUTE_FORCE_FLOPS = 2e10
#: The ladder stops at this recall: the steps past it cost most and few targets need them.
_ENOUGH = 0.995


def check_target(value: Any) -> float:
    """``value`` as a recall in ``(0, 1]`` (``InvalidParameterError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise InvalidParameterError(f"target_recall must be a number in (0, 1], got {value!r}")
    target = float(value)
    if not 0.0 < target <= 1.0:
        raise InvalidParameterError(f"target_recall must lie in (0, 1], got {value!r}")
    return target


#: ``probes_for``'s last answer and its question, the calibration by identity (a new
#: calibration is a new dict, never one changed in place): searches at the defaults ask the
#: same question thousands of times a second.
_last_probes: tuple[Mapping[str, Any], float, int | None, int] | None = None


def probes_for(
    calibration: Mapping[str, Any] | None, target: float, n_leaves: int | None = None
) -> int:
    """The ``probes`` whose calibrated recall reaches ``target + MARGIN`` (or the best
    recall measured, if lower), interpolated between ladder steps, at least
    ``MIN_PROBES``; ``FALLBACK_PROBES`` without a calibration. With ``n_leaves``, scaled by
    how much the tree grew since (adds split leaves), so that the share of leaves probed
    stays."""
    global _last_probes
    if not calibration:
        return FALLBACK_PROBES
    last = _last_probes
    if last is not None and last[0] is calibration and last[1] == target and last[2] == n_leaves:
        return last[3]
    ladder, recall = calibration["probes"], calibration["recall"]
    aim = min(target + MARGIN, max(recall))
    i = next(i for i, got in enumerate(recall) if got >= aim)
    probes = float(ladder[i])
    if i > 0 and recall[i] > recall[i - 1]:
        below, above = float(ladder[i - 1]), float(ladder[i])
        share = (aim - recall[i - 1]) / (recall[i] - recall[i - 1])
        probes = below * (above / below) ** share
    if n_leaves is not None and n_leaves > calibration["leaves"]:
        probes *= n_leaves / calibration["leaves"]
    answer = max(MIN_PROBES, math.ceil(probes - 1e-9))
    _last_probes = (calibration, target, n_leaves, answer)
    return answer


def settings(
    params: Mapping[str, Any], probes: Any, rerank_factor: Any, target_recall: Any, n_leaves: int
) -> tuple[int, int | None]:
    """A search's ``probes`` and ``rerank_factor`` (``None``: bounded), checked, with the
    index's ``params`` (and its tree's ``n_leaves`` now) deciding what the call left out."""
    if probes is not None:
        if target_recall is not None:
            raise InvalidParameterError("give probes or target_recall, not both")
        probes = positive_int("probes", probes)
    else:
        default = params.get("target_recall", DEFAULT_TARGET)
        target = check_target(default if target_recall is None else target_recall)
        probes = probes_for(params.get("calibration"), target, n_leaves)
    if rerank_factor is not None:
        rerank_factor = positive_int("rerank_factor", rerank_factor)
    return probes, rerank_factor


def calibrate(state: IndexState, seed: int) -> dict[str, Any] | None:
    """The recall@10 curve of ``state`` over ``LADDER`` (see the module docstring), as
    saved: ``{"k": 10, "probes": [...], "recall": [...], "n": live vectors, "leaves": leaves}``;
    ``None`` for indexes too small to need one (at most ``k + 1`` vectors, or one leaf)."""
    live = state.live_rows_of(state.idmap.items()[0])
    n, n_leaves = int(live.shape[0]), state.tree.n_leaves
    if n <= CALIBRATION_K + 1 or n_leaves < 2:
        return None
    dim = state.quantizer.dim
    count = int(np.clip(_BRUTE_FORCE_FLOPS / (2 * n * dim), _MIN_QUERIES, _MAX_QUERIES))
    rng = np.random.default_rng([seed, n])
    sample = np.sort(rng.choice(live, size=min(count, n), replace=False))
    q = state.storage.take(sample)
    with reading_in_order(state.storage):  # a brute force: every live row, in order
        kth = _kth_distance(state, q, live, sample)
    ladder = [p for p in LADDER if p < n_leaves] + [n_leaves]
    probes_out: list[int] = []
    recall_out: list[float] = []
    for probes in ladder:
        rows, dists = state.search_rows(q, CALIBRATION_K + 1, probes, None)
        dists = np.where(rows == sample[:, None], np.inf, dists)  # itself, if found
        # A row as near as the k-th true neighbour is one of the k nearest (ties count).
        slack = np.abs(kth) * np.float32(1e-5) + np.float32(1e-6)  # ip distances are < 0
        inside = dists <= (kth + slack)[:, None]
        recall = float(np.minimum(inside.sum(axis=1), CALIBRATION_K).sum())
        recall /= CALIBRATION_K * q.shape[0]
        probes_out.append(int(probes))
        recall_out.append(round(recall, 4))
        if recall >= _ENOUGH:
            break
    return {
        "k": CALIBRATION_K,
        "probes": probes_out,
        "recall": recall_out,
        "n": n,
        "leaves": int(n_leaves),
    }


def calibrate_into(params: dict[str, Any], state: IndexState, *, if_stale: bool = False) -> None:
    """Store the calibration of ``state`` in ``params`` (or remove a stale one). With
    ``if_stale``, only when there is none (a new build, an index saved by an earlier
    version) or the live vectors doubled or halved since (writes call it so: their cost
    stays amortised, like a merge)."""
    old = params.get("calibration")
    live = len(state.idmap)
    if if_stale and old is not None and old["n"] < 2 * live and live < 2 * old["n"]:
        return
    curve = calibrate(state, int(params.get("seed", 0)))
    if curve is None:
        params.pop("calibration", None)
    else:
        params["calibration"] = curve


def _kth_distance(state: IndexState, q: F32, live: I64, sample: I64) -> F32:
    """``(s,)`` float32: each sample row's exact distance to its k-th nearest other live
    row. A brute force by matrix products finds the nearest ``k + _SPARE`` (block by
    block), then the rerank's own arithmetic measures them: the products' expansion
    ``|x|^2 - 2 <x, q> + |q|^2`` loses precision on data far from zero."""
    k = CALIBRATION_K
    keep = k + _SPARE
    best_d = np.full((q.shape[0], 0), np.inf, dtype=np.float32)
    best_r = np.full((q.shape[0], 0), -1, dtype=np.int64)
    # Bytes of one block: its distances (nq per row) and its gathered rows (dim per row).
    block = max(1, (64 << 20) // (4 * (q.shape[0] + q.shape[1])))
    for start in range(0, live.shape[0], block):
        rows = live[start : start + block]
        d = pairwise_distances(q, state.storage.take(rows), state.metric)
        state.storage.release(int(rows[0]), int(rows[-1]) + 1)  # read once: not kept mapped
        d[rows[None, :] == sample[:, None]] = np.inf  # leave the query itself out
        both_d = np.concatenate([best_d, d], axis=1)
        both_r = np.concatenate([best_r, np.broadcast_to(rows, d.shape)], axis=1)
        if both_d.shape[1] > keep:
            pick = np.argpartition(both_d, keep - 1, axis=1)[:, :keep]
            both_d = np.take_along_axis(both_d, pick, axis=1)
            both_r = np.take_along_axis(both_r, pick, axis=1)
        best_d, best_r = both_d, both_r
    found = best_r >= 0
    vecs = state.storage.take(np.where(found, best_r, 0).ravel()).reshape(*best_r.shape, -1)
    exact = distances(q, vecs, state.metric, overwrite_x=True)
    exact[~found | ~np.isfinite(best_d)] = np.inf
    return np.sort(exact, axis=1)[:, k - 1]


#: Candidates beyond k that the brute force passes to the exact measurement.
_SPARE = 10
