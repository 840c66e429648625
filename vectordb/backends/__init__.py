"""Search backends: ``numpy`` (always) and ``cupy`` (a CUDA GPU, when usable).

A backend makes the searcher of each state of an index: it scores the binary
codes, and with CuPy runs the whole batch on the device. The index picks one at build or
open time and never branches on it afterwards::

    backend="auto"   CuPy when it imports, sees a device and runs a test kernel; else NumPy,
                     with one log line (logger "vectordb") saying why
    backend="cupy"   CuPy, or BackendUnavailableError naming the cause
    backend="numpy"  NumPy

With ``backend="auto"``, the environment variable ``VECTORDB_BACKEND`` (``numpy``, ``cupy``
or ``auto``) decides instead. Importing vectordb never imports CuPy.
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

BACKEND_NAMES = ("auto", "numpy", "cupy")
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


def available_backends() -> list[str]:
    """Backends usable in this process: ``["numpy"]`` or ``["numpy", "cupy"]``."""
    return ["numpy"] + (["cupy"] if _probe_cupy()[0] is not None else [])


def resolve_backend(name: str = "auto") -> Backend:
    """The backend called ``name`` (see the module docstring for ``"auto"``).

    Raises
    ------
    InvalidParameterError
        ``name`` (or ``$VECTORDB_BACKEND``) is not one of ``BACKEND_NAMES``.
    BackendUnavailableError
        ``"cupy"`` was asked for and CuPy cannot be used; the message says why.
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
    cupy, reason = _probe_cupy()
    if cupy is not None:
        backend: Backend = _cupy_backend()
        return backend
    if name == "cupy":
        raise BackendUnavailableError(f"the cupy backend is unavailable: {reason}")
    if reason not in _logged:  # one line per process and cause, not one per index
        _logged.add(reason)
        log.info("using the numpy backend (cupy unavailable: %s)", reason)
    return NumpyBackend()


_logged: set[str | None] = set()
