"""What a checkpoint writes: the index as it lives, and what its directory already holds.

A checkpoint (``save()`` onto the bound directory) writes format version 5
(:mod:`vectordb.storage.format`): the state's two parts and its storage rows as they lie,
so that what did not change since the directory's last version is linked, not written
(:class:`~vectordb.storage.snapshot.Reuse`). After a load, a checkpoint or a save that
binds, :class:`OnDisk` records what the directory holds; a checkpoint compares the state
with it object by object: published states never change, so the same object is the same
content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.codes import Quantizer
from ..core.parts import Part
from ..core.tree import Tree
from ..storage.metadata import MetadataStore
from ..storage.snapshot import IndexData, LivingData, Reuse
from ..storage.vectors import VectorStore
from .state import IndexState

__all__ = ["OnDisk", "living_snapshot", "on_disk"]

#: The base part's per-slot arrays (its offsets are compared apart).
_BASE_ARRAYS = ("rows", "codes", "factors")


@dataclass(frozen=True, eq=False)
class OnDisk:
    """What the bound directory holds: storage rows ``0..rows-1`` of ``storage`` (in
    storage order), ``quantizer``'s rotation, ``tree``, ``base`` and the documents of
    ``metadata`` at ``version``."""

    storage: VectorStore
    rows: int
    quantizer: Quantizer
    tree: Tree
    base: Part
    metadata: MetadataStore
    version: int


def on_disk(data: IndexData | LivingData, st: IndexState, metadata: MetadataStore) -> OnDisk | None:
    """What a directory holds once ``data`` was loaded from it or saved to it, as the
    state ``st`` (the index's now, or the one ``data`` was taken from) sees it: ``None``
    when its files do not lie as the state's rows do (a compact save of a state with
    deletions, or whose rows are not leaf by leaf), so that the next checkpoint writes all."""
    if isinstance(data, IndexData):
        rows = data.n
        in_order = data.rows is None or bool((data.rows == range(rows)).all())
        if not in_order or st.delta.size or st.row_ok is not None or st.base.rows is not None:
            return None
        if st.row_id.shape[0] != rows or st.base.size != rows:
            return None
    else:
        rows = data.rows
    return OnDisk(st.storage, rows, st.quantizer, st.tree, st.base, metadata, metadata.version)


def living_snapshot(
    st: IndexState,
    params: dict[str, Any],
    metadata: MetadataStore,
    disk: OnDisk | None,
    directory: Path,
) -> LivingData:
    """``st`` as a checkpoint of ``directory`` writes it, with what ``disk`` says the
    directory already holds (the metadata copied only when it changed)."""
    same_docs = disk is not None and disk.metadata is metadata and disk.version == metadata.version
    reuse = None
    if disk is not None and disk.storage is st.storage and disk.rows <= st.row_id.shape[0]:
        reuse = Reuse(
            directory=directory,
            rows=disk.rows,
            rotation=disk.quantizer is st.quantizer,
            tree=disk.tree is st.tree,
            # A split extends the base's offsets over new leaves, its arrays the same.
            base=all(getattr(disk.base, f) is getattr(st.base, f) for f in _BASE_ARRAYS),
            offsets=disk.base.offsets is st.base.offsets,
            metadata=same_docs,
        )
    row_id = st.row_id
    if st.row_ok is not None:
        row_id = row_id.copy()
        row_id[~st.row_ok[: row_id.shape[0]]] = -1
    return LivingData(
        tree=st.tree,
        base=st.base,
        delta=st.delta,
        quantizer=st.quantizer,
        row_id=row_id,
        storage=st.storage,
        metric=st.metric,
        params=dict(params),
        metadata=None if reuse is not None and reuse.metadata else metadata.copy(),
        next_id=st.next_id,
        reuse=reuse,
    )
