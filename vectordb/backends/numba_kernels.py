"""Compiled CPU kernels of the code scan (numba): query quantisation, pair terms, plane
dots, RaBitQ estimates and the selection of each query's best candidates, in one pass over
the probed codes; and what :mod:`.numba_stages` shares with them (the cached ``jit``, the
heap, the key constants).

Pure functions over arrays, compiled once and cached next to this module
(``cache=True``), run without the GIL (``nogil=True``) so that threads scale. They do the
float32 steps of ``core.codes.estimate`` and ``core.codes.radius`` in the same order, and
key candidates as ``core.topk.keys_of`` does, so they pick the same candidates as the NumPy
backend (no ``fastmath`` there: it would reorder the steps). :func:`pair_terms` alone sums
in any order: float64 sums rounded to float32, where another order rounds the other way
about once in 10^8 pairs (crafted inputs aside).

Importing this module imports numba; only the numba backend's modules do.
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
    "FMAX",
    "NO_KEY",
    "SIGN",
    "TWO",
    "ZERO",
    "cached_jit",
    "key_of",
    "pair_terms",
    "plane_dots",
    "prefetch_row",
    "quantize",
    "replace_top",
    "row_of",
    "scan_codes",
    "score_of",
]

log = logging.getLogger("vectordb")


def cached_jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
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

SIGN = np.uint32(0x80000000)
NO_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)
FMAX = np.float32(np.finfo(np.float32).max)
TWO = np.float32(2.0)
ZERO = np.float32(0.0)


def _ctpop(typingctx: Any, x: Any) -> Any:
    """``popcount(x)`` of a uint64 through LLVM's ``ctpop`` (one instruction, or a vector
    sequence where the loop is vectorised); numba has no popcount of its own."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


_popcount: Any = intrinsic(_ctpop)


def _prefetch_to_cache(typingctx: Any, address: Any) -> Any:
    """Hint the CPU to load the cache line at ``address`` (uintp) for reading, into every
    level, through LLVM's ``prefetch``; a hint only (any address, no fault)."""
    sig = types.void(types.uintp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [byte_ptr], fnty)
        read, keep_in_all_levels, data = (ir.Constant(i32, v) for v in (0, 3, 1))
        builder.call(fn, [builder.inttoptr(args[0], byte_ptr), read, keep_in_all_levels, data])
        return context.get_dummy_value()

    return sig, codegen


_prefetch: Any = intrinsic(_prefetch_to_cache)


@cached_jit(nogil=True, inline="always")
def prefetch_row(rows: Any, r: Any) -> None:
    """Hint the CPU to load row ``r`` of the C-contiguous 2-d ``rows`` (every cache line of
    it): scattered rows read one after another then arrive together, not one miss each
    (the code scan gained nothing from it: its leaves are streams the CPU foresees)."""
    size = rows.shape[1] * rows.itemsize
    start = rows.ctypes.data + r * size
    for offset in range(0, size, 64):
        _prefetch(start + offset)


@cached_jit(nogil=True, inline="always")
def _dot4(c: Any, p0: Any, p1: Any, p2: Any, p3: Any) -> Any:
    """``sum_j 2^j popcount(c & p_j)`` of one code word with four plane words."""
    return (
        _popcount(c & p0)
        + (_popcount(c & p1) << np.uint64(1))
        + (_popcount(c & p2) << np.uint64(2))
        + (_popcount(c & p3) << np.uint64(3))
    )


@cached_jit(nogil=True)
def plane_dots(planes: Any, codes: Any, out: Any) -> None:
    """``core.codes.plane_dots`` into ``out``.

    Parameters
    ----------
    planes : (nq, 4, w) uint64 query bit planes
    codes : (code_bits * w, m) uint64 word-major codes
    out : (nq, m) uint32, overwritten with ``T``
    """
    nq, _, w = planes.shape
    rows, m = codes.shape
    for qi in range(nq):
        row = out[qi]
        row[:] = 0
        for c in range(rows):
            k = c % w
            shift = np.uint64(c // w)
            p0, p1, p2, p3 = planes[qi, 0, k], planes[qi, 1, k], planes[qi, 2, k], planes[qi, 3, k]
            ck = codes[c]
            for s in range(m):
                row[s] += np.uint32(_dot4(ck[s], p0, p1, p2, p3) << shift)


# Sums in float64 of exact float32 products, rounded once: the order of summation is free
# (``reassoc`` lets LLVM vectorise it) and the float32 result is core.codes.pair_terms's.
@cached_jit(nogil=True, fastmath={"reassoc"})
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


@cached_jit(nogil=True)
def quantize(
    q: Any, origin: Any, levels: int, code_scale: int, root_d_12: Any, planes: Any, terms: Any
) -> None:
    """``core.query_codes.quantize_queries`` of ``q - origin``: the same float32 steps.

    Parameters
    ----------
    q : (nq, D) float32 rotated queries (``D`` a multiple of 64 when rotated; any ``D``
        without the rotation)
    origin : (D,) float32 the point queries are quantised around
    levels : ``2**QUERY_BITS - 1`` (4 planes)
    code_scale : ``L`` of the codes the queries will score (``core.codes.level_scale``)
    root_d_12 : float32 ``core.query_codes.slack_per_step(D, code_bits)``
    planes : (nq, 4, w) uint64, ``w = ceil(D / 64)``, overwritten with the bit planes
        (padding bits zero, as ``core.codes.pack_signs``)
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
        if not delta > ZERO:
            delta = np.float32(1.0)
        total = np.int64(0)
        for k in range(w):
            b0 = np.uint64(0)
            b1 = np.uint64(0)
            b2 = np.uint64(0)
            b3 = np.uint64(0)
            for i in range(min(64, dim - 64 * k)):
                v = np.rint((x[64 * k + i] - lo) / delta)
                if not v >= ZERO:  # negative, or NaN (a spread past float32): level 0
                    v = ZERO
                u = np.uint64(min(v, top))
                total += np.int64(u)
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
        terms[2, qi] = np.float32(total * code_scale)
        terms[3, qi] = delta * root_d_12


@cached_jit(nogil=True, inline="always")
def replace_top(heap: Any, heap_radius: Any, key: Any, radius: Any) -> None:
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


@cached_jit(nogil=True, inline="always")
def key_of(bits: Any, row: Any) -> Any:
    """``core.topk.keys_of`` of one score, given as its float32 bits (uint32, of the score
    plus 0.0), at storage ``row``."""
    ordered = ~bits if bits & SIGN else bits | SIGN
    return (np.uint64(ordered) << np.uint64(32)) | np.uint64(row)


@cached_jit(nogil=True, inline="always")
def row_of(key: Any) -> Any:
    """``core.topk.rows_of`` of one key: its storage row (int64), ``-1`` for ``NO_KEY``."""
    return np.int64(-1) if key == NO_KEY else np.int64(key & np.uint64(0xFFFFFFFF))


@cached_jit(nogil=True, inline="always")
def score_of(key: Any, scratch: Any, scratch_bits: Any) -> Any:
    """``core.topk.scores_of`` of one key (``inf`` for ``NO_KEY``); ``scratch`` a (1,)
    float32 array and ``scratch_bits`` its uint32 view."""
    if key == NO_KEY:
        return np.float32(np.inf)
    ordered = np.uint32(key >> np.uint64(32))
    scratch_bits[0] = ordered ^ SIGN if ordered & SIGN else ~ordered
    return scratch[0]


@cached_jit(nogil=True, inline="always")
def _worst(key: Any, scratch: Any, scratch_bits: Any) -> Any:
    """A float32 threshold that rejects exactly the scores whose keys cannot beat ``key``
    (the heap's largest): its score, or ``inf`` for ``NO_KEY`` and for ``FMAX``, where a
    clamped ``inf`` still ties and goes to the row."""
    score = score_of(key, scratch, scratch_bits)
    return np.float32(np.inf) if score >= FMAX else score


@cached_jit(nogil=True)
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
    planes : (nq, 4, w) uint64 query bit planes (``core.query_codes.QueryCodes``)
    lo, delta, total, slack : (nq,) float32 query terms
    p, r_q : (nq, L) float32 pair terms of each query with each probed leaf
        (``core.codes.pair_terms``)
    leaves : (nq, L) int64 probed leaves, ``-1`` padded
    offsets : (n_leaves + 1,) int64 slot range of each leaf in this part
    codes : (code_bits * w, s) uint64 word-major codes of the part
    factors : (4, s) float32 factors A, M, B, E of the part
    rows : (s,) int64 storage row of each slot, or (0,) when slot ``s`` is row ``s``
    row_ok : (R,) bool over storage rows, or (0,) for all
    longest : at least the most slots any leaf holds in this part
    heap : (nq, m) uint64 max-heaps of ``topk`` keys, updated in place (start them at
        ``NO_KEY``; several parts may be scanned into the same heaps)
    heap_radius : (nq, m) float32 radius of each heap key, moved with it
    """
    nq, n_leaves_probed = leaves.shape
    w = planes.shape[2]
    code_rows = codes.shape[0]
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
            for c in range(code_rows):
                k = c % w
                shift = np.uint64(c // w)
                p0, p1, p2, p3 = (
                    planes[qi, 0, k],
                    planes[qi, 1, k],
                    planes[qi, 2, k],
                    planes[qi, 3, k],
                )
                ck = codes[c, a : a + n]
                for s in range(n):
                    tt[s] += _dot4(ck[s], p0, p1, p2, p3) << shift
            f_a, f_m = factors[0, a : a + n], factors[1, a : a + n]
            f_b, f_e = factors[2, a : a + n], factors[3, a : a + n]
            p_q = p[qi, j]
            # core.codes.estimate, step by step in float32 (clamped below, where it matters),
            # counting the rows not above the heap's worst (NaN among them): most leaves
            # past the first few have none, and skip the loop that keys rows one by one.
            hits = 0
            for s in range(n):
                x = np.float32(tt[s]) * TWO
                x = x - total_q
                x = x * delta_q
                x = x * f_m[s]
                x = x - f_a[s]
                x = x - p_q
                x = x + f_b[s] * lo_q
                x = -x + ZERO  # -0.0 -> +0.0, as keys_of
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
                    est[s] = -FMAX if x < ZERO else FMAX
                key = key_of(bits[s], row)
                if key < top[0]:
                    bound = f_e[s] * rq
                    bound = bound + f_m[s] * slack_q
                    replace_top(top, top_radius, key, bound)
                    worst = _worst(top[0], scratch, scratch_bits)
