"""What this process has written, as Linux counts it: bench helpers."""

from __future__ import annotations

from pathlib import Path


def wchar() -> int:
    """Bytes this process has handed to write calls (``/proc/self/io``'s ``wchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")
