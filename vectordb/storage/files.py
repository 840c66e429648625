"""Crash-safe file writing: temporary name, flush, fsync, rename, fsync the directory.

A crash or an error at any point leaves either the old file or the new one under the final
name, never a partial file; the temporary is removed on error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import StorageError

__all__ = [
    "atomic_write",
    "crc32_file",
    "crc32_of",
    "fsync_dir",
    "names_file",
    "same_dir",
    "storage_error",
]

_CHUNK = 8 << 20


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    """Wrap ``exc`` as a ``StorageError`` naming ``path`` (keeps errno and strerror)."""
    code = exc.errno if exc.errno is not None else errno.EIO
    message = exc.strerror or str(exc) or os.strerror(code)
    return StorageError(code, message, str(path))


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


#: ``0o666`` less the process umask, read once at import.
_NEW_FILE_MODE = _new_file_mode()


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it to ``path``.

    Any ``OSError`` becomes a ``StorageError`` naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    tmp = Path(tmp_name)
    try:
        # mkstemp makes 0600; the file gets the mode any new file gets (others may share it).
        os.fchmod(fd, _NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, path) from exc
        raise


def crc32_file(
    path: Path, progress: Callable[[int], None] | None = None, *, size: int | None = None
) -> int:
    """CRC32 of a file's first ``size`` bytes (``None``: all), read in 8 MiB chunks."""
    with open(path, "rb", buffering=0) as fh:
        return crc32_of(fh, progress, size)


def crc32_of(
    fh: io.FileIO, progress: Callable[[int], None] | None = None, size: int | None = None
) -> int:
    """CRC32 of the open file ``fh`` from its start, its first ``size`` bytes (``None``:
    all), read in 8 MiB chunks; ``progress(n)`` after each."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    fh.seek(0)
    left = size
    while left is None or left > 0:
        count = fh.readinto(view if left is None or left >= _CHUNK else view[:left])
        if not count:
            break
        crc = zlib.crc32(view[:count], crc)
        if left is not None:
            left -= count
        if progress is not None:
            progress(count)
    return crc


def names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed if a symlink) still names the file open as ``fd``."""
    try:
        st, own = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def same_dir(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one directory (compared as paths where either is
    missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
