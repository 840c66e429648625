"""An index's life in its directory: open, the write-ahead log, checkpoints, readers.

An index opened from a directory, or saved to one, is *bound* to it:

* every write (``add``, ``upsert``, ``delete``) is appended to the directory's log
  (:mod:`vectordb.storage.wal`) before it is published, and is durable (as
  ``durability=`` says) before the call returns; ``open`` replays the log over the
  directory's last checkpoint;
* the first write takes the directory's writer lock (:mod:`vectordb.storage.writer`) and
  holds it until :meth:`Persistent.close`: a second writer, in this process or another,
  gets ``IndexLockedError`` at once. An index that only reads takes no lock. If the
  directory moved on since this index read it (another writer came and went), the first
  write catches up first (:meth:`Persistent.refresh`), so no write is lost;
* ``save()`` with no path (or to the bound directory) is a checkpoint: the directory is
  rewritten atomically with every write so far, and its log starts empty;
* ``open(path, readonly=True)`` never locks and refuses writes (``ReadOnlyIndexError``);
  :meth:`Persistent.refresh` shows what the writer has made durable since.

A write is visible to searches as soon as it is published, a moment before it is durable:
a search may see a write that a crash then loses, but a call that returned is never lost.
"""

from __future__ import annotations

import errno
import inspect
import os
import struct
import threading
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .._types import F32, I64
from .._validation import build_params
from ..backends import Backend, resolve_backend
from ..core.metrics import Metric, parse_metric
from ..errors import InvalidParameterError, ReadOnlyIndexError, StorageError
from ..storage.files import same_dir
from ..storage.format import MANIFEST
from ..storage.load import OPEN_ATTEMPTS, load_index
from ..storage.metadata import MetadataStore
from ..storage.save import SaveJob
from ..storage.snapshot import IndexData, LivingData
from ..storage.wal import LOG, LogRecord, WriteLog, check_durability, read_log
from ..storage.writer import lock_writer, release_writer
from . import update
from .build import empty_data
from .calibrate import check_target
from .checkpoint import OnDisk, living_snapshot, on_disk
from .records import OP_ADD, OP_UPSERT, decode_write, encode_write
from .state import IndexState

__all__ = ["Binding", "Persistent", "fingerprint"]

#: ``build`` options ``create`` takes, in ``build_params``'s order (``target_recall`` last).
_BUILD_OPTIONS = (
    "branching_factor",
    "max_leaf_size",
    "max_iterations",
    "seed",
    "rotate",
    "leaf_scan",
    "code_bits",
    "text_field",
    "target_recall",
)
P = TypeVar("P", bound="Persistent")
T = TypeVar("T")
#: Per thread: the tickets of writes run by ``Persistent.deferred`` (else ``None``).
_DEFERRED = threading.local()


def fingerprint(path: Path) -> bytes:
    """What tells one checkpoint of the directory ``path`` from the next: the directory's
    inode (a checkpoint installs a new one) and the manifest's bytes (b"" if missing)."""
    try:
        st = os.stat(path)
        manifest = (path / MANIFEST).read_bytes()
    except OSError:
        return b""
    return struct.pack("<QQI", st.st_dev, st.st_ino, zlib.crc32(manifest)) + manifest[:64]


class Binding:
    """What a bound index knows of its directory: ``path``, ``readonly``, ``durability``,
    the ``seq`` of the last logged write applied, the checkpoint's ``fingerprint``, and,
    once it writes, the lock and the open ``log``."""

    def __init__(self, path: Path, readonly: bool, durability: str, seq: int, mark: bytes) -> None:
        self.path, self.readonly, self.durability = path, readonly, durability
        self.seq, self.fingerprint = seq, mark
        self.lock_fd: int | None = None
        self.log: WriteLog | None = None
        #: What the directory holds of this index (``None``: unknown, a checkpoint writes all).
        self.disk: OnDisk | None = None

    def release(self) -> None:
        log, self.log = self.log, None
        if log is not None:
            log.close()
        fd, self.lock_fd = self.lock_fd, None
        release_writer(fd)


def _read(
    path: Path, mmap: bool, verify: bool, progress: bool | None
) -> tuple[IndexData | LivingData, tuple[int, list[LogRecord], int, bytes]]:
    """The checkpoint in ``path`` and its log, read as one: retried if a checkpoint
    replaced the directory in between. Returns the data and ``(base_seq, records,
    good_end, fingerprint)``."""
    for _ in range(OPEN_ATTEMPTS):
        before = fingerprint(path)
        data = load_index(path, mmap=mmap, verify=verify, progress=progress)
        base, records, end = read_log(path / LOG)
        if fingerprint(path) == before:
            return data, (base, records, end, before)
        data.storage.close()
    raise StorageError(errno.EAGAIN, "replaced by checkpoints while opening; retry", str(path))


class Persistent:
    """The directory side of ``ClusteredIndex`` (see the module docstring)."""

    _state: IndexState
    _params: dict[str, Any]
    _metadata: MetadataStore
    _write_lock: threading.RLock
    _meta_lock: threading.Lock
    _binding: Binding | None = None

    def __init__(self, data: IndexData | LivingData, backend: Backend) -> None:  # pragma: no cover
        raise NotImplementedError

    def _apply_write(
        self, raw: F32, ids: Any, docs: list[str | None] | None, replace: bool, logged: bool
    ) -> I64:
        raise NotImplementedError  # pragma: no cover

    def _apply_delete(self, wanted: I64, missing_ok: bool, logged: bool) -> int:
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def open(
        cls: type[P],
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        backend: str = "auto",
        progress: bool | None = None,
        readonly: bool = False,
        durability: str = "fsync",
    ) -> P:
        """Open the index in the directory ``path`` (written by ``save`` or a build with
        ``path=``), without rebuilding (see :mod:`vectordb.storage.load`), with the writes
        its log holds since the last checkpoint replayed; bound to it (see
        :mod:`vectordb.index.persistence`).

        ``mmap``: map ``vectors.bin`` instead of reading it into RAM. ``verify``: check
        every file's CRC32 (sizes, dtypes and shapes are always checked). ``backend``: as
        for ``build``. ``progress``: a bar while ``verify`` reads (needs tqdm).
        ``readonly``: take no lock, refuse writes (``ReadOnlyIndexError``); see
        :meth:`refresh`. ``durability``: ``"fsync"`` (a write is on disk when it returns),
        ``"flush"`` (handed to the OS: it survives a crash of the process, not of the
        machine) or ``"none"`` (not logged: only checkpoints persist).
        ``InvalidIndexFileError`` for a missing or malformed manifest, an unknown format
        version, a file of the wrong size, dtype or shape, a checksum mismatch, or a log
        damaged before its last record; ``StorageError`` for what the OS refuses.
        """
        check_durability(durability)
        if not isinstance(readonly, bool):
            raise InvalidParameterError(f"readonly must be a bool, got {readonly!r}")
        chosen = resolve_backend(backend)
        path = Path(path)
        data, (base, records, _, mark) = _read(path, mmap, verify, progress)
        index = cls(data, chosen)
        index._binding = Binding(path, readonly, durability, base, mark)
        index._binding.disk = on_disk(data, index._state, index._metadata)
        try:
            index._replay(records)
        except BaseException:
            index.close()
            raise
        return index

    @classmethod
    def create(
        cls: type[P],
        path: str | os.PathLike[str],
        *,
        dim: int,
        metric: str | Metric = "l2",
        durability: str = "fsync",
        backend: str = "auto",
        **build_options: Any,
    ) -> P:
        """A new, empty index in the directory ``path`` (absent or empty), bound to it: its
        writes are durable as :meth:`open` says (``durability``). Searches return padding
        until the first add. The tree grows with the data: the first adds share one leaf
        (searched exactly), and leaves past twice a build's typical size split with k-means,
        with no call from the user. ``build_options``: those of ``build``
        (``max_leaf_size``, ``code_bits``, ``seed``, ...). ``StorageError`` (``EEXIST``) if
        ``path`` holds anything."""
        known = inspect.signature(cls.build).parameters  # type: ignore[attr-defined]
        unknown = sorted(set(build_options) - set(_BUILD_OPTIONS))
        if unknown:
            raise InvalidParameterError(f"unknown build options: {unknown}")
        o = {k: build_options.get(k, known[k].default) for k in _BUILD_OPTIONS}
        p = build_params(*(o[k] for k in _BUILD_OPTIONS[:-1]))
        p["target_recall"] = check_target(o["target_recall"])
        check_durability(durability)
        target = Path(path)
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise StorageError(errno.EEXIST, "exists: open it, or create elsewhere", str(target))
        index = cls(empty_data(dim, parse_metric(metric), p), resolve_backend(backend))
        index.save(target, progress=False)  # binds it
        index._bound().durability = durability
        return index

    def _replay(self, records: list[LogRecord]) -> int:
        """Apply ``records`` (those past the ``seq`` applied) in order, unlogged; runs of
        adds in one call each (a log of single adds replays in batches). Returns how many."""
        b = self._bound()
        where = str(b.path / LOG)
        todo = [r for r in records if r.seq > b.seq]
        dim = self._state.quantizer.dim
        pending: list[tuple[I64, F32, list[str | None] | None]] = []

        def flush() -> None:
            if pending:
                ids = np.concatenate([p[0] for p in pending])
                x = np.concatenate([p[1] for p in pending])
                docs = None
                if any(p[2] is not None for p in pending):
                    docs = [d for p in pending for d in (p[2] or [None] * p[0].shape[0])]
                self._apply_write(x, ids, docs, False, False)
                pending.clear()

        for record in todo:
            op, ids, x, docs = decode_write(record.payload, dim, where)
            if op == OP_ADD and x is not None:
                pending.append((ids, x, docs))
                continue
            flush()
            if op == OP_UPSERT and x is not None:
                self._apply_write(x, ids, docs, True, False)
            else:
                self._apply_delete(ids, True, False)
        flush()
        if todo:
            b.seq = todo[-1].seq
        return len(todo)

    def _log(self, op: int, ids: I64, x: F32 | None, docs: list[str | None] | None) -> int:
        """Under the write lock, before the write is published: append it to the log (the
        writer's lock taken at the first write); return the ticket for :meth:`_commit`
        (0: not bound, nothing to wait for). ``ReadOnlyIndexError``, ``IndexLockedError``,
        ``StorageError``: the write must not be published."""
        log = self._writer()
        if log is None:
            return 0
        ticket = log.append(encode_write(op, ids, x, docs) if log.logs else b"")
        self._bound().seq = log.seq
        return ticket

    def _bound(self) -> Binding:
        """The binding of an index bound to a directory (``InvalidParameterError`` if not:
        only the paths that have bound it call this)."""
        if self._binding is None:
            raise InvalidParameterError("this index is not bound to a directory")
        return self._binding

    def _commit(self, ticket: int) -> None:
        """Return once the write of ``ticket`` is durable (after the write lock is
        released: concurrent writers share one fsync); inside :meth:`deferred`, note it
        for the caller instead."""
        deferred = getattr(_DEFERRED, "tickets", None)
        if deferred is not None:
            deferred.append(ticket)
            return
        b = self._binding
        if ticket and b is not None and b.log is not None:
            b.log.commit(ticket)

    def deferred(
        self, write: Callable[..., T], *args: Any, **kwargs: Any
    ) -> tuple[T, Callable[[], None] | None]:
        """``write(*args, **kwargs)`` (a write method of this index) without its wait for
        durability: returns its result and the ``commit()`` that waits (``None`` when there
        is nothing to wait for: not logged, or ``durability`` other than ``"fsync"``). For
        callers that let go of their own locks first, so that concurrent writes share an
        fsync (the async engine's group commit). The write is visible at once, durable
        once ``commit()`` returns."""
        tickets: list[int] = []
        _DEFERRED.tickets = tickets
        try:
            result = write(*args, **kwargs)
        finally:
            _DEFERRED.tickets = None
        b = self._binding
        waits = b is not None and b.log is not None and b.durability == "fsync"
        if not waits or not any(tickets):
            return result, None
        return result, partial(self._commit_all, tickets)

    def _commit_all(self, tickets: list[int]) -> None:
        for ticket in tickets:
            self._commit(ticket)

    def _writer(self) -> WriteLog | None:
        """The open log of a bound index, taking the writer's lock on the first write and
        catching up with the directory if another writer changed it since."""
        b = self._binding
        if b is None:
            return None
        if b.readonly:
            raise ReadOnlyIndexError(f"{b.path} was opened with readonly=True")
        if b.log is None:
            fd = lock_writer(b.path)
            try:
                _, (base, end) = self._catch_up_log()  # the log as read: one read
                b.log = WriteLog.open(b.path / LOG, b.durability, base, b.seq, end)
            except BaseException:
                release_writer(fd)
                raise
            b.lock_fd = fd
        return b.log

    def _catch_up(self) -> int:
        """Under the write lock: bring this index to the directory's latest checkpoint and
        log (a full reload if the checkpoint changed). Returns the writes applied."""
        return self._catch_up_log()[0]

    def _catch_up_log(self) -> tuple[int, tuple[int, int]]:
        """:meth:`_catch_up`, and the ``(base_seq, good_end)`` of the log it read."""
        b = self._bound()
        if fingerprint(b.path) == b.fingerprint:
            base, records, end = read_log(b.path / LOG)
            return self._replay(records), (base, end)
        data, (base, records, end, mark) = _read(b.path, self._state.storage.is_mmap, False, False)
        fresh = type(self)(data, self._state.backend)
        if (field := self._metadata.text_field) is not None and fresh._metadata.text_field is None:
            fresh._metadata.enable_text(field)  # by index_text, in no checkpoint yet
            fresh._params["text_field"] = field
        old = self._state
        with self._meta_lock:
            self._state, self._params, self._metadata = fresh._state, fresh._params, fresh._metadata
        old.storage.discard()  # searches still reading the old state keep its mapping
        b.seq, b.fingerprint = base, mark
        b.disk = on_disk(data, self._state, self._metadata)
        return self._replay(records), (base, end)

    def refresh(self) -> int:
        """Show what the directory's writer made durable since this index read it (a new
        checkpoint is read in full, new log records are replayed); returns the writes
        applied. No-op (0) for the writer itself and for an index not bound to a
        directory. Searches meanwhile see the index before or after, never half."""
        with self._write_lock:
            b = self._binding
            if b is None or b.log is not None:
                return 0
            return self._catch_up()

    def detach(self) -> None:
        """Unbind the index from its directory: its later writes are not logged and take
        no lock (they live in RAM until a :meth:`save`, which binds it again), and the
        writer's lock, if held, is released. The directory keeps what was written."""
        with self._write_lock:
            b, self._binding = self._binding, None
            if b is not None:
                b.release()

    def _moved_to(self, path: Path) -> None:
        """The bound directory was renamed to ``path`` as a whole (a text store swaps its
        own directory, the index's inside it): the binding follows. Its lock and log are
        open files, which moved with it; so did everything ``disk`` lists."""
        with self._write_lock:
            b = self._bound()
            b.path, b.fingerprint = path, fingerprint(path)

    @property
    def path(self) -> Path | None:
        """The directory this index is bound to (``None``: built in RAM, never saved)."""
        return None if self._binding is None else self._binding.path

    @property
    def readonly(self) -> bool:
        """Whether writes are refused (opened with ``readonly=True``)."""
        return self._binding is not None and self._binding.readonly

    def save(
        self, path: str | os.PathLike[str] | None = None, *, progress: bool | None = None
    ) -> None:
        """Save to the directory ``path``, atomically (see :mod:`vectordb.storage.save`).

        The saved index is compact: deleted rows are left out, added ones folded in. With no
        ``path``, or the directory the index is bound to, this is a checkpoint: the log's
        writes are folded into the directory and its log starts empty. An index not yet
        bound is bound to ``path`` (its later writes are logged there); a bound one saved
        elsewhere stays bound to its own. ``progress``: a bar on a terminal (needs tqdm).
        """
        with self._write_lock:
            self.save_job(path, progress, stoppable=False).run()

    def checkpoint(self, *, progress: bool | None = None) -> None:
        """``save()`` to the bound directory (``InvalidParameterError`` if not bound)."""
        self.save(None, progress=progress)

    def save_job(
        self,
        path: str | os.PathLike[str] | None = None,
        progress: bool | None = False,
        *,
        stoppable: bool = True,
    ) -> SaveJob:
        """The save of :meth:`save` as a job to run on another thread (the async engine's;
        ``SaveJob.stop`` ends it early unless ``stoppable=False``); its run holds this
        index's write lock, so no write comes between its snapshot and its swap."""
        b = self._binding
        if path is None and b is None:
            raise InvalidParameterError("save() needs a path: this index is not bound to one")
        target = Path(path) if path is not None else b.path  # type: ignore[union-attr]
        own = b is not None and same_dir(target, b.path)
        if own:
            self._writer()  # a checkpoint is a write: the lock, the catch-up
        taken: list[IndexData | LivingData] = []

        def snapshot() -> IndexData | LivingData:
            with self._write_lock:
                data = self._living(b, target) if own and b is not None else self.snapshot()
                taken.append(data)
                return data

        job = SaveJob(
            snapshot,
            target,
            progress,
            stoppable=stoppable,
            log_seq=b.seq if own and b is not None else 0,
            writer_fd=b.lock_fd if own and b is not None else None,
        )
        run = job.run

        def locked_run() -> None:
            with self._write_lock:
                state = self._state
                try:
                    run()
                except BaseException:
                    if own and b is not None:
                        b.disk = None  # the old version or the new: write all next time
                    raise
                if own and b is not None:
                    self._rebind(b)
                    b.disk = on_disk(taken[-1], state, self._metadata)
                elif b is None:  # bound to it now (its lock taken by the next write)
                    self._binding = Binding(target, False, "fsync", 0, fingerprint(target))
                    self._binding.disk = on_disk(taken[-1], state, self._metadata)

        job.run = locked_run  # type: ignore[method-assign]
        return job

    def _rebind(self, b: Binding) -> None:
        """After a checkpoint: the new directory's empty log, opened for appending."""
        if b.log is not None:
            b.log.close()
        base, _, end = read_log(b.path / LOG)
        b.fingerprint = fingerprint(b.path)
        b.log = WriteLog.open(b.path / LOG, b.durability, base, b.seq, end)

    def _living(self, b: Binding, target: Path) -> LivingData:
        """Under the write lock: the state as a checkpoint of ``target`` writes it."""
        return living_snapshot(self._state, self._params, self._metadata, b.disk, target)

    def snapshot(self) -> IndexData:
        """The index now as one compact :class:`~vectordb.storage.snapshot.IndexData`
        (what a save writes): one consistent state, even while writes go on, and a copy
        of the metadata of that moment."""
        with self._write_lock:
            return update.snapshot(self._state, self._params, self._metadata.copy())

    def close(self) -> None:
        """Release the mapped file, if any (then searches raise ``IndexClosedError``), the
        log and the writer's lock. Writes that returned are kept (in the log)."""
        b = self._binding
        if b is not None:
            b.release()
        self._state.storage.close()

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
