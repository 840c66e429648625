"""Shared core of the LangChain and LlamaIndex adapters: texts under string ids.

A :class:`TextIndex` holds a :class:`~vectordb.ClusteredIndex`, built at the first write (a
build needs data; until then searches find nothing). Each new string id gets the next int64
id. Text, string id and user metadata form the vectordb metadata of the id,
``{"_text": text, "_sid": string id, **user_metadata}``: dict filters apply to the user's
keys as they are, and the maps are rebuilt from it when a saved store is opened.

Async methods are served by one :class:`~vectordb.AsyncEngine` per running event loop (an
engine belongs to its loop), made lazily once the index exists; the index object is never
replaced afterwards. Engines of loops that stopped running are closed when found, and when
the store is closed or collected.

Saved layout: a directory with ``store.json`` (format, adapter, metric, parameters) and
``index/``, the vectordb index (absent while the store is empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import shutil
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from .._files import storage_error
from .._validation import as_matrix, build_params, check_k, positive_int
from ..engine import AsyncEngine
from ..errors import InvalidIndexFileError, InvalidParameterError, UnknownIdError
from ..index import ClusteredIndex
from ..metadata import Filter
from ..metrics import Metric, parse_metric

__all__ = ["ID_KEY", "RESERVED_KEYS", "TEXT_KEY", "Record", "TextIndex"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Loop = asyncio.AbstractEventLoop

TEXT_KEY = "_text"
ID_KEY = "_sid"
RESERVED_KEYS = frozenset({TEXT_KEY, ID_KEY})

_STORE_FILE = "store.json"
_INDEX_DIR = "index"
_FORMAT = "vectordb-text-store"
#: Build parameters a store passes on (``backend`` too): those ``build_params`` checks.
_BUILD_OPTIONS = tuple(inspect.signature(build_params).parameters)


@dataclass(frozen=True)
class Record:
    """A stored text: string ``id``, ``text``, user ``metadata`` (no reserved keys), all
    ``stored`` metadata, vectordb ``distance`` to the query (NaN outside searches)."""

    id: str
    text: str
    metadata: dict[str, Any]
    stored: dict[str, Any]
    distance: float = math.nan


def _record(doc: dict[str, Any], distance: float = math.nan) -> Record:
    user = {k: v for k, v in doc.items() if k not in RESERVED_KEYS}
    return Record(str(doc[ID_KEY]), str(doc.get(TEXT_KEY, "")), user, doc, distance)


def _close_idle(engines: dict[Loop, AsyncEngine], lock: Any, keep: Loop | None = None) -> None:
    """Close the engines of loops (but ``keep``) that are closed or not running: the
    engine of a running loop would refuse a synchronous close."""
    with lock:
        idle = [lp for lp in engines if lp is not keep and (lp.is_closed() or not lp.is_running())]
        closing = [engines.pop(lp) for lp in idle]
    for engine in closing:
        engine.close()


class TextIndex:
    """Texts, their vectors and metadata under string ids (see the module docstring).

    Parameters
    ----------
    kind : the adapter's name, saved and checked by :meth:`load`
    metric : {"cosine", "l2", "ip"}
        vectordb's distances: ``1 - cos``, squared Euclidean, ``-dot``.
    probes, rerank_factor : int, >= 1
        Search defaults (see :meth:`ClusteredIndex.search`).
    build_options : dict, optional
        For :meth:`ClusteredIndex.build` at the first write: ``branching_factor``,
        ``max_leaf_size``, ``max_iterations``, ``seed``, ``rotate``, ``leaf_scan``,
        ``backend``.
    """

    def __init__(
        self,
        kind: str,
        metric: str | Metric = "cosine",
        probes: int = 4,
        rerank_factor: int = 5,
        build_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.metric = parse_metric(metric)
        self.probes = positive_int("probes", probes)
        self.rerank_factor = positive_int("rerank_factor", rerank_factor)
        options = {"backend": "auto", **(build_options or {})}
        unknown = sorted(set(options) - {*_BUILD_OPTIONS, "backend"})
        if unknown:
            raise InvalidParameterError(
                f"unknown build options {unknown}; use {', '.join(_BUILD_OPTIONS)}, backend"
            )
        # Checked now rather than at the first write, far from the mistake.
        defaults = inspect.signature(ClusteredIndex.build).parameters
        build_params(**{k: options.get(k, defaults[k].default) for k in _BUILD_OPTIONS})
        self.build_options = options
        self._index: ClusteredIndex | None = None
        self._ints: dict[str, int] = {}
        self._sids: dict[int, str] = {}
        self._next_int = 0
        self._lock = threading.RLock()
        self._engines: dict[Loop, AsyncEngine] = {}
        self._finalizer = weakref.finalize(self, _close_idle, self._engines, self._lock)

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
        int64 (new strings get new ints now) and the vectordb metadata dicts."""
        n = len(texts)
        ids = [None] * n if ids is None else list(ids)
        metadatas = [None] * n if metadatas is None else list(metadatas)
        if len(ids) != n or len(metadatas) != n:
            raise InvalidParameterError(
                f"got {n} texts, {len(ids)} ids and {len(metadatas)} metadata dicts: one each"
            )
        x = as_matrix(vectors, "embeddings", None if self._index is None else self._index.dim)
        if x.shape[0] != n:
            raise InvalidParameterError(f"got {x.shape[0]} embeddings for {n} texts")
        sids = [str(uuid.uuid4()) if i is None else i for i in ids]
        bad = [s for s in sids if not isinstance(s, str)]
        if bad or len(set(sids)) != n:
            twice = Counter(sids).most_common(1)[0][0] if not bad else None
            raise InvalidParameterError(
                f"ids must be strings, got {bad[0]!r}" if bad else f"id {twice!r} appears twice"
            )
        docs = []
        for sid, text, meta in zip(sids, texts, metadatas, strict=True):
            if not isinstance(text, str) or not isinstance(meta, Mapping | None):
                raise InvalidParameterError(
                    f"texts must be strings and metadata dicts, got {text!r} and {meta!r}"
                )
            clash = sorted(RESERVED_KEYS.intersection(meta or {}))
            if clash:
                raise InvalidParameterError(f"metadata keys {clash} are reserved by vectordb")
            docs.append({**(meta or {}), TEXT_KEY: text, ID_KEY: sid})
        with self._lock:
            for sid in sids:
                if sid not in self._ints:
                    self._ints[sid], self._sids[self._next_int] = self._next_int, sid
                    self._next_int += 1
            ints = np.asarray([self._ints[s] for s in sids], dtype=np.int64)
        return x, sids, ints, docs

    def _forget(self, ints: I64, *, unwritten: bool = False) -> None:
        """Drop the maps of deleted ints (``unwritten``: of those a failed write left out)."""
        with self._lock:
            index = self._index
            for i in ints.tolist():
                if unwritten and index is not None and i in index:
                    continue
                sid = self._sids.pop(i, None)
                if sid is not None and self._ints.get(sid) == i:
                    del self._ints[sid]

    def _build_if_empty(self, x: F32, ints: I64, docs: list[dict[str, Any]]) -> bool:
        """Build the index from this first write; ``False`` if it exists already."""
        with self._lock:
            if self._index is not None:
                return False
            self._index = ClusteredIndex.build(
                x, ids=ints, metadata=docs, metric=self.metric, progress=False, **self.build_options
            )
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
        except BaseException:
            self._forget(ints, unwritten=True)
            raise
        return sids

    async def aupsert(
        self,
        vectors: Any,
        texts: Sequence[str],
        *,
        ids: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """:meth:`upsert` through the loop's engine (the first write builds on a thread)."""
        if not texts:
            return []
        x, sids, ints, docs = self._prepare(vectors, ids, texts, metadatas)
        try:
            if self._index is not None or not await asyncio.to_thread(
                self._build_if_empty, x, ints, docs
            ):
                await self._engine().upsert(x, ints, docs)
        except BaseException:
            self._forget(ints, unwritten=True)
            raise
        return sids

    def delete(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> int:
        """Delete the texts of ``ids`` (unknown ones are ignored; ``None``: all) whose
        metadata matches ``where`` (``None``: any); return how many."""
        if self._index is None:
            return 0
        ints = self._select(ids, where)
        count = self._index.delete(ints, missing_ok=True)
        self._forget(ints)
        return count

    async def adelete(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> int:
        """:meth:`delete` through the loop's engine."""
        if self._index is None:
            return 0
        ints = await self._aselect(ids, where)
        count = await self._engine().delete(ints, missing_ok=True)
        self._forget(ints)
        return count

    # ------------------------------------------------------------------ reads
    def _known(self, sids: Iterable[str]) -> I64:
        with self._lock:
            found = [self._ints[s] for s in sids if isinstance(s, str) and s in self._ints]
        return np.asarray(found, dtype=np.int64)

    @overload
    def _filter(self, filter: Filter) -> Filter: ...
    @overload
    def _filter(self, filter: None) -> None: ...
    def _filter(self, filter: Filter | None) -> Filter | None:
        """A predicate sees the user's metadata only (no reserved keys)."""
        if filter is None or not callable(filter):
            return filter
        user_filter = filter
        return lambda doc: bool(user_filter(_record(doc).metadata))

    def _pick(self, index: ClusteredIndex, ids: Iterable[str] | None, found: I64 | None) -> I64:
        """The ints of ``ids`` (``None``: all) among ``found`` (``None``: no restriction)."""
        ints = index.ids if ids is None else self._known(ids)
        return ints if found is None else ints[np.isin(ints, found)]

    def _select(self, ids: Iterable[str] | None, where: Filter | None) -> I64:
        index = self._require()
        found = None if where is None else index.ids_matching(self._filter(where))
        return self._pick(index, ids, found)

    async def _aselect(self, ids: Iterable[str] | None, where: Filter | None) -> I64:
        index = self._require()
        engine = self._engine()
        found = None if where is None else await engine.ids_matching(self._filter(where))
        return self._pick(index, ids, found)

    def _records(self, ints: I64, dists: F32 | None = None) -> list[Record]:
        index, out = self._require(), []
        dists = np.full(ints.shape, np.nan, np.float32) if dists is None else dists
        for i, dist in zip(ints.tolist(), dists.tolist(), strict=True):
            try:
                doc = index.get_metadata(i)
            except UnknownIdError:  # deleted since the search
                continue
            if doc is not None:
                out.append(_record(doc, dist))
        return out

    async def _arecords(self, ints: I64, dists: F32 | None = None) -> list[Record]:
        engine = self._engine()
        dists = np.full(ints.shape, np.nan, np.float32) if dists is None else dists

        async def one(i: int) -> dict[str, Any] | None:
            try:
                return await engine.get_metadata(i)
            except UnknownIdError:  # deleted since the search
                return None

        docs = await asyncio.gather(*(one(i) for i in ints.tolist()))
        pairs = zip(docs, dists.tolist(), strict=True)
        return [_record(doc, dist) for doc, dist in pairs if doc is not None]

    def get(self, ids: Iterable[str] | None = None, where: Filter | None = None) -> list[Record]:
        """The records of ``ids`` (in that order; unknown ones left out; ``None``: all, in
        id order) whose metadata matches ``where`` (``None``: any)."""
        return [] if self._index is None else self._records(self._select(ids, where))

    async def aget(
        self, ids: Iterable[str] | None = None, where: Filter | None = None
    ) -> list[Record]:
        """:meth:`get` through the loop's engine."""
        return [] if self._index is None else await self._arecords(await self._aselect(ids, where))

    def _search_args(self, query: Any, k: int, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - {"filter", "probes", "rerank_factor"})
        if unknown:
            raise InvalidParameterError(f"unknown search options {unknown}")
        return {
            "query": query,
            "k": check_k(k),
            "probes": self.probes,
            "rerank_factor": self.rerank_factor,
            **{key: value for key, value in options.items() if value is not None},
            "filter": self._filter(options.get("filter")),
        }

    def search(self, query: Any, k: int, **options: Any) -> list[Record]:
        """The ``k`` nearest texts to ``query`` (``(d,)`` floats), closest first.

        ``options``: ``probes``, ``rerank_factor`` (None: the store's), ``filter`` (a
        vectordb dict filter on the user's keys, or a callable taking the user's metadata
        dict). Fewer than ``k`` records when fewer match; none while the store is empty.
        """
        args = self._search_args(query, k, options)
        if self._index is None:
            return []
        found, dists = self._index.search(**args)
        return self._records(found[found >= 0], dists[found >= 0])

    async def asearch(self, query: Any, k: int, **options: Any) -> list[Record]:
        """:meth:`search` through the loop's engine (batched with concurrent searches)."""
        args = self._search_args(query, k, options)
        if self._index is None:
            return []
        found, dists = await self._engine().search(**args)
        return await self._arecords(found[found >= 0], dists[found >= 0])

    def vectors_of(self, records: Sequence[Record]) -> F32:
        """The stored vectors ``(n, d)`` float32 of ``records`` (unit length with cosine)."""
        return self._require().get_vectors(self._known(r.id for r in records))

    async def avectors_of(self, records: Sequence[Record]) -> F32:
        """:meth:`vectors_of` through the loop's engine."""
        return await self._engine().get_vectors(self._known(r.id for r in records))

    # ------------------------------------------------------------------ engines
    def _engine(self) -> AsyncEngine:
        """The running loop's engine over the index (made on first use)."""
        loop = asyncio.get_running_loop()
        index = self._require()
        _close_idle(self._engines, self._lock, keep=loop)
        with self._lock:
            engine = self._engines.get(loop)
            if engine is None:
                engine = self._engines[loop] = AsyncEngine(index)
        return engine

    def close(self) -> None:
        """Close the engines and release the index's memory-mapped file; idempotent.

        Raises ``InvalidParameterError`` if an engine's loop is running: there use
        ``await aclose()``.
        """
        with self._lock:
            if any(loop.is_running() for loop in self._engines):
                raise InvalidParameterError("an engine's loop runs: use 'await store.aclose()'")
        _close_idle(self._engines, self._lock)
        if self._index is not None:
            self._index.close()

    async def aclose(self) -> None:
        """Close from the running loop: its engine finishes queued work first."""
        with self._lock:
            engine = self._engines.pop(asyncio.get_running_loop(), None)
        if engine is not None:
            await engine.aclose()
        self.close()

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to the directory ``path`` (created if needed; a saved store there is
        replaced). The index is written atomically, then ``store.json``."""
        root, index = Path(path), self._index
        info = {"format": _FORMAT, "version": 1, "kind": self.kind, "metric": self.metric.value}
        info |= {"probes": self.probes, "rerank_factor": self.rerank_factor}
        info |= {"build_options": self.build_options, "has_index": index is not None}
        tmp = root / f".{_STORE_FILE}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            if index is not None:
                index.save(root / _INDEX_DIR, progress=False)
            tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
            os.replace(tmp, root / _STORE_FILE)
            if index is None and (root / _INDEX_DIR).is_dir():
                shutil.rmtree(root / _INDEX_DIR)  # an empty store replaces a saved one
        except OSError as exc:
            with contextlib.suppress(OSError):  # ENOTDIR when path is a file
                tmp.unlink()
            raise storage_error(exc, getattr(exc, "filename", None) or root) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, kind: str, mmap: bool = True) -> TextIndex:
        """Open a store saved by :meth:`save`; ``mmap``: map the vectors, don't read them.

        Raises ``InvalidIndexFileError`` for a missing or foreign ``store.json``, a store
        saved by another adapter, or an index without the store's keys.
        """
        file = Path(path) / _STORE_FILE
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidIndexFileError(
                f"{file}: not a saved vectordb text store ({exc.__class__.__name__}: {exc})"
            ) from None
        if not isinstance(info, dict) or info.get("format") != _FORMAT:
            raise InvalidIndexFileError(f"{file}: not a vectordb text store")
        if info.get("kind") != kind:
            raise InvalidIndexFileError(f"{file}: saved by the {info.get('kind')!r} adapter")
        params = ("metric", "probes", "rerank_factor", "build_options")
        store = cls(kind=kind, **{key: info[key] for key in params})
        if info["has_index"]:
            store._adopt(ClusteredIndex.open(Path(path) / _INDEX_DIR, mmap=mmap))
        return store

    def _adopt(self, index: ClusteredIndex) -> None:
        """Serve a reopened index: rebuild the string <-> int maps from its metadata."""
        for i in index.ids.tolist():
            doc = index.get_metadata(i)
            if doc is None or not isinstance(doc.get(ID_KEY), str):
                index.close()
                raise InvalidIndexFileError(f"id {i} of the index has no {ID_KEY!r} key")
            self._ints[doc[ID_KEY]], self._sids[i] = i, doc[ID_KEY]
        self._next_int = int(index.ids.max(initial=-1)) + 1
        self._index = index
