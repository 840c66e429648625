"""Replacing a directory atomically: a complete temporary directory beside the target is
swapped in for it (``renameat2(RENAME_EXCHANGE)`` where the OS has it, else two renames),
under an exclusive ``flock`` of the parent, so that concurrent saves take turns and what a
crashed save left behind can be cleaned up. Used by index saves and by the text stores.

With two renames (file systems without the exchange, e.g. NFS) there is a moment with
nothing at the target: the old directory is ``.NAME.old-*`` and the new one still
``.NAME.tmp-*``. A crash then leaves both; :func:`remove_leftovers` (every save, under the
lock) and :func:`restore_interrupted` (an open that finds the target missing) rename one
back instead of deleting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._progress import log
from ..errors import InvalidIndexFileError, StorageError
from .files import fsync_dir, storage_error

__all__ = [
    "check_replaceable",
    "install_dir",
    "leftovers",
    "lock_dir",
    "pick_leftover",
    "recover_missing",
    "remove_leftovers",
    "restore_interrupted",
    "unlock",
]

#: ``renameat2`` errors meaning "no exchange here" (old kernel, file system without it):
#: only these fall back to two renames; any other error is raised.
_UNSUPPORTED = frozenset(
    {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
)


def check_replaceable(path: Path, marker: str, what: str) -> None:
    """Refuse (``StorageError``, EEXIST) to replace ``path`` unless it is absent, an empty
    directory, or a directory holding ``marker`` (a saved ``what``)."""
    if path.exists() and not (
        path.is_dir() and (not any(path.iterdir()) or (path / marker).is_file())
    ):
        raise StorageError(
            errno.EEXIST, f"exists and is not {what}; refusing to replace it", str(path)
        )


def lock_dir(directory: Path, *, wait: bool = True) -> int | None:
    """Hold an exclusive ``flock`` on ``directory`` (``None`` where flock is unavailable).

    ``wait=False``: raise ``BlockingIOError`` at once if another holds it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise storage_error(exc, directory) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)  # a file system without flock: go on unlocked, as before
        return None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def leftovers(parent: Path, name: str) -> tuple[list[Path], list[Path]]:
    """The ``.name.tmp-*`` and the ``.name.old-*`` directories in ``parent``."""

    def dirs(kind: str) -> list[Path]:
        pattern = f".{glob.escape(name)}.{kind}-*"
        return [p for p in parent.glob(pattern) if p.is_dir() and not p.is_symlink()]

    return dirs("tmp"), dirs("old")


def _newest_first(paths: list[Path]) -> list[Path]:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(paths, key=mtime, reverse=True)


def pick_leftover(
    parent: Path, name: str, complete: Callable[[Path], bool] | None = None
) -> Path | None:
    """The leftover :func:`restore_interrupted` would rename back to ``parent/name``.

    Preferred: a ``.name.tmp-*`` for which ``complete`` holds (the new version, committed);
    else a ``.name.old-*`` (the previous version; with ``complete``, only one it accepts).
    Without ``complete`` no ``.tmp-*`` is trusted. ``None`` when none fits.
    """
    tmps, olds = leftovers(parent, name)
    if complete is not None:
        for candidate in _newest_first(tmps):
            if complete(candidate):
                return candidate
    for candidate in _newest_first(olds):
        if complete is None or complete(candidate):
            return candidate
    return None


def restore_interrupted(
    parent: Path, name: str, complete: Callable[[Path], bool] | None = None
) -> Path | None:
    """If ``parent/name`` is missing, rename back the copy a save interrupted between its
    two renames left (see :func:`pick_leftover`), and log it; return it (``None``: nothing
    done). Call under the parent's lock."""
    target = parent / name
    if os.path.lexists(target):
        return None
    chosen = pick_leftover(parent, name, complete)
    if chosen is None:
        return None
    os.rename(chosen, target)
    fsync_dir(parent)
    log.warning("restored %s from %s (left by a save that crashed)", target, chosen)
    return chosen


#: Looks at a missing target while a save holds the parent's lock (about 0.25 s in all).
_RECOVER_ATTEMPTS = 8


def recover_missing(path: Path, complete: Callable[[Path], bool], what: str) -> None:
    """If the directory ``path`` is missing but a save into its parent crashed between its
    two renames, rename the copy it left back to ``path``: the new one if ``complete``
    says so, else the old one (:func:`restore_interrupted`). ``what`` names the kind of
    directory in the message of a give-up.

    Takes the parent's lock without waiting; while a save holds it with a replaced copy
    beside the missing path (between its renames, for a moment) looks again a few times,
    then raises ``StorageError`` (``EAGAIN``). ``InvalidIndexFileError`` if the copy cannot
    be renamed back (the message says what to do). Does nothing when ``path`` exists or
    nothing was left beside it.
    """
    parent = path.parent
    for attempt in range(_RECOVER_ATTEMPTS):
        if attempt:
            time.sleep(min(0.05, 0.001 * 2**attempt))
        if os.path.lexists(path) or not parent.is_dir():
            return
        tmps, olds = leftovers(parent, path.name)
        if not tmps and not olds:
            return
        try:
            lock = lock_dir(parent, wait=False)
        except BlockingIOError:
            if not olds:
                return  # a first save still writing: nothing to recover (yet)
            continue
        except StorageError:
            return  # the parent cannot be opened: the open reports the missing directory
        try:
            restore_interrupted(parent, path.name, complete)
        except OSError as exc:
            found = pick_leftover(parent, path.name, complete)
            raise InvalidIndexFileError(
                f"{path}: missing; a save that crashed left a complete copy at {found}, "
                f"which could not be renamed back ({exc.strerror or exc}): rename it to "
                f"{path} (or save into {parent} again, which does so)"
            ) from exc
        finally:
            unlock(lock)
        return
    if os.path.lexists(path):
        return  # the save ended meanwhile
    raise StorageError(
        errno.EAGAIN,
        f"{path}: {what} missing while a save into {parent} holds its lock; try again",
        str(path),
    )


def remove_leftovers(
    parent: Path, name: str, complete: Callable[[Path], bool] | None = None
) -> None:
    """Remove ``.name.tmp-*`` and ``.name.old-*`` in ``parent``: under the lock, they are
    what a crashed save left behind. When ``parent/name`` is missing, the one copy
    :func:`restore_interrupted` picks is renamed back first, not removed."""
    try:
        restore_interrupted(parent, name, complete)
    except OSError as exc:
        raise storage_error(exc, parent / name) from exc
    tmps, olds = leftovers(parent, name)
    for stale in tmps + olds:
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


def _exchange(tmp: Path, path: Path) -> bool:
    """Swap ``tmp`` and ``path`` in one step; ``False`` where the OS or the file system
    cannot (then two renames must do). Other failures raise ``OSError``."""
    exchange = _renameat2_exchange()
    if exchange is None:
        return False
    ctypes.set_errno(0)
    if exchange(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno() or errno.EIO
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(path), None, str(tmp))


def install_dir(tmp: Path, path: Path, parent: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``path``; the old one is removed.

    Where the exchange is unsupported: ``path`` -> ``.NAME.old-*``, then ``tmp`` ->
    ``path``. An error (not a crash) between the two puts the old one back.
    """
    if not path.exists():
        os.rename(tmp, path)
        fsync_dir(parent)
        return
    if _exchange(tmp, path):
        old = tmp  # tmp now holds the old index
    else:
        old = parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, path)
            raise
    # The new index is complete and in place from here on. Should the fsync below fail, the
    # error is raised (the switch may not be durable yet), but the old copy goes regardless.
    try:
        fsync_dir(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)
