"""Progress bars for long work, and the library's logger.

Long steps (build, save, verifying checksums, warming the page cache, compaction) report
progress through :func:`progress_bar`. A bar is drawn with tqdm when tqdm is installed
(``pip install 'vectordb-embedded[progress]'``), ``progress`` is not ``False`` and
standard error is a terminal; otherwise nothing is drawn. The library never prints:
everything else goes to the standard ``logging`` logger ``"vectordb"``.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

__all__ = ["ProgressBar", "log", "progress_bar"]

log = logging.getLogger("vectordb")


class ProgressBar:
    """A tqdm bar, or nothing: ``update(n)`` either way."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress_bar(
    total: int | None, desc: str, *, unit: str = "it", progress: bool | None = None
) -> ProgressBar:
    """A progress bar over ``total`` units (see the module docstring for when it shows).

    ``progress``: ``None`` or ``True`` show it on a terminal, ``False`` never.
    ``unit="B"`` scales bytes to kB, MB, ...
    """
    if progress is False:
        return ProgressBar(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return ProgressBar(None)
    scale = unit == "B"
    # disable=None: tqdm draws only when its output (stderr) is a terminal.
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=None,
        leave=False,
    )
    return ProgressBar(bar)
