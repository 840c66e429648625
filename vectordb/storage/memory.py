"""How much of a file the page cache can hold for this process: the kernel's
``MemAvailable``, capped by the memory limit of the process's cgroup (v1 or v2), where one
applies. ``warm`` says so when a vector file is larger: its pages would evict each other,
and searches read from the disk whatever is done.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["page_cache_room"]

_UNLIMITED = 1 << 60


def page_cache_room(
    proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Bytes the page cache can hold here, or ``None`` where the OS does not tell (not
    Linux). ``proc`` and ``cgroups``: where those file systems are mounted."""
    available = _meminfo_available(proc / "meminfo")
    limit = _cgroup_limit(proc / "self" / "cgroup", cgroups)
    known = [v for v in (available, limit) if v is not None]
    return min(known) if known else None


def _meminfo_available(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_limit(membership: Path, root: Path) -> int | None:
    """The memory limit of this process's cgroup less what the cgroup holds but its page
    cache (v1: ``memory.limit_in_bytes``, v2: ``memory.max``), or ``None``."""
    with contextlib.suppress(OSError, ValueError):
        for line in membership.read_text().splitlines():
            _, controllers, where = line.split(":", 2)
            if controllers == "" and (root / where.lstrip("/") / "memory.max").exists():
                group = root / where.lstrip("/")
                raw = (group / "memory.max").read_text().strip()
                if raw == "max":
                    return None
                return int(raw) - _anon(group / "memory.stat", "anon")
            if "memory" in controllers.split(","):
                group = root / "memory" / where.lstrip("/")
                limit = int((group / "memory.limit_in_bytes").read_text())
                if limit >= _UNLIMITED:
                    return None
                return limit - _anon(group / "memory.stat", "rss")
    return None


def _anon(stat: Path, key: str) -> int:
    """The anonymous memory a cgroup holds (``key`` of its ``memory.stat``), 0 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in stat.read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
    return 0
