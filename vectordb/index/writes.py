"""Writes of a living index: add, upsert, delete, compact, metadata lookups.

A mixin of ``ClusteredIndex``, kept apart to keep modules small. Every write runs under the
index's write lock and ends by publishing a new ``IndexState``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64, Mask
from .._validation import as_matrix
from ..core.codes import CodeTable, Quantizer
from ..core.metrics import Metric, prepare
from ..core.parts import Part
from ..core.tree import Tree
from ..errors import DuplicateIdError, InvalidParameterError, UnknownIdError
from ..storage.idmap import MAX_ID, IdMap, as_ids, one_id
from ..storage.metadata import Filter, MetadataStore, check_filter
from ..storage.vectors import InMemoryStorage, MmapStorage, write_rows
from .state import IndexState, code_table
from .update import Splitter, add_to_parts, assign_leaves, compacted, encode_part

__all__ = ["Writes", "check_new_ids", "encode_metadata"]


class Writes:
    """``add``, ``upsert``, ``delete``, ``get_metadata``, ``compact``."""

    if TYPE_CHECKING:  # provided by ClusteredIndex
        _state: IndexState
        _write_lock: threading.RLock
        _meta_lock: threading.Lock
        _quantizer: Quantizer
        _metric: Metric
        _params: dict[str, Any]
        _metadata: MetadataStore
        _last_id: int

        @property
        def dim(self) -> int: ...

        def __contains__(self, id_: object) -> bool: ...

        def _make_state(
            self,
            tree: Tree,
            table: CodeTable | None,
            base: Part,
            delta: Part,
            row_id: I64,
            row_ok: Mask | None,
            idmap: IdMap,
            storage: InMemoryStorage | MmapStorage,
        ) -> IndexState: ...

        def _replace(self, **changes: Any) -> None: ...

        def _changed(self, **changes: Any) -> IndexState: ...

    def add(
        self,
        vectors: Any,
        ids: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """Add vectors; return their ids ``(n,)`` int64.

        ``ids``: distinct integers in ``[0, 2**63 - 1]`` not in the index
        (``DuplicateIdError`` otherwise); default: consecutive ids after the largest ever
        used (``InvalidParameterError`` if they would pass ``2**63 - 1``: pass ids then).
        ``metadata``: one dict (or None) per vector. Each vector goes to its nearest leaf;
        no rebuild. In mmap mode the vectors are appended to a file beside the mapped one
        and written into the index by the next :meth:`save`. A write that raises changes
        nothing a caller can see (ids, vectors, metadata, search results).
        """
        return self._write(vectors, ids, metadata, replace=False)

    def upsert(
        self,
        vectors: Any,
        ids: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> I64:
        """Add vectors, replacing those whose ids exist (and their metadata, when given;
        without ``metadata`` an existing id keeps its metadata). Returns the ids."""
        if ids is None:
            raise InvalidParameterError("upsert needs ids")
        return self._write(vectors, ids, metadata, replace=True)

    def _write(self, vectors: Any, ids: Any, metadata: Any, *, replace: bool) -> I64:
        x = as_matrix(vectors, "vectors", self.dim)
        n = x.shape[0]
        docs = encode_metadata(metadata, n)
        x = prepare(x, self._metric, copy=False)
        rotated = self._quantizer.rotate(x)
        with self._write_lock:
            st = self._state
            leaves = assign_leaves(st.tree, rotated, self._metric)
            if ids is None:
                start = self._next_id(st)
                if start > MAX_ID - n + 1:
                    raise InvalidParameterError(
                        f"cannot assign {n} ids: the next free id is {start} and ids must"
                        f" stay <= 2**63 - 1 ({MAX_ID}); pass ids= explicitly"
                    )
                new_ids = np.arange(start, start + n, dtype=np.int64)
            else:
                new_ids = check_new_ids(ids, n)
            old_rows = st.idmap.rows(new_ids)
            if not replace and (old_rows >= 0).any():
                taken = new_ids[old_rows >= 0][:5].tolist()
                raise DuplicateIdError(f"ids already in the index: {taken}; use upsert()")
            first = st.storage.append(x)
            rows = np.arange(first, first + n, dtype=np.int64)
            part = encode_part(
                st.tree,
                self._quantizer,
                rotated,
                leaves,
                rows,
                self._metric,
                st.table is not None,
            )
            row_ok = st.row_ok
            replaced = old_rows[old_rows >= 0]
            if row_ok is not None or replaced.size:
                row_ok = (
                    np.ones(first + n, dtype=bool)
                    if row_ok is None
                    else np.concatenate([row_ok, np.ones(first + n - row_ok.shape[0], dtype=bool)])
                )
                row_ok[replaced] = False
            tree, base, delta = add_to_parts(
                st.tree, st.base, st.delta, part, leaves, row_ok, self._splitter(st.storage.take)
            )
            table = st.table if tree is st.tree or st.table is None else self._code_table(tree)
            row_id = np.concatenate(
                [st.row_id, np.full(first - st.row_id.shape[0], -1, np.int64), new_ids]
            )
            idmap = st.idmap.without(new_ids[old_rows >= 0]).with_added(row_id, rows)
            new_state = self._make_state(
                tree, table, base, delta, row_id, row_ok, idmap, st.storage
            )
            last_id = max(self._next_id(st), int(new_ids.max()) + 1)
            # The metadata change is one SQLite transaction (all or nothing) and the only
            # step left that can fail: if it does, no state was published and the rows
            # just appended stay unreferenced (invisible; save and compact drop them).
            with self._meta_lock:
                if docs is not None:
                    self._metadata.put(new_ids, docs)
                elif not replace:
                    self._metadata.delete(new_ids)  # ids reused after a delete start bare
                self._state = new_state
                self._last_id = last_id
        return new_ids

    def _splitter(self, take: Callable[[I64], F32]) -> Splitter:
        return Splitter(
            quantizer=self._quantizer,
            metric=self._metric,
            take=take,
            max_leaf_size=self._params["max_leaf_size"],
            # Twice the leaf size the build made (at most 2 * max_leaf_size): k-means splits
            # leave leaves far below max_leaf_size, and letting them all double before a
            # split halves the share of the index that `probes` leaves cover. At least a
            # third of max_leaf_size (about what large builds make): an index built from a
            # handful of vectors and grown by adds must not split into leaves of two.
            split_above=2 * _leaf_target(self._params),
            branching_factor=self._params["branching_factor"],
            max_iterations=self._params["max_iterations"],
            seed=self._params["seed"],
        )

    def _code_table(self, tree: Tree) -> CodeTable:
        return code_table(tree, self._quantizer, self._metric)

    def _next_id(self, st: IndexState) -> int:
        return max(
            getattr(self, "_last_id", 0), st.idmap.max_id + 1, int(st.row_id.max(initial=-1)) + 1
        )

    def delete(self, ids: Any, *, missing_ok: bool = False) -> int:
        """Delete vectors by id, at once for every later search; return how many.

        Unknown ids raise ``UnknownIdError`` unless ``missing_ok``. The rows stay in
        storage until :meth:`compact` (or are left out by the next :meth:`save`).
        """
        wanted = as_ids(ids)
        with self._write_lock:
            st = self._state
            rows = _rows_of(st, wanted, missing_ok=missing_ok)
            rows = np.unique(rows[rows >= 0])
            if rows.size == 0:
                return 0
            row_ok = np.ones(st.row_id.shape[0], bool) if st.row_ok is None else st.row_ok.copy()
            row_ok[rows] = False
            gone = st.row_id[rows]
            new_state = self._changed(row_ok=row_ok, idmap=st.idmap.without(gone))
            with self._meta_lock:  # metadata first (a transaction), then publish: all or none
                self._metadata.delete(gone)
                self._state = new_state
        return int(rows.size)

    def get_metadata(self, id_: int) -> dict[str, Any] | None:
        """The metadata of ``id_`` (``None`` if it has none).

        ``UnknownIdError`` if no live vector has this id (any int: also negative ones and
        ones beyond int64); ``InvalidParameterError`` if ``id_`` is not an int (a bool,
        a float, a string).
        """
        value = one_id(id_)
        if value is None or value not in self:
            raise UnknownIdError(f"id {id_!r} is not in the index")
        return self._metadata.get(value)

    def _state_and_matches(self, filt: Filter | None) -> tuple[IndexState, I64 | None]:
        """The published state and, with a filter, the ids whose metadata matches it at
        the same moment. Writes change metadata and publish the state that goes with it
        under ``_meta_lock`` too, so a filtered search never pairs an id's new metadata
        with its old vector, or the reverse."""
        if filt is None:
            return self._state, None
        with self._meta_lock:
            return self._state, self._metadata.matching(filt)

    def ids_matching(self, filter: Filter) -> I64:
        """Ids ``(m,)`` int64, ascending, of the vectors whose metadata matches ``filter``
        (a dict of conditions or a predicate, as for ``search(filter=...)``; see
        :mod:`vectordb.storage.metadata`). Vectors without metadata match no dict filter."""
        filt = check_filter(filter)
        if filt is None:
            raise InvalidParameterError("ids_matching needs a filter (a dict or a callable)")
        return np.sort(self._metadata.matching(filt))

    def get_vectors(self, ids: Any) -> F32:
        """The stored vectors of ``ids``: ``(n,)`` ints in, ``(n, d)`` float32 out, in order.

        What the index holds: with ``metric="cosine"`` the vectors normalised to unit
        length. Unknown ids raise ``UnknownIdError``. In mmap mode the rows are read from
        the file (page faults, no copy of the rest).
        """
        st = self._state
        rows = _rows_of(st, as_ids(ids))
        if rows.size == 0:
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(st.storage.take(rows), dtype=np.float32)

    def compact(self, *, progress: bool | None = None) -> None:
        """Rewrite storage without deleted rows, leaf by leaf, fold added vectors in, and
        split leaves that grew past twice their size at build (at most ``2 * max_leaf_size``).

        In RAM the vectors are copied; in mmap mode a new vector file is written beside the
        mapped one (removed again by :meth:`close`; the next :meth:`save` makes it part of
        the index directory). Searches may run meanwhile. ``progress``: a progress bar for
        the file written in mmap mode, on a terminal (needs tqdm); ``False`` never.
        """
        with self._write_lock:
            st = self._state
            old = st.storage
            tree, base, order = compacted(
                st.tree, st.base, st.delta, st.row_ok, self._splitter(old.take)
            )
            table = st.table if tree is st.tree or st.table is None else self._code_table(tree)
            storage: InMemoryStorage | MmapStorage
            if isinstance(old, MmapStorage):
                path = old.path.parent / f".{old.path.name}.compact-{uuid.uuid4().hex[:12]}"
                with progress_bar(
                    order.shape[0] * self.dim * 4, "compacting", unit="B", progress=progress
                ) as bar:
                    write_rows(old.take, order, self.dim, path, bar.update)
                storage = MmapStorage(path, order.shape[0], self.dim, owned=True)
            else:
                storage = InMemoryStorage(np.ascontiguousarray(old.take(order)))
            row_id = st.row_id[order]
            idmap = IdMap.from_rows(row_id, np.arange(row_id.shape[0], dtype=np.int64))
            words = None if base.codes is None else base.codes.shape[0]
            delta = Part.empty(tree.n_leaves, words, base.dots is not None)
            self._state = self._make_state(tree, table, base, delta, row_id, None, idmap, storage)
            old.discard()  # searches still reading the old storage keep its mapping


def _rows_of(st: IndexState, ids: I64, *, missing_ok: bool = False) -> I64:
    """Storage rows ``(n,)`` int64 of ``ids`` (``-1`` for absent ones, or
    ``UnknownIdError`` naming the first few unless ``missing_ok``)."""
    rows = st.idmap.rows(ids)
    if not missing_ok and (rows < 0).any():
        raise UnknownIdError(f"ids not in the index: {ids[rows < 0][:5].tolist()}")
    return rows


def _leaf_target(params: dict[str, Any]) -> int:
    most = int(params["max_leaf_size"])
    built = int(params.get("leaf_target", most))
    return min(most, max(built, most // 3, 1))


def check_new_ids(ids: Any, n: int) -> I64:
    arr = as_ids(ids)
    if arr.shape[0] != n:
        raise InvalidParameterError(f"got {arr.shape[0]} ids for {n} vectors")
    if np.unique(arr).shape[0] != n:
        dup = arr[np.flatnonzero(np.diff(np.sort(arr)) == 0)[0]]
        raise DuplicateIdError(f"id {int(dup)} appears twice")
    return arr


def encode_metadata(metadata: Any, n: int) -> list[str | None] | None:
    if metadata is None:
        return None
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence):
        raise InvalidParameterError("metadata must be a list with one dict (or None) per vector")
    if len(metadata) != n:
        raise InvalidParameterError(f"got {len(metadata)} metadata entries for {n} vectors")
    return [None if d is None else MetadataStore.encode([d])[0] for d in metadata]
