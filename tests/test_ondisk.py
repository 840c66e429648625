"""A build in bounded memory straight into a directory (``ClusteredIndex.build(path=...)``):
its answers against brute force and the in-RAM build, its inputs, its limits, and that an
interrupted or killed build leaves nothing at the path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb
from vectordb.index import ondisk

K = 10


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(6_200, 48, seed=8)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and samples far smaller than the data, as for an input larger than RAM: of
    the default 1 GiB, a sample of 1,398 rows of 48 d, blocks of 559."""
    monkeypatch.setattr(ondisk, "_SAMPLE_SHARE", 0.00025)
    monkeypatch.setattr(ondisk, "_BLOCK_SHARE", 0.0001)


def brute(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return np.argsort(-(q @ x.T), axis=1)[:, :K]
    if metric == "ip":
        return np.argsort(-(q @ x.T), axis=1)[:, :K]
    return np.argsort(((q[:, None] - x[None]) ** 2).sum(axis=2), axis=1)[:, :K]


def recall(found: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, true, strict=True)]))


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_an_index_built_on_disk_answers_as_one_built_in_ram(data, tmp_path, small_blocks, metric):
    x, q = data[:6_000], data[6_000:]
    np.save(tmp_path / "x.npy", x)
    source = np.load(tmp_path / "x.npy", mmap_mode="r")
    meta = [{"n": i} for i in range(6_000)]
    index = vdb.ClusteredIndex.build(
        source, metric=metric, max_leaf_size=200, metadata=meta, path=tmp_path / "idx"
    )
    assert index.is_using_mmap and index.mmap_path == tmp_path / "idx" / "vectors.bin"
    assert sorted(os.listdir(tmp_path)) == ["idx", "x.npy"]  # no work left beside it
    true = brute(x, q, metric)
    in_ram = vdb.ClusteredIndex.build(x, metric=metric, max_leaf_size=200)
    got, want = (
        recall(index.search_batch(q, K)[0], true),
        recall(in_ram.search_batch(q, K)[0], true),
    )
    assert got >= 0.93 and got >= want - 0.03, (got, want)
    assert 0.5 < index.n_leaves / in_ram.n_leaves < 2
    exact = index.search_batch(q, K, probes=index.n_leaves, rerank_factor=6_000 // K)
    assert recall(exact[0], true) >= 0.99
    assert index.get_metadata(17) == {"n": 17}
    assert len(index.ids_matching({"n": {"$lt": 10}})) == 10
    np.testing.assert_array_equal(index.get_vectors([3, 4000]), in_ram.get_vectors([3, 4000]))
    vdb.ClusteredIndex.open(tmp_path / "idx", verify=True).close()  # sizes and CRC32s agree
    index.add(q[:5])  # an ordinary index from here on
    assert len(index) == 6_005
    index.close()


def test_an_iterable_of_batches_with_ids(data, tmp_path, small_blocks):
    x, q = data[:6_000], data[6_000:]
    batches = (x[s : s + 700] for s in range(0, 6_000, 700))
    ids = np.arange(6_000) * 3 + 1
    with vdb.ClusteredIndex.build(batches, ids=ids, path=tmp_path / "idx") as index:
        found, _ = index.search_batch(q, K)
        assert recall((found - 1) // 3, brute(x, q, "l2")) >= 0.93
        assert np.array_equal(np.sort(index.ids), ids)
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_every_row_goes_to_its_nearest_leaf_in_chunks(data, monkeypatch):
    monkeypatch.setattr(ondisk, "_ASSIGN_BYTES", 4 * 7 * 64)  # chunks of the least, 64 rows
    x = data[:1_000]
    centres = data[1_000:1_007]
    want = np.argmin(((x[:, None] - centres[None]) ** 2).sum(axis=2), axis=1)
    np.testing.assert_array_equal(ondisk._nearest_leaves(x, None, centres), want)  # flat: no tree


def test_it_replaces_an_index_and_refuses_anything_else(data, tmp_path):
    x = data[:2_000]
    vdb.ClusteredIndex.build(x[:500], path=tmp_path / "idx").close()
    with vdb.ClusteredIndex.build(x, path=tmp_path / "idx") as index:
        assert len(index) == 2_000
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    with pytest.raises(vdb.StorageError, match="refusing to replace"):
        vdb.ClusteredIndex.build(x, path=tmp_path / "other")
    assert (tmp_path / "other" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"memory_limit": 1 << 20}, vdb.InvalidParameterError, "at least 64 MiB"),
        ({"memory_limit": "1G"}, vdb.InvalidParameterError, "number of bytes"),
        ({"leaf_scan": "vectors"}, vdb.InvalidParameterError, "leaf_scan='codes'"),
        ({"metadata": [{}] * 3}, vdb.InvalidParameterError, "3 entries"),
        ({"ids": [1, 2]}, vdb.InvalidParameterError, "ids"),
    ],
)
def test_bad_options_are_refused_and_leave_nothing(data, tmp_path, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        vdb.ClusteredIndex.build(data[:1_000], path=tmp_path / "idx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_memory_limit_without_a_path_is_refused(data):
    with pytest.raises(vdb.InvalidParameterError, match="path="):
        vdb.ClusteredIndex.build(data[:100], memory_limit=1 << 30)


@pytest.mark.parametrize(
    ("batches", "error", "fragment"),
    [
        ([np.ones((3, 4)), np.ones((2, 5))], vdb.DimensionMismatchError, "dimension 5"),
        ([], vdb.InvalidVectorsError, "gave no rows"),
        ([np.array([[1.0, np.nan]])], vdb.InvalidVectorsError, "NaN"),
        ([np.ones((3, 2)), "ab"], vdb.InvalidVectorsError, "batch 1"),
        (42, vdb.InvalidVectorsError, "iterable"),
    ],
)
def test_bad_batches_are_refused_and_leave_nothing(tmp_path, batches, error, fragment):
    with pytest.raises(error, match=fragment):
        vdb.ClusteredIndex.build(iter(batches) if batches != 42 else 42, path=tmp_path / "i")
    assert os.listdir(tmp_path) == []


def test_a_bad_row_deep_in_a_mapped_file_is_named(data, tmp_path, small_blocks):
    x = data[:6_000].copy()
    x[4_321, 7] = np.inf
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(vdb.InvalidVectorsError, match="row 4321, column 7"):
        vdb.ClusteredIndex.build(np.load(tmp_path / "x.npy", mmap_mode="r"), path=tmp_path / "i")
    assert os.listdir(tmp_path) == ["x.npy"]


def test_an_interrupt_leaves_the_old_index_and_no_work(data, tmp_path, monkeypatch):
    vdb.ClusteredIndex.build(data[:500], path=tmp_path / "idx").close()
    before = sorted(os.listdir(tmp_path / "idx"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ondisk, "_code", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vdb.ClusteredIndex.build(data[:3_000], path=tmp_path / "idx")
    assert (
        sorted(os.listdir(tmp_path)) == ["idx"] and sorted(os.listdir(tmp_path / "idx")) == before
    )
    with vdb.ClusteredIndex.open(tmp_path / "idx", verify=True) as index:
        assert len(index) == 500


_KILLED_BUILD = """
import os, signal, sys
import numpy as np
import vectordb as vdb
from vectordb.index import ondisk

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

ondisk._code = killed
vdb.ClusteredIndex.build(vdb.make_clustered(3_000, 16, seed=1), path=sys.argv[1])
"""


def test_a_killed_build_leaves_nothing_at_the_path_and_the_next_build_cleans_up(tmp_path):
    target = tmp_path / "idx"
    result = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(target)], check=False)
    assert result.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert not target.exists() and len(left) == 1 and left[0].startswith(".idx.build-")
    vdb.ClusteredIndex.build(vdb.make_clustered(500, 16, seed=2), path=target).close()
    assert os.listdir(tmp_path) == ["idx"]
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["n"] == 500


def test_the_vector_file_is_moved_in_not_copied(data, tmp_path, monkeypatch):
    from vectordb.storage import save

    def no_copy(*args, **kwargs):
        raise AssertionError("the vectors were copied")

    monkeypatch.setattr(save, "write_rows", no_copy)
    with vdb.ClusteredIndex.build(data[:2_000], path=tmp_path / "idx") as index:
        stored = np.fromfile(Path(index.mmap_path), dtype="<f4").reshape(-1, 48)
        np.testing.assert_array_equal(stored, index.get_vectors(index._state.row_id))


def test_a_zero_row_deep_in_the_input_is_named_for_cosine(data, tmp_path, small_blocks):
    x = data[:6_000].copy()
    x[5_000] = 0.0
    batches = (x[s : s + 1_000] for s in range(0, 6_000, 1_000))
    with pytest.raises(vdb.InvalidVectorsError, match="row 5000 is a zero vector"):
        vdb.ClusteredIndex.build(batches, metric="cosine", path=tmp_path / "i")
    assert os.listdir(tmp_path) == []


def test_a_mapped_npy_is_read_by_pread_and_others_as_arrays(data, tmp_path):
    from vectordb.core.metrics import Metric
    from vectordb.index.sources import FileRows, VectorSource

    x = data[:3_000]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x.astype(np.float64)))
    mapped = VectorSource.of(
        np.load(tmp_path / "x.npy", mmap_mode="r"), Metric.L2, 10_000, tmp_path
    )
    assert isinstance(mapped._rows, FileRows)  # nothing of the file mapped while it is read
    rows = np.array([0, 5, 2_999])
    np.testing.assert_array_equal(mapped.take(rows), x[rows])
    np.testing.assert_array_equal(np.concatenate([b for _, b in mapped.blocks()]), x)
    fortran = VectorSource.of(
        np.load(tmp_path / "f.npy", mmap_mode="r"), Metric.L2, 10_000, tmp_path
    )
    assert not isinstance(fortran._rows, FileRows)
    np.testing.assert_array_equal(fortran.block(10, 20), x[10:20])
    with vdb.ClusteredIndex.build(
        np.load(tmp_path / "f.npy", mmap_mode="r")[:2_000], path=tmp_path / "idx"
    ) as index:
        assert index.search(x[7], 1)[0][0] == 7


def test_page_cache_room_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from vectordb.storage.memory import page_cache_room

    proc, groups = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    (proc / "self" / "cgroup").write_text("4:memory:/box\n1:cpu:/\n")
    assert page_cache_room(proc, groups) == 2048 * 1024  # no cgroup files: MemAvailable
    box = groups / "memory" / "box"
    box.mkdir(parents=True)
    (box / "memory.limit_in_bytes").write_text("1000000\n")
    (box / "memory.stat").write_text("cache 5\nrss 300000\n")
    assert page_cache_room(proc, groups) == 700_000  # the limit less the group's own RSS
    (box / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert page_cache_room(proc, groups) == 2048 * 1024  # unlimited
    (proc / "self" / "cgroup").write_text("0::/v2box\n")
    v2 = groups / "v2box"
    v2.mkdir()
    (v2 / "memory.max").write_text("500000\n")
    (v2 / "memory.stat").write_text("anon 100000\nfile 9\n")
    assert page_cache_room(proc, groups) == 400_000
    (v2 / "memory.max").write_text("max\n")
    assert page_cache_room(proc, groups) == 2048 * 1024
    assert page_cache_room(tmp_path / "none", tmp_path / "none") is None


def test_warm_says_when_the_vectors_cannot_fit_in_the_page_cache(
    data, tmp_path, monkeypatch, caplog
):
    from vectordb.storage import vectors

    with vdb.ClusteredIndex.build(data[:2_000], path=tmp_path / "idx") as index:
        monkeypatch.setattr(vectors, "page_cache_room", lambda: 10_000)
        with caplog.at_level("WARNING", logger="vectordb"):
            assert index.warm() == 2_000 * 48 * 4  # still read: what fits helps
        assert "more than the 0.0 GB the page cache can hold" in caplog.text
        caplog.clear()
        monkeypatch.setattr(vectors, "page_cache_room", lambda: None)
        with caplog.at_level("WARNING", logger="vectordb"):
            index.warm()
        assert caplog.text == ""


@pytest.mark.asyncio
async def test_the_async_engine_serves_an_index_built_on_disk(data, tmp_path):
    vdb.ClusteredIndex.build(data[:3_000], path=tmp_path / "idx").close()
    async with await vdb.AsyncEngine.open(tmp_path / "idx", mmap=True) as engine:
        assert await engine.warm() == 3_000 * 48 * 4
        ids, _ = await engine.search(data[42], 1)
        assert ids[0] == 42


def test_the_tree_descent_finds_the_nearest_leaf_almost_always(data):
    from vectordb.core.tree import build_tree

    x = data[:6_000]
    tree, _, _ = build_tree(x, branching_factor=4, max_leaf_size=20, max_iterations=10, seed=0)
    centres = np.ascontiguousarray(tree.centroids[tree.leaf_nodes])
    nearest = np.argmin(((x[:, None] - centres[None]) ** 2).sum(axis=2), axis=1)
    got = ondisk._descend(x, tree)
    assert got.min() >= 0 and got.max() < tree.n_leaves and tree.n_leaves > 100
    assert (got == nearest).mean() >= 0.95  # a beam of 4 nodes a level: measured 0.989
    far, near = ((x - centres[got]) ** 2).sum(axis=1), ((x - centres[nearest]) ** 2).sum(axis=1)
    assert np.median(far - near) == 0 and (far - near).mean() < 0.1 * near.mean()


def test_a_build_with_many_leaves_assigns_by_the_descent(data, tmp_path, monkeypatch):
    monkeypatch.setattr(ondisk, "_DESCEND_ABOVE", 8)
    called = []
    real = ondisk._descend
    monkeypatch.setattr(ondisk, "_descend", lambda x, tree: called.append(1) or real(x, tree))
    x, q = data[:6_000], data[6_000:]
    with vdb.ClusteredIndex.build(x, max_leaf_size=100, path=tmp_path / "idx") as index:
        assert called and index.n_leaves > 8
        assert recall(index.search_batch(q, K)[0], brute(x, q, "l2")) >= 0.93


def test_a_list_of_rows_is_the_array_it_spells(data, tmp_path):
    rows = data[:300].tolist()
    with vdb.ClusteredIndex.build(rows, path=tmp_path / "idx") as index:
        assert len(index) == 300 and index.search(data[7], 1)[0][0] == 7
    batches = [data[:200], data[200:300]]  # a list of batches stays batches
    with vdb.ClusteredIndex.build(batches, path=tmp_path / "idx2") as index:
        assert len(index) == 300
