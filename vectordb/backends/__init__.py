"""Search backends: ``numba`` (compiled CPU kernels), ``numpy`` (always) and ``cupy`` (a CUDA
GPU, when usable).

A backend makes the searcher of each state of an index: it scores the binary
codes, and with CuPy runs the whole batch on the device. The index picks one at build or
open time and never branches on it afterwards::

    backend="auto"   CuPy when it imports, sees a device and runs a test kernel; else numba
                     when it imports; else NumPy, with one log line (logger "vectordb")
                     saying why
    backend="cupy"   CuPy, or BackendUnavailableError naming the cause
    backend="numba"  numba, or BackendUnavailableError naming the cause
    backend="numpy"  NumPy

All three return the same results: numba runs NumPy's float32 steps in the same order and
picks the same candidates (see ``numba_kernels`` for its one rare rounding); CuPy's are the
same steps on the device. With
``backend="auto"``, the environment variable ``VECTORDB_BACKEND`` (``numpy``, ``numba``,
``cupy`` or ``auto``) decides instead. Importing vectordb imports neither CuPy nor numba.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._types import U64
from ..core.codes import CodeTable
from ..core.parts import Part
from ..errors import BackendUnavailableError, InvalidParameterError
from ..search.pipeline import Searcher, SearchInputs
from .numpy_backend import NumpyBackend

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "NumpyBackend",
    "available_backends",
    "resolve_backend",
]

log = logging.getLogger("vectordb")

BACKEND_NAMES = ("auto", "numpy", "numba", "cupy")
ENV_VAR = "VECTORDB_BACKEND"


class Backend(Protocol):
    """What an index needs of a backend."""

    name: str

    def plane_dots(self, planes: U64, codes: U64) -> npt.NDArray[np.unsignedinteger]:
        """``core.codes.plane_dots``: (nq, QUERY_BITS, w) query bit planes x (w, m)
        word-major codes -> (nq, m) unsigned ``T``."""
        ...

    def searcher(self, table: CodeTable, parts: Sequence[Part], inputs: SearchInputs) -> Searcher:
        """A searcher over the codes of ``parts`` (copied to the device, if any, with what
        ``inputs`` holds)."""
        ...


@functools.cache
def _probe_cupy() -> tuple[Any, str | None]:
    from .cupy_backend import probe

    return probe()


@functools.cache
def _cupy_backend() -> Any:
    from .cupy_backend import CupyBackend

    cupy, _ = _probe_cupy()
    return CupyBackend(cupy)


@functools.cache
def _numba_backend() -> tuple[Any, str | None]:
    """The numba backend, or ``None`` and why it cannot be used."""
    try:
        from .numba_backend import NumbaBackend, probe
    except ImportError as exc:  # numba (or llvmlite) missing, or built for another NumPy
        return None, f"numba does not import ({exc}); pip install numba"
    except Exception as exc:  # a broken install fails in its own ways: fall back, say why
        return None, f"numba failed to load ({type(exc).__name__}: {exc})"
    reason = probe()
    return (NumbaBackend(), None) if reason is None else (None, reason)


def available_backends() -> list[str]:
    """Backends usable in this process, in ``"auto"``'s order of preference last first:
    ``["numpy"]``, ``["numpy", "numba"]``, ``["numpy", "cupy"]`` or all three."""
    names = ["numpy"]
    if _numba_backend()[0] is not None:
        names.append("numba")
    if _probe_cupy()[0] is not None:
        names.append("cupy")
    return names


def resolve_backend(name: str = "auto") -> Backend:
    """The backend called ``name`` (see the module docstring for ``"auto"``).

    Raises
    ------
    InvalidParameterError
        ``name`` (or ``$VECTORDB_BACKEND``) is not one of ``BACKEND_NAMES``.
    BackendUnavailableError
        ``"cupy"`` or ``"numba"`` was asked for and cannot be used; the message says why.
    """
    source = "backend"
    if name == "auto" and os.environ.get(ENV_VAR):
        name, source = os.environ[ENV_VAR].strip().lower(), f"${ENV_VAR}"
    if name not in BACKEND_NAMES:
        raise InvalidParameterError(
            f"{source} must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}"
        )
    if name == "numpy":
        return NumpyBackend()
    backend: Backend | None
    if name == "numba":
        backend, reason = _numba_backend()
        if backend is None:
            raise BackendUnavailableError(f"the numba backend is unavailable: {reason}")
        return backend
    cupy, reason = _probe_cupy()
    if cupy is not None:
        backend = _cupy_backend()
        return backend
    if name == "cupy":
        raise BackendUnavailableError(f"the cupy backend is unavailable: {reason}")
    backend, numba_reason = _numba_backend()
    if backend is not None:
        _log_once(f"using the numba backend (cupy unavailable: {reason})")
        return backend
    _log_once(f"using the numpy backend (cupy unavailable: {reason}; {numba_reason})")
    return NumpyBackend()


def _log_once(line: str) -> None:
    """One log line per process and cause, not one per index."""
    if line not in _logged:
        _logged.add(line)
        log.info("%s", line)


_logged: set[str] = set()
