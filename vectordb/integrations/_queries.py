"""How a text store's query becomes its index's: the arguments checked and completed, and
the hits made records. A store's texts are searched by BM25 once its index indexes them
(:func:`index_texts`, at every build and open)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from .._validation import check_k
from ..errors import BackendUnavailableError, InvalidParameterError
from ..index.clustered import ClusteredIndex
from ..index.hit import Hit
from ..index.query import query_options
from ._records import TEXT_KEY, Record, record, user_filter

__all__ = [
    "QUERY_OPTIONS",
    "index_texts",
    "query_args",
    "records_of",
    "text_ready",
    "vector_args",
    "vector_only",
]

#: What a query takes beyond its vector, text and k.
QUERY_OPTIONS = frozenset({"filter", "probes", "rerank_factor", "fusion", "alpha"})


def index_texts(index: ClusteredIndex) -> ClusteredIndex:
    """Turn text search on for the texts of ``index`` (``ClusteredIndex.index_text``);
    without FTS5 it stays off, and a text query raises ``BackendUnavailableError``."""
    with contextlib.suppress(BackendUnavailableError):
        index.index_text(TEXT_KEY)
    return index


def text_ready(index: ClusteredIndex, args: dict[str, Any]) -> None:
    """Before a query with a text: ``BackendUnavailableError`` unless ``index`` searches
    its texts."""
    if args["text"] is not None and index.text_field is None:
        index.index_text(TEXT_KEY)


def query_args(
    vector: Any,
    text: Any,
    k: int,
    options: dict[str, Any],
    probes: int | None,
    rerank_factor: int | None,
) -> dict[str, Any]:
    """``ClusteredIndex.query``'s arguments for a store's query: ``options`` (those of
    :data:`QUERY_OPTIONS`; a ``None`` one takes the store's default ``probes`` and
    ``rerank_factor``, or the index's), a callable filter made to see the user's metadata.
    ``InvalidParameterError`` for an unknown option, no vector and no text, a text that is
    not a ``str`` or a bad ``k``."""
    unknown = sorted(set(options) - QUERY_OPTIONS)
    if unknown:
        raise InvalidParameterError(f"unknown search options {unknown}")
    if vector is None and text is None:
        raise InvalidParameterError("a query needs an embedding, a text or both")
    if text is not None and not isinstance(text, str):
        raise InvalidParameterError(f"the query text must be a str, got {type(text).__name__}")
    given = {key: value for key, value in options.items() if value is not None}
    query_options({key: given[key] for key in ("fusion", "alpha") if key in given})
    if text is None or vector is None:
        given.pop("fusion", None), given.pop("alpha", None)  # checked, but nothing to fuse
    return {
        "vector": vector,
        "text": text,
        "k": check_k(k),
        "probes": probes,
        "rerank_factor": rerank_factor,
        **given,
        "filter": user_filter(given.get("filter")),
    }


def vector_only(args: dict[str, Any]) -> dict[str, Any]:
    """``ClusteredIndex.search``'s arguments of the vector query :func:`query_args` made."""
    out = {("query" if key == "vector" else key): value for key, value in args.items()}
    del out["text"]
    return out


def vector_args(
    vector: Any, k: int, options: dict[str, Any], probes: int | None, rerank_factor: int | None
) -> dict[str, Any]:
    """``ClusteredIndex.search``'s arguments for a store's vector search."""
    return vector_only(query_args(vector, None, k, options, probes, rerank_factor))


def records_of(hits: list[Hit]) -> list[Record]:
    """The records of ``hits``, those deleted since the search (no document) left out."""
    return [
        record(h.metadata, math.nan if h.distance is None else h.distance, h.score)
        for h in hits
        if h.metadata is not None
    ]
