"""SQLite's failures while writing a file, as the ``StorageError`` (with an ``errno``) that
every other write of the index raises."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from ..errors import StorageError

__all__ = ["sqlite_storage_error"]

#: SQLite result codes (``sqlite3`` names them from Python 3.11 on): SQLITE_FULL, and
#: SQLITE_PERM, SQLITE_READONLY, SQLITE_AUTH.
_SQLITE_FULL = 13
_SQLITE_DENIED = (3, 8, 23)


def sqlite_storage_error(exc: sqlite3.Error, path: Path) -> StorageError:
    """A ``StorageError`` for an SQLite failure while writing ``path``. SQLite does not
    pass on the OS's errno: disk full is its own code (or, as a bare I/O error, a full
    file system); permission codes map to ``EACCES``; the rest is ``EIO``."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    primary = code & 0xFF if isinstance(code, int) else None
    message = str(exc)
    if primary == _SQLITE_FULL or "disk is full" in message:
        number = errno.ENOSPC
    elif primary in _SQLITE_DENIED:
        number = errno.EACCES
    else:
        number = errno.EIO
        try:
            fs = os.statvfs(path.parent)
            if fs.f_bavail * fs.f_frsize < 1 << 20:
                number = errno.ENOSPC
        except OSError:
            pass
    return StorageError(number, f"{os.strerror(number)} (SQLite: {message})", str(path))
