"""Backends: one test body per backend, and the choice of backend when CuPy is unusable.

Three variants of each body: ``numpy``; ``cupy`` on a real GPU (skipped where CuPy or a
CUDA device is missing); and ``cupy-emulated``, the CuPy backend's code run on
``tests/fake_cupy.py`` (NumPy arrays, the kernels re-done in NumPy), on every machine.
The dispatch and error paths are tested everywhere by simulating an unusable CuPy.

The GPU runs float32 steps in another summation order than NumPy, so results are
compared as neighbours, not bits: ids agree (a tie within rounding may go either way) and
distances agree to float32 rounding. Hamming distances are compared exactly.
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
from vectordb.backends import numpy_backend
from vectordb.codes import pack_signs

K = 10
#: Share of result positions whose ids may differ between backends (ties within rounding).
ID_SLACK = 0.01


@pytest.fixture(autouse=True)
def fresh_probe():
    """Forget the cached CuPy probe (tests below fake its outcome)."""
    backends._probe_cupy.cache_clear()
    backends._cupy_backend.cache_clear()
    backends._logged.clear()
    yield
    backends._probe_cupy.cache_clear()
    backends._cupy_backend.cache_clear()


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


@pytest.fixture(params=["numpy", "cupy", "cupy-emulated"])
def backend_name(request, monkeypatch):
    if request.param == "cupy":
        cupy_or_skip()
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


def test_hamming_matches_numpy(backend_name):
    backend = backends.resolve_backend(backend_name)
    assert backend.name == backend_name
    rng = np.random.default_rng(0)
    q = pack_signs(rng.standard_normal((37, 300)).astype(np.float32))
    codes = np.ascontiguousarray(pack_signs(rng.standard_normal((5000, 300)).astype(np.float32)).T)
    got = backend.hamming(q, codes)
    assert got.dtype == np.uint16 and got.shape == (37, 5000)
    np.testing.assert_array_equal(got, numpy_backend.hamming(q, codes))


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_search_results_equal_the_numpy_backend(data, backend_name, metric):
    x, queries = data
    reference = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=300, backend="numpy")
    index = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=300, backend=backend_name)
    assert index.backend == backend_name
    for probes, rerank_factor in [(1, 1), (4, 5), (16, 2)]:
        want = reference.search_batch(queries, K, probes=probes, rerank_factor=rerank_factor)
        got = index.search_batch(queries, K, probes=probes, rerank_factor=rerank_factor)
        assert_same_neighbours(got, want, exact=backend_name == "numpy")
        alone = [
            index.search(v, K, probes=probes, rerank_factor=rerank_factor) for v in queries[:20]
        ]
        stacked = (np.stack([a[0] for a in alone]), np.stack([a[1] for a in alone]))
        alone_or_batched = (got[0][:20], got[1][:20])
        assert_same_neighbours(stacked, alone_or_batched, exact=backend_name == "numpy")


def test_the_beam_widens_for_queries_short_of_candidates(data, backend_name):
    """k larger than a leaf: routing must widen the beam on every backend."""
    x, queries = data
    reference = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend="numpy")
    index = vdb.ClusteredIndex.build(x, max_leaf_size=300, backend=backend_name)
    for probes in (1, 40):  # the beam kernel, and the array code for wide beams
        want = reference.search_batch(queries[:40], 400, probes=probes, rerank_factor=1)
        got = index.search_batch(queries[:40], 400, probes=probes, rerank_factor=1)
        assert (got[0] >= 0).all()  # 400 found for every query
        assert_same_neighbours(got, want, exact=backend_name == "numpy")


def test_a_query_that_widens_does_not_widen_the_others(monkeypatch, data):
    """One query far from the few live rows needs many leaves; the rest of its batch keeps
    its own few (device memory grows with the widest row otherwise)."""
    from vectordb.metrics import prepare

    use_fake_cupy(monkeypatch)
    x = data[0]
    index = vdb.ClusteredIndex.build(x, max_leaf_size=50, backend="cupy")
    near = np.argsort(((x - x[0]) ** 2).sum(axis=1))[:300]
    index.delete(np.setdiff1d(np.arange(len(x)), near))
    batch = np.concatenate([x[near[:63]] + 0.01, -x[:1]])
    sel = index._state.selector
    rotated = index._quantizer.rotate(prepare(batch, index.metric))
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
    assert_same_neighbours(got, want)


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
        (no_cupy, "CuPy is not installed; pip install 'vectordb[gpu-cuda12]'"),
        (lambda mp: fake_cupy(mp, devices=0), "no CUDA device found"),
        (lambda mp: fake_cupy(mp, compile_error=True), "failed to compile or run"),
    ],
)
def test_unusable_cupy(monkeypatch, caplog, data, simulate, cause):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    simulate(monkeypatch)
    assert vdb.available_backends() == ["numpy"]
    with pytest.raises(vdb.BackendUnavailableError, match="cupy backend is unavailable") as info:
        vdb.ClusteredIndex.build(data[0][:500], backend="cupy")
    assert cause in str(info.value)
    with caplog.at_level(logging.INFO, logger="vectordb"):
        a = vdb.ClusteredIndex.build(data[0][:500], backend="auto")
        b = vdb.ClusteredIndex.build(data[0][:500])
    assert a.backend == b.backend == "numpy"
    lines = [r.getMessage() for r in caplog.records if "numpy backend" in r.getMessage()]
    assert len(lines) == 1 and cause in lines[0]  # one line, saying why


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


def test_importing_and_using_vectordb_never_imports_cupy():
    code = (
        "import sys, numpy as np, vectordb as vdb\n"
        "x = vdb.make_clustered(300, 16, seed=1)\n"
        "vdb.ClusteredIndex.build(x, backend='numpy').search(x[0])\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mutations_filters_and_deletions_equal_the_numpy_backend(data, backend_name):
    """Tombstones, the delta part and filter masks go through the backend's own kernel."""
    x, queries = data
    meta = [{"even": i % 2 == 0} for i in range(3_000)]
    indexes = {
        name: vdb.ClusteredIndex.build(x[:3_000], metadata=meta, max_leaf_size=300, backend=name)
        for name in {"numpy", backend_name}
    }
    for index in indexes.values():
        index.add(x[3_000:3_400], metadata=[{"even": i % 2 == 0} for i in range(400)])
        index.delete(np.arange(0, 3_000, 5))
        index.upsert(x[3_400:3_450], ids=np.arange(100, 150))
    want = indexes["numpy"]
    got = indexes[backend_name]
    for kwargs in ({}, {"filter": {"even": True}}, {"probes": 16, "rerank_factor": 2}):
        a = want.search_batch(queries, K, **kwargs)
        b = got.search_batch(queries, K, **kwargs)
        assert_same_neighbours(b, a)


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
    return index, index._state.selector


@pytest.mark.parametrize("probes", [1, 3, 8, 40])  # the kernel, and array code past 32
def test_device_routing_picks_the_cpu_leaves(monkeypatch, data, probes):
    from vectordb.metrics import prepare

    x, queries = data
    index, sel = emulated_index(monkeypatch, x, max_leaf_size=100)
    q = index._quantizer.rotate(prepare(queries, index.metric))
    got, wide = sel._route(q, probes, 1, np.asarray(index._state.live_sizes))
    want = index._state.tree.route(q, probes, index.metric)
    assert wide is None
    same = [
        set(g[g >= 0].tolist()) == set(w[w >= 0].tolist()) for g, w in zip(got, want, strict=True)
    ]
    assert np.mean(same) >= 0.99


def test_device_routing_widens_for_queries_short_of_rows(monkeypatch, data):
    from vectordb.metrics import prepare

    x, queries = data
    index, sel = emulated_index(monkeypatch, x, max_leaf_size=100)
    q = index._quantizer.rotate(prepare(queries[:20], index.metric))
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
    q = np.ones((3, index._quantizer.bits), dtype=np.float32)
    leaves, wide = sel._route(q, 4, K, np.asarray(index._state.live_sizes))
    np.testing.assert_array_equal(leaves, np.zeros((3, 1)))
    assert wide is None


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_device_rerank_matches_the_cpu_rerank(monkeypatch, metric):
    from vectordb.metrics import prepare
    from vectordb.scan import rerank

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
    before = index._state.selector
    assert before.vectors_on_device
    index.add(x[3_200:3_210])  # goes to the delta part alone
    after = index._state.selector
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
    assert index.backend == "cupy" and not index._state.selector.vectors_on_device
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
    assert not index._state.selector.vectors_on_device
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


def test_searches_on_threads_while_writing(data, backend_name):
    """Each search thread has its own stream on the GPU; a write publishes a new state
    (new device copies of what changed) while searches run on the old one."""
    import threading

    x, queries = data
    index = vdb.ClusteredIndex.build(x[:2_000], max_leaf_size=200, backend=backend_name)
    errors: list[BaseException] = []
    done = threading.Event()

    def search() -> None:
        try:
            while not done.is_set():
                ids, dists = index.search_batch(queries[:32], K)
                assert (ids >= 0).all() and (ids < 4_000).all()
                assert (np.diff(dists, axis=1) >= 0).all()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for step in range(8):
            index.add(x[2_000 + 200 * step : 2_200 + 200 * step])
            index.delete(np.arange(step * 50, step * 50 + 25))
        index.compact()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    reference = vdb.ClusteredIndex.build(x[:2_000], max_leaf_size=200, backend="numpy")
    for step in range(8):
        reference.add(x[2_000 + 200 * step : 2_200 + 200 * step])
        reference.delete(np.arange(step * 50, step * 50 + 25))
    reference.compact()
    assert_same_neighbours(
        index.search_batch(queries, K),
        reference.search_batch(queries, K),
        exact=backend_name == "numpy",
    )
