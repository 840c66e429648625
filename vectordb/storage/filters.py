"""The metadata filter language: what a filter may say, and its translation into SQL.

Filters
-------
A ``dict`` of conditions on top-level fields, all of which must hold::

    {"user": "ann"}                      equality (None: null or missing)
    {"user": {"$in": ["ann", "bob"]}}    membership; "$nin" for the opposite
    {"ts": {"$gte": 10, "$lt": 20}}      ranges: "$gt", "$gte", "$lt", "$lte"; "$ne"

or a predicate ``callable(metadata: dict) -> bool`` (evaluated in Python for every vector
that has metadata: flexible, slower on large indexes). A dict filter names at most
:data:`MAX_FILTER_FIELDS` fields (non-empty strings without quotes, backslashes or NUL),
its ``$in``/``$nin`` lists hold at most :data:`MAX_FILTER_VALUES` values in all, its
integers lie in SQLite's range ``[-2**63, 2**63)`` and its strings hold no NUL; otherwise
``InvalidParameterError``. (SQLite's JSON functions read a stored string up to its first
NUL character: a filter compares that part of it.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidParameterError

__all__ = [
    "MAX_FILTER_FIELDS",
    "MAX_FILTER_VALUES",
    "Filter",
    "check_filter",
    "compile_filter",
]

Filter = Mapping[str, Any] | Callable[[dict[str, Any]], bool]

#: Most fields one dict filter may name. Each field has at most 7 operators, so the SQL
#: expression stays far below SQLite's default depth limit of 1000.
MAX_FILTER_FIELDS = 100
#: Most values in all the ``$in`` / ``$nin`` lists of one filter (SQL parameters: SQLite
#: builds may allow as few as 32766 in a statement).
MAX_FILTER_VALUES = 10_000

_SCALARS = (str, int, float, bool, type(None))
_RANGE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<=", "$ne": "!="}
_LISTS = {"$in": "IN", "$nin": "NOT IN"}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _path(field: Any) -> str:
    if not isinstance(field, str) or not field or '"' in field or "\\" in field or "\x00" in field:
        raise InvalidParameterError(
            "filter fields must be non-empty strings without quotes, backslashes or NUL,"
            f" got {field!r}"
        )
    return f'$."{field}"'


def _scalar(value: Any, where: str) -> Any:
    if not isinstance(value, _SCALARS) or (isinstance(value, float) and not np.isfinite(value)):
        raise InvalidParameterError(
            f"{where}: filter values must be str, int, finite float, bool or None, got {value!r}"
        )
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and "\x00" in value:
        # SQLite's JSON functions cut a stored string at its first NUL: such a value
        # could never match, and silently so.
        raise InvalidParameterError(f"{where}: filter strings cannot contain NUL, got {value!r}")
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidParameterError(
            f"{where}: filter integers must lie in [-2**63, 2**63) (SQLite's range), got {value}"
        )
    return value


def compile_filter(filt: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """SQL ``WHERE`` clause and its parameters for a dict filter, as ``(sql, params)``:
    ``sql`` reads the JSON text column ``doc`` and has one ``?`` per item of ``params``.
    ``InvalidParameterError`` for a filter the module docstring does not allow."""
    if len(filt) > MAX_FILTER_FIELDS:
        raise InvalidParameterError(
            f"a filter may name at most {MAX_FILTER_FIELDS} fields, got {len(filt)}"
        )
    clauses: list[str] = []
    params: list[Any] = []
    n_values = 0
    for field, cond in filt.items():
        path = _path(field)
        expr = "json_extract(doc, ?)"
        if isinstance(cond, Mapping):
            if not cond:
                raise InvalidParameterError(f"filter on {field!r}: empty condition")
            for op, value in cond.items():
                if op in _RANGE:
                    v = _scalar(value, f"{field}.{op}")
                    if v is None:
                        raise InvalidParameterError(
                            f"filter on {field!r}: {op} None is not allowed"
                        )
                    clauses.append(f"{expr} {_RANGE[op]} ?")
                    params += [path, v]
                elif op in _LISTS:
                    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                        raise InvalidParameterError(f"filter on {field!r}: {op} needs a list")
                    n_values += len(value)
                    if n_values > MAX_FILTER_VALUES:
                        raise InvalidParameterError(
                            f"filter on {field!r}: a filter's $in/$nin lists may hold at most"
                            f" {MAX_FILTER_VALUES} values in all"
                        )
                    values = [_scalar(v, f"{field}.{op}") for v in value]
                    if not values:
                        clauses.append("0" if op == "$in" else "1")
                        continue
                    marks = ", ".join("?" * len(values))
                    clauses.append(f"{expr} {_LISTS[op]} ({marks})")
                    params += [path, *values]
                else:
                    known = ", ".join([*_RANGE, *_LISTS])
                    raise InvalidParameterError(
                        f"filter on {field!r}: unknown operator {op!r}; use one of {known}"
                    )
        else:
            value = _scalar(cond, field)
            if value is None:
                clauses.append(f"{expr} IS NULL")
                params.append(path)
            else:
                clauses.append(f"{expr} = ?")
                params += [path, value]
    return (" AND ".join(clauses) or "1"), params


def check_filter(filt: Any) -> Filter | None:
    """Validate a filter (raises ``InvalidParameterError``); ``None`` means no filter."""
    if filt is None or callable(filt):
        return filt
    if not isinstance(filt, Mapping):
        raise InvalidParameterError(
            f"filter must be a dict of conditions or a callable, got {type(filt).__name__}"
        )
    compile_filter(filt)
    return filt
