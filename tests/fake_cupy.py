"""A stand-in for CuPy, made of NumPy, so the CuPy backend's host code runs without a GPU.

Arrays are NumPy arrays of a subclass with ``.get()``. The CUDA kernels of
``cupy_backend`` are compiled from their own source by the machine's C compiler, with a
few CUDA built-ins defined in C. A launch runs the grid and block it is given: every
thread of every block, with its own ``blockIdx.x``, ``threadIdx.x`` and the real
``blockDim.x``, in a shuffled order (blocks shuffled, and the threads of each block), so a
kernel that indexes its threads wrongly leaves output unwritten or writes it twice.
To make such bugs visible rather than lucky:

* ``empty`` fills new arrays with a poison byte (``POISON``), so output a kernel forgot
  to write reads as garbage, never as a plausible zero;
* every array a kernel is given is copied between guard zones of poison, which must be
  intact after the launch (an out-of-bounds write, e.g. an off-by-one bounds check,
  raises ``KernelError``; out-of-bounds reads see poison);
* every launch runs twice, on separate copies, the second time in the exact reverse
  order of the first: threads that write one place with different values, or read what
  another thread writes, give different results, and the launch raises ``KernelError``.

Threads run one at a time, so a kernel that synchronises its threads (``__syncthreads``,
``__shared__`` memory, warp intrinsics) cannot be emulated and is refused at compile
time. What only a GPU shows (CUDA compilation, streams, speed) is tested on one.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

#: The byte every new array and every guard zone is filled with: 0xA5A5... reads as a
#: negative integer (no row, no leaf) and a tiny negative float, never as a valid result.
POISON = 0xA5
#: Seed of the thread orders; ``VECTORDB_FAKE_CUPY_SEED`` picks another.
SEED = int(os.environ.get("VECTORDB_FAKE_CUPY_SEED", "0"))
#: CUDA's limits on one launch (x dimension).
MAX_BLOCK = 1024
MAX_GRID = (1 << 31) - 1
#: What threads running one at a time cannot do as a GPU does: barriers, shared memory,
#: warp intrinsics, atomics (not defined here, and their order is the GPU's).
_UNSUPPORTED = re.compile(
    r"\b(__syncthreads|__shared__|__syncwarp|__shfl\w*|__ballot\w*|atomic[A-Z]\w*)\b"
)


class KernelError(RuntimeError):
    """An emulated kernel wrote out of bounds, or its result depends on thread order."""


class DeviceArray(np.ndarray):
    """A NumPy array that answers ``.get()`` like a CuPy one."""

    def get(self, stream: Any = None) -> np.ndarray:
        return np.array(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


_PRELUDE = r"""
#include <math.h>
#include <string.h>
/* unsigned int, as CUDA's: a product that overflows there overflows here too */
struct dim3_ { unsigned int x, y, z; };
static __thread struct dim3_ blockIdx, blockDim, threadIdx, gridDim;  /* launches on threads */
#define __global__
#define __device__ static
#define __forceinline__ inline
#define __popcll(x) __builtin_popcountll(x)
static unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
"""
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')

#: Runs every thread of a launch: block ``block_order[i]`` in turn, its threads in the
#: order of ``lane_order`` rotated by ``i`` (so no two blocks run their threads alike);
#: ``reverse`` runs that whole sequence backwards.
_RUNNER = """
void run_{name}(long long grid, long long block, const long long* block_order,
                const long long* lane_order, int reverse, {params}) {{
    gridDim.x = (unsigned int)grid; blockDim.x = (unsigned int)block;
    gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
    for (long long s = 0; s < grid * block; ++s) {{
        const long long u = reverse ? grid * block - 1 - s : s;
        const long long i = u / block, j = u % block;
        blockIdx.x = (unsigned int)block_order[i];
        threadIdx.x = (unsigned int)lane_order[(j + i) % block];
        {name}({names});
    }}
}}
"""


def compiler() -> str | None:
    """The C compiler that runs the CUDA kernels here, or ``None``."""
    return shutil.which("cc") or shutil.which("gcc")


#: What CuPy must be handed for each C parameter type: it passes a scalar by its NumPy
#: dtype's size, so an np.int64 for an ``int`` would shift every later argument.
_DTYPES = {
    "unsigned long long*": np.uint64,
    "unsigned short*": np.uint16,
    "unsigned int*": np.uint32,
    "unsigned char*": np.uint8,
    "long long*": np.int64,
    "float*": np.float32,
    "long long": np.int64,
    "float": np.float32,
    "int": np.int32,
}


def _dtype(param: str) -> Any:
    words = param.replace("const", "").replace("*", " * ").split()[:-1]
    return _DTYPES[" ".join(words).replace(" *", "*")]


def _c_type(param: str) -> Any:
    if "*" in param:
        return ctypes.c_void_p
    if "long long" in param:
        return ctypes.c_longlong
    if "float" in param:
        return ctypes.c_float
    return ctypes.c_int


def _name(param: str) -> str:
    return re.findall(r"(\w+)\s*$", param)[0]


@functools.cache
def _compile(code: str) -> dict[str, Any]:
    """Every kernel of ``code`` as a launcher of C code that runs its threads in turn."""
    used = sorted(set(_UNSUPPORTED.findall(code)))
    if used:
        raise NotImplementedError(
            f"the emulation runs threads one at a time and cannot run kernels that use "
            f"{', '.join(used)}; test them on a GPU"
        )
    kernels = _KERNEL.findall(code)
    src = _PRELUDE + code.replace('extern "C"', "")
    for name, params in kernels:
        names = ", ".join(_name(p) for p in params.split(","))
        src += _RUNNER.format(name=name, params=params, names=names)
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler to run the CUDA kernels on the CPU")
    # The library stays mapped once loaded, so its folder goes at once: nothing is left
    # in the temporary directory, whatever happens to the process later.
    with tempfile.TemporaryDirectory(prefix="vectordb-fake-cupy-") as tmp:
        folder = Path(tmp)
        lib_path = folder / "kernels.so"
        (folder / "kernels.c").write_text(src)
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(lib_path),
             str(folder / "kernels.c"), "-lm"],
            check=True,
        )  # fmt: skip
        lib = ctypes.CDLL(str(lib_path))
    out = {}
    for name, params in kernels:
        fn = getattr(lib, f"run_{name}")
        plist = params.split(",")
        types_ = [_c_type(p) for p in plist]
        fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p]
        fn.argtypes += [ctypes.c_int, *types_]
        fn.restype = None
        out[name] = _Kernel(name, fn, plist, types_)
    return out


def _extent(dims: tuple[int, ...], what: str, limit: int) -> int:
    dims = tuple(int(d) for d in dims)
    if not dims or any(d < 1 for d in dims) or any(d != 1 for d in dims[1:]):
        raise ValueError(f"the emulation launches a 1-D {what} of >= 1, got {dims}")
    if dims[0] > limit:
        raise ValueError(f"{what} of {dims[0]} exceeds CUDA's limit of {limit}")
    return dims[0]


class _Guarded:
    """A copy of an array's bytes between two guard zones of ``POISON``."""

    def __init__(self, arr: np.ndarray) -> None:
        raw = arr.reshape(-1).view(np.uint8)
        row = raw.size // max(1, arr.shape[0]) if arr.ndim else raw.size
        # At least two rows of guard: a thread one past the end reaches a row past it.
        self.pad = -(-max(4096, 2 * row) // 64) * 64
        self.buf = np.full(self.pad + raw.size + self.pad, POISON, dtype=np.uint8)
        self.data = self.buf[self.pad : self.pad + raw.size]
        self.data[:] = raw

    @property
    def pointer(self) -> int:
        return int(self.data.ctypes.data)

    def intact(self) -> bool:
        return bool((self.buf[: self.pad] == POISON).all()) and bool(
            (self.buf[self.pad + self.data.size :] == POISON).all()
        )


class _Kernel:
    """A compiled kernel, called as CuPy's ``RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, name: str, fn: Any, params: list[str], types_: list[Any]) -> None:
        self.name, self._fn, self._types = name, fn, types_
        self._names = [_name(p) for p in params]
        self._dtypes = [_dtype(p) for p in params]
        self._const = ["*" in p and "const" in p.split("*")[0] for p in params]

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]
    ) -> None:
        if len(args) != len(self._types):
            raise TypeError(f"kernel takes {len(self._types)} arguments, got {len(args)}")
        n_blocks = _extent(grid, "grid", MAX_GRID)
        n_lanes = _extent(block, "block", MAX_BLOCK)
        arrays = self._check(args)
        rng = np.random.default_rng([SEED, n_blocks, n_lanes])
        block_order = rng.permutation(n_blocks).astype(np.int64)
        lane_order = rng.permutation(n_lanes).astype(np.int64)
        # Inputs (const pointers: C forbids writes through them) are copied once, outputs
        # once per run, so the two runs start alike and are compared.
        inputs = {i: _Guarded(a) for i, a in arrays.items() if self._const[i]}
        runs = []
        for reverse in (0, 1):
            copies = {i: _Guarded(a) for i, a in arrays.items() if not self._const[i]}
            copies.update(inputs)
            values = [
                copies[i].pointer if i in copies else kind(arg)
                for i, (arg, kind) in enumerate(zip(args, self._types, strict=True))
            ]
            self._fn(n_blocks, n_lanes, block_order.ctypes.data, lane_order.ctypes.data,
                     reverse, *values)  # fmt: skip
            for i, copy in copies.items():
                if not copy.intact():
                    raise KernelError(
                        f"{self.name} wrote outside its argument {self._names[i]!r} "
                        f"(grid {n_blocks}, block {n_lanes})"
                    )
            runs.append(copies)
        for i in arrays:
            if not self._const[i] and not np.array_equal(runs[0][i].data, runs[1][i].data):
                raise KernelError(
                    f"{self.name}: {self._names[i]!r} depends on the order its threads run "
                    f"in (threads write one place, or read what others write)"
                )
        for i, arr in arrays.items():
            if not self._const[i]:
                arr.reshape(-1).view(np.uint8)[:] = runs[0][i].data

    def _check(self, args: tuple[Any, ...]) -> dict[int, np.ndarray]:
        """Types and dtypes of ``args``; the arrays among them, by position."""
        arrays: dict[int, np.ndarray] = {}
        for i, (arg, kind) in enumerate(zip(args, self._types, strict=True)):
            if np.asarray(arg).dtype != self._dtypes[i]:
                raise TypeError(
                    f"argument {i}: {np.asarray(arg).dtype}, expected {np.dtype(self._dtypes[i])}"
                )
            if kind is ctypes.c_void_p:
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"expected an array, got {type(arg).__name__}")
                if not arg.flags.c_contiguous:
                    raise ValueError("a kernel was given a non-contiguous array")
                arrays[i] = arg
            elif isinstance(arg, np.ndarray):
                raise TypeError("expected a scalar, got an array")
        # Each array is copied on its own: arguments sharing memory would no longer share.
        listed = list(arrays.items())
        for n, (i, a) in enumerate(listed):
            for j, b in listed[n + 1 :]:
                if a.nbytes and b.nbytes and np.may_share_memory(a, b):
                    raise ValueError(
                        f"arguments {self._names[i]!r} and {self._names[j]!r} share memory"
                    )
        return arrays


class _Module:
    def __init__(self, code: str = "", options: Any = ()) -> None:
        self.code = code

    def get_function(self, name: str) -> Any:
        return _compile(self.code)[name]


class _Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        pass

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


def empty(shape: Any, dtype: Any = float, order: str = "C") -> DeviceArray:
    """A new C-ordered array of ``POISON`` bytes: what a kernel leaves unwritten shows."""
    if order != "C":
        raise NotImplementedError("the emulation allocates C-ordered arrays only")
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    dt = np.dtype(dtype)
    raw = np.full(int(np.prod(shape, dtype=np.int64)) * dt.itemsize, POISON, dtype=np.uint8)
    return raw.view(dt).reshape(shape).view(DeviceArray)


def empty_like(a: Any, dtype: Any = None) -> DeviceArray:
    arr = np.asarray(a)
    return empty(arr.shape, arr.dtype if dtype is None else dtype)


def make(free_bytes: int = 1 << 40) -> types.ModuleType:
    """A module to put in ``sys.modules["cupy"]``; ``free_bytes`` of device memory."""
    module = types.ModuleType("cupy")

    def asarray(a: Any, dtype: Any = None) -> DeviceArray:
        return np.array(a, dtype=dtype).view(DeviceArray)

    def attribute(name: str) -> Any:
        obj = getattr(np, name)
        if isinstance(obj, type) or not callable(obj):
            return obj  # dtypes, constants

        def call(*args: Any, **kwargs: Any) -> Any:
            return _wrap(obj(*args, **kwargs))

        return call

    module.__getattr__ = attribute  # type: ignore[method-assign]
    module.asarray = asarray
    module.empty = empty
    module.empty_like = empty_like
    module.RawModule = _Module
    module.cuda = types.SimpleNamespace(
        Stream=_Stream,
        get_current_stream=lambda: _Stream(),
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            memGetInfo=lambda: (free_bytes, free_bytes),
        ),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None),
    )
    return module
