"""The CUDA backend: the whole search of a batch on the GPU, with CuPy.

Only this module imports CuPy, and only when a CuPy backend is asked for. What a search
reads is copied to the device once and kept there: the tree, the rotation, the codes
(the base part once per base, the small delta part at each write) and, when they fit in
half the free device memory, the full vectors (only rows added since the last copy are
sent). A batch then crosses the bus twice: its queries in, its ``(nq, k)`` results out.

On the device (see ``device_search``): rotate, route, compute the query codes, score every
(query, probed leaf, slot) in one kernel that also masks deleted or filtered rows and
builds the ``topk`` keys and error bounds, sort each query's keys, keep the best ``m``
less those outside the bound of the ``k``-th (``topk.within_bound``), and rerank them
exactly. When
the vectors stay on the host, the candidate rows come back and are reranked there.

The scoring kernel computes the estimate of a code from the same inputs exactly as NumPy
does (compiled without fused multiply-add). The other float32 steps (rotation, routing,
exact distances) sum in another order than NumPy's, so a query's floats may differ in the
last bits: its code can differ in a coordinate within rounding of zero, and where two
leaves or two candidates tie within rounding the backends may choose differently. Recall
is the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import F32, I64, U64
from ..core.codes import CodeTable
from ..core.parts import Part
from ..core.topk import within_bound
from ..search import route as routing
from ..search.candidates import candidate_width
from ..search.pipeline import HostSearcher, SearchInputs, SearchRequest
from ..search.rerank import rerank as host_rerank
from . import device_search as ds
from .cuda_kernels import SOURCE
from .device_memory import DevicePart, IdCache, VectorMirror, fits, rotation
from .numpy_backend import NumpyCodeSelector

__all__ = ["CupyBackend", "CupySearcher", "probe"]

log = logging.getLogger("vectordb")


#: Most bytes of device temporaries (routing scores, keys, query codes) per block of queries.
_BLOCK_BYTES = 512 << 20
#: Widest beam the routing kernel runs; wider ones (a widened search) use array code.
_KERNEL_PROBES = 32
_THREADS = 256
#: The full vectors go to the device only if they fit in this share of its free memory.
_VECTOR_SHARE = 0.5
#: Batches of fewer queries run on the CPU: a GPU batch costs ~2 ms however small (kernel
#: launches; 1.8 ms for 64 queries on an H200), the CPU ~1 ms per lone query.
MIN_DEVICE_BATCH = 8


def _import_cupy() -> Any:
    import cupy  # type: ignore[import-not-found,unused-ignore]

    return cupy


def _module(cupy: Any) -> Any:
    # --fmad=false: a fused multiply-add rounds once where NumPy rounds twice.
    return cupy.RawModule(code=SOURCE, options=("--fmad=false",))


def probe() -> tuple[Any, str | None]:
    """``(cupy, None)`` when CuPy imports, sees a device and runs a kernel; else
    ``(None, reason)``, the reason naming what to install or check."""
    try:
        cupy = _import_cupy()
    except ImportError:
        return None, (
            "CuPy is not installed; pip install 'vectordb-embedded[gpu-cuda12]' (CUDA 12) or "
            "'vectordb-embedded[gpu-cuda13]' (CUDA 13)"
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
        kernel = _module(cupy).get_function("plane_dots")
        codes = cupy.asarray(np.array([[0b1011], [0b1]], dtype=np.uint64))  # (w=2, n=1)
        planes = cupy.asarray(np.array([[[0b0011, 0b1], [0b1000, 0b0]]], dtype=np.uint64))
        out = cupy.zeros((1, 1), dtype=np.uint32)
        args = (codes, np.int64(1), np.int32(2), np.int32(1), np.int32(2), planes, np.int64(1))
        kernel((1,), (32,), (*args, out))
        if int(out.get()[0, 0]) != 3 + 2 * 1:
            return None, "a CUDA test kernel returned a wrong result"
    except Exception as exc:
        return None, (
            f"a CUDA kernel failed to compile or run ({type(exc).__name__}: {exc}); install "
            "the CuPy package matching your CUDA driver (cupy-cuda12x or cupy-cuda13x)"
        )
    return cupy, None


class CupySearcher:
    """Searches one state of an index on the GPU (see the module docstring)."""

    def __init__(
        self,
        backend: CupyBackend,
        table: CodeTable,
        parts: Sequence[Part],
        inputs: SearchInputs,
    ) -> None:
        cp = self._cp = backend._cp
        self.table = table
        self.inputs = inputs
        self.metric = inputs.metric
        base, delta = parts
        if base.codes is None:
            raise TypeError("these parts hold no codes")
        self.code_bits = table.code_bits
        self.words = int(base.codes.shape[0]) // self.code_bits
        self._kernel = backend._score
        self._beam_kernel = backend._beam
        self._top_k_kernel = backend._top_k
        rows = int(base.codes.shape[0])
        self._base = backend._parts.get(base, lambda p: DevicePart(cp, p, rows))
        self._delta = DevicePart(cp, delta, rows)
        self._tree = backend._trees.get(inputs.tree, lambda t: ds.DeviceTree.upload(cp, t))
        self._rotation = backend._rotations.get(inputs.quantizer, lambda q: rotation(cp, q))
        self._vectors = backend.vectors_of(inputs.storage)
        codes = NumpyCodeSelector(table, parts)
        self._host = HostSearcher(inputs, codes)
        self._max_rows = max(1, int(codes.sizes.max(initial=0)))
        self._no_mask = cp.zeros(1, dtype=cp.uint8)
        self._last: dict[str, tuple[weakref.ref[Any], Any]] = {}
        self._stream = backend.stream
        # The copies above went to this thread's current stream; the state is published
        # after this returns, so they must have landed (searches use other streams).
        cp.cuda.get_current_stream().synchronize()

    @property
    def vectors_on_device(self) -> bool:
        """Whether the exact rerank runs on the device (the vectors fit there)."""
        return self._vectors is not None

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

    def rerank(self, q: F32, rows: I64, k: int) -> tuple[I64, F32]:
        """See :class:`~vectordb.search.pipeline.Searcher`: on the CPU."""
        return self._host.rerank(q, rows, k)

    def search(self, q: F32, request: SearchRequest) -> tuple[I64, F32]:
        """Rows ``(nq, k)`` int64 and distances ``(nq, k)`` float32 for prepared ``q``
        (see :class:`~vectordb.search.pipeline.Searcher`).

        Batches of fewer than ``MIN_DEVICE_BATCH`` queries run on the CPU instead.
        """
        nq = q.shape[0]
        if nq < MIN_DEVICE_BATCH:
            return self._host.search(q, request)
        k, probes, m, need = request.k, request.probes, request.candidates, request.need
        row_ok, sizes = request.row_ok, request.live_sizes
        self.inputs.storage.slice(0, 0)  # a closed storage raises, as on the CPU path
        out_rows = np.empty((nq, k), dtype=np.int64)
        out_dist = np.empty((nq, k), dtype=np.float32)
        # Device bytes per query: routing scores, then per probed leaf (at most probes per
        # level before any widening) its keys and its query-code temporaries.
        tree, bits = self._tree, self._rotation[2]
        slots = max(1, probes * max(1, tree.depth))
        per_query = 4 * (tree.n_nodes + 1) + slots * (8 * self._max_rows + 40 * bits)
        block = max(1, _BLOCK_BYTES // per_query)
        with self._stream() as stream:
            ok = None if row_ok is None else self._upload("row_ok", row_ok, np.uint8)
            d_sizes = self._upload("sizes", np.asarray(sizes, dtype=np.int64))
            for start in range(0, nq, block):
                stop = min(nq, start + block)
                rows, dists = self._search_block(
                    q[start:stop], k, probes, m, ok, d_sizes, need, request.bounded
                )
                out_rows[start:stop], out_dist[start:stop] = rows, dists
            stream.synchronize()
        return out_rows, out_dist

    def _search_block(
        self, q: F32, k: int, probes: int, m: int, ok: Any, sizes: Any, need: int, bounded: bool
    ) -> tuple[I64, F32]:
        cp = self._cp
        dq = cp.asarray(q)
        perm, blocks_t, bits = self._rotation
        rotated = ds.rotate(cp, dq, perm, blocks_t, bits)
        leaves, wide = self._route(rotated, probes, need, sizes)
        cand = self._candidates(rotated, leaves, m, ok, k if bounded else m)
        if wide is not None:
            # Queries whose beam had to widen are scored on their own, so that their many
            # leaves do not pad every other query's row.
            idx, more = wide
            extra = self._candidates(rotated[idx], more, m, ok, k if bounded else m)
            width = max(cand.shape[1], extra.shape[1])
            merged = cp.full((cand.shape[0], width), -1, dtype=cp.int64)
            merged[:, : cand.shape[1]] = cand
            merged[idx] = -1
            merged[idx, : extra.shape[1]] = extra
            cand = merged
        if self._vectors is None:
            return host_rerank(q, cand.get(), k, self.inputs.storage.take, self.metric)
        rows, dists = self._rerank(dq, cand, k)
        return rows.get(), dists.get()

    def _route(
        self, rotated: Any, probes: int, need: int, sizes: Any
    ) -> tuple[Any, tuple[Any, Any] | None]:
        """Leaves of rotated queries ``(nq, bits)``, as :func:`~vectordb.search.route.route_for`.

        Returns ``(nq, L)`` int64 leaves, trimmed (see ``ds.trim``), and for the queries
        whose leaves hold fewer than ``need`` rows by ``sizes``: their indices and their
        leaves with ``probes`` doubled until they hold enough (else ``None``).
        """
        cp, tree = self._cp, self._tree
        nq = rotated.shape[0]
        if tree.depth == 0:
            return cp.zeros((nq, 1), dtype=cp.int64), None
        n_leaves = int(tree.leaf_nodes.shape[0])
        scores = ds.node_scores(cp, rotated, tree, self.metric)
        leaves = self._nearest(scores, probes, sizes)
        short = cp.flatnonzero(ds.rows_held(cp, leaves, sizes) < need)
        if short.shape[0] == 0 or probes >= n_leaves:
            return leaves, None
        wide = cp.full((short.shape[0], 1), -1, dtype=cp.int64)
        pos, idx, wider = cp.arange(short.shape[0]), short, probes
        while wider < n_leaves and idx.shape[0]:
            wider *= 2
            more = self._nearest(cp.ascontiguousarray(scores[idx]), wider, sizes)
            if more.shape[1] > wide.shape[1]:
                pad = cp.full((wide.shape[0], more.shape[1] - wide.shape[1]), -1, cp.int64)
                wide = cp.concatenate([wide, pad], axis=1)
            wide[pos] = -1
            wide[pos, : more.shape[1]] = more
            still = ds.rows_held(cp, more, sizes) < need
            pos, idx = pos[still], idx[still]
        return leaves, (short, ds.trim(cp, wide))

    def _nearest(self, scores: Any, probes: int, sizes: Any) -> Any:
        """The ``probes`` nearest leaves ``(nq, L)`` (trimmed) for :func:`ds.node_scores`
        ``scores``: of all leaves up to ``FLAT_MAX_LEAVES``, else of a wide beam's."""
        cp, tree = self._cp, self._tree
        reached = None
        if int(tree.leaf_nodes.shape[0]) > routing.FLAT_MAX_LEAVES:
            reached, _ = self._beam(scores, routing.beam_width(probes), sizes)
        return ds.trim(cp, ds.nearest_leaves(cp, scores, tree, probes, reached), packed=True)

    def _beam(self, scores: Any, probes: int, sizes: Any) -> tuple[Any, Any]:
        """Leaves ``(nq, L)`` int64 (``-1`` padded) and the rows they hold ``(nq,)`` for
        :func:`ds.node_scores` ``scores``: the ``beam_route`` kernel for narrow beams,
        array code for wide ones (the kernel's selection grows as ``probes**2``)."""
        cp, tree = self._cp, self._tree
        nq = scores.shape[0]
        if probes > _KERNEL_PROBES:
            leaves = ds.beam(cp, scores, tree, probes)
            return leaves, ds.rows_held(cp, leaves, sizes)
        branching = int(tree.children.shape[1])
        scratch = cp.empty((nq, 2 * probes * branching), dtype=cp.int64)
        leaves = cp.empty((nq, tree.depth * probes), dtype=cp.int64)
        held = cp.empty(nq, dtype=cp.int64)
        if nq:
            self._beam_kernel(
                ((nq + 127) // 128,),
                (128,),
                (
                    scores,
                    np.int64(scores.shape[1]),
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
        """Device rows ``(nq, k)`` int64 and distances ``(nq, k)`` float32 of the ``k``
        best candidates, as ``search.rerank.rerank``: exact distances, then the ``top_k`` kernel."""
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

    def _candidates(self, rotated: Any, leaves: Any, m: int, ok: Any, k: int) -> Any:
        """``(nq, m')`` int64 device rows, ``-1`` padded: the ``m`` best by (estimate, row),
        less those outside the error bound of the ``k``-th (``topk.within_bound``)."""
        cp = self._cp
        nq, n_slots = leaves.shape
        keep = candidate_width(m, n_slots, self._max_rows)
        terms = ds.query_terms(
            cp, rotated, leaves, self._tree, self.words, self.metric, self.code_bits
        )
        pairs = nq * n_slots
        keys = cp.empty((pairs, self._max_rows), dtype=cp.uint64)
        radius = cp.empty((pairs, self._max_rows), dtype=cp.float32)
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
                    np.int32(self.code_bits),
                    b.factors,
                    d.factors,
                    b.rows,
                    np.int32(b.rows_given),
                    d.rows,
                    b.offsets,
                    d.offsets,
                    ok if ok is not None else self._no_mask,
                    np.int32(ok is not None),
                    cp.ascontiguousarray(leaves.reshape(-1)),
                    np.int64(n_slots),
                    cp.ascontiguousarray(terms.planes),
                    np.int32(terms.planes.shape[1]),
                    cp.ascontiguousarray(terms.lo, dtype=cp.float32),
                    cp.ascontiguousarray(terms.delta, dtype=cp.float32),
                    cp.ascontiguousarray(terms.total, dtype=cp.float32),
                    cp.ascontiguousarray(terms.slack, dtype=cp.float32),
                    cp.ascontiguousarray(terms.p, dtype=cp.float32),
                    cp.ascontiguousarray(terms.r_q, dtype=cp.float32),
                    np.int32(self._max_rows),
                    np.int64(pairs),
                    keys,
                    radius,
                ),
            )
        keys, radius = keys.reshape(nq, -1), radius.reshape(nq, -1)
        order = cp.argsort(keys, axis=1)[:, :keep]
        best = cp.take_along_axis(keys, order, axis=1)
        return within_bound(best, cp.take_along_axis(radius, order, axis=1), k, xp=cp)


class CupyBackend:
    """CuPy on a CUDA device. Create through ``backends.resolve_backend``."""

    name = "cupy"

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy
        module = _module(cupy)
        self._plane_dots = module.get_function("plane_dots")
        self._score = module.get_function("score_keys")
        self._beam = module.get_function("beam_route")
        self._top_k = module.get_function("top_k")
        self._parts = IdCache()
        self._trees = IdCache()
        self._rotations = IdCache()
        self._mirrors = IdCache()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._warned: set[str] = set()

    def stream(self) -> Any:
        """This thread's CUDA stream: batches from different executor threads overlap."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._cp.cuda.Stream(non_blocking=True)
        return stream

    def vectors_of(self, storage: Any) -> Any:
        """The device copy of ``storage``'s vectors, synced; ``None`` when they would take
        more than half of the free device memory, or stopped fitting as they grew (the
        rerank then runs on the host)."""
        with self._lock:
            mirror = self._mirrors.get(storage, lambda s: self._new_mirror(s))
            if mirror is None:
                return None
            return mirror.sync(storage)

    def _new_mirror(self, storage: Any) -> VectorMirror | None:
        dim = int(storage.slice(0, 0).shape[1])
        nbytes = 4 * dim * int(storage.n)
        if not fits(self._cp, 2 * nbytes, _VECTOR_SHARE):  # 2x: room to grow by adds
            if "vectors" not in self._warned:
                self._warned.add("vectors")
                log.info(
                    "cupy backend: %.1f GB of vectors exceed half the free device memory; "
                    "reranking on the host",
                    nbytes / 1e9,
                )
            return None
        return VectorMirror(self._cp, dim, _VECTOR_SHARE)

    def plane_dots(self, planes: U64, codes: U64) -> npt.NDArray[np.uint32]:
        """``core.codes.plane_dots`` computed on the device: ``(nq, m)`` uint32.

        Accepts host (NumPy) or device (CuPy) arrays; returns a NumPy array.
        """
        cp = self._cp
        return self.plane_dots_device(cp.asarray(planes), cp.asarray(codes)).get()

    def plane_dots_device(self, planes: Any, codes: Any) -> Any:
        """``plane_dots`` on device arrays, the result left on the device."""
        cp = self._cp
        planes = cp.ascontiguousarray(planes)
        codes = cp.ascontiguousarray(codes)
        nq, n_planes, w = (int(x) for x in planes.shape)
        m, code_bits = int(codes.shape[1]), int(codes.shape[0]) // w
        out = cp.empty((nq, m), dtype=cp.uint32)
        total = nq * m
        if total:
            self._plane_dots(
                ((total + _THREADS - 1) // _THREADS,),
                (_THREADS,),
                (
                    codes,
                    np.int64(m),
                    np.int32(w),
                    np.int32(code_bits),
                    np.int32(n_planes),
                    planes,
                    np.int64(nq),
                    out,
                ),
            )
        return out

    def searcher(
        self, table: CodeTable, parts: Sequence[Part], inputs: SearchInputs
    ) -> CupySearcher:
        """A searcher over ``parts`` and ``inputs``, copied to the device (once each)."""
        return CupySearcher(self, table, parts, inputs)
