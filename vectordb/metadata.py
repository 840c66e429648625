"""Metadata of vectors (a JSON object per id) and the filters that select on it.

Stored in SQLite, from Python's standard library: an in-memory database while the index
lives, copied into ``metadata.sqlite`` of the index directory by ``save`` (SQLite's backup
API) and back into memory by ``open``. Chosen over hand-written columnar arrays because it
takes any keys and value types without a schema, evaluates filters with its JSON functions
and query planner, and its file format is stable and checkable; it adds no dependency.

Filters
-------
A ``dict`` of conditions on top-level fields, all of which must hold::

    {"user": "ann"}                      equality (None: null or missing)
    {"user": {"$in": ["ann", "bob"]}}    membership; "$nin" for the opposite
    {"ts": {"$gte": 10, "$lt": 20}}      ranges: "$gt", "$gte", "$lt", "$lte"; "$ne"

or a predicate ``callable(metadata: dict) -> bool`` (evaluated in Python for every vector
that has metadata: flexible, slower on large indexes).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidIndexFileError, InvalidParameterError

__all__ = ["Filter", "MetadataStore", "check_filter"]

I64 = npt.NDArray[np.int64]
Filter = Mapping[str, Any] | Callable[[dict[str, Any]], bool]

_SCALARS = (str, int, float, bool, type(None))
_RANGE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<=", "$ne": "!="}
_LISTS = {"$in": "IN", "$nin": "NOT IN"}


def _path(field: Any) -> str:
    if not isinstance(field, str) or not field or '"' in field or "\\" in field:
        raise InvalidParameterError(
            f"filter fields must be non-empty strings without quotes or backslashes, got {field!r}"
        )
    return f'$."{field}"'


def _scalar(value: Any, where: str) -> Any:
    if not isinstance(value, _SCALARS) or (isinstance(value, float) and not np.isfinite(value)):
        raise InvalidParameterError(
            f"{where}: filter values must be str, int, finite float, bool or None, got {value!r}"
        )
    return int(value) if isinstance(value, bool) else value


def _compile(filt: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """SQL ``WHERE`` clause and parameters for a dict filter."""
    clauses: list[str] = []
    params: list[Any] = []
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
    _compile(filt)
    return filt


def _check_doc(doc: Any) -> str:
    if not isinstance(doc, Mapping):
        raise InvalidParameterError(f"metadata must be a dict, got {type(doc).__name__}")
    try:
        return json.dumps(dict(doc), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"metadata must be JSON-serialisable: {exc}") from None


class MetadataStore:
    """id -> JSON object, in an in-memory SQLite database. Thread-safe."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM meta").fetchone()[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory database."""
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)

    @staticmethod
    def encode(docs: Sequence[Any]) -> list[str]:
        """Check and serialise metadata before any change is made."""
        return [_check_doc(d) for d in docs]

    def put(self, ids: I64, encoded: Sequence[str | None]) -> None:
        """Set (or, for ``None``, clear) the metadata of ``ids``."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (id, doc) VALUES (?, ?)",
                [(int(i), d) for i, d in zip(ids, encoded, strict=True) if d is not None],
            )
            self._db.executemany(
                "DELETE FROM meta WHERE id = ?",
                [(int(i),) for i, d in zip(ids, encoded, strict=True) if d is None],
            )

    def delete(self, ids: I64) -> None:
        with self._lock, self._db:
            self._db.executemany("DELETE FROM meta WHERE id = ?", [(int(i),) for i in ids])

    def get(self, id_: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM meta WHERE id = ?", (int(id_),)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def items(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT id, doc FROM meta").fetchall()
        for id_, doc in rows:
            yield int(id_), json.loads(doc)

    def matching(self, filt: Filter) -> I64:
        """Ids whose metadata satisfies ``filt``, as ``(m,)`` int64 (unsorted)."""
        if callable(filt):
            return np.fromiter((i for i, doc in self.items() if filt(doc)), dtype=np.int64)
        where, params = _compile(filt)
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM meta WHERE {where}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def copy(self) -> MetadataStore:
        out = MetadataStore()
        with self._lock:
            self._db.backup(out._db)
        return out

    def save(self, path: Path) -> None:
        """Write the database to ``path`` (a new file) and fsync it."""
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: Path) -> MetadataStore:
        """Read a saved database into memory, checking that it is ours."""
        out = cls()
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                cols = [r[1] for r in source.execute("PRAGMA table_info(meta)").fetchall()]
                if cols != ["id", "doc"]:
                    raise InvalidIndexFileError(f"{path}: not a vectordb metadata database")
                if source.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise InvalidIndexFileError(f"{path}: the SQLite database is damaged")
                # Every document a JSON object (a copy of the database has the same scan's
                # cost): damaged text would otherwise surface in a later search.
                bad = source.execute(
                    "SELECT id FROM meta WHERE typeof(doc) != 'text' OR NOT json_valid(doc) "
                    "OR json_type(doc) != 'object' LIMIT 1"
                ).fetchone()
                if bad is not None:
                    raise InvalidIndexFileError(
                        f"{path}: the metadata of id {bad[0]} is not a JSON object (damaged)"
                    )
                source.backup(out._db)
            finally:
                source.close()
        except sqlite3.DatabaseError as exc:
            raise InvalidIndexFileError(f"{path}: not a valid SQLite database ({exc})") from None
        return out
