"""A text store's directory: ``store.json`` and ``index/``, saved as one atomic swap.

``store.json`` holds the format, the adapter's name, the metric, the search defaults and
the build options; ``index/`` is the vectordb index (absent while the store is empty).
:func:`save_store` writes both into a temporary directory beside the target, fsyncs it and
swaps it in as :mod:`vectordb.storage.save` swaps an index directory (same flock, same leftover
cleanup), so a crash leaves the old store or the new one, never one's ``store.json`` with
the other's index. :func:`read_info` checks every key of ``store.json``.

The index of a store opened from (or saved to) its directory is bound to ``index/``
(:mod:`vectordb.index.persistence`): every write is in its log, durable when the call
returns, and a save onto the same store is the index's checkpoint and a new
``store.json`` (:func:`checkpoint_store`), not a new directory. A save over a store whose
index another writer holds is refused (``IndexLockedError``), never a lost update.

``store.json`` is written last, so a temporary directory that holds a valid one (and, when
it says so, a complete ``index/``) is a committed store. Where the swap takes two renames
and a crash comes between them, the next save, or the next open of the missing path
(:func:`recover_missing`), renames that new copy back, else the old one (the indexes'
recovery, :func:`vectordb.storage.load.recover_missing`, with this test of completeness).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.metrics import Metric
from ..errors import InvalidIndexFileError, StorageError
from ..index.clustered import ClusteredIndex
from ..storage.dirswap import (
    check_replaceable,
    install_dir,
    lock_dir,
    remove_leftovers,
    unlock,
)
from ..storage.dirswap import (
    recover_missing as _recover_missing,
)
from ..storage.files import atomic_write, storage_error
from ..storage.load import is_complete
from ..storage.writer import lock_writer, release_writer

__all__ = [
    "INDEX_DIR",
    "STORE_FILE",
    "checkpoint_store",
    "open_index",
    "read_info",
    "recover_missing",
    "save_store",
]

STORE_FILE = "store.json"
INDEX_DIR = "index"
FORMAT = "vectordb-text-store"
VERSION = 1
_STRING, _INT = (str, "a string"), (int, "an integer")
_OPTIONAL_INT = ((int, type(None)), "an integer or null")
#: The keys of ``store.json``: type(s), and their name for messages.
_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "format": _STRING,
    "version": _INT,
    "kind": _STRING,
    "metric": _STRING,
    "probes": _OPTIONAL_INT,
    "rerank_factor": _OPTIONAL_INT,
    "build_options": (dict, "an object"),
    "has_index": (bool, "true or false"),
}


def save_store(
    path: str | os.PathLike[str], info: Mapping[str, Any], index: ClusteredIndex | None
) -> None:
    """Save ``info`` (the keys of ``store.json`` but ``format``, ``version``,
    ``has_index``) and ``index`` as the store directory ``path``, replacing a saved store.

    Raises ``StorageError`` if ``path`` exists and is neither an empty directory nor a
    saved store (it is not replaced), or on any OS error (the saved store is then intact).
    """
    root = Path(os.path.abspath(path))  # "." or "dir/" name no directory to swap
    if root.is_symlink():  # replace what the link points to, and keep the link
        root = root.resolve()
    parent = root.parent
    info = {"format": FORMAT, "version": VERSION, **info, "has_index": index is not None}
    try:
        check_replaceable(root, STORE_FILE, "a saved vectordb text store")
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise storage_error(exc, getattr(exc, "filename", None) or root) from exc
    lock = lock_dir(parent)
    tmp = parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
    unbound = index is not None and index.path is None
    writer = None
    try:
        remove_leftovers(parent, root.name, _complete_store)
        if (root / INDEX_DIR / "manifest.json").is_file():
            writer = lock_writer(root / INDEX_DIR)  # its writer's log would go with it
        tmp.mkdir()
        if index is not None:
            # Binds an unbound index there; one bound to another store stays bound to it.
            index.save(tmp / INDEX_DIR, progress=False)
        with atomic_write(tmp / STORE_FILE) as fh:  # fsyncs the file and ``tmp``
            fh.write(json.dumps(info, indent=1).encode("utf-8"))
        install_dir(tmp, root, parent)
    except BaseException as exc:
        if unbound and index is not None:
            index.detach()  # bound to the directory just removed
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, getattr(exc, "filename", None) or root) from exc
        raise
    finally:
        release_writer(writer)
        unlock(lock)
    if unbound and index is not None:
        index._moved_to(root / INDEX_DIR)  # the store moved the directory it was saved in


def checkpoint_store(
    path: str | os.PathLike[str], info: Mapping[str, Any], index: ClusteredIndex
) -> None:
    """Save the store ``path`` whose index is bound to ``path/index``: the index's
    checkpoint (its log folded in), then ``store.json`` anew (atomically) if ``info``
    changed. A crash between the two leaves the checkpoint with the old ``store.json``,
    which still describes it."""
    root = Path(os.path.abspath(path))
    if root.is_symlink():
        root = root.resolve()
    info = {"format": FORMAT, "version": VERSION, **info, "has_index": True}
    lock = lock_dir(root.parent)
    try:
        # What a store swap that crashed left beside it (as save_store removes it).
        remove_leftovers(root.parent, root.name, _complete_store)
        index.checkpoint(progress=False)
        try:
            if json.loads((root / STORE_FILE).read_text(encoding="utf-8")) == info:
                return
        except (OSError, ValueError):
            pass
        with atomic_write(root / STORE_FILE) as fh:
            fh.write(json.dumps(info, indent=1).encode("utf-8"))
    finally:
        unlock(lock)


def read_info(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """The checked contents of ``path/store.json``, saved by the ``kind`` adapter, after
    :func:`recover_missing`.

    Raises ``InvalidIndexFileError`` for a missing, foreign or malformed file, a key
    missing or of the wrong type, a store of another adapter, or ``has_index`` that
    disagrees with the presence of ``index/``.
    """
    recover_missing(path)
    info = _parse_info(Path(path))
    if info["kind"] != kind:
        raise InvalidIndexFileError(
            f"{Path(path) / STORE_FILE}: saved by the {info['kind']!r} adapter"
        )
    return info


def _parse_info(root: Path) -> dict[str, Any]:
    """``root/store.json`` checked as :func:`read_info` does, of any adapter."""
    file = root / STORE_FILE
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidIndexFileError(
            f"{file}: not a saved vectordb text store ({exc.__class__.__name__}: {exc})"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InvalidIndexFileError(f"{file}: not a vectordb text store")
    for key, (kind_of, name) in _KEYS.items():
        value = info.get(key)
        # bool is an int; no int key takes one.
        wrong = not isinstance(value, kind_of) or (kind_of is not bool and isinstance(value, bool))
        if key not in info or wrong:
            raise InvalidIndexFileError(f"{file}: {key!r} must be {name}, found {value!r}")
    if info["version"] != VERSION:
        raise InvalidIndexFileError(f"{file}: version {info['version']}, expected {VERSION}")
    present = (root / INDEX_DIR).exists()
    if present is not info["has_index"]:
        raise InvalidIndexFileError(
            f"{file}: has_index is {info['has_index']} but {root / INDEX_DIR} "
            + ("exists" if present else "is missing")
        )
    return info


def _complete_store(directory: Path) -> bool:
    """Whether ``directory`` holds a whole saved store: a valid ``store.json`` and, when
    it says so, an ``index/`` whose files all match its manifest (reads them once)."""
    try:
        info = _parse_info(directory)
    except InvalidIndexFileError:
        return False
    return not info["has_index"] or is_complete(directory / INDEX_DIR)


def recover_missing(path: str | os.PathLike[str]) -> None:
    """If the store directory ``path`` is missing but a save into its parent crashed
    between its two renames, rename the copy it left back to ``path``: the new one if
    complete (:func:`_complete_store`), else the old one (see
    :func:`vectordb.storage.dirswap.recover_missing`)."""
    root = Path(os.path.abspath(path))
    if root.is_symlink():  # a save replaces what the link points to (see save_store)
        root = root.resolve()
    _recover_missing(root, _complete_store, "text store")


def open_index(
    path: str | os.PathLike[str], metric: Metric, id_key: str, *, mmap: bool
) -> tuple[ClusteredIndex, dict[str, int]]:
    """Open the index of the store directory ``path``; return it and its string ids' ints,
    rebuilt from the string ids in its metadata under ``id_key``.

    Raises ``InvalidIndexFileError`` if the index's metric is not ``metric`` (the one of
    ``store.json``), or an id lacks its string id, or a string id is stored twice.
    """
    index = ClusteredIndex.open(Path(path) / INDEX_DIR, mmap=mmap)  # bound: writes logged
    ints: dict[str, int] = {}
    try:
        if index.metric is not metric:
            raise InvalidIndexFileError(
                f"{path}: the index's metric is {index.metric.value!r}, "
                f"{STORE_FILE} says {metric.value!r}"
            )
        ids = index.ids
        for i, doc in zip(ids.tolist(), index.get_metadata_many(ids), strict=True):
            sid = None if doc is None else doc.get(id_key)
            if not isinstance(sid, str):
                raise InvalidIndexFileError(f"{path}: id {i} of the index has no {id_key!r}")
            if sid in ints:
                raise InvalidIndexFileError(
                    f"{path}: string id {sid!r} is stored twice (ids {ints[sid]} and {i})"
                )
            ints[sid] = i
    except BaseException:
        index.close()
        raise
    return index, ints
