"""Argument checks shared by the public API: every failure is a ``VectorDBError``."""

from __future__ import annotations

import numbers
import re
from typing import Any

import numpy as np

from ._types import F32
from .errors import DimensionMismatchError, InvalidParameterError, InvalidVectorsError

__all__ = [
    "MAX_BRANCHING",
    "MAX_CODE_BITS",
    "MAX_ITERATIONS",
    "MAX_K",
    "as_matrix",
    "as_query_matrix",
    "build_params",
    "check_k",
    "check_text_field",
    "positive_int",
]

#: A metadata field indexed for text search (``build(text_field=...)``).
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: Largest branching factor and number of Lloyd iterations a build accepts.
MAX_BRANCHING = 4096
MAX_ITERATIONS = 1000
#: The most bits a coordinate of a code may take (``core.codes``).
MAX_CODE_BITS = 4
#: Most results one query may ask for (results are padded up to k: a larger k would only
#: allocate padding).
MAX_K = 1 << 20


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` >= 1, or raise ``InvalidParameterError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise InvalidParameterError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_k(k: Any) -> int:
    """``k`` as an ``int`` in ``[1, MAX_K]``, or ``InvalidParameterError``."""
    k = positive_int("k", k)
    if k > MAX_K:
        raise InvalidParameterError(f"k must be <= {MAX_K}, got {k}")
    return k


def _to_float32(data: Any, what: str) -> F32:
    if type(data) is np.ndarray and data.dtype == np.float32 and data.flags.c_contiguous:
        return data  # the common case, without the checks below (a few us a query)
    try:
        arr = np.asarray(data)
    except ValueError as exc:  # ragged nested sequences
        raise InvalidVectorsError(
            f"{what} must be a rectangular array of numbers (rows of equal length): {exc}"
        ) from None
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidVectorsError(
            f"{what} must hold real numbers (float or int), got dtype {arr.dtype}"
        )
    with np.errstate(over="ignore"):  # overflow becomes inf, rejected by _check_finite
        return np.ascontiguousarray(arr, dtype=np.float32)


def _check_finite(arr: F32, what: str) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidVectorsError(
            f"{what} contain NaN or infinite values (first at index {tuple(int(i) for i in bad)}),"
            " or values too large for float32; clean or clip them first"
        )


def as_matrix(data: Any, what: str, dim: int | None = None) -> F32:
    """Convert ``data`` to a C-contiguous ``(n, d)`` float32 array with n >= 1, all finite.

    A copy is made only when the input is not already contiguous float32. Raises
    ``InvalidVectorsError`` (``DimensionMismatchError`` when ``dim`` is given and differs).
    """
    arr = _to_float32(data, what)
    if arr.ndim != 2:
        raise InvalidVectorsError(
            f"{what} must be a 2-D array of shape (n, dim), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidVectorsError(f"{what} are empty (shape {arr.shape}); pass at least one row")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} have dimension {arr.shape[1]}, but the index has dimension {dim}"
        )
    _check_finite(arr, what)
    return arr


def as_query_matrix(data: Any, dim: int, *, single: bool) -> F32:
    """Queries as ``(nq, dim)`` float32. With ``single``, accept ``(dim,)`` or ``(1, dim)``."""
    arr = _to_float32(data, "query" if single else "queries")
    if single:
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise InvalidVectorsError(
                f"query must be a 1-D array of shape ({dim},), got shape {arr.shape};"
                " use search_batch() for several queries"
            )
        arr = arr[None, :]
    return as_matrix(arr, "query" if single else "queries", dim)


def build_params(
    branching_factor: Any,
    max_leaf_size: Any,
    max_iterations: Any,
    seed: Any,
    rotate: Any,
    leaf_scan: Any,
    code_bits: Any = "auto",
    text_field: Any = None,
) -> dict[str, Any]:
    """Checked build parameters of ``ClusteredIndex.build``, as its ``params`` dict
    (``text_field`` only when given)."""
    branching_factor = positive_int("branching_factor", branching_factor)
    if not 2 <= branching_factor <= MAX_BRANCHING:
        raise InvalidParameterError(
            f"branching_factor must be between 2 and {MAX_BRANCHING}, got {branching_factor}"
        )
    max_iterations = positive_int("max_iterations", max_iterations)
    if max_iterations > MAX_ITERATIONS:
        raise InvalidParameterError(
            f"max_iterations must be <= {MAX_ITERATIONS}, got {max_iterations}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidParameterError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(rotate, bool):
        raise InvalidParameterError(f"rotate must be True or False, got {rotate!r}")
    if leaf_scan not in ("auto", "codes", "vectors"):
        raise InvalidParameterError(
            f"leaf_scan must be 'auto', 'codes' or 'vectors', got {leaf_scan!r}"
        )
    if code_bits != "auto" and (
        isinstance(code_bits, bool)
        or not isinstance(code_bits, numbers.Integral)
        or not 1 <= int(code_bits) <= MAX_CODE_BITS
    ):
        raise InvalidParameterError(
            f"code_bits must be 'auto' or an integer from 1 to {MAX_CODE_BITS}, got {code_bits!r}"
        )
    text = {} if check_text_field(text_field) is None else {"text_field": text_field}
    return {
        **text,
        "branching_factor": branching_factor,
        "max_leaf_size": positive_int("max_leaf_size", max_leaf_size),
        "max_iterations": positive_int("max_iterations", max_iterations),
        "seed": int(seed),
        "rotate": rotate,
        "leaf_scan": leaf_scan,
        "code_bits": code_bits if code_bits == "auto" else int(code_bits),
    }


def check_text_field(field: Any) -> str | None:
    """``field`` (``None``, or an identifier of at most 64 ASCII letters, digits and ``_``,
    not starting with a digit: it is written into SQL); ``InvalidParameterError`` otherwise."""
    if field is None:
        return None
    if not isinstance(field, str) or not _FIELD.fullmatch(field):
        raise InvalidParameterError(
            "text_field must be None or a name of ASCII letters, digits and '_' (at most 64,"
            f" not starting with a digit), got {field!r}"
        )
    return field
