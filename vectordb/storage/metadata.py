"""The metadata store: a JSON object per vector id, and the checks on what enters it.

Stored in SQLite, from Python's standard library: an in-memory database while the index
lives, copied into ``metadata.sqlite`` of the index directory by ``save`` (SQLite's backup
API) and back into memory by ``open``. Chosen over hand-written columnar arrays because it
takes any keys and value types without a schema, evaluates filters (the language of
:mod:`vectordb.storage.filters`) with its JSON functions and query planner, and its file
format is stable and checkable; it adds no dependency.

Documents
---------
A document is a ``dict`` with string keys (at every level: ``{1: "a"}`` would be saved as
``{"1": "a"}`` and collide with a real ``"1"``) whose values are JSON values: str, int,
finite float, bool, None, lists (or tuples) and dicts. It may nest at most
:data:`MAX_DEPTH` containers deep (the document itself is level 1) and take at most
:data:`MAX_DOC_BYTES` bytes as JSON. Anything else raises ``InvalidParameterError``
before the index changes.

Files
-----
``load`` accepts exactly what ``save`` writes, checked before any query on the data: a
rollback-journal (not WAL) UTF-8 SQLite file whose schema is our one table and nothing
else (no views, triggers, indexes or other tables), opened read-only and immutable (no
``-wal``, ``-journal`` or ``-shm`` file beside it is read or created), every document a
JSON object in ASCII (as ``json.dumps`` writes it) within the limits above, and, given
the index's ids, every id one of them. Every query on it runs under a step budget
proportional to the file's size, so no file can make it loop or allocate without bound;
anything else raises ``InvalidIndexFileError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._types import F64, I64
from ..errors import InvalidIndexFileError, InvalidParameterError
from .commonwords import CommonWords, create_scratch
from .files import storage_error
from .filtercache import FilterCache, filter_key
from .filters import Filter, compile_filter
from .fulltext import INSERT, REMOVE, create_fulltext, match_common_terms, query_words, search_sql
from .sqlite_errors import sqlite_storage_error

__all__ = ["MAX_DEPTH", "MAX_DOC_BYTES", "MetadataStore", "encode_documents"]

#: Deepest nesting of dicts and lists in one document (the document itself is level 1).
MAX_DEPTH = 64
#: Largest document, as compact ASCII JSON.
MAX_DOC_BYTES = 16 << 20
#: The one schema object a metadata file may hold, as SQLite records its SQL.
_SCHEMA = "CREATE TABLE meta (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)"
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: The SQLITE_LIMIT_LENGTH limit (``sqlite3`` names it from Python 3.11 on).
_SQLITE_LIMIT_LENGTH = 0
#: Progress-handler granularity (SQLite VM steps) and the budget of a load: saved files
#: need about 5 steps a byte for all the checks; a hostile one is cut off.
_STEP_CHUNK = 1000
_STEPS_PER_BYTE = 100
_STEPS_BASE = 10_000_000
#: Documents that are not what ``save`` writes (ids are >= 0 in an index).
_DOC_CHECK = (
    "id < 0 OR typeof(doc) != 'text' OR length(CAST(doc AS BLOB)) > ? OR NOT json_valid(doc)"
    " OR json_type(doc) != 'object'"
)
#: Rows read at a time by the checks of ``load`` that run in Python.
_BATCH = 4096
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def _where(path: tuple[Any, ...]) -> str:
    """``metadata['a'][0]``, for messages; a long path is cut after 8 steps."""
    steps = "".join(f"[{p!r}]" for p in path[:8])
    return f"metadata{steps}{'...' if len(path) > 8 else ''}"


def _measure(
    node: dict[Any, Any] | list[Any] | tuple[Any, ...],
    path: tuple[Any, ...],
    done: dict[int, tuple[int, int]],
    open_: set[int],
) -> tuple[int, int]:
    """``(height, size)`` of a container: the levels of containers it holds (itself
    included) and a lower bound of its JSON length. Checks that every key is a string.

    Recursion stops at :data:`MAX_DEPTH` levels, and a container met again (the same
    object twice in the document) is measured once, so neither a cycle nor a document
    that repeats one list exponentially often can make this, or ``json.dumps``, run away.
    """
    key = id(node)
    if key in open_:
        raise InvalidParameterError(f"{_where(path)} contains itself (a circular reference)")
    if len(path) >= MAX_DEPTH:
        raise InvalidParameterError(
            f"{_where(path)}: metadata may nest at most {MAX_DEPTH} levels of dicts and lists"
        )
    open_.add(key)
    if isinstance(node, dict):
        pairs: Iterator[tuple[Any, Any]] = iter(node.items())
    else:
        pairs = enumerate(node)
    height, size = 1, 2
    for k, value in pairs:
        if isinstance(node, dict):
            if not isinstance(k, str):
                raise InvalidParameterError(
                    f"{_where(path)}: metadata keys must be strings, got {k!r}"
                    f" ({type(k).__name__}); JSON would turn it into {str(k)!r}"
                )
            size += len(k) + 3
        if isinstance(value, (dict, list, tuple)):
            seen = done.get(id(value))
            if seen is None:
                seen = _measure(value, (*path, k), done, open_)
            elif len(path) + 1 + seen[0] > MAX_DEPTH:
                raise InvalidParameterError(
                    f"{_where((*path, k))}: metadata may nest at most {MAX_DEPTH} levels"
                    " of dicts and lists"
                )
            height = max(height, seen[0] + 1)
            size += seen[1] + 1
        else:
            size += (len(value) if isinstance(value, str) else 0) + 2
        if size > MAX_DOC_BYTES:
            raise InvalidParameterError(
                f"{_where(path)}: a metadata document may take at most {MAX_DOC_BYTES}"
                " bytes as JSON"
            )
    open_.discard(key)
    done[key] = (height, size)
    return height, size


def _check_doc(doc: Any) -> str:
    """``doc`` as compact ASCII JSON, after the checks of the module docstring."""
    if not isinstance(doc, Mapping):
        raise InvalidParameterError(f"metadata must be a dict, got {type(doc).__name__}")
    doc = dict(doc)
    _measure(doc, (), {}, set())
    try:
        text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"metadata must be JSON-serialisable: {exc}") from None
    if len(text) > MAX_DOC_BYTES:
        raise InvalidParameterError(
            f"a metadata document may take at most {MAX_DOC_BYTES} bytes as JSON, got {len(text)}"
        )
    return text


def encode_documents(metadata: Any, n: int) -> list[str | None] | None:
    """Check and serialise the ``metadata`` argument of a write of ``n`` vectors, before
    any change is made: ``None`` (returned as is) or a sequence of ``n`` entries, each a
    document (see the module docstring) or ``None``. Returns one compact ASCII JSON
    string, or ``None`` for no metadata, per vector; ``InvalidParameterError`` otherwise."""
    if metadata is None:
        return None
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
        raise InvalidParameterError("metadata must be a list with one dict (or None) per vector")
    if len(metadata) != n:
        raise InvalidParameterError(f"got {len(metadata)} metadata entries for {n} vectors")
    return [None if d is None else _check_doc(d) for d in metadata]


def _text_depth(text: bytes) -> int:
    """Nesting depth of JSON text (the top-level object is 1), without parsing it."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub(b"", text)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class _Budget:
    """A progress handler that stops SQLite once ``steps`` VM steps have run."""

    def __init__(self, steps: int) -> None:
        self.left = steps // _STEP_CHUNK + 1
        self.spent = False

    def __call__(self) -> int:
        self.left -= 1
        if self.left < 0:
            self.spent = True
            return 1
        return 0


class MetadataStore:
    """id -> JSON object, in an in-memory SQLite database. Thread-safe. :meth:`enable_text`
    indexes one string field for BM25 text search (:mod:`vectordb.storage.fulltext`).
    A dict filter's matches are kept until the documents change
    (:mod:`vectordb.storage.filtercache`)."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        #: The field indexed for text search, or ``None``.
        self.text_field: str | None = None
        #: Counts the calls that changed the documents: a checkpoint links the file of
        #: the version it replaces, and a filter's cached matches answer, while this
        #: has not moved.
        self.version = 0
        self._filters = FilterCache()
        self._words: CommonWords | None = None

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
        """Check and serialise metadata before any change is made (see the module
        docstring for what a document may hold; ``InvalidParameterError`` otherwise)."""
        return [_check_doc(d) for d in docs]

    def enable_text(self, field: str) -> None:
        """Index ``field`` of every document, now and after every write, for
        :meth:`text_search`. ``BackendUnavailableError`` without FTS5."""
        with self._lock:
            if self.text_field is None:
                create_fulltext(self._db, field)
                create_scratch(self._db)
                self._words = CommonWords(self._db)
                self.text_field = field

    def put(self, ids: I64, encoded: Sequence[str | None]) -> None:
        """Set (or, for ``None``, clear) the metadata of ``ids``."""
        with self._lock, self._db:
            changes = self._db.total_changes
            keys = self._unindex(ids)
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (id, doc) VALUES (?, ?)",
                [(int(i), d) for i, d in zip(ids, encoded, strict=True) if d is not None],
            )
            self._db.executemany(
                "DELETE FROM meta WHERE id = ?",
                [(int(i),) for i, d in zip(ids, encoded, strict=True) if d is None],
            )
            if keys is not None:
                self._db.execute(INSERT, (keys,))
            self.version += self._db.total_changes != changes

    def delete(self, ids: I64) -> None:
        with self._lock, self._db:
            changes = self._db.total_changes
            self._unindex(ids)
            self._db.executemany("DELETE FROM meta WHERE id = ?", [(int(i),) for i in ids])
            self.version += self._db.total_changes != changes

    def _unindex(self, ids: I64) -> str | None:
        """With text search, remove ``ids`` from it (before their documents change; in the
        caller's transaction) and return them as the JSON array that :data:`INSERT` takes."""
        if self.text_field is None:
            return None
        keys = json.dumps([int(i) for i in ids])
        self._db.execute(REMOVE, (keys,))
        return keys

    def get_many(self, ids: Sequence[int] | I64) -> list[dict[str, Any] | None]:
        """The documents of ``ids`` (``None`` where one has none), in order, read in one
        query whatever their number."""
        keys = [int(i) for i in ids]
        with self._lock:
            rows = self._db.execute(
                "SELECT id, doc FROM meta WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(keys),),
            ).fetchall()
        found = {int(i): doc for i, doc in rows}
        return [None if (d := found.get(i)) is None else dict(json.loads(d)) for i in keys]

    def text_search(
        self, text: Any, n: int, filt: Filter | None = None, *, ids: I64 | None = None
    ) -> tuple[I64, F64]:
        """The ``m <= n`` documents matching ``filt`` (and among ``ids`` ``(k,)`` int64, if
        given) that best match ``text`` (any of its words but the common ones:
        :mod:`vectordb.storage.commonwords`) by BM25, best first: ids ``(m,)`` int64,
        scores ``(m,)`` float64 (``-bm25()``, higher better). ``InvalidParameterError``
        without :meth:`enable_text`."""
        if self._words is None:
            raise InvalidParameterError("this index has no text_field: text search needs one")
        words = query_words(text)
        where, params = "", []
        if callable(filt) and ids is None:
            ids = self.matching(filt)
        if ids is not None:
            where = "fts.rowid IN (SELECT value FROM json_each(?))"
            params = [json.dumps(ids.tolist())]
        elif filt is not None and not callable(filt):
            where, params = compile_filter(filt)
        with self._lock:
            rare, common = self._words.split(words, self.version) if words else ([], [])
            rows = []
            for query in match_common_terms(rare, common):
                rows += self._db.execute(search_sql(where), (query, *params, n)).fetchall()
        rows = sorted(rows, key=lambda r: r[1])[:n]  # two disjoint lists: merged by rank
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return ids, -np.array([r[1] for r in rows], dtype=np.float64)

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
        """Ids whose metadata satisfies ``filt``, as ``(m,)`` int64 (unsorted; read-only for
        a dict filter, whose answer is cached until the documents change)."""
        if callable(filt):
            return np.fromiter((i for i, doc in self.items() if filt(doc)), dtype=np.int64)
        where, params = compile_filter(filt)
        key = filter_key(where, params)
        with self._lock:
            if (ids := self._filters.get(key, self.version)) is not None:
                return ids
            rows = self._db.execute(f"SELECT id FROM meta WHERE {where}", params).fetchall()
            found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            return self._filters.put(key, self.version, found)

    def copy(self) -> MetadataStore:
        """The documents, without text search (a copy is saved; an index enables it)."""
        out = MetadataStore()
        with self._lock:
            self._db.backup(out._db)
        return out

    def save(self, path: Path) -> None:
        """Write the database to ``path`` (a new file) and fsync it.

        ``StorageError`` (``errno`` ``ENOSPC`` when the disk is full) on failure, and no
        file is left at ``path``.
        """
        path = Path(path)
        existed = path.exists()
        try:
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
        except (sqlite3.Error, OSError) as exc:
            if not existed:
                for leftover in (path, path.with_name(path.name + "-journal")):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            if isinstance(exc, sqlite3.Error):
                raise sqlite_storage_error(exc, path) from exc
            raise storage_error(exc, path) from exc

    @classmethod
    def load(cls, path: Path, *, ids: I64 | None = None) -> MetadataStore:
        """Read a saved database into memory, checking that it is exactly ours (see the
        module docstring). ``ids``: the index's ids ``(n,)`` int64; every id with
        metadata must be one of them. ``InvalidIndexFileError`` naming ``path``."""
        path = Path(path)
        size = _check_header(path)
        budget = _Budget(_STEPS_BASE + _STEPS_PER_BYTE * size)
        out = cls()
        try:
            uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro&immutable=1"
            source = sqlite3.connect(uri, uri=True)
            try:
                source.set_progress_handler(budget, _STEP_CHUNK)
                setlimit = getattr(source, "setlimit", None)  # Python >= 3.11
                if setlimit is not None:
                    setlimit(_SQLITE_LIMIT_LENGTH, 2 * MAX_DOC_BYTES)
                source.execute("PRAGMA trusted_schema = OFF")
                _check_source(source, path, ids)
                source.set_progress_handler(None, 0)
                source.backup(out._db)
            finally:
                source.close()
        except sqlite3.DatabaseError as exc:
            if budget.spent:
                raise InvalidIndexFileError(
                    f"{path}: reading it took far more work than its size allows"
                    " (not a vectordb metadata database)"
                ) from None
            raise InvalidIndexFileError(f"{path}: not a valid SQLite database ({exc})") from None
        return out


def _check_header(path: Path) -> int:
    """Check the 100-byte SQLite header of ``path``; return the file's size in bytes."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
            size = os.fstat(fh.fileno()).st_size
    except (FileNotFoundError, IsADirectoryError):
        raise InvalidIndexFileError(f"{path}: missing (or not a regular file)") from None
    except OSError as exc:
        raise storage_error(exc, path) from exc
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise InvalidIndexFileError(f"{path}: not an SQLite database (bad header)")
    if header[18:20] != b"\x01\x01":
        # Only a rollback-journal file is wholly described by its own bytes (and CRC);
        # in WAL mode (2) a -wal file beside it would override them.
        raise InvalidIndexFileError(
            f"{path}: SQLite file format versions {header[18]}/{header[19]}, expected 1/1"
            " (a rollback journal, not WAL)"
        )
    if header[56:60] != b"\x00\x00\x00\x01":
        raise InvalidIndexFileError(f"{path}: the SQLite text encoding is not UTF-8")
    return size


def _check_source(source: sqlite3.Connection, path: Path, ids: I64 | None) -> None:
    """The checks of :meth:`MetadataStore.load` on the opened file, schema first: until
    it is known to be our one plain table, no query touches ``meta``."""
    schema = source.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchmany(2)
    if schema != [("table", "meta", "meta", _SCHEMA)]:
        found = ", ".join(f"{str(r[0])[:20]} {str(r[1])[:60]!r}" for r in schema) or "nothing"
        raise InvalidIndexFileError(
            f"{path}: not a vectordb metadata database (its schema must be exactly one"
            f" table {_SCHEMA!r}; found {found})"
        )
    if source.execute("PRAGMA quick_check").fetchone()[0] != "ok":
        raise InvalidIndexFileError(f"{path}: the SQLite database is damaged")
    rows = int(source.execute("SELECT count(*) FROM meta").fetchone()[0])
    if ids is not None and rows > ids.shape[0]:
        raise InvalidIndexFileError(
            f"{path}: holds metadata of {rows} ids, but the index has {ids.shape[0]}"
        )
    # Every document a JSON object as save writes it (a copy of the database has the same
    # scan's cost): damaged text would otherwise surface in a later search.
    bad = source.execute(f"SELECT id FROM meta WHERE {_DOC_CHECK} LIMIT 1", (MAX_DOC_BYTES,))
    found_bad = bad.fetchone()
    if found_bad is not None:
        raise _bad_doc(path, found_bad[0], "is not a JSON object as vectordb writes it")
    # What SQL cannot check fast, on the raw bytes, a batch at a time: ASCII (json.dumps
    # escapes the rest; other bytes would fail to decode on every read).
    source.text_factory = bytes
    stored = np.empty(rows, dtype=np.int64)
    count = 0
    cursor = source.execute("SELECT id, doc FROM meta")
    while batch := cursor.fetchmany(_BATCH):
        if count + len(batch) > rows:
            raise InvalidIndexFileError(f"{path}: the SQLite database is damaged (row count)")
        stored[count : count + len(batch)] = [row[0] for row in batch]
        count += len(batch)
        if not b"".join([row[1] for row in batch]).isascii():
            id_ = next(i for i, doc in batch if not doc.isascii())
            raise _bad_doc(path, id_, "is not ASCII (vectordb writes escaped JSON)")
    if count != rows:
        raise InvalidIndexFileError(f"{path}: the SQLite database is damaged (row count)")
    # Only a document with more brackets than MAX_DEPTH can nest that deep.
    deep = source.execute(
        "SELECT id, doc FROM meta WHERE length(doc) - length(replace(replace(doc, '[', ''),"
        " '{', '')) > ?",
        (MAX_DEPTH,),
    )
    for id_, doc in deep:
        if _text_depth(doc) > MAX_DEPTH:
            raise _bad_doc(path, id_, f"nests deeper than {MAX_DEPTH} levels")
    if ids is not None:
        stray = stored[~np.isin(stored, ids)]
        if stray.size:
            raise InvalidIndexFileError(
                f"{path}: holds metadata of ids not in the index: {stray[:5].tolist()}"
            )


def _bad_doc(path: Path, id_: int, problem: str) -> InvalidIndexFileError:
    return InvalidIndexFileError(f"{path}: the metadata of id {id_} {problem}: damaged")
