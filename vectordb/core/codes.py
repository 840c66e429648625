"""1-bit codes of residuals and the RaBitQ distance estimate built on them.

A vector ``x`` stored in leaf ``l`` (centroid ``c``) is coded as the signs of its rotated
residual ``r = R (x - c)``, one bit per rotated coordinate (``D = bits = 64 * ceil(d/64)``),
packed little-endian into ``D / 64`` uint64 words. Codes are kept *word-major*, shape
``(words, n)``, so a scan streams one contiguous row per word. Centring on the leaf's own
centroid makes the bits describe where a vector sits *inside* its leaf.

The estimate is RaBitQ's (Gao & Long, SIGMOD 2024). With ``b`` the code's bits,
``o = r / |r|`` and ``ō = (2b - 1) / sqrt(D)``, the estimator ``<o, u> ~ <ō, u> / <ō, o>`` is
unbiased for any ``u``, and its error is at most ``EPS0 * sqrt(1 - <ō, o>^2) / <ō, o> /
sqrt(D - 1)`` times ``|u|`` with high probability. Taking ``u = q - c`` (rotated)::

    <r, q - c> ~ |r|^2 / |r|_1 * (sum_i (2 b_i - 1) (q - z)_i  -  sum_i (2 b_i - 1) (c - z)_i)

since ``<ō, o> = |r|_1 / (sqrt(D) |r|)``. The first sum is the only part that depends on the
query and the code together. The query is quantised to ``QUERY_BITS`` bits a coordinate,
``q_i ~ lo + delta * u_i`` with ``u_i`` in ``0..15``, so that sum is
``lo (2 popcount(b) - D) + delta (2 T - sum_i u_i)`` with ``T = sum_j 2^j popcount(b & u^(j))``
over the query's bit planes ``u^(j)``: four AND + popcounts a word. The same rotated query
serves every leaf (its centroid's part is a per-vector constant), so it is quantised once,
as ``q - z`` with ``z`` the root's centroid (``CodeTable.origin``), so that the levels span
the data's spread rather than its distance from zero; ``K`` is taken of ``c - z`` too.

Every vector keeps four float32 *factors* (``FACTORS``): ``A``, ``M``, ``B`` and ``E``. For
``(query, leaf)`` pair terms ``P`` and ``r_q = |q - c|``::

    estimate = A + P - M * delta * (2 T - sum u) - lo * B    radius = E * r_q + M * slack

    l2, cosine: A = |r|^2 + M K,   M = 2 |r|^2 / |r|_1,   P = |q - c|^2   (estimates |x - q|^2)
    ip:         A = M K - <r, c>,  M = |r|^2 / |r|_1,     P = -<c, q>     (estimates -<x, q>)

with ``K = sum_i (2 b_i - 1) (c - z)_i``, ``B = M (2 popcount(b) - D)`` and ``E`` the error
bound above times ``|r|`` (times 2 for the squared distance). Rounding the query to its
levels adds ``M * slack_q`` (``QueryCodes.slack``) to the radius. The true score lies within
``radius = E * r_q + M * slack_q`` of the estimate with high probability, which is what
decides how many candidates the exact rerank must check (``core.topk.within_bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64
from .metrics import Metric
from .tree import Tree

__all__ = [
    "EPS0",
    "FACTORS",
    "QUERY_BITS",
    "CodeTable",
    "PairTerms",
    "Quantizer",
    "QueryCodes",
    "code_factors",
    "encode_residuals",
    "estimate",
    "origin_of",
    "pack_signs",
    "pair_terms",
    "plane_dots",
    "quantize_queries",
    "query_levels",
    "radius",
    "slack_per_step",
    "words_for",
]

#: Bits a coordinate of the rotated query is quantised to. 4 bits ranked as well as exact
#: float queries on pydocs-minilm, fashion-mnist and synthetic data (recall of the probed
#: leaves' true top 10 within 40 candidates: 0.996 vs 0.996, 0.999 vs 1.0, 1.0 vs 1.0).
QUERY_BITS = 4
#: The confidence parameter of RaBitQ's error bound (the paper's and faiss's choice).
EPS0 = 1.9
#: Rows of the ``(FACTORS, n)`` float32 per-vector factors: A, M, B, E (module docstring).
FACTORS = 4


def words_for(dim: int) -> int:
    """Number of uint64 words holding ``dim`` bits."""
    return (dim + 63) // 64


def pack_signs(x: npt.NDArray[Any]) -> U64:
    """Pack ``x > 0`` row-wise into uint64 words.

    Parameters
    ----------
    x : (n, d) float32 (or any real dtype)

    Returns
    -------
    (n, ceil(d/64)) uint64; bit ``j`` of the row is set when ``x[:, j] > 0``. Padding bits
    are zero, so they never count in a popcount.
    """
    n, d = x.shape
    words = words_for(d)
    packed = np.packbits(x > 0, axis=1, bitorder="little")
    if d == words * 64:
        return packed.view("<u8").astype(np.uint64, copy=False)
    padded = np.zeros((n, words * 8), dtype=np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view("<u8").astype(np.uint64, copy=False)


#: Width of the diagonal blocks of the rotation. A random permutation followed by
#: independent 64x64 orthogonal blocks gave the same recall as a dense d x d rotation on
#: fashion-mnist and on synthetic embeddings, at 1/12 of its memory for d=768.
BLOCK = 64


@dataclass(frozen=True)
class Quantizer:
    """Random rotation applied before taking signs: a permutation, then orthogonal blocks.

    Vectors are zero-padded to ``bits = 64 * ceil(d / 64)`` coordinates, permuted, and
    multiplied block by block. The map is an isometry from ``R^d`` into ``R^bits``: distances
    and inner products are preserved, so the tree routes in the rotated space too. Sign bits
    of rotated residuals rank far better than raw ones on data with uneven or constant
    coordinates (fashion-mnist recall@10 0.63 -> 0.96 at the earlier defaults, probes=4).

    Attributes
    ----------
    dim : vector dimension d
    perm : (bits,) int64, a permutation of ``range(bits)``, or ``None`` (no rotation)
    blocks : (bits / 64, 64, 64) float32 orthogonal blocks, or ``None``
    """

    dim: int
    perm: I64 | None = None
    blocks: F32 | None = None

    @classmethod
    def create(cls, dim: int, *, rotate: bool, rng: np.random.Generator) -> Quantizer:
        """A quantizer for ``dim``-d vectors; with ``rotate``, Haar-random blocks."""
        if not rotate:
            return cls(dim)
        bits = words_for(dim) * 64
        blocks = np.empty((bits // BLOCK, BLOCK, BLOCK), dtype=np.float32)
        for i in range(blocks.shape[0]):
            q, r = np.linalg.qr(rng.standard_normal((BLOCK, BLOCK)))
            blocks[i] = q * np.sign(np.diag(r))[None, :]  # uniform over O(64) (Mezzadri 2007)
        return cls(dim, rng.permutation(bits).astype(np.int64), blocks)

    @property
    def bits(self) -> int:
        """Code length in bits, and the dimension of the rotated space."""
        return self.dim if self.perm is None else int(self.perm.shape[0])

    @property
    def words(self) -> int:
        return words_for(self.bits)

    @property
    def nbytes(self) -> int:
        if self.perm is None or self.blocks is None:
            return 0
        return int(self.perm.nbytes + self.blocks.nbytes)

    def rotate(self, x: F32) -> F32:
        """Rotate rows: ``(n, dim)`` float32 -> ``(n, bits)`` float32 (``x`` itself if none)."""
        if self.perm is None or self.blocks is None:
            return x
        n = x.shape[0]
        padded = x
        if self.bits != self.dim:
            padded = np.zeros((n, self.bits), dtype=np.float32)
            padded[:, : self.dim] = x
        # np.take along axis 1: ~8x faster than fancy-indexing the columns.
        grouped = np.take(padded, self.perm, axis=1).reshape(n, self.bits // BLOCK, 1, BLOCK)
        # A stack of (1 x 64) @ (64 x 64) products: every row goes through the same BLAS call
        # shape whatever n is, so a query rotates to the same bits alone or in a batch (one
        # (n x 64) product per block rounds differently for different n).
        out = np.matmul(grouped, self.blocks.transpose(0, 2, 1))
        return out.reshape(n, self.bits)

    def encode(self, rotated_residuals: F32) -> U64:
        """Word-major codes ``(words, n)`` uint64 of already rotated residuals ``(n, bits)``."""
        return np.ascontiguousarray(pack_signs(rotated_residuals).T)


def code_factors(residual: F32, centres: F32, metric: Metric, origin: F32) -> F32:
    """The per-vector factors of the codes of ``residual`` (module docstring).

    Parameters
    ----------
    residual : (n, D) float32 rotated residuals ``x - c``
    centres : (n, D) float32, each vector's leaf centroid, or (D,) one for all
    metric : the index's metric (ip has its own factors)
    origin : (D,) float32, the point queries are quantised around (``CodeTable.origin``)

    Returns
    -------
    (FACTORS, n) float32: rows A, M, B, E. A vector equal to its centroid gets
    ``M = B = E = 0`` (its estimate is exact).
    """
    n = residual.shape[0]
    out = np.empty((FACTORS, n), dtype=np.float32)
    # Blocks of rows: the float64 temporaries below are several times the block's size.
    for start in range(0, n, _FACTOR_ROWS):
        stop = min(n, start + _FACTOR_ROWS)
        part = centres if np.ndim(centres) == 1 else centres[start:stop]
        out[:, start:stop] = _factors(residual[start:stop], part, metric, origin)
    return out


#: Rows per block of :func:`code_factors`.
_FACTOR_ROWS = 1 << 14


def _factors(residual: F32, centres: F32, metric: Metric, origin: F32) -> F32:
    n, dim = residual.shape
    r = residual.astype(np.float64)
    shifted = np.broadcast_to(np.asarray(centres, np.float64) - origin, residual.shape)
    sq = np.einsum("nd,nd->n", r, r)
    l1 = np.abs(r).sum(axis=1)
    positive = r > 0
    signed_c = 2.0 * np.where(positive, shifted, 0.0).sum(axis=1) - shifted.sum(axis=1)  # K
    ones = positive.sum(axis=1).astype(np.float64)
    nonzero = l1 > 0
    ratio = np.divide(sq, l1, out=np.zeros(n), where=nonzero)  # |r|^2 / |r|_1
    spread = np.divide(dim * sq, l1 * l1, out=np.ones(n), where=nonzero)  # 1 / <o_bar, o>^2
    bound = EPS0 * np.sqrt(sq * np.maximum(spread - 1.0, 0.0) / max(dim - 1, 1))
    out = np.empty((FACTORS, n), dtype=np.float64)
    if metric is Metric.IP:
        mult = ratio
        c = np.broadcast_to(np.asarray(centres, np.float64), residual.shape)
        out[0] = mult * signed_c - np.einsum("nd,nd->n", r, c)
        out[3] = bound
    else:
        mult = 2.0 * ratio
        out[0] = sq + mult * signed_c
        out[3] = 2.0 * bound
    out[1] = mult
    out[2] = mult * (2.0 * ones - dim)
    return out.astype(np.float32)


def encode_residuals(
    quantizer: Quantizer, rotated: F32, centres: F32, metric: Metric, origin: F32
) -> tuple[U64, F32]:
    """The codes of rotated vectors against their leaves' centroids, and their factors.

    Parameters
    ----------
    rotated : (n, bits) float32, prepared and rotated vectors
    centres : (n, bits) float32, each vector's leaf centroid, or (bits,) one for all
    metric : the index's metric
    origin : (bits,) float32, ``CodeTable.origin`` of the index (its root centroid)

    Returns
    -------
    codes : (words, n) uint64 word-major sign codes of the residuals
    factors : (FACTORS, n) float32 (see :func:`code_factors`)
    """
    residual = rotated - centres
    return quantizer.encode(residual), code_factors(residual, centres, metric, origin)


@dataclass(frozen=True)
class QueryCodes:
    """Rotated queries quantised to ``QUERY_BITS`` bits a coordinate, as bit planes.

    Attributes
    ----------
    planes : (nq, QUERY_BITS, w) uint64, plane ``j`` holds bit ``j`` of every ``u_i``
    lo : (nq,) float32, the value of ``u_i = 0``
    delta : (nq,) float32, the step between levels
    total : (nq,) float32, ``sum_i u_i``
    slack : (nq,) float32, ``delta * sqrt(D / 12)``: times a vector's ``M``, what rounding
        the query to its levels adds to the estimate's error bound
    """

    planes: U64
    lo: F32
    delta: F32
    total: F32
    slack: F32


def query_levels(q: Any, xp: Any = np) -> tuple[Any, Any, Any, Any, Any]:
    """The levels of rotated queries less the origin, ``q`` ``(nq, D)`` float32: ``u``
    ``(nq, D)`` uint8 in ``0..2**QUERY_BITS - 1``, and ``lo``, ``delta``, ``total``,
    ``slack`` ``(nq,)`` float32 (see :class:`QueryCodes`). ``xp`` is the array module
    (NumPy, or CuPy for device arrays): both backends quantise with these float32 steps.

    Row by row (min, max and rounding of its own values), so a query quantises the same alone
    or in a batch.
    """
    levels = (1 << QUERY_BITS) - 1
    lo = q.min(axis=1)
    delta = (q.max(axis=1) - lo) / xp.float32(levels)
    delta = xp.where(delta > 0, delta, xp.float32(1.0)).astype(xp.float32)
    u = xp.rint((q - lo[:, None]) / delta[:, None])
    u = xp.clip(u, 0, levels).astype(xp.uint8)
    total = u.sum(axis=1, dtype=xp.int64).astype(xp.float32)
    # Rounding errs by at most delta / 2 a coordinate, uniformly: sum_i (2 b_i - 1) err_i
    # has a standard deviation of delta * sqrt(D / 12). One such sigma added to the code's
    # EPS0 sigmas bounds EPS0 sigmas of the two errors together (they are independent)
    # while the rounding's is at most the code's.
    slack = delta * xp.float32(slack_per_step(q.shape[1]))
    return u, lo.astype(xp.float32), delta, total, slack


def slack_per_step(dim: int) -> float:
    """``sqrt(D / 12)``: the standard deviation of ``sum_i (2 b_i - 1) err_i`` over ``D``
    coordinates rounded to steps of 1 (``QueryCodes.slack`` is ``delta`` times it)."""
    return math.sqrt(dim / 12.0)


def quantize_queries(q: F32) -> QueryCodes:
    """:class:`QueryCodes` of rotated queries less the origin, ``q`` ``(nq, D)`` float32
    (see :func:`query_levels`)."""
    u, lo, delta, total, slack = query_levels(q)
    planes = np.stack([pack_signs((u >> j) & 1) for j in range(QUERY_BITS)], axis=1)
    return QueryCodes(planes, lo, delta, total, slack)


def plane_dots(planes: U64, codes: U64) -> npt.NDArray[np.unsignedinteger]:
    """``T = sum_j 2^j popcount(code & plane_j)`` of every query with every code.

    Parameters
    ----------
    planes : (nq, QUERY_BITS, w) uint64 query bit planes
    codes : (w, m) uint64 word-major codes; may be a column slice of a larger array

    Returns
    -------
    (nq, m) uint16, or uint32 where ``15 * 64 * w`` does not fit 16 bits.
    """
    nq, n_planes, w = planes.shape
    m = codes.shape[1]
    wide = np.uint32 if (1 << n_planes) * 64 * w > 1 << 16 else np.uint16
    # One (nq, planes, m) block per word: fewer NumPy calls than one per (word, plane),
    # which dominate for the few queries and ~200 codes of one leaf (measured 25% faster).
    acc = np.zeros((nq, n_planes, m), dtype=wide)
    for word in range(w):
        acc += np.bitwise_count(planes[:, :, word, None] & codes[word][None, None, :])
    out = acc[:, n_planes - 1]
    for j in range(n_planes - 2, -1, -1):
        out <<= 1
        out += acc[:, j]
    return out


@dataclass(frozen=True)
class PairTerms:
    """What the estimate needs of each (query, leaf) pair.

    Attributes
    ----------
    p : (P,) float32, ``|q - c|^2`` (``-<c, q>`` for ip)
    r_q : (P,) float32, ``|q - c|``
    """

    p: F32
    r_q: F32


def pair_terms(table: CodeTable, q: F32, leaves: I64) -> PairTerms:
    """:class:`PairTerms` of rotated queries ``q`` ``(P, D)`` against ``leaves`` ``(P,)``.

    Row by row the same arithmetic whatever P is (no BLAS), so a query scores the same alone
    or in a batch. The sums are taken in float64, where every product of two float32 values
    is exact, and rounded once to float32: so every backend (NumPy, numba, CUDA) gets the
    same float32 terms whatever order it sums in, but where two orders' float64 sums round
    to float32 on either side of a boundary (about once in 10^8 pairs).
    """
    centres = table.centroids[table.leaf_nodes[leaves]]
    residual = q - centres
    sq = np.einsum("qd,qd->q", residual, residual, dtype=np.float64)
    if table.metric is Metric.IP:
        p = (-np.einsum("qd,qd->q", q, centres, dtype=np.float64)).astype(np.float32)
    else:
        p = sq.astype(np.float32)
    return PairTerms(p, np.sqrt(sq).astype(np.float32))


def origin_of(tree: Tree) -> F32:
    """``(bits,)`` float32: the point an index's queries are quantised around, its root's
    centroid (rotated)."""
    return tree.centroids[0]


def estimate(
    t: npt.NDArray[np.unsignedinteger],
    factors: F32,
    lo: F32,
    delta: F32,
    total: F32,
    p: F32,
) -> F32:
    """Estimated scores (smaller is better) from plane dots ``t``.

    Every operand broadcasts against ``t`` (e.g. ``t`` ``(nq, m)`` with ``factors``
    ``(FACTORS, 1, m)`` and the query terms ``(nq, 1)``; or all ``(n,)`` pair by pair). The
    same float32 steps in the same order for every element, whatever the shapes, so the
    grid and the pair-by-pair forms, and the CUDA kernel, give bit-identical estimates.
    """
    # In place on one array: this runs for every scanned code, and temporaries of that size
    # cost more than the arithmetic.
    out = t.astype(np.float32)
    out *= np.float32(2.0)
    out -= total
    out *= delta
    out *= factors[1]
    out -= factors[0]
    out -= p
    out += factors[2] * lo
    np.negative(out, out=out)
    return out


def radius(factors: F32, r_q: F32, slack: F32) -> F32:
    """The estimates' error bounds ``E * r_q + M * slack`` (module docstring), operands
    broadcast as for :func:`estimate`; the same float32 steps as the CUDA kernel."""
    out = factors[3] * r_q
    out += factors[1] * slack
    return out


@dataclass(frozen=True)
class CodeTable:
    """What scoring codes needs besides the codes themselves (which live in ``parts``).

    Attributes
    ----------
    centroids : (n_nodes, bits) float32, the tree's node centroids in the rotated space
        (shared with the tree, not counted in ``nbytes``)
    leaf_nodes : (n_leaves,) int64, tree node of every leaf
    metric : the index's metric
    origin : (bits,) float32, the root's centroid: queries are quantised as ``q - origin``
        (so the levels span the data's spread, not its distance from zero)
    """

    centroids: F32
    leaf_nodes: I64
    metric: Metric
    origin: F32

    @classmethod
    def for_tree(cls, tree: Tree, metric: Metric) -> CodeTable:
        """The table of ``tree`` (centroids rotated, ``(n_nodes, bits)``)."""
        return cls(tree.centroids, tree.leaf_nodes, metric, origin_of(tree))

    @property
    def nbytes(self) -> int:
        return int(self.leaf_nodes.nbytes)
