"""The CUDA backend: binary-code scoring and top-k selection on the GPU with CuPy.

Only this module imports CuPy, and only when a CuPy backend is asked for. The codes,
residual norms and leaf offsets are uploaded once; each batch uploads its query codes and
norms (computed on the CPU by ``codes.query_side``, exactly as for NumPy), runs one kernel
that scores every (query, leaf, row) and turns scores into ``topk`` keys, sorts the keys of
each query on the device, and brings back only the candidate rows for the exact rerank.

Scores are bit-for-bit NumPy's: the kernel does the same float32 operations in the same
order, compiled without fused multiply-add, so both backends select the same candidates.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..codes import CodeTable, query_side
from ..metrics import Metric
from ..parts import Part

__all__ = ["CupyBackend", "CupyCodeSelector", "probe"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]

#: Most bytes of score keys held on the device per chunk of queries.
_KEY_BYTES = 512 << 20
_THREADS = 256

_SOURCE = r"""
#define FMAX 3.4028234663852886e+38f

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

/* Slots of leaf l: base[l]..base[l+1], then delta[l]..delta[l+1] (delta offsets already
   shifted past the base). Slot s holds storage row rows[s]; row_ok (may be null) masks rows. */
extern "C" __global__ void score_keys(
    const unsigned long long* codes, const long long n, const int w,
    const float* norms, const float* dots, const long long* rows,
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
    if (leaf < 0) { keys[t] = 0xFFFFFFFFFFFFFFFFULL; return; }
    const long long j = t % max_rows;
    const long long in_base = base[leaf + 1] - base[leaf];
    long long slot;
    if (j < in_base) slot = base[leaf] + j;
    else {
        slot = delta[leaf] + (j - in_base);
        if (slot >= delta[leaf + 1]) { keys[t] = 0xFFFFFFFFFFFFFFFFULL; return; }
    }
    const long long row = rows[slot];
    if (use_ok && !row_ok[row]) { keys[t] = 0xFFFFFFFFFFFFFFFFULL; return; }
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


class CupyCodeSelector:
    """Candidate selection over codes resident on the GPU (both parts, uploaded once)."""

    def __init__(self, cupy: Any, table: CodeTable, parts: Sequence[Part]) -> None:
        self._cp = cupy
        self.table = table
        base, delta = parts
        if base.codes is None or delta.codes is None or base.norms is None:
            raise TypeError("these parts hold no codes")
        self._kernel = _module(cupy).get_function("score_keys")
        self._codes = cupy.asarray(np.concatenate([base.codes, delta.codes], axis=1))
        self._norms = cupy.asarray(np.concatenate([base.norms, delta.norms]))
        dots = (
            np.concatenate([base.dots, delta.dots])
            if base.dots is not None
            else np.zeros(1, np.float32)
        )
        self._dots = cupy.asarray(dots)
        self._rows = cupy.asarray(np.concatenate([base.all_rows, delta.all_rows]))
        self._base = cupy.asarray(base.offsets)
        self._delta = cupy.asarray(delta.offsets + base.size)
        self._lut = cupy.asarray(table.cos_lut)
        self._max_rows = max(1, int((np.diff(base.offsets) + np.diff(delta.offsets)).max()))
        self._no_mask = cupy.zeros(1, dtype=cupy.uint8)
        self._local = threading.local()
        cupy.cuda.runtime.deviceSynchronize()

    @property
    def device_bytes(self) -> int:
        arrays = (self._codes, self._norms, self._dots, self._rows, self._base, self._lut)
        return sum(int(a.nbytes) for a in arrays)

    def _stream(self) -> Any:
        # One stream per executor thread, so batches from different threads overlap.
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._cp.cuda.Stream(non_blocking=True)
        return stream

    def select(self, rotated_queries: F32, leaves: I64, m: int, row_ok: B | None = None) -> I64:
        """``(nq, m')`` int64 rows, the same set ``NumpyCodeSelector.select`` returns."""
        nq, n_slots = leaves.shape
        per_slot = max(1, min(m, self._max_rows))
        keep = min(m, n_slots * per_slot)
        out = np.empty((nq, keep), dtype=np.int64)
        width = n_slots * self._max_rows
        block = max(1, _KEY_BYTES // (8 * width))
        with self._stream() as stream:
            ok = None if row_ok is None else self._cp.asarray(row_ok.view(np.uint8))
            for start in range(0, nq, block):
                stop = min(nq, start + block)
                out[start:stop] = self._select_block(
                    rotated_queries[start:stop], leaves[start:stop], keep, ok
                )
            stream.synchronize()
        return out

    def _select_block(self, q: F32, leaves: I64, keep: int, ok: Any) -> I64:
        cp, table = self._cp, self.table
        nq, n_slots = leaves.shape
        flat = leaves.reshape(-1)
        valid = flat >= 0
        qi = np.repeat(np.arange(nq), n_slots)[valid]
        side = query_side(table, q[qi], flat[valid])
        pairs = nq * n_slots
        qcodes = np.zeros((pairs, self._codes.shape[0]), dtype=np.uint64)
        qcodes[valid] = side.codes
        a_term = np.zeros(pairs, dtype=np.float32)
        b_term = np.zeros(pairs, dtype=np.float32)
        if side.c_q is not None:  # the ip metric
            a_term[valid] = -side.r_q
            b_term[valid] = side.c_q
        else:
            a_term[valid] = np.float32(-2.0) * side.r_q
            b_term[valid] = side.r_q * side.r_q
        keys = cp.empty((pairs, self._max_rows), dtype=cp.uint64)
        total = pairs * self._max_rows
        self._kernel(
            ((total + _THREADS - 1) // _THREADS,),
            (_THREADS,),
            (
                self._codes,
                np.int64(self._codes.shape[1]),
                np.int32(self._codes.shape[0]),
                self._norms,
                self._dots,
                self._rows,
                self._base,
                self._delta,
                ok if ok is not None else self._no_mask,
                np.int32(ok is not None),
                cp.asarray(flat),
                cp.asarray(qcodes),
                cp.asarray(a_term),
                cp.asarray(b_term),
                self._lut,
                np.int32(table.metric is Metric.IP),
                np.int32(self._max_rows),
                np.int64(pairs),
                keys,
            ),
        )
        best = cp.sort(keys.reshape(nq, -1), axis=1)[:, :keep].get()
        rows = (best & np.uint64(0xFFFFFFFF)).astype(np.int64)
        rows[best == np.uint64(np.iinfo(np.uint64).max)] = -1
        return rows


class CupyBackend:
    """CuPy on a CUDA device. Create through ``backends.resolve_backend``."""

    name = "cupy"

    def __init__(self, cupy: Any) -> None:
        self._cp = cupy
        self._hamming = _module(cupy).get_function("hamming_u16")

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

    def code_selector(self, table: CodeTable, parts: Sequence[Part]) -> CupyCodeSelector:
        """Upload the codes of ``parts`` once and return a selector over them."""
        return CupyCodeSelector(self._cp, table, parts)
