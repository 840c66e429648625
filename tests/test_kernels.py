"""The array kernels alone: bit packing, the RaBitQ estimate, rotation, k-means, routing."""

from __future__ import annotations

import numpy as np
import pytest

import vectordb as vdb
from vectordb.backends import NumpyBackend
from vectordb.core.codes import (
    CodeTable,
    Quantizer,
    code_levels,
    encode_residuals,
    estimate,
    level_scale,
    pack_signs,
    pair_terms,
    plane_dots,
)
from vectordb.core.kmeans import kmeans
from vectordb.core.metrics import Metric
from vectordb.core.query_codes import QUERY_BITS, QueryCodes, quantize_queries
from vectordb.search import route as route_module
from vectordb.search.route import beam, route


def naive_plane_dots(u: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(nq, n) ``sum_i bits_i u_i`` of quantised queries ``u`` and boolean codes, the slow
    obvious way."""
    return u.astype(np.int64) @ bits.T.astype(np.int64)


def levels_of(q: np.ndarray, codes: QueryCodes) -> np.ndarray:
    """The integer levels ``u`` (nq, D) that ``codes`` planes hold."""
    d = q.shape[1]
    u = np.zeros((q.shape[0], d), dtype=np.int64)
    for j in range(QUERY_BITS):
        plane = codes.planes[:, j, :]
        for i in range(d):
            u[:, i] += ((plane[:, i // 64] >> np.uint64(i % 64)) & np.uint64(1)).astype(
                np.int64
            ) << j
    return u


@pytest.mark.parametrize("dim", [1, 50, 64, 65, 128, 784])
def test_pack_signs_sets_bit_j_for_positive_coordinate_j(dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((7, dim)).astype(np.float32)
    x[0] = 0.0  # zero is not positive
    packed = pack_signs(x)
    assert packed.dtype == np.uint64
    assert packed.shape == (7, (dim + 63) // 64)
    for i in range(7):
        for j in range(dim):
            bit = (int(packed[i, j // 64]) >> (j % 64)) & 1
            assert bit == int(x[i, j] > 0)
        for j in range(dim, packed.shape[1] * 64):  # padding bits stay zero
            assert (int(packed[i, j // 64]) >> (j % 64)) & 1 == 0


def test_quantized_queries_round_to_the_nearest_of_sixteen_levels():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((5, 130)).astype(np.float32)
    codes = quantize_queries(q)
    u = levels_of(q, codes)
    assert u.min() == 0 and u.max() == (1 << QUERY_BITS) - 1
    back = codes.lo[:, None] + codes.delta[:, None] * u
    assert np.abs(back - q).max() <= codes.delta.max() / 2 * (1 + 1e-5)
    np.testing.assert_array_equal(codes.total, u.sum(axis=1))
    flat = quantize_queries(np.full((1, 64), 0.5, dtype=np.float32))  # no range: all lo
    assert flat.total[0] == 0 and flat.lo[0] == 0.5


@pytest.mark.parametrize("code_bits", [2, 4])
@pytest.mark.parametrize(("nq", "n", "dim"), [(1, 10, 64), (3, 300, 200)])
def test_multi_bit_plane_dots_sum_levels_times_levels(nq, n, dim, code_bits):
    rng = np.random.default_rng(nq * 1000 + n + code_bits)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    levels = rng.integers(0, level_scale(code_bits) + 1, (n, dim)).astype(np.uint8)
    levels[0] = level_scale(code_bits)  # the largest T
    codes = Quantizer(dim, code_bits=code_bits).encode(levels)
    qc = quantize_queries(q, code_bits)
    want = levels_of(q, qc) @ levels.T.astype(np.int64)
    np.testing.assert_array_equal(NumpyBackend.plane_dots(qc.planes, codes), want)
    np.testing.assert_array_equal(NumpyBackend.plane_dots(qc.planes, codes[:, 3:9]), want[:, 3:9])
    np.testing.assert_array_equal(qc.total, level_scale(code_bits) * levels_of(q, qc).sum(axis=1))


@pytest.mark.parametrize(("nq", "n", "dim"), [(1, 10, 64), (3, 500, 200), (40, 1000, 130)])
def test_plane_dots_match_the_naive_sum(nq, n, dim):
    rng = np.random.default_rng(nq * 1000 + n)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    qc = quantize_queries(q)
    got = NumpyBackend.plane_dots(qc.planes, np.ascontiguousarray(pack_signs(x).T))
    np.testing.assert_array_equal(got, naive_plane_dots(levels_of(q, qc), x > 0))
    cols = np.ascontiguousarray(pack_signs(x).T)[:, 7 : min(n, 70)]  # a column slice
    np.testing.assert_array_equal(
        NumpyBackend.plane_dots(qc.planes, cols),
        naive_plane_dots(levels_of(q, qc), x[7:70] > 0),
    )


def _estimates(metric, x, q, centre, origin=None, code_bits=1):
    """Estimates, radii and true scores of rotated ``x`` (n, D) for ``q`` (nq, D), one leaf
    (its centroid ``centre``; queries quantised around ``origin``, default 0)."""
    origin = np.zeros_like(centre) if origin is None else origin
    quantizer = Quantizer(x.shape[1], code_bits=code_bits)
    codes, factors = encode_residuals(quantizer, x, centre, metric, origin)
    assert codes.shape == (quantizer.code_rows, x.shape[0])
    qc = quantize_queries(q - origin, code_bits)
    table = CodeTable(centre[None, :], np.zeros(1, dtype=np.int64), metric, origin, code_bits)
    pair = pair_terms(table, q, np.zeros(q.shape[0], dtype=np.int64))
    est = estimate(
        plane_dots(qc.planes, codes),
        factors[:, None, :],
        qc.lo[:, None],
        qc.delta[:, None],
        qc.total[:, None],
        pair.p[:, None],
    )
    radius = factors[3][None, :] * pair.r_q[:, None] + factors[1][None, :] * qc.slack[:, None]
    true = -(q @ x.T) if metric is Metric.IP else ((q[:, None] - x[None]) ** 2).sum(axis=2)
    return est, radius, true


@pytest.mark.parametrize("metric", [Metric.L2, Metric.IP])
def test_estimate_is_exact_for_sign_vector_residuals_and_grid_queries(metric):
    # |r_i| all equal: the code is the residual's direction exactly (<o_bar, o> = 1, radius 0);
    # queries on the 16-level grid quantise exactly: nothing is left to estimate.
    rng = np.random.default_rng(2)
    d = 128
    centre = rng.standard_normal(d).astype(np.float32)
    signs = np.where(rng.random((30, d)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = centre + np.float32(0.25) * signs
    grid = rng.integers(0, 16, (4, d)).astype(np.float32)
    grid[:, 0], grid[:, 1] = 0, 15  # the full range, so lo = 0 and delta = 1/8
    q = np.float32(-1.0) + grid / np.float32(8)
    est, radius, true = _estimates(metric, x, q, centre)
    np.testing.assert_allclose(est, true, rtol=1e-4, atol=1e-3)
    # What is left of the radius is the query rounding's share, M * slack.
    _, factors = encode_residuals(Quantizer(d), x, centre, metric, np.zeros_like(centre))
    np.testing.assert_allclose(factors[3], 0, atol=1e-3)
    slack = quantize_queries(q).slack
    np.testing.assert_allclose(radius, factors[1][None, :] * slack[:, None], rtol=1e-5)


@pytest.mark.parametrize("code_bits", [2, 3, 4])
@pytest.mark.parametrize("metric", [Metric.L2, Metric.IP])
def test_multi_bit_estimate_is_exact_for_residuals_on_the_grid(metric, code_bits):
    # Residuals that are odd multiples of one step, the top level reached: a scale t puts
    # y = 2 floor(t r) + 1 on them exactly (<o_bar, o> = 1, E = 0), and queries on the
    # 16-level grid quantise exactly.
    rng = np.random.default_rng(20 + code_bits)
    d, top = 64, level_scale(code_bits)
    centre = rng.standard_normal(d).astype(np.float32)
    y = 2 * rng.integers(0, top + 1, (30, d)) - top
    y[:, 0] = top
    x = centre + np.float32(0.25) * y.astype(np.float32)
    levels = code_levels(x - centre, code_bits)
    np.testing.assert_array_equal(2 * levels.astype(np.int64) - top, y)
    grid = rng.integers(0, 16, (4, d)).astype(np.float32)
    grid[:, 0], grid[:, 1] = 0, 15
    q = np.float32(-1.0) + grid / np.float32(8)
    est, _, true = _estimates(metric, x, q, centre, code_bits=code_bits)
    np.testing.assert_allclose(est, true, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("code_bits", [1, 2, 3, 4])
def test_code_levels_keep_the_sign_and_point_closer_with_more_bits(code_bits):
    rng = np.random.default_rng(5)
    r = rng.standard_normal((3000, 64)).astype(np.float32)
    r[0] = 0.0
    levels = code_levels(r, code_bits)
    assert levels.dtype == np.uint8 and levels.max() <= level_scale(code_bits)
    y = 2.0 * levels - level_scale(code_bits)
    np.testing.assert_array_equal(y[1:] > 0, r[1:] > 0)  # the top bit is the sign bit
    cos = (
        (y[1:] * r[1:]).sum(axis=1) / np.linalg.norm(y[1:], axis=1) / np.linalg.norm(r[1:], axis=1)
    )
    # Gao et al.'s figures for 1-4 bits: about 0.80, 0.94, 0.98, 0.995.
    assert cos.mean() > (0.79, 0.93, 0.98, 0.994)[code_bits - 1]
    packed = Quantizer(64, code_bits=code_bits).encode(levels)
    assert packed.shape == (code_bits, 3000)
    for bit in range(code_bits):
        np.testing.assert_array_equal(packed[bit], pack_signs((levels >> bit) & 1)[:, 0])


@pytest.mark.parametrize(
    ("metric", "code_bits"), [(m, b) for m in (Metric.L2, Metric.IP) for b in (1, 2, 4)]
)
def test_estimate_is_unbiased_and_within_its_radius(metric, code_bits):
    rng = np.random.default_rng(3)
    d = 384
    quantizer = Quantizer.create(d, rotate=True, rng=rng)
    centre = quantizer.rotate(rng.standard_normal((1, d)).astype(np.float32))[0]
    x = centre + quantizer.rotate(rng.standard_normal((2000, d)).astype(np.float32))
    q = centre + quantizer.rotate(rng.standard_normal((20, d)).astype(np.float32))
    est, radius, true = _estimates(metric, x, q, centre, code_bits=code_bits)
    err = est - true
    # The radius is EPS0 = 1.9 standard deviations of the estimator (RaBitQ's bound): ~94%
    # of estimates fall inside it, nearly all inside twice it.
    assert np.mean(np.abs(err) <= radius) > 0.9
    assert np.mean(np.abs(err) <= 2 * radius) > 0.998
    assert abs(err.mean()) < 0.05 * np.abs(err).mean() + 1e-3 * np.abs(true).mean()
    # The code's 1.9 sigma plus one sigma of the query's rounding: not much looser
    # (measured 2.09 with 1 bit, 2.26 and 2.35 with 2 and 4).
    assert 1.5 < radius.mean() / err.std() < 3.0
    if code_bits > 1:  # more bits, smaller errors (measured 0.52 and 0.25 of 1 bit's)
        one, _, _ = _estimates(metric, x, q, centre)
        assert err.std() < (0.6 if code_bits == 2 else 0.3) * (one - true).std()


@pytest.mark.parametrize("dim", [3, 64, 100, 384])
def test_rotation_is_an_isometry_into_the_padded_space(dim):
    rng = np.random.default_rng(dim)
    quantizer = Quantizer.create(dim, rotate=True, rng=rng)
    assert quantizer.bits == 64 * ((dim + 63) // 64)
    x = rng.standard_normal((20, dim)).astype(np.float32)
    rx = quantizer.rotate(x)
    assert rx.shape == (20, quantizer.bits)
    np.testing.assert_allclose(rx @ rx.T, x @ x.T, rtol=1e-4, atol=1e-4)


def test_rotation_of_a_row_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    quantizer = Quantizer.create(300, rotate=True, rng=rng)
    x = rng.standard_normal((257, 300)).astype(np.float32)
    whole = quantizer.rotate(x)
    for start, stop in [(0, 1), (5, 6), (10, 74), (100, 257)]:
        np.testing.assert_array_equal(quantizer.rotate(x[start:stop]), whole[start:stop])


def test_without_rotation_vectors_pass_through():
    quantizer = Quantizer.create(10, rotate=False, rng=np.random.default_rng(0))
    x = np.ones((2, 10), dtype=np.float32)
    assert quantizer.rotate(x) is x
    assert quantizer.bits == 10 and quantizer.nbytes == 0


@pytest.mark.parametrize("shift", [0.0, 30.0, -500.0])
def test_estimates_do_not_depend_on_where_the_data_sits(shift):
    # Queries are quantised around the origin given (an index's root centroid): far from
    # zero, their levels still span the data's spread, and the radius stays honest.
    rng = np.random.default_rng(4)
    d = 256
    quantizer = Quantizer.create(d, rotate=True, rng=rng)
    offset = quantizer.rotate(np.full((1, d), shift, dtype=np.float32))[0]
    centre = offset + quantizer.rotate(rng.standard_normal((1, d)).astype(np.float32))[0]
    x = centre + quantizer.rotate(rng.standard_normal((1000, d)).astype(np.float32))
    q = centre + quantizer.rotate(rng.standard_normal((20, d)).astype(np.float32))
    est, radius, true = _estimates(Metric.L2, x, q, centre, origin=offset)
    err = est - true
    assert np.mean(np.abs(err) <= radius) > 0.9
    assert abs(err.mean()) < 0.05 * np.abs(err).mean() + 1e-3 * np.abs(true).mean()


def test_kmeans_is_deterministic_and_separates_clear_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 10], [-10, 10]], dtype=np.float32)
    x = np.concatenate([c + rng.standard_normal((200, 2)).astype(np.float32) for c in centres])
    c1, l1 = kmeans(x, 3, max_iterations=20, rng=np.random.default_rng(5))
    c2, l2 = kmeans(x, 3, max_iterations=20, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    for block in range(3):  # each true cluster ends up in exactly one k-means cluster
        assert len(set(l1[block * 200 : (block + 1) * 200].tolist())) == 1
    assert len(set(l1.tolist())) == 3


def test_vectors_near_the_largest_accepted_norm_build_and_search():
    # Their squared distances summed in float32 overflowed k-means++'s draw ("probabilities
    # do not sum to 1") for norms around 4e18, below the accepted maximum.
    x = vdb.make_clustered(600, 8, seed=3)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True) * np.float32(4e18)).astype(np.float32)
    index = vdb.ClusteredIndex.build(x[:500], max_leaf_size=50, backend="numpy")
    assert index.n_leaves > 1
    ids, _ = index.search_batch(x[500:], 5)
    diff = x[500:, None, :].astype(np.float64) - x[None, :500].astype(np.float64)
    true = np.argsort((diff**2).sum(axis=-1), axis=1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, true, strict=True)])
    assert recall >= 0.9  # measured 0.99


def test_kmeans_with_fewer_distinct_points_than_clusters():
    x = np.repeat(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), 50, axis=0)
    centroids, labels = kmeans(x, 5, max_iterations=10, rng=np.random.default_rng(0))
    assert centroids.shape == (5, 2) and np.isfinite(centroids).all()
    assert len(set(labels.tolist())) == 2


def plain_beam(tree, q: np.ndarray, probes: int) -> list[set[int]]:
    """Leaves per query by the beam search ``search.route.beam`` documents, query by query in
    float64: at every level keep the ``probes`` nodes of the frontier nearest by l2 to
    their centroids; kept leaves are answers, kept inner nodes are expanded."""
    centroids = tree.centroids.astype(np.float64)
    out = []
    for v in q.astype(np.float64):
        frontier, leaves = [int(c) for c in tree.children[0] if c >= 0], set()
        while frontier:
            dist = ((centroids[frontier] - v) ** 2).sum(axis=1)
            kept = [frontier[i] for i in np.argsort(dist, kind="stable")[:probes]]
            leaves |= {int(tree.leaf_of_node[n]) for n in kept if tree.leaf_of_node[n] >= 0}
            frontier = [int(c) for n in kept for c in tree.children[n] if c >= 0]
        out.append(leaves)
    return out


def test_the_beam_keeps_the_probes_nearest_nodes_of_every_level():
    x = vdb.make_clustered(3000, 16, seed=2)
    index = vdb.ClusteredIndex.build(x, branching_factor=3, max_leaf_size=20)
    tree = index._state.tree
    assert tree.leaf_of_node[0] < 0  # a real tree, several levels deep
    q = index._state.quantizer.rotate(x[:50] + 0.05)
    for probes in (1, 2, 5):
        want = plain_beam(tree, q, probes)
        # A batch (the fast product, rescored near ties) and lone queries (exact scores).
        for got in (beam(tree, q, probes, Metric.L2), beam(tree, q[:3], probes, Metric.L2)):
            for row, leaves in zip(got, want, strict=False):
                found = row[row >= 0]
                assert len(found) == len(set(found.tolist())), "a leaf listed twice"
                assert set(found.tolist()) == leaves, f"probes={probes}"
    everything = beam(tree, q, tree.n_nodes, Metric.L2)
    for row in everything:
        assert sorted(row[row >= 0].tolist()) == list(range(index.n_leaves))


def plain_route(tree, q: np.ndarray, probes: int) -> list[set[int]]:
    """The ``probes`` leaves whose centroids are nearest by l2, query by query in float64
    (what ``search.route.route`` documents)."""
    leaf_centroids = tree.centroids[tree.leaf_nodes].astype(np.float64)
    out = []
    for v in q.astype(np.float64):
        dist = ((leaf_centroids - v) ** 2).sum(axis=1)
        out.append(set(np.argsort(dist, kind="stable")[:probes].tolist()))
    return out


@pytest.mark.parametrize("flat", [True, False])
def test_routing_keeps_the_probes_nearest_leaves(monkeypatch, flat):
    x = vdb.make_clustered(3000, 16, seed=2)
    index = vdb.ClusteredIndex.build(x, branching_factor=3, max_leaf_size=20)
    tree = index._state.tree
    if not flat:  # the path of large trees: the nearest of the leaves a wide beam reached
        monkeypatch.setattr(route_module, "FLAT_MAX_LEAVES", 10)
    q = index._state.quantizer.rotate(x[:50] + 0.05)
    for probes in (1, 2, 5, 12):
        want = plain_route(tree, q, probes)
        for got in (route(tree, q, probes, Metric.L2), route(tree, q[:3], probes, Metric.L2)):
            assert got.shape[1] == probes
            agree = []
            for row, leaves in zip(got, want, strict=False):
                found = row[row >= 0]
                assert (np.diff(found) > 0).all(), "leaves ascending, none twice"
                agree.append(set(found.tolist()) == leaves)
            # Flat routing is exact; a beam 4x wider than probes may miss a leaf rarely.
            assert np.mean(agree) >= (1.0 if flat else 0.9), f"probes={probes}"
    everything = route(tree, q, tree.n_nodes, Metric.L2)
    for row in everything:
        assert sorted(row[row >= 0].tolist()) == list(range(index.n_leaves))


def test_keys_sort_like_scores_then_rows():
    from vectordb.core.topk import NO_KEY, keys_of, rows_of, smallest

    rng = np.random.default_rng(4)
    scores = rng.choice(np.array([-3.5, -0.0, 0.0, 1e-30, 2.0, 7.0], np.float32), size=(5, 40))
    rows = rng.permutation(1000)[:40]
    keys = keys_of(scores, rows)
    for i in range(5):
        want = sorted(range(40), key=lambda j: (float(scores[i, j]), int(rows[j])))
        np.testing.assert_array_equal(rows_of(np.sort(keys[i])), rows[want])
        best = rows_of(smallest(keys[i : i + 1], 7))[0]
        assert sorted(best.tolist()) == sorted(rows[want[:7]].tolist())
    padded = np.full((1, 3), NO_KEY, dtype=np.uint64)
    padded[0, 0] = keys[0, 0]
    assert rows_of(padded).tolist() == [[rows[0], -1, -1]]


def test_duplicate_vectors_at_the_candidate_boundary_resolve_to_the_lower_row():
    # Eight copies of one vector and m = 3 candidates: which copies survive must not depend
    # on scan order, so that every backend and batch picks the same rows.
    x = np.repeat(vdb.make_clustered(1, 32, seed=0), 8, axis=0)
    x = np.concatenate([x, vdb.make_clustered(200, 32, seed=1)])
    index = vdb.ClusteredIndex.build(x, max_leaf_size=1000, leaf_scan="codes")
    ids, _ = index.search(x[0], k=3, probes=1, rerank_factor=1)
    rows = np.flatnonzero(np.isin(index._state.row_id, np.arange(8)))
    assert sorted(ids.tolist()) == sorted(index._state.row_id[np.sort(rows)[:3]].tolist())


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_pair_by_pair_and_leaf_by_leaf_scans_pick_the_same_rows(metric):
    from vectordb.backends.numpy_backend import _BatchScorer
    from vectordb.core import topk
    from vectordb.search.candidates import select_candidates

    x = vdb.make_clustered(3_000, 128, seed=9)
    index = vdb.ClusteredIndex.build(x[:2_500], max_leaf_size=100, metric=metric, backend="numpy")
    index.add(x[2_500:2_900])  # a delta part
    index.delete(np.arange(0, 2_500, 7))  # tombstones
    st = index._state
    selector = st.searcher.selector
    q = index._state.quantizer.rotate(x[2_900:])
    scorer = _BatchScorer(selector.table, q)
    qi = np.arange(q.shape[0])
    for probes, m in [(1, 5), (4, 50), (16, 500)]:
        leaves = route(st.tree, q, probes, index.metric)
        flat, flat_radius = selector._select_flat(scorer, leaves, m, st.row_ok)
        grouped, radius = select_candidates(scorer, selector.parts, qi, leaves, m, st.row_ok)
        assert flat.shape == grouped.shape
        a, b = np.argsort(flat, axis=1), np.argsort(grouped, axis=1)
        np.testing.assert_array_equal(
            np.take_along_axis(flat, a, axis=1), np.take_along_axis(grouped, b, axis=1)
        )
        found = np.take_along_axis(flat, a, axis=1) != topk.NO_KEY
        np.testing.assert_array_equal(
            np.take_along_axis(flat_radius, a, axis=1)[found],
            np.take_along_axis(radius, b, axis=1)[found],
        )


@pytest.mark.parametrize("metric", [Metric.L2, Metric.IP])
def test_fast_routing_scores_stay_within_their_rounding_bound(metric):
    from vectordb.search.route import _approx_scores, exact_scores, rounding_bound

    x = vdb.make_clustered(4000, 96, seed=3) * np.float32(37.0)
    index = vdb.ClusteredIndex.build(x, branching_factor=8, max_leaf_size=50, backend="numpy")
    tree = index._state.tree
    rng = np.random.default_rng(2)
    q = index._state.quantizer.rotate(x[rng.integers(0, 4000, 300)] + rng.normal(0, 3, (300, 96)))
    q = q.astype(np.float32)
    nodes = rng.integers(-1, tree.n_nodes, (300, 40))
    fast = _approx_scores(q, nodes, tree.centroids, tree.centroid_sq_norms, metric)
    exact = exact_scores(tree, q, nodes, metric)
    np.testing.assert_array_equal(np.isinf(fast), nodes < 0)
    q_norms = np.sqrt(np.einsum("qd,qd->q", q, q))
    bound = rounding_bound(q_norms, tree.max_centroid_norm, q.shape[1], metric)
    ok = nodes >= 0
    gap = np.abs(np.where(ok, fast, 0) - np.where(ok, exact, 0))
    assert (gap <= bound[:, None] / 2).all()
    assert (gap > 0).any(), "the two ways should round differently somewhere"


@pytest.mark.parametrize("flat", [True, False])
def test_near_ties_in_routing_are_settled_the_same_alone_and_in_a_batch(monkeypatch, flat):
    # Sibling centroids one float32 step apart (and exactly equal): the fast scores cannot
    # order them reliably, so such queries must be rescored the reference way.
    from vectordb.core.tree import Tree

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 64)).astype(np.float32)
    leaves = np.repeat(base, 9, axis=0)
    leaves[1::2] = np.nextafter(leaves[1::2], np.float32(np.inf))
    centroids = np.concatenate([base, leaves]).astype(np.float32)
    children = np.full((10, 9), -1, dtype=np.int64)
    children[0] = np.arange(1, 10)
    tree = Tree(centroids, children, np.array([-1, *range(9)], dtype=np.int64))
    calls: list[int] = []
    if flat:
        leaf_scores = route_module.leaf_scores

        def counting_leaves(tree, q, metric, *, exact):
            if exact:
                calls.append(q.shape[0])
            return leaf_scores(tree, q, metric, exact=exact)

        monkeypatch.setattr(route_module, "leaf_scores", counting_leaves)
    else:
        monkeypatch.setattr(route_module, "FLAT_MAX_LEAVES", 1)
        exact = route_module.exact_scores

        def counting(tree, q, nodes, metric):
            calls.append(q.shape[0])
            return exact(tree, q, nodes, metric)

        monkeypatch.setattr(route_module, "exact_scores", counting)
    q = (base + rng.normal(0, 1e-3, (257, 64))).astype(np.float32)
    for probes in (1, 3, 8):
        together = route(tree, q, probes, Metric.L2)
        assert sum(calls) > 0
        for i in range(0, 257, 16):
            alone = route(tree, q[i : i + 1], probes, Metric.L2)
            np.testing.assert_array_equal(alone, together[i : i + 1])
        calls.clear()


@pytest.mark.parametrize("seed", range(6))
def test_best_keys_equal_the_keys_of_every_candidate_then_the_smallest(seed):
    from vectordb.core.topk import best_keys, candidate_keys, smallest

    rng = np.random.default_rng(seed)
    g, s = 30, 200
    # Few distinct values, so that ties at the m-th place are common; some inf and NaN.
    values = np.array([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf, np.nan], np.float32)
    scores = rng.choice(values, size=(g, s), p=[0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.05, 0.05])
    scores[: g // 2] += rng.standard_normal((g // 2, s)).astype(np.float32)  # mostly distinct
    rows = rng.permutation(5 * s)[:s].astype(np.int64)
    row_ok = rng.random(5 * s) > 0.3 if seed % 2 else None
    for m in (1, 7, 50, s - 1, s, s + 3):
        want = smallest(candidate_keys(scores.copy(), rows, row_ok), m)
        got = best_keys(scores.copy(), rows, m, row_ok)
        np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
