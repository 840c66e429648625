"""``IndexData``: an index as plain arrays, the one thing storage exchanges with the index.

A build and a load produce one; a save writes one (taken by the index's ``snapshot()``).
Storage never sees the index class, and the index never sees file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._types import I64
from ..core.codes import Quantizer
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import Tree
from .metadata import MetadataStore
from .vectors import VectorStore

__all__ = ["IndexData"]


@dataclass(frozen=True, eq=False)
class IndexData:
    """One compact index: every slot live, leaf by leaf.

    Attributes
    ----------
    tree : the routing tree, centroids rotated ``(n_nodes, bits)``
    base : the one part, slot ``i`` holding row ``i`` (``base.rows is None``)
    quantizer : the rotation
    ids : (n,) int64 id of every slot
    storage : the full vectors
    rows : (n,) int64 storage row of every slot's vector, or ``None`` when slot ``i`` is
        storage row ``i`` (after a build or a load; a snapshot of a living index lists
        the live rows it keeps)
    metric : the index's metric
    params : build parameters (as saved in the manifest)
    metadata : the documents by id, or ``None`` for none
    """

    tree: Tree
    base: Part
    quantizer: Quantizer
    ids: I64
    storage: VectorStore
    rows: I64 | None
    metric: Metric
    params: dict[str, Any]
    metadata: MetadataStore | None

    @property
    def n(self) -> int:
        """Number of vectors."""
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return self.quantizer.dim
