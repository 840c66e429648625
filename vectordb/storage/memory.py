"""The page cache and the mapped vector file: how much of a file the cache can hold for
this process, and how faults on the mapping read ahead.

:func:`page_cache_room`: the kernel's ``MemAvailable``, capped by the memory limit of the
process's cgroup (v1 or v2), where one applies. ``warm`` says so when a vector file is
larger: its pages would evict each other, and searches read from the disk whatever is done.

Readahead: searches read scattered rows (the rerank's candidates), so the mapping is
advised :data:`SEARCH_ADVICE` (``MADV_RANDOM``: a fault reads its own page, not the 128 KiB
around it that the next query will not use and that evicts pages it would). With the page
cache smaller than the file that measured 3.6x the QPS of the default readahead (1M x 384,
a 600 MiB cgroup: 150-166 against 40-42 batched, 143-147 against 41-48 one at a time). A
pass that reads the rows in order (a save, a compaction, calibration's brute force) runs in
:func:`reading_in_order`, with readahead back on.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["SEARCH_ADVICE", "page_cache_room", "reading_in_order"]

#: The mapping's advice while searches read it (``None`` where ``madvise`` is missing).
SEARCH_ADVICE: int | None = getattr(mmap, "MADV_RANDOM", None)
_IN_ORDER: int | None = getattr(mmap, "MADV_SEQUENTIAL", None)


@contextlib.contextmanager
def reading_in_order(store: Any) -> Iterator[None]:
    """Readahead on for a pass over ``store``'s rows in order (a store with no ``advise``,
    in RAM, is left alone); back to :data:`SEARCH_ADVICE` after."""
    advise = getattr(store, "advise", None)
    if advise is None or _IN_ORDER is None or SEARCH_ADVICE is None:
        yield
        return
    advise(_IN_ORDER)
    try:
        yield
    finally:
        advise(SEARCH_ADVICE)


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
