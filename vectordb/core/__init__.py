"""Pure array code, no I/O: metrics, k-means, top-k keys, binary codes and their
distance estimate, the tree's arrays and its build, the leaf-sorted parts of the codes.

Everything above builds on these; they import nothing of the package but ``errors`` and
``_types``.
"""

from __future__ import annotations

__all__: list[str] = []
