"""The GPU search stages (``backends.device_search``), run with NumPy as the array module,
against the CPU stages they mirror."""

from __future__ import annotations

import fake_cupy
import numpy as np
import pytest

import vectordb as vdb
from vectordb.backends import device_search as ds
from vectordb.core import topk
from vectordb.core.codes import CodeTable, Quantizer, pack_signs
from vectordb.core.metrics import Metric, prepare
from vectordb.search.route import beam, route


@pytest.fixture(scope="module")
def index():
    x = vdb.make_clustered(4_000, 100, seed=3)
    return vdb.ClusteredIndex.build(
        x[:3_500], metric="cosine", max_leaf_size=120, leaf_scan="codes"
    ), x[3_500:]


@pytest.mark.parametrize("bits", [64, 100, 192])
def test_pack_signs_is_the_cpu_packing(bits):
    x = np.random.default_rng(bits).standard_normal((50, bits)).astype(np.float32)
    x[:, ::7] = 0.0  # zero is not positive
    words = (bits + 63) // 64
    np.testing.assert_array_equal(ds.pack_signs(np, x, words), pack_signs(x))


def test_rows_of_keys_are_their_rows_on_any_array_module():
    # The device path calls topk.rows_of with xp=cupy: the same array code as here.
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((7, 30)).astype(np.float32)
    scores[0, :3] = [-0.0, 0.0, np.float32(3.4e38)]
    rows = rng.integers(0, 1 << 31, size=(7, 30))
    keys = topk.keys_of(scores, rows)
    keys[1, 4] = topk.NO_KEY
    expected = rows.copy()
    expected[1, 4] = -1
    np.testing.assert_array_equal(topk.rows_of(keys, np), expected)
    np.testing.assert_array_equal(topk.rows_of(keys), expected)


def test_rotation_matches_the_quantizer():
    quantizer = Quantizer.create(100, rotate=True, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((33, 100)).astype(np.float32)
    blocks_t = np.ascontiguousarray(quantizer.blocks.transpose(0, 2, 1))
    got = ds.rotate(np, x, quantizer.perm, blocks_t, quantizer.bits)
    np.testing.assert_allclose(got, quantizer.rotate(x), rtol=1e-5, atol=1e-6)
    assert ds.rotate(np, x, None, None, 100) is x


@pytest.mark.parametrize("probes", [1, 3, 8])
def test_wide_beams_pick_the_cpu_leaves(index, probes):
    """The array-code beam (the GPU's path for wide beams); the kernel's is tested with
    the backend (``test_backends``)."""
    idx, queries = index
    st = idx._state
    q = idx._state.quantizer.rotate(prepare(queries, Metric.COSINE))
    tree = ds.DeviceTree.upload(np, st.tree)
    got = ds.beam(np, ds.node_scores(np, q, tree, Metric.COSINE), tree, probes)
    want = beam(st.tree, q, probes, Metric.COSINE)
    same = [
        set(g[g >= 0].tolist()) == set(w[w >= 0].tolist()) for g, w in zip(got, want, strict=True)
    ]
    assert np.mean(same) >= 0.99


@pytest.mark.parametrize("probes", [1, 3, 8, 40])
@pytest.mark.parametrize("flat", [True, False])
def test_nearest_leaves_pick_the_cpu_leaves(index, monkeypatch, probes, flat):
    """The GPU's routing as array code: the nearest leaves of all (flat trees) or of those a
    wide beam reached (larger trees; forced here by lowering the flat limit)."""
    import vectordb.search.route as route_module

    idx, queries = index
    st = idx._state
    q = idx._state.quantizer.rotate(prepare(queries, Metric.COSINE))
    tree = ds.DeviceTree.upload(np, st.tree)
    scores = ds.node_scores(np, q, tree, Metric.COSINE)
    reached = None
    if not flat:
        monkeypatch.setattr(route_module, "FLAT_MAX_LEAVES", 10)
        reached = ds.beam(np, scores, tree, route_module.beam_width(probes))
    got = ds.nearest_leaves(np, scores, tree, probes, reached)
    want = route(st.tree, q, probes, Metric.COSINE)
    assert got.shape == want.shape == (len(q), min(probes, st.tree.n_leaves))
    same = [
        set(g[g >= 0].tolist()) == set(w[w >= 0].tolist()) for g, w in zip(got, want, strict=True)
    ]
    assert np.mean(same) >= 0.99
    for row in got:  # ascending, distinct, padding last
        found = row[row >= 0]
        assert (np.diff(found) > 0).all() and (row[len(found) :] == -1).all()


def test_tree_depth_and_single_leaf():
    children = np.array([[1, 2], [3, -1], [-1, -1], [-1, -1]])
    assert ds.tree_depth(children) == 2
    small = vdb.ClusteredIndex.build(np.eye(5, dtype=np.float32), max_leaf_size=10)
    assert ds.DeviceTree.upload(np, small._state.tree).depth == 0


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.IP])
def test_query_terms_match_the_cpu_query_codes_and_pair_terms(index, metric):
    from vectordb.core.codes import pair_terms
    from vectordb.core.query_codes import quantize_queries

    idx, queries = index
    st = idx._state
    q = idx._state.quantizer.rotate(prepare(queries[:10], Metric.COSINE))
    leaves = route(st.tree, q, 3, Metric.COSINE)
    leaves[0, -1] = -1
    tree = ds.DeviceTree.upload(np, st.tree)
    terms = ds.query_terms(np, q, leaves, tree, idx._state.quantizer.words, metric)
    cpu = quantize_queries(q - st.table.origin)
    np.testing.assert_array_equal(terms.planes, cpu.planes)
    np.testing.assert_array_equal(terms.lo, cpu.lo)
    np.testing.assert_array_equal(terms.delta, cpu.delta)
    np.testing.assert_array_equal(terms.total, cpu.total)
    np.testing.assert_array_equal(terms.slack, cpu.slack)
    flat = leaves.reshape(-1)
    valid = flat >= 0
    table = CodeTable(st.table.centroids, st.table.leaf_nodes, metric, st.table.origin)
    pair = pair_terms(table, np.repeat(q, leaves.shape[1], axis=0)[valid], flat[valid])
    np.testing.assert_allclose(terms.p[valid], pair.p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.r_q[valid], pair.r_q, rtol=1e-5, atol=1e-6)
    assert (terms.p[~valid] == 0).all() and (terms.r_q[~valid] == 0).all()


# ---------------------------------------------------------------------- the GPU emulation
#
# tests/fake_cupy.py runs the CUDA kernels on the CPU for test_backends.py. These tests
# show that it can fail: kernels with the bugs a GPU would show are caught there too.

_TOY = r"""
extern "C" __global__ void toy(const long long n, long long* out)
{
    const long long t = %s;
    if (%s) return;
    %s
}
"""
_INDEX = "(long long)blockIdx.x * blockDim.x + threadIdx.x"


def toy_kernel(index: str = _INDEX, bound: str = "t >= n", body: str = "out[t] = t * 3;"):
    """The toy kernel with ``index``, ``bound`` and ``body``, compiled by the emulation."""
    if fake_cupy.compiler() is None:
        pytest.skip("no C compiler to run the CUDA kernels on the CPU")
    return fake_cupy._Module(_TOY % (index, bound, body)).get_function("toy")


def launch(kernel, n: int, threads: int = 64) -> np.ndarray:
    """``out`` ``(n,)`` int64 after a launch of ``kernel`` over ``n`` threads, rounded up."""
    out = fake_cupy.empty(n, dtype=np.int64)
    kernel(((n + threads - 1) // threads,), (threads,), (np.int64(n), out))
    return np.asarray(out)


def test_the_emulation_runs_every_thread_of_every_block():
    kernel = toy_kernel()
    for n in (1, 63, 64, 65, 1000):  # a part-filled last block, and a single one
        np.testing.assert_array_equal(launch(kernel, n), np.arange(n) * 3)


def test_the_emulation_shows_a_kernel_indexing_by_block_alone():
    """Every thread of a block writes its block's element: the rest stays poison."""
    kernel = toy_kernel(index="(long long)blockIdx.x")
    out = launch(kernel, 1000)
    poison = np.full(1, fake_cupy.POISON, np.uint8).repeat(8).view(np.int64)[0]
    assert (out[:16] == np.arange(16) * 3).all() and (out[16:] == poison).all()


def test_the_emulation_catches_an_off_by_one_bounds_check():
    kernel = toy_kernel(bound="t > n")
    launch(kernel, 128)  # no thread past the end: nothing to see
    with pytest.raises(fake_cupy.KernelError, match="wrote outside its argument 'out'"):
        launch(kernel, 1000)


def test_the_emulation_catches_threads_racing_for_one_place():
    kernel = toy_kernel(body="out[t / 2] = t;")
    with pytest.raises(fake_cupy.KernelError, match="depends on the order its threads run"):
        launch(kernel, 1000)
    # Threads reading what others write: also order-dependent.
    kernel = toy_kernel(body="out[t] = t ? out[t - 1] + 1 : 0;")
    with pytest.raises(fake_cupy.KernelError, match="depends on the order"):
        launch(kernel, 1000)


def test_the_emulation_refuses_what_it_cannot_run_and_bad_launches():
    kernel = toy_kernel()
    with pytest.raises(NotImplementedError, match="__syncthreads"):
        fake_cupy._Module(_TOY % (_INDEX, "t >= n", "__syncthreads();")).get_function("toy")
    out = fake_cupy.empty(10, dtype=np.int64)
    with pytest.raises(ValueError, match="limit of 1024"):
        kernel((1,), (2048,), (np.int64(10), out))
    with pytest.raises(ValueError, match="1-D"):
        kernel((1, 2), (32,), (np.int64(10), out))
    with pytest.raises(TypeError, match="expected int64"):
        kernel((1,), (32,), (np.int32(10), out))


def test_the_emulation_leaves_no_files(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kernel = toy_kernel(body="out[t] = t + 17;")  # a new source: compiled now
    np.testing.assert_array_equal(launch(kernel, 70), np.arange(70) + 17)
    assert list(tmp_path.iterdir()) == []
