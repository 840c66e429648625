"""A living index: ids, add / upsert / delete, metadata filters, compaction, persistence."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage.format import VECTORS

K = 10
DIM = 128  # codes (leaf_scan="auto" picks codes from 128 dimensions)


def true_ids(vectors: dict[int, np.ndarray], q: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Brute force over the live set: (ids by distance, sorted squared distances), float64."""
    ids = np.array(sorted(vectors), dtype=np.int64)
    x = np.stack([vectors[int(i)] for i in ids]).astype(np.float64)
    d = ((x - q.astype(np.float64)) ** 2).sum(axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return ids[order].tolist(), d[order]


def assert_exact(index: vdb.ClusteredIndex, live: dict[int, np.ndarray], queries: np.ndarray):
    exact = {"probes": 10_000, "rerank_factor": max(1, -(-len(live) // K))}
    ids, dists = index.search_batch(queries, K, **exact)
    for q, got_ids, got_d in zip(queries, ids, dists, strict=True):
        _, want_d = true_ids(live, q, K)
        n = min(K, len(live))
        assert (got_ids[n:] == -1).all()
        np.testing.assert_allclose(got_d[:n], want_d[:n], rtol=1e-4, atol=1e-3)
        assert set(got_ids[:n].tolist()) <= set(live)
        # ties aside, the same ids
        limit = want_d[n - 1] * (1 + 1e-4) + 1e-3
        assert all(np.sum((live[int(i)] - q) ** 2) <= limit for i in got_ids[:n])


@pytest.fixture(scope="module")
def pool():
    return vdb.make_clustered(6_000, DIM, seed=3)


@pytest.mark.parametrize("mode", ["ram", "mmap"])
def test_random_add_delete_upsert_against_brute_force(pool, mode, tmp_path):
    rng = np.random.default_rng(7)
    start = 1_500
    ids = rng.permutation(100_000)[:start] * 3 + 5  # sparse, unordered external ids
    live = {int(i): pool[j] for j, i in enumerate(ids)}
    index = vdb.ClusteredIndex.build(pool[:start], ids=ids, max_leaf_size=100)
    if mode == "mmap":
        index.use_mmap_storage(tmp_path / "v.f32")
    cursor = start
    queries = pool[-20:] + 0.01
    for step in range(12):
        action = step % 3
        if action == 0:  # add a batch with assigned ids
            n = int(rng.integers(1, 300))
            new = index.add(pool[cursor : cursor + n])
            assert len(set(new.tolist()) & set(live)) == 0
            live.update({int(i): pool[cursor + j] for j, i in enumerate(new)})
            cursor += n
        elif action == 1:  # delete some
            gone = rng.choice(np.array(sorted(live)), size=int(rng.integers(1, 200)), replace=False)
            assert index.delete(gone) == len(gone)
            for i in gone:
                del live[int(i)]
        else:  # upsert: replace some, add some
            old = rng.choice(np.array(sorted(live)), size=50, replace=False)
            fresh = np.arange(50) + 10_000_000 + step * 100
            targets = np.concatenate([old, fresh])
            index.upsert(pool[cursor : cursor + 100], targets)
            live.update({int(i): pool[cursor + j] for j, i in enumerate(targets)})
            cursor += 100
        assert len(index) == len(live)
        assert sorted(index.ids.tolist()) == sorted(live)
        assert_exact(index, live, queries)
        found, _ = index.search_batch(queries, K)  # default parameters: only live ids
        assert set(found[found >= 0].tolist()) <= set(live)
    index.compact()
    assert_exact(index, live, queries)
    index.save(tmp_path / "saved")
    with vdb.ClusteredIndex.open(tmp_path / "saved", mmap=True, verify=True) as reopened:
        assert len(reopened) == len(live)
        assert_exact(reopened, live, queries)
    index.close()


def recall(index, queries, truth):
    ids, _ = index.search_batch(queries, K)
    return np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)])


def test_recall_after_half_the_data_was_added_incrementally(pool):
    data, queries = pool[:5_000], pool[5_000:5_200]
    d = ((queries[:, None, :] - data[None]) ** 2).sum(-1)
    truth = np.argsort(d, axis=1)[:, :K]
    fresh = vdb.ClusteredIndex.build(data, max_leaf_size=200)
    grown = vdb.ClusteredIndex.build(data[:2_500], max_leaf_size=200)
    for start in range(2_500, 5_000, 250):
        grown.add(data[start : start + 250], ids=np.arange(start, start + 250))
    r_fresh, r_grown = recall(fresh, queries, truth), recall(grown, queries, truth)
    assert r_grown >= r_fresh - 0.02, (r_fresh, r_grown)


@pytest.fixture(scope="module")
def tagged(pool):
    n = 4_000
    meta = [
        {"user": ["ann", "bob", "cid", "dee"][i % 4], "ts": i, "rare": i % 250 == 0}
        for i in range(n)
    ]
    index = vdb.ClusteredIndex.build(pool[:n], metadata=meta, max_leaf_size=200)
    return index, pool[:n], meta


def brute_filtered(x, meta, q, pred, k):
    rows = np.array([i for i, m in enumerate(meta) if pred(m)], dtype=np.int64)
    d = ((x[rows] - q) ** 2).sum(axis=1)
    return rows[np.argsort(d)[:k]].tolist(), np.sort(d)[:k]


@pytest.mark.parametrize(
    ("filt", "pred"),
    [
        ({"user": "ann"}, lambda m: m["user"] == "ann"),
        ({"user": {"$in": ["bob", "dee"]}}, lambda m: m["user"] in ("bob", "dee")),
        ({"ts": {"$gte": 1000, "$lt": 1400}}, lambda m: 1000 <= m["ts"] < 1400),
        ({"user": "cid", "ts": {"$gt": 3000}}, lambda m: m["user"] == "cid" and m["ts"] > 3000),
        ({"rare": True}, lambda m: m["rare"]),  # 16 of 4,000 rows: 0.4%
        (
            {"user": {"$nin": ["ann"]}, "ts": {"$ne": 5}},
            lambda m: m["user"] != "ann" and m["ts"] != 5,
        ),
        (lambda m: m["ts"] % 7 == 0, lambda m: m["ts"] % 7 == 0),
    ],
)
def test_filters_return_only_matches_and_k_of_them(tagged, pool, filt, pred):
    index, x, meta = tagged
    queries = pool[-30:]
    ids, _ = index.search_batch(queries, K, filter=filt)
    exact_ids, exact_d = index.search_batch(
        queries, K, filter=filt, probes=10_000, rerank_factor=500
    )
    hits = 0
    for q, got, got_exact, d_exact in zip(queries, ids, exact_ids, exact_d, strict=True):
        want, want_d = brute_filtered(x, meta, q, pred, K)
        assert (got >= 0).sum() == min(K, len(want)) == (got_exact >= 0).sum()  # k when k exist
        assert all(pred(meta[i]) for i in got[got >= 0])
        np.testing.assert_allclose(d_exact[: len(want)], want_d, rtol=1e-4, atol=1e-3)
        hits += len(set(got.tolist()) & set(want))
    assert hits / (len(queries) * min(K, len(want))) >= 0.8


def test_filter_matching_nothing_and_bad_filters(tagged, pool):
    index, _, _ = tagged
    ids, dists = index.search(pool[-1], K, filter={"user": "nobody"})
    assert (ids == -1).all() and np.isinf(dists).all()
    for bad, match in [
        ({"ts": {"$regex": "x"}}, "unknown operator"),
        ({"ts": {"$in": 3}}, "needs a list"),
        ({'a"b': 1}, "quotes"),
        ({"ts": [1, 2]}, "filter values"),
        ({"ts": {"$gt": None}}, "None"),
        ("user=ann", "dict of conditions"),
    ]:
        with pytest.raises(vdb.InvalidParameterError, match=match):
            index.search(pool[-1], K, filter=bad)


def test_metadata_round_trip_and_updates(pool, tmp_path):
    index = vdb.ClusteredIndex.build(pool[:500], ids=np.arange(500) + 1000, max_leaf_size=100)
    new = index.add(pool[500:502], ids=[7, 8], metadata=[{"user": "ann", "ts": 1}, None])
    assert new.tolist() == [7, 8]
    assert index.get_metadata(7) == {"user": "ann", "ts": 1}
    assert index.get_metadata(8) is None and index.get_metadata(1000) is None
    index.upsert(pool[502:503], ids=[7])  # no metadata given: kept
    assert index.get_metadata(7) == {"user": "ann", "ts": 1}
    index.upsert(pool[503:504], ids=[7], metadata=[{"user": "bob"}])
    assert index.get_metadata(7) == {"user": "bob"}
    ids, _ = index.search(pool[503], 1, filter={"user": "bob"})
    assert ids.tolist() == [7]
    index.save(tmp_path / "i")
    with vdb.ClusteredIndex.open(tmp_path / "i") as reopened:
        assert reopened.get_metadata(7) == {"user": "bob"}
        assert sorted(reopened.ids.tolist()) == sorted(index.ids.tolist())
    index.delete([7])
    with pytest.raises(vdb.UnknownIdError, match="7"):
        index.get_metadata(7)
    assert 7 not in index and 8 in index


def test_write_errors(pool):
    index = vdb.ClusteredIndex.build(pool[:300], max_leaf_size=100)
    with pytest.raises(vdb.DuplicateIdError, match="upsert"):
        index.add(pool[:2], ids=[5, 100_000])
    with pytest.raises(vdb.DuplicateIdError, match="twice"):
        index.add(pool[:2], ids=[9_000, 9_000])
    with pytest.raises(vdb.InvalidParameterError, match=">= 0"):
        index.add(pool[:1], ids=[-3])
    with pytest.raises(vdb.InvalidParameterError, match="2 ids for 1"):
        index.add(pool[:1], ids=[1_000, 1_001])
    with pytest.raises(vdb.InvalidParameterError, match="metadata"):
        index.add(pool[:2], metadata=[{"a": 1}])
    with pytest.raises(vdb.InvalidParameterError, match="JSON"):
        index.add(pool[:1], metadata=[{"a": object()}])
    with pytest.raises(vdb.DimensionMismatchError):
        index.add(np.zeros((1, 3)))
    with pytest.raises(vdb.UnknownIdError, match="12345"):
        index.delete([12345])
    assert index.delete([12345], missing_ok=True) == 0
    with pytest.raises(vdb.InvalidParameterError, match="upsert needs ids"):
        index.upsert(pool[:1], None)
    assert len(index) == 300  # nothing half-done by the failures
    assert isinstance(vdb.UnknownIdError("x"), KeyError)


def test_adding_to_an_opened_mmap_index_leaves_its_files_intact(pool, tmp_path):
    vdb.ClusteredIndex.build(pool[:1_000], max_leaf_size=100).save(tmp_path / "i")
    before = (tmp_path / "i" / VECTORS).read_bytes()
    with vdb.ClusteredIndex.open(tmp_path / "i", mmap=True) as index:
        index.add(pool[1_000:1_300])
        index.delete(np.arange(100))
        assert (tmp_path / "i" / VECTORS).read_bytes() == before
        vdb.ClusteredIndex.open(tmp_path / "i", verify=True).close()  # still the old index
        ids, _ = index.search(pool[1_200], 1)
        assert ids[0] == 1_200
        index.save(tmp_path / "i")  # now the directory holds the new version
    with vdb.ClusteredIndex.open(tmp_path / "i", verify=True) as again:
        assert len(again) == 1_200 and again.search(pool[1_200], 1)[0][0] == 1_200
    assert [p.name for p in (tmp_path / "i").iterdir() if p.name.startswith(".")] == []


def test_compact_reclaims_deleted_rows_and_keeps_answers(pool, tmp_path):
    index = vdb.ClusteredIndex.build(pool[:2_000], max_leaf_size=200)
    index.add(pool[2_000:3_000])
    index.delete(np.arange(0, 3_000, 3))
    queries = pool[-10:]
    exact = {"probes": 10_000, "rerank_factor": 300}
    want = index.search_batch(queries, K, **exact)
    ram_before = index.memory_usage_bytes()
    index.compact()
    got = index.search_batch(queries, K, **exact)
    np.testing.assert_array_equal(got[0], want[0])
    assert index.memory_usage_bytes() < ram_before
    index.use_mmap_storage(tmp_path / "v.f32")
    index.add(pool[3_000:3_100])
    index.compact()  # mmap: a fresh working file beside the mapped one
    assert index.search(pool[3_050], 1)[0][0] == 3_050
    index.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.f32"]


@pytest.mark.asyncio
async def test_engine_writes_while_searching(pool):
    """A search sees the index before or after each write: never an id deleted before it
    began nor one added after it ended, and every distance the exact one of its id."""
    index = vdb.ClusteredIndex.build(pool[:2_000], max_leaf_size=200)
    rng = np.random.default_rng(5)
    doomed = [np.arange(start - 2_000, start - 1_900) for start in range(2_000, 4_000, 250)]
    # Queries next to vectors that get deleted, and next to vectors that get added.
    near = np.concatenate([[d[7], d[50], d[93]] for d in doomed] + [np.arange(2_010, 4_000, 80)])
    queries = (pool[near] + rng.normal(0, 0.01, (near.shape[0], DIM))).astype(np.float32)
    true = ((queries[:, None, :].astype(np.float64) - pool[None, :4_000]) ** 2).sum(-1)
    live = set(range(2_000))
    gone: set[int] = set()  # deleted, the delete acknowledged
    issued = [2_000]  # ids below this may exist
    checked = [0]

    async def reader():
        for _ in range(20):
            before = np.array(sorted(gone), dtype=np.int64)
            results = await asyncio.gather(*(engine.search(q, K) for q in queries))
            for row, (ids, dists) in enumerate(results):
                assert (ids >= 0).all() and (ids < issued[0]).all(), "an id not yet added"
                assert not np.isin(ids, before).any(), "an id deleted before the search began"
                assert np.unique(ids).size == K and (np.diff(dists) >= 0).all()
                np.testing.assert_allclose(dists, true[row, ids], rtol=1e-4, atol=1e-3)
                checked[0] += 1

    async with vdb.AsyncEngine(index) as engine:
        task = asyncio.ensure_future(reader())
        for step, start in enumerate(range(2_000, 4_000, 250)):
            issued[0] = start + 250
            await engine.add(pool[start : start + 250], ids=np.arange(start, start + 250))
            live |= set(range(start, start + 250))
            await engine.delete(doomed[step])
            live -= set(doomed[step].tolist())
            gone.update(doomed[step].tolist())
            await asyncio.sleep(0)  # let the reader in between writes
        await task
        await engine.compact()
        ids, _ = await engine.search(pool[3_999], 1)
        assert ids.tolist() == [3_999]
        got = await engine.search_batch(queries, K, filter=None)
        assert set(got[0][got[0] >= 0].tolist()) <= live
    assert checked[0] == 20 * len(queries)
    assert sorted(index.ids.tolist()) == sorted(live)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_leaf_that_outgrows_twice_max_leaf_size_splits_locally(pool, metric, tmp_path):
    index = vdb.ClusteredIndex.build(pool[:600], max_leaf_size=50, metric=metric)
    leaves_before = index.n_leaves
    # 600 new vectors around one existing vector: they all land in (about) one leaf.
    rng = np.random.default_rng(2)
    burst = (pool[7] + 0.05 * rng.standard_normal((600, DIM))).astype(np.float32)
    for start in range(0, 600, 50):
        index.add(burst[start : start + 50], ids=np.arange(10_000 + start, 10_050 + start))
        sizes = index._state.live_sizes
        assert sizes.max() <= 2 * 50 + 50  # split as soon as a leaf passes 2 * max_leaf_size
    assert index.n_leaves > leaves_before
    live = {i: pool[i] for i in range(600)} | {10_000 + j: burst[j] for j in range(600)}
    queries = np.concatenate([burst[::60] + 0.01, pool[-5:]])
    if metric == "l2":
        assert_exact(index, live, queries)
    exact = {"probes": 10_000, "rerank_factor": 200}
    want = index.search_batch(queries, K, **exact)
    index.save(tmp_path / "grown")
    with vdb.ClusteredIndex.open(tmp_path / "grown", verify=True) as reopened:
        assert reopened.n_leaves == index.n_leaves
        got = reopened.search_batch(queries, K, **exact)
        np.testing.assert_array_equal(got[0], want[0])
    index.compact()
    np.testing.assert_array_equal(index.search_batch(queries, K, **exact)[0], want[0])


def test_an_index_built_from_a_handful_grows_into_leaves_of_useful_size(pool):
    # A store that starts from its first few documents (an app's memory) and grows by adds
    # must not split into leaves of two or three vectors: probes would then cover nothing.
    index = vdb.ClusteredIndex.build(pool[:4], metric="cosine", max_leaf_size=300)
    for start in range(4, 3_004, 100):
        index.add(pool[start : start + 100])
    sizes = index._state.live_sizes
    assert len(index) == 3_004
    assert np.median(sizes[sizes > 0]) >= 50
    queries = pool[3_004:3_024]
    truth = vdb.ClusteredIndex.build(pool[:3_004], metric="cosine").search_batch(
        queries, K, probes=10_000, rerank_factor=500
    )[0]
    got = index.search_batch(queries, K)[0]
    recall = np.mean([len(set(g) & set(t)) / K for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("mode", ["ram", "mmap"])
def test_get_vectors_returns_what_the_index_holds(pool, mode, tmp_path):
    index = vdb.ClusteredIndex.build(pool[:500], ids=np.arange(1_000, 1_500), metric="cosine")
    if mode == "mmap":
        index.use_mmap_storage(tmp_path / "v.bin")
    index.add(pool[500:520], ids=np.arange(5_000, 5_020))
    got = index.get_vectors([5_003, 1_007, 1_499])
    want = pool[[503, 7, 499]]
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == (3, DIM)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert index.get_vectors([]).shape == (0, DIM)
    index.delete([1_007])
    with pytest.raises(vdb.UnknownIdError, match="1007"):
        index.get_vectors([1_007])
    with pytest.raises(vdb.InvalidParameterError):
        index.get_vectors([[1, 2]])
    index.close()


def test_ids_matching_lists_every_live_match(pool):
    meta = [{"user": ["ann", "bob"][i % 2], "ts": i} for i in range(300)]
    index = vdb.ClusteredIndex.build(pool[:300], ids=np.arange(300) * 3, metadata=meta)
    index.add(pool[300:302], ids=[5_000, 5_001])  # no metadata: matches no dict filter
    index.delete([0, 6])
    want = [3 * i for i in range(300) if i % 2 == 0 and i >= 100 and 3 * i not in (0, 6)]
    got = index.ids_matching({"user": "ann", "ts": {"$gte": 100}})
    assert got.dtype == np.int64 and got.tolist() == want
    got = index.ids_matching(lambda m: m["ts"] < 3)
    assert got.tolist() == [3]
    assert index.ids_matching({"user": "zed"}).shape == (0,)
    with pytest.raises(vdb.InvalidParameterError, match="needs a filter"):
        index.ids_matching(None)
    with pytest.raises(vdb.InvalidParameterError):
        index.ids_matching({"ts": {"$between": 1}})


def test_a_filtered_search_sees_metadata_and_vectors_of_one_moment(pool):
    index = vdb.ClusteredIndex.build(pool[:300], metadata=[{"tag": "old"}] * 300)
    moved = pool[5_000]  # far from pool[7]
    real_put = index._metadata.put
    written = threading.Event()

    def slow_put(ids, docs):
        real_put(ids, docs)
        written.set()
        time.sleep(0.3)  # a window between the metadata and the vectors, were they apart

    index._metadata.put = slow_put
    writer = threading.Thread(target=index.upsert, args=(moved[None], [7], [{"tag": "new"}]))
    writer.start()
    assert written.wait(5)
    ids, dists = index.search(moved, k=1, filter={"tag": "new"})
    writer.join()
    assert ids[0] == 7
    assert dists[0] < 1e-3  # id 7's new vector, the one that carries the new tag


@pytest.mark.parametrize("mode", ["ram", "mmap", "bound"])
def test_writes_compact_once_dead_rows_match_live_ones(pool, mode, tmp_path, monkeypatch):
    from vectordb.index import update

    monkeypatch.setattr(update, "AUTO_COMPACT_MIN_DEAD", 64)
    rng = np.random.default_rng(11)
    start = 400
    index = vdb.ClusteredIndex.build(pool[:start], max_leaf_size=60)
    if mode == "mmap":
        index.use_mmap_storage(tmp_path / "v.f32")
    elif mode == "bound":
        index.save(tmp_path / "idx")  # binds it: every write below is logged
    compactions = []
    real = index.compact
    monkeypatch.setattr(index, "compact", lambda **kw: compactions.append(1) or real(**kw))
    live = {i: pool[i] for i in range(start)}
    queries = pool[-10:] + 0.01
    for step in range(40):
        some = rng.choice(np.array(sorted(live)), size=60, replace=False)
        if step % 4 == 3:
            index.delete(some[:20])
            for i in some[:20]:
                del live[int(i)]
        else:  # the same ids again and again: a chatbot's memory rewriting its records
            x = pool[rng.integers(start, len(pool) - 10, size=60)]
            index.upsert(x, some)
            live.update({int(i): v for i, v in zip(some, x, strict=True)})
        dead = index._state.storage.n - len(index)
        assert dead < max(len(index), 64)
        if step % 10 == 9:
            assert_exact(index, live, queries)
    assert len(compactions) >= 5
    assert sorted(index.ids.tolist()) == sorted(live)
    if mode == "bound":  # what the log holds, read by another index, without a checkpoint
        with vdb.ClusteredIndex.open(tmp_path / "idx", readonly=True, verify=True) as other:
            assert_exact(other, live, queries)
        index.checkpoint()
        with vdb.ClusteredIndex.open(tmp_path / "idx", readonly=True, verify=True) as other:
            assert_exact(other, live, queries)
    index.close()


def test_auto_compact_can_be_turned_off(pool):
    index = vdb.ClusteredIndex.build(pool[:300])
    index.auto_compact = False
    for _ in range(20):
        index.upsert(pool[:300] + 0.5, np.arange(300))
    assert index._state.storage.n == 300 * 21
    index.auto_compact = True
    index.delete([0])
    assert index._state.storage.n == 299
