"""Binary codes of residuals (1 to 4 bits a coordinate) and the RaBitQ distance estimate
built on them.

A vector ``x`` stored in leaf ``l`` (centroid ``c``) is coded from its rotated residual
``r = R (x - c)`` (``D = bits = 64 * ceil(d/64)`` coordinates): each coordinate becomes a
level ``c_i`` in ``0..L``, ``L = 2**code_bits - 1``, read as the odd integer
``y_i = 2 c_i - L`` (``-L..L``). With one bit, ``c_i`` is the sign bit of ``r_i`` and
``y_i = 2 b_i - 1 = ±1``. With more (the extended codes of Gao et al., SIGMOD 2025, for low
dimensions, where one bit a coordinate ranks poorly), ``y_i = 2 floor(t r_i) + 1``, clipped
to ``-L..L``, with the scale ``t`` of each vector chosen to make ``y`` point closest to
``r`` (:func:`code_levels`); ``y_i`` keeps the sign of ``r_i``. The levels' bits are packed
little-endian into ``D / 64`` uint64 words per bit, *word-major*: codes ``(code_bits * words,
n)``, the words of bit ``j`` in rows ``j * words .. (j + 1) * words``, so a scan streams one
contiguous row per word. Centring on the leaf's own centroid makes the code describe where a
vector sits *inside* its leaf.

The estimate is RaBitQ's (Gao & Long, SIGMOD 2024). With ``o = r / |r|`` and
``ō = y / |y|``, the estimator ``<o, u> ~ <ō, u> / <ō, o>`` is unbiased for any ``u``, and
its error is at most ``EPS0 * sqrt(1 - <ō, o>^2) / <ō, o> / sqrt(D - 1)`` times ``|u|`` with
high probability. Taking ``u = q - c`` (rotated)::

    <r, q - c> ~ |r|^2 / <y, r> * (sum_i y_i (q - z)_i  -  sum_i y_i (c - z)_i)

since ``<ō, o> = <y, r> / (|y| |r|)`` (``|r|_1 / (sqrt(D) |r|)`` with one bit). The first sum
is the only part that depends on the query and the code together. The query is quantised
(``core.query_codes``) to 4 bits a coordinate, ``q_i ~ lo + delta * u_i`` with ``u_i`` in
``0..15``, so that sum is ``lo sum_i y_i + delta (2 T - L sum_i u_i)`` with ``T = sum_i c_i
u_i = sum_{j, k} 2^(j + k) popcount(c^(k) & u^(j))`` over the query's bit planes ``u^(j)``
and the code's ``c^(k)``: four AND + popcounts a word and code bit. The same rotated query
serves every leaf (its centroid's part is a per-vector constant), so it is quantised once,
as ``q - z`` with ``z`` the root's centroid (``CodeTable.origin``), so that the levels span
the data's spread rather than its distance from zero; ``K`` is taken of ``c - z`` too.

Every vector keeps four float32 *factors* (``FACTORS``): ``A``, ``M``, ``B`` and ``E``. For
``(query, leaf)`` pair terms ``P`` and ``r_q = |q - c|``::

    estimate = A + P - M * delta * (2 T - L sum u) - lo * B   radius = E * r_q + M * slack

    l2, cosine: A = |r|^2 + M K,   M = 2 |r|^2 / <y, r>,   P = |q - c|^2  (estimates |x - q|^2)
    ip:         A = M K - <r, c>,  M = |r|^2 / <y, r>,     P = -<c, q>    (estimates -<x, q>)

with ``K = sum_i y_i (c - z)_i``, ``B = M sum_i y_i`` and ``E`` the error bound above times
``|r|`` (times 2 for the squared distance). The query's ``total`` holds ``L sum u``.
Rounding the query to its levels adds ``M * slack_q`` (the query's ``slack``) to the
radius. The true score lies within ``radius = E * r_q + M * slack_q`` of the estimate with
high probability, which is what decides how many candidates the exact rerank must check
(``core.topk.within_bound``).
"""

from __future__ import annotations

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
    "CodeTable",
    "PairTerms",
    "Quantizer",
    "code_factors",
    "code_levels",
    "encode_residuals",
    "estimate",
    "level_norm_bound",
    "level_scale",
    "origin_of",
    "pack_signs",
    "pair_terms",
    "plane_dots",
    "radius",
    "words_for",
]

#: The confidence parameter of RaBitQ's error bound (the paper's and faiss's choice).
EPS0 = 1.9
#: Rows of the ``(FACTORS, n)`` float32 per-vector factors: A, M, B, E (module docstring).
FACTORS = 4
#: ``|y| / (L sqrt(D))`` (module docstring) stays below these for the levels of
#: :func:`code_levels` (code bits 1 to 4): the largest over 20,000 Gaussian residuals (what a
#: random rotation makes of any residual) at D = 64, 128 and 384 was 1, 0.80, 0.67 and 0.62.
#: The query's rounding error is bounded with them (:func:`level_norm_bound`).
_LEVEL_RMS = (1.0, 1.0, 0.8, 0.67, 0.63)
#: Scales ``t`` tried per vector by :func:`code_levels`, as fractions of the one that puts
#: the largest coordinate at the top level: cos(y, r) of Gaussian residuals (D = 64 to 384)
#: came within 0.001 of its best over a grid twice as fine.
_LEVEL_SCALES = np.linspace(0.5, 1.6, 23)


def level_scale(code_bits: int) -> int:
    """``L = 2**code_bits - 1``: the largest level of a coordinate's code."""
    return (1 << code_bits) - 1


def level_norm_bound(code_bits: int) -> float:
    """A bound on ``|y| / sqrt(D)`` of the levels of :func:`code_levels`: 1 with one bit,
    ``L`` times ``_LEVEL_RMS`` with more."""
    return level_scale(code_bits) * _LEVEL_RMS[code_bits]


def code_levels(residual: F32, code_bits: int) -> npt.NDArray[np.uint8]:
    """The level ``c_i`` in ``0..L`` of every coordinate of ``residual`` ``(n, D)`` float32:
    ``(n, D)`` uint8 (module docstring). One bit: ``r_i > 0``. More: per row, the scale
    ``t`` among ``_LEVEL_SCALES`` whose ``y = 2 c - L`` has the largest cosine with ``r``
    (ties to the smaller ``t``); a zero row gets the levels of ``t = 1``."""
    if code_bits == 1:
        return (residual > 0).astype(np.uint8)
    half = 1 << (code_bits - 1)
    r = residual.astype(np.float64)
    top = np.abs(r).max(axis=1, keepdims=True)
    top[top == 0] = 1.0
    best = np.zeros(r.shape, dtype=np.uint8)
    best_cos = np.full(r.shape[0], -np.inf)
    for scale in _LEVEL_SCALES:
        y = np.clip(np.floor(r * (scale * half / top)), -half, half - 1) + 0.5
        cos = np.einsum("nd,nd->n", y, r) / np.sqrt(np.einsum("nd,nd->n", y, y))
        better = cos > best_cos
        best_cos[better] = cos[better]
        best[better] = (y[better] + (half - 0.5)).astype(np.uint8)
    return best


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
    code_bits : bits a coordinate of a code takes, 1 to ``_validation.MAX_CODE_BITS``
    """

    dim: int
    perm: I64 | None = None
    blocks: F32 | None = None
    code_bits: int = 1

    @classmethod
    def create(
        cls, dim: int, *, rotate: bool, rng: np.random.Generator, code_bits: int = 1
    ) -> Quantizer:
        """A quantizer for ``dim``-d vectors, ``code_bits`` a coordinate; with ``rotate``,
        Haar-random blocks."""
        if not rotate:
            return cls(dim, code_bits=code_bits)
        bits = words_for(dim) * 64
        blocks = np.empty((bits // BLOCK, BLOCK, BLOCK), dtype=np.float32)
        for i in range(blocks.shape[0]):
            q, r = np.linalg.qr(rng.standard_normal((BLOCK, BLOCK)))
            blocks[i] = q * np.sign(np.diag(r))[None, :]  # uniform over O(64) (Mezzadri 2007)
        return cls(dim, rng.permutation(bits).astype(np.int64), blocks, code_bits)

    @property
    def bits(self) -> int:
        """Code length in bits, and the dimension of the rotated space."""
        return self.dim if self.perm is None else int(self.perm.shape[0])

    @property
    def words(self) -> int:
        """uint64 words a bit of every coordinate takes."""
        return words_for(self.bits)

    @property
    def code_rows(self) -> int:
        """Rows of the word-major codes: ``code_bits * words``."""
        return self.code_bits * self.words

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

    def encode(self, levels: npt.NDArray[np.uint8]) -> U64:
        """Word-major codes ``(code_rows, n)`` uint64 of the levels ``(n, bits)`` uint8 of
        rotated residuals (:func:`code_levels`)."""
        planes = [pack_signs((levels >> j) & 1).T for j in range(self.code_bits)]
        return np.ascontiguousarray(np.concatenate(planes, axis=0))


def code_factors(
    residual: F32,
    centres: F32,
    metric: Metric,
    origin: F32,
    levels: npt.NDArray[np.uint8] | None = None,
    code_bits: int = 1,
) -> F32:
    """The per-vector factors of the codes of ``residual`` (module docstring).

    Parameters
    ----------
    residual : (n, D) float32 rotated residuals ``x - c``
    centres : (n, D) float32, each vector's leaf centroid, or (D,) one for all
    metric : the index's metric (ip has its own factors)
    origin : (D,) float32, the point queries are quantised around (``CodeTable.origin``)
    levels : (n, D) uint8 the residuals' levels (:func:`code_levels`), or ``None`` to
        compute them
    code_bits : bits a coordinate of the codes takes

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
        block = residual[start:stop]
        c = code_levels(block, code_bits) if levels is None else levels[start:stop]
        out[:, start:stop] = _factors(block, c, code_bits, part, metric, origin)
    return out


#: Rows per block of :func:`code_factors`.
_FACTOR_ROWS = 1 << 14


def _factors(
    residual: F32,
    levels: npt.NDArray[np.uint8],
    code_bits: int,
    centres: F32,
    metric: Metric,
    origin: F32,
) -> F32:
    n, dim = residual.shape
    r = residual.astype(np.float64)
    shifted = np.broadcast_to(np.asarray(centres, np.float64) - origin, residual.shape)
    y = 2.0 * levels - float(level_scale(code_bits))  # odd integers, exact in float64
    sq = np.einsum("nd,nd->n", r, r)
    along = np.einsum("nd,nd->n", y, r)  # <y, r>: |r|_1 with one bit
    signed_c = np.einsum("nd,nd->n", y, shifted)  # K
    y_sq = np.einsum("nd,nd->n", y, y)
    nonzero = along > 0
    ratio = np.divide(sq, along, out=np.zeros(n), where=nonzero)  # |r|^2 / <y, r>
    spread = np.divide(y_sq * sq, along * along, out=np.ones(n), where=nonzero)  # <ō, o>^-2
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
    out[2] = mult * y.sum(axis=1)
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
    codes : (code_rows, n) uint64 word-major codes of the residuals
    factors : (FACTORS, n) float32 (see :func:`code_factors`)
    """
    residual = rotated - centres
    bits = quantizer.code_bits
    levels = code_levels(residual, bits)
    factors = code_factors(residual, centres, metric, origin, levels, bits)
    return quantizer.encode(levels), factors


def plane_dots(planes: U64, codes: U64) -> npt.NDArray[np.unsignedinteger]:
    """``T = sum_{j, k} 2^(j + k) popcount(c^(k) & u^(j))`` of every query with every code.

    Parameters
    ----------
    planes : (nq, QUERY_BITS, w) uint64 query bit planes
    codes : (code_bits * w, m) uint64 word-major codes (bit ``k``'s words in rows
        ``k * w .. (k + 1) * w``); may be a column slice of a larger array

    Returns
    -------
    (nq, m) uint16, or uint32 where ``15 * L * 64 * w`` does not fit 16 bits.
    """
    nq, n_planes, w = planes.shape
    rows, m = codes.shape
    code_bits = rows // w
    top = ((1 << n_planes) - 1) * level_scale(code_bits) * 64 * w
    wide = np.uint32 if top >= 1 << 16 else np.uint16
    out = np.zeros((nq, m), dtype=wide)
    for bit in range(code_bits - 1, -1, -1):
        # One (nq, planes, m) block per word: fewer NumPy calls than one per (word, plane),
        # which dominate for the few queries and ~200 codes of one leaf (measured 25% faster).
        acc = np.zeros((nq, n_planes, m), dtype=wide)
        for word in range(bit * w, (bit + 1) * w):
            acc += np.bitwise_count(planes[:, :, word - bit * w, None] & codes[word][None, None, :])
        out <<= 1
        for j in range(n_planes - 1, -1, -1):
            out += acc[:, j] << j
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
    code_bits : bits a coordinate of the codes takes (``Quantizer.code_bits``)
    """

    centroids: F32
    leaf_nodes: I64
    metric: Metric
    origin: F32
    code_bits: int = 1

    @classmethod
    def for_tree(cls, tree: Tree, metric: Metric, code_bits: int = 1) -> CodeTable:
        """The table of ``tree`` (centroids rotated, ``(n_nodes, bits)``)."""
        return cls(tree.centroids, tree.leaf_nodes, metric, origin_of(tree), code_bits)

    @property
    def nbytes(self) -> int:
        return int(self.leaf_nodes.nbytes)
