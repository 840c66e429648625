"""Hybrid queries (vector + text, fused) and the durability of the text index.

The fusion is checked against a reference computed here from ``search`` and SQLite's BM25;
the text index against every kind of write: add, upsert, delete, log replay at open,
checkpoint, compaction.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_query import corpus

import vectordb as vdb
from vectordb.core.fusion import RRF_K, rrf, weighted
from vectordb.index.query import depth


def test_rrf_and_weighted_fusion_by_hand():
    ids, scores = rrf([np.array([1, 2, 3]), np.array([3, 4, 1])], 10)
    want = {1: 1 / 61 + 1 / 63, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 62}
    assert ids.tolist() == [1, 3, 2, 4]  # ties keep their first appearance
    assert scores.tolist() == pytest.approx([want[i] for i in ids.tolist()])
    v = (np.array([1, 2]), np.array([-1.0, -3.0]))
    t = (np.array([2, 5]), np.array([8.0, 2.0]))
    ids, scores = weighted(v, t, 0.25, 3)
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx(
        {1: 0.25, 2: 0.75, 5: 0.0}
    )
    assert weighted(v, t, 1.0, 1)[0].tolist() == [1]
    assert RRF_K == 60 and depth(10) == 50 and depth(20) == 80


@pytest.fixture(scope="module")
def built():
    x, docs = corpus(800, seed=3)
    index = vdb.ClusteredIndex.build(x, metadata=docs, text_field="text", max_leaf_size=80)
    return index, x, docs


@pytest.mark.parametrize("filt", [None, {"g": 2}])
def test_hybrid_rrf_is_the_fusion_of_both_sides(built, filt):
    index, x, _ = built
    k = 10
    n = depth(k)
    ids, _ = index.search(x[11], n, filter=filt)
    text = [h.id for h in index.query(text="cherry kettle", k=n, filter=filt)]
    want = {}
    for ranked in (ids[ids >= 0].tolist(), text):
        for r, i in enumerate(ranked, 1):
            want[i] = want.get(i, 0) + 1 / (60 + r)
    hits = index.query(x[11], text="cherry kettle", k=k, filter=filt, fusion="rrf")
    assert [h.score for h in hits] == pytest.approx(sorted(want.values(), reverse=True)[:k])
    assert all(want[h.id] == pytest.approx(h.score) for h in hits)
    near = set(index.search(x[11], n, filter=filt)[0].tolist())
    for h in hits:
        assert (h.distance is None) == (h.id not in near)
        if filt:
            assert h.metadata["g"] == 2


@pytest.mark.parametrize("filt", [None, {"g": 1}])
def test_hybrid_default_is_weighted_half_and_half(built, filt):
    index, x, _ = built
    k, n = 10, depth(10)
    ids, dists = index.search(x[4], n, filter=filt)
    vec = dict(
        zip(ids[ids >= 0].tolist(), (-dists[ids >= 0].astype(np.float64)).tolist(), strict=True)
    )
    txt = {h.id: h.score for h in index.query(text="apple delta", k=n, filter=filt)}
    want = {}
    for side in (vec, txt):
        low, high = min(side.values()), max(side.values())
        for i, s in side.items():
            want[i] = want.get(i, 0) + 0.5 * ((s - low) / (high - low) if high > low else 1.0)
    hits = index.query(x[4], text="apple delta", k=k, filter=filt)
    assert hits == index.query(
        x[4], text="apple delta", k=k, filter=filt, fusion="weighted", alpha=0.5
    )
    assert [h.score for h in hits] == pytest.approx(sorted(want.values(), reverse=True)[:k])
    assert all(want[h.id] == pytest.approx(h.score) for h in hits)


def test_weighted_alpha_ends_are_each_side_alone(built):
    index, x, _ = built
    vec = [h.id for h in index.query(x[2], k=5)]
    txt = [h.id for h in index.query(text="grape", k=5)]
    assert [h.id for h in index.query(x[2], text="grape", k=5, fusion="weighted", alpha=1.0)][
        :1
    ] == vec[:1]
    top = index.query(x[2], text="grape", k=5, fusion="weighted", alpha=0.0)
    assert top[0].score == pytest.approx(1.0) and top[0].id in txt


def test_text_index_follows_upsert_delete_and_compact(built):
    _, x, docs = built
    index = vdb.ClusteredIndex.build(x, metadata=docs, text_field="text", max_leaf_size=80)
    index.add(x[:1] + 0.5, ids=[5000], metadata=[{"text": "zebra quagga"}])
    assert [h.id for h in index.query(text="zebra", k=3)] == [5000]
    index.upsert(x[:1], ids=[5000], metadata=[{"text": "okapi"}])
    assert index.query(text="zebra", k=3) == [] and index.query(text="okapi", k=3)[0].id == 5000
    index.upsert(x[:1], ids=[5000], metadata=[{"text": 42}])  # not a string: not indexed
    assert index.query(text="okapi", k=3) == []
    index.upsert(x[:1], ids=[5000], metadata=[{"text": "okapi again"}])
    index.delete([5000, 7])
    assert index.query(text="okapi", k=3) == []
    assert 7 not in [h.id for h in index.query(text=docs[7]["text"], k=800)]
    before = index.query(text="apple lemon", k=20)
    index.compact()
    assert index.query(text="apple lemon", k=20) == before


def test_text_index_survives_log_replay_checkpoint_and_reopen(tmp_path):
    x, docs = corpus(200, seed=5)
    path = tmp_path / "idx"
    index = vdb.ClusteredIndex.create(path, dim=16, text_field="text")
    index.add(x[:150], metadata=docs[:150])
    index.checkpoint()
    index.add(x[150:], ids=np.arange(150, 200), metadata=docs[150:])
    index.add(x[:1], ids=[999], metadata=[{"text": "walrus"}])
    index.delete([3])
    want = index.query(x[0], text="walrus banana", k=10)
    index.close()  # no checkpoint: the last writes are in the log only
    again = vdb.ClusteredIndex.open(path)
    assert again.params["text_field"] == "text"
    assert again.query(text="walrus", k=2)[0].id == 999
    assert 3 not in [h.id for h in again.query(text=docs[3]["text"], k=200)]
    assert again.query(x[0], text="walrus banana", k=10) == want
    again.checkpoint()
    again.close()
    third = vdb.ClusteredIndex.open(path, mmap=False)
    assert third.query(x[0], text="walrus banana", k=10) == want
    third.close()


def test_saved_metadata_file_holds_no_fts_objects(tmp_path):
    import sqlite3

    x, docs = corpus(100)
    vdb.ClusteredIndex.build(x, metadata=docs, text_field="text").save(tmp_path / "s")
    db = sqlite3.connect(tmp_path / "s" / "metadata.sqlite")
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("meta",)]
    db.close()
    opened = vdb.ClusteredIndex.open(tmp_path / "s")
    assert opened.query(text="apple", k=1)
    opened.close()


def test_a_manifest_with_a_bad_text_field_is_refused(tmp_path):
    import json

    from vectordb.storage.format import sign_manifest

    x, docs = corpus(60)
    vdb.ClusteredIndex.build(x, metadata=docs, text_field="text").save(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["params"]["text_field"] = "x') ; DROP TABLE meta; --"
    manifest.write_bytes(sign_manifest(data))  # signed: the params check itself refuses it
    with pytest.raises(vdb.InvalidIndexFileError, match="text_field"):
        vdb.ClusteredIndex.open(tmp_path / "s")


def test_missing_fts5_is_a_clear_error(monkeypatch):
    import sqlite3
    import types

    from vectordb.storage import fulltext

    class NoFts5:
        def execute(self, sql):
            raise sqlite3.OperationalError("no such module: fts5")

        def close(self):
            pass

    fake = types.SimpleNamespace(
        connect=lambda *a: NoFts5(), OperationalError=sqlite3.OperationalError, sqlite_version="x"
    )
    with monkeypatch.context() as m:
        m.setattr(fulltext, "sqlite3", fake)
        with pytest.raises(vdb.BackendUnavailableError, match="FTS5"):
            fulltext.require_fts5()

    def no_fts5():
        raise vdb.BackendUnavailableError("text search needs SQLite's FTS5")

    monkeypatch.setattr(fulltext, "require_fts5", no_fts5)
    x, docs = corpus(20)
    with pytest.raises(vdb.BackendUnavailableError, match="FTS5"):
        vdb.ClusteredIndex.build(x, metadata=docs, text_field="text")
