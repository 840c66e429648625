"""A stand-in for CuPy, made of NumPy, so the CuPy backend's host code runs without a GPU.

Arrays are NumPy arrays of a subclass with ``.get()``. The CUDA kernels of
``cupy_backend`` are compiled from their own source by the machine's C compiler, with a
few CUDA built-ins defined in C, and their threads run one after another. So the kernels'
logic and everything around them (uploads, caching, blocks, argument order, the device
search stages) are tested on every machine with a C compiler; what only a GPU shows
(CUDA compilation, streams, speed) is tested on one.
"""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np


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
struct dim3_ { long long x; };
static __thread struct dim3_ blockIdx, blockDim, threadIdx;  /* threads launch at once */
#define __global__
#define __popcll(x) __builtin_popcountll(x)
static unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
"""
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def compiler() -> str | None:
    """The C compiler that runs the CUDA kernels here, or ``None``."""
    return shutil.which("cc") or shutil.which("gcc")


#: What CuPy must be handed for each C parameter type: it passes a scalar by its NumPy
#: dtype's size, so an np.int64 for an ``int`` would shift every later argument.
_DTYPES = {
    "unsigned long long*": np.uint64,
    "unsigned short*": np.uint16,
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


@functools.cache
def _compile(code: str) -> dict[str, Any]:
    """Every kernel of ``code`` as a C function looping over its threads in turn.

    The kernels index threads by ``blockIdx.x * blockDim.x + threadIdx.x`` alone and do
    not talk to each other, so running them one after another computes what the GPU does.
    """
    kernels = _KERNEL.findall(code)
    src = _PRELUDE + code.replace('extern "C"', "")
    for name, params in kernels:
        names = ", ".join(re.findall(r"(\w+)\s*$", p)[0] for p in params.split(","))
        src += (
            f"void run_{name}(long long threads, {params}) {{ blockDim.x = 1; "
            f"threadIdx.x = 0; for (long long t = 0; t < threads; ++t) {{ blockIdx.x = t; "
            f"{name}({names}); }} }}\n"
        )
    folder = Path(tempfile.mkdtemp(prefix="vectordb-fake-cupy-"))
    lib_path = folder / "kernels.so"
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler to run the CUDA kernels on the CPU")
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
        types_ = [_c_type(p) for p in params.split(",")]
        fn.argtypes = [ctypes.c_longlong, *types_]
        fn.restype = None
        out[name] = _launcher(fn, types_, [_dtype(p) for p in params.split(",")], lib)
    return out


def _launcher(fn: Any, types_: list[Any], dtypes: list[Any], lib: Any) -> Any:
    def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        if len(args) != len(types_):
            raise TypeError(f"kernel takes {len(types_)} arguments, got {len(args)}")
        values: list[Any] = []
        for i, (arg, kind) in enumerate(zip(args, types_, strict=True)):
            if np.asarray(arg).dtype != dtypes[i]:
                raise TypeError(f"argument {i}: {np.asarray(arg).dtype}, expected {dtypes[i]}")
            if kind is ctypes.c_void_p:
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"expected an array, got {type(arg).__name__}")
                if not arg.flags.c_contiguous:
                    raise ValueError("a kernel was given a non-contiguous array")
                values.append(arg.ctypes.data)
            else:
                if isinstance(arg, np.ndarray):
                    raise TypeError("expected a scalar, got an array")
                values.append(kind(arg))
        fn(int(np.prod(grid)) * int(np.prod(block)), *values)

    launch.lib = lib  # type: ignore[attr-defined]
    return launch


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
