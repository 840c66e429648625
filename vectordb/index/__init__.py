"""``ClusteredIndex`` (``clustered``): one class, over the published ``IndexState``
(``state``); builds (``build``) and writes (``update``) are steps that make new states.
"""

from __future__ import annotations

__all__: list[str] = []
