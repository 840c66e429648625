"""``ClusteredIndex``: tree routing + binary residual codes + exact rerank on full vectors."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import progress_bar
from .._types import F32, I64, Mask
from .._validation import as_query_matrix, check_k, positive_int
from ..backends import Backend, resolve_backend
from ..core.codes import CodeTable, Quantizer
from ..core.metrics import Metric, prepare
from ..core.parts import Part
from ..core.tree import Tree
from ..errors import (
    AlreadyUsingMmapError,
    InvalidParameterError,
)
from ..search.candidates import leaf_sizes
from ..search.pipeline import Stages
from ..search.rerank import VectorScorer, rerank
from ..storage.idmap import IdMap, one_id
from ..storage.metadata import Filter, MetadataStore, check_filter
from ..storage.vectors import InMemoryStorage, MmapStorage, write_vectors
from .state import IndexState, VectorSelector, ids_of
from .writes import Writes

__all__ = ["ClusteredIndex"]


#: ``search_batch(threads=...)`` gives each thread at least this many queries.
_MIN_QUERIES_PER_THREAD = 1024
#: A filter matching at most this many vectors is answered by scoring them all exactly.
EXACT_FILTER_ROWS = 4096


class ClusteredIndex(Writes):
    """Approximate nearest-neighbour index over float32 vectors, that can grow and shrink.

    A hierarchical k-means tree routes each query to a few leaves; 1-bit codes of the
    vectors in those leaves rank candidates; the best ``k * rerank_factor`` are reranked
    exactly on the full vectors, held in RAM or in a memory-mapped file. Vectors carry
    int64 ids and optional metadata; :meth:`add`, :meth:`upsert` and :meth:`delete` change
    the index in place, :meth:`compact` reclaims deleted rows.

    Create one with :meth:`build` or :meth:`open`. Searches are thread-safe, also while a
    write runs in another thread: a search sees the index before or after a write, never
    half of it. Writes are serialised. ``use_mmap_storage`` and ``close`` must not run
    during searches.
    """

    def __init__(
        self,
        *,
        tree: Tree,
        table: CodeTable | None,
        base: Part,
        quantizer: Quantizer,
        ids: I64,
        storage: InMemoryStorage | MmapStorage,
        metric: Metric,
        params: dict[str, Any],
        backend: Backend,
        metadata: MetadataStore | None = None,
    ) -> None:
        """Internal: use :meth:`build` or :meth:`open`."""
        self._quantizer = quantizer
        self._metric = metric
        self._params = dict(params)
        self._backend = backend
        self._metadata = metadata if metadata is not None else MetadataStore()
        self._write_lock = threading.RLock()
        self._meta_lock = threading.Lock()  # see Writes._state_and_matches
        words = None if base.codes is None else base.codes.shape[0]
        delta = Part.empty(tree.n_leaves, words, base.dots is not None)
        idmap = IdMap.from_rows(ids, np.arange(ids.shape[0], dtype=np.int64))
        self._state = self._make_state(tree, table, base, delta, ids, None, idmap, storage)

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
    ) -> IndexState:
        parts = (base, delta)
        stages = Stages(self._quantizer, tree, storage, self._metric)
        if table is not None:
            selector = self._backend.code_selector(table, parts, stages)
        else:
            scorer = VectorScorer(storage.take, storage.slice, self._metric)
            selector = VectorSelector(scorer, parts, stages)
        sizes = leaf_sizes(parts, row_ok)
        return IndexState(tree, table, base, delta, row_id, row_ok, idmap, storage, sizes, selector)

    def _replace(self, **changes: Any) -> None:
        """Publish the current state with ``changes`` (keyword names of ``IndexState``)."""
        self._state = self._changed(**changes)

    def _changed(self, **changes: Any) -> IndexState:
        """The current state with ``changes`` (keyword names of ``IndexState``), not yet
        published: a write prepares it first, so that nothing that can fail comes after
        its first visible change."""
        st = self._state
        fields: dict[str, Any] = {
            "tree": st.tree,
            "table": st.table,
            "base": st.base,
            "delta": st.delta,
            "row_id": st.row_id,
            "row_ok": st.row_ok,
            "idmap": st.idmap,
            "storage": st.storage,
        }
        fields.update(changes)
        return self._make_state(**fields)

    @property
    def _storage(self) -> InMemoryStorage | MmapStorage:
        return self._state.storage

    @property
    def _tree(self) -> Tree:
        return self._state.tree

    @property
    def _table(self) -> CodeTable | None:
        return self._state.table

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        vectors: Any,
        *,
        ids: Any = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        branching_factor: int = 10,
        max_leaf_size: int = 1000,
        metric: str | Metric = "l2",
        max_iterations: int = 20,
        seed: int = 0,
        rotate: bool = True,
        leaf_scan: str = "auto",
        backend: str = "auto",
        progress: bool | None = None,
    ) -> ClusteredIndex:
        """Build an index over ``vectors``.

        Parameters
        ----------
        vectors : array_like of shape (n, d)
            Real numbers, converted to contiguous float32. No NaN or infinity.
        ids : array-like of n distinct integers >= 0, optional
            External ids (int64); default ``0..n-1``.
        metadata : sequence of n dicts (or None), optional
            JSON-serialisable metadata per vector, for ``filter=`` in searches.
        branching_factor : int, >= 2
            Children of every inner tree node.
        max_leaf_size : int, >= 1
            A node with more vectors than this is split again.
        metric : {"l2", "cosine", "ip"} or Metric
            ``l2`` = squared Euclidean, ``cosine`` = 1 - cosine similarity (vectors are
            normalised on input), ``ip`` = negative inner product.
        max_iterations : int, >= 1
            Lloyd iterations of every k-means split.
        seed : int, >= 0
            Builds are deterministic for a given seed (and BLAS thread count).
        rotate : bool
            Rotate vectors randomly (a permutation and 64 x 64 orthogonal blocks,
            ``256 * d`` bytes) before taking code bits. Keep it on: without it, data with
            uneven or constant coordinates ranks badly (fashion-mnist recall@10 0.63
            instead of 0.96 at the default search parameters).
        leaf_scan : {"auto", "codes", "vectors"}
            How the vectors of the probed leaves are ranked before the rerank. ``codes``:
            1-bit codes in RAM (``d/8`` bytes per vector). ``vectors``: exact distances on
            the full vectors (no codes; in mmap mode every probed leaf is read from the
            file), for low dimensions where 1-bit codes cannot rank. ``auto`` picks
            ``vectors`` below 128 dimensions, else ``codes``.
        backend : {"auto", "numpy", "cupy"}
            Where batches are searched: ``auto`` uses a CUDA GPU through CuPy when one is
            usable, else NumPy (see :mod:`vectordb.backends`). The same neighbours, up to
            ties within float32 rounding.
        progress : bool, optional
            Progress bars for clustering and coding on a terminal (needs tqdm); ``False``
            never draws them. See :mod:`vectordb._progress`.

        Raises
        ------
        InvalidVectorsError
            Empty, ragged, non-numeric or non-finite vectors; zero rows with cosine.
        InvalidParameterError
            Any parameter out of range, or an unknown metric.
        BackendUnavailableError
            ``backend="cupy"`` where CuPy or a CUDA device cannot be used.
        """
        from .build import build_components

        return cls(
            **build_components(
                vectors,
                ids=ids,
                metadata=metadata,
                branching_factor=branching_factor,
                max_leaf_size=max_leaf_size,
                metric=metric,
                max_iterations=max_iterations,
                seed=seed,
                rotate=rotate,
                leaf_scan=leaf_scan,
                backend=backend,
                progress=progress,
            )
        )

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        """Number of live vectors."""
        return len(self._state.idmap)

    def __contains__(self, id_: object) -> bool:
        """Whether a live vector has id ``id_``. Anything that cannot be an id (not an int,
        a bool, a float, negative, beyond int64) is not in the index: ``False``, no error."""
        try:
            value = one_id(id_)
        except InvalidParameterError:
            return False
        if value is None:
            return False
        return bool(self._state.idmap.rows(np.array([value], dtype=np.int64))[0] >= 0)

    @property
    def ids(self) -> I64:
        """(n,) int64 ids of the live vectors, ascending (a copy)."""
        return self._state.idmap.items()[0].copy()

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return self._quantizer.dim

    @property
    def metric(self) -> Metric:
        """The distance metric (a ``str`` enum: compares equal to ``"l2"`` etc.)."""
        return self._metric

    @property
    def n_leaves(self) -> int:
        """Number of leaves of the tree."""
        return self._state.tree.n_leaves

    @property
    def backend(self) -> str:
        """``"numpy"`` or ``"cupy"``: the backend really in use."""
        return self._backend.name

    def use_backend(self, backend: str) -> None:
        """Switch the search backend (``"auto"``, ``"numpy"``, ``"cupy"``) without a rebuild:
        the same neighbours, up to ties within float32 rounding (see ``backends``)."""
        chosen = resolve_backend(backend)
        with self._write_lock:
            self._backend = chosen
            self._replace()

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
        return self._storage.is_mmap

    @property
    def mmap_path(self) -> Path | None:
        """The memory-mapped vector file, or ``None`` in RAM mode."""
        return self._storage.path

    def __repr__(self) -> str:
        where = f"mmap={str(self._storage.path)!r}" if self.is_using_mmap else "in RAM"
        return (
            f"ClusteredIndex(n={len(self)}, dim={self.dim}, metric={self._metric.value!r}, "
            f"leaves={self.n_leaves}, vectors {where})"
        )

    def memory_usage_bytes(self) -> int:
        """Bytes of process memory held by the index: tree, codes, norms, ids, tombstones,
        rotation, metadata database, and the full vectors when in RAM. Memory-mapped vectors
        count 0: page cache, shared and reclaimable (shown in RSS as file-backed pages)."""
        return self._state.nbytes + self._quantizer.nbytes + self._metadata.nbytes

    # ------------------------------------------------------------------ search
    def search(
        self,
        query: Any,
        k: int = 10,
        *,
        probes: int = 4,
        rerank_factor: int = 5,
        filter: Filter | None = None,
    ) -> tuple[I64, F32]:
        """The ``k`` nearest neighbours of one query.

        Parameters
        ----------
        query : array-like, shape (d,) (or (1, d))
        k : int, >= 1
            Results wanted. With fewer than ``k`` (matching) vectors, ids are padded with
            ``-1`` and distances with ``inf``.
        probes : int, >= 1
            Tree nodes kept per level of the beam search; more = higher recall, slower.
        rerank_factor : int, >= 1
            ``k * rerank_factor`` candidates are reranked on the exact vectors.
        filter : dict or callable, optional
            Only vectors whose metadata matches (see :mod:`vectordb.storage.metadata`). Applied
            before the top-k: if k vectors match, k are returned.

        Returns
        -------
        ids : (k,) int64, best first
        distances : (k,) float32, ascending
        """
        q = as_query_matrix(query, self.dim, single=True)
        ids, dists = self._search(q, k, probes, rerank_factor, filter)
        return ids[0], dists[0]

    def search_batch(
        self,
        queries: Any,
        k: int = 10,
        *,
        probes: int = 4,
        rerank_factor: int = 5,
        filter: Filter | None = None,
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
        parts = min(threads, q.shape[0] // _MIN_QUERIES_PER_THREAD)
        if parts < 2:
            return self._search(q, k, probes, rerank_factor, filter)
        # Validate once, here, rather than in every thread.
        self._search(q[:1], k, probes, rerank_factor, filter)
        chunks = np.array_split(q, parts)
        with ThreadPoolExecutor(parts, thread_name_prefix="vectordb-search") as pool:
            found = list(
                pool.map(lambda c: self._search(c, k, probes, rerank_factor, filter), chunks)
            )
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])

    def _search(
        self, q: F32, k: Any, probes: Any, rerank_factor: Any, filt: Any
    ) -> tuple[I64, F32]:
        k = check_k(k)
        probes = positive_int("probes", probes)
        rerank_factor = positive_int("rerank_factor", rerank_factor)
        filt = check_filter(filt)
        st, matching = self._state_and_matches(filt)
        q = prepare(q, self._metric)
        row_ok, sizes, allowed = st.row_ok, st.live_sizes, len(st.idmap)
        if matching is not None or allowed == 0:  # (an emptied index has no row to read)
            rows = st.live_rows_of(matching) if matching is not None else np.empty(0, np.int64)
            allowed = int(rows.shape[0])
            if allowed <= max(EXACT_FILTER_ROWS, k * rerank_factor):
                # Few matches: score them all exactly, like a brute force.
                cand = np.broadcast_to(rows, (q.shape[0], allowed))
                found, dists = rerank(
                    q, np.ascontiguousarray(cand), k, st.storage.take, self._metric
                )
                return ids_of(st, found), dists
            row_ok, sizes = st.only(rows)
            # A selective filter leaves fewer matches per leaf: probe more leaves for them.
            probes = min(st.tree.n_nodes, probes * min(8, -(-len(st.idmap) // allowed)))
        m, need = k * rerank_factor, min(k, allowed)
        found, dists = st.selector.search(q, k, probes, m, row_ok, sizes, need)
        return ids_of(st, found), dists

    # ------------------------------------------------------------------ storage
    def use_mmap_storage(
        self, path: str | os.PathLike[str], *, progress: bool | None = None
    ) -> None:
        """Move the full vectors to a memory-mapped file at ``path`` and free their RAM.

        The file is written to a temporary name, fsynced and renamed (an existing file at
        ``path`` is replaced). Format: raw little-endian float32, ``n * dim * 4`` bytes,
        rows in storage order. Raises ``AlreadyUsingMmapError`` if already mapped, and
        ``StorageError`` if writing fails (the vectors then stay in RAM, usable).
        ``progress``: a progress bar on a terminal (needs tqdm); ``False`` never.
        """
        if self._storage.is_mmap:
            raise AlreadyUsingMmapError(
                f"vectors are already memory-mapped from {self._storage.path}"
            )
        target = Path(path)
        if target.is_dir():
            raise InvalidParameterError(f"{target} is a directory; pass a file path")
        with self._write_lock:
            vectors = self._storage.vectors
            with progress_bar(int(vectors.nbytes), "writing", unit="B", progress=progress) as bar:
                write_vectors(vectors, target, bar.update)
            self._replace(storage=MmapStorage(target, vectors.shape[0], self.dim))

    def warm(self, *, progress: bool | None = None) -> int:
        """Read the memory-mapped vector file once, so that its pages are in the page cache
        and the first searches do not wait for the disk; returns bytes read (0 in RAM).

        Reads sequentially in 16 MiB chunks (hinting the kernel first). ``progress``: a
        progress bar on a terminal (needs tqdm); ``False`` never.
        """
        storage = self._storage
        if not isinstance(storage, MmapStorage):
            return 0
        size = storage.vectors.nbytes
        with progress_bar(size, "warming", unit="B", progress=progress) as bar:
            return storage.warm(bar.update)

    def close(self) -> None:
        """Release the memory-mapped file, if any. Searching afterwards raises
        ``IndexClosedError`` in mmap mode; idempotent."""
        self._storage.close()

    def __enter__(self) -> ClusteredIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, progress: bool | None = None) -> None:
        """Save to the directory ``path``, atomically (see :mod:`vectordb.storage.save`).

        The saved index is compact: deleted rows are left out, added ones folded in.
        ``progress``: a progress bar on a terminal (needs tqdm); ``False`` never.
        """
        from ..storage.save import save_index

        with self._write_lock:
            save_index(self, Path(path), progress)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        backend: str = "auto",
        progress: bool | None = None,
    ) -> ClusteredIndex:
        """Open an index saved with :meth:`save`, without rebuilding.

        Parameters
        ----------
        path : str or path-like
            The index directory.
        mmap : bool
            Map ``vectors.bin`` instead of reading it into RAM.
        verify : bool
            Check every file's CRC32 (reads everything once); sizes, dtypes and shapes
            are always checked.
        backend : {"auto", "numpy", "cupy"}
            As for :meth:`build`.
        progress : bool, optional
            A progress bar while ``verify`` reads the files, on a terminal (needs tqdm);
            ``False`` never.

        Raises
        ------
        InvalidIndexFileError
            Missing or malformed manifest, unknown format version, a file of the wrong
            size, dtype or shape, or (with ``verify``) a checksum mismatch.
        """
        from ..storage.save import open_index

        return open_index(
            cls,
            Path(path),
            mmap=mmap,
            verify=verify,
            backend=resolve_backend(backend),
            progress=progress,
        )
