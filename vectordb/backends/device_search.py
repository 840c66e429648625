"""The search stages as array code for any NumPy-compatible namespace ``xp``.

The CuPy backend runs a whole batch on the GPU with these and with its kernels
(``cuda_kernels``): rotate the queries, score the tree's nodes and run wide beams, compute
the query codes against each probed leaf, and take the exact distances of the candidates.
Written against ``xp`` rather than CuPy so the same lines run, and are tested, with NumPy
on machines without a GPU; this module imports neither.

They compute what the NumPy stages compute (:mod:`vectordb.search.route`,
:mod:`vectordb.core.codes`, :mod:`vectordb.search.rerank`), in float32 but without those
stages' batch-independent summation order: a query's floats may differ from the CPU's in
the last bits, so where two leaves or two candidates tie within rounding, either may be
chosen. Plane dots, and the estimates computed from the same query codes, are exact on
both.

Shapes use ``nq`` queries, ``L`` probed leaves per query, ``w`` code words, ``bits`` rotated
dimensions (``64 * w`` after padding), ``d`` stored dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.metrics import Metric
from ..core.query_codes import QUERY_BITS, query_levels

__all__ = [
    "DeviceTree",
    "QueryTerms",
    "beam",
    "candidate_distances",
    "nearest_leaves",
    "node_scores",
    "pack_signs",
    "query_terms",
    "rotate",
    "rows_held",
    "tree_depth",
    "trim",
]

NO_KEY = 0xFFFFFFFFFFFFFFFF
#: Elements of gathered vectors per rerank block: 512 MiB of float32.
_RERANK_BLOCK = 1 << 27


def tree_depth(children: np.ndarray) -> int:
    """Levels below the root of the deepest leaf, for ``children`` ``(n_nodes, B)`` int64."""
    depth, frontier = 0, np.array([0])
    while True:
        nxt = children[frontier].ravel()
        nxt = nxt[nxt >= 0]
        if nxt.shape[0] == 0:
            return depth
        depth, frontier = depth + 1, nxt


@dataclass(frozen=True)
class DeviceTree:
    """A :class:`vectordb.core.tree.Tree` as ``xp`` arrays.

    Attributes
    ----------
    centroids : (n_nodes, bits) float32, rotated
    c_sq : (n_nodes,) float32 squared centroid norms
    children : (n_nodes + 1, B) int64; the last row, for "no node", is all ``-1``
    leaf_of_node : (n_nodes,) int64
    leaf_nodes : (n_leaves,) int64
    depth : levels below the root (0: the root is the only leaf)
    """

    centroids: Any
    c_sq: Any
    children: Any
    leaf_of_node: Any
    leaf_nodes: Any
    depth: int

    @classmethod
    def upload(cls, xp: Any, tree: Any) -> DeviceTree:
        """Copy ``tree`` (a :class:`vectordb.core.tree.Tree`) into ``xp`` arrays."""
        none = np.full((1, tree.children.shape[1]), -1, dtype=np.int64)
        return cls(
            centroids=xp.asarray(tree.centroids),
            c_sq=xp.asarray(tree.centroid_sq_norms),
            children=xp.asarray(np.concatenate([tree.children, none])),
            leaf_of_node=xp.asarray(tree.leaf_of_node),
            leaf_nodes=xp.asarray(tree.leaf_nodes),
            depth=0 if tree.leaf_of_node[0] >= 0 else tree_depth(tree.children),
        )

    @property
    def n_nodes(self) -> int:
        return int(self.centroids.shape[0])


def rotate(xp: Any, x: Any, perm: Any, blocks_t: Any, bits: int) -> Any:
    """Rotate rows as ``Quantizer.rotate`` does: ``(n, d)`` -> ``(n, bits)`` float32.

    ``perm`` is ``(bits,)`` int64 and ``blocks_t`` ``(bits / 64, 64, 64)`` float32, each
    block transposed; both ``None`` for no rotation.
    """
    if perm is None:
        return x
    n = x.shape[0]
    padded = xp.zeros((n, bits), dtype=xp.float32)
    padded[:, : x.shape[1]] = x
    grouped = xp.take(padded, perm, axis=1).reshape(n, -1, 64).transpose(1, 0, 2)
    # One batched product, a (n x 64) @ (64 x 64) per block.
    out = xp.matmul(xp.ascontiguousarray(grouped), blocks_t)
    return xp.ascontiguousarray(out.transpose(1, 0, 2)).reshape(n, bits)


def node_scores(xp: Any, q: Any, tree: DeviceTree, metric: Metric) -> Any:
    """Routing scores ``(nq, n_nodes + 1)`` float32 of rotated queries ``q`` against every
    node, as ``search.route._approx_scores``; the last column, ``inf``, scores "no node"."""
    nq, n_nodes = q.shape[0], tree.n_nodes
    scores = xp.empty((nq, n_nodes + 1), dtype=xp.float32)
    dots = q @ tree.centroids.T
    if metric is Metric.IP:
        xp.negative(dots, out=scores[:, :n_nodes])
    else:
        xp.subtract(tree.c_sq[None, :], xp.float32(2.0) * dots, out=scores[:, :n_nodes])
    scores[:, n_nodes] = xp.inf
    return scores


def beam(xp: Any, scores: Any, tree: DeviceTree, probes: int) -> Any:
    """The beam search of ``search.route.route`` over :func:`node_scores`: ``(nq, L)`` int64
    leaves, ``-1`` padded (not necessarily at the end of a row)."""
    nq, n_nodes = scores.shape[0], tree.n_nodes
    frontier = xp.broadcast_to(tree.children[0], (nq, tree.children.shape[1]))
    found = []
    for _ in range(tree.depth):
        keep = min(probes, frontier.shape[1])
        if keep < frontier.shape[1]:
            s = xp.take_along_axis(scores, xp.where(frontier >= 0, frontier, n_nodes), axis=1)
            best = xp.argsort(s, axis=1)[:, :keep]
            frontier = xp.take_along_axis(frontier, best, axis=1)
        valid = frontier >= 0
        leaf = xp.where(valid, tree.leaf_of_node[xp.where(valid, frontier, 0)], -1)
        found.append(leaf)
        expand = xp.where(valid & (leaf < 0), frontier, n_nodes)
        frontier = tree.children[expand].reshape(nq, -1)
    return xp.concatenate(found, axis=1)


def nearest_leaves(xp: Any, scores: Any, tree: DeviceTree, probes: int, reached: Any = None) -> Any:
    """The ``probes`` leaves of best :func:`node_scores` ``scores`` per query, as
    ``search.route.route`` keeps them: among all leaves (``reached`` ``None``), or among
    the leaf numbers ``reached`` ``(nq, L)`` (``-1`` padded) that a :func:`beam` found.

    Returns ``(nq, min(probes, L))`` int64 leaf numbers, ascending, ``-1`` padded at the end.
    """
    nq, n_nodes = scores.shape[0], tree.n_nodes
    n_leaves = int(tree.leaf_nodes.shape[0])
    if reached is None:
        nodes = xp.broadcast_to(tree.leaf_nodes, (nq, n_leaves))
    else:
        nodes = xp.where(reached >= 0, tree.leaf_nodes[xp.maximum(reached, 0)], n_nodes)
    keep = min(probes, int(nodes.shape[1]))
    best = xp.argsort(xp.take_along_axis(scores, nodes, axis=1), axis=1)[:, :keep]
    chosen = xp.take_along_axis(nodes, best, axis=1)
    valid = chosen < n_nodes
    leaves = xp.where(valid, tree.leaf_of_node[xp.where(valid, chosen, 0)], n_leaves)
    leaves = xp.sort(leaves, axis=1)
    return xp.where(leaves < n_leaves, leaves, -1)


def trim(xp: Any, leaves: Any, packed: bool = False) -> Any:
    """``leaves`` ``(nq, L)`` with each row's ``-1`` moved to its end and the columns
    that are ``-1`` in every row dropped (at least one column is kept). ``packed``: the
    rows already hold their leaves first."""
    if not packed:
        leaves = xp.sort(leaves, axis=1)[:, ::-1]
    width = int((leaves >= 0).sum(axis=1).max()) if leaves.shape[0] else 0
    return xp.ascontiguousarray(leaves[:, : max(1, width)])


def rows_held(xp: Any, leaves: Any, sizes: Any) -> Any:
    """Rows ``(nq,)`` held by each row of ``leaves`` ``(nq, L)`` (``-1`` padded), by
    ``sizes`` ``(n_leaves,)`` int64."""
    return xp.where(leaves >= 0, sizes[xp.maximum(leaves, 0)], 0).sum(axis=1)


def pack_signs(xp: Any, x: Any, words: int) -> Any:
    """``codes.pack_signs`` for ``(n, bits)`` float32: ``(n, words)`` uint64, bit ``j`` set
    when ``x[:, j] > 0``, padding bits zero."""
    n, bits = x.shape
    positive = xp.zeros((n, words * 64), dtype=xp.uint64)
    positive[:, :bits] = x > 0
    weights = xp.left_shift(xp.uint64(1), xp.arange(64, dtype=xp.uint64))
    return (positive.reshape(n, words, 64) * weights).sum(axis=2, dtype=xp.uint64)


@dataclass(frozen=True)
class QueryTerms:
    """What the scoring kernel needs of the queries (``core.query_codes.QueryCodes``) and of each
    (query, probed leaf) pair (``core.codes.PairTerms``), on the device.

    Attributes
    ----------
    planes : (nq, QUERY_BITS, w) uint64 bit planes of the quantised rotated queries
    lo, delta, total, slack : (nq,) float32
    p, r_q : (nq * L,) float32 per-pair terms; zero for padding
    """

    planes: Any
    lo: Any
    delta: Any
    total: Any
    slack: Any
    p: Any
    r_q: Any


def query_terms(
    xp: Any,
    q: Any,
    leaves: Any,
    tree: DeviceTree,
    words: int,
    metric: Metric,
    code_bits: int = 1,
) -> QueryTerms:
    """:class:`QueryTerms` of rotated queries ``q`` ``(nq, bits)`` float32 probing
    ``leaves`` ``(nq, L)`` int64 (``-1`` padded), for codes of ``code_bits``:
    ``core.query_codes.quantize_queries`` and ``core.codes.pair_terms``, the same float32 steps
    (sums in float64)."""
    origin = tree.centroids[0]  # codes.origin_of
    u, lo, delta, total, slack = query_levels(q - origin, xp, code_bits)
    planes = xp.stack([pack_signs(xp, (u >> j) & 1, words) for j in range(QUERY_BITS)], axis=1)
    n_slots = leaves.shape[1]
    flat = leaves.reshape(-1)
    valid = flat >= 0
    centres = tree.centroids[tree.leaf_nodes[xp.where(valid, flat, 0)]]
    qq = xp.repeat(q, n_slots, axis=0)
    residual = (qq - centres).astype(xp.float64)  # float64 sums, as pair_terms
    sq = (residual * residual).sum(axis=1)
    if metric is Metric.IP:
        p = -(qq.astype(xp.float64) * centres.astype(xp.float64)).sum(axis=1)
    else:
        p = sq
    zero = xp.float32(0.0)
    return QueryTerms(
        planes=planes,
        lo=lo,
        delta=delta,
        total=total,
        slack=slack,
        p=xp.where(valid, p.astype(xp.float32), zero),
        r_q=xp.where(valid, xp.sqrt(sq).astype(xp.float32), zero),
    )


def candidate_distances(xp: Any, q: Any, rows: Any, vectors: Any, metric: Metric) -> Any:
    """Exact distances ``(nq, m)`` float32 of prepared queries ``q`` ``(nq, d)`` to their
    candidate ``rows`` ``(nq, m)`` int64 of ``vectors`` ``(R, d)``; ``inf`` where ``-1``."""
    nq, m = rows.shape
    d = q.shape[1]
    out = xp.empty((nq, m), dtype=xp.float32)
    block = max(1, _RERANK_BLOCK // max(1, m * d))
    for start in range(0, nq, block):
        r = rows[start : start + block]
        qb = q[start : start + block]
        valid = r >= 0
        x = vectors[xp.where(valid, r, 0)]  # (b, m, d)
        if metric is Metric.L2:
            x -= qb[:, None, :]
            dist = (x * x).sum(axis=2)
        else:
            dots = xp.matmul(x, qb[:, :, None])[:, :, 0]
            dist = xp.float32(1.0) - dots if metric is Metric.COSINE else -dots
        out[start : start + block] = xp.where(valid, dist, xp.float32(xp.inf))
    return out
