"""The CUDA backend: the whole search of a batch on the GPU, with CuPy.

Only this module imports CuPy, and only when a CuPy backend is asked for. What a search
reads is copied to the device once and kept there: the tree, the rotation, the codes
(the base part once per base, the small delta part at each write) and, when they fit in
half the free device memory, the full vectors (only rows added since the last copy are
sent). A batch then crosses the bus twice: its queries in, its ``(nq, k)`` results out.

On the device (see ``device_search``): rotate, route, compute the query codes, score every
(query, probed leaf, slot) in one kernel that also masks deleted or filtered rows and
builds the ``topk`` keys, sort each query's keys, and rerank the best ``m`` exactly. When
the vectors stay on the host, the candidate rows come back and are reranked there.

Hamming distances, and the estimates computed from them, are bit for bit NumPy's (the
kernel compiles without fused multiply-add). The other float32 steps sum in another order
than NumPy's, so a query's floats may differ in the last bits: where two leaves or two
candidates tie within rounding, the backends may choose differently. Recall is the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..codes import CodeTable
from ..metrics import Metric
from ..parts import Part
from ..scan import rerank as host_rerank
from ..stages import Stages, host_search
from . import device_search as ds
from .numpy_backend import NumpyCodeSelector

__all__ = ["CupyBackend", "CupyCodeSelector", "probe"]

log = logging.getLogger("vectordb")

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]

#: Most bytes of score keys held on the device per block of queries.
_KEY_BYTES = 256 << 20
_THREADS = 256
#: The full vectors go to the device only if they fit in this share of its free memory.
_VECTOR_SHARE = 0.5
#: Bytes per host-to-device copy while mirroring the vectors.
_UPLOAD_BYTES = 64 << 20
#: Batches of fewer queries run on the CPU: a GPU batch costs ~3 ms however small (kernel
#: launches and their Python calls), the CPU ~1 ms per lone query (H200 machine, 1M x 768).
MIN_DEVICE_BATCH = 8

_SOURCE = r"""
#define FMAX 3.4028234663852886e+38f
#define NO_KEY 0xFFFFFFFFFFFFFFFFULL

extern "C" __global__ void hamming_u16(
    const unsigned long long* codes, const long long n, const int w,
    const unsigned long long* queries, const long long nq, unsigned short* out)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nq * n) return;
    const long long q = t / n, row = t % n;
    int h = 0;
    for (int k = 0; k < w; ++k) h += __popcll(codes[k * n + row] ^ queries[q * w + k]);
    out[t] = (unsigned short)h;
}

/* Slots of leaf l: base[l]..base[l+1] of the base part, then delta[l]..delta[l+1] of the
   delta part. A base slot is its own storage row when base_rows is null. row_ok (when
   use_ok) masks storage rows. One thread per (pair, j < max_rows). */
extern "C" __global__ void score_keys(
    const unsigned long long* codes_b, const long long n_b,
    const unsigned long long* codes_d, const long long n_d, const int w,
    const float* norms_b, const float* norms_d,
    const float* dots_b, const float* dots_d,
    const long long* rows_b, const int rows_b_given, const long long* rows_d,
    const long long* base, const long long* delta,
    const unsigned char* row_ok, const int use_ok,
    const long long* pair_leaf, const unsigned long long* qcodes,
    const float* a_term, const float* b_term, const float* lut, const int ip,
    const int max_rows, const long long pairs, unsigned long long* keys)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs * max_rows) return;
    const long long p = t / max_rows;
    const long long leaf = pair_leaf[p];
    if (leaf < 0) { keys[t] = NO_KEY; return; }
    const long long j = t % max_rows;
    const long long in_base = base[leaf + 1] - base[leaf];
    const unsigned long long* codes;
    const float* norms;
    const float* dots;
    long long n, slot, row;
    if (j < in_base) {
        slot = base[leaf] + j;
        codes = codes_b; n = n_b; norms = norms_b; dots = dots_b;
        row = rows_b_given ? rows_b[slot] : slot;
    } else {
        slot = delta[leaf] + (j - in_base);
        if (slot >= delta[leaf + 1]) { keys[t] = NO_KEY; return; }
        codes = codes_d; n = n_d; norms = norms_d; dots = dots_d;
        row = rows_d[slot];
    }
    if (use_ok && !row_ok[row]) { keys[t] = NO_KEY; return; }
    int h = 0;
    for (int k = 0; k < w; ++k) h += __popcll(codes[k * n + slot] ^ qcodes[p * w + k]);
    const float rx = norms[slot];
    float out = lut[h];
    /* The same float32 steps, in the same order, as codes.estimate. */
    if (ip) {
        out = out * a_term[p];      /* -r_q */
        out = out * rx;
        out = out - dots[slot];
        out = out - b_term[p];      /* c_q */
    } else {
        out = out * a_term[p];      /* -2 r_q */
        out = out * rx;
        const float rx2 = rx * rx;
        out = out + rx2;
        out = out + b_term[p];      /* r_q^2 */
    }
    if (isnan(out)) out = FMAX;
    else if (isinf(out)) out = out > 0.0f ? FMAX : -FMAX;
    out = out + 0.0f;
    const unsigned int bits = __float_as_uint(out);
    const unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    keys[t] = ((unsigned long long)ordered << 32) | (unsigned long long)row;
}

/* Beam search as tree.Tree.route, one thread per query. scores: (nq, n_nodes) routing
   scores; children: (n_nodes, B), -1 padded; scratch: (nq, 2 * probes * B); out:
   (nq, depth * probes) leaves, -1 padded; held: (nq,) rows of the found leaves by sizes.
   Each level keeps the `probes` best nodes, ties to the lower node id. */
extern "C" __global__ void beam_route(
    const float* scores, const long long n_nodes,
    const long long* children, const int branching, const long long* leaf_of_node,
    const long long* sizes, const int probes, const int depth, const long long nq,
    long long* scratch, long long* out, long long* held)
{
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= nq) return;
    const long long width = (long long)probes * branching;
    long long* cur = scratch + q * 2 * width;
    long long* nxt = cur + width;
    const float* s = scores + q * n_nodes;
    long long* leaves = out + q * (long long)depth * probes;
    long long f = 0, found = 0, rows = 0;
    for (int c = 0; c < branching; ++c) {
        if (children[c] >= 0) cur[f++] = children[c];
    }
    for (int level = 0; level < depth && f > 0; ++level) {
        const long long keep = f < probes ? f : probes;
        for (long long i = 0; i < keep; ++i) {
            long long best = i;
            for (long long j = i + 1; j < f; ++j) {
                const float sj = s[cur[j]], sb = s[cur[best]];
                if (sj < sb || (sj == sb && cur[j] < cur[best])) best = j;
            }
            const long long tmp = cur[i]; cur[i] = cur[best]; cur[best] = tmp;
        }
        long long nf = 0;
        for (long long i = 0; i < keep; ++i) {
            const long long node = cur[i];
            const long long leaf = leaf_of_node[node];
            if (leaf >= 0) {
                leaves[found++] = leaf;
                rows += sizes[leaf];
            } else {
                for (int c = 0; c < branching; ++c) {
                    const long long child = children[node * branching + c];
                    if (child >= 0) nxt[nf++] = child;
                }
            }
        }
        long long* tmp = cur; cur = nxt; nxt = tmp;
        f = nf;
    }
    for (long long i = found; i < (long long)depth * probes; ++i) leaves[i] = -1;
    held[q] = rows;
}

/* The k best of each query's m candidates by (distance, row), as scan.rerank: one thread
   per query, insertion into its sorted output. dist: (nq, m); rows: (nq, m), -1 for none;
   out_rows, out_dist: (nq, k), padded with -1 and inf. */
extern "C" __global__ void top_k(
    const float* dist, const long long* rows, const int m, const int k, const long long nq,
    long long* out_rows, float* out_dist)
{
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= nq) return;
    const float* d = dist + q * m;
    const long long* r = rows + q * m;
    long long* best_rows = out_rows + q * k;
    float* best = out_dist + q * k;
    int n = 0;
    for (int j = 0; j < m; ++j) {
        const long long row = r[j];
        const float v = d[j] + 0.0f;  /* -0.0 ties with +0.0 and falls back on the row */
        if (row < 0 || isinf(v) || isnan(v)) continue;
        if (n == k && !(v < best[k - 1] || (v == best[k - 1] && row < best_rows[k - 1])))
            continue;
        int i = n < k ? n++ : k - 1;
        while (i > 0 && (best[i - 1] > v || (best[i - 1] == v && best_rows[i - 1] > row))) {
            best[i] = best[i - 1];
            best_rows[i] = best_rows[i - 1];
            --i;
        }
        best[i] = v;
        best_rows[i] = row;
    }
    for (int i = n; i < k; ++i) {
        best[i] = __int_as_float(0x7f800000);
        best_rows[i] = -1;
    }
}
"""


def _import_cupy() -> Any:
    import cupy  # type: ignore[import-not-found,unused-ignore]

    return cupy


def _module(cupy: Any) -> Any:
    # --fmad=false: a fused multiply-add rounds once where NumPy rounds twice.
    return cupy.RawModule(code=_SOURCE, options=("--fmad=false",))


def probe() -> tuple[Any, str | None]:
    """``(cupy, None)`` when CuPy imports, sees a device and runs a kernel; else
    ``(None, reason)``, the reason naming what to install or check."""
    try:
        cupy = _import_cupy()
    except ImportError:
        return None, (
            "CuPy is not installed; pip install 'vectordb[gpu-cuda12]' (CUDA 12) or "
            "'vectordb[gpu-cuda13]' (CUDA 13)"
        )
    except Exception as exc:  # a broken CuPy install raises all sorts
        return None, f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        devices = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return None, f"no usable CUDA device ({type(exc).__name__}: {exc})"
    if devices < 1:
        return None, "no CUDA device found"
    try:
        kernel = _module(cupy).get_function("hamming_u16")
        codes = cupy.asarray(np.array([[0b1011], [0b1]], dtype=np.uint64))  # (w=2, n=1)
        query = cupy.asarray(np.array([[0b0001, 0b0]], dtype=np.uint64))
        out = cupy.zeros((1, 1), dtype=np.uint16)
        kernel((1,), (32,), (codes, np.int64(1), np.int32(2), query, np.int64(1), out))
        if int(out.get()[0, 0]) != 3:
            return None, "a CUDA test kernel returned a wrong result"
    except Exception as exc:
        return None, (
            f"a CUDA kernel failed to compile or run ({type(exc).__name__}: {exc}); install "
            "the CuPy package matching your CUDA driver (cupy-cuda12x or cupy-cuda13x)"
        )
    return cupy, None


class _IdCache:
    """Device copies of host objects, dropped when the object dies.

    Keyed by identity: parts, trees and quantizers never change once made (a write makes
    new ones), so the copy of one stays valid as long as the object lives.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, obj: Any, make: Callable[[Any], Any]) -> Any:
        key = id(obj)
        hit = self._items.get(key)
        if hit is not None and hit[0]() is obj:
            return hit[1]
        value = make(obj)
        items = self._items

        def forget(_: weakref.ref[Any]) -> None:
            items.pop(key, None)  # runs when obj dies, before its id can be reused

        items[key] = (weakref.ref(obj, forget), value)
        return value


class _VectorMirror:
    """A device copy of one storage's vectors, grown as rows are appended.

    Storage rows never change once written, so a sync copies only rows added since the
    last one. A grown copy is a new device array: selectors holding the old one keep it.
    """

    def __init__(self, cupy: Any, dim: int) -> None:
        self._cp = cupy
        self._buf = cupy.empty((0, dim), dtype=cupy.float32)
        self._n = 0
        self._lock = threading.Lock()

    def sync(self, storage: Any) -> Any:
        """``(n, d)`` float32 device array of the storage's rows as they are now."""
        cp = self._cp
        with self._lock:
            n = int(storage.n)
            if n > self._buf.shape[0]:
                grown = cp.empty((max(n, 2 * self._buf.shape[0]), self._buf.shape[1]), cp.float32)
                grown[: self._n] = self._buf[: self._n]
                self._buf = grown
            step = max(1, _UPLOAD_BYTES // (4 * max(1, self._buf.shape[1])))
            for a in range(self._n, n, step):
                b = min(n, a + step)
                self._buf[a:b] = cp.asarray(np.ascontiguousarray(storage.slice(a, b)))
            self._n = n
            return self._buf[:n]


def _fits(cupy: Any, nbytes: int) -> bool:
    free, _ = cupy.cuda.runtime.memGetInfo()
    return bool(nbytes <= _VECTOR_SHARE * free)


class _DevicePart:
    """One part's slot arrays on the device (see ``parts.Part``)."""

    def __init__(self, cupy: Any, part: Part, words: int) -> None:
        if part.codes is None or part.norms is None:
            raise TypeError("this part holds no codes")
        self.n = part.size
        self.codes = cupy.asarray(part.codes if part.size else np.zeros((words, 1), np.uint64))
        self.norms = cupy.asarray(part.norms if part.size else np.zeros(1, np.float32))
        dots = part.dots if part.dots is not None and part.size else np.zeros(1, np.float32)
        self.dots = cupy.asarray(dots)
        self.rows_given = part.rows is not None
        rows = part.rows if part.rows is not None and part.size else np.zeros(1, np.int64)
        self.rows = cupy.asarray(rows)
        self.offsets = cupy.asarray(part.offsets)


class CupyCodeSelector:
    """Searches one state of an index on the GPU (see the module docstring)."""

    def __init__(
        self,
        backend: CupyBackend,
        table: CodeTable,
        parts: Sequence[Part],
        stages: Stages,
    ) -> None:
        cp = self._cp = backend._cp
        self.table = table
        self.stages = stages
        self.metric = stages.metric
        base, delta = parts
        if base.codes is None:
            raise TypeError("these parts hold no codes")
        self.words = int(base.codes.shape[0])
        self._kernel = backend._score
        self._beam_kernel = backend._beam
        self._top_k_kernel = backend._top_k
        self._base = backend._parts.get(base, lambda p: _DevicePart(cp, p, self.words))
        self._delta = _DevicePart(cp, delta, self.words)
        self._tree = backend._trees.get(stages.tree, lambda t: ds.DeviceTree.upload(cp, t))
        self._rotation = backend._rotations.get(stages.quantizer, lambda q: _rotation(cp, q))
        self._lut = backend._luts.get(table.cos_lut, cp.asarray)
        self._max_rows = max(1, int((np.diff(base.offsets) + np.diff(delta.offsets)).max()))
        self._vectors = backend.vectors_of(stages.storage)
        self._host = NumpyCodeSelector(table, parts, stages)
        self._no_mask = cp.zeros(1, dtype=cp.uint8)
        self._last: dict[str, tuple[weakref.ref[Any], Any]] = {}
        self._local = threading.local()
        cp.cuda.runtime.deviceSynchronize()

    @property
    def device_bytes(self) -> int:
        """Bytes of device memory this state reads (shared copies included)."""
        arrays = [
            self._base.codes,
            self._base.norms,
            self._base.rows,
            self._delta.codes,
            self._delta.norms,
            self._delta.rows,
            self._tree.centroids,
            self._tree.children,
        ]
        if self._vectors is not None:
            arrays.append(self._vectors)
        return sum(int(a.nbytes) for a in arrays)

    @property
    def vectors_on_device(self) -> bool:
        """Whether the exact rerank runs on the device (the vectors fit there)."""
        return self._vectors is not None

    def _stream(self) -> Any:
        # One stream per thread, so batches from different executor threads overlap.
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._cp.cuda.Stream(non_blocking=True)
        return stream

    def _upload(self, name: str, host: Any, as_type: Any = None) -> Any:
        """``host`` on the device, reusing the copy made for the same object last time
        (tombstones and leaf sizes are the same object for every search of a state)."""
        hit = self._last.get(name)
        if hit is not None and hit[0]() is host:
            return hit[1]
        arr = host if as_type is None else host.view(as_type)
        value = self._cp.asarray(arr)
        # Other threads may reuse this copy on their own streams: let it land first.
        self._cp.cuda.get_current_stream().synchronize()
        with contextlib.suppress(TypeError):  # not weakly referenceable: no reuse
            self._last[name] = (weakref.ref(host), value)
        return value

    def search(
        self, q: F32, k: int, probes: int, m: int, row_ok: B | None, sizes: I64, need: int
    ) -> tuple[I64, F32]:
        """Rows ``(nq, k)`` int64 and distances ``(nq, k)`` float32 for prepared ``q``.

        Batches of fewer than ``MIN_DEVICE_BATCH`` queries run on the CPU instead.
        """
        nq = q.shape[0]
        if nq < MIN_DEVICE_BATCH:
            return host_search(self.stages, self._host, q, k, probes, m, row_ok, sizes, need)
        self.stages.storage.slice(0, 0)  # a closed storage raises, as on the CPU path
        out_rows = np.empty((nq, k), dtype=np.int64)
        out_dist = np.empty((nq, k), dtype=np.float32)
        # Probed leaves per query, before any widening of the beam.
        width = max(1, probes * max(1, self._tree.depth)) * self._max_rows
        block = max(1, _KEY_BYTES // (8 * width))
        with self._stream() as stream:
            ok = None if row_ok is None else self._upload("row_ok", row_ok, np.uint8)
            d_sizes = self._upload("sizes", np.asarray(sizes, dtype=np.int64))
            for start in range(0, nq, block):
                stop = min(nq, start + block)
                rows, dists = self._search_block(q[start:stop], k, probes, m, ok, d_sizes, need)
                out_rows[start:stop], out_dist[start:stop] = rows, dists
            stream.synchronize()
        return out_rows, out_dist

    def _search_block(
        self, q: F32, k: int, probes: int, m: int, ok: Any, sizes: Any, need: int
    ) -> tuple[I64, F32]:
        cp = self._cp
        dq = cp.asarray(q)
        perm, blocks_t, bits = self._rotation
        rotated = ds.rotate(cp, dq, perm, blocks_t, bits)
        leaves = self._route(rotated, probes, need, sizes)
        cand = self._candidates(rotated, leaves, m, ok)
        if self._vectors is None:
            return host_rerank(q, cand.get(), k, self.stages.storage.take, self.metric)
        rows, dists = self._rerank(dq, cand, k)
        return rows.get(), dists.get()

    def _route(self, rotated: Any, probes: int, need: int, sizes: Any) -> Any:
        """``(nq, L)`` int64 device leaves: ``ds.route_for`` with the beam in one kernel."""
        cp, tree = self._cp, self._tree
        nq = rotated.shape[0]
        if tree.depth == 0:
            return cp.zeros((nq, 1), dtype=cp.int64)
        scores = rotated @ tree.centroids.T  # (nq, n_nodes), as tree._approx_scores
        if self.metric is Metric.IP:
            cp.negative(scores, out=scores)
        else:
            scores *= cp.float32(-2.0)
            scores += tree.c_sq[None, :]
        leaves, held = self._beam(scores, probes, sizes)
        short = held < need
        wider = probes
        while wider < tree.n_nodes and bool(short.any()):
            wider *= 2
            idx = cp.flatnonzero(short)
            more, more_held = self._beam(cp.ascontiguousarray(scores[idx]), wider, sizes)
            if more.shape[1] > leaves.shape[1]:
                pad = cp.full((nq, more.shape[1] - leaves.shape[1]), -1, dtype=cp.int64)
                leaves = cp.concatenate([leaves, pad], axis=1)
            leaves[idx] = -1
            leaves[idx, : more.shape[1]] = more
            short[idx] = more_held < need
        return leaves

    def _beam(self, scores: Any, probes: int, sizes: Any) -> tuple[Any, Any]:
        """Leaves ``(nq, depth * probes)`` and rows they hold ``(nq,)`` by ``beam_route``."""
        cp, tree = self._cp, self._tree
        nq = scores.shape[0]
        branching = int(tree.children.shape[1])
        probes = min(probes, tree.n_nodes)
        scratch = cp.empty((nq, 2 * probes * branching), dtype=cp.int64)
        leaves = cp.empty((nq, tree.depth * probes), dtype=cp.int64)
        held = cp.empty(nq, dtype=cp.int64)
        if nq:
            self._beam_kernel(
                ((nq + 127) // 128,),
                (128,),
                (
                    scores,
                    np.int64(tree.n_nodes),
                    tree.children,
                    np.int32(branching),
                    tree.leaf_of_node,
                    sizes,
                    np.int32(probes),
                    np.int32(tree.depth),
                    np.int64(nq),
                    scratch,
                    leaves,
                    held,
                ),
            )
        return leaves, held

    def _rerank(self, dq: Any, cand: Any, k: int) -> tuple[Any, Any]:
        """Device rows ``(nq, k)`` and distances ``(nq, k)``: ``ds.rerank`` with the
        selection in one kernel."""
        cp = self._cp
        dist = ds.candidate_distances(cp, dq, cand, self._vectors, self.metric)
        nq, m = cand.shape
        rows = cp.empty((nq, k), dtype=cp.int64)
        dists = cp.empty((nq, k), dtype=cp.float32)
        if nq:
            self._top_k_kernel(
                ((nq + 127) // 128,),
                (128,),
                (
                    cp.ascontiguousarray(dist),
                    cp.ascontiguousarray(cand),
                    np.int32(m),
                    np.int32(k),
                    np.int64(nq),
                    rows,
                    dists,
                ),
            )
        return rows, dists

    def _candidates(self, rotated: Any, leaves: Any, m: int, ok: Any) -> Any:
        """``(nq, m')`` int64 device rows: the ``m`` best by (estimate, row)."""
        cp = self._cp
        nq, n_slots = leaves.shape
        keep = min(m, n_slots * max(1, min(m, self._max_rows)))
        qcodes, a_term, b_term = ds.query_terms(
            cp, rotated, leaves, self._tree, self.words, self.metric
        )
        pairs = nq * n_slots
        keys = cp.empty((pairs, self._max_rows), dtype=cp.uint64)
        total = pairs * self._max_rows
        b, d = self._base, self._delta
        if total:
            self._kernel(
                ((total + _THREADS - 1) // _THREADS,),
                (_THREADS,),
                (
                    b.codes,
                    np.int64(b.codes.shape[1]),
                    d.codes,
                    np.int64(d.codes.shape[1]),
                    np.int32(self.words),
                    b.norms,
                    d.norms,
                    b.dots,
                    d.dots,
                    b.rows,
                    np.int32(b.rows_given),
                    d.rows,
                    b.offsets,
                    d.offsets,
                    ok if ok is not None else self._no_mask,
                    np.int32(ok is not None),
                    cp.ascontiguousarray(leaves.reshape(-1)),
                    cp.ascontiguousarray(qcodes),
                    cp.ascontiguousarray(a_term, dtype=cp.float32),
                    cp.ascontiguousarray(b_term, dtype=cp.float32),
                    self._lut,
                    np.int32(self.metric is Metric.IP),
                    np.int32(self._max_rows),
                    np.int64(pairs),
                    keys,
                ),
            )
        best = cp.sort(keys.reshape(nq, -1), axis=1)[:, :keep]
        return ds.rows_of(cp, best)

    def select(self, rotated_queries: F32, leaves: I64, m: int, row_ok: B | None = None) -> I64:
        """``(nq, m')`` int64 rows for host-routed queries: the candidates alone."""
        cp = self._cp
        with self._stream() as stream:
            ok = None if row_ok is None else cp.asarray(row_ok.view(np.uint8))
            rows = self._candidates(cp.asarray(rotated_queries), cp.asarray(leaves), m, ok)
            out = rows.get()
            stream.synchronize()
        return np.asarray(out)


def _rotation(cupy: Any, quantizer: Any) -> tuple[Any, Any, int]:
    if quantizer.perm is None or quantizer.blocks is None:
        return None, None, int(quantizer.bits)
    blocks_t = np.ascontiguousarray(quantizer.blocks.transpose(0, 2, 1))
    return cupy.asarray(quantizer.perm), cupy.asarray(blocks_t), int(quantizer.bits)


class CupyBackend:
    """CuPy on a CUDA device. Create through ``backends.resolve_backend``."""

    name = "cupy"

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy
        module = _module(cupy)
        self._hamming = module.get_function("hamming_u16")
        self._score = module.get_function("score_keys")
        self._beam = module.get_function("beam_route")
        self._top_k = module.get_function("top_k")
        self._parts = _IdCache()
        self._trees = _IdCache()
        self._rotations = _IdCache()
        self._luts = _IdCache()
        self._mirrors = _IdCache()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def vectors_of(self, storage: Any) -> Any:
        """The device copy of ``storage``'s vectors, synced; ``None`` when they would take
        more than half of the free device memory (the rerank then runs on the host)."""
        with self._lock:
            mirror = self._mirrors.get(storage, lambda s: self._new_mirror(s))
            if mirror is None:
                return None
            return mirror.sync(storage)

    def _new_mirror(self, storage: Any) -> _VectorMirror | None:
        dim = int(storage.slice(0, 0).shape[1])
        nbytes = 4 * dim * int(storage.n)
        if not _fits(self._cp, 2 * nbytes):  # 2x: room to grow by adds
            if "vectors" not in self._warned:
                self._warned.add("vectors")
                log.info(
                    "cupy backend: %.1f GB of vectors exceed half the free device memory; "
                    "reranking on the host",
                    nbytes / 1e9,
                )
            return None
        return _VectorMirror(self._cp, dim)

    def hamming(self, queries: U64, codes: U64) -> npt.NDArray[np.uint16]:
        """Same contract as the NumPy backend's ``hamming``, computed on the device.

        Accepts host (NumPy) or device (CuPy) arrays; returns a NumPy array.
        """
        return self.hamming_device(self._cp.asarray(queries), self._cp.asarray(codes)).get()

    def hamming_device(self, queries: Any, codes: Any) -> Any:
        """``hamming`` on device arrays, result left on the device: ``(nq, m)`` uint16."""
        cp = self._cp
        queries = cp.ascontiguousarray(queries)
        codes = cp.ascontiguousarray(codes)
        nq, m = int(queries.shape[0]), int(codes.shape[1])
        out = cp.empty((nq, m), dtype=cp.uint16)
        total = nq * m
        if total:
            self._hamming(
                ((total + _THREADS - 1) // _THREADS,),
                (_THREADS,),
                (codes, np.int64(m), np.int32(codes.shape[0]), queries, np.int64(nq), out),
            )
        return out

    def code_selector(
        self, table: CodeTable, parts: Sequence[Part], stages: Stages
    ) -> CupyCodeSelector:
        """A selector over ``parts`` and ``stages``, copied to the device (once each)."""
        return CupyCodeSelector(self, table, parts, stages)
