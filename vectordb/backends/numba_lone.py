"""The lean path of a few queries through a flat tree, compiled in one piece (numba): route,
quantise, pair terms, code scan, error-bound cut and rerank in one call, with nothing
allocated but the queries' own small arrays.

The stages are the kernels of :mod:`.numba_stages` and :mod:`.numba_kernels`, called in
the order ``search.pipeline.HostSearcher`` runs them, so the results are the staged
searcher's bit for bit; what goes is the Python between the stages (about a third of a lone
query's time at 100k vectors). Where the staged searcher would do more than one call can
(leaves short of rows: the beam widens; more than one part of codes), the caller runs the
stages; a near tie in routing (``UNSURE``) is settled by the caller's exact routing and a
second call with those leaves (``routed``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .numba_kernels import NO_KEY, cached_jit, pair_terms, quantize, row_of, scan_codes
from .numba_stages import rerank_rows, route_flat, within_bound

__all__ = ["DONE", "SHORT", "UNSURE", "search_lone"]

#: What :func:`search_lone` answers: the results are out; a query's probed leaves hold too
#: few rows (the stages widen them); a query's routing needs the exact scores (route it the
#: exact way and call again with ``routed``).
DONE, SHORT, UNSURE = 0, 1, 2


@cached_jit(nogil=True)
def search_lone(
    q: Any,
    rotated: Any,
    leaf_centroids: Any,
    leaf_sq_norms: Any,
    ip: bool,
    c_max: float,
    sizes: Any,
    need: int,
    origin: Any,
    top_level: int,
    code_scale: int,
    slack: Any,
    words: int,
    centroids: Any,
    leaf_nodes: Any,
    offsets: Any,
    codes: Any,
    factors: Any,
    slot_rows: Any,
    row_ok: Any,
    longest: int,
    width: int,
    bound_k: int,
    first: Any,
    second: Any,
    metric: int,
    routed: bool,
    leaves: Any,
    out_rows: Any,
    out_dist: Any,
) -> int:
    """Search ``nq`` queries end to end: ``DONE``, or (outputs unspecified) ``UNSURE``
    where a query's routing is unsure (``route_flat``), ``SHORT`` where its leaves hold
    fewer than ``need`` rows.

    Parameters
    ----------
    q : (nq, d) float32 prepared queries; ``rotated`` (nq, D) float32 their rotations
    leaf_centroids, leaf_sq_norms, ip, c_max, sizes : routing (``route_flat``); ``sizes``
        (n_leaves,) int64 live rows per leaf
    need : rows the probed leaves must hold
    origin, top_level, code_scale, slack : query quantisation (``numba_kernels.quantize``);
        ``words`` uint64 words per bit plane
    centroids, leaf_nodes : pair terms (``numba_kernels.pair_terms``)
    offsets, codes, factors, slot_rows, row_ok, longest : the one part of codes and the
        row mask (``numba_kernels.scan_codes``)
    width : candidates kept per query (``search.candidates.candidate_width``)
    bound_k : ``k`` of the error-bound cut (``within_bound``); 0 for none (every
        candidate is reranked)
    first, second, metric : the rerank (``rerank_rows``)
    routed : ``leaves`` holds the probed leaves already (``route.route``'s); else they are
        routed here
    leaves : (nq, probes) int64, the probed leaves (overwritten unless ``routed``)
    out_rows, out_dist : (nq, k) int64 and float32, overwritten with the results
    """
    nq = q.shape[0]
    held = np.zeros(nq, dtype=np.int64)
    if routed:
        for qi in range(nq):
            for j in range(leaves.shape[1]):
                held[qi] += sizes[leaves[qi, j]]
    else:
        unsure = np.empty(nq, dtype=np.bool_)
        route_flat(rotated, leaf_centroids, leaf_sq_norms, ip, c_max, sizes, leaves, held, unsure)
        for qi in range(nq):
            if unsure[qi]:
                return UNSURE
    for qi in range(nq):
        if held[qi] < need:
            return SHORT
    planes = np.empty((nq, 4, words), dtype=np.uint64)
    terms = np.empty((4, nq), dtype=np.float32)
    quantize(rotated, origin, top_level, code_scale, slack, planes, terms)
    p = np.empty(leaves.shape, dtype=np.float32)
    r_q = np.empty(leaves.shape, dtype=np.float32)
    pair_terms(rotated, centroids, leaf_nodes, leaves, ip, p, r_q)
    heap = np.full((nq, width), NO_KEY, dtype=np.uint64)
    heap_radius = np.zeros((nq, width), dtype=np.float32)
    scan_codes(
        planes,
        terms[0],
        terms[1],
        terms[2],
        terms[3],
        p,
        r_q,
        leaves,
        offsets,
        codes,
        factors,
        slot_rows,
        row_ok,
        longest,
        heap,
        heap_radius,
    )
    rows = np.empty((nq, width), dtype=np.int64)
    if 0 < bound_k < width:
        within_bound(heap, heap_radius, bound_k, rows)
    else:
        for qi in range(nq):
            for j in range(width):
                rows[qi, j] = row_of(heap[qi, j])
    rerank_rows(q, rows, first, second, metric, out_rows, out_dist)
    return DONE
