"""Replacing a directory atomically: a complete temporary directory beside the target is
swapped in for it (``renameat2(RENAME_EXCHANGE)`` where the OS has it, else two renames),
under an exclusive ``flock`` of the parent, so that concurrent saves take turns and what a
crashed save left behind can be removed. Used by index saves and by the text stores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ._files import fsync_dir, storage_error
from .errors import StorageError

__all__ = ["check_replaceable", "install_dir", "lock_dir", "remove_leftovers", "unlock"]


def check_replaceable(path: Path, marker: str, what: str) -> None:
    """Refuse (``StorageError``, EEXIST) to replace ``path`` unless it is absent, an empty
    directory, or a directory holding ``marker`` (a saved ``what``)."""
    if path.exists() and not (
        path.is_dir() and (not any(path.iterdir()) or (path / marker).is_file())
    ):
        raise StorageError(
            errno.EEXIST, f"exists and is not {what}; refusing to replace it", str(path)
        )


def lock_dir(directory: Path) -> int | None:
    """Hold an exclusive ``flock`` on ``directory`` (``None`` where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise storage_error(exc, directory) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)  # a file system without flock: go on unlocked, as before
        return None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def remove_leftovers(parent: Path, name: str) -> None:
    """Remove ``.name.tmp-*`` and ``.name.old-*`` in ``parent``: under the lock, they are
    what a crashed save left behind."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for stale in parent.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _renameat2_exchange() -> Any:
    """libc's ``renameat2`` when it exists (glibc >= 2.28), else ``None``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def install_dir(tmp: Path, path: Path, parent: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``path``; the old one is removed."""
    if not path.exists():
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    exchange = _renameat2_exchange()
    if (
        exchange is not None
        and exchange(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE)
        == 0
    ):
        old = tmp  # tmp now holds the old index
    else:
        old = parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
        os.rename(tmp, path)
    # The new index is complete and in place from here on. Should the fsync below fail, the
    # error is raised (the switch may not be durable yet), but the old copy goes regardless.
    try:
        fsync_dir(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)
