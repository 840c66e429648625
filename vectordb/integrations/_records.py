"""How a text store keeps a text: as the vectordb metadata of its int id,
``{"_text": text, "_sid": string id, **user_metadata}``, the user's keys at top level so
that dict filters apply to them as they are."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from ..errors import InvalidParameterError
from ..storage.filters import Filter

__all__ = [
    "ID_KEY",
    "RESERVED_KEYS",
    "TEXT_KEY",
    "Record",
    "check_ids",
    "record",
    "stored",
    "user_filter",
]

TEXT_KEY = "_text"
ID_KEY = "_sid"
RESERVED_KEYS = frozenset({TEXT_KEY, ID_KEY})


@dataclass(frozen=True)
class Record:
    """A stored text: string ``id``, ``text``, user ``metadata`` (no reserved keys), all
    ``stored`` metadata, vectordb ``distance`` to the query vector (NaN outside searches,
    and for a text the vector side did not find) and the ``score`` that ranked it (higher
    is better: ``-distance``, BM25 or fused; see :class:`vectordb.Hit`; NaN outside
    searches)."""

    id: str
    text: str
    metadata: dict[str, Any]
    stored: dict[str, Any]
    distance: float = math.nan
    score: float = math.nan


def record(doc: dict[str, Any], distance: float = math.nan, score: float = math.nan) -> Record:
    """The record of the stored metadata ``doc``."""
    user = {k: v for k, v in doc.items() if k not in RESERVED_KEYS}
    return Record(str(doc[ID_KEY]), str(doc.get(TEXT_KEY, "")), user, doc, distance, score)


def check_ids(ids: object) -> None:
    """Refuse a bare string as a list of ids: it would be one id per character."""
    if isinstance(ids, str | bytes):
        raise InvalidParameterError(
            f"ids must be a list of strings, not a {type(ids).__name__}: {ids!r}"
        )


def stored(
    texts: Sequence[str],
    ids: Sequence[str | None] | None,
    metadatas: Sequence[Mapping[str, Any] | None] | None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Check a write of ``texts``; return their string ids (a uuid4 for None) and the
    metadata dicts to store."""
    n = len(texts)
    check_ids(ids)
    ids = [None] * n if ids is None else list(ids)
    metadatas = [None] * n if metadatas is None else list(metadatas)
    if len(ids) != n or len(metadatas) != n:
        raise InvalidParameterError(
            f"got {n} texts, {len(ids)} ids and {len(metadatas)} metadata dicts: one each"
        )
    sids = [str(uuid.uuid4()) if i is None else i for i in ids]
    bad = [s for s in sids if not isinstance(s, str)]
    if bad or len(set(sids)) != n:
        twice = Counter(sids).most_common(1)[0][0] if not bad else None
        raise InvalidParameterError(
            f"ids must be strings, got {bad[0]!r}" if bad else f"id {twice!r} appears twice"
        )
    docs = []
    for sid, text, meta in zip(sids, texts, metadatas, strict=True):
        if not isinstance(text, str) or not isinstance(meta, Mapping | None):
            raise InvalidParameterError(
                f"texts must be strings and metadata dicts, got {text!r} and {meta!r}"
            )
        clash = sorted(RESERVED_KEYS.intersection(meta or {}))
        if clash:
            raise InvalidParameterError(f"metadata keys {clash} are reserved by vectordb")
        docs.append({**(meta or {}), TEXT_KEY: text, ID_KEY: sid})
    return sids, docs


@overload
def user_filter(filter: Filter) -> Filter: ...
@overload
def user_filter(filter: None) -> None: ...
def user_filter(filter: Filter | None) -> Filter | None:
    """A filter on stored metadata from the user's: a predicate sees the user's metadata
    only (no reserved keys); a dict filter names the user's keys as they are stored."""
    if filter is None or not callable(filter):
        return filter
    user = filter
    return lambda doc: bool(user(record(doc).metadata))
