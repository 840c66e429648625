"""The numba backend's kernels against the NumPy code they compile: the same bits.

Skipped where numba does not import (``tests/test_backends.py`` checks the fallback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb
from vectordb.core.codes import CodeTable, pair_terms
from vectordb.core.query_codes import quantize_queries
from vectordb.core.topk import NO_KEY
from vectordb.search.route import route

pytest.importorskip("numba")

from vectordb.backends.numba_backend import NumbaCodeSelector, quantize
from vectordb.backends.numba_lone import DONE, SHORT, UNSURE
from vectordb.backends.numpy_backend import NumpyCodeSelector

ROOT = Path(__file__).resolve().parent.parent


def sorted_keys(keys: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``keys`` sorted, with their radii (``NO_KEY`` padding's radius dropped: 0)."""
    order = np.argsort(keys, axis=1)
    keys = np.take_along_axis(keys, order, axis=1)
    radius = np.where(keys == NO_KEY, 0, np.take_along_axis(radius, order, axis=1))
    return keys, radius


def assert_same_selection(index: vdb.ClusteredIndex, q: np.ndarray, probes: int, m: int) -> None:
    st = index._state
    rotated = st.quantizer.rotate(q)
    leaves = route(st.tree, rotated, probes, index.metric)
    leaves[::3, -1] = -1  # padding in the middle of the batch
    want = NumpyCodeSelector(st.table, st.parts).select(rotated, leaves, m, st.row_ok)
    got = NumbaCodeSelector(st.table, st.parts).select(rotated, leaves, m, st.row_ok)
    assert got[0].shape == want[0].shape and got[0].dtype == np.uint64
    for a, b in zip(sorted_keys(*got), sorted_keys(*want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("metric", "code_bits"), [("l2", 1), ("cosine", 1), ("ip", 1), ("l2", 3), ("ip", 4)]
)
def test_the_compiled_scan_picks_the_numpy_candidates(metric, code_bits):
    x = vdb.make_clustered(3_000, 200, seed=3)  # 200 d: a padded last word
    index = vdb.ClusteredIndex.build(
        x[:2_400], max_leaf_size=100, metric=metric, code_bits=code_bits, backend="numpy"
    )
    index.add(x[2_400:2_900])  # a delta part: slots mapped to rows
    index.delete(np.arange(0, 2_400, 7))  # tombstones: rows masked
    for probes, m in [(1, 5), (4, 50), (16, 500), (64, 3_000)]:  # m past every probed row
        assert_same_selection(index, x[2_900:], probes, m)
        assert_same_selection(index, x[2_900:2_901], probes, m)  # a lone query


@pytest.mark.parametrize("dim", [32, 100, 300])
def test_unrotated_codes_of_any_width_pick_the_numpy_candidates(dim):
    x = vdb.make_clustered(2_200, dim, seed=2)
    index = vdb.ClusteredIndex.build(
        x[:2_000], max_leaf_size=100, rotate=False, leaf_scan="codes", backend="numpy"
    )
    assert index._state.quantizer.bits == dim  # no padding to a multiple of 64
    for probes, m in [(1, 10), (8, 100)]:
        assert_same_selection(index, x[2_000:], probes, m)
    want = index.search_batch(x[2_000:], 10)
    index.use_backend("numba")
    got = index.search_batch(x[2_000:], 10)
    # The same candidates; the rerank's distances an ulp or two apart (see rerank_rows).
    assert (got[0] == want[0]).mean() >= 0.99
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_ties_go_to_the_lower_row_and_signed_zeros_tie():
    x = np.repeat(vdb.make_clustered(1, 64, seed=0), 40, axis=0)  # 40 equal estimates
    x = np.concatenate([x, vdb.make_clustered(300, 64, seed=1)])
    index = vdb.ClusteredIndex.build(x, max_leaf_size=1_000, leaf_scan="codes", backend="numpy")
    for m in (1, 3, 39, 41):
        assert_same_selection(index, x[:2], 1, m)


def test_non_finite_estimates_are_clamped_as_numpy_clamps_them():
    from vectordb.core.parts import Part

    x = vdb.make_clustered(1_000, 64, seed=4)
    index = vdb.ClusteredIndex.build(x, max_leaf_size=100, leaf_scan="codes", backend="numpy")
    st = index._state
    base = st.base
    factors = base.factors.copy()
    factors[0, ::11] = np.inf  # estimate +inf
    factors[0, 5::13] = -np.inf  # -inf
    factors[1, 3::17] = np.nan  # NaN
    broken = Part(base.offsets, base.rows, base.codes, factors)
    rotated = st.quantizer.rotate(x[:20])
    leaves = route(st.tree, rotated, 8, index.metric)
    for m in (5, 200, 1_000):
        want = NumpyCodeSelector(st.table, (broken, st.delta)).select(rotated, leaves, m)
        got = NumbaCodeSelector(st.table, (broken, st.delta)).select(rotated, leaves, m)
        np.testing.assert_array_equal(sorted_keys(*got)[0], sorted_keys(*want)[0])


@pytest.mark.parametrize("code_bits", [1, 2, 4])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 3e4])
def test_query_quantisation_equals_numpy(scale, code_bits):
    rng = np.random.default_rng(7)
    for dim in (64, 100, 300, 384, 1024):  # 100, 300: unrotated, a part-filled last word
        q = (rng.standard_normal((50, dim)) * scale).astype(np.float32)
        q[0] = 0.25  # a constant query: no spread, delta 1
        origin = (rng.standard_normal(dim) * scale * 0.1).astype(np.float32)
        want = quantize_queries(q - origin, code_bits)
        got = quantize(q, origin, code_bits)
        for field in ("planes", "lo", "delta", "total", "slack"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)


def test_query_quantisation_of_a_spread_past_float32_equals_numpy():
    # Out of reach through the API (vector norms are bounded), but the kernel must still
    # turn inf / inf into NumPy's level.
    for dim in (4, 64, 193):
        q = np.zeros((2, dim), dtype=np.float32)
        q[0, ::2], q[0, 1::2] = 3.4e38, -3.4e38
        q[1], q[1, 0] = 3e38, -3e38
        with np.errstate(over="ignore", invalid="ignore"):
            want = quantize_queries(q)
        got = quantize(q, np.zeros(dim, dtype=np.float32))
        for field in ("planes", "lo", "delta", "total", "slack"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_pair_terms_equal_numpy(metric):
    x = vdb.make_clustered(2_000, 96, seed=6) * np.float32(40.0)  # far from unit scale
    index = vdb.ClusteredIndex.build(
        x, max_leaf_size=100, metric=metric, leaf_scan="codes", backend="numpy"
    )
    st = index._state
    table = CodeTable.for_tree(st.tree, st.metric)
    rotated = st.quantizer.rotate(x[:64])
    leaves = route(st.tree, rotated, 12, index.metric)
    leaves[:, 5] = -1
    got = NumbaCodeSelector(table, st.parts)._pair_terms(rotated, leaves)
    qi, slot = np.nonzero(leaves >= 0)
    want = pair_terms(table, rotated[qi], leaves[qi, slot])
    np.testing.assert_array_equal(got[0][qi, slot], want.p)
    np.testing.assert_array_equal(got[1][qi, slot], want.r_q)
    assert (got[0][:, 5] == 0).all() and (got[1][:, 5] == 0).all()


def test_a_fresh_process_loads_the_kernels_from_the_cache():
    """The first search of a new process must not compile what an earlier one cached."""
    code = (
        "import numpy as np, vectordb as vdb\n"
        "from vectordb.backends import numba_kernels as k\n"
        "x = vdb.make_clustered(2_000, 128, seed=1)\n"
        "index = vdb.ClusteredIndex.build(x, max_leaf_size=100, backend='numba')\n"
        "index.search(x[0], 10, probes=4)\n"
        "stats = k.scan_codes.stats\n"
        "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()), k._uncached)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True
    )
    hits, misses, uncached = out.stdout.split(maxsplit=2)
    assert uncached.strip() == "[]", f"kernels not cached: {uncached}"
    assert int(hits) >= 1 and int(misses) == 0, out.stdout


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_compiled_routing_picks_the_leaves_numpy_picks(metric):
    from vectordb.backends.numba_backend import NumbaSearcher

    x = vdb.make_clustered(6_000, 96, seed=8)
    index = vdb.ClusteredIndex.build(
        x, max_leaf_size=60, metric=metric, leaf_scan="codes", backend="numba"
    )
    st = index._state
    searcher = st.searcher
    assert isinstance(searcher, NumbaSearcher)
    rotated = st.quantizer.rotate(x[:300])
    # Near ties at the last place: a query midway between two leaf centroids.
    c = st.tree.leaf_centroids
    rotated = np.concatenate([rotated, (c[:20] + c[20:40]) / np.float32(2.0)])
    for probes in (1, 5, 40, index.n_leaves - 1, index.n_leaves + 5):
        want = np.concatenate([route(st.tree, q[None], probes, index.metric) for q in rotated])
        got = np.concatenate([searcher._route(q[None], probes) for q in rotated])
        np.testing.assert_array_equal(got, want)


def test_the_compiled_bound_cut_equals_numpy():
    from vectordb.backends import numba_stages
    from vectordb.core.topk import keys_of, within_bound

    rng = np.random.default_rng(2)
    scores = rng.standard_normal((40, 60)).astype(np.float32)
    scores[0, :5] = scores[0, 5]  # ties
    scores[1, 0] = -0.0
    rows = rng.permutation(10_000)[: 40 * 60].reshape(40, 60)
    keys = keys_of(scores, rows)
    keys[2, 30:] = NO_KEY  # fewer candidates than columns
    keys[3, :] = NO_KEY
    radius = np.abs(rng.standard_normal((40, 60))).astype(np.float32)
    radius[4, 7] = np.nan  # a bound of a huge vector: kept
    radius[5] = 0.0  # exact scores
    for k in (1, 3, 10, 59):
        out = np.empty(keys.shape, dtype=np.int64)
        numba_stages.within_bound(keys, radius, k, out)
        np.testing.assert_array_equal(out, within_bound(keys, radius, k))


def test_the_compiled_rerank_rounds_each_exact_distance_once():
    """Against float64 distances rounded to float32, ranked by (distance, row): the rows
    where they lie (a mapped file's and an appended array's), ties to the lower row, pruned
    candidates skipped, -0.0 returned as measured."""
    from vectordb.backends.numba_backend import _rerank
    from vectordb.core.metrics import Metric
    from vectordb.core.topk import keys_of

    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x[100:110] = x[99]  # equal distances: the lower row first
    q = np.concatenate([x[99:100], rng.standard_normal((19, 32)).astype(np.float32)])
    rows = rng.integers(0, 500, (20, 40))
    rows[0, :12] = np.arange(99, 111)
    rows[1, 5:] = -1  # pruned candidates
    rows[2, :] = -1
    rows[3, ::2] = -1
    q[4] = 0.0  # inner products of 0: distances -0.0, returned as measured

    class Split:  # rows 0..299 in one array, the rest in another (a store with appends)
        def row_arrays(self):
            return x[:300], x[300:]

    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    for metric in Metric:
        if metric is Metric.L2:
            exact = ((x64[rows] - q64[:, None]) ** 2).sum(axis=2)
        else:
            dots = np.einsum("qmd,qd->qm", x64[rows], q64)
            exact = 1.0 - dots if metric is Metric.COSINE else -dots
        exact = exact.astype(np.float32)
        for k in (1, 5, 10, 40, 50):
            got_rows, got_dist = _rerank(q, rows, k, Split(), metric)
            for qi in range(len(q)):
                valid = rows[qi] >= 0
                keys = keys_of(exact[qi][valid], rows[qi][valid])
                best = np.argsort(keys)[:k]
                n = len(best)
                want_rows = (keys[best] & np.uint64(0xFFFFFFFF)).astype(np.int64)
                np.testing.assert_array_equal(got_rows[qi, :n], want_rows)
                want_dist = exact[qi][valid][best]
                np.testing.assert_array_equal(
                    got_dist[qi, :n].view(np.uint32), want_dist.view(np.uint32)
                )
                assert (got_rows[qi, n:] == -1).all() and np.isinf(got_dist[qi, n:]).all()


def test_without_a_writable_cache_the_kernels_run_uncached_and_say_so_once():
    code = (
        "import logging, numba\n"
        "real = numba.njit\n"
        "def refusing(*args, **options):\n"
        "    if options.get('cache'):\n"
        "        raise RuntimeError(\"cannot cache function 'f': no locator available\")\n"
        "    return real(*args, **options)\n"
        "numba.njit = refusing\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import numpy as np, vectordb as vdb\n"
        "from vectordb.backends import numba_kernels as k\n"
        "x = vdb.make_clustered(1_000, 128, seed=1)\n"
        "index = vdb.ClusteredIndex.build(x, max_leaf_size=100, backend='numba')\n"
        "want = vdb.ClusteredIndex.build(x, max_leaf_size=100, backend='numpy')\n"
        "got = index.search_batch(x[:20], 10, probes=4)\n"
        "ref = want.search_batch(x[:20], 10, probes=4)\n"
        "assert (got[0] == ref[0]).all() and np.allclose(got[1], ref[1], rtol=1e-6)\n"
        "assert 'scan_codes' in k._uncached, k._uncached\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True
    )
    assert out.stderr.count("numba cannot cache its kernels") == 1, out.stderr


@pytest.mark.parametrize("kernel", ["plane_dots", "rerank_rows"])
def test_a_numba_whose_test_kernel_fails_is_not_used(monkeypatch, kernel):
    from vectordb import backends
    from vectordb.backends import numba_backend, numba_stages

    def broken(*args):
        raise RuntimeError("LLVM ERROR: Cannot select intrinsic (simulated)")

    owner = numba_backend if kernel == "plane_dots" else numba_stages
    monkeypatch.setattr(owner, kernel, broken)
    backends._numba_backend.cache_clear()
    try:
        backend, reason = backends._numba_backend()
        assert backend is None and "Cannot select intrinsic" in reason
        with pytest.raises(vdb.BackendUnavailableError, match="test kernels failed"):
            backends.resolve_backend("numba")
    finally:
        backends._numba_backend.cache_clear()


def lone_calls(monkeypatch) -> list[int]:
    """Record what each call of the one-piece kernel answered (``numba_lone.DONE``, ...)."""
    from vectordb.backends import numba_lone

    real, seen = numba_lone.search_lone, []

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(numba_lone, "search_lone", spy)
    return seen


def assert_lone_equals_stages(index, queries, **params) -> None:
    """Each of a few queries searched in one compiled call, bit for bit the staged search
    (and the same queries in a batch of more, which the stages run)."""
    batch = index.search_batch(np.concatenate([queries] * 3), 10, **params)
    for n in (1, 3, len(queries)):
        got = index.search_batch(queries[:n], 10, **params)
        np.testing.assert_array_equal(got[0], batch[0][:n])
        np.testing.assert_array_equal(got[1].view(np.uint32), batch[1][:n].view(np.uint32))
    for i in range(len(queries)):
        ids, dists = index.search(queries[i], 10, **params)
        np.testing.assert_array_equal(ids, batch[0][i])
        np.testing.assert_array_equal(dists.view(np.uint32), batch[1][i].view(np.uint32))


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_a_few_queries_in_one_compiled_call_equal_the_stages(monkeypatch, metric):
    x = vdb.make_clustered(4_000, 96, seed=4)
    index = vdb.ClusteredIndex.build(
        x[:3_900],
        max_leaf_size=80,
        metric=metric,
        leaf_scan="codes",
        backend="numba",
        metadata=[{"even": i % 2 == 0} for i in range(3_900)],
    )
    seen = lone_calls(monkeypatch)
    queries = x[3_900:3_908]
    for params in ({}, {"probes": 3}, {"probes": 12, "rerank_factor": 2}):
        assert_lone_equals_stages(index, queries, **params)
    assert seen and set(seen) == {DONE}  # every few-query search ran in one call
    index.delete(np.arange(0, 3_900, 3))  # tombstones: a row mask and fewer live rows
    assert_lone_equals_stages(index, queries, probes=4)
    assert_lone_equals_stages(index, queries, probes=8, filter={"even": True})  # a row mask
    assert set(seen) == {DONE}


def test_what_one_call_cannot_do_goes_to_the_stages(monkeypatch):
    x = vdb.make_clustered(13_000, 32, seed=6)
    index = vdb.ClusteredIndex.build(
        x[:12_000], max_leaf_size=100, leaf_scan="codes", backend="numba"
    )
    seen = lone_calls(monkeypatch)
    # More rows left than the exact scan takes, all near one point (in some leaves only).
    near = np.argsort(((x[:12_000] - x[0]) ** 2).sum(axis=1))[:5_000]
    index.delete(np.setdiff1d(np.arange(12_000), near))
    far = -x[:1]  # its nearest leaves hold none of them: the beam must widen
    ids, _ = index.search(far[0], 10, probes=2)
    assert seen == [SHORT] and (ids >= 0).all()  # then the stages widened the beam
    grown = vdb.ClusteredIndex.build(
        x[:6_000], max_leaf_size=400, leaf_scan="codes", backend="numba"
    )
    grown.add(x[12_000:12_010])  # a second part of codes: never offered to the one call
    assert len(grown._state.searcher.selector.parts) == 2
    seen.clear()
    assert_lone_equals_stages(grown, x[12_500:12_504], probes=4)
    assert seen == []
    # Queries midway between two leaf centroids (no rotation: the query is its own
    # rotation): routing unsure at probes=1, settled by the exact scores, then one call.
    plain = vdb.ClusteredIndex.build(
        x[:6_000], max_leaf_size=100, rotate=False, leaf_scan="codes", backend="numba"
    )
    c = plain._state.tree.leaf_centroids
    mids = []
    for a in range(len(c)):
        b = int(np.argsort(((c - c[a]) ** 2).sum(axis=1))[1])
        mid = (c[a] + c[b]) / np.float32(2.0)
        if set(np.argsort(((c - mid) ** 2).sum(axis=1))[:2]) == {a, b}:
            mids.append(mid)
    assert len(mids) >= 3
    seen.clear()
    for mid in mids:  # k=1: any leaf holds enough rows
        seen.clear()
        got = plain.search(mid, 1, probes=1)
        assert seen == [UNSURE, DONE]
        want = plain.search_batch(np.stack([mid] * 9), 1, probes=1)  # the stages
        np.testing.assert_array_equal(got[0], want[0][0])
        np.testing.assert_array_equal(got[1].view(np.uint32), want[1][0].view(np.uint32))
