"""The exception tree of vectordb.

Every error the library raises on purpose derives from :class:`VectorDBError`, so
``except vdb.VectorDBError`` catches them all. Errors caused by bad arguments are also
``ValueError`` and I/O failures are also ``OSError``, so code written against the
built-in exceptions keeps working::

    VectorDBError
    ├── InvalidParameterError      (also ValueError)  bad k, probes, metric name, ...
    │   └── DuplicateIdError                          add() of an id already there
    ├── InvalidVectorsError        (also ValueError)  empty, ragged, NaN/inf, wrong dtype
    │   └── DimensionMismatchError                    right values, wrong width
    ├── UnknownIdError             (also KeyError)    delete() or get_metadata() of a missing id
    ├── AlreadyUsingMmapError                         use_mmap_storage() called twice
    ├── IndexClosedError                              the index was closed
    ├── IndexLockedError                              another writer holds the index directory
    ├── ReadOnlyIndexError                            a write to an index opened readonly=True
    ├── EngineClosedError                             the async engine was closed
    ├── EngineOverloadedError                         too many queued queries (overload="raise")
    ├── BackendUnavailableError                       backend="cupy" but CuPy or a GPU is missing
    ├── InvalidIndexFileError                         a saved index is missing, damaged or foreign
    ├── ShardUnavailableError                         no replica of a shard answered in time
    └── StorageError               (also OSError)     reading or writing a file failed
"""

from __future__ import annotations

__all__ = [
    "AlreadyUsingMmapError",
    "BackendUnavailableError",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EngineClosedError",
    "EngineOverloadedError",
    "IndexClosedError",
    "IndexLockedError",
    "InvalidIndexFileError",
    "InvalidParameterError",
    "InvalidVectorsError",
    "ReadOnlyIndexError",
    "ShardUnavailableError",
    "StorageError",
    "UnknownIdError",
    "VectorDBError",
]


class VectorDBError(Exception):
    """Base class of every error raised by vectordb."""


class InvalidParameterError(VectorDBError, ValueError):
    """A scalar argument is out of range or of the wrong kind (``k=0``, ``metric="l3"``)."""


class InvalidVectorsError(VectorDBError, ValueError):
    """Vectors or queries cannot be used: empty, ragged, non-numeric, NaN or infinite."""


class DimensionMismatchError(InvalidVectorsError):
    """Vectors or queries do not have the index's dimension."""


class DuplicateIdError(InvalidParameterError):
    """``add`` (or ``build``) got an id that is already taken; ``upsert`` replaces instead."""


class UnknownIdError(VectorDBError, KeyError):
    """No vector has this id."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class AlreadyUsingMmapError(VectorDBError):
    """``use_mmap_storage`` was called on an index whose vectors are already memory-mapped."""


class IndexClosedError(VectorDBError):
    """The index was closed; its memory-mapped vectors are no longer available."""


class IndexLockedError(VectorDBError):
    """Another index object, in this process or another, holds the directory's writer
    lock: one writer at a time. The message names the holder's pid when it is known. Open
    with ``readonly=True`` to read beside it."""


class ReadOnlyIndexError(VectorDBError):
    """A write (``add``, ``upsert``, ``delete``, ``compact``, a checkpoint) to an index
    opened with ``readonly=True``."""


class EngineClosedError(VectorDBError):
    """The ``AsyncEngine`` was closed (or is closing); it accepts no more calls."""


class EngineOverloadedError(VectorDBError):
    """More than ``max_pending`` queries are queued and the engine was told to refuse, not wait."""


class BackendUnavailableError(VectorDBError):
    """The requested backend cannot run here; the message names the cause and the fix."""


class InvalidIndexFileError(VectorDBError):
    """A saved index cannot be opened: a file is missing, malformed, or of the wrong size.

    The message names the file and what was expected versus found.
    """


class ShardUnavailableError(VectorDBError):
    """No replica of a shard of a sharded index (:mod:`vectordb.distributed`) answered
    within ``shard_timeout``: all failed, were killed past their restarts, or hung.

    ``shard`` is the shard's number; the message names it and the last failure.
    """

    def __init__(self, shard: int, reason: str) -> None:
        super().__init__(f"shard {shard} is unavailable: {reason}")
        self.shard = shard
        self.reason = reason

    def __reduce__(self) -> tuple[type[ShardUnavailableError], tuple[int, str]]:
        return (type(self), (self.shard, self.reason))


class StorageError(VectorDBError, OSError):
    """Reading or writing an index file failed (permissions, disk full, ...).

    Carries ``errno``, ``strerror`` and ``filename`` like any ``OSError``. The in-memory
    index stays usable and no partial file is left under the final name.
    """
