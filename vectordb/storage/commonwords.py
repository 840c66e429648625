"""Common words of a text query: they rank the documents the rare words find, and find
none themselves. What keeps BM25 over OR-ed words cheap.

A text query's words are OR-ed (:func:`vectordb.storage.fulltext.match_query`), and FTS5
scores every document that matches any of them before its ``ORDER BY rank LIMIT``: a
sentence's "the", "a", "is" match most documents, and the query costs a scan of them all
(about 1 us a matching document: ~80 ms over 110,000 sentences).

The rule
--------
A word is *common* when its document frequency ``df`` (the documents holding its stem)
exceeds both :data:`COMMON_FRACTION` of the indexed documents and :data:`MIN_COMMON_DOCS`;
the others are *rare*. As Lucene's ``CommonTermsQuery`` does, the documents searched are
those that hold a rare word, and they are ranked by BM25 over every word, the common ones
too (:func:`vectordb.storage.fulltext.match_common_terms`: ``rare AND common`` plus ``rare
NOT common``, whose merged ranks are those of the whole query, as both score all its
words). FTS5 seeks the common words' document lists at the rare words' matches instead of
reading them all. If every word is common, the rarest is taken as rare. Words that no
document holds are left out (they change no score). A small index (fewer than
:data:`MIN_COMMON_DOCS` documents) is never split.

What changes: a document that holds only common words is not found (BM25 ranks it low:
the IDF ``log((n - df + 0.5) / (df + 0.5))`` of a word in 2% of the documents is 3.9,
against 9-11 for the rare words that make a match specific). Measured on 110,000
sentences (``bench/results/2026-12-02-retrieval``): the top 10 of their own sentence
queries overlap the full query's by 0.99, at ~15 ms against ~90 ms; leaving the common
words out altogether instead was faster (~2 ms at 1%) but changed the ranking (overlap
0.44) and lost text recall on the labelled glossary set (0.062 against 0.102).

A word is a FTS5 phrase of one or more tokens (``is_open`` is ``is`` then ``open``); its
``df`` is taken as that of its rarest token (it can match no more documents than that).
Stems come from the index's own tokenizer (``porter unicode61``), exactly: the words are
tokenized through a scratch contentless FTS5 table and read back from its ``instance``
vocabulary; document frequencies from the ``row`` vocabulary of ``temp.fts``.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["COMMON_FRACTION", "MIN_COMMON_DOCS", "CommonWords", "create_scratch"]

#: A word in more than this fraction of the indexed documents (and in more than
#: MIN_COMMON_DOCS of them) is common: it ranks documents, finds none.
COMMON_FRACTION = 0.02
#: No word in at most this many documents is left out (scanning them is cheap).
MIN_COMMON_DOCS = 1000
#: Words whose stems are remembered (the stemmer is a pure function of the word).
_STEM_CACHE = 8192
#: Stems whose document frequencies are remembered, until the documents change.
_DF_CACHE = 65536


def create_scratch(db: sqlite3.Connection) -> None:
    """Create, on ``db`` whose ``temp.fts`` exists, the vocabulary of ``temp.fts`` and
    the scratch table that stems words (in ``temp``, so never saved)."""
    db.execute("CREATE VIRTUAL TABLE temp.fts_rows USING fts5vocab('temp', 'fts', 'row')")
    db.execute(
        "CREATE VIRTUAL TABLE temp.fts_words USING fts5(body, content='',"
        " tokenize='porter unicode61')"
    )
    db.execute(
        "CREATE VIRTUAL TABLE temp.fts_words_i USING fts5vocab('temp', 'fts_words', 'instance')"
    )


class CommonWords:
    """The rule of the module docstring over ``db`` (after :func:`create_scratch`). Not
    thread-safe: its caller holds the lock of ``db``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._stems: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._df: dict[str, int] = {}
        self._docs = 0
        self._version = -1

    def split(self, words: Sequence[str], version: int) -> tuple[list[str], list[str]]:
        """The ``words`` (lowercase, as :func:`~vectordb.storage.fulltext.query_words`
        returns them) that some document holds, as ``(rare, common)``, each in their order
        (``rare`` empty only if ``common`` is); ``version`` the documents' change count
        (:attr:`MetadataStore.version`), which keys the document frequencies."""
        if version != self._version:
            self._df.clear()
            self._docs = int(
                self._db.execute("SELECT count(*) FROM temp.fts_docsize").fetchone()[0]
            )
            self._version = version
        limit = max(COMMON_FRACTION * self._docs, MIN_COMMON_DOCS)
        stems = self._stemmed(words)
        df = self._frequencies({s for ss in stems for s in ss})
        common: list[tuple[int, str]] = []
        out = []
        for word, ss in zip(words, stems, strict=True):
            n = min((df[s] for s in ss), default=0)
            if n == 0:
                continue  # matches nothing
            if n > limit:
                common.append((n, word))
            else:
                out.append(word)
        if not out and common:
            out.append(min(common)[1])
        return out, [w for _, w in common if w not in out]

    def _stemmed(self, words: Sequence[str]) -> list[tuple[str, ...]]:
        """The tokens of each word, in order (none for one of separators only)."""
        todo = [w for w in dict.fromkeys(words) if w not in self._stems]
        if todo:
            with self._db:
                self._db.executemany(
                    "INSERT INTO temp.fts_words (rowid, body) VALUES (?, ?)", enumerate(todo)
                )
                rows = self._db.execute(
                    "SELECT doc, term FROM temp.fts_words_i ORDER BY doc, offset"
                ).fetchall()
                self._db.execute("INSERT INTO temp.fts_words (fts_words) VALUES ('delete-all')")
            tokens: list[list[str]] = [[] for _ in todo]
            for doc, term in rows:
                tokens[doc].append(term)
            for word, got in zip(todo, tokens, strict=True):
                self._stems[word] = tuple(got)
        for word in words:
            self._stems.move_to_end(word)
        while len(self._stems) > _STEM_CACHE:
            self._stems.popitem(last=False)
        return [self._stems[w] for w in words]

    def _frequencies(self, stems: set[str]) -> dict[str, int]:
        """``df`` of each stem (0 for one no document holds)."""
        if len(self._df) + len(stems) > _DF_CACHE:
            self._df.clear()
        todo = [s for s in stems if s not in self._df]
        for stem in todo:
            row = self._db.execute(
                "SELECT doc FROM temp.fts_rows WHERE term = ?", (stem,)
            ).fetchone()
            self._df[stem] = 0 if row is None else int(row[0])
        return {s: self._df[s] for s in stems}
