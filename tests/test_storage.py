"""Memory-mapped vectors, and saving / opening index directories."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage.format import sign_manifest

K = 10


def assert_same_results(
    a: vdb.ClusteredIndex, b: vdb.ClusteredIndex, queries: np.ndarray, **search
) -> None:
    for got, want in zip(
        a.search_batch(queries, K, **search), b.search_batch(queries, K, **search), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def assert_same_index(a: vdb.ClusteredIndex, b: vdb.ClusteredIndex, queries: np.ndarray) -> None:
    assert (len(a), a.dim, a.metric, a.n_leaves, a.params) == (
        len(b),
        b.dim,
        b.metric,
        b.n_leaves,
        b.params,
    )
    assert_same_results(a, b, queries)
    assert_same_results(a, b, queries, probes=1, rerank_factor=1)
    assert_same_results(a, b, queries, probes=a.n_leaves, rerank_factor=50)


@pytest.fixture
def fresh_index(small, metric):
    """An index of its own (tests below move its vectors or close it)."""
    return vdb.ClusteredIndex.build(
        small.vectors, leaf_scan="codes", metric=metric, max_leaf_size=200
    )


def leftovers(directory: Path, *expected: str) -> list[str]:
    """Entries of ``directory`` other than ``expected`` (temporary files, old copies)."""
    return sorted(set(os.listdir(directory)) - set(expected))


# --------------------------------------------------------------------------- mmap storage


def test_mmap_and_ram_modes_give_identical_results(small, fresh_index, tmp_path, metric):
    ram = vdb.ClusteredIndex.build(
        small.vectors, leaf_scan="codes", metric=metric, max_leaf_size=200
    )
    assert not fresh_index.is_using_mmap and fresh_index.mmap_path is None
    path = tmp_path / "vectors.f32"
    fresh_index.use_mmap_storage(path)
    assert fresh_index.is_using_mmap
    assert Path(fresh_index.mmap_path) == path
    assert path.stat().st_size == len(small.vectors) * small.dim * 4
    assert_same_index(fresh_index, ram, small.queries)
    assert leftovers(tmp_path, "vectors.f32") == []


def test_use_mmap_storage_replaces_an_existing_file(small, tmp_path):
    path = tmp_path / "vectors.f32"
    path.write_bytes(b"old contents")
    index = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)
    index.use_mmap_storage(str(path))  # a str path works too
    assert path.stat().st_size == len(small.vectors) * small.dim * 4
    assert index.search(small.vectors[3], 1)[0][0] == 3


def test_memory_usage_bytes_drops_the_vectors_with_mmap(tmp_path):
    """The library's own count (``memory_usage_bytes``) leaves the mapped vectors out.
    That the process really frees them is measured, not counted, in
    ``test_leaf_scan.py::test_mmap_frees_the_vectors_from_process_memory``."""
    n, dim = 20_000, 768
    index = vdb.ClusteredIndex.build(vdb.make_clustered(n, dim, seed=4), max_leaf_size=1000)
    in_ram = index.memory_usage_bytes()
    assert in_ram >= n * dim * 4
    index.use_mmap_storage(tmp_path / "vectors.f32")
    mapped = index.memory_usage_bytes()
    # Per vector: codes d/8 = 96 bytes, code factors 16, id and id map 24 (of 3,072).
    assert 0 < mapped <= n * (dim // 8 + 16 + 24) + index._state.tree.nbytes + (1 << 20)
    assert mapped <= 0.06 * in_ram
    index.close()


def test_close_ram_index_keeps_it_searchable(small):
    index = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)
    before = index.search(small.queries[0], K)
    index.close()
    index.close()
    after = index.search(small.queries[0], K)
    np.testing.assert_array_equal(before[0], after[0])


def test_context_manager_closes_a_mapped_index(small, tmp_path):
    with vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200) as index:
        index.use_mmap_storage(tmp_path / "v.f32")
        assert index.search(small.vectors[5], 1)[0][0] == 5
    with pytest.raises(vdb.IndexClosedError):
        index.search(small.queries[0], K)
    index.close()  # idempotent
    assert len(index) == len(small.vectors)  # metadata stays available


# --------------------------------------------------------------------------- save / open


@pytest.mark.parametrize("source", ["ram", "mmap"])
@pytest.mark.parametrize("open_mmap", [True, False])
def test_save_open_round_trip(small, fresh_index, tmp_path, source, open_mmap):
    reference = vdb.ClusteredIndex.build(
        small.vectors,
        metric=fresh_index.metric,
        max_leaf_size=200,
        leaf_scan="codes",
    )
    if source == "mmap":
        fresh_index.use_mmap_storage(tmp_path / "source.f32")
    fresh_index.save(tmp_path / "index")
    with vdb.ClusteredIndex.open(tmp_path / "index", mmap=open_mmap) as opened:
        assert opened.is_using_mmap is open_mmap
        if open_mmap:
            assert Path(opened.mmap_path) == tmp_path / "index" / "vectors.bin"
        assert_same_index(opened, reference, small.queries)
        assert isinstance(opened.metric, vdb.Metric)
    # The saved index did not disturb the one it was saved from.
    assert_same_results(fresh_index, reference, small.queries)


def test_open_with_verify_passes_on_a_good_index(small, saved_index, shared_index):
    with vdb.ClusteredIndex.open(saved_index, verify=True) as opened:
        assert_same_results(opened, shared_index(small, max_leaf_size=200), small.queries)


def test_opened_in_ram_can_move_to_mmap(small, saved_index, tmp_path):
    opened = vdb.ClusteredIndex.open(saved_index, mmap=False)
    expected = opened.search_batch(small.queries, K)
    opened.use_mmap_storage(tmp_path / "v.f32")
    for got, want in zip(opened.search_batch(small.queries, K), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_save_accepts_str_relative_and_empty_directory_paths(
    small, shared_index, tmp_path, monkeypatch
):
    index = shared_index(small, max_leaf_size=200)
    monkeypatch.chdir(tmp_path)
    index.save("relative")
    (tmp_path / "empty").mkdir()
    index.save(str(tmp_path / "empty"))
    for path in ("relative", tmp_path / "empty"):
        assert_same_results(vdb.ClusteredIndex.open(path), index, small.queries)
    assert leftovers(tmp_path, "relative", "empty") == []


def test_save_overwrites_an_existing_index(small, tmp_path):
    target = tmp_path / "index"
    first = vdb.ClusteredIndex.build(
        small.vectors, leaf_scan="codes", metric="l2", max_leaf_size=200
    )
    second = vdb.ClusteredIndex.build(
        small.vectors[:1000],
        metric="ip",
        max_leaf_size=100,
        rotate=False,
        leaf_scan="codes",
    )
    first.save(target)
    second.save(target)
    assert leftovers(tmp_path, "index") == []
    with vdb.ClusteredIndex.open(target, verify=True) as opened:
        assert_same_index(opened, second, small.queries)
    # Files of the first index that the second does not have are gone.
    assert not (target / "perm.npy").exists()
    first.save(target)
    with vdb.ClusteredIndex.open(target, verify=True) as opened:
        assert_same_index(opened, first, small.queries)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_save_onto_the_directory_it_is_mapped_from(small, tmp_path, metric):
    target = tmp_path / "index"
    built = vdb.ClusteredIndex.build(
        small.vectors, leaf_scan="codes", metric=metric, max_leaf_size=200
    )
    built.save(target)
    mapped = vdb.ClusteredIndex.open(target, mmap=True)
    expected = mapped.search_batch(small.queries, K)

    mapped.save(target)
    mapped.save(target)  # twice: the second save reads from the replaced, deleted file

    for got, want in zip(mapped.search_batch(small.queries, K), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert leftovers(tmp_path, "index") == []
    with vdb.ClusteredIndex.open(target, verify=True) as reopened:
        assert_same_index(reopened, built, small.queries)
    mapped.close()


def test_save_through_a_symlink_leaves_no_temporary_entries(small, shared_index, tmp_path):
    index = shared_index(small, max_leaf_size=200)
    index.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    index.save(tmp_path / "link")
    assert_same_results(vdb.ClusteredIndex.open(tmp_path / "link"), index, small.queries)
    assert leftovers(tmp_path, "real", "link") == []


def test_save_a_mapped_index_to_another_directory(small, tmp_path):
    index = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)
    index.use_mmap_storage(tmp_path / "v.f32")
    index.save(tmp_path / "copy")
    with vdb.ClusteredIndex.open(tmp_path / "copy", mmap=False, verify=True) as opened:
        assert_same_index(opened, index, small.queries)


# --------------------------------------------------------------------------- the on-disk format


def _expected_files(metric: str, rotate: bool) -> set[str]:
    names = {
        "manifest.json",
        "centroids.npy",
        "children.npy",
        "leaf_of_node.npy",
        "leaf_offsets.npy",
        "codes.npy",
        "factors.npy",
        "ids.npy",
        "vectors.bin",
        "metadata.sqlite",
    }
    if rotate:
        names |= {"perm.npy", "blocks.npy"}
    return names


@pytest.mark.parametrize(("rotate", "code_bits"), [(True, 1), (False, 1), (True, 4)])
def test_manifest_describes_the_saved_files(small, tmp_path, metric, rotate, code_bits):
    index = vdb.ClusteredIndex.build(
        small.vectors,
        metric=metric,
        max_leaf_size=200,
        rotate=rotate,
        seed=5,
        leaf_scan="codes",
        code_bits=code_bits,
    )
    index.save(tmp_path / "index")
    directory = tmp_path / "index"
    # The files of the manifest, and the write-ahead log (which it does not list).
    assert {p.name for p in directory.iterdir()} == _expected_files(metric, rotate) | {"wal.log"}

    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format_version"] == (3 if code_bits == 1 else 4)
    assert (directory / "manifest.json").read_bytes() == sign_manifest(manifest)
    assert manifest["format"] == "vectordb.ClusteredIndex"
    assert manifest["dim"] == small.dim
    assert manifest["n"] == len(small.vectors)
    assert manifest["metric"] == metric
    assert manifest["n_leaves"] == index.n_leaves
    assert (
        manifest["params"]
        == index.params
        == {
            "branching_factor": 10,
            "max_leaf_size": 200,
            "max_iterations": 20,
            "seed": 5,
            "rotate": rotate,
            "leaf_scan": "codes",
            "code_bits": code_bits,
            "leaf_target": index.params["leaf_target"],
            "target_recall": 0.95,
            "calibration": index.params["calibration"],
        }
    )
    assert set(manifest["files"]) == _expected_files(metric, rotate) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry["size"] == len(data), name
        assert entry["crc32"] == zlib.crc32(data), name
    assert (directory / "vectors.bin").stat().st_size == len(small.vectors) * small.dim * 4


def test_vectors_bin_holds_the_prepared_vectors_in_storage_order(small, tmp_path, metric):
    vdb.ClusteredIndex.build(
        small.vectors, leaf_scan="codes", metric=metric, max_leaf_size=200
    ).save(tmp_path / "i")
    ids = np.load(tmp_path / "i" / "ids.npy")
    assert sorted(ids) == list(range(len(small.vectors)))
    stored = np.fromfile(tmp_path / "i" / "vectors.bin", dtype="<f4").reshape(-1, small.dim)
    expected = small.vectors[ids].astype(np.float64)
    if metric == "cosine":
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(stored, expected, rtol=1e-6, atol=1e-7)


def test_use_mmap_storage_file_format(small, tmp_path):
    """The mapped file has the same raw format as a saved index's vectors.bin."""
    index = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)
    index.save(tmp_path / "i")
    index.use_mmap_storage(tmp_path / "v.f32")
    assert (tmp_path / "v.f32").read_bytes() == (tmp_path / "i" / "vectors.bin").read_bytes()


@pytest.mark.parametrize("n", [0, 5])
def test_row_arrays_give_every_row_where_it_lies(tmp_path, n):
    """Compiled readers get the rows without a copy: a mapped store's arrays are read-only
    (one array type, whatever the store holds: no recompiling), appended rows after the
    file's, and an in-memory store's rows all in the first array."""
    from vectordb.storage.vectors import InMemoryStorage, MmapStorage, write_vectors

    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    write_vectors(x[:n], tmp_path / "v.bin")
    store = MmapStorage(tmp_path / "v.bin", n, 3)
    try:
        first, second = store.row_arrays()
        assert first.shape == (n, 3) and second.shape == (0, 3)
        assert not first.flags.writeable and not second.flags.writeable
        store.append(x[n:])
        first, second = store.row_arrays()
        np.testing.assert_array_equal(np.concatenate([first, second]), x)
        assert not first.flags.writeable and not second.flags.writeable
    finally:
        store.close()
    ram = InMemoryStorage(x[:n].copy())
    ram.append(x[n:])
    first, second = ram.row_arrays()
    np.testing.assert_array_equal(first, x)
    assert second.shape == (0, 3)


@pytest.mark.parametrize("mmap", [False, True])
def test_an_index_whose_every_vector_was_deleted_saves_and_opens(tmp_path, mmap):
    x = vdb.make_clustered(600, 16, seed=1)
    index = vdb.ClusteredIndex.build(x[:500], metadata=[{"a": 1}] * 500)
    index.delete(np.arange(500))
    index.save(tmp_path / "empty")
    with vdb.ClusteredIndex.open(tmp_path / "empty", mmap=mmap) as reopened:
        assert len(reopened) == 0
        ids, dists = reopened.search(x[0], 3)
        assert (ids == -1).all() and np.isinf(dists).all()
        new = reopened.add(x[500:510], metadata=[{"b": 2}] * 10)
        ids, _ = reopened.search(x[500], 1)
        assert ids[0] == new[0] and reopened.get_metadata(int(new[0])) == {"b": 2}
        reopened.save(tmp_path / "refilled")
    with vdb.ClusteredIndex.open(tmp_path / "refilled") as again:
        assert len(again) == 10
        np.testing.assert_array_equal(np.sort(again.search(x[500], 10)[0]), np.sort(new))


def _vm_flags(path: Path) -> list[str]:
    """The VmFlags of this process's mappings of ``path`` (Linux ``/proc/self/smaps``)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if (
            line
            and not line.startswith(" ")
            and "-" in line.split()[0]
            and ":" not in line.split()[0]
        ):
            current = line.split()[-1] if len(line.split()) >= 6 else None
        elif line.startswith("VmFlags:") and current == str(path):
            flags.append(line.split(":", 1)[1].split())
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux smaps")
def test_the_mapping_reads_no_ahead_for_searches_and_ahead_for_passes_in_order(small, tmp_path):
    from vectordb.storage.memory import reading_in_order

    index = vdb.ClusteredIndex.build(small.vectors, max_leaf_size=50)
    index.use_mmap_storage(tmp_path / "v.bin")
    storage = index._state.storage
    index.search(small.queries[0], 3)
    (flags,) = _vm_flags(tmp_path / "v.bin")
    assert "rr" in flags and "sr" not in flags  # MADV_RANDOM: searches read scattered rows
    with reading_in_order(storage):
        (flags,) = _vm_flags(tmp_path / "v.bin")
        assert "sr" in flags and "rr" not in flags
    with pytest.raises(RuntimeError), reading_in_order(storage):
        raise RuntimeError("a pass that fails")
    (flags,) = _vm_flags(tmp_path / "v.bin")
    assert "rr" in flags  # back, whatever happened
    with reading_in_order(vdb.ClusteredIndex.build(small.vectors)._state.storage):
        pass  # in RAM: nothing to advise
    index.close()
