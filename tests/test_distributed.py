"""vectordb.distributed without Ray: the merge kernel, placement, the layout and its
manifest, and ShardedEngine on in-process shards (address="local-threads"), failover
included. Ray itself: tests/test_ray.py."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vectordb as vdb
from vectordb.distributed import (
    SearchResult,
    ShardedEngine,
    ShardUnavailableError,
    build_shards,
    merge_topk,
    read_layout,
)
from vectordb.distributed.layout import CENTROIDS, MANIFEST
from vectordb.distributed.placement import hash_shards, splitmix64

LOCAL = "local-threads"
K = 10


# --------------------------------------------------------------------------- merge


@st.composite
def shard_answers(draw):
    """Shards' sorted top-k answers with distinct ids, tied distances and padding."""
    shards = draw(st.integers(1, 5))
    nq = draw(st.integers(1, 4))
    ks = draw(st.integers(1, 6))
    k = draw(st.integers(1, 3 * ks * shards))
    ids = np.full((shards, nq, ks), -1, np.int64)
    dists = np.full((shards, nq, ks), np.inf, np.float32)
    pool = iter(draw(st.permutations(range(shards * nq * ks))))
    for s in range(shards):
        for q in range(nq):
            real = draw(st.integers(0, ks))
            d = sorted(
                draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=real, max_size=real))
            )
            for j in range(real):
                ids[s, q, j] = next(pool)
                dists[s, q, j] = d[j]
    return ids, dists, k


@settings(max_examples=200, deadline=None)
@given(shard_answers())
def test_merge_is_the_exact_global_top_k(case):
    ids, dists, k = case
    got_ids, got_d = merge_topk(ids, dists, k)
    nq = ids.shape[1]
    assert got_ids.shape == got_d.shape == (nq, k)
    for q in range(nq):
        pairs = sorted(
            (float(d), int(i))
            for i, d in zip(ids[:, q].ravel(), dists[:, q].ravel(), strict=False)
            if i >= 0
        )[:k]
        want_ids = [i for _, i in pairs] + [-1] * (k - len(pairs))
        want_d = [d for d, _ in pairs] + [math.inf] * (k - len(pairs))
        assert got_ids[q].tolist() == want_ids
        assert got_d[q].tolist() == want_d


def test_splitmix64_is_the_reference_function_and_spreads_ids_evenly():
    # splitmix64's first outputs from state 0 (Vigna's reference C code).
    assert int(splitmix64(np.array([0], np.int64))[0]) == 0xE220A8397B1DCDAF
    counts = np.bincount(hash_shards(np.arange(80_000, dtype=np.int64), 8), minlength=8)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000


def test_importing_vectordb_never_imports_ray():
    code = "import sys, vectordb, vectordb.distributed; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def data():
    x = vdb.make_clustered(3_050, 32, seed=5)
    return x[:3_000], x[3_000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory, data):
    """Sharded copies of ``data`` (never written to): hash and kmeans, 4 shards."""
    x, _ = data
    root = tmp_path_factory.mktemp("sharded")
    meta = [{"even": i % 2 == 0} for i in range(x.shape[0])]
    for placement in ("hash", "kmeans"):
        build_shards(
            x,
            root / placement,
            shards=4,
            placement=placement,
            metadata=meta,
            max_leaf_size=100,
            progress=False,
        )
    return root


@pytest.mark.parametrize("placement", ["hash", "kmeans"])
def test_layout_is_written_and_read_back(built, data, placement):
    layout = read_layout(built / placement)
    assert layout.shards == 4 and layout.dim == 32 and layout.placement == placement
    assert sum(layout.counts) == data[0].shape[0]
    assert (layout.centroids is not None) == (placement == "kmeans")
    for s in range(4):
        index = vdb.ClusteredIndex.open(built / placement / f"shard-{s:04d}", readonly=True)
        assert len(index) == layout.counts[s]
        index.close()


def test_a_memory_mapped_input_builds_the_same_shards(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = build_shards(mapped, tmp_path / "a", shards=3, placement="kmeans", progress=False)
    b = build_shards(x, tmp_path / "b", shards=3, placement="kmeans", progress=False)
    assert a.counts == b.counts
    np.testing.assert_array_equal(a.centroids, b.centroids)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"shards": 0}, vdb.InvalidParameterError, "shards"),
        ({"shards": 2.0}, vdb.InvalidParameterError, "shards"),
        ({"shards": True}, vdb.InvalidParameterError, "shards"),
        ({"shards": 2, "placement": "range"}, vdb.InvalidParameterError, "placement"),
        ({"shards": 2, "ids": [1] * 100}, vdb.DuplicateIdError, "twice"),
        ({"shards": 2, "ids": list(range(99))}, vdb.InvalidParameterError, "ids"),
        ({"shards": 2, "metadata": [{}] * 3}, vdb.InvalidParameterError, "metadata"),
        ({"shards": 2, "metric": "l3"}, vdb.InvalidParameterError, "metric"),
        ({"shards": 2, "bogus": 1}, vdb.InvalidParameterError, "bogus"),
    ],
)
def test_bad_build_input(tmp_path, data, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        build_shards(data[0][:100], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_vectors_and_an_existing_path(tmp_path, data):
    x = data[0][:100].copy()
    x[7, 3] = np.nan
    with pytest.raises(vdb.InvalidVectorsError):
        build_shards(x, tmp_path / "nan", shards=2, progress=False)
    with pytest.raises(vdb.InvalidVectorsError):
        build_shards(np.zeros((0, 4)), tmp_path / "empty", shards=2, progress=False)
    (tmp_path / "there").mkdir()
    with pytest.raises(vdb.StorageError, match="exists"):
        build_shards(data[0][:100], tmp_path / "there", shards=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def _copy(built, tmp_path, placement="kmeans"):
    import shutil

    return Path(shutil.copytree(built / placement, tmp_path / placement))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: "{not json", "not JSON"),
        (lambda m: json.dumps([1, 2]), "not a JSON object"),
        (lambda m: json.dumps({**m, "format": "other"}), "format"),
        (lambda m: json.dumps({**m, "version": 99}), "version"),
        (lambda m: json.dumps({**m, "shards": 5}), "counts|shard-0004"),
        (lambda m: json.dumps({**m, "shards": 10**9}), "shards"),
        (lambda m: json.dumps({**m, "shards": "4"}), "shards"),
        (lambda m: json.dumps({**m, "dim": 0}), "dim"),
        (lambda m: json.dumps({**m, "metric": "l3"}), "metric"),
        (lambda m: json.dumps({**m, "placement": "range"}), "placement"),
        (lambda m: json.dumps({**m, "counts": [1, 2]}), "counts"),
        (lambda m: json.dumps({**m, "counts": [-1, 0, 0, 0]}), "counts"),
        (lambda m: json.dumps({**m, "centroids": None}), "centroids"),
        (lambda m: json.dumps({**m, "centroids": {"file": "../x", "crc32": 1}}), "centroids"),
        (lambda m: json.dumps({**m, "dim": 33}), "centroids.npy"),
        (lambda m: " " * (2 << 20), "larger"),
        (lambda m: "[" * 100_000, "not JSON"),
    ],
)
def test_hostile_or_damaged_manifest(built, tmp_path, change, fragment):
    root = _copy(built, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(change(manifest))
    with pytest.raises(vdb.InvalidIndexFileError, match=fragment):
        read_layout(root)


def test_damaged_centroids_and_missing_shards(built, tmp_path):
    root = _copy(built, tmp_path)
    data = bytearray((root / CENTROIDS).read_bytes())
    data[-1] ^= 0xFF
    (root / CENTROIDS).write_bytes(bytes(data))
    with pytest.raises(vdb.InvalidIndexFileError, match="CRC32"):
        read_layout(root)
    root = _copy(built, tmp_path / "2", "hash")
    import shutil

    shutil.rmtree(root / "shard-0002")
    with pytest.raises(vdb.InvalidIndexFileError, match="shard-0002"):
        read_layout(root)
    with pytest.raises(vdb.InvalidIndexFileError, match="missing"):
        read_layout(tmp_path)


@pytest.mark.asyncio
async def test_a_shard_that_disagrees_with_the_manifest(built, tmp_path, data):
    root = _copy(built, tmp_path, "hash")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["metric"] = "ip"
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(vdb.InvalidIndexFileError, match="metric"):
        await ShardedEngine.open(root, address=LOCAL)


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("placement", ["hash", "kmeans"])
@pytest.mark.asyncio
async def test_exact_parameters_give_the_exact_global_top_k(built, data, oracle, placement):
    x, q = data
    async with await ShardedEngine.open(built / placement, address=LOCAL, replicas=2) as e:
        ids, dists = await e.search_batch(q, K, probes=10_000, rerank_factor=1_000)
        one = await asyncio.gather(
            *(e.search(qq, K, probes=10_000, rerank_factor=1_000) for qq in q[:8])
        )
    oracle.assert_exact(ids, dists, oracle.distances(x, q, "l2"), K)
    for row, (i, d) in enumerate(one):
        np.testing.assert_array_equal(i, ids[row])
        np.testing.assert_array_equal(d, dists[row])


@pytest.mark.asyncio
async def test_k_beyond_the_data_pads_last(tmp_path, data, oracle):
    x = data[0][:30]
    build_shards(x, tmp_path / "s", shards=4, progress=False)
    async with await ShardedEngine.open(tmp_path / "s", address=LOCAL) as e:
        ids, dists = await e.search_batch(data[1][:5], 50, rerank_factor=100)
    oracle.assert_exact(ids, dists, oracle.distances(x, data[1][:5], "l2"), 50)


@pytest.mark.parametrize("placement", ["hash", "kmeans"])
@pytest.mark.asyncio
async def test_recall_against_brute_force(built, data, oracle, placement):
    x, q = data
    async with await ShardedEngine.open(built / placement, address=LOCAL) as e:
        ids, _ = await e.search_batch(q, K)
    assert oracle.recall(ids, oracle.distances(x, q, "l2"), K) >= 0.9


@pytest.mark.asyncio
async def test_filters_apply_in_every_shard_before_its_top_k(built, data, oracle):
    x, q = data
    even = np.arange(0, x.shape[0], 2)
    async with await ShardedEngine.open(built / "hash", address=LOCAL) as e:
        ids, dists = await e.search_batch(
            q, K, probes=10_000, rerank_factor=1_000, filter={"even": True}
        )
    assert (ids % 2 == 0).all()
    true = oracle.distances(x[even], q, "l2")
    oracle.assert_exact(ids // 2, dists, true, K)


@pytest.mark.asyncio
async def test_routing_to_the_nearest_shards(built, data, oracle):
    x, q = data
    true = oracle.distances(x, q, "l2")
    async with await ShardedEngine.open(built / "kmeans", address=LOCAL, route=2) as e:
        routed, _ = await e.search_batch(q, K)
        everywhere, _ = await e.search_batch(q, K, route=4)
        result = await e.search(q[0], K, route=1, return_partial=True)
    assert isinstance(result, SearchResult) and not result.partial
    assert oracle.recall(routed, true, K) >= 0.8
    assert oracle.recall(everywhere, true, K) >= oracle.recall(routed, true, K) - 0.02


@pytest.mark.asyncio
async def test_bad_search_and_open_parameters(built, data):
    with pytest.raises(vdb.InvalidParameterError, match="kmeans"):
        await ShardedEngine.open(built / "hash", address=LOCAL, route=2)
    for bad in (
        {"replicas": 0},
        {"shard_timeout": 0},
        {"shard_timeout": math.inf},
        {"max_restarts": -1},
        {"allow_partial": 1},
        {"route": 5},
        {"max_wait": 2},
    ):
        with pytest.raises(vdb.InvalidParameterError):
            await ShardedEngine.open(built / "kmeans", address=LOCAL, **bad)
    async with await ShardedEngine.open(built / "hash", address=LOCAL) as e:
        with pytest.raises(vdb.DimensionMismatchError):
            await e.search(np.zeros(7, np.float32))
        with pytest.raises(vdb.InvalidParameterError, match="k"):
            await e.search(data[1][0], k=0)
        with pytest.raises(vdb.InvalidParameterError, match="kmeans"):
            await e.search(data[1][0], route=1)
        with pytest.raises(vdb.InvalidParameterError, match="filter"):
            await e.search(data[1][0], filter={"even": {"$bogus": 1}})
        with pytest.raises(vdb.DimensionMismatchError):
            await e.add(np.zeros((2, 7), np.float32))


@pytest.mark.asyncio
async def test_replica_options_reach_each_replica_and_its_restart(built, data, monkeypatch):
    """Per-replica placement (``replica_options``): checked at open, each replica's own
    options handed to the backend, and the same again when the replica is restarted."""
    from vectordb.distributed import engine as engine_module
    from vectordb.distributed.backends.local import LocalBackend

    path = built / "hash"
    for bad, fragment in (
        ({"replica_options": {"resources": {}}}, "callable"),
        ({"replica_options": lambda s, r: None}, r"replica_options\(0, 0\)"),
        ({"replica_options": lambda s, r: {}}, "not local-threads"),
    ):
        with pytest.raises(vdb.InvalidParameterError, match=fragment):
            await ShardedEngine.open(path, address=LOCAL, **bad)

    seen: list[tuple[str, bool, dict]] = []

    class Recording(LocalBackend):
        async def start(self, path, *, writer, options, timeout, actor_options=None):
            seen.append((Path(path).name, writer, dict(actor_options or {})))
            return await super().start(path, writer=writer, options=options, timeout=timeout)

    monkeypatch.setattr(engine_module, "_backend", lambda *args: Recording())
    _, q = data
    async with await ShardedEngine.open(
        path,
        address="ray-stand-in",
        replicas=2,
        replica_options=lambda s, r: {"resources": {f"node_{(s + r) % 2}": 0.01}},
    ) as e:
        assert sorted(seen) == sorted(
            (f"shard-{s:04d}", r == 0, {"resources": {f"node_{(s + r) % 2}": 0.01}})
            for s in range(4)
            for r in range(2)
        )
        seen.clear()
        await e.actors()[1][1].kill()
        for _ in range(3):  # round robin: the dead one is asked, then restarted
            await e.search(q[0], K)
        while len(e.actors()[1]) < 2:
            await asyncio.sleep(0.01)
        assert seen == [("shard-0001", False, {"resources": {"node_0": 0.01}})]


# --------------------------------------------------------------------------- writes


@pytest.mark.parametrize("placement", ["hash", "kmeans"])
@pytest.mark.asyncio
async def test_writes_save_and_reopen(built, data, tmp_path, placement):
    root = _copy(built, tmp_path, placement)
    x, q = data
    async with await ShardedEngine.open(root, address=LOCAL, replicas=2) as e:
        assert await e.count() == 3_000
        new = await e.add(q[:3], metadata=[{"tag": "new"}, None, None])
        assert new.tolist() == [3_000, 3_001, 3_002]
        ids, dists = await e.search(q[0], 1)  # a reader replica answers too: refreshed
        assert ids[0] == 3_000 and dists[0] == pytest.approx(0.0, abs=1e-4)
        with pytest.raises(vdb.DuplicateIdError, match="3001"):
            await e.add(q[:1], ids=[3_001])
        moved = q[1] + 5.0
        await e.upsert(moved[None], [3_000])
        ids, _ = await e.search(moved, 1)
        assert ids[0] == 3_000
        np.testing.assert_allclose(await e.get_vectors([3_000, 5]), np.stack([moved, x[5]]))
        assert await e.get_metadata(3_000) in ({"tag": "new"}, None)
        assert await e.delete([3_001, 3_002]) == 2
        with pytest.raises(vdb.UnknownIdError):
            await e.delete([3_001])
        assert await e.delete([3_001], missing_ok=True) == 0
        with pytest.raises(vdb.UnknownIdError):
            await e.get_vectors([3_001])
        assert await e.count() == 3_001
        await e.save()
        await e.save(tmp_path / "copy")
    for path in (root, tmp_path / "copy"):
        async with await ShardedEngine.open(path, address=LOCAL) as e:
            assert await e.count() == 3_001
            ids, _ = await e.search(moved, 1)
            assert ids[0] == 3_000
            assert (await e.search(q[1], 3))[0].tolist().count(3_001) == 0


# --------------------------------------------------------------------------- faults


@pytest.mark.asyncio
async def test_a_killed_replica_fails_over_and_restarts(built, data):
    _x, q = data
    async with await ShardedEngine.open(built / "hash", address=LOCAL, replicas=2) as e:
        want = await e.search_batch(q, K)
        await e.actors()[1][0].kill()
        await e.actors()[2][1].kill()
        for _ in range(3):  # round robin: every replica is asked
            got = await e.search_batch(q, K)
            np.testing.assert_array_equal(got[0], want[0])

        async def restarted() -> None:
            while min(len(a) for a in e.actors()) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(restarted(), 60)  # a failed restart fails, never hangs


@pytest.mark.asyncio
async def test_no_replica_left_raises_or_answers_partially(built, data):
    x, q = data
    path = built / "hash"
    async with await ShardedEngine.open(
        path, address=LOCAL, max_restarts=0, allow_partial=True, shard_timeout=5
    ) as e:
        full = await e.search_batch(q, K)
        await e.actors()[3][0].kill()
        with pytest.raises(ShardUnavailableError, match="shard 3") as info:
            await e.search(q[0], K)
        assert info.value.shard == 3 and isinstance(info.value, vdb.VectorDBError)
        result = await e.search_batch(q, K, return_partial=True)
        assert result.partial and result.missing == (3,)
        layout = read_layout(path)
        in_3 = hash_shards(result.ids[result.ids >= 0], layout.shards) == 3
        assert not in_3.any()
        kept = full[0][hash_shards(np.maximum(full[0], 0), 4) != 3]
        assert set(kept.tolist()) <= set(result.ids.ravel().tolist())
        fresh = np.arange(10_000, 10_100)
        owned_by_3 = fresh[hash_shards(fresh, 4) == 3][:2]
        with pytest.raises(ShardUnavailableError, match="shard 3"):
            await e.add(x[:2], ids=owned_by_3)


@pytest.mark.asyncio
async def test_a_hung_shard_is_bounded_by_shard_timeout(built, data, monkeypatch):
    from vectordb.distributed.server import ShardServer

    _x, q = data
    async with await ShardedEngine.open(
        built / "hash", address=LOCAL, max_restarts=0, shard_timeout=0.5
    ) as e:
        hung = e.actors()[0][0].server

        async def forever(*args):
            await asyncio.Event().wait()

        monkeypatch.setattr(hung, "search", forever)
        with pytest.raises(ShardUnavailableError, match="shard 0"):
            await e.search(q[0], K)
        assert isinstance(hung, ShardServer)


@pytest.mark.asyncio
async def test_timeout_and_close(built, data):
    _x, q = data
    e = await ShardedEngine.open(built / "hash", address=LOCAL)
    with pytest.raises(asyncio.TimeoutError):
        await e.search(q[0], K, timeout=0)
    searches = [asyncio.ensure_future(e.search(qq, K)) for qq in q[:20]]
    await asyncio.sleep(0)
    await asyncio.gather(e.aclose(), e.aclose())
    await e.aclose()
    assert all(s.done() for s in searches)
    assert sum(s.exception() is None for s in searches) == 20
    assert e.actors() == [[], [], [], []]
    with pytest.raises(vdb.EngineClosedError):
        await e.search(q[0], K)
