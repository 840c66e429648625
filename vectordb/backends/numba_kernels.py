"""Compiled CPU kernels of the code scan (numba): plane dots, RaBitQ estimates and the
selection of each query's best candidates, in one pass over the probed codes.

Pure functions over arrays, compiled once and cached next to this module
(``cache=True``), run without the GIL (``nogil=True``) so that threads scale. They do the
float32 steps of ``core.codes.estimate`` and ``core.codes.radius`` in the same order, and
key candidates as ``core.topk.keys_of`` does, so they pick the same candidates as the NumPy
backend, bit for bit (no ``fastmath``: it would reorder the steps).

Importing this module imports numba; only :mod:`vectordb.backends.numba_backend` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = [
    "best_rows",
    "compact_rows",
    "pair_terms",
    "plane_dots",
    "quantize",
    "route_flat",
    "scan_codes",
    "within_bound",
]

log = logging.getLogger("vectordb")


def _njit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, **options)``; where numba finds no writable cache directory
    (``__pycache__`` here, then the user's cache), uncached, with one log line: the kernels
    then compile again in every process (a second or two at its first search)."""

    def decorate(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if not _uncached:
                log.warning("numba cannot cache its kernels (%s); set NUMBA_CACHE_DIR", exc)
            _uncached.append(fn.__name__)
            return numba.njit(cache=False, **options)(fn)

    return decorate


_uncached: list[str] = []

_SIGN = np.uint32(0x80000000)
_NO_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)
_FMAX = np.float32(np.finfo(np.float32).max)
_TWO = np.float32(2.0)
_ZERO = np.float32(0.0)


def _ctpop(typingctx: Any, x: Any) -> Any:
    """``popcount(x)`` of a uint64 through LLVM's ``ctpop`` (one instruction, or a vector
    sequence where the loop is vectorised); numba has no popcount of its own."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


_popcount: Any = intrinsic(_ctpop)


@_njit(nogil=True, inline="always")
def _dot4(c: Any, p0: Any, p1: Any, p2: Any, p3: Any) -> Any:
    """``sum_j 2^j popcount(c & p_j)`` of one code word with four plane words."""
    return (
        _popcount(c & p0)
        + (_popcount(c & p1) << np.uint64(1))
        + (_popcount(c & p2) << np.uint64(2))
        + (_popcount(c & p3) << np.uint64(3))
    )


@_njit(nogil=True)
def plane_dots(planes: Any, codes: Any, out: Any) -> None:
    """``core.codes.plane_dots`` into ``out``.

    Parameters
    ----------
    planes : (nq, 4, w) uint64 query bit planes
    codes : (w, m) uint64 word-major codes
    out : (nq, m) uint32, overwritten with ``T``
    """
    nq = planes.shape[0]
    w, m = codes.shape
    for qi in range(nq):
        row = out[qi]
        row[:] = 0
        for k in range(w):
            p0, p1, p2, p3 = planes[qi, 0, k], planes[qi, 1, k], planes[qi, 2, k], planes[qi, 3, k]
            ck = codes[k]
            for s in range(m):
                row[s] += np.uint32(_dot4(ck[s], p0, p1, p2, p3))


# Sums in float64 of exact float32 products, rounded once: the order of summation is free
# (``reassoc`` lets LLVM vectorise it) and the float32 result is core.codes.pair_terms's.
@_njit(nogil=True, fastmath={"reassoc"})
def pair_terms(
    q: Any, centroids: Any, leaf_nodes: Any, leaves: Any, ip: bool, p: Any, r_q: Any
) -> None:
    """``core.codes.pair_terms`` of every probed (query, leaf) pair, into ``p`` and ``r_q``.

    Parameters
    ----------
    q : (nq, D) float32 rotated queries
    centroids : (n_nodes, D) float32 node centroids (rotated)
    leaf_nodes : (n_leaves,) int64 node of each leaf
    leaves : (nq, L) int64 probed leaves, ``-1`` padded
    ip : whether the metric is inner product (``p = -<c, q>``; else ``|q - c|^2``)
    p, r_q : (nq, L) float32, overwritten (0 where ``leaves`` is ``-1``)
    """
    nq, n_probed = leaves.shape
    dim = q.shape[1]
    for qi in range(nq):
        qq = q[qi]
        for j in range(n_probed):
            leaf = leaves[qi, j]
            if leaf < 0:
                p[qi, j] = 0.0
                r_q[qi, j] = 0.0
                continue
            c = centroids[leaf_nodes[leaf]]
            sq = 0.0
            dot = 0.0
            for d in range(dim):
                r = np.float64(qq[d] - c[d])
                sq += r * r
                dot += np.float64(qq[d]) * np.float64(c[d])
            p[qi, j] = np.float32(-dot) if ip else np.float32(sq)
            r_q[qi, j] = np.float32(np.sqrt(sq))


@_njit(nogil=True)
def quantize(q: Any, origin: Any, levels: int, root_d_12: Any, planes: Any, terms: Any) -> None:
    """``core.codes.quantize_queries`` of ``q - origin``: the same float32 steps.

    Parameters
    ----------
    q : (nq, D) float32 rotated queries, ``D = 64 * w``
    origin : (D,) float32 the point queries are quantised around
    levels : ``2**QUERY_BITS - 1`` (4 planes)
    root_d_12 : float32 ``sqrt(D / 12)``
    planes : (nq, 4, w) uint64, overwritten with the bit planes
    terms : (4, nq) float32, overwritten with ``lo``, ``delta``, ``total``, ``slack``
    """
    nq, dim = q.shape
    w = planes.shape[2]
    x = np.empty(dim, dtype=np.float32)
    top = np.float32(levels)
    for qi in range(nq):
        for d in range(dim):
            x[d] = q[qi, d] - origin[d]
        lo = x.min()
        delta = (x.max() - lo) / top
        if not delta > _ZERO:
            delta = np.float32(1.0)
        total = 0
        for k in range(w):
            b0 = np.uint64(0)
            b1 = np.uint64(0)
            b2 = np.uint64(0)
            b3 = np.uint64(0)
            for i in range(64):
                v = np.rint((x[64 * k + i] - lo) / delta)
                v = min(max(v, _ZERO), top)
                u = np.uint64(v)
                total += u
                bit = np.uint64(i)
                b0 |= (u & np.uint64(1)) << bit
                b1 |= ((u >> np.uint64(1)) & np.uint64(1)) << bit
                b2 |= ((u >> np.uint64(2)) & np.uint64(1)) << bit
                b3 |= ((u >> np.uint64(3)) & np.uint64(1)) << bit
            planes[qi, 0, k] = b0
            planes[qi, 1, k] = b1
            planes[qi, 2, k] = b2
            planes[qi, 3, k] = b3
        terms[0, qi] = lo
        terms[1, qi] = delta
        terms[2, qi] = np.float32(total)
        terms[3, qi] = delta * root_d_12


@_njit(nogil=True, inline="always")
def _replace_top(heap: Any, heap_radius: Any, key: Any, radius: Any) -> None:
    """Replace the largest key of the max-heap ``heap`` by ``key`` (smaller), moving each
    key's radius with it."""
    m = heap.shape[0]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= m:
            break
        if c + 1 < m and heap[c + 1] > heap[c]:
            c += 1
        if heap[c] <= key:
            break
        heap[i] = heap[c]
        heap_radius[i] = heap_radius[c]
        i = c
    heap[i] = key
    heap_radius[i] = radius


@_njit(nogil=True, inline="always")
def _worst(key: Any, scratch: Any, scratch_bits: Any) -> Any:
    """A float32 threshold that rejects exactly the scores whose keys cannot beat ``key``
    (the heap's largest): its score (``core.topk.scores_of``), or ``inf`` for ``NO_KEY``
    and for ``FMAX``, where a clamped ``inf`` still ties and goes to the row."""
    if key == _NO_KEY:
        return np.float32(np.inf)
    ordered = np.uint32(key >> np.uint64(32))
    scratch_bits[0] = ordered ^ _SIGN if ordered & _SIGN else ~ordered
    score = scratch[0]
    return np.float32(np.inf) if score >= _FMAX else score


@_njit(nogil=True)
def scan_codes(
    planes: Any,
    lo: Any,
    delta: Any,
    total: Any,
    slack: Any,
    p: Any,
    r_q: Any,
    leaves: Any,
    offsets: Any,
    codes: Any,
    factors: Any,
    rows: Any,
    row_ok: Any,
    longest: int,
    heap: Any,
    heap_radius: Any,
) -> None:
    """Scan one part's codes in the probed leaves and keep each query's best keys.

    Parameters
    ----------
    planes : (nq, 4, w) uint64 query bit planes (``core.codes.QueryCodes``)
    lo, delta, total, slack : (nq,) float32 query terms
    p, r_q : (nq, L) float32 pair terms of each query with each probed leaf
        (``core.codes.pair_terms``)
    leaves : (nq, L) int64 probed leaves, ``-1`` padded
    offsets : (n_leaves + 1,) int64 slot range of each leaf in this part
    codes : (w, s) uint64 word-major codes of the part
    factors : (4, s) float32 factors A, M, B, E of the part
    rows : (s,) int64 storage row of each slot, or (0,) when slot ``s`` is row ``s``
    row_ok : (R,) bool over storage rows, or (0,) for all
    longest : at least the most slots any leaf holds in this part
    heap : (nq, m) uint64 max-heaps of ``topk`` keys, updated in place (start them at
        ``NO_KEY``; several parts may be scanned into the same heaps)
    heap_radius : (nq, m) float32 radius of each heap key, moved with it
    """
    nq, n_leaves_probed = leaves.shape
    w = codes.shape[0]
    t = np.empty(longest, dtype=np.uint64)
    est = np.empty(longest, dtype=np.float32)
    bits = est.view(np.uint32)
    mapped = rows.shape[0] > 0
    masked = row_ok.shape[0] > 0
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    for qi in range(nq):
        top = heap[qi]
        top_radius = heap_radius[qi]
        worst = _worst(top[0], scratch, scratch_bits)
        lo_q, delta_q, total_q, slack_q = lo[qi], delta[qi], total[qi], slack[qi]
        for j in range(n_leaves_probed):
            leaf = leaves[qi, j]
            if leaf < 0:
                continue
            a = offsets[leaf]
            n = offsets[leaf + 1] - a
            if n == 0:
                continue
            # Slices, indexed from 0: numba then drops the negative-index checks and LLVM
            # vectorises the loops (3.5x faster than indexing at a + s).
            tt = t[:n]
            tt[:] = 0
            for k in range(w):
                p0, p1, p2, p3 = (
                    planes[qi, 0, k],
                    planes[qi, 1, k],
                    planes[qi, 2, k],
                    planes[qi, 3, k],
                )
                ck = codes[k, a : a + n]
                for s in range(n):
                    tt[s] += _dot4(ck[s], p0, p1, p2, p3)
            f_a, f_m = factors[0, a : a + n], factors[1, a : a + n]
            f_b, f_e = factors[2, a : a + n], factors[3, a : a + n]
            p_q = p[qi, j]
            # core.codes.estimate, step by step in float32 (clamped below, where it matters),
            # counting the rows not above the heap's worst (NaN among them): most leaves
            # past the first few have none, and skip the loop that keys rows one by one.
            hits = 0
            for s in range(n):
                x = np.float32(tt[s]) * _TWO
                x = x - total_q
                x = x * delta_q
                x = x * f_m[s]
                x = x - f_a[s]
                x = x - p_q
                x = x + f_b[s] * lo_q
                x = -x + _ZERO  # -0.0 -> +0.0, as keys_of
                est[s] = x
                hits += 0 if x > worst else 1
            if hits == 0:
                continue
            rq = r_q[qi, j]
            slot_rows = rows[a : a + n] if mapped else rows
            for s in range(n):
                # Most rows score above the heap's worst: one float comparison rejects them.
                # (Clamping is monotone, so a row above it stays above once clamped; NaN
                # compares false and goes on.)
                x = est[s]
                if x > worst:
                    continue
                row = slot_rows[s] if mapped else a + s
                if masked and not row_ok[row]:
                    continue
                if not np.isfinite(x):  # core.topk.clamp_scores
                    est[s] = -_FMAX if x < _ZERO else _FMAX
                b = bits[s]
                ordered = ~b if b & _SIGN else b | _SIGN
                key = (np.uint64(ordered) << np.uint64(32)) | np.uint64(row)
                if key < top[0]:
                    bound = f_e[s] * rq
                    bound = bound + f_m[s] * slack_q
                    _replace_top(top, top_radius, key, bound)
                    worst = _worst(top[0], scratch, scratch_bits)


# Fast scores: any summation order is within route.rounding_bound of the exact ones, and
# the choice is trusted only where that cannot change it.
@_njit(nogil=True, fastmath={"reassoc", "contract"})
def route_flat(
    q: Any, centroids: Any, c_sq: Any, ip: bool, c_max: float, unit: float, leaves: Any, unsure: Any
) -> None:
    """The ``keep`` leaves of best routing scores (``route.leaf_scores``) per query, where
    the rounding of the scores cannot change which: ``route``'s leaves.

    Parameters
    ----------
    q : (nq, D) float32 rotated queries
    centroids : (n_leaves, D) float32 leaf centroids; ``c_sq`` (n_leaves,) their squared
        norms
    ip : inner-product scores (``-<c, q>``; else ``|c|^2 - 2 <c, q>``)
    c_max : the largest centroid norm; ``unit`` float32's unit roundoff: each query's
        ``route.rounding_bound`` is taken from them (in float64)
    leaves : (nq, keep) int64, overwritten with the leaves, ascending; ``keep < n_leaves``
    unsure : (nq,) bool, overwritten: the ``keep``-th and ``keep + 1``-th scores lie within
        twice the bound (the caller routes those queries the exact way)
    """
    nq, dim = q.shape
    n_leaves = centroids.shape[0]
    keep = leaves.shape[1]
    heap = np.empty(keep + 1, dtype=np.uint64)  # max-heap of (score, leaf) keys
    no_radius = np.empty(keep + 1, dtype=np.float32)
    score = np.empty(1, dtype=np.float32)
    score_bits = score.view(np.uint32)
    gamma = dim * unit / (1.0 - dim * unit)
    for qi in range(nq):
        qq = q[qi]
        q_sq = 0.0
        for d in range(dim):
            q_sq += np.float64(qq[d]) * np.float64(qq[d])
        qc = np.sqrt(q_sq) * c_max
        err = gamma * qc if ip else 2.0 * gamma * qc + 2.0 * unit * (c_max * c_max + 2.0 * qc)
        bound = np.float32(4.0 * err)
        heap[:] = _NO_KEY
        for leaf in range(n_leaves):
            c = centroids[leaf]
            dot = np.float32(0.0)
            for d in range(dim):
                dot += c[d] * qq[d]
            score[0] = (-dot if ip else c_sq[leaf] - _TWO * dot) + _ZERO
            b = score_bits[0]
            ordered = ~b if b & _SIGN else b | _SIGN
            key = (np.uint64(ordered) << np.uint64(32)) | np.uint64(leaf)
            if key < heap[0]:
                _replace_top(heap, no_radius, key, _ZERO)
        first_dropped = _score_of(heap[0], score, score_bits)
        last_kept = -np.float32(np.inf)
        for j in range(1, keep + 1):
            last_kept = max(last_kept, _score_of(heap[j], score, score_bits))
            leaves[qi, j - 1] = np.int64(heap[j] & np.uint64(0xFFFFFFFF))
        leaves[qi].sort()
        unsure[qi] = not (last_kept + _TWO * bound < first_dropped)


@_njit(nogil=True, inline="always")
def _score_of(key: Any, scratch: Any, scratch_bits: Any) -> Any:
    """``core.topk.scores_of`` of one key (``inf`` for ``NO_KEY``)."""
    if key == _NO_KEY:
        return np.float32(np.inf)
    ordered = np.uint32(key >> np.uint64(32))
    scratch_bits[0] = ordered ^ _SIGN if ordered & _SIGN else ~ordered
    return scratch[0]


@_njit(nogil=True)
def within_bound(keys: Any, radius: Any, k: int, out: Any) -> None:
    """``core.topk.within_bound`` into ``out`` ``(nq, m)`` int64: the same float32 steps.

    ``keys`` ``(nq, m)`` uint64, ``radius`` ``(nq, m)`` float32, ``m > k >= 1``.
    """
    nq, m = keys.shape
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    est = np.empty(m, dtype=np.float32)
    upper = np.empty(m, dtype=np.float32)
    for qi in range(nq):
        for j in range(m):
            est[j] = _score_of(keys[qi, j], scratch, scratch_bits)
            upper[j] = est[j] + radius[qi, j]
        kth = np.sort(upper)[k - 1]  # NaN last, as np.partition
        for j in range(m):
            key = keys[qi, j]
            if key == _NO_KEY or est[j] - radius[qi, j] > kth:
                out[qi, j] = -1
            else:
                out[qi, j] = np.int64(key & np.uint64(0xFFFFFFFF))


@_njit(nogil=True)
def best_rows(dist: Any, rows: Any, k: int, out_rows: Any, out_dist: Any) -> None:
    """The rerank's choice (``search.rerank``): the ``k`` best ``(distance, row)`` keys of
    each query, ascending.

    Parameters
    ----------
    dist : (nq, m) float32 exact distances (``inf`` where ``rows`` is ``-1``)
    rows : (nq, m) int64 candidate rows, ``-1`` for none
    k : results per query, ``<= out_rows.shape[1]``
    out_rows : (nq, k) int64, overwritten: best first, ``-1`` where the distance is
        ``inf`` or no candidate is left
    out_dist : (nq, k) float32, overwritten: ascending, ``inf`` padded
    """
    nq, m = rows.shape
    bits = np.empty(m, dtype=np.float32)
    as_int = bits.view(np.uint32)
    keys = np.empty(m, dtype=np.uint64)
    for qi in range(nq):
        n = 0
        for j in range(m):
            row = rows[qi, j]
            if row < 0:
                continue
            bits[n] = dist[qi, j] + _ZERO  # -0.0 -> +0.0, as keys_of
            b = as_int[n]
            ordered = ~b if b & _SIGN else b | _SIGN
            keys[n] = (np.uint64(ordered) << np.uint64(32)) | np.uint64(row)
            n += 1
        chosen = np.sort(keys[:n])
        for j in range(k):
            if j < n:
                key = chosen[j]
                ordered = np.uint32(key >> np.uint64(32))
                as_int[0] = ordered ^ _SIGN if ordered & _SIGN else ~ordered
                d = bits[0]
                out_dist[qi, j] = d
                out_rows[qi, j] = -1 if np.isinf(d) else np.int64(key & np.uint64(0xFFFFFFFF))
            else:
                out_dist[qi, j] = np.inf
                out_rows[qi, j] = -1


@_njit(nogil=True)
def compact_rows(rows: Any, out: Any) -> None:
    """Each row of ``rows`` ``(nq, m)`` int64 with its ``-1`` entries moved to the end, in
    order, into ``out`` ``(nq, w)`` (``w`` at least the most valid entries of a row; the rest
    ``-1``)."""
    nq, m = rows.shape
    w = out.shape[1]
    for qi in range(nq):
        n = 0
        for j in range(m):
            if rows[qi, j] >= 0:
                out[qi, n] = rows[qi, j]
                n += 1
        for j in range(n, w):
            out[qi, j] = -1
