"""Hamming-scoring backends. ``numpy`` is always available."""

from __future__ import annotations

from .numpy_backend import NumpyBackend

__all__ = ["Backend", "NumpyBackend", "get_backend"]

Backend = NumpyBackend


def get_backend(name: str = "numpy") -> NumpyBackend:
    """Return the backend called ``name``; only ``"numpy"`` exists so far."""
    if name != "numpy":
        from ..errors import InvalidParameterError

        raise InvalidParameterError(f"unknown backend {name!r}; available: 'numpy'")
    return NumpyBackend()
