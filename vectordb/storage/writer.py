"""The writer's lock of an index directory: one writer at a time, across processes.

The lock is an exclusive ``flock`` on ``writer.lock`` in the index directory. A save swaps
the whole directory for a new one, so the save that holds the lock hard-links that same
file into the new directory before the swap (:func:`carry_writer`): the lock stays on the
file that the directory's name leads to. The holder writes its pid into the file, so that
a refused writer can be told who holds it. The kernel drops the lock when the holder's
descriptor closes, also when the process dies: a crashed writer never leaves the
directory locked. The file stays (it is part of the directory, like its log).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from ..errors import IndexLockedError
from .files import names_file, storage_error

__all__ = ["WRITER_LOCK", "carry_writer", "lock_writer", "release_writer"]

#: The lock file's name in an index directory.
WRITER_LOCK = "writer.lock"
#: Tries at taking the lock while saves swap the directory.
_ATTEMPTS = 100


def lock_writer(directory: Path) -> int | None:
    """Take the writer's lock of ``directory`` (an existing index directory); return its
    descriptor (for :func:`release_writer`), or ``None`` where ``flock`` is unavailable
    (no lock: as before locking existed). ``IndexLockedError`` at once if another
    descriptor (another index object, here or in another process) holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    path = directory / WRITER_LOCK
    for attempt in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # between the two renames of a save: wait it out
            time.sleep(min(0.05, 0.001 * 2**attempt))
            continue
        except OSError as exc:
            raise storage_error(exc, path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # a file system without flock: unlocked, as before
            by = f"process {holder}" if holder else "another process"
            same = " (this one: another index object opened on it)" if holder == os.getpid() else ""
            raise IndexLockedError(
                f"{directory} is open for writes by {by}{same}; one writer at a time"
                " (open it with readonly=True to read beside it)"
            ) from None
        if not names_file(path, fd):
            os.close(fd)  # a save swapped the directory in between: lock the new one's
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message of a refused writer
        return fd
    raise IndexLockedError(f"{directory}: the directory was replaced {_ATTEMPTS} times; retry")


def carry_writer(fd: int | None, directory: Path, new: Path) -> None:
    """Before ``new`` replaces ``directory``: link the lock file held as ``fd`` into it,
    so that the lock holds on in the new directory (nothing to do for ``fd`` ``None``)."""
    if fd is None:
        return
    source = directory / WRITER_LOCK
    if not names_file(source, fd):  # pragma: no cover - every writer locks before it saves
        raise IndexLockedError(f"{directory}: the writer's lock file was replaced")
    try:
        os.link(source, new / WRITER_LOCK)
    except OSError as exc:
        raise storage_error(exc, new / WRITER_LOCK) from exc


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def release_writer(fd: int | None) -> None:
    """Release the lock of :func:`lock_writer` (closing the descriptor drops it)."""
    if fd is not None:
        os.close(fd)
