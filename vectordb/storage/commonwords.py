"""Common words left out of a text query's match: what keeps BM25 over OR-ed words cheap.

A text query's words are OR-ed (:func:`vectordb.storage.fulltext.match_query`), and FTS5
scores every document that matches any of them before its ``ORDER BY rank LIMIT``: a
sentence's "the", "a", "is" match most documents, and the query costs a scan of them all
(about 1 us a matching document: ~80 ms over 110,000 sentences).

The rule
--------
A word is *common* when its document frequency ``df`` (the documents holding its stem)
exceeds both :data:`COMMON_FRACTION` of the indexed documents and :data:`MIN_COMMON_DOCS`.
Common words are left out of the match, unless that leaves no word: then only the
rarest of them is searched. Words that no document holds are left out too (they change
no score). So the documents scanned are those of the rare words, at most
``max(COMMON_FRACTION * n, MIN_COMMON_DOCS)`` per word, and a small index (fewer than
:data:`MIN_COMMON_DOCS` documents) is never pruned.

This is what Lucene's ``CommonTermsQuery`` does with its high-frequency terms, less their
scoring of the rare words' matches (FTS5 would need a scan of each common word's documents
to weigh it, the cost this avoids). The ranking changes little where it matters: BM25's
IDF ``log((n - df + 0.5) / (df + 0.5))`` of a word in 5% of the documents is 2.9, against
9-11 for the rare words that make a match specific, and FTS5 clamps it to ~0 above half;
a document that matched only common words, and that BM25 would have ranked low, is no
longer found.

Why 5%: on the labelled glossary set among 110,000 sentences
(``bench/results/2026-12-02-retrieval``), text recall@10 and the hybrid rows are those of
the full query at 5% and 20%, and fall at 2% (0.094 against 0.102) and 1% (0.062); on the
110,000 sentences' own sentence queries the text side then takes ~12 ms, against ~90 ms
with every word and ~2 ms at 1%.

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
#: MIN_COMMON_DOCS of them) is left out of the match.
COMMON_FRACTION = 0.05
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

    def kept(self, words: Sequence[str], version: int) -> list[str]:
        """The ``words`` (lowercase, as :func:`~vectordb.storage.fulltext.query_words`
        returns them) to search, in their order; ``version`` the documents' change count
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
        rarest: list[tuple[int, str]] = []
        out = []
        for word, ss in zip(words, stems, strict=True):
            n = min((df[s] for s in ss), default=0)
            if n == 0:
                continue  # matches nothing
            if n > limit:
                rarest.append((n, word))
            else:
                out.append(word)
        if not out and rarest:
            out.append(min(rarest)[1])
        return out

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
