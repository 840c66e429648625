"""``IndexData`` and ``LivingData``: an index as plain arrays, the one thing storage
exchanges with the index.

A build and a load produce one; a save writes one (taken by the index's ``snapshot()``):
``IndexData`` is compact (what ``save(path)`` writes), ``LivingData`` is the index as it
lives (what a checkpoint writes, and a load of one returns). Storage never sees the index
class, and the index never sees file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._types import I64
from ..core.codes import Quantizer
from ..core.metrics import Metric
from ..core.parts import Part
from ..core.tree import Tree
from .metadata import MetadataStore
from .vectors import VectorStore

__all__ = ["IndexData", "LivingData", "Reuse"]


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


@dataclass(frozen=True)
class Reuse:
    """What the directory a checkpoint replaces already holds of it, so that it is linked
    into the new version instead of written again.

    Attributes
    ----------
    directory : the index directory (the checkpoint's target)
    rows : storage rows ``0..rows-1`` are on disk there, in storage order (its
        ``vectors.bin``, then its ``vectors.tail.bin``)
    rotation : its rotation files hold this rotation
    tree : its tree files hold this tree
    base : its base part files hold this base part's rows, codes and factors
    offsets : ... and its leaf offsets
    metadata : its ``metadata.sqlite`` holds these documents
    """

    directory: Path
    rows: int
    rotation: bool
    tree: bool
    base: bool
    offsets: bool
    metadata: bool


@dataclass(frozen=True, eq=False)
class LivingData:
    """One index as it lives: two parts over storage rows in the order they came.

    Attributes
    ----------
    tree, quantizer, metric, params, metadata : as in :class:`IndexData`
    base, delta : the parts, each slot naming its storage row (``rows`` set), leaf by leaf
    row_id : (rows,) int64 id of every storage row, ``-1`` where no live vector is
    storage : the full vectors, storage rows ``0..rows-1`` at least
    next_id : the first id an ``add`` without ids assigns
    reuse : for a checkpoint, what its directory already holds (``None``: write it all)
    """

    tree: Tree
    base: Part
    delta: Part
    quantizer: Quantizer
    row_id: I64
    storage: VectorStore
    metric: Metric
    params: dict[str, Any]
    metadata: MetadataStore | None
    next_id: int
    reuse: Reuse | None = None

    @property
    def rows(self) -> int:
        """Storage rows the index has used."""
        return int(self.row_id.shape[0])

    @property
    def n(self) -> int:
        """Number of live vectors."""
        return int((self.row_id >= 0).sum())

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return self.quantizer.dim
