"""Bytes in RAM and on disk; knows no index and no search.

Vector stores (``vectors``, ``scratch``), ids (``idmap``), metadata (``metadata``,
``filters``), file primitives (``files``, ``dirswap``, ``dirhandle``), and the index
directory: ``format`` (names, versions, manifest), ``snapshot`` (``IndexData``, what build
and load produce and save writes), ``save`` and ``load``.
"""

from __future__ import annotations

__all__: list[str] = []
