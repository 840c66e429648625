"""Full-text search over one string field of the metadata: SQLite FTS5, ranked by BM25.

The index lives beside the documents in the metadata store's in-memory database, in its
``temp`` schema: an external-content FTS5 table ``fts`` (tokenizer ``porter unicode61``:
case- and accent-folded words, English stems) whose content is the view ``fts_source``
``(id, body)``, the documents whose field is a JSON string. ``save`` copies the ``main``
schema only, so ``metadata.sqlite`` never holds FTS objects and its load checks stay
exactly as strict; ``load`` (any open) rebuilds the FTS index from the documents (about a
second for 110,000 sentences, measured in ``bench/results/2026-12-02-retrieval``).

Writes keep it in step: the caller runs :data:`REMOVE` before it changes or deletes
documents and :data:`INSERT` after it wrote them, in the same transaction (external
content needs the old text to remove a row). A document whose field is missing or not a
string is not indexed.

User text never reaches FTS5's query syntax: :func:`match_query` keeps its words
(``\\w+``), at most :data:`MAX_QUERY_TOKENS` distinct ones, each a quoted string, OR-ed.
The store searches fewer: :mod:`vectordb.storage.commonwords` leaves out the common ones.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from .._validation import check_text_field
from ..errors import BackendUnavailableError, InvalidParameterError

__all__ = [
    "INSERT",
    "MAX_QUERY_TOKENS",
    "REMOVE",
    "create_fulltext",
    "match_common_terms",
    "match_query",
    "match_words",
    "query_words",
    "require_fts5",
    "search_sql",
]

#: Distinct words of a text query that are searched (the rest are ignored).
MAX_QUERY_TOKENS = 64
_WORD = re.compile(r"\w+")
#: Rows of ``fts`` to remove, from the documents as they still are (one JSON array of ids).
REMOVE = (
    "INSERT INTO temp.fts (fts, rowid, body) SELECT 'delete', id, body FROM temp.fts_source"
    " WHERE id IN (SELECT value FROM json_each(?))"
)
#: Rows of ``fts`` to add, from the documents as written (one JSON array of ids).
INSERT = (
    "INSERT INTO temp.fts (rowid, body) SELECT id, body FROM temp.fts_source"
    " WHERE id IN (SELECT value FROM json_each(?))"
)


def require_fts5() -> None:
    """``BackendUnavailableError`` unless Python's SQLite was compiled with FTS5."""
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("CREATE VIRTUAL TABLE temp.probe USING fts5(body)")
    except sqlite3.OperationalError as exc:
        raise BackendUnavailableError(
            f"text search needs SQLite's FTS5 extension, which this Python's sqlite3"
            f" (SQLite {sqlite3.sqlite_version}) lacks ({exc})"
        ) from None
    finally:
        probe.close()


def create_fulltext(db: sqlite3.Connection, field: str) -> None:
    """Create the ``temp`` objects of the module docstring on ``db`` (whose ``main`` holds
    ``meta``) for the checked ``field``, and index every document now there."""
    path = f'$."{check_text_field(field)}"'
    require_fts5()
    with db:
        db.execute(
            "CREATE TEMP VIEW fts_source AS SELECT id, json_extract(doc, ?1) AS body"
            " FROM main.meta WHERE json_type(doc, ?1) = 'text'".replace("?1", f"'{path}'")
        )
        db.execute(
            "CREATE VIRTUAL TABLE temp.fts USING fts5(body, content='fts_source',"
            " content_rowid='id', tokenize='porter unicode61')"
        )
        db.execute("INSERT INTO temp.fts (fts) VALUES ('rebuild')")


def query_words(text: Any) -> list[str]:
    """The distinct words (``\\w+``, lowercased) of the user's ``text``, the first
    :data:`MAX_QUERY_TOKENS`, in order. ``InvalidParameterError`` unless it is a ``str``."""
    if not isinstance(text, str):
        raise InvalidParameterError(f"text must be a str, got {type(text).__name__}")
    words: dict[str, None] = {}
    for m in _WORD.finditer(text):
        words.setdefault(m.group().lower(), None)
        if len(words) == MAX_QUERY_TOKENS:
            break
    return list(words)


def match_words(words: list[str]) -> str | None:
    """A safe FTS5 query of ``words``: each quoted, OR-ed; ``None`` for none (it matches
    nothing)."""
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def match_common_terms(rare: list[str], common: list[str]) -> list[str]:
    """Safe FTS5 queries that find the documents holding a ``rare`` word, scored by BM25
    over every word, ``common`` ones too (Lucene's ``CommonTermsQuery``): those that hold
    a common word (``rare AND common``: FTS5 seeks the common words' lists at the rare
    matches, never scans them) and those that hold none (``rare NOT common``, where the
    common words add 0). One query without common words; none without rare ones."""
    r, c = match_words(rare), match_words(common)
    if r is None:
        return []
    return [r] if c is None else [f"({r}) AND ({c})", f"({r}) NOT ({c})"]


def match_query(text: Any) -> str | None:
    """:func:`match_words` of :func:`query_words` (all the words, none left out)."""
    return match_words(query_words(text))


def search_sql(where: str) -> str:
    """The query of the best matches (``rowid``, ``rank`` = ``bm25()``, lower is better) of
    the parameters ``(match, *where's, limit)``; ``where``, if not empty, a condition on
    the match's document ``meta.doc`` (``meta`` joined by id, so that a filter is tested on
    the text's matches only) or its id ``fts.rowid``."""
    if not where:
        return "SELECT rowid, rank FROM temp.fts WHERE fts MATCH ? ORDER BY rank LIMIT ?"
    return (
        "SELECT fts.rowid, fts.rank FROM temp.fts JOIN main.meta ON meta.id = fts.rowid"
        f" WHERE fts MATCH ? AND ({where}) ORDER BY fts.rank LIMIT ?"
    )
