"""Search quality and search invariants, checked against an independent brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb

K = 10

#: recall@10 at the default search parameters on ``clustered`` (10,000 x 128).
#: Measured: l2 0.9025, cosine 0.910, ip 0.9035.
DEFAULT_RECALL = {"l2": 0.85, "cosine": 0.85, "ip": 0.85}


# --------------------------------------------------------------------------- recall


def test_recall_at_default_parameters(clustered, shared_index, truth, oracle, metric):
    index = shared_index(clustered, metric)
    ids, _ = index.search_batch(clustered.queries, K)
    assert oracle.recall(ids, truth(clustered, metric), K) >= DEFAULT_RECALL[metric]


def test_more_probes_and_reranking_raise_recall(clustered, shared_index, truth, oracle, metric):
    # Measured: l2 0.9985, cosine 1.0, ip 0.999.
    index = shared_index(clustered, metric)
    ids, _ = index.search_batch(clustered.queries, K, probes=8, rerank_factor=20)
    assert oracle.recall(ids, truth(clustered, metric), K) >= 0.98


def test_rotate_false_still_has_good_recall(clustered, shared_index, truth, oracle, metric):
    # Measured: l2 0.9055, cosine 0.9125, ip 0.904.
    index = shared_index(clustered, metric, rotate=False)
    ids, _ = index.search_batch(clustered.queries, K)
    assert oracle.recall(ids, truth(clustered, metric), K) >= DEFAULT_RECALL[metric]


# --------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("data_name", ["clustered", "gaussian"])
@pytest.mark.parametrize("rotate", [True, False])
def test_exact_mode_returns_brute_force_answer(
    request, shared_index, truth, oracle, data_name, metric, rotate
):
    data = request.getfixturevalue(data_name)
    index = shared_index(data, metric, rotate=rotate)
    queries = data.queries[:40]
    ids, dists = index.search_batch(queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(ids, dists, truth(data, metric)[:40], K)


def test_exact_mode_for_large_k(small, shared_index, truth, oracle, metric):
    index = shared_index(small, metric, max_leaf_size=100)
    k = 150
    ids, dists = index.search_batch(small.queries[:10], k, **oracle.exact_params(index, k))
    oracle.assert_exact(ids, dists, truth(small, metric)[:10], k)


def test_exact_mode_over_many_queries(small, shared_index, oracle):
    """Enough queries, and candidates per query, to span several internal processing blocks."""
    index = shared_index(small, "l2", max_leaf_size=200)
    rng = np.random.default_rng(8)
    queries = small.vectors[rng.integers(0, len(small.vectors), 1200)]
    queries = queries + rng.normal(0.0, 0.05, queries.shape).astype(np.float32)
    ids, dists = index.search_batch(queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(ids, dists, oracle.distances(small.vectors, queries, "l2"), K)


# --------------------------------------------------------------------------- invariants


def test_returned_distances_are_exact_distances_of_returned_ids(
    clustered, shared_index, truth, oracle, metric
):
    index = shared_index(clustered, metric)
    ids, dists = index.search_batch(clustered.queries, K)
    true = truth(clustered, metric)
    assert ids.dtype == np.int64 and dists.dtype == np.float32
    assert ids.shape == dists.shape == (len(clustered.queries), K)
    assert ((ids >= 0) & (ids < len(index))).all()
    expected = np.take_along_axis(true, ids, axis=1)
    np.testing.assert_allclose(dists, expected, rtol=oracle.RTOL, atol=oracle.ATOL)


@pytest.mark.parametrize(("probes", "rerank_factor"), [(1, 1), (4, 5), (16, 2)])
def test_results_are_sorted_unique_and_complete(
    clustered, shared_index, metric, probes, rerank_factor
):
    index = shared_index(clustered, metric)
    ids, dists = index.search_batch(
        clustered.queries, K, probes=probes, rerank_factor=rerank_factor
    )
    assert (np.diff(dists, axis=1) >= 0).all()
    assert (ids >= 0).all(), "an index with >= k vectors must always return k results"
    for row in ids:
        assert np.unique(row).size == K


def test_search_batch_equals_search(clustered, shared_index, metric):
    index = shared_index(clustered, metric)
    queries = clustered.queries[:30]
    batch_ids, batch_dists = index.search_batch(queries, K, probes=3, rerank_factor=4)
    for i, query in enumerate(queries):
        ids, dists = index.search(query, K, probes=3, rerank_factor=4)
        np.testing.assert_array_equal(ids, batch_ids[i])
        np.testing.assert_array_equal(dists, batch_dists[i])


def test_results_do_not_depend_on_the_batch_a_query_is_in(clustered, shared_index, metric):
    # The async engine batches whatever queries arrive together; a query's answer must not
    # change with its companions (BLAS products round differently for different batch sizes).
    index = shared_index(clustered, metric)
    queries = clustered.queries
    whole_ids, whole_dists = index.search_batch(queries, K)
    rng = np.random.default_rng(11)
    cuts = np.sort(rng.choice(np.arange(1, len(queries)), 12, replace=False))
    for part in np.split(np.arange(len(queries)), cuts):
        ids, dists = index.search_batch(queries[part], K)
        np.testing.assert_array_equal(ids, whole_ids[part])
        np.testing.assert_array_equal(dists, whole_dists[part])


def test_query_of_shape_1_by_d_equals_1_d_query(small, shared_index):
    index = shared_index(small)
    a = index.search(small.queries[0], 5)
    b = index.search(small.queries[:1], 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# Under ip a vector need not be its own nearest neighbour.
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_indexed_vector_finds_itself_first(small, shared_index, metric):
    index = shared_index(small, metric)
    rows = np.arange(0, len(small.vectors), 97)
    ids, _ = index.search_batch(small.vectors[rows], 1)
    np.testing.assert_array_equal(ids[:, 0], rows)


# --------------------------------------------------------------------------- determinism


def _saved_files(index: vdb.ClusteredIndex, path: Path) -> dict[str, bytes]:
    index.save(path)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_builds_identical_indexes(small, tmp_path):
    np.random.seed(1)  # the library must not depend on numpy's global random state
    a = vdb.ClusteredIndex.build(small.vectors, max_leaf_size=100, seed=3)
    np.random.seed(2)
    np.random.random(100)
    b = vdb.ClusteredIndex.build(small.vectors, max_leaf_size=100, seed=3)
    for got, want in zip(
        a.search_batch(small.queries, K), b.search_batch(small.queries, K), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert _saved_files(a, tmp_path / "a") == _saved_files(b, tmp_path / "b")


def test_different_seeds_build_differently_but_both_well(
    clustered, shared_index, truth, oracle, tmp_path
):
    true = truth(clustered, "l2")
    a = shared_index(clustered, "l2", seed=0)
    b = shared_index(clustered, "l2", seed=7)
    files_a, files_b = _saved_files(a, tmp_path / "a"), _saved_files(b, tmp_path / "b")
    for name in ("codes.npy", "perm.npy", "blocks.npy"):
        assert files_a[name] != files_b[name], name
    for index in (a, b):
        ids, _ = index.search_batch(clustered.queries, K)
        assert oracle.recall(ids, true, K) >= DEFAULT_RECALL["l2"]


# --------------------------------------------------------------------------- tiny indexes


def test_k_larger_than_n_pads_with_minus_one_and_inf(oracle, metric):
    x = np.random.default_rng(0).standard_normal((7, 12)).astype(np.float32)
    index = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=2, branching_factor=2)
    queries = x[:3] + 0.1
    ids, dists = index.search_batch(queries, 10)
    assert ids.shape == dists.shape == (3, 10)
    oracle.assert_exact(ids, dists, oracle.distances(x, queries, metric), 10)
    single_ids, single_dists = index.search(queries[0], 10, probes=1, rerank_factor=1)
    assert sorted(single_ids[:7]) == list(range(7))
    np.testing.assert_array_equal(single_ids[7:], [-1, -1, -1])
    assert np.isposinf(single_dists[7:]).all()


def test_single_vector_index(metric):
    x = np.array([[3.0, -1.0, 2.0, 0.5]], dtype=np.float32)
    index = vdb.ClusteredIndex.build(x, metric=metric)
    assert len(index) == 1 and index.n_leaves == 1
    ids, dists = index.search([1.0, 1.0, 1.0, 1.0], k=3)
    np.testing.assert_array_equal(ids, [0, -1, -1])
    assert np.isfinite(dists[0]) and np.isposinf(dists[1:]).all()


@pytest.mark.parametrize("max_leaf_size", [1, 2, 1000])
def test_five_vectors(oracle, metric, max_leaf_size):
    x = np.random.default_rng(5).standard_normal((5, 8)).astype(np.float32)
    index = vdb.ClusteredIndex.build(
        x, metric=metric, max_leaf_size=max_leaf_size, branching_factor=2
    )
    queries = np.random.default_rng(6).standard_normal((4, 8)).astype(np.float32)
    true = oracle.distances(x, queries, metric)
    for k in (1, 3, 5, 6):
        # Default probes and rerank_factor: with 5 vectors the answer must be exact anyway.
        ids, dists = index.search_batch(queries, k)
        oracle.assert_exact(ids, dists, true, k)


def test_all_identical_vectors(metric):
    x = np.tile(np.linspace(1.0, 2.0, 16, dtype=np.float32), (300, 1))
    index = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=10)
    ids, dists = index.search(x[0], k=20)
    assert np.unique(ids).size == 20 and (ids >= 0).all()
    assert np.ptp(dists) == 0.0  # every vector is equally near


def test_duplicated_vectors_are_all_returned(oracle, metric):
    distinct = np.random.default_rng(7).standard_normal((6, 16)).astype(np.float32)
    x = np.repeat(distinct, 25, axis=0)  # rows 25*j .. 25*j+24 are copies of distinct[j]
    index = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=10)
    for j in range(6):
        ids, dists = index.search(distinct[j], k=25)
        if metric != "ip":  # under ip a vector's nearest neighbour need not be itself
            assert sorted(ids) == list(range(25 * j, 25 * j + 25))
        true = oracle.distances(x, distinct[j], metric)
        oracle.assert_exact(ids, dists, true, 25)


# --------------------------------------------------------------------------- a deep, uneven tree


@pytest.fixture(scope="module")
def deep():
    """3,000 x 16 vectors under a tree with branching 3 and leaves of at most 20 vectors."""
    data = vdb.make_clustered(3_100, 16, seed=0)
    x, queries = data[:3_000], data[3_000:]
    index = vdb.ClusteredIndex.build(x, max_leaf_size=20, branching_factor=3)
    return index, x, queries


def _leaf_depths(index: vdb.ClusteredIndex, path: Path) -> np.ndarray:
    """Depth of every leaf, read from the saved tree (nodes are numbered breadth-first)."""
    index.save(path)
    children = np.load(path / "children.npy")
    leaf_of_node = np.load(path / "leaf_of_node.npy")
    depth = np.zeros(children.shape[0], dtype=np.int64)
    for node, kids in enumerate(children):
        depth[kids[kids >= 0]] = depth[node] + 1
    return depth[leaf_of_node >= 0]


def test_deep_tree_has_leaves_at_mixed_levels(deep, tmp_path):
    index, _, _ = deep
    depths = _leaf_depths(index, tmp_path / "deep")
    assert depths.size == index.n_leaves > 100
    assert np.unique(depths).size >= 2


def test_deep_tree_recall(deep, oracle):
    # Measured: 0.718 at probes=4 (leaves of ~10 vectors), 0.899 at 8, 0.99 at 16.
    index, x, queries = deep
    true = oracle.distances(x, queries, "l2")
    assert oracle.recall(index.search_batch(queries, K)[0], true, K) >= 0.65
    assert oracle.recall(index.search_batch(queries, K, probes=16)[0], true, K) >= 0.95


def test_deep_tree_exact_mode(deep, oracle):
    index, x, queries = deep
    ids, dists = index.search_batch(queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(ids, dists, oracle.distances(x, queries, "l2"), K)


def test_deep_tree_search_batch_equals_search(deep):
    index, _, queries = deep
    batch = index.search_batch(queries[:20], K, probes=2, rerank_factor=1)
    for i, query in enumerate(queries[:20]):
        ids, dists = index.search(query, K, probes=2, rerank_factor=1)
        np.testing.assert_array_equal(ids, batch[0][i])
        np.testing.assert_array_equal(dists, batch[1][i])


# --------------------------------------------------------------------------- input conversions


def _assert_same_results(a: vdb.ClusteredIndex, b: vdb.ClusteredIndex, queries: np.ndarray) -> None:
    for got, want in zip(a.search_batch(queries, K), b.search_batch(queries, K), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda x: x.astype(np.float64), id="float64"),
        pytest.param(lambda x: x.astype(np.float16), id="float16"),
        pytest.param(lambda x: np.round(x * 100).astype(np.int32), id="int32"),
        pytest.param(lambda x: np.round(x * 100).astype(np.int64), id="int64"),
        pytest.param(np.asfortranarray, id="fortran-order"),
        pytest.param(lambda x: np.repeat(x, 2, axis=1)[:, ::2], id="strided"),
        pytest.param(lambda x: x.tolist(), id="list-of-lists"),
    ],
)
def test_input_conversions_match_float32_input(small, convert):
    vectors = convert(small.vectors[:500])
    queries = convert(small.queries[:10])
    queries32 = np.asarray(queries, dtype=np.float32)
    reference = vdb.ClusteredIndex.build(np.asarray(vectors, dtype=np.float32), max_leaf_size=50)
    index = vdb.ClusteredIndex.build(vectors, max_leaf_size=50)
    assert index.dim == small.dim and len(index) == 500
    _assert_same_results(index, reference, queries32)
    # Queries are converted the same way as vectors.
    for got, want in zip(
        index.search_batch(queries, K), index.search_batch(queries32, K), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(index.search(queries[0], K)[0], index.search(queries32[0], K)[0])


def test_index_does_not_alias_the_input_array(small):
    x = small.vectors[:500].copy()
    index = vdb.ClusteredIndex.build(x, max_leaf_size=50)
    before = index.search_batch(small.queries, K)
    x[:] = 0.0
    after = index.search_batch(small.queries, K)
    for got, want in zip(after, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_search_does_not_modify_the_query(small, shared_index):
    index = shared_index(small, "cosine")
    query = small.queries[:5].copy()
    index.search_batch(query, K)
    index.search(query[0], K)
    np.testing.assert_array_equal(query, small.queries[:5])


# --------------------------------------------------------------------------- metric semantics


def test_cosine_ignores_the_length_of_each_vector(small, oracle):
    scale = np.random.default_rng(3).uniform(0.1, 10.0, (len(small.vectors), 1)).astype(np.float32)
    plain = vdb.ClusteredIndex.build(small.vectors, metric="cosine", max_leaf_size=100)
    scaled = vdb.ClusteredIndex.build(small.vectors * scale, metric="cosine", max_leaf_size=100)
    true = oracle.distances(small.vectors, small.queries, "cosine")
    exact = oracle.exact_params(plain, K)
    ids, dists = scaled.search_batch(small.queries * 3.0, K, **exact)
    oracle.assert_exact(ids, dists, true, K)
    ids, dists = plain.search_batch(small.queries, K, **exact)
    oracle.assert_exact(ids, dists, true, K)


@pytest.mark.parametrize(
    "scale",
    [
        1e-3,
        1e3,
        1e-25,
        1e20,
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_cosine_is_scale_invariant(small, oracle, scale):
    vectors = small.vectors[:500] * np.float32(scale)
    queries = small.queries[:10] * np.float32(scale)
    index = vdb.ClusteredIndex.build(vectors, metric="cosine", max_leaf_size=50)
    ids, dists = index.search_batch(queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(
        ids, dists, oracle.distances(small.vectors[:500], small.queries[:10], "cosine"), K
    )


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_vectors_whose_distances_overflow_float32_are_rejected(metric):
    x = np.array([[1e20, 0.0], [0.0, 1e20], [1.0, 1.0]], dtype=np.float32)
    with pytest.raises(vdb.InvalidVectorsError, match="row 0 has length"):
        vdb.ClusteredIndex.build(x, metric=metric)
    index = vdb.ClusteredIndex.build(x[2:] * 1e18, metric=metric)  # long, but within range
    with pytest.raises(vdb.InvalidVectorsError, match="length"):
        index.search([1e20, 1e20], k=1)
    ids, dists = index.search([1e18, 1e18], k=2)
    assert ids.tolist() == [0, -1]
    assert np.isfinite(dists[0])


def test_search_batch_on_threads_equals_one_thread(small, shared_index, monkeypatch):
    import vectordb.index.clustered as index_module

    monkeypatch.setattr(index_module, "_MIN_QUERIES_PER_THREAD", 8)
    index = shared_index(small, "cosine")
    queries = np.concatenate([small.queries] * 3)
    one = index.search_batch(queries, K, probes=3)
    for threads in (2, 3, 64):
        many = index.search_batch(queries, K, probes=3, threads=threads)
        np.testing.assert_array_equal(many[0], one[0])
        np.testing.assert_array_equal(many[1], one[1])


@pytest.mark.parametrize("leaf_scan", ["codes", "vectors"])
def test_more_candidates_wanted_than_the_probed_leaves_hold(small, leaf_scan):
    # Leaves of a few rows, one probed, 50 candidates wanted: every probed row is reranked
    # and the answer is still k exact-by-candidates results (regression: a shape error).
    index = vdb.ClusteredIndex.build(
        small.vectors[:400], max_leaf_size=12, branching_factor=16, leaf_scan=leaf_scan
    )
    for batch in (small.queries[:1], small.queries[:3], small.queries[:40]):
        ids, dists = index.search_batch(batch, 10, probes=1, rerank_factor=5)
        assert ids.shape == (len(batch), 10) and (ids >= 0).all()
        assert (np.diff(dists, axis=1) >= 0).all()
