"""Shared core of the LangChain and LlamaIndex adapters: texts under string ids.

A :class:`TextIndex` holds a :class:`~vectordb.ClusteredIndex`, built at the first write (a
build needs data; until then searches find nothing), its string ids under int64 ones
(:mod:`vectordb.integrations._idmap`). Text, string id and user metadata form the vectordb
metadata of the id, ``{"_text": text, "_sid": string id, **user_metadata}``: dict filters
apply to the user's keys as they are, and the maps are rebuilt from it when a saved store
is opened.

Queries (:meth:`TextIndex.query`) rank by vector, by text (BM25 over ``_text``: the index
of every store, new or loaded, indexes it with :meth:`ClusteredIndex.index_text`) or both
(hybrid, fused: :mod:`vectordb.index.query`).

Async methods are served by one :class:`~vectordb.AsyncEngine` per event loop (an engine
belongs to its loop), made lazily once the index exists; the index object is never replaced
afterwards. Engines of closed loops are closed when found; the others when the store is
closed or collected.

Saved layout: see :mod:`vectordb.integrations._persist`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._types import F32, I64
from .._validation import as_matrix, build_params, positive_int
from ..core.metrics import Metric, parse_metric
from ..engine import AsyncEngine
from ..errors import (
    InvalidIndexFileError,
    InvalidParameterError,
    UnknownIdError,
)
from ..index.calibrate import check_target
from ..index.clustered import ClusteredIndex
from ..storage.files import same_dir
from ..storage.filters import Filter
from ._engines import LoopEngines
from ._idmap import StringIds
from ._persist import INDEX_DIR, STORE_FILE, checkpoint_store, open_index, read_info, save_store
from ._queries import index_texts, query_args, records_of, text_ready, vector_args, vector_only
from ._records import (
    ID_KEY,
    RESERVED_KEYS,
    TEXT_KEY,
    Record,
    check_ids,
    record,
    stored,
    user_filter,
)

__all__ = ["ID_KEY", "RESERVED_KEYS", "TEXT_KEY", "Record", "TextIndex"]


#: Constructor parameters saved in ``store.json``.
_SAVED = ("metric", "probes", "rerank_factor", "build_options")
#: Build parameters a store passes on (``backend`` too): those ``build_params`` checks but
#: ``text_field``, which is always ``_text``.
_BUILD_OPTIONS = tuple(p for p in inspect.signature(build_params).parameters if p != "text_field")


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a shielded write's error as seen: the caller may have stopped waiting."""
    if not task.cancelled():
        task.exception()


class TextIndex:
    """Texts, their vectors and metadata under string ids (see the module docstring).

    Parameters
    ----------
    kind : the adapter's name, saved and checked by :meth:`load`
    metric : {"cosine", "l2", "ip"}
        vectordb's distances: ``1 - cos``, squared Euclidean, ``-dot``.
    probes, rerank_factor : int, >= 1, optional
        Search defaults (see :meth:`ClusteredIndex.search`); ``None``: the index's
        calibrated ones.
    build_options : dict, optional
        For :meth:`ClusteredIndex.build` at the first write: ``branching_factor``,
        ``max_leaf_size``, ``max_iterations``, ``seed``, ``rotate``, ``leaf_scan``,
        ``code_bits``, ``target_recall``, ``backend`` (not ``text_field``: a store
        searches its texts).
    """

    def __init__(
        self,
        kind: str,
        metric: str | Metric = "cosine",
        probes: int | None = None,
        rerank_factor: int | None = None,
        build_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.metric = parse_metric(metric)
        self.probes = None if probes is None else positive_int("probes", probes)
        self.rerank_factor = (
            None if rerank_factor is None else positive_int("rerank_factor", rerank_factor)
        )
        options = {"backend": "auto", **(build_options or {})}
        unknown = sorted(set(options) - {*_BUILD_OPTIONS, "backend", "target_recall"})
        if unknown:
            raise InvalidParameterError(
                f"unknown build options {unknown}; use {', '.join(_BUILD_OPTIONS)}, "
                "target_recall, backend (a store's text search is always over its texts)"
            )
        # Checked now rather than at the first write, far from the mistake.
        defaults = inspect.signature(ClusteredIndex.build).parameters
        build_params(**{k: options.get(k, defaults[k].default) for k in _BUILD_OPTIONS})
        if "target_recall" in options:
            check_target(options["target_recall"])
        self.build_options = options
        self._index: ClusteredIndex | None = None
        #: The store directory this store was loaded from or saved to, while its index is
        #: bound there (or not built yet): the first build is saved there at once.
        self._home: Path | None = None
        self._ids = StringIds()
        self._build_lock = threading.Lock()  # the first build: seconds, on a thread
        self._loops = LoopEngines()
        self._tasks: set[asyncio.Future[None]] = set()  # writes whose callers may be gone
        self._engines = self._loops.engines

    @property
    def index(self) -> ClusteredIndex | None:
        """The vectordb index, ``None`` until the first write."""
        return self._index

    def similarity(self, distance: float) -> float:
        """A "higher is closer" score for a vectordb distance.

        cosine: ``cos = 1 - distance``; ip: ``dot = -distance``; l2 (squared Euclidean):
        LangChain's Euclidean convention ``1 - sqrt(distance) / sqrt(2)``. For unit-length
        embeddings all three lie in [-1, 1], 1 for identical vectors.
        """
        if self.metric is Metric.COSINE:
            return 1.0 - distance
        if self.metric is Metric.IP:
            return -distance
        return 1.0 - math.sqrt(max(distance, 0.0)) / math.sqrt(2.0)

    def _require(self) -> ClusteredIndex:
        index = self._index
        if index is None:  # callers check first; a guard for the type checker
            raise InvalidParameterError("the store is empty")
        return index

    # ------------------------------------------------------------------ writes
    def _prepare(
        self,
        vectors: Any,
        ids: Sequence[str | None] | None,
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[F32, list[str], I64, list[dict[str, Any]]]:
        """Check a write; return vectors ``(n, d)`` float32, string ids, int ids ``(n,)``
        int64 (new strings get new ints now) and the vectordb metadata dicts. The write
        counts as in flight until :meth:`_written`."""
        sids, docs = stored(texts, ids, metadatas)
        x = as_matrix(vectors, "embeddings", None if self._index is None else self._index.dim)
        if x.shape[0] != len(texts):
            raise InvalidParameterError(f"got {x.shape[0]} embeddings for {len(texts)} texts")
        ints = self._ids.take(sids)
        return x, sids, ints, docs

    def _written(self, failed: I64 | None = None) -> None:
        """End a write (see :meth:`StringIds.done`)."""
        self._ids.done(self._index, failed)

    def _prune(self) -> None:
        if self._index is not None:
            self._ids.prune(self._index)

    def _build_if_empty(self, x: F32, ints: I64, docs: list[dict[str, Any]]) -> bool:
        """Build the index from this first write; ``False`` if it exists already."""
        if self._index is not None:
            return False
        with self._build_lock:  # not the id maps' lock, which the event loop's thread takes
            if self._index is not None:
                return False
            index = ClusteredIndex.build(
                x, ids=ints, metadata=docs, metric=self.metric, progress=False, **self.build_options
            )
            index_texts(index)
            if self._home is not None:
                # A store with a directory keeps every write: this one, and the index bound
                # there for those after it.
                save_store(self._home, self._info(), index)
            self._index = index
            return True

    def upsert(
        self,
        vectors: Any,
        texts: Sequence[str],
        *,
        ids: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """Add texts, replacing those whose string ids exist; return the string ids.

        ``vectors``: embeddings ``(n, d)`` (made float32); ``ids``: ``n`` strings (None: a
        uuid4); ``metadatas``: ``n`` JSON dicts (or None), keys ``_text``, ``_sid`` reserved.
        """
        if not texts:
            return []
        x, sids, ints, docs = self._prepare(vectors, ids, texts, metadatas)
        try:
            if not self._build_if_empty(x, ints, docs):
                self._require().upsert(x, ints, docs)
        except Exception:
            self._written(ints)
            raise
        self._written()
        return sids

    async def aupsert(
        self,
        vectors: Any,
        texts: Sequence[str],
        *,
        ids: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """:meth:`upsert` through the loop's engine (the first write builds on a thread).

        Cancelling the caller does not cancel the write: it may be on a thread already.
        """
        if not texts:
            return []
        x, sids, ints, docs = self._prepare(vectors, ids, texts, metadatas)
        write = asyncio.ensure_future(self._awrite(x, ints, docs))
        self._tasks.add(write)  # the loop keeps only weak references to tasks
        write.add_done_callback(self._tasks.discard)
        write.add_done_callback(_retrieved)
        await asyncio.shield(write)
        return sids

    async def _awrite(self, x: F32, ints: I64, docs: list[dict[str, Any]]) -> None:
        try:
            if self._index is not None or not await asyncio.to_thread(
                self._build_if_empty, x, ints, docs
            ):
                await self._engine().upsert(x, ints, docs)
        except Exception:
            self._written(ints)
            raise
        # Not on a CancelledError (the loop ends under a write that may go on): still
        # counted in flight, its ints cannot be pruned.
        self._written()

    def delete(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> int:
        """Delete the texts of ``ids`` (unknown ones are ignored; ``None``: all) whose
        metadata matches ``where`` (``None``: any); return how many."""
        check_ids(ids)
        if self._index is None:
            return 0
        count = self._index.delete(self._select(ids, where), missing_ok=True)
        self._prune()
        return count

    async def adelete(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> int:
        """:meth:`delete` through the loop's engine."""
        check_ids(ids)
        if self._index is None:
            return 0
        count = await self._engine().delete(await self._aselect(ids, where), missing_ok=True)
        self._prune()
        return count

    # ------------------------------------------------------------------ reads
    def _pick(self, index: ClusteredIndex, ids: Iterable[str] | None, found: I64 | None) -> I64:
        """The ints of ``ids`` (``None``: all) among ``found`` (``None``: no restriction)."""
        ints = index.ids if ids is None else self._ids.known(ids)
        return ints if found is None else ints[np.isin(ints, found)]

    def _select(self, ids: Iterable[str] | None, where: Filter | None) -> I64:
        index = self._require()
        found = None if where is None else index.ids_matching(user_filter(where))
        return self._pick(index, ids, found)

    async def _aselect(self, ids: Iterable[str] | None, where: Filter | None) -> I64:
        index = self._require()
        engine = self._engine()
        found = None if where is None else await engine.ids_matching(user_filter(where))
        return self._pick(index, ids, found)

    def _read(self, ints: I64, dists: F32 | None) -> tuple[list[int], list[Record]]:
        """The ints among ``ints`` in the index, and their records (with ``dists``): the
        documents read in one query."""
        dists = np.full(ints.shape, np.nan, np.float32) if dists is None else dists
        docs = self._require().get_metadata_many(ints, missing_ok=True)  # gone: None
        kept, records = [], []
        for i, dist, doc in zip(ints.tolist(), dists.tolist(), docs, strict=True):
            if doc is not None:
                kept.append(i)
                records.append(record(doc, dist, -dist))
        return kept, records

    def _records(self, ints: I64, dists: F32 | None = None) -> list[Record]:
        return self._read(ints, dists)[1]

    def _records_and_vectors(self, ints: I64, dists: F32) -> tuple[list[Record], F32]:
        """:meth:`_records` and their stored vectors, row for row."""
        index = self._require()
        kept, records = self._read(ints, dists)
        while True:
            try:
                return records, index.get_vectors(np.asarray(kept, dtype=np.int64))
            except UnknownIdError:  # deleted since its metadata was read: leave it out
                alive = [i in index for i in kept]
                kept = [i for i, ok in zip(kept, alive, strict=True) if ok]
                records = [r for r, ok in zip(records, alive, strict=True) if ok]

    def get(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> list[Record]:
        """The records of ``ids`` (in that order; unknown ones left out; ``None``: all, in
        id order) whose metadata matches ``where`` (``None``: any)."""
        check_ids(ids)
        return [] if self._index is None else self._records(self._select(ids, where))

    async def aget(
        self, ids: Iterable[str] | None = None, where: Filter | None = None
    ) -> list[Record]:
        """:meth:`get` through the loop's engine."""
        check_ids(ids)
        if self._index is None:
            return []
        return await self._loops.call(
            self._require(), self._records, await self._aselect(ids, where)
        )

    def query(self, vector: Any, text: str | None, k: int, **options: Any) -> list[Record]:
        """The ``k`` best texts for an embedding ``vector`` (``(d,)`` floats), a ``text`` or
        both (hybrid), best first, with their ``score`` (higher is better) and vector
        ``distance`` (NaN where the vector side did not find it).

        ``options``: ``probes``, ``rerank_factor`` (None: the store's), ``filter`` (a
        vectordb dict filter on the user's keys, or a callable taking the user's metadata
        dict), and for hybrid queries ``fusion`` (``"rrf"`` or ``"weighted"``) and
        ``alpha`` (:mod:`vectordb.index.query`). Fewer than ``k`` records when fewer match;
        none while the store is empty.
        """
        args = query_args(vector, text, k, options, self.probes, self.rerank_factor)
        if self._index is None:
            return []
        text_ready(self._index, args)
        return records_of(self._index.query(**args))

    async def aquery(self, vector: Any, text: str | None, k: int, **options: Any) -> list[Record]:
        """:meth:`query` through the loop's engine; a vector query is batched with
        concurrent searches."""
        args = query_args(vector, text, k, options, self.probes, self.rerank_factor)
        if self._index is None:
            return []
        if text is not None:
            await self._loops.call(self._index, text_ready, self._index, args)
            return records_of(await self._engine().query(**args))
        found, dists = await self._engine().search(**vector_only(args))
        return await self._loops.call(
            self._require(), self._records, found[found >= 0], dists[found >= 0]
        )

    def search(self, query: Any, k: int, **options: Any) -> list[Record]:
        """The ``k`` nearest texts to the embedding ``query``: :meth:`query` by vector."""
        return self.query(query, None, k, **options)

    async def asearch(self, query: Any, k: int, **options: Any) -> list[Record]:
        """:meth:`search` through the loop's engine (batched with concurrent searches)."""
        return await self.aquery(query, None, k, **options)

    def search_vectors(self, query: Any, k: int, **options: Any) -> tuple[list[Record], F32]:
        """:meth:`search`, and the stored vectors ``(n, d)`` float32 of the records, row for
        row (unit length with cosine). A record deleted during the call is in neither."""
        args = vector_args(query, k, options, self.probes, self.rerank_factor)
        if self._index is None:
            return [], np.empty((0, 0), np.float32)
        found, dists = self._index.search(**args)
        return self._records_and_vectors(found[found >= 0], dists[found >= 0])

    async def asearch_vectors(self, query: Any, k: int, **options: Any) -> tuple[list[Record], F32]:
        """:meth:`search_vectors` through the loop's engine."""
        args = vector_args(query, k, options, self.probes, self.rerank_factor)
        if self._index is None:
            return [], np.empty((0, 0), np.float32)
        found, dists = await self._engine().search(**args)
        ok = found >= 0
        return await self._loops.call(
            self._require(), self._records_and_vectors, found[ok], dists[ok]
        )

    # ------------------------------------------------------------------ engines
    def _engine(self) -> AsyncEngine:
        """The running loop's engine over the index (made on first use)."""
        return self._loops.get(self._require())

    def close(self) -> None:
        """Close the engines and release the index's memory-mapped file; idempotent.

        Raises ``InvalidParameterError`` if an engine's loop is running: there use
        ``await aclose()``.
        """
        self._loops.close()
        if self._index is not None:
            self._index.close()

    async def aclose(self) -> None:
        """Close from the running loop: its engine finishes queued work first."""
        await self._loops.aclose()
        self.close()

    # ------------------------------------------------------------------ files
    def _info(self) -> dict[str, Any]:
        info = {"kind": self.kind, **{key: getattr(self, key) for key in _SAVED}}
        return info | {"metric": self.metric.value}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to the directory ``path``, replacing a store saved there (see
        :func:`~vectordb.integrations._persist.save_store`: one atomic swap). Onto the
        store this one was loaded from or saved to, it is the index's checkpoint
        (:func:`~vectordb.integrations._persist.checkpoint_store`). Afterwards the store's
        writes are durable in ``path`` when they return, unless its index is bound to
        another store's directory (loaded from there), where they stay durable."""
        index, target = self._index, Path(path)
        if (
            index is not None
            and index.path is not None
            and same_dir(index.path, target / INDEX_DIR)
        ):
            checkpoint_store(target, self._info(), index)
        else:
            save_store(target, self._info(), index)
        if index is None or (index.path is not None and same_dir(index.path, target / INDEX_DIR)):
            self._home = target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, kind: str, mmap: bool = True) -> TextIndex:
        """Open a store saved by :meth:`save`; ``mmap``: map the vectors, don't read them.

        Raises ``InvalidIndexFileError`` for a missing, foreign or malformed ``store.json``,
        a store saved by another adapter, or an index that disagrees with it (metric, a
        missing ``_sid``, a string id stored twice).
        """
        info = read_info(path, kind)
        try:
            store = cls(kind=kind, **{key: info[key] for key in _SAVED})
        except InvalidParameterError as exc:
            raise InvalidIndexFileError(f"{Path(path) / STORE_FILE}: {exc}") from None
        if info["has_index"]:
            index, ints = open_index(path, store.metric, ID_KEY, mmap=mmap)
            store._ids = StringIds(ints)
            store._index = index_texts(index)
        store._home = Path(path)
        return store
