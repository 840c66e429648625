"""``ClusteredIndex``: tree routing + binary residual codes + exact rerank on full vectors."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64
from .._validation import as_matrix, as_query_matrix, build_params, check_k, positive_int
from ..backends import Backend, resolve_backend
from ..core.metrics import Metric, parse_metric, prepare
from ..errors import AlreadyUsingMmapError, InvalidParameterError
from ..storage.filters import Filter, check_filter
from ..storage.idmap import as_ids
from ..storage.metadata import MetadataStore, encode_documents
from ..storage.snapshot import IndexData, LivingData
from ..storage.vectors import MmapStorage, Warmer, mapped_copy
from . import update
from .build import build_data
from .calibrate import DEFAULT_TARGET, calibrate_into, check_target, settings
from .lookups import Lookups
from .ondisk import BuildInput, build_into
from .persistence import Persistent
from .query import Querying
from .records import OP_ADD, OP_DELETE, OP_UPSERT
from .state import IndexState

__all__ = ["ClusteredIndex"]

#: ``search_batch(threads=...)`` gives each thread at least this many queries (a few ms).
_MIN_QUERIES_PER_THREAD = 64
#: One metadata dict (or None) per vector, or none at all.
Documents = Sequence[Mapping[str, Any] | None] | None


class ClusteredIndex(Lookups, Querying, Persistent):
    """Approximate nearest-neighbour index over float32 vectors, that can grow and shrink.

    A hierarchical k-means tree routes each query to a few leaves; RaBitQ codes of the
    vectors in those leaves rank candidates; those the codes' error bound cannot rule out are
    reranked exactly on the full vectors, held in RAM or in a memory-mapped file. Vectors carry
    int64 ids and optional metadata; :meth:`add`, :meth:`upsert` and :meth:`delete` change
    the index in place, :meth:`compact` reclaims deleted rows.

    Create one with :meth:`build`, :meth:`open` or :meth:`create` (empty); an index in a
    directory logs its writes there (:mod:`vectordb.index.persistence`). Searches are
    thread-safe, also while a write runs in another thread: a search sees the index before
    or after a write, never half of it. Writes are serialised. ``use_mmap_storage`` and
    ``close`` must not run during searches.

    ``auto_compact`` (default ``True``; set it on an index): a write compacts once storage
    holds as many dead rows as live ones, so that storage stays within twice the index.
    """

    #: Whether writes compact on their own (see the class docstring).
    auto_compact: bool = True

    def __init__(self, data: IndexData | LivingData, backend: Backend) -> None:
        """Internal: use :meth:`build` or :meth:`open`."""
        self._params = dict(data.params)
        self._metadata = data.metadata if data.metadata is not None else MetadataStore()
        self._write_lock = threading.RLock()
        self._meta_lock = threading.Lock()  # see _state_and_matches
        self._state = IndexState.of(data, backend)
        if (field := self._params.get("text_field")) is not None:
            self._metadata.enable_text(field)
        calibrate_into(self._params, self._state, if_stale=True)  # built, or saved without

    @classmethod
    def build(
        cls,
        vectors: Any,
        *,
        ids: Any = None,
        metadata: Documents = None,
        branching_factor: int = 10,
        max_leaf_size: int = 1000,
        metric: str | Metric = "l2",
        max_iterations: int = 20,
        seed: int = 0,
        rotate: bool = True,
        leaf_scan: str = "auto",
        code_bits: int | str = "auto",
        target_recall: float = DEFAULT_TARGET,
        backend: str = "auto",
        progress: bool | None = None,
        path: str | os.PathLike[str] | None = None,
        memory_limit: int | None = None,
        text_field: str | None = None,
    ) -> ClusteredIndex:
        """Build an index over ``vectors``, and calibrate its search defaults (see
        :mod:`vectordb.index.calibrate`). With ``path``, straight into that directory holding
        about ``memory_limit`` bytes (default 1 GiB) besides the index's own RAM, and returned
        opened from it, mmap (:mod:`vectordb.index.ondisk`).

        Raises ``InvalidVectorsError`` for empty, ragged, non-numeric or non-finite vectors
        (and zero rows with cosine), ``InvalidParameterError`` for any parameter out of
        range or an unknown metric, ``BackendUnavailableError`` for ``backend="cupy"``
        without CuPy or a CUDA device, or ``text_field`` without SQLite's FTS5.

        Parameters
        ----------
        vectors : array_like of shape (n, d)
            Real numbers, converted to contiguous float32. No NaN or infinity. With
            ``path``, also a memory-mapped ``.npy`` or an iterable of ``(m, d)`` batches.
        ids : array-like of n distinct integers >= 0, optional
            External ids (int64); default ``0..n-1``.
        metadata : sequence of n dicts (or None), optional
            JSON-serialisable metadata per vector, for ``filter=`` and ``query``'s hits.
        branching_factor, max_leaf_size : int, >= 2 and >= 1
            Children of every inner tree node; a node of more vectors is split again.
        metric : {"l2", "cosine", "ip"} or Metric
            ``l2`` = squared Euclidean, ``cosine`` = 1 - cosine similarity (vectors are
            normalised on input), ``ip`` = negative inner product.
        max_iterations, seed : int, >= 1 and >= 0
            Lloyd iterations of every k-means split; builds are deterministic for a seed.
        rotate : bool
            Rotate vectors randomly (a permutation, 64 x 64 orthogonal blocks: ``256 * d`` B)
            before taking code bits. Keep it on: uneven coordinates rank badly without.
        leaf_scan : {"auto", "codes", "vectors"}
            How probed leaves are ranked before the rerank: ``codes`` (``auto``), RaBitQ codes
            in RAM (``code_bits * d/8 + 16`` bytes per vector); ``vectors``, exact distances
            on the full vectors (read from the file in mmap mode).
        code_bits : {"auto", 1, 2, 3, 4}
            Bits a coordinate of a code takes: 1 ranks well from about 128 dimensions up,
            below more (extended RaBitQ codes). ``auto``: 1 from 128 dimensions up, else 4.
        target_recall : float in (0, 1]
            The recall@10 that searches without ``probes`` aim at (saved with the index).
        backend : {"auto", "numpy", "numba", "cupy"}
            Where batches are searched: ``auto``, CuPy on a usable CUDA GPU, else numba,
            else NumPy (:mod:`vectordb.backends`); the same neighbours up to float32 ties.
        progress : bool, optional
            Progress bars on a terminal (needs tqdm); ``False`` never.
        text_field : str, optional
            A metadata field (a string) indexed for ``query(text=...)`` (BM25, SQLite FTS5).
        """
        metric = parse_metric(metric)
        chosen = resolve_backend(backend)
        opts = (branching_factor, max_leaf_size, max_iterations, seed, rotate, leaf_scan)
        p = build_params(*opts, code_bits, text_field)
        p["target_recall"] = check_target(target_recall)
        if path is not None:
            given = BuildInput(vectors, ids, metadata, metric, p)
            make, reopen = partial(cls, backend=chosen), partial(cls.open, backend=backend)
            return build_into(make, reopen, given, Path(path), memory_limit, progress)
        if memory_limit is not None:
            raise InvalidParameterError("memory_limit is for a build with path=")
        return cls(build_data(vectors, ids, metadata, metric, p, progress), chosen)

    def __len__(self) -> int:
        """Number of live vectors."""
        return len(self._state.idmap)

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return self._state.quantizer.dim

    @property
    def metric(self) -> Metric:
        """The distance metric (a ``str`` enum: compares equal to ``"l2"`` etc.)."""
        return self._state.metric

    @property
    def n_leaves(self) -> int:
        """Number of leaves of the tree."""
        return self._state.tree.n_leaves

    @property
    def backend(self) -> str:
        """``"numpy"``, ``"numba"`` or ``"cupy"``: the backend really in use."""
        return self._state.backend.name

    def use_backend(self, backend: str) -> None:
        """Switch the search backend (``backend=`` of :meth:`build`) without a rebuild: the
        same neighbours, up to ties within float32 rounding (see ``backends``)."""
        chosen = resolve_backend(backend)
        with self._write_lock:
            self._state = self._state.replace(backend=chosen)

    @property
    def leaf_scan(self) -> str:
        """``"codes"`` or ``"vectors"``: how probed leaves are ranked (see :meth:`build`)."""
        return str(self._params["leaf_scan"])

    @property
    def params(self) -> dict[str, Any]:
        """Build parameters (a copy)."""
        return dict(self._params)

    @property
    def is_using_mmap(self) -> bool:
        """True when the full vectors live in a memory-mapped file."""
        return self._state.storage.is_mmap

    @property
    def mmap_path(self) -> Path | None:
        """The memory-mapped vector file, or ``None`` in RAM mode."""
        return self._state.storage.path

    @property
    def vector_ram_bytes(self) -> int:
        """Bytes of process memory the full vectors take (0 when memory-mapped)."""
        return self._state.storage.ram_bytes

    def __repr__(self) -> str:
        where = f"mmap={str(self.mmap_path)!r}" if self.is_using_mmap else "in RAM"
        n, metric = len(self), self.metric.value
        leaves = self.n_leaves
        return f"ClusteredIndex({n=}, dim={self.dim}, {metric=}, {leaves=}, vectors {where})"

    def memory_usage_bytes(self) -> int:
        """Bytes of process memory held by the index: tree, codes and their factors, ids,
        tombstones, rotation, metadata, and the vectors when in RAM (memory-mapped: 0)."""
        return self._state.nbytes + self._metadata.nbytes

    def search(
        self,
        query: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
    ) -> tuple[I64, F32]:
        """The ``k`` nearest neighbours of one query.

        Parameters
        ----------
        query : array-like, shape (d,) (or (1, d))
        k : int, >= 1
            Results wanted. With fewer than ``k`` (matching) vectors, ids are padded with
            ``-1`` and distances with ``inf``.
        probes : int, >= 1, optional
            Leaves searched, those whose centroids are nearest the query (IVF's ``nprobe``);
            default: the fewest that reached ``target_recall`` at calibration.
        rerank_factor : int, >= 1, optional
            ``k * rerank_factor`` candidates are reranked exactly; default: of up to
            ``10 * k``, those the codes' error bound cannot rule out.
        target_recall : float in (0, 1], optional
            Recall@10 to aim at instead of the build's (0.95 by default); not with ``probes``.
        filter : dict or callable, optional
            Only vectors whose metadata matches (see :mod:`vectordb.storage.filters`). Applied
            before the top-k: if k vectors match, k are returned.

        Returns
        -------
        ids : (k,) int64, best first
        distances : (k,) float32, ascending
        """
        q = as_query_matrix(query, self.dim, single=True)
        ids, dists = self._searcher(k, probes, rerank_factor, filter, target_recall)(q)
        return ids[0], dists[0]

    def search_batch(
        self,
        queries: Any,
        k: int = 10,
        probes: int | None = None,
        rerank_factor: int | None = None,
        *,
        filter: Filter | None = None,
        target_recall: float | None = None,
        threads: int = 1,
    ) -> tuple[I64, F32]:
        """The ``k`` nearest neighbours of each row of ``queries`` ``(nq, d)``.

        Same parameters as :meth:`search`; returns ``ids`` (nq, k) int64 and ``distances``
        (nq, k) float32, row ``i`` equal to ``search(queries[i])``. ``threads`` > 1 splits
        a large batch into that many parts searched at once on threads of their own
        (NumPy releases the GIL for the heavy steps); the results do not change.
        """
        q = as_query_matrix(queries, self.dim, single=False)
        threads = positive_int("threads", threads)
        run = self._searcher(k, probes, rerank_factor, filter, target_recall)
        parts = min(threads, q.shape[0] // _MIN_QUERIES_PER_THREAD)
        if parts < 2:
            return run(q)
        with ThreadPoolExecutor(parts, thread_name_prefix="vectordb-search") as pool:
            found = list(pool.map(run, np.array_split(q, parts)))
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])

    def _searcher(
        self, k: Any, probes: Any, rerank_factor: Any, filt: Any, target: Any
    ) -> Callable[[F32], tuple[I64, F32]]:
        """The parameters checked and one state taken (with the filter's matches of that
        moment): the search of query rows ``(nq, d)`` against it."""
        k = check_k(k)
        st, matching = self._state_and_matches(check_filter(filt))
        probes, rf = settings(self._params, probes, rerank_factor, target, st.tree.n_leaves)
        return lambda q: st.search(prepare(q, st.metric), k, probes, rf, matching)

    def _state_and_matches(self, filt: Filter | None) -> tuple[IndexState, I64 | None]:
        """The published state and, with a filter, the ids its metadata matches then: writes
        publish state and metadata under ``_meta_lock`` too, so that a filtered search never
        pairs an id's new metadata with its old vector, or the reverse."""
        if filt is None:
            return self._state, None
        with self._meta_lock:
            return self._state, self._metadata.matching(filt)

    def add(self, vectors: Any, ids: Any = None, metadata: Documents = None) -> I64:
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

    def upsert(self, vectors: Any, ids: Any, metadata: Documents = None) -> I64:
        """Add vectors, replacing those whose ids exist (and their metadata, when given;
        without ``metadata`` an existing id keeps its metadata). Returns the ids."""
        if ids is None:
            raise InvalidParameterError("upsert needs ids")
        return self._write(vectors, ids, metadata, replace=True)

    def _write(self, vectors: Any, ids: Any, metadata: Any, *, replace: bool) -> I64:
        x = as_matrix(vectors, "vectors", self.dim)
        return self._apply_write(x, ids, encode_documents(metadata, x.shape[0]), replace, True)

    def _apply_write(
        self, raw: F32, ids: Any, docs: list[str | None] | None, replace: bool, logged: bool
    ) -> I64:
        """Checks, then the new state, the log (``logged``), then metadata and state
        together, then the log's commit: a write that raises changes nothing a caller
        can see, and one that returns is durable (see :mod:`.persistence`)."""
        st = self._state
        x = prepare(raw, st.metric, copy=False)
        rotated = st.quantizer.rotate(x)
        with self._write_lock:
            if logged:
                self._writer()  # first: the lock, and the directory's writes caught up
            if self._state.quantizer is not st.quantizer:  # caught up with a new checkpoint
                rotated = self._state.quantizer.rotate(x)
            new_state, new_ids = update.added(self._state, x, rotated, ids, replace, self._params)
            op = OP_UPSERT if replace else OP_ADD
            ticket = self._log(op, new_ids, raw, docs) if logged else 0
            # The metadata change is one SQLite transaction (all or nothing) and the only
            # step left that can fail: if it does, no state was published and the rows
            # just appended stay unreferenced (invisible; save and compact drop them).
            with self._meta_lock:
                if docs is not None:
                    self._metadata.put(new_ids, docs)
                elif not replace:
                    self._metadata.delete(new_ids)  # ids reused after a delete start bare
                self._state = new_state
            calibrate_into(self._params, new_state, if_stale=True)
        self._commit(ticket)
        if logged:
            self._compact_if_wasteful()
        return new_ids

    def delete(self, ids: Any, *, missing_ok: bool = False) -> int:
        """Delete vectors by id, at once for every later search; return how many.

        Unknown ids raise ``UnknownIdError`` unless ``missing_ok``. The rows stay in
        storage until :meth:`compact` (or are left out by the next :meth:`save`).
        """
        return self._apply_delete(as_ids(ids), missing_ok, True)

    def _apply_delete(self, wanted: I64, missing_ok: bool, logged: bool) -> int:
        with self._write_lock:
            if logged:
                self._writer()
            st = self._state
            rows = st.rows_of(wanted, missing_ok=missing_ok)
            rows = np.unique(rows[rows >= 0])
            if rows.size == 0:
                return 0
            new_state = update.deleted(st, rows)
            ticket = self._log(OP_DELETE, st.row_id[rows], None, None) if logged else 0
            with self._meta_lock:  # metadata first (a transaction), then publish: all or none
                self._metadata.delete(st.row_id[rows])
                self._state = new_state
        self._commit(ticket)
        if logged:
            self._compact_if_wasteful()
        return int(rows.size)

    def _compact_if_wasteful(self) -> None:
        if self.auto_compact and update.wasteful(self._state):
            self.compact(progress=False)

    def compact(self, *, progress: bool | None = None) -> None:
        """Rewrite storage without deleted rows, leaf by leaf, fold added vectors in, and
        split leaves that grew past twice their size at build (at most ``2 * max_leaf_size``).
        A write runs it itself once dead rows are as many as live ones (``auto_compact``).
        In RAM the vectors are copied; in mmap mode a new vector file is written beside the
        mapped one (removed again by :meth:`close`; the next :meth:`save` makes it part of
        the index directory). Searches may run meanwhile. ``progress``: as for :meth:`save`."""
        with self._write_lock:
            self._writer()  # it writes a file into the bound directory: the writer's
            st = self._state
            self._state = update.compacted_state(st, self._params, progress)
            st.storage.discard()  # searches still reading the old storage keep its mapping
            calibrate_into(self._params, self._state)

    def use_mmap_storage(
        self, path: str | os.PathLike[str], *, progress: bool | None = None
    ) -> None:
        """Move the full vectors to a memory-mapped file at ``path`` (written to a temporary
        name, fsynced and renamed; raw little-endian float32 rows) and free their RAM.
        ``AlreadyUsingMmapError`` if mapped, ``StorageError`` if writing fails (the vectors
        then stay in RAM, usable). ``progress``: as for :meth:`save`."""
        if self.is_using_mmap:
            raise AlreadyUsingMmapError(f"vectors are already memory-mapped from {self.mmap_path}")
        with self._write_lock:
            vectors = self._state.storage.vectors
            with progress_bar(int(vectors.nbytes), "writing", unit="B", progress=progress) as bar:
                storage = mapped_copy(vectors, Path(path), bar.update)
            self._state = self._state.replace(storage=storage)

    def warm(self, *, progress: bool | None = None) -> int:
        """Read the mapped vector file once, in order (the steps of :meth:`warmer`), so that
        its pages are in the page cache and the first searches do not wait for the disk;
        returns bytes read (0 in RAM). ``progress``: as for :meth:`save`."""
        if not isinstance(storage := self._state.storage, MmapStorage):
            return 0
        with progress_bar(storage.vectors.nbytes, "warming", unit="B", progress=progress) as bar:
            return storage.warm(bar.update)

    def warmer(self) -> Warmer | None:
        """The steps of :meth:`warm` (``None`` in RAM), a read of the mapped file chunk by chunk,
        for callers that run each step elsewhere (the async engine's executor)."""
        return st.warmer() if isinstance(st := self._state.storage, MmapStorage) else None

    def drop_cache(self) -> None:
        """Evict the mapped vectors' pages (this process's and the page cache's); RAM: no-op."""
        if isinstance(storage := self._state.storage, MmapStorage):
            storage.drop_cache()
