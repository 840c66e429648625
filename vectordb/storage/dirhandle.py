"""A directory opened once, and files opened through it (``dir_fd``).

An open that reads several files of one directory through one handle reads one version of
them, even while another process swaps a new directory in under the same path: the handle
keeps naming the directory it opened, and :meth:`DirHandle.replaced` tells when the path
names another one.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from types import TracebackType

from ..errors import InvalidIndexFileError
from .files import storage_error

__all__ = ["DirHandle", "DirMissing", "FileReplaced", "read_upto"]

_CHUNK = 8 << 20
_MISSING = "missing (or not a regular file)"
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Refuse a symlink put in place after the lstat; never block on a FIFO.
_O_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_O_FILE |= getattr(os, "O_BINARY", 0)
_DIR_FD = {os.open, os.stat} <= os.supports_dir_fd and os.stat in os.supports_follow_symlinks


class FileReplaced(Exception):
    """A file (or the directory) was replaced while it was being opened: start again."""


class DirMissing(InvalidIndexFileError):
    """Nothing at the index's path (as opposed to something that is not a directory)."""


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class DirHandle:
    """A directory opened once; its files are opened through that handle.

    Where the OS lacks ``dir_fd`` (Windows), files are opened by path; each is still
    opened once, checked on its descriptor and read from it.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory
        self._fd: int | None = None
        self._files: list[io.FileIO] = []
        not_dir = f"{directory}: not a directory (expected a saved index)"
        try:
            if _DIR_FD:
                self._fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY)
                st = os.fstat(self._fd)
            else:
                st = os.stat(directory)
        except FileNotFoundError:
            raise DirMissing(not_dir) from None
        except NotADirectoryError:
            raise InvalidIndexFileError(not_dir) from None
        except OSError as exc:
            raise storage_error(exc, directory) from exc
        if not stat.S_ISDIR(st.st_mode):
            self.close()
            raise InvalidIndexFileError(not_dir)
        self._identity = _identity(st)

    def __enter__(self) -> DirHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened through this handle, and the handle."""
        files, self._files = self._files, []
        for fh in files:
            fh.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def open(self, name: str, *, missing: str = _MISSING, irregular: str = _MISSING) -> io.FileIO:
        """``name`` opened for reading (unbuffered). ``InvalidIndexFileError`` when it is
        missing (``missing``) or not a regular file (``irregular``): a symlink, a FIFO, a
        device, a directory."""
        path = self.path / name
        try:
            if self._fd is not None:
                st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            else:
                st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidIndexFileError(f"{path}: {irregular}")
            fd = os.open(name if self._fd is not None else path, _O_FILE, dir_fd=self._fd)
        except FileNotFoundError:
            raise InvalidIndexFileError(f"{path}: {missing}") from None
        except OSError as exc:
            raise storage_error(exc, path) from exc
        fh = io.FileIO(fd, "rb")
        self._files.append(fh)
        if _identity(os.fstat(fd)) != _identity(st):
            raise FileReplaced(f"{path} was replaced while being opened")
        return fh

    def replaced(self) -> bool:
        """Whether the directory's path no longer names the directory opened (another
        process swapped a new version in, or removed it)."""
        try:
            return _identity(os.stat(self.path)) != self._identity
        except OSError:
            return True


def read_upto(fh: io.FileIO, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fh``'s position (fewer only at the end of the file)."""
    parts: list[bytes] = []
    left = limit
    while left > 0 and (chunk := fh.read(min(left, _CHUNK))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
