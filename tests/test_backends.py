"""Backends: one test body per backend, and the choice of backend when CuPy or numba is
unusable.

Four variants of each body: ``numpy``; ``numba`` (skipped where numba does not import);
``cupy`` on a real GPU (skipped where CuPy or a CUDA device is missing); and
``cupy-emulated``, the CuPy backend's code run on ``tests/fake_cupy.py`` (NumPy arrays, the
CUDA source compiled with the C compiler and run thread by thread in a shuffled order), on
every machine. The dispatch and error paths are tested everywhere by simulating an
unusable CuPy or numba.

numba runs NumPy's float32 steps in NumPy's order: its results equal NumPy's bit for bit.
The GPU runs float32 steps in another summation order than NumPy, so its results are
compared as neighbours, not bits: ids agree (a tie within rounding may go either way) and
distances agree to float32 rounding. Plane dots are compared exactly.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import fake_cupy as emulated_cupy
import numpy as np
import pytest

import vectordb as vdb
from vectordb import backends
from vectordb.core.codes import Quantizer, pack_signs
from vectordb.core.query_codes import quantize_queries
from vectordb.search.route import route

K = 10
#: Share of result positions whose ids may differ between backends (ties within rounding).
ID_SLACK = 0.01


@pytest.fixture(autouse=True)
def fresh_probe():
    """Forget the cached CuPy probe (tests below fake its outcome)."""
    backends._probe_cupy.cache_clear()
    backends._cupy_backend.cache_clear()
    backends._numba_backend.cache_clear()
    backends._logged.clear()
    yield
    backends._probe_cupy.cache_clear()
    backends._cupy_backend.cache_clear()
    backends._numba_backend.cache_clear()


#: Backends whose results equal NumPy's bit for bit.
#: Bit for bit against the NumPy backend (numba's rerank rounds each distance once, from
#: float64 sums: an ulp or two off NumPy's float32 sums).
EXACT = ("numpy",)
#: Bit for bit between one query alone and the same query in a batch.
BATCH_EXACT = ("numpy", "numba")


def cupy_or_skip() -> None:
    cupy, reason = backends._probe_cupy()
    if cupy is None:
        pytest.skip(f"cupy backend unavailable: {reason}")


def use_fake_cupy(monkeypatch, free_bytes: int = 1 << 40) -> None:
    if emulated_cupy.compiler() is None:
        pytest.skip("no C compiler to run the CUDA kernels on the CPU")
    monkeypatch.setitem(sys.modules, "cupy", emulated_cupy.make(free_bytes))
    backends._probe_cupy.cache_clear()
    backends._cupy_backend.cache_clear()


def numba_or_skip() -> None:
    backend, reason = backends._numba_backend()
    if backend is None:
        pytest.skip(f"numba backend unavailable: {reason}")


def has_numba() -> bool:
    return backends._numba_backend()[0] is not None


@pytest.fixture(params=["numpy", "numba", "cupy", "cupy-emulated"])
def backend_name(request, monkeypatch):
    if request.param == "cupy":
        cupy_or_skip()
    if request.param == "numba":
        numba_or_skip()
    if request.param == "cupy-emulated":
        use_fake_cupy(monkeypatch)
        return "cupy"
    return request.param


def assert_same_neighbours(got, want, exact: bool = False) -> None:
    """Ids equal but for ``ID_SLACK`` of positions; distances equal to float32 rounding.
    ``exact``: bit for bit (the NumPy backend against itself)."""
    if exact:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        return
    ids_equal = got[0] == want[0]
    assert ids_equal.mean() >= 1 - ID_SLACK, f"ids agree at {ids_equal.mean():.4f}"
    np.testing.assert_allclose(got[1][ids_equal], want[1][ids_equal], rtol=1e-5, atol=1e-5)
    assert got[0].shape == want[0].shape and got[1].dtype == np.float32


@pytest.fixture(scope="module")
def data():
    x = vdb.make_clustered(6_000, 192, seed=5)
    return x[:5_000], x[5_000:]


# ---------------------------------------------------------------------- one body per backend


@pytest.mark.parametrize("code_bits", [2, 4])
def test_multi_bit_plane_dots_sum_levels_times_levels(backend_name, code_bits):
    backend = backends.resolve_backend(backend_name)
    rng = np.random.default_rng(code_bits)
    qx = rng.standard_normal((9, 130)).astype(np.float32)
    top = (1 << code_bits) - 1
    levels = rng.integers(0, top + 1, (700, 130)).astype(np.uint8)
    levels[3] = top
    codes = Quantizer(130, code_bits=code_bits).encode(levels)
    qc = quantize_queries(qx, code_bits)
    u = np.rint((qx - qc.lo[:, None]) / qc.delta[:, None]).astype(np.int64)
    want = u @ levels.T.astype(np.int64)
    np.testing.assert_array_equal(backend.plane_dots(qc.planes, codes), want)
    np.testing.assert_array_equal(backend.plane_dots(qc.planes[:1], codes[:, 5:60]), want[:1, 5:60])


def test_plane_dots_sum_the_query_levels_at_the_set_bits(backend_name):
    """Against a plain sum of the quantised query's levels where a code's bit is set."""
    backend = backends.resolve_backend(backend_name)
    assert backend.name == backend_name
    rng = np.random.default_rng(0)
    qx = rng.standard_normal((37, 300)).astype(np.float32)
    xx = rng.standard_normal((5000, 300)).astype(np.float32)
    qc = quantize_queries(qx)
    codes = np.ascontiguousarray(pack_signs(xx).T)
    got = backend.plane_dots(qc.planes, codes)
    assert got.shape == (37, 5000)
    levels = np.rint((qx - qc.lo[:, None]) / qc.delta[:, None]).astype(np.int64)
    b = (xx > 0).astype(np.int64)
    np.testing.assert_array_equal(got, levels @ b.T)
    # A column slice of the codes, and a lone query (other block sizes, other paths).
    np.testing.assert_array_equal(
        backend.plane_dots(qc.planes[:1], codes[:, 7:70]), levels[:1] @ b[7:70].T
    )


def assert_brute_force_answer(got, vectors, ids, queries, metric, oracle, min_recall=0.0):
    """``got`` ``(ids, dists)`` ``(nq, k)`` holds, per query, distinct ``ids`` (ascending
    ``(n,)``, of ``vectors`` ``(n, d)``) sorted by their exact distance; recall@k against
    the brute force over ``vectors`` is at least ``min_recall``. Returns that recall."""
    found, dists = got
    k = found.shape[1]
    assert np.isin(found, ids).all(), "ids that are not in the index"
    assert all(np.unique(row).size == k for row in found), "a query got one id twice"
    assert (np.diff(dists, axis=1) >= 0).all()
    true = oracle.distances(vectors, queries, metric)
    pos = np.searchsorted(ids, found)
    expected = np.take_along_axis(true, pos, axis=1)
    np.testing.assert_allclose(dists, expected, rtol=oracle.RTOL, atol=oracle.ATOL)
    got_recall = oracle.recall(pos, true, k)
    assert got_recall >= min_recall, f"recall@{k} {got_recall:.3f} < {min_recall}"
    return got_recall


#: recall@10 floors on ``data`` (measured - 0.05) per (probes, rerank_factor): measured
#: l2 0.347 / 0.862 / 0.791, cosine 0.317 / 0.826 / 0.798, ip 0.381 / 0.866 / 0.963.
#: A code scan that drops one word of every code falls to 0.47 / 0.66 / 0.81 at (16, 2).
MIN_RECALL = {
    "l2": {(1, 1): 0.30, (4, 5): 0.81, (16, 2): 0.74},
    "cosine": {(1, 1): 0.27, (4, 5): 0.77, (16, 2): 0.75},
    "ip": {(1, 1): 0.33, (4, 5): 0.81, (16, 2): 0.91},
}


@pytest.mark.parametrize(
    ("metric", "code_bits"), [("l2", 1), ("cosine", 1), ("ip", 1), ("l2", 4), ("ip", 3)]
)
def test_search_results_equal_brute_force_and_the_numpy_backend(
    data, backend_name, metric, code_bits, oracle
):
    x, queries = data
    params = {"metric": metric, "max_leaf_size": 300, "code_bits": code_bits}
    index = vdb.ClusteredIndex.build(x, **params, backend=backend_name)
    assert index.backend == backend_name
    assert index._state.base.codes.shape[0] == code_bits * 3
    ids = np.arange(len(x))
    reference = None
    if backend_name != "numpy":
        reference = vdb.ClusteredIndex.build(x, **params, backend="numpy")
    for (probes, rerank_factor), floor in MIN_RECALL[metric].items():
        got = index.search_batch(queries, K, probes=probes, rerank_factor=rerank_factor)
        assert_brute_force_answer(got, x, ids, queries, metric, oracle, floor)
        if reference is not None:
            want = reference.search_batch(queries, K, probes=probes, rerank_factor=rerank_factor)
            assert_same_neighbours(got, want, exact=backend_name in EXACT)
        alone = [
            index.search(v, K, probes=probes, rerank_factor=rerank_factor) for v in queries[:20]
        ]
        stacked = (np.stack([a[0] for a in alone]), np.stack([a[1] for a in alone]))
        alone_or_batched = (got[0][:20], got[1][:20])
        assert_same_neighbours(stacked, alone_or_batched, exact=backend_name in BATCH_EXACT)
    # Every leaf probed and every vector reranked: the brute-force answer, ties aside.
    exact = index.search_batch(queries[:50], K, **oracle.exact_params(index, K))
    oracle.assert_exact(*exact, oracle.distances(x, queries[:50], metric), K)


def test_the_beam_widens_for_queries_short_of_candidates(data, backend_name, oracle):
    """k larger than a leaf: routing must widen the beam on every backend."""
    x, queries = data
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend=backend_name)
    reference = None
    if backend_name != "numpy":
        reference = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy")
    # Measured recall@400: 0.926 (probes=1), 0.981 (probes=40).
    for probes, floor in ((1, 0.88), (40, 0.95)):  # the beam kernel, and array code
        got = index.search_batch(queries[:40], 400, probes=probes, rerank_factor=1)
        assert (got[0] >= 0).all()  # 400 found for every query
        assert_brute_force_answer(got, x, np.arange(len(x)), queries[:40], "l2", oracle, floor)
        if reference is not None:
            want = reference.search_batch(queries[:40], 400, probes=probes, rerank_factor=1)
            assert_same_neighbours(got, want, exact=backend_name in EXACT)


def test_a_query_that_widens_does_not_widen_the_others(monkeypatch, data):
    """One query far from the few live rows needs many leaves; the rest of its batch keeps
    its own few (device memory grows with the widest row otherwise)."""
    from vectordb.core.metrics import prepare

    use_fake_cupy(monkeypatch)
    x = data[0]
    index = vdb.ClusteredIndex.build(x, max_leaf_size=50, backend="cupy")
    near = np.argsort(((x - x[0]) ** 2).sum(axis=1))[:300]
    index.delete(np.setdiff1d(np.arange(len(x)), near))
    batch = np.concatenate([x[near[:63]] + 0.01, -x[:1]])
    sel = index._state.searcher
    rotated = index._state.quantizer.rotate(prepare(batch, index.metric))
    sizes = np.asarray(index._state.live_sizes, dtype=np.int64)
    leaves, wide = sel._route(rotated, 4, K, sizes)
    assert wide is not None and wide[0].tolist() == [63]
    assert leaves.shape[1] <= 4 * sel._tree.depth < wide[1].shape[1]
    want = vdb.ClusteredIndex.build(x, max_leaf_size=50, backend="numpy")
    want.delete(np.setdiff1d(np.arange(len(x)), near))
    assert_same_neighbours(index.search_batch(batch, K), want.search_batch(batch, K))


def test_open_with_a_backend_and_mmap(data, backend_name, tmp_path):
    x, queries = data
    vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy").save(tmp_path / "i")
    with vdb.ClusteredIndex.open(tmp_path / "i", mmap=True, backend=backend_name) as index:
        assert index.backend == backend_name and index.is_using_mmap
        got = index.search_batch(queries, K)
    with vdb.ClusteredIndex.open(tmp_path / "i", backend="numpy") as reference:
        want = reference.search_batch(queries, K)
    assert_same_neighbours(got, want, exact=backend_name in EXACT)


@pytest.mark.asyncio
async def test_engine_on_a_backend(data, backend_name):
    x, queries = data
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend=backend_name)
    async with vdb.AsyncEngine(index, max_workers=2) as engine:
        import asyncio

        got = await asyncio.gather(*(engine.search(q, K) for q in queries))
    want = index.search_batch(queries, K)
    assert_same_neighbours((np.stack([g[0] for g in got]), np.stack([g[1] for g in got])), want)


# ---------------------------------------------------------------------- choosing a backend


def fake_cupy(monkeypatch, *, devices: int = 1, compile_error: bool = False) -> None:
    def raw_module(**kwargs):
        raise RuntimeError("nvrtc: error: failed to compile (simulated)")

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: devices)
    )
    module.RawModule = raw_module if compile_error else None
    monkeypatch.setitem(sys.modules, "cupy", module)


def no_cupy(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError


@pytest.mark.parametrize(
    ("simulate", "cause"),
    [
        (no_cupy, "CuPy is not installed; pip install 'vectordb-embedded[gpu-cuda12]'"),
        (lambda mp: fake_cupy(mp, devices=0), "no CUDA device found"),
        (lambda mp: fake_cupy(mp, compile_error=True), "failed to compile or run"),
    ],
)
def test_unusable_cupy(monkeypatch, caplog, data, simulate, cause):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    simulate(monkeypatch)
    cpu = "numba" if has_numba() else "numpy"
    assert vdb.available_backends() == ["numpy"] + (["numba"] if has_numba() else [])
    with pytest.raises(vdb.BackendUnavailableError, match="cupy backend is unavailable") as info:
        vdb.ClusteredIndex.build(data[0][:500], backend="cupy")
    assert cause in str(info.value)
    with caplog.at_level(logging.INFO, logger="vectordb"):
        a = vdb.ClusteredIndex.build(data[0][:500], backend="auto")
        b = vdb.ClusteredIndex.build(data[0][:500])
    assert a.backend == b.backend == cpu
    lines = [r.getMessage() for r in caplog.records if f"{cpu} backend" in r.getMessage()]
    assert len(lines) == 1 and cause in lines[0]  # one line, saying why


def no_numba(monkeypatch) -> None:
    """``import numba`` fails, as where it is not installed (the backend modules that
    import it are forgotten, so that they import again)."""
    monkeypatch.setitem(sys.modules, "numba", None)
    for name in ("numba_backend", "numba_stages", "numba_kernels"):
        monkeypatch.delitem(sys.modules, f"vectordb.backends.{name}", raising=False)
        monkeypatch.delattr(backends, name, raising=False)  # ``from . import`` looks here first
    backends._numba_backend.cache_clear()


def test_without_numba_auto_falls_back_to_numpy_and_says_why(monkeypatch, caplog, data):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    no_cupy(monkeypatch)
    no_numba(monkeypatch)
    assert vdb.available_backends() == ["numpy"]
    with pytest.raises(vdb.BackendUnavailableError, match="numba backend is unavailable") as info:
        vdb.ClusteredIndex.build(data[0][:500], backend="numba")
    assert "pip install numba" in str(info.value)
    with caplog.at_level(logging.INFO, logger="vectordb"):
        a = vdb.ClusteredIndex.build(data[0][:500])
        b = vdb.ClusteredIndex.build(data[0][:500], backend="auto")
    assert a.backend == b.backend == "numpy"
    lines = [r.getMessage() for r in caplog.records if "numpy backend" in r.getMessage()]
    assert len(lines) == 1 and "numba does not import" in lines[0]
    monkeypatch.setenv(backends.ENV_VAR, "numba")
    with pytest.raises(vdb.BackendUnavailableError, match="numba"):
        vdb.ClusteredIndex.build(data[0][:300])


def test_auto_prefers_numba_to_numpy(monkeypatch, data):
    numba_or_skip()
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    no_cupy(monkeypatch)
    assert vdb.ClusteredIndex.build(data[0][:300]).backend == "numba"
    monkeypatch.setenv(backends.ENV_VAR, "numpy")  # VECTORDB_BACKEND=numpy forces NumPy
    assert vdb.ClusteredIndex.build(data[0][:300]).backend == "numpy"


def test_device_count_failure_is_reported(monkeypatch):
    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver")

    fake_cupy(monkeypatch)
    sys.modules["cupy"].cuda.runtime.getDeviceCount = broken
    cupy, reason = backends._probe_cupy()
    assert cupy is None and "no usable CUDA device" in reason
    assert "cudaErrorInsufficientDriver" in reason


def test_environment_decides_for_auto(monkeypatch, data):
    no_cupy(monkeypatch)
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    assert vdb.ClusteredIndex.build(data[0][:300]).backend == "numpy"
    monkeypatch.setenv(backends.ENV_VAR, "cupy")
    with pytest.raises(vdb.BackendUnavailableError):
        vdb.ClusteredIndex.build(data[0][:300])
    # an explicit argument wins over the environment
    assert vdb.ClusteredIndex.build(data[0][:300], backend="numpy").backend == "numpy"
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(vdb.InvalidParameterError, match=r"\$VECTORDB_BACKEND"):
        vdb.ClusteredIndex.build(data[0][:300])


def test_unknown_backend_name(data):
    with pytest.raises(vdb.InvalidParameterError, match="backend"):
        vdb.ClusteredIndex.build(data[0][:300], backend="metal")


def test_importing_and_using_vectordb_never_imports_cupy_or_numba():
    code = (
        "import sys, numpy as np, vectordb as vdb\n"
        "x = vdb.make_clustered(300, 16, seed=1)\n"
        "vdb.ClusteredIndex.build(x, backend='numpy').search(x[0])\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mutations_filters_and_deletions_equal_brute_force_and_the_numpy_backend(
    data, backend_name, oracle
):
    """Tombstones, the delta part and filter masks go through the backend's own kernel."""
    x, queries = data
    meta = [{"even": i % 2 == 0} for i in range(3_000)]
    names = ["numpy", backend_name] if backend_name != "numpy" else ["numpy"]
    indexes = {
        name: vdb.ClusteredIndex.build(x[:3_000], metadata=meta, max_leaf_size=300, backend=name)
        for name in names
    }
    for index in indexes.values():
        index.add(x[3_000:3_400], metadata=[{"even": i % 2 == 0} for i in range(400)])
        index.delete(np.arange(0, 3_000, 5))
        index.upsert(x[3_400:3_450], ids=np.arange(100, 150))
    # What the index must hold: id -> (vector, matches {"even": True}).
    model = {i: (x[i], i % 2 == 0) for i in range(3_000) if i % 5}
    model |= {3_000 + j: (x[3_000 + j], j % 2 == 0) for j in range(400)}
    for j, i in enumerate(range(100, 150)):  # an upsert keeps metadata; a re-added id has none
        model[i] = (x[3_400 + j], i in model and model[i][1])
    got_index = indexes[backend_name]
    ids = np.array(sorted(model), dtype=np.int64)
    np.testing.assert_array_equal(got_index.ids, ids)
    vectors = np.stack([model[int(i)][0] for i in ids])
    even = np.array([model[int(i)][1] for i in ids])
    # (kwargs, the live ids it may return, their vectors, recall@10 floor; measured 0.86-1.0)
    cases = [
        ({}, ids, vectors, 0.8),
        ({"filter": {"even": True}}, ids[even], vectors[even], 0.99),  # few matches: exact
        ({"probes": 16, "rerank_factor": 2}, ids, vectors, 0.8),
    ]
    for kwargs, allowed, allowed_vectors, floor in cases:
        got = got_index.search_batch(queries, K, **kwargs)
        assert_brute_force_answer(got, allowed_vectors, allowed, queries, "l2", oracle, floor)
        if backend_name != "numpy":
            want = indexes["numpy"].search_batch(queries, K, **kwargs)
            assert_same_neighbours(got, want, exact=backend_name in EXACT)
    exact = got_index.search_batch(queries[:64], K, **oracle.exact_params(got_index, K))
    assert np.isin(exact[0], ids).all()
    true = oracle.distances(vectors, queries[:64], "l2")
    oracle.assert_exact(np.searchsorted(ids, exact[0]), exact[1], true, K)


# ---------------------------------------------------------------------- what stays on the GPU


def test_a_closed_index_refuses_searches(data, backend_name, tmp_path):
    """Vectors copied to the device must not let a closed index go on answering."""
    x, queries = data
    vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy").save(tmp_path / "i")
    index = vdb.ClusteredIndex.open(tmp_path / "i", mmap=True, backend=backend_name)
    index.search_batch(queries[:64], K)
    index.close()
    with pytest.raises(vdb.IndexClosedError):
        index.search_batch(queries[:64], K)


def emulated_index(monkeypatch, x, **build):
    """An index on the CuPy backend run by ``fake_cupy``, and its selector."""
    use_fake_cupy(monkeypatch)
    index = vdb.ClusteredIndex.build(x, backend="cupy", **build)
    return index, index._state.searcher


@pytest.mark.parametrize("probes", [1, 3, 8, 40])  # the kernel, and array code past 32
@pytest.mark.parametrize("flat", [True, False])  # False: the beam first, as large trees do
def test_device_routing_picks_the_cpu_leaves(monkeypatch, data, probes, flat):
    from vectordb.core.metrics import prepare
    from vectordb.search import route as route_module

    x, queries = data
    index, sel = emulated_index(monkeypatch, x, max_leaf_size=100)
    if not flat:
        assert index.n_leaves > 10
        monkeypatch.setattr(route_module, "FLAT_MAX_LEAVES", 10)
    q = index._state.quantizer.rotate(prepare(queries, index.metric))
    got, wide = sel._route(q, probes, 1, np.asarray(index._state.live_sizes))
    want = route(index._state.tree, q, probes, index.metric)
    assert wide is None
    same = [
        set(g[g >= 0].tolist()) == set(w[w >= 0].tolist()) for g, w in zip(got, want, strict=True)
    ]
    assert np.mean(same) >= 0.99


def test_device_routing_widens_for_queries_short_of_rows(monkeypatch, data):
    from vectordb.core.metrics import prepare

    x, queries = data
    index, sel = emulated_index(monkeypatch, x, max_leaf_size=100)
    q = index._state.quantizer.rotate(prepare(queries[:20], index.metric))
    sizes = np.asarray(index._state.live_sizes)
    need = 600  # more than a few leaves hold: the beam must widen
    leaves, wide = sel._route(q, 1, need, sizes)
    assert wide is not None and wide[0].tolist() == list(range(20))
    held = np.where(wide[1] >= 0, sizes[np.maximum(wide[1], 0)], 0).sum(axis=1)
    assert (held >= need).all()
    assert leaves.shape[1] < wide[1].shape[1]
    assert sel._route(q, 1, 1, sizes)[1] is None


def test_device_routing_of_a_one_leaf_tree(monkeypatch):
    index, sel = emulated_index(
        monkeypatch, np.eye(130, dtype=np.float32), max_leaf_size=200, leaf_scan="codes"
    )
    q = np.ones((3, index._state.quantizer.bits), dtype=np.float32)
    leaves, wide = sel._route(q, 4, K, np.asarray(index._state.live_sizes))
    np.testing.assert_array_equal(leaves, np.zeros((3, 1)))
    assert wide is None


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_device_rerank_matches_the_cpu_rerank(monkeypatch, metric):
    from vectordb.core.metrics import prepare
    from vectordb.search.rerank import rerank

    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 40)).astype(np.float32)
    index, sel = emulated_index(monkeypatch, x, metric=metric, leaf_scan="codes")
    q = prepare(rng.standard_normal((9, 40)).astype(np.float32), index.metric)
    rows = rng.integers(0, 500, size=(9, 25))
    rows[0, 5:] = -1
    rows[1] = -1
    want = rerank(q, rows, 10, index._state.storage.take, index.metric)
    got = [np.asarray(a) for a in sel._rerank(q, rows, 10)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert (got[0][1] == -1).all() and np.isinf(got[1][1]).all()
    assert got[0].shape == (9, 10)


def test_writes_send_only_what_changed(monkeypatch, data):
    use_fake_cupy(monkeypatch)
    x = data[0]
    index = vdb.ClusteredIndex.build(x[:3_000], max_leaf_size=300, backend="cupy")
    index.add(x[3_000:3_200])  # grows leaves past their split size: a new tree and base
    before = index._state.searcher
    assert before.vectors_on_device
    index.add(x[3_200:3_210])  # goes to the delta part alone
    after = index._state.searcher
    assert after._base is before._base  # the base part's codes were not copied again
    assert after._tree is before._tree
    assert after._vectors.shape[0] == 3_210
    # The added vectors are found on the device: each is its own nearest neighbour.
    ids, dists = index.search_batch(x[3_000:3_064], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(3_000, 3_064))
    np.testing.assert_allclose(dists[:, 0], 0.0, atol=1e-5)


def test_vectors_too_large_for_the_device_are_reranked_on_the_host(monkeypatch, caplog, data):
    use_fake_cupy(monkeypatch, free_bytes=1 << 20)
    x, queries = data
    with caplog.at_level(logging.INFO, logger="vectordb"):
        index = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="cupy")
    assert index.backend == "cupy" and not index._state.searcher.vectors_on_device
    assert any("reranking on the host" in r.getMessage() for r in caplog.records)
    want = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy")
    assert_same_neighbours(index.search_batch(queries, K), want.search_batch(queries, K))


def test_writes_go_on_when_the_device_copy_cannot_grow(monkeypatch, caplog, data):
    use_fake_cupy(monkeypatch)
    cupy = sys.modules["cupy"]
    x, queries = data
    full = [False]
    allocate = cupy.empty

    def empty(shape, dtype=float, *args, **kwargs):
        shape = tuple(np.atleast_1d(shape))
        if full[0] and len(shape) == 2 and shape[1] == x.shape[1] and shape[0] > 3_000:
            raise MemoryError("out of device memory (simulated)")  # a larger vector copy
        return allocate(shape, dtype, *args, **kwargs)

    cupy.empty = empty
    index = vdb.ClusteredIndex.build(x[:3_000], max_leaf_size=300, backend="cupy")
    full[0] = True
    with caplog.at_level(logging.INFO, logger="vectordb"):
        index.add(x[3_000:3_500])
    assert not index._state.searcher.vectors_on_device
    assert any("reranking on the host" in r.getMessage() for r in caplog.records)
    index.delete([5])
    index.add(x[3_500:3_600])
    want = vdb.ClusteredIndex.build(x[:3_000], max_leaf_size=300, backend="numpy")
    want.add(x[3_000:3_500])
    want.delete([5])
    want.add(x[3_500:3_600])
    assert_same_neighbours(index.search_batch(queries, K), want.search_batch(queries, K))


def test_small_batches_run_on_the_cpu(monkeypatch, data):
    """Below MIN_DEVICE_BATCH queries the CPU path answers: bit for bit NumPy's."""
    from vectordb.backends import cupy_backend

    use_fake_cupy(monkeypatch)
    x, queries = data
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="cupy")
    want = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy")
    small = queries[: cupy_backend.MIN_DEVICE_BATCH - 1]
    got, expected = index.search_batch(small, K), want.search_batch(small, K)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_an_emptied_index_answers_with_padding(data, backend_name):
    x, queries = data
    index = vdb.ClusteredIndex.build(x[:500], max_leaf_size=100, backend=backend_name)
    index.delete(index.ids)
    index.compact()
    ids, dists = index.search_batch(queries[:20], K)
    assert (ids == -1).all() and np.isinf(dists).all()
    assert (index.search(queries[0], K)[0] == -1).all()


def test_searches_on_threads_while_writing(data, backend_name, oracle):
    """Each search thread has its own stream on the GPU; a write publishes a new state
    (new device copies of what changed) while searches run on the old one. A search sees
    one state: no id deleted before it started, none added after it ended, and every
    distance the exact one of the id returned."""
    import threading
    import time

    x, _ = data
    rng = np.random.default_rng(4)
    steps = 8
    doomed = np.concatenate([np.arange(s * 50, s * 50 + 25) for s in range(steps)])
    # Queries next to vectors that get deleted, and next to vectors that get added.
    near = np.concatenate([rng.choice(doomed, 16, replace=False), rng.integers(2_000, 3_600, 16)])
    queries = (x[near] + rng.normal(0, 0.01, (32, x.shape[1]))).astype(np.float32)
    true = oracle.distances(x[:3_600], queries, "l2")
    index = vdb.ClusteredIndex.build(x[:2_000], max_leaf_size=200, backend=backend_name)
    errors: list[BaseException] = []
    done = threading.Event()
    lock = threading.Lock()
    progress = {"deleted": 0, "added": 2_000}  # deletes finished; ids < "added" may exist
    searches = [0]

    def search() -> None:
        try:
            while not done.is_set():
                with lock:
                    gone = doomed[: 25 * progress["deleted"]]
                ids, dists = index.search_batch(queries, K)
                with lock:
                    issued = progress["added"]
                    searches[0] += 1
                assert (ids >= 0).all() and (ids < issued).all(), "an id not yet added"
                assert not np.isin(ids, gone).any(), "an id deleted before the search began"
                assert all(np.unique(row).size == K for row in ids)
                np.testing.assert_allclose(
                    dists, np.take_along_axis(true, ids, axis=1), rtol=1e-4, atol=1e-4
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3000):  # let the searches get going before the first write
            with lock:
                if searches[0] >= 3 or errors:
                    break
            time.sleep(0.01)
        for step in range(steps):
            with lock:
                progress["added"] += 200
            new = index.add(x[2_000 + 200 * step : 2_200 + 200 * step])
            np.testing.assert_array_equal(new, np.arange(2_000 + 200 * step, 2_200 + 200 * step))
            index.delete(doomed[25 * step : 25 * step + 25])
            with lock:
                progress["deleted"] += 1
            if step % 3 == 2:
                index.compact()  # rows renumbered under running searches
        index.compact()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    live = np.setdiff1d(np.arange(3_600), doomed)
    np.testing.assert_array_equal(index.ids, live)
    got = index.search_batch(queries, K)
    assert_brute_force_answer(got, x[live], live, queries, "l2", oracle, 0.8)
    exact = index.search_batch(queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(
        np.searchsorted(live, exact[0]), exact[1], oracle.distances(x[live], queries, "l2"), K
    )
    if backend_name != "numpy":
        reference = vdb.ClusteredIndex.build(x[:2_000], max_leaf_size=200, backend="numpy")
        for step in range(steps):  # the same writes: the same tree
            reference.add(x[2_000 + 200 * step : 2_200 + 200 * step])
            reference.delete(doomed[25 * step : 25 * step + 25])
            if step % 3 == 2:
                reference.compact()
        reference.compact()
        assert_same_neighbours(got, reference.search_batch(queries, K))
