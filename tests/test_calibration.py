"""Calibrated defaults (``index.calibrate``) and the error-bound rerank (``topk.within_bound``)."""

from __future__ import annotations

import numpy as np
import pytest

import vectordb as vdb
from vectordb.core import topk
from vectordb.index.calibrate import MIN_PROBES, probes_for

K = 10


@pytest.fixture(scope="module")
def held_out():
    """10,000 clustered 256-d vectors indexed, 300 more of the same clusters held out."""
    x = vdb.make_clustered(10_300, 256, seed=21)
    index = vdb.ClusteredIndex.build(x[:10_000], max_leaf_size=100, leaf_scan="codes")
    return index, x[:10_000], x[10_000:]


def tie_tolerant_recall(ids, base, queries, k=K):
    d = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(axis=2)
    kth = np.sort(d, axis=1)[:, k - 1 : k]
    got = np.take_along_axis(d, np.maximum(ids, 0), axis=1)
    return float(((got <= kth * (1 + 1e-5) + 1e-6) & (ids >= 0)).sum() / ids.size)


def test_defaults_reach_the_target_on_held_out_queries(held_out):
    index, base, queries = held_out
    calibration = index.params["calibration"]
    assert calibration["n"] == len(index) and calibration["leaves"] == index.n_leaves
    assert calibration["recall"] == sorted(calibration["recall"])  # more probes, more recall
    ids, _ = index.search_batch(queries, K)
    assert tie_tolerant_recall(ids, base, queries) >= 0.95
    # The default spends what the target needs, not everything.
    assert probes_for(calibration, 0.95) < index.n_leaves / 4


def test_target_recall_trades_probes_for_recall(held_out):
    index, base, queries = held_out
    calibration = index.params["calibration"]
    low, high = probes_for(calibration, 0.8), probes_for(calibration, 0.99)
    assert MIN_PROBES <= low < high
    ids_low, _ = index.search_batch(queries, K, target_recall=0.8)
    np.testing.assert_array_equal(ids_low, index.search_batch(queries, K, probes=low)[0])
    ids_high, _ = index.search_batch(queries, K, target_recall=0.99)
    assert tie_tolerant_recall(ids_high, base, queries) >= 0.98
    assert tie_tolerant_recall(ids_high, base, queries) >= tie_tolerant_recall(
        ids_low, base, queries
    )


def test_the_seeds_positional_call_still_works(held_out):
    index, _, queries = held_out
    ids, dists = index.search(queries[0], 10, 4, 5)
    expected = index.search(queries[0], 10, probes=4, rerank_factor=5)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(dists, expected[1])


def test_a_build_can_aim_elsewhere_and_saves_it(tmp_path):
    x = vdb.make_clustered(3_000, 64, seed=2)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=50, target_recall=0.8)
    assert index.params["target_recall"] == 0.8
    index.save(tmp_path / "i")
    with vdb.ClusteredIndex.open(tmp_path / "i") as opened:
        assert opened.params["calibration"] == index.params["calibration"]
        q = x[:20] + np.float32(0.01)
        np.testing.assert_array_equal(opened.search_batch(q, K)[0], index.search_batch(q, K)[0])
    with pytest.raises(vdb.InvalidParameterError, match="target_recall"):
        vdb.ClusteredIndex.build(x, target_recall=1.2)


def test_growth_rescales_then_recalibrates():
    x = vdb.make_clustered(6_000, 64, seed=3)
    index = vdb.ClusteredIndex.build(x[:1_500], max_leaf_size=50)
    first = index.params["calibration"]
    index.add(x[1_500:2_500])  # less than double: the curve stays, probes scale with leaves
    assert index.params["calibration"] == first
    index.add(x[2_500:6_000])  # past double: measured again
    again = index.params["calibration"]
    assert again["n"] == 6_000 and again["leaves"] == index.n_leaves > first["leaves"]
    index.compact()
    assert index.params["calibration"]["leaves"] == index.n_leaves


def test_scaled_probes_follow_the_share_of_leaves():
    curve = {"k": 10, "probes": [1, 4, 16], "recall": [0.5, 0.9, 0.99], "n": 100, "leaves": 50}
    assert probes_for(curve, 0.975) == 16
    assert probes_for(curve, 0.975, n_leaves=100) == 32
    assert probes_for(curve, 0.975, n_leaves=25) == 16  # never fewer than measured
    assert probes_for(None, 0.95) == 16  # indexes saved before calibration
    # Asked again (the last answer is kept), and of an equal calibration in a new dict.
    assert [probes_for(curve, 0.975, n_leaves=100) for _ in range(3)] == [32, 32, 32]
    steeper = dict(curve, recall=[0.5, 0.99, 0.999])
    assert probes_for(steeper, 0.975, n_leaves=100) < 32
    assert probes_for(curve, 0.8) < probes_for(curve, 0.975)


def test_tiny_indexes_have_no_calibration_and_still_search():
    x = vdb.make_clustered(8, 16, seed=1)
    index = vdb.ClusteredIndex.build(x)
    assert "calibration" not in index.params
    ids, _ = index.search(x[0], 3)
    assert ids[0] == 0


# ------------------------------------------------------------------------- within_bound


def test_within_bound_drops_only_what_the_bounds_rule_out():
    scores = np.array([[1.0, 2.0, 3.5, 10.0, 2.5]], dtype=np.float32)
    radius = np.array([[0.5, 0.5, 0.5, 0.5, 3.0]], dtype=np.float32)
    keys = topk.keys_of(scores, np.arange(5))
    # k = 2: the 2nd smallest upper bound is 2.5; 3.5 - 0.5 and 10 - 0.5 lie above it.
    rows = topk.within_bound(keys, radius, 2)
    assert sorted(rows[rows >= 0].tolist()) == [0, 1, 4]
    # Radius 0 (exact scores): the k best and their ties, nothing else.
    tied = topk.keys_of(np.array([[1.0, 2.0, 2.0, 3.0]], dtype=np.float32), np.arange(4))
    rows = topk.within_bound(tied, np.zeros((1, 4), np.float32), 2)
    assert sorted(rows[rows >= 0].tolist()) == [0, 1, 2]
    # Unknown bounds (inf) and NaN bounds prune nothing; empty slots stay empty.
    keys = np.concatenate([keys, [[topk.NO_KEY]]], axis=1)
    for r in (np.inf, np.nan):
        rows = topk.within_bound(keys, np.full((1, 6), r, np.float32), 2)
        assert rows.tolist() == [[0, 1, 2, 3, 4, -1]]


def test_scores_of_inverts_keys_of():
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [rng.standard_normal(1000).astype(np.float32) * 1e3, [0.0, -0.0, 3e38, -3e38]]
    ).astype(np.float32)
    keys = topk.keys_of(scores, np.arange(scores.shape[0]))
    back = topk.scores_of(keys)
    np.testing.assert_array_equal(back, scores + np.float32(0.0))
    assert np.isposinf(topk.scores_of(np.array([topk.NO_KEY])))[0]


def test_the_bounded_default_reranks_few_and_loses_nothing(monkeypatch):
    # 768-d: the bound tightens as 1 / sqrt(d) (synthetic-100k reranks 38 of 100).
    import vectordb.search.pipeline as pipeline

    x = vdb.make_clustered(5_300, 768, seed=8)
    base, queries = x[:5_000], x[5_000:]
    index = vdb.ClusteredIndex.build(base, max_leaf_size=100, leaf_scan="codes")

    seen = []

    def counting(original):
        def rerank(q, rows, k, take, metric):
            seen.append((rows >= 0).sum(axis=1))
            return original(q, rows, k, take, metric)

        return rerank

    # The rerank of the backend in use (the numba backend has its own).
    monkeypatch.setattr(pipeline, "rerank", counting(pipeline.rerank))
    if index.backend == "numba":
        import vectordb.backends.numba_backend as numba_backend

        monkeypatch.setattr(numba_backend, "_rerank", counting(numba_backend._rerank))
    bounded, _ = index.search_batch(queries, K, probes=8)
    reranked = np.concatenate(seen)
    wide, _ = index.search_batch(queries, K, probes=8, rerank_factor=10)
    assert reranked.mean() < 0.75 * 10 * K  # the bound cut the 100 candidates
    r_bounded = tie_tolerant_recall(bounded, base, queries)
    assert r_bounded >= tie_tolerant_recall(wide, base, queries) - 0.005


@pytest.mark.asyncio
async def test_the_engine_takes_the_same_defaults_and_target(held_out):
    index, _, queries = held_out
    async with vdb.AsyncEngine(index) as engine:
        ids, _ = await engine.search(queries[0], K)
        np.testing.assert_array_equal(ids, index.search(queries[0], K)[0])
        ids, _ = await engine.search(queries[0], K, target_recall=0.8)
        np.testing.assert_array_equal(ids, index.search(queries[0], K, target_recall=0.8)[0])
        ids, _ = await engine.search_batch(queries[:5], K, 4, 5)
        np.testing.assert_array_equal(ids, index.search_batch(queries[:5], K, 4, 5)[0])
        with pytest.raises(vdb.InvalidParameterError, match="not both"):
            await engine.search(queries[0], K, probes=4, target_recall=0.9)
        with pytest.raises(vdb.InvalidParameterError, match="target_recall"):
            await engine.search(queries[0], K, target_recall=2)


def test_an_index_saved_without_a_calibration_gets_it_at_open(tmp_path):
    import json

    from vectordb.storage.format import sign_manifest

    x = vdb.make_clustered(3_000, 64, seed=4)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=50)
    index.save(tmp_path / "i")
    path = tmp_path / "i" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["params"]["calibration"], manifest["params"]["target_recall"]
    path.write_bytes(sign_manifest(manifest))  # as an earlier version saved it
    with vdb.ClusteredIndex.open(tmp_path / "i") as opened:
        assert opened.params["calibration"] == index.params["calibration"]  # same sample
        assert "target_recall" not in opened.params  # the default applies
        q = x[:20] + np.float32(0.01)
        np.testing.assert_array_equal(opened.search_batch(q, K)[0], index.search_batch(q, K)[0])


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_the_calibration_reaches_full_recall_for_every_metric(metric):
    # ip distances are negative: the tie tolerance must widen them, not narrow them.
    x = vdb.make_clustered(4_000, 64, seed=6)
    index = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=100, leaf_scan="codes")
    curve = index.params["calibration"]
    assert curve["recall"][-1] >= 0.995, curve
    assert curve["recall"] == sorted(curve["recall"])


@pytest.mark.parametrize("leaf_scan", ["codes", "vectors"])
@pytest.mark.parametrize("shift", [0.0, 20.0])
def test_data_off_zero_searches_as_well_as_near_it(leaf_scan, shift):
    # l2 distances do not change with a shift; query levels spanning the distance from zero
    # would (recall 0.46 at a shift of 20 before the queries were quantised around the
    # root centroid). Routing still expands |c|^2 - 2 <q, c> in float32: at a shift of
    # 1,000 on 128-d data it loses leaves (a known limit, see docs/concepts.md).
    x = vdb.make_clustered(6_200, 128, seed=3) + np.float32(shift)
    base, queries = x[:6_000], x[6_000:]
    index = vdb.ClusteredIndex.build(base, max_leaf_size=100, leaf_scan=leaf_scan)
    ids, _ = index.search_batch(queries, K)
    assert tie_tolerant_recall(ids, base.astype(np.float64), queries.astype(np.float64)) >= 0.95
    assert index.params["calibration"]["recall"][-1] >= 0.995
    alone = np.stack([index.search(q, K)[0] for q in queries[:40]])
    np.testing.assert_array_equal(alone, ids[:40])


def test_exact_leaf_scans_stay_exact_far_from_zero():
    # |x|^2 - 2 <x, q> in float32 cancels the digits that order near rows at a shift of
    # 1,000 (recall 0.88, and one query in three answered differently alone than in a
    # batch, before the scores were taken around a row of the block).
    x = vdb.make_clustered(6_200, 32, seed=3) + np.float32(1000.0)
    base, queries = x[:6_000], x[6_000:]
    index = vdb.ClusteredIndex.build(base, leaf_scan="vectors")
    ids, _ = index.search_batch(queries, K)
    assert tie_tolerant_recall(ids, base.astype(np.float64), queries.astype(np.float64)) >= 0.95
    alone = np.stack([index.search(q, K)[0] for q in queries[:40]])
    np.testing.assert_array_equal(alone, ids[:40])
