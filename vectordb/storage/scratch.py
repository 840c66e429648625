"""Working files an index in mmap mode creates inside its directory: rows appended since
open or since ``compact``, never part of the saved index (its manifest lists its files).

Each is held under an exclusive ``flock`` while a process has it open, so that ``vectordb
verify`` tells a working file in use from one a dead process left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["lock_scratch", "scratch_files", "scratch_in_use"]

#: Names of the working files.
_SCRATCH_PATTERNS = (".*.append-*", ".*.compact-*")


def lock_scratch(fd: int) -> None:
    """Hold an exclusive ``flock`` on a working file while it is open (none where flock
    is unavailable: :func:`scratch_in_use` then cannot tell)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def scratch_files(directory: Path) -> list[Path]:
    """The working files (``.*.append-*``, ``.*.compact-*``) inside an index directory."""
    found = {p for pattern in _SCRATCH_PATTERNS for p in Path(directory).glob(pattern)}
    return sorted(p for p in found if p.is_file() and not p.is_symlink())


def scratch_in_use(path: Path) -> bool | None:
    """Whether a running process holds the working file ``path`` open (its ``flock``:
    an append file, a compacted vector file, or one still being written); ``None`` where
    that cannot be told (no flock, or a file of no such name)."""
    name = Path(path).name
    if ".append-" not in name and ".compact-" not in name:
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return False
